"""The history writer of one replica: the event stream, through the consumer group
"history", into PostgreSQL -- at least once from the stream, exactly one row per event.

    HistoryWriter.serve
    ├── _write     XREADGROUP (and XAUTOCLAIM what a dead writer left) → read the records
    │              of newly announced jobs (one script) → one transaction → XACK. A batch
    │              PostgreSQL does not take is retried, with backoff, until it does: its
    │              entries stay pending meanwhile and the lag grows; nothing is lost.
    ├── _maintain  migrations (once), today's and the next days' partitions, retention
    └── _watch     the group's lag every second: the metric, /readyz, the dashboard, and
                   ingest's 503 before unwritten entries would be trimmed (history.on_lag)

PostgreSQL never slows ingest or sending: this is its own task, a batch at a time, its
queries in worker threads (engine.history.db); what it costs the replica is reading the
stream (~1 µs an entry) and building the rows.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio

from engine.config import HistorySettings
from engine.errors import HistoryError, HistoryUnavailable, QueueError
from engine.history import sql
from engine.history.db import Database
from engine.history.rows import build, day_of, oldest_kept_day, plan
from engine.history.schema import migrate
from engine.metrics import HistoryMetrics, Metrics
from engine.models import Event
from engine.queue import GroupLag, HistoryStream, StoredJob

if TYPE_CHECKING:
    from psycopg import Connection

    from engine.history.rows import Batch

log = logging.getLogger(__name__)

_BLOCK_MS: Final = 1000
_RECLAIM_EVERY_S: Final = 15.0
_WATCH_EVERY_S: Final = 1.0
_MAINTAIN_EVERY_S: Final = 3600.0
_DAYS_AHEAD: Final = 2  # partitions made ahead of need (a day's first write finds them)
_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0)


@dataclass(frozen=True, slots=True)
class HistoryStatistics:
    """The history as this replica sees it (/readyz, the dashboard, GET /v1/stats)."""

    writing: bool  # this replica runs a writer
    up: bool  # PostgreSQL took the last write (or answered the last check)
    lag_entries: int  # stream entries not yet in PostgreSQL (unread + pending)
    lag_s: float  # age of the oldest of them (0: caught up)
    refusing: bool  # ingest answers 503 (history.on_lag = "refuse" and the lag too high)
    events_written: int  # by this replica
    batches_failed: int
    missed_entries: int  # trimmed before they were written (lost; counted since start)
    last_error: str


class HistoryWriter:
    def __init__(
        self,
        stream: HistoryStream,
        db: Database,
        settings: HistorySettings,
        instance: str,
        *,
        events_maxlen: int,
        metrics: HistoryMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stream = stream
        self.db = db
        self.settings = settings
        self.instance = instance
        self.events_maxlen = events_maxlen
        self.metrics = metrics if metrics is not None else Metrics().history
        self._clock = clock
        self._days: set[dt.date] = set()  # days whose partitions exist
        self._ready = trio.Event()  # migrations applied
        self._lag = GroupLag(None, 0, None)
        self._up = False
        self._events = 0
        self._failed = 0
        self._missed = 0
        self._missed_base: int | None = None
        self._last_error = ""
        self._was_refusing = False
        self._refusal_logged = False

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def statistics(self) -> HistoryStatistics:
        lag_s = max(0.0, self.now_ms() / 1000 - self._lag.oldest_ms / 1000) if (
            self._lag.oldest_ms
        ) else 0.0  # fmt: skip
        return HistoryStatistics(
            self.settings.writer, self._up, self._lag.unwritten, round(lag_s, 3),
            self.refusing(), self._events, self._failed, self._missed, self._last_error,
        )  # fmt: skip

    def refusing(self) -> bool:
        """Ingest should answer 503: unwritten entries have reached the share of the
        stream's length (queue.events_maxlen) that history.refuse_at_ratio allows."""
        if self.settings.on_lag != "refuse" or not self.events_maxlen:
            return False
        return self._lag.unwritten >= self.settings.refuse_at_ratio * self.events_maxlen

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            if self.settings.writer:
                nursery.start_soon(self._maintain)
                nursery.start_soon(self._write)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    # -- the stream → PostgreSQL ---------------------------------------------------------

    async def _write(self) -> NoReturn:
        await self._ready.wait()
        reclaimed_at = 0.0
        count = self.settings.batch_entries
        while True:
            try:
                await self.stream.ensure_group()
                while True:
                    if time.monotonic() - reclaimed_at >= _RECLAIM_EVERY_S:
                        reclaimed_at = time.monotonic()
                        left = await self.stream.reclaim(
                            self.instance, idle_ms=int(self.settings.claim_idle_s * 1000),
                            count=count,
                        )  # fmt: skip
                        if left:
                            log.info("history.reclaimed entries=%d", len(left))
                            await self._commit(left)
                    entries = await self.stream.read(self.instance, count=count, block_ms=_BLOCK_MS)
                    if entries:
                        await self._commit(entries)
                    if len(entries) < count:
                        await trio.sleep(self.settings.linger_s)
            except QueueError as exc:
                log.warning("history.read.failed error=%s", exc)
                await trio.sleep(1.0)

    async def _commit(self, entries: list[tuple[str, list[Event]]]) -> None:
        """Write one read's entries until PostgreSQL takes them, then acknowledge them."""
        p = plan(entries)
        ids, sent = p.record_ids(), p.provider_ids()
        stored = await self.stream.records(ids, sent)
        records: dict[str, StoredJob] = dict(zip([*ids, *sent], stored, strict=True))
        oldest = oldest_kept_day(self.now_ms(), self.settings.retention_days)
        batch = build(p, records, oldest_day=oldest, keep_bodies=self.settings.keep_bodies_days > 0)
        if batch.dropped or p.malformed:
            log.warning(
                "history.skipped events=%d (older than history.retention_days) malformed=%d",
                batch.dropped, p.malformed,
            )  # fmt: skip
        attempt = 0
        while True:
            new_days = [d for d in batch.days if d not in self._days]
            try:
                stored_events = await self.db.run(functools.partial(_write, batch, new_days))
                break
            except (HistoryUnavailable, HistoryError) as exc:
                self._failure(exc)
                await trio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1
        self._days.update(new_days)
        self._up = True
        self.metrics.reachable(True)
        if attempt:
            log.info("history.write.recovered after=%d failures", attempt)
        await self.stream.ack([entry_id for entry_id, _ in entries])
        now_s = self._clock()
        delays = [max(0.0, now_s - int(e.partition("-")[0]) / 1000) for e, _ in entries]
        self._events += stored_events
        self.metrics.written(stored_events, batch.counts[1], delays)

    def _failure(self, exc: Exception) -> None:
        self._failed += 1
        self._up = False
        self._last_error = str(exc)
        self.metrics.failed()
        self.metrics.reachable(False)
        if isinstance(exc, HistoryUnavailable):
            log.warning("history.write.failed error=%s (retrying; entries stay pending)", exc)
        else:
            log.error("history.write.failed error=%s (retrying; entries stay pending)", exc)

    # -- schema and partitions -----------------------------------------------------------

    async def _maintain(self) -> NoReturn:
        attempt = 0
        while not self._ready.is_set():
            try:
                if self.settings.migrate_on_start:
                    applied = await self.db.run(migrate, timeout_s=self.settings.connect_timeout_s)
                    for m in applied:
                        log.info("history.migrated version=%04d name=%s", m.version, m.name)
                self._ready.set()
            except (HistoryUnavailable, HistoryError) as exc:
                self._failure(exc)
                await trio.sleep(_BACKOFF_S[min(attempt, len(_BACKOFF_S) - 1)])
                attempt += 1
        while True:
            try:
                await self.maintain()
            except (HistoryUnavailable, HistoryError) as exc:
                log.warning("history.maintain.failed error=%s", exc)
                await trio.sleep(10.0)
                continue
            await trio.sleep(_MAINTAIN_EVERY_S)

    async def maintain(self) -> None:
        """Today's and the next days' partitions; drop the days past retention."""
        today = day_of(self.now_ms())
        ahead = [today + dt.timedelta(days=n) for n in range(_DAYS_AHEAD + 1)]
        await self.db.run(lambda conn: sql.ensure_days(conn, ahead))
        self._days.update(ahead)
        keep_from = oldest_kept_day(self.now_ms(), self.settings.retention_days)
        bodies_from = oldest_kept_day(self.now_ms(), max(1, self.settings.keep_bodies_days))
        have = await self.db.run(sql.partition_days)
        for table, days in have.items():
            cut = bodies_from if table == "history_bodies" else keep_from
            old = sorted(d for d in days if d < cut)
            if old:
                await self.db.run(functools.partial(_drop, table, old))
                log.info("history.retention.dropped table=%s days=%d", table, len(old))
        self._days.difference_update(d for d in list(self._days) if d < keep_from)

    # -- lag -----------------------------------------------------------------------------

    async def _watch(self) -> NoReturn:
        while True:
            try:
                if self._lag.unread is None and not self._lag.pending:
                    # The group from the start, PostgreSQL up or not: its lag counts
                    # what is unwritten even before the first write.
                    await self.stream.ensure_group()
                self._lag = await self.stream.lag()
                s = self.statistics()
                self.metrics.behind(s.lag_entries, s.lag_s)
                if self._missed_base is None:
                    self._missed_base = self._lag.missed
                elif self._lag.missed > self._missed_base:
                    lost = self._lag.missed - self._missed_base
                    self._missed_base = self._lag.missed
                    self._missed += lost
                    self.metrics.missed(lost)
                    log.error(
                        "history.gap entries=%d: trimmed from the stream (queue.events_maxlen "
                        "= %d) before they were written; that history is lost",
                        lost, self.events_maxlen,
                    )  # fmt: skip
                if s.refusing != self._was_refusing:  # logged when it turns, not each second
                    self._was_refusing = s.refusing
                    if not s.refusing:
                        log.info("history.caught_up: ingest takes messages again")
                if s.refusing and self._was_refusing and not self._refusal_logged:
                    self._refusal_logged = True
                    log.warning(
                        "history.behind unwritten=%d oldest=%.1fs: ingest answers 503 until "
                        "PostgreSQL catches up", s.lag_entries, s.lag_s,
                    )  # fmt: skip
                if not s.refusing:
                    self._refusal_logged = False
            except QueueError as exc:
                log.warning("history.watch.failed error=%s", exc)
            await trio.sleep(_WATCH_EVERY_S)


def _write(batch: Batch, new_days: list[dt.date], conn: Connection[Any]) -> int:
    return sql.write_batch(conn, batch, new_days)


def _drop(table: str, days: list[dt.date], conn: Connection[Any]) -> None:
    sql.drop_days(conn, table, days)
