"""Message history in PostgreSQL: a writer that keeps every message and lifecycle event
beyond Redis's retention (consumer group "history" on the event stream), the schema and
its migrations, and what the API reads (search, one message, old Idempotency-Keys).

Reads Redis only through ``engine.queue``; PostgreSQL only here (psycopg 3, in worker
threads: ``db``). Never imports the API, senders or transports. Callers use this face.
"""

from engine.history.db import Database
from engine.history.parts import History, build_history
from engine.history.schema import applied_versions, migrate, migrations
from engine.history.search import (
    MAX_EXPORT_LIMIT,
    MAX_LIMIT,
    HistoryEvent,
    HistoryMessage,
    HistoryPage,
    Search,
    check_cursor,
    compile_search,
)
from engine.history.store import HistoryStore, PriorRequest
from engine.history.writer import HistoryStatistics, HistoryWriter

__all__ = [
    "MAX_EXPORT_LIMIT",
    "MAX_LIMIT",
    "Database",
    "History",
    "HistoryEvent",
    "HistoryMessage",
    "HistoryPage",
    "HistoryStatistics",
    "HistoryStore",
    "HistoryWriter",
    "PriorRequest",
    "Search",
    "applied_versions",
    "build_history",
    "check_cursor",
    "compile_search",
    "migrate",
    "migrations",
]
