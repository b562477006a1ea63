"""The PostgreSQL adapter: a psycopg 3 connection pool whose blocking calls run in Trio
worker threads, and the translation of psycopg's errors into ``engine.errors``.

Why threads: psycopg's async API is asyncio's (there is no Trio one), and an asyncio
loop cannot run next to Trio's in one thread. Its sync API in a worker thread is what
psycopg documents for other frameworks: libpq waits on the socket with the GIL
released, the pool hands each thread its own connection, and a capacity limiter as
large as the pool keeps threads from queueing inside it. A cancelled caller abandons
its thread (``abandon_on_cancel``): the query finishes or hits statement_timeout_s
there, its connection goes back to the pool, and the caller is not held.

psycopg is imported when a database is first opened, not with this module: an engine
without history (no ``history.dsn``) never loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from engine.config import redact_url
from engine.errors import HistoryError, HistoryUnavailable

if TYPE_CHECKING:
    from psycopg import Connection
    from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)
T = TypeVar("T")

# SQLSTATE classes that mean "not now" rather than "wrong": connection exceptions (08),
# operator intervention (57: admin shutdown, cannot connect now), insufficient resources
# (53), and serialization/deadlock (40: retried like an outage).
_TRANSIENT_CLASSES = ("08", "57", "53", "40")


@contextmanager
def translate_errors() -> Iterator[None]:
    """psycopg's and the pool's exceptions as HistoryUnavailable (try again later) or
    HistoryError (a bug or a schema problem)."""
    import psycopg
    import psycopg_pool

    try:
        yield
    except psycopg_pool.PoolTimeout as exc:
        raise HistoryUnavailable(f"postgresql unavailable: no connection ({exc})") from exc
    except psycopg.OperationalError as exc:
        raise HistoryUnavailable(f"postgresql unavailable: {_first_line(exc)}") from exc
    except psycopg.Error as exc:
        state = getattr(exc, "sqlstate", None) or ""
        if state[:2] in _TRANSIENT_CLASSES:
            raise HistoryUnavailable(f"postgresql unavailable: {_first_line(exc)}") from exc
        raise HistoryError(f"postgresql error: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Database:
    """A pool of ``size`` connections to ``dsn``; ``await db.run(fn)`` runs ``fn(conn)``
    in a worker thread inside one transaction (committed when it returns)."""

    def __init__(
        self,
        dsn: str,
        *,
        size: int = 4,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 30.0,
        name: str = "engine",
    ) -> None:
        self.dsn = dsn
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_s = statement_timeout_s
        self.name = name
        self._pool: ConnectionPool[Connection[Any]] | None = None
        self._limiter = trio.CapacityLimiter(size)

    def __repr__(self) -> str:
        return f"Database({redact_url(self.dsn)!r}, size={self.size})"

    def _open_pool(self) -> ConnectionPool[Connection[Any]]:
        from psycopg_pool import ConnectionPool

        options = f"-c statement_timeout={int(self.statement_timeout_s * 1000)} -c TimeZone=UTC"
        pool: ConnectionPool[Connection[Any]] = ConnectionPool(
            self.dsn,
            min_size=1,
            max_size=self.size,
            open=False,
            name=self.name,
            # A connection is checked before it is handed out only when it was idle: one
            # that PostgreSQL closed (a restart) is replaced, not failed on.
            check=ConnectionPool.check_connection,
            reconnect_timeout=0,  # keep trying for ever (the writer waits it out)
            kwargs={
                "connect_timeout": max(1, int(self.connect_timeout_s)),
                "options": options,
                "application_name": self.name,
            },
        )
        pool.open(wait=False)
        return pool

    def pool(self) -> ConnectionPool[Connection[Any]]:
        if self._pool is None:
            self._pool = self._open_pool()
        return self._pool

    async def run(self, fn: Callable[[Connection[Any]], T], *, timeout_s: float | None = None) -> T:
        """``fn(conn)`` in a worker thread, in a transaction; HistoryUnavailable when no
        connection comes within ``timeout_s`` (default connect_timeout_s) or PostgreSQL
        fails in a way that may pass, HistoryError otherwise."""
        wait_s = self.connect_timeout_s if timeout_s is None else timeout_s

        def call() -> T:
            with translate_errors(), self.pool().connection(timeout=wait_s) as conn:
                return fn(conn)

        return await trio.to_thread.run_sync(call, abandon_on_cancel=True, limiter=self._limiter)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await trio.to_thread.run_sync(lambda: pool.close(timeout=5.0), abandon_on_cancel=True)
