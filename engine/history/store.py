"""What the API reads of the history: searches, one message with its events, and the
Idempotency-Keys Redis no longer remembers. Each call is one query in a worker thread."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from engine.history.db import Database
from engine.history.search import (
    EVENTS_SQL,
    IDEMPOTENCY_SQL,
    MESSAGE_SQL,
    TERM_SEARCH_SETTINGS,
    HistoryMessage,
    HistoryPage,
    Search,
    compile_search,
    created_of,
    event_of,
    message_of,
    page_of,
    uuid_of,
)
from engine.queue import event_order


@dataclass(frozen=True, slots=True)
class PriorRequest:
    """A request with the same Idempotency-Key, found in PostgreSQL."""

    fingerprint: str
    ids: list[str]  # its messages' ids, in the request's order
    complete: bool  # every message of it is in the history (the writer may lag)


class HistoryStore:
    def __init__(self, db: Database, *, idempotency_window_s: int = 0) -> None:
        self.db = db
        self.idempotency_window_s = idempotency_window_s

    async def search(self, s: Search) -> HistoryPage:
        sql, params = compile_search(s)

        def read(conn: Any) -> list[Any]:
            if "history_terms" in sql:
                for setting in TERM_SEARCH_SETTINGS:
                    conn.execute(setting)
            rows: list[Any] = conn.execute(sql, params).fetchall()
            return rows

        rows = await self.db.run(read)
        return page_of(rows, s.limit)

    async def message(self, message_id: str, *, events: bool = False) -> HistoryMessage | None:
        """The message (and, when asked, its events, oldest first); None when unknown."""
        params = {"id": uuid_of(message_id), "created": created_of(message_id)}

        def read(conn: Any) -> tuple[Any, list[Any]]:
            row = conn.execute(MESSAGE_SQL, params).fetchone()
            evs = conn.execute(EVENTS_SQL, params).fetchall() if row and events else []
            return row, evs

        row, evs = await self.db.run(read)
        if row is None:
            return None
        found = message_of(row)
        if events:
            found.events = sorted((event_of(e) for e in evs), key=lambda e: event_order(e.event_id))
        return found

    async def prior_request(self, scoped_key: str) -> PriorRequest | None:
        """The request first sent with this (tenant-scoped) key, within the window."""
        since = dt.datetime.now(tz=dt.UTC) - dt.timedelta(seconds=self.idempotency_window_s)
        params = {"key": scoped_key, "since": since}
        rows = await self.db.run(lambda conn: conn.execute(IDEMPOTENCY_SQL, params).fetchall())
        if not rows:
            return None
        n = rows[0][3] or len(rows)
        ids = [r[0].replace("-", "") for r in rows]
        return PriorRequest(rows[0][1] or "", ids, len(ids) >= n)
