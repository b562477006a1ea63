"""Access routes: API keys (create -- shown once --, list, revoke), tenants' sender
identities, and the dashboard's login (a session cookie for a key).

A key acts within its tenants: an admin key of one tenant manages that tenant's keys
only, and cannot mint a key for more than it sees itself.
"""

from __future__ import annotations

import time
from typing import Final

import msgspec

from engine.api.exchange import (
    Reply,
    Request,
    decode_json,
    empty_reply,
    invalid,
    json_reply,
    not_found,
)
from engine.api.guard import SESSION_COOKIE
from engine.auth import (
    ALL_TENANTS,
    SCOPES,
    AccessTable,
    KeyRecord,
    Principal,
    TenantRecord,
    key_hash,
    make_key,
    sign_session,
)
from engine.errors import ValidationError
from engine.models import check_tenant, ms_to_iso

MAX_ACCESS_BODY: Final = 64 * 1024
MAX_IDENTITIES: Final = 1000


class KeyIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/keys."""

    name: str = msgspec.field(default="")
    scopes: list[str] = msgspec.field(default_factory=lambda: ["send"])
    tenant: str = "default"
    # Further tenants it may act for; ["*"]: every tenant.
    tenants: list[str] = msgspec.field(default_factory=list)
    # Its messages go through validation, rendering, signing and the queue, and are
    # kept (GET /v1/messages/{id}/raw), never sent to a server.
    sandbox: bool = False


class KeyView(msgspec.Struct):
    kid: str
    name: str
    scopes: list[str]
    tenant: str
    tenants: list[str]
    created_at: str
    sandbox: bool  # its messages are kept, not sent


class KeyCreated(KeyView):
    """The new key: ``key`` is shown this once (only its hash is kept)."""

    key: str


class KeyList(msgspec.Struct):
    items: list[KeyView]


class TenantIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of PUT /v1/tenants/{name}: the From identities its keys may use."""

    identities: list[str]


class TenantList(msgspec.Struct):
    items: list[TenantRecord]


class LoginIn(msgspec.Struct, forbid_unknown_fields=True):
    key: str


class SessionView(msgspec.Struct):
    kid: str
    name: str
    tenant: str
    scopes: list[str]


_decode_key_in = msgspec.json.Decoder(KeyIn).decode
_decode_tenant_in = msgspec.json.Decoder(TenantIn).decode
_decode_login = msgspec.json.Decoder(LoginIn).decode
_encode = msgspec.json.Encoder().encode


def _view(r: KeyRecord) -> KeyView:
    return KeyView(r.kid, r.name, r.scopes, r.tenant, r.tenants, r.created_at, r.sandbox)


def check_key_in(body: KeyIn, creator: Principal) -> KeyIn:
    """Validate a new key against what its creator may grant (ValidationError names the
    field)."""
    if len(body.name) > 64 or not body.name.isprintable():
        raise ValidationError("name", "at most 64 printable characters")
    if not body.scopes or any(s not in SCOPES for s in body.scopes):
        raise ValidationError("scopes", f"one or more of {', '.join(SCOPES)}")
    check_tenant("tenant", body.tenant)
    if len(body.tenants) > 100:
        raise ValidationError("tenants", 'at most 100 tenants (or ["*"] for all)')
    for i, t in enumerate(body.tenants):
        if t != ALL_TENANTS:
            check_tenant(f"tenants[{i}]", t)
    if creator.tenants is not None:
        wanted = {body.tenant, *body.tenants}
        if ALL_TENANTS in wanted or not wanted <= creator.tenants:
            raise ValidationError(
                "tenants", "a key can be made only for tenants its creator acts for"
            )
    return body


def check_identities(identities: list[str]) -> list[str]:
    if len(identities) > MAX_IDENTITIES:
        raise ValidationError("identities", f"at most {MAX_IDENTITIES}")
    out = []
    for i, raw in enumerate(identities):
        ident = raw.strip().lower()
        at = ident.count("@")
        if ident != ALL_TENANTS and (
            not 1 <= len(ident) <= 254 or at > 1 or " " in ident or not ident.isprintable()
            or ident.startswith("@") or ident.endswith("@") or "." not in ident.rpartition("@")[2]
        ):  # fmt: skip
            raise ValidationError(f"identities[{i}]", 'a domain (example.com), an address or "*"')
        out.append(ident)
    return out


class AccessRoutes:
    def __init__(self, table: AccessTable, *, session_ttl_s: float) -> None:
        self._table = table
        self._ttl_s = session_ttl_s

    async def create_key(self, req: Request) -> Reply:
        body = decode_json(_decode_key_in, await req.json_body(MAX_ACCESS_BODY))
        try:
            body = check_key_in(body, req.principal)
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        kid, key = make_key()
        record = KeyRecord(
            kid, body.name, key_hash(key), sorted(set(body.scopes)), body.tenant,
            sorted(set(body.tenants)), ms_to_iso(int(time.time() * 1000)), body.sandbox,
        )  # fmt: skip
        await self._table.store.put_key(kid, _encode(record))
        await self._table.load()
        created = KeyCreated(kid, record.name, record.scopes, record.tenant, record.tenants,
                             record.created_at, record.sandbox, key)  # fmt: skip
        return json_reply(201, created, [(b"location", f"/v1/keys/{kid}".encode())])

    async def list_keys(self, req: Request) -> Reply:
        items = [_view(r) for r in self._table.key_records() if req.principal.sees(r.tenant)]
        items.sort(key=lambda v: (v.created_at, v.kid))
        return json_reply(200, KeyList(items))

    async def revoke_key(self, req: Request) -> Reply:
        kid = req.params["kid"]
        record = next((r for r in self._table.key_records() if r.kid == kid), None)
        if record is None or not req.principal.sees(record.tenant):
            raise not_found("No such key", f"kid {kid!r}")
        await self._table.store.delete_key(kid)
        await self._table.load()
        return empty_reply(204)

    async def put_tenant(self, req: Request) -> Reply:
        name = req.params["name"]
        try:
            check_tenant("name", name)
            body = decode_json(_decode_tenant_in, await req.json_body(MAX_ACCESS_BODY))
            identities = check_identities(body.identities)
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        if not req.principal.sees(name):
            raise not_found("No such tenant", f"this key does not act for tenant {name!r}")
        record = TenantRecord(name, identities)
        created = await self._table.store.put_tenant(name, _encode(record))
        await self._table.load()
        return json_reply(201 if created else 200, record)

    async def list_tenants(self, req: Request) -> Reply:
        items = [t for t in self._table.tenant_records() if req.principal.sees(t.name)]
        return json_reply(200, TenantList(sorted(items, key=lambda t: t.name)))

    async def login(self, req: Request) -> Reply:
        body = decode_json(_decode_login, await req.json_body(MAX_ACCESS_BODY))
        principal = await self._table.authenticate(body.key)
        if principal is None or not principal.allows("read"):
            raise invalid("key", "not a valid API key with the read or admin scope")
        expires = int(time.time() + self._ttl_s)
        cookie = sign_session(principal.kid, expires, self._table.secret)
        secure = "; Secure" if req.scope.get("scheme") == "https" else ""
        set_cookie = (f"{SESSION_COOKIE}={cookie}; Max-Age={int(self._ttl_s)}; Path=/; "
                      f"HttpOnly; SameSite=Strict{secure}")  # fmt: skip
        view = SessionView(principal.kid, principal.name, principal.tenant,
                           sorted(principal.scopes))  # fmt: skip
        return json_reply(200, view, [(b"set-cookie", set_cookie.encode())])

    async def whoami(self, req: Request) -> Reply:
        p = req.principal
        return json_reply(200, SessionView(p.kid, p.name, p.tenant, sorted(p.scopes)))

    async def logout(self, _: Request) -> Reply:
        gone = f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"
        return empty_reply(204, [(b"set-cookie", gone.encode())])
