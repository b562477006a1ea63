"""/v1/domains: DKIM signing domains. A key is made (or taken) per domain and its DNS
TXT record shown; the private key never leaves. The settings' keys (``dkim.keys``) are
listed too, and cannot be changed here.

A domain's key signs every tenant's mail From that domain, so adding or removing one
takes an admin key that acts for every tenant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TypeVar

import msgspec
import trio

from engine.api.exchange import (
    Fail,
    Reply,
    Request,
    decode_json,
    empty_reply,
    invalid,
    json_reply,
    not_found,
)
from engine.config import DkimSettings
from engine.domainkeys import (
    DEFAULT_SELECTOR,
    DnsRecord,
    DomainRecord,
    UnusableKey,
    algorithm_of,
    check_domain,
    check_selector,
    dns_record,
    generate_private_key,
    key_algorithm,
    load_private_key,
    private_pem,
)
from engine.models import ms_to_iso
from engine.queue import DomainStore

MAX_BODY: Final = 32 * 1024
MAX_DOMAINS: Final = 10_000


class DomainIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/domains."""

    domain: str
    selector: str = DEFAULT_SELECTOR
    # "rsa" (RSA 2048 made when no key is given) or "ed25519"; with private_key, the
    # key's own kind (which it must match if given).
    algorithm: str | None = None
    # A PEM private key (PKCS#8 or PKCS#1, unencrypted); none: a new key pair is made.
    private_key: str | None = None


class DomainView(msgspec.Struct):
    domain: str  # A-labels, lower case
    selector: str
    algorithm: str  # rsa-sha256 or ed25519-sha256 (the a= tag)
    # "api" (POST /v1/domains) or "settings" (dkim.keys: change it in the file).
    source: str
    # Publish this before sending: until receivers find it, the signature fails.
    dns: DnsRecord
    created_at: str = ""


class DomainList(msgspec.Struct):
    items: list[DomainView]


T = TypeVar("T")

_decode_in = msgspec.json.Decoder(DomainIn).decode
_decode_record = msgspec.json.Decoder(DomainRecord).decode
_encode = msgspec.json.Encoder().encode


def _forbidden() -> Fail:
    return Fail(
        403, "all-tenants-only", "Needs an admin key of every tenant",
        "a domain's DKIM key signs every tenant's mail from it: only a key acting for "
        'every tenant (tenants ["*"]) may add or remove one',
    )  # fmt: skip


def _conflict(domain: str) -> Fail:
    return Fail(
        409, "configured", "Configured in the settings",
        f"{domain} has its key in the settings file (dkim.keys): change it there",
    )  # fmt: skip


class DomainRoutes:
    def __init__(self, store: DomainStore, settings: DkimSettings) -> None:
        self._store = store
        # The settings' keys, read once (their files were checked at load).
        self._configured: dict[str, DomainView] = {}
        for entry in settings.keys:
            with open(entry.private_key_file, "rb") as f:
                key = load_private_key(f.read(), algorithm_of(entry.algorithm), checked=False)
            domain, selector = check_domain(entry.domain), check_selector(entry.selector)
            self._configured[domain] = DomainView(
                domain, selector, key_algorithm(key), "settings", dns_record(selector, domain, key)
            )

    async def create_domain(self, req: Request) -> Reply:
        if req.principal.tenants is not None:
            raise _forbidden()
        body = decode_json(_decode_in, await req.json_body(MAX_BODY))
        domain = _field("domain", check_domain, body.domain)
        selector = _field("selector", check_selector, body.selector)
        algorithm = (
            None if body.algorithm is None else _field("algorithm", algorithm_of, body.algorithm)
        )
        if domain in self._configured:
            raise _conflict(domain)
        _, records = await self._store.snapshot()
        if domain not in records and len(records) >= MAX_DOMAINS:
            raise invalid("domain", f"at most {MAX_DOMAINS} domains")
        # A new RSA key, or OpenSSL's check of a given one, takes 50-200 ms: a thread.
        if body.private_key is None:
            pem = await trio.to_thread.run_sync(generate_private_key, algorithm or "rsa-sha256")
        else:
            pem = body.private_key.encode("utf-8", "replace")
        try:
            key = await trio.to_thread.run_sync(load_private_key, pem, algorithm)
        except UnusableKey as exc:
            raise invalid("private_key", str(exc)) from None
        record = DomainRecord(
            domain, selector, key_algorithm(key), private_pem(key),
            ms_to_iso(int(time.time() * 1000)),
        )  # fmt: skip
        created = await self._store.put(domain, _encode(record))
        view = DomainView(
            domain, selector, record.algorithm, "api", dns_record(selector, domain, key),
            record.created_at,
        )  # fmt: skip
        location = [(b"location", f"/v1/domains/{domain}".encode())]
        return json_reply(201 if created else 200, view, location)

    async def list_domains(self, _: Request) -> Reply:
        records = (await self._store.snapshot())[1]
        views = {d: v for d, raw in records.items() if (v := _view(raw)) is not None}
        views.update(self._configured)
        return json_reply(200, DomainList([views[d] for d in sorted(views)]))

    async def get_domain(self, req: Request) -> Reply:
        domain = _domain_param(req)
        view = self._configured.get(domain)
        if view is None:
            raw = await self._store.get(domain)
            view = _view(raw) if raw is not None else None
        if view is None:
            raise not_found("No such domain", f"no DKIM key for {domain!r}")
        return json_reply(200, view)

    async def delete_domain(self, req: Request) -> Reply:
        if req.principal.tenants is not None:
            raise _forbidden()
        domain = _domain_param(req)
        if domain in self._configured:
            raise _conflict(domain)
        if not await self._store.delete(domain):
            raise not_found("No such domain", f"no DKIM key for {domain!r}")
        return empty_reply(204)


def _field(name: str, check: Callable[[str], T], value: str) -> T:
    """``check(value)``; 422 naming the field when it raises ValueError."""
    try:
        return check(value)
    except ValueError as exc:
        raise invalid(name, str(exc)) from None


def _domain_param(req: Request) -> str:
    raw = req.params["domain"]
    try:
        return check_domain(raw)
    except ValueError:
        raise not_found("No such domain", f"{raw[:100]!r} is not a domain name") from None


def _view(raw: bytes) -> DomainView | None:
    """The API's view of a stored record (None when it cannot be read)."""
    try:
        r = _decode_record(raw)
        key = load_private_key(r.private_key.encode(), r.algorithm, checked=False)
    except (msgspec.DecodeError, ValueError):
        return None
    return DomainView(
        r.domain, r.selector, r.algorithm, "api", dns_record(r.selector, r.domain, key),
        r.created_at,
    )  # fmt: skip
