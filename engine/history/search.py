"""Looking the history up: a search's filters -> one SQL query (pure: ``compile_search``),
and the shapes an answer has (``HistoryMessage``, ``HistoryEvent``, ``HistoryPage``).

A search is driven by the most selective term it has -- a recipient, else a tag, else
the From address -- through ``history_terms``' ordered index (newest first, a page costs
the same however many messages match); without one, by the tenant's index or the primary
key (ids are time-ordered). The other filters narrow what that index yields. Pagination
is by cursor: the last id of a page, the next page's ids are older.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from engine.ids import is_id

MAX_LIMIT: Final = 500
MAX_EXPORT_LIMIT: Final = 10_000

_COLUMNS: Final = (
    "m.id::text, m.created_at, m.tenant, m.sender, m.recipients, m.subject, m.tags, "
    "m.metadata, m.state, m.attempts, m.updated_at, m.sent_at, m.last_error, m.bounce, "
    "m.provider_state, m.provider_message_id"
)


class HistoryEvent(msgspec.Struct, omit_defaults=True):
    event_id: str
    type: str
    at: str
    state: str
    attempt: int
    error: str | None = None
    bounce: str | None = None
    recipients: list[str] = []


class HistoryMessage(msgspec.Struct):
    """A message as the history keeps it (GET /v1/history, /v1/history/{id})."""

    id: str
    created_at: str
    tenant: str
    state: str
    attempts: int
    updated_at: str
    sender: str | None  # None: its record had gone before the writer read it
    recipients: list[str]
    subject: str | None
    tags: list[str]
    sent_at: str | None = None
    last_error: str | None = None
    bounce: str | None = None
    provider_state: str | None = None
    provider_message_id: str | None = None
    metadata: dict[str, Any] | None = None
    events: list[HistoryEvent] | None = None  # GET /v1/history/{id} only


class HistoryPage(msgspec.Struct):
    items: list[HistoryMessage]
    # The next page's ?cursor= (None: this was the last page).
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Search:
    """A search's filters, checked (engine.api.history parses the query)."""

    to: str = ""  # a recipient (bare address; any case)
    sender: str = ""  # the From address
    tag: str = ""
    state: str = ""
    tenants: tuple[str, ...] | None = None  # None: every tenant
    since_ms: int = 0  # created at or after
    until_ms: int = 0  # created before (0: no bound)
    cursor: str = ""  # the last id of the previous page
    limit: int = 50


def _uuid(hex_id: str) -> str:
    return f"{hex_id[:8]}-{hex_id[8:12]}-{hex_id[12:16]}-{hex_id[16:20]}-{hex_id[20:]}"


def _bound(ms: int) -> str:
    """The smallest id made at ``ms`` (ids start with their 48-bit time)."""
    return _uuid(ms.to_bytes(6, "big").hex() + "0" * 20)


_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _ts(ms: int) -> dt.datetime:
    """Exactly the timestamp SQL makes of ``ms`` (no float on the way)."""
    return _EPOCH + dt.timedelta(milliseconds=ms)


def compile_search(s: Search) -> tuple[str, dict[str, Any]]:
    """The query of a search and its parameters (one page plus one row, to tell
    whether there is a next page)."""
    params: dict[str, Any] = {"limit": s.limit + 1}
    where: list[str] = []
    driver = ""
    if s.to:
        driver, params["term"] = "t", f"to:{s.to.lower()}"
    elif s.tag:
        driver, params["term"] = "t", f"tag:{s.tag}"
    elif s.sender:
        driver, params["term"] = "t", f"from:{s.sender.lower()}"
    key = "t.message_id" if driver else "m.id"
    created = "t.created_at" if driver else "m.created_at"
    tenant = "t.tenant" if driver else "m.tenant"
    if driver:
        where.append("t.term = %(term)s")
    if s.tenants is not None:
        if len(s.tenants) == 1:
            where.append(f"{tenant} = %(tenant)s")
            params["tenant"] = s.tenants[0]
        else:
            where.append(f"{tenant} = ANY(%(tenants)s)")
            params["tenants"] = list(s.tenants)
    # Time bounds on the id (the index order) and on created_at (partition pruning).
    if s.since_ms:
        where += [f"{key} >= %(since_id)s::uuid", f"{created} >= %(since)s"]
        params["since_id"], params["since"] = _bound(s.since_ms), _ts(s.since_ms)
    if s.until_ms:
        where += [f"{key} < %(until_id)s::uuid", f"{created} < %(until)s"]
        params["until_id"], params["until"] = _bound(s.until_ms), _ts(s.until_ms)
    if s.cursor:
        where.append(f"{key} < %(cursor)s::uuid")
        params["cursor"] = _uuid(s.cursor)
        # Its time bounds the partitions too (ids are made at their creation time).
        where.append(f"{created} <= %(cursor_at)s")
        params["cursor_at"] = _ts(int(s.cursor[:12], 16))
    if s.state:
        where.append("m.state = %(state)s")
        params["state"] = s.state
    if driver and s.to and s.tag:
        where.append("m.tags @> ARRAY[%(tag)s]::text[]")
        params["tag"] = s.tag
    if driver and (s.to or s.tag) and s.sender:
        where.append("lower(m.sender) LIKE %(sender_like)s")
        params["sender_like"] = "%" + _like(s.sender.lower()) + "%"
    if not driver and s.sender:  # unreachable: a sender drives; kept for clarity
        raise AssertionError("sender searches are driven by their term")
    if not driver:
        sql = (
            f"SELECT {_COLUMNS} FROM history_messages m"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY m.id DESC LIMIT %(limit)s"
        )
        return sql, params
    # The term's rows in index order (newest first), each joined to its message by a
    # lookup: LATERAL makes that a nested loop that stops at the page's end. A plain join
    # let the planner hash every message and sort a busy term's matches (0.85 s for an
    # address with 100,000 messages in 10 million; see README, "History").
    term_where = [w for w in where if not w.startswith("m.")]
    msg_where = [w for w in where if w.startswith("m.")]
    # With no filter on the message itself the page is the term's first rows: the limit
    # goes inside, where it makes the planner read each day's index backwards.
    inner_limit = "" if msg_where else " LIMIT %(limit)s"
    sql = (
        "SELECT m.* FROM (SELECT t.message_id, t.created_at FROM history_terms t WHERE "
        + " AND ".join(term_where)
        + f" ORDER BY t.message_id DESC{inner_limit}) t CROSS JOIN LATERAL ("
        + f"SELECT {_COLUMNS} FROM history_messages m"
        + " WHERE m.id = t.message_id AND m.created_at = t.created_at"
        + "".join(" AND " + w for w in msg_where)
        # OFFSET 0 keeps the planner from flattening the lookup into a join (it did, and
        # chose a hash join over every message: 0.3-6 s on 10 million; README)
        + " OFFSET 0) m ORDER BY t.message_id DESC LIMIT %(limit)s"
    )
    return sql, params


# Planner settings for the transaction of a search driven by a term: a page wants each
# day's index read backwards and merged (it stops at the page's end), never every match
# gathered and sorted -- which the planner picked for busy terms (README, "History").
TERM_SEARCH_SETTINGS: Final = ("SET LOCAL enable_sort = off", "SET LOCAL enable_bitmapscan = off")


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return (
        value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{value.microsecond // 1000:03d}Z"
    )


def message_of(row: tuple[Any, ...]) -> HistoryMessage:
    """A row of ``_COLUMNS`` as the API shows it."""
    (mid, created, tenant, sender, recipients, subject, tags, metadata, state, attempts,
     updated, sent, last_error, bounce, provider_state, provider_mid) = row  # fmt: skip
    return HistoryMessage(
        mid.replace("-", ""), _iso(created) or "", tenant, state, attempts, _iso(updated) or "",
        sender, list(recipients or []), subject, list(tags or []), _iso(sent), last_error,
        bounce, provider_state, provider_mid, metadata,
    )  # fmt: skip


def event_of(row: tuple[Any, ...]) -> HistoryEvent:
    event_id, kind, at, state, attempt, error, bounce, recipients = row
    return HistoryEvent(
        event_id, kind, _iso(at) or "", state, attempt, error, bounce, list(recipients or [])
    )


def page_of(rows: list[tuple[Any, ...]], limit: int) -> HistoryPage:
    items = [message_of(r) for r in rows[:limit]]
    return HistoryPage(items, items[-1].id if len(rows) > limit and items else None)


def check_cursor(cursor: str) -> bool:
    return is_id(cursor)


MESSAGE_SQL: Final = (
    f"SELECT {_COLUMNS} FROM history_messages m"
    " WHERE m.id = %(id)s::uuid AND m.created_at = %(created)s"
)
EVENTS_SQL: Final = (
    "SELECT event_id, type, at, state, attempt, error, bounce, recipients FROM history_events"
    " WHERE message_id = %(id)s::uuid AND created_at = %(created)s"
)
IDEMPOTENCY_SQL: Final = (
    "SELECT m.id::text, m.idem_fp, m.idem_pos, m.idem_n FROM history_messages m"
    " WHERE m.idem_key = %(key)s AND m.created_at >= %(since)s ORDER BY m.idem_pos"
)


def created_of(message_id: str) -> dt.datetime:
    """The partition key of a message: its id's time."""
    return _ts(int(message_id[:12], 16))


def uuid_of(message_id: str) -> str:
    return _uuid(message_id)
