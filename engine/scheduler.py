"""Fires the ticks of recurring schedules: every replica runs one, no lock needed.

Each tick's job id is derived from (schedule, version, tick), so replicas racing for a
tick enqueue the same id and the queue keeps the first; the due pointer then moves
by compare-and-set. Imports the queue and the leaves; never the API or senders.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

import msgspec
import trio

from engine.config import SchedulerSettings
from engine.cron import next_tick_ms
from engine.errors import QueueError, ValidationError
from engine.models import MessageIn
from engine.queue import NewJob, Queue, Schedule, ScheduleStore, new_job

log = logging.getLogger(__name__)

_decode_message = msgspec.json.Decoder(MessageIn).decode

# Ticks counted one by one per compare-and-set when skipping (~15 µs each: a week of
# minutely ticks blocks the loop ~0.15 s), and steps per schedule per pass.
_SKIP_RUN_MAX: Final = 10_000
_STEPS_PER_PASS: Final = 1_000
_BATCHES_PER_PASS: Final = 10


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    passes: int  # looks for due ticks
    fired: int  # ticks this replica enqueued and recorded
    skipped: int  # ticks this replica recorded as skipped (too late, or unsendable)
    raced: int  # ticks another replica (or a replace/delete) recorded first
    errors: int  # passes cut short by Redis or an unexpected error


def tick_job_id(name: str, version: int, tick_ms: int) -> str:
    """The job id of one tick: 12 hex of the tick's ms (ids stay time-ordered), then
    20 hex of a hash of (name, version, tick). Same tick, same id, on every replica."""
    digest = hashlib.blake2b(f"{name}|{version}|{tick_ms}".encode(), digest_size=10)
    return tick_ms.to_bytes(6, "big").hex() + digest.hexdigest()


def build_tick_job(schedule: Schedule, tick_ms: int, *, default_from: str) -> NewJob:
    """The job a tick enqueues; raises ValidationError / msgspec.ValidationError when
    the stored message cannot be sent (the API checked it when it was put)."""
    job_id = tick_job_id(schedule.name, schedule.version, tick_ms)
    incoming = _decode_message(schedule.message)
    # Due at once (the API refuses send_at / delay_s in a schedule's message).
    return new_job(incoming, job_id, default_from=default_from, now_ms=tick_ms)


def skip_run(cron: str, tz: str, tick_ms: int, stale_before_ms: int) -> tuple[int, int]:
    """(ticks from ``tick_ms`` on that are before ``stale_before_ms``, the tick after
    them), counting at most _SKIP_RUN_MAX: then the second is still stale."""
    count = 0
    while tick_ms < stale_before_ms and count < _SKIP_RUN_MAX:
        count += 1
        tick_ms = next_tick_ms(cron, tz, tick_ms)
    return count, tick_ms


class Scheduler:
    """One replica's scheduler. Run ``serve``; ``fire_due`` is one pass (for tests)."""

    def __init__(
        self,
        store: ScheduleStore,
        queue: Queue,
        settings: SchedulerSettings | None = None,
        *,
        default_from: str = "engine@localhost",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.queue = queue
        self.settings = settings or SchedulerSettings()
        self.default_from = default_from
        self._clock = clock
        self._grace_ms = int(self.settings.misfire_grace_s * 1000)
        self._passes = self._fired = self._skipped = self._raced = self._errors = 0
        # Troubles logged once until a clean pass; broken schedules once per version.
        self._troubles: set[str] = set()
        self._broken: set[tuple[str, int]] = set()

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            self._passes, self._fired, self._skipped, self._raced, self._errors
        )

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Fire due ticks every ``interval_s`` until cancelled. Needs ``queue.serve``."""
        task_status.started()
        while True:
            await self.fire_due()
            await trio.sleep(self.settings.interval_s)

    async def fire_due(self) -> int:
        """One pass over every due schedule; returns the ticks fired. Never raises
        (but Cancelled): failures are logged once and the next pass retries."""
        self._passes += 1
        fired_before = self._fired
        troubled = False
        try:
            now = self.now_ms()
            # More batches while batches come full; bounded, as a schedule left due
            # (broken, or raced mid catch-up) is read again.
            for _ in range(_BATCHES_PER_PASS):
                due = await self.store.due(now, self.settings.batch)
                for schedule in due:
                    if not await self._catch_up(schedule, now):
                        troubled = True
                if len(due) < self.settings.batch or troubled:
                    break
        except QueueError as exc:
            troubled = True
            self._errors += 1
            self._trouble("redis", "scheduler.pass.failed error=%s", exc)
        except Exception:
            troubled = True
            self._errors += 1
            if "bug" not in self._troubles:
                self._troubles.add("bug")
                log.exception("scheduler.pass.crashed")
        if not troubled and self._troubles:
            self._troubles.clear()
            log.info("scheduler.recovered")
        return self._fired - fired_before

    def _trouble(self, what: str, fmt: str, *args: object) -> None:
        if what not in self._troubles:
            self._troubles.add(what)
            log.warning(fmt, *args)

    async def _catch_up(self, s: Schedule, now: int) -> bool:
        """Fire (or skip) the due ticks of one schedule up to ``now``, each recorded
        by compare-and-set. False when the queue refused a job (retry next pass)."""
        tick = s.next_tick_ms
        for _ in range(_STEPS_PER_PASS):
            if tick is None or tick > now:
                return True
            try:
                if tick < now - self._grace_ms:
                    count, following = skip_run(s.cron, s.timezone, tick, now - self._grace_ms)
                    ok = await self.store.advance(
                        s.name, tick, following, version=s.version, skipped=count
                    )
                    if ok:
                        self._skipped += count
                        log.warning(
                            "scheduler.tick.skipped schedule=%s ticks=%d first=%d "
                            "reason=missed_grace",
                            s.name, count, tick,
                        )  # fmt: skip
                else:
                    following = next_tick_ms(s.cron, s.timezone, tick)
                    fired = await self._fire(s, tick, following)
                    if fired is None:
                        return False
                    ok = fired
            except ValidationError as exc:
                # The stored cron or zone no longer parses (e.g. a zone left tzdata):
                # nothing to compute the next tick from; leave it for an operator.
                if (s.name, s.version) not in self._broken:
                    self._broken.add((s.name, s.version))
                    log.error("scheduler.schedule.broken schedule=%s error=%s", s.name, exc)
                return True
            if not ok:
                self._raced += 1  # another replica, a replace or a delete was first
                return True
            tick = following
        return True

    async def _fire(self, s: Schedule, tick: int, following: int) -> bool | None:
        """Enqueue one tick's job and record it: True recorded, False another was
        first, None when the queue refused the job (backlog full)."""
        try:
            job = build_tick_job(s, tick, default_from=self.default_from)
        except (ValidationError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            ok = await self.store.advance(s.name, tick, following, version=s.version, skipped=1)
            if ok:
                self._skipped += 1
                log.error(
                    "scheduler.tick.skipped schedule=%s ticks=1 first=%d reason=invalid error=%s",
                    s.name, tick, exc,
                )  # fmt: skip
            return ok
        result = await self.queue.enqueue([job])
        if result.outcome != "stored":
            self._trouble(
                "refused", "scheduler.enqueue.refused schedule=%s outcome=%s value=%d",
                s.name, result.outcome, result.value,
            )  # fmt: skip
            return None
        ok = await self.store.advance(
            s.name, tick, following, version=s.version, fired_job_id=job.id
        )
        if ok:
            self._fired += 1
            log.info("scheduler.tick.fired schedule=%s tick=%d job=%s", s.name, tick, job.id)
        return ok
