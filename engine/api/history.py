"""/v1/history: the message history kept in PostgreSQL -- searched (to, from, tenant,
tag, state, a time range; newest first, cursor pages), exported as CSV, one message with
its events -- and what ingest asks of it: a message Redis has let go (GET
/v1/messages/{id}), an Idempotency-Key older than Redis remembers, and whether unwritten
history makes ingest wait (503).

Scope ``read``: the history is what GET /v1/messages/{id} shows, kept longer. A key sees
its tenants' messages only (another tenant's message does not exist for it).
"""

from __future__ import annotations

import csv
import io
from typing import Final

from engine.api.exchange import (
    RETRY_AFTER_1,
    Fail,
    Reply,
    Request,
    invalid,
    json_reply,
    not_found,
    requested_tenant,
)
from engine.errors import HistoryError, HistoryUnavailable, ValidationError
from engine.history import (
    MAX_EXPORT_LIMIT,
    MAX_LIMIT,
    History,
    HistoryMessage,
    Search,
    check_cursor,
)
from engine.ids import is_id
from engine.models import JobView, parse_rfc3339_ms
from engine.queue import EnqueueResult

_MAX_TERM_CHARS: Final = 320
_MAX_STATE_CHARS: Final = 32
_CSV_COLUMNS: Final = (
    "id", "created_at", "tenant", "state", "attempts", "sender", "recipients", "subject",
    "tags", "sent_at", "updated_at", "last_error", "bounce", "provider_state",
    "provider_message_id",
)  # fmt: skip
# Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")


def unavailable(exc: Exception) -> Fail:
    return Fail(
        503, "history-unavailable", "History unavailable",
        f"the message history (PostgreSQL) did not answer: {exc}", headers=[RETRY_AFTER_1],
    )  # fmt: skip


def behind(lag_entries: int, lag_s: float) -> Fail:
    return Fail(
        503, "history-behind", "History behind",
        f"{lag_entries} events ({lag_s:.0f} s) are not yet in the message history "
        "(PostgreSQL down or slow); new messages wait until it catches up, so that none of "
        "its history is trimmed from Redis unwritten (history.on_lag); retry shortly",
        headers=[(b"retry-after", b"5")],
    )  # fmt: skip


def _time(req: Request, name: str) -> int:
    raw = req.query(name)
    if not raw:
        return 0
    if raw.isascii() and raw.isdigit() and len(raw) <= 15:
        return int(raw)  # ms since the epoch
    try:
        return parse_rfc3339_ms(name, raw)
    except ValidationError as exc:
        raise invalid(exc.field, exc.detail, "Invalid query parameter") from None


def _text(req: Request, name: str, most: int) -> str:
    raw = (req.query(name) or "").strip()
    if len(raw) > most or not raw.isprintable():
        raise invalid(name, f"{name} is at most {most} printable characters",
                      "Invalid query parameter")  # fmt: skip
    return raw


def parse_search(req: Request, *, export: bool) -> Search:
    """A search's filters from the query; 422 naming the parameter that is wrong."""
    cursor = req.query("cursor") or ""
    if cursor and not check_cursor(cursor):
        raise invalid("cursor", "not a cursor this API gave (next_cursor)",
                      "Invalid query parameter")  # fmt: skip
    most = MAX_EXPORT_LIMIT if export else MAX_LIMIT
    limit = req.int_query("limit", 1000 if export else 50, 1, most)
    tenant = requested_tenant(req)
    p = req.principal
    tenants: tuple[str, ...] | None
    if tenant is not None:
        tenants = (tenant,)
    elif p.tenants is not None:
        tenants = tuple(sorted(p.tenants))
    else:
        tenants = None
    since, until = _time(req, "since"), _time(req, "until")
    if since and until and until <= since:
        raise invalid("until", "until must be after since", "Invalid query parameter")
    return Search(
        to=_text(req, "to", _MAX_TERM_CHARS), sender=_text(req, "from", _MAX_TERM_CHARS),
        tag=_text(req, "tag", 64), state=_text(req, "state", _MAX_STATE_CHARS),
        tenants=tenants, since_ms=since, until_ms=until, cursor=cursor, limit=limit,
    )  # fmt: skip


def _cell(value: object) -> str:
    text = "" if value is None else " ".join(value) if isinstance(value, list) else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def csv_body(items: list[HistoryMessage]) -> bytes:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\r\n")
    w.writerow(_CSV_COLUMNS)
    for m in items:
        w.writerow([_cell(getattr(m, c)) for c in _CSV_COLUMNS])
    return out.getvalue().encode()


class HistoryRoutes:
    def __init__(self, history: History) -> None:
        self.history = history

    async def search_history(self, req: Request) -> Reply:
        """GET /v1/history (?format=csv: the page as CSV, its Next-Cursor a header)."""
        fmt = req.query("format") or "json"
        if fmt not in ("json", "csv"):
            raise invalid("format", "json or csv", "Invalid query parameter")
        search = parse_search(req, export=fmt == "csv")
        try:
            page = await self.history.store.search(search)
        except (HistoryUnavailable, HistoryError) as exc:
            raise unavailable(exc) from None
        if fmt == "json":
            return json_reply(200, page)
        headers = [(b"content-disposition", b'attachment; filename="history.csv"')]
        if page.next_cursor:
            headers.append((b"next-cursor", page.next_cursor.encode()))
        return Reply(200, csv_body(page.items), b"text/csv; charset=utf-8", headers)

    async def history_message(self, req: Request) -> Reply:
        """GET /v1/history/{id}: the message and its events, from PostgreSQL."""
        found = await self.lookup(req, req.params["id"], events=True)
        if found is None:
            raise not_found("No such message", f"the history has no message {req.params['id']!r}")
        return json_reply(200, found)

    async def lookup(self, req: Request, job_id: str, *, events: bool) -> HistoryMessage | None:
        """The message if it is in the history and the key sees its tenant."""
        if not is_id(job_id):
            return None
        try:
            found = await self.history.store.message(job_id, events=events)
        except (HistoryUnavailable, HistoryError) as exc:
            raise unavailable(exc) from None
        if found is None or not req.principal.sees(found.tenant):
            return None
        return found


def job_view_of(m: HistoryMessage) -> JobView:
    """A message from the history as GET /v1/messages/{id} shows one from Redis."""
    priority = "normal"
    if m.metadata and isinstance(m.metadata.get("priority"), str):
        priority = m.metadata["priority"]
    return JobView(
        m.id, m.state, m.attempts, m.created_at, m.updated_at, m.last_error, None, priority,
        m.tenant, m.bounce,
    )  # fmt: skip


async def prior_result(history: History, scoped_key: str, fingerprint: str) -> EnqueueResult | None:
    """What an Idempotency-Key Redis has forgotten was first used for, from PostgreSQL:
    a replay (the same body: its ids), a conflict (another body), or None (never used,
    or PostgreSQL cannot say: the request goes on, as without the history). Asked only
    when Redis no longer has the key, so a key Redis remembers costs no PostgreSQL trip."""
    if history.probe is None or await history.probe.known(scoped_key):
        return None
    try:
        prior = await history.store.prior_request(scoped_key)
    except (HistoryUnavailable, HistoryError):
        return None  # fail open: PostgreSQL never stops ingest
    if prior is None:
        return None
    if prior.fingerprint != fingerprint:
        return EnqueueResult("conflict", [])
    if not prior.complete:
        raise Fail(
            503, "history-behind", "History behind",
            "this Idempotency-Key's first request is not wholly in the history yet; retry "
            "shortly", headers=[(b"retry-after", b"5")],
        )  # fmt: skip
    return EnqueueResult("replayed", prior.ids)
