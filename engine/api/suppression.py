"""/v1/suppressions: a tenant's suppression list -- paged, looked up, added to (JSON, or
a CSV import) and taken off. A key manages the lists of the tenants it acts for
(``?tenant=``, its own by default); hard bounces add to them in the queue, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Final

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
    requested_tenant,
)
from engine.errors import ValidationError
from engine.models import Address, check_address, ms_to_iso
from engine.queue import Suppression, SuppressionStore, address_key
from engine.unsubscribe import list_name, list_scope

MAX_ADD: Final = 1000  # addresses per POST /v1/suppressions
MAX_REASON_CHARS: Final = 256
MAX_BODY: Final = 256 * 1024  # a POST of MAX_ADD addresses fits
MAX_IMPORT_BYTES: Final = 4 * 1024 * 1024
MAX_IMPORT_LINES: Final = 100_000
MAX_REFUSED_LISTED: Final = 1000  # refused lines an import's answer lists (all are counted)
MAX_PAGE: Final = 1000
_CSV_TYPES: Final = (b"text/csv", b"text/plain")

Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON_CHARS)]


class SuppressionsIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/suppressions."""

    addresses: Annotated[list[Address], msgspec.Meta(min_length=1, max_length=MAX_ADD)]
    reason: Reason = "manual"


class SuppressionView(msgspec.Struct):
    address: str  # bare, ASCII letters lower-cased: the spelling it is matched in
    reason: str
    source: str | None  # the message whose hard bounce added it (None: added by hand)
    bounce: str | None  # that bounce's class (engine.bounce)
    added_at: str


class SuppressionList(msgspec.Struct):
    tenant: str
    total: int
    items: list[SuppressionView]
    next_cursor: str | None  # give it as ?cursor= for the next page; None: the last one


class SuppressionsAdded(msgspec.Struct):
    tenant: str
    added: int  # new on the list
    existing: int  # on it already (their first entry is kept) or repeated in the request


class RefusedLine(msgspec.Struct):
    line: int  # 1 for the first line
    detail: str


class ImportResult(msgspec.Struct):
    tenant: str
    lines: int  # lines read, blank and header lines included
    added: int
    existing: int
    refused: int
    refused_lines: list[RefusedLine]  # the first MAX_REFUSED_LISTED


_decode_in = msgspec.json.Decoder(SuppressionsIn).decode


def _view(s: Suppression) -> SuppressionView:
    return SuppressionView(s.address, s.reason, s.source, s.bounce, ms_to_iso(s.at_ms))


def _check_reason(field: str, reason: str) -> str:
    if len(reason) > MAX_REASON_CHARS:
        raise ValidationError(field, f"at most {MAX_REASON_CHARS} characters")
    if not reason.isprintable():
        raise ValidationError(field, "no control characters")
    return reason


def _unquote(field: str) -> str:
    """A CSV field: trimmed, and ``"..."`` unwrapped (``""`` inside it is one quote)."""
    field = field.strip()
    if len(field) >= 2 and field[0] == field[-1] == '"':
        return field[1:-1].replace('""', '"')
    return field


@dataclass(frozen=True, slots=True)
class ParsedImport:
    lines: int
    accepted: int  # lines with an address taken (repeats included)
    reasons: dict[str, str]  # address key -> reason (the first line of each address)
    refused: list[RefusedLine]


def parse_import(text: str, default_reason: str) -> ParsedImport:
    """The lines of an import: one address per line, or ``address,reason`` (split at
    the first comma: addresses hold none). Blank lines are skipped, and a first line
    without an ``@`` is taken for a header."""
    lines = text.splitlines()
    found: dict[str, str] = {}
    refused: list[RefusedLine] = []
    accepted = 0
    header_possible = True
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        raw, comma, rest = line.partition(",")
        address = _unquote(raw)
        if header_possible and "@" not in address:
            header_possible = False
            continue
        header_possible = False
        try:
            address = check_address(f"line {n}", address)
            reason = _check_reason(f"line {n}", _unquote(rest) if comma else default_reason)
        except ValidationError as exc:
            refused.append(RefusedLine(n, exc.detail))
            continue
        found.setdefault(address_key(address), reason or default_reason)
        accepted += 1
    return ParsedImport(len(lines), accepted, found, refused)


class SuppressionRoutes:
    """Handlers of the /v1/suppressions routes."""

    def __init__(self, store: SuppressionStore) -> None:
        self._store = store

    def _tenant(self, req: Request) -> str:
        """The list a request is about: the tenant's (``?tenant=``, else the key's own),
        or with ``?list=`` that tenant's list of one-click unsubscribes from a list
        (``<tenant>:list:<list>``, engine.unsubscribe.list_scope)."""
        tenant = requested_tenant(req) or req.principal.tenant
        named = req.query("list")
        if named is None:
            return tenant
        try:
            return list_scope(tenant, list_name(named))
        except ValidationError as exc:
            raise invalid("list", exc.detail, "Invalid query parameter") from None

    async def list_suppressions(self, req: Request) -> Reply:
        tenant = self._tenant(req)
        limit = req.int_query("limit", 100, 1, MAX_PAGE)
        raw = req.query("cursor") or "0"
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 20 and int(raw) < 2**64):
            raise invalid(
                "cursor", "the next_cursor of the previous page", "Invalid query parameter"
            )
        page = await self._store.page(tenant, int(raw), limit)
        following = str(page.next_cursor) if page.next_cursor else None
        items = [_view(s) for s in page.items]
        return json_reply(200, SuppressionList(tenant, page.total, items, following))

    async def get_suppression(self, req: Request) -> Reply:
        tenant = self._tenant(req)
        address = req.params["address"]
        found = await self._store.get(tenant, address_key(address)) if len(address) <= 400 else None
        if found is None:
            raise not_found("Not suppressed", f"{address!r} is not on tenant {tenant!r}'s list")
        return json_reply(200, _view(found))

    async def add_suppressions(self, req: Request) -> Reply:
        tenant = self._tenant(req)
        body = decode_json(_decode_in, await req.json_body(MAX_BODY))
        try:
            reason = _check_reason("reason", body.reason)
            keys = {
                address_key(check_address(f"addresses[{i}]", a)): reason
                for i, a in enumerate(body.addresses)
            }
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        added = await self._store.add(tenant, keys)
        return json_reply(200, SuppressionsAdded(tenant, added, len(body.addresses) - added))

    async def delete_suppression(self, req: Request) -> Reply:
        tenant = self._tenant(req)
        address = req.params["address"]
        if len(address) > 400 or not await self._store.remove(tenant, address_key(address)):
            raise not_found("Not suppressed", f"{address!r} is not on tenant {tenant!r}'s list")
        return empty_reply(204)

    async def import_suppressions(self, req: Request) -> Reply:
        tenant = self._tenant(req)
        content_type = (req.header(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if content_type not in _CSV_TYPES:
            raise Fail(
                415, "unsupported-media-type", "Unsupported Media Type",
                "send the list as Content-Type: text/csv, one address (or address,reason) a line",
            )  # fmt: skip
        raw = await req.body(MAX_IMPORT_BYTES, "the import's limit")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise Fail(400, "malformed-csv", "Malformed CSV", f"not UTF-8: {exc}") from None
        if text.count("\n") > MAX_IMPORT_LINES:
            raise invalid(None, f"at most {MAX_IMPORT_LINES} lines: split the file")
        # ~0.5 s for 100k lines: in a thread, so the loop keeps answering meanwhile.
        parsed = await trio.to_thread.run_sync(parse_import, text, "import")
        added = await self._store.add(tenant, parsed.reasons)
        result = ImportResult(
            tenant, parsed.lines, added, parsed.accepted - added, len(parsed.refused),
            parsed.refused[:MAX_REFUSED_LISTED],
        )  # fmt: skip
        return json_reply(200, result)
