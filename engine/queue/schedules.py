"""Recurring schedules in Redis: definitions, the due index, and the per-tick
compare-and-set that lets every replica run the scheduler without a lock.

Keys: ``schedules`` (hash name -> msgpack record) and ``schedules:due`` (zset name ->
next tick ms). Multi-key changes are ``lua/schedule_*.lua``. Imports the leaves and
the queue's Redis adapter only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from coredis.tokens import PureToken

from engine.cron import check_cron, next_tick_ms
from engine.keys import Keys
from engine.queue.redis import Redis, Scripts, translate_errors

# The stored record is a msgpack array (see _Record); the scripts index it 1-based:
# 1 version  2 cron  3 timezone  4 message (JSON)  5 created_at  6 updated_at
# 7 last_tick (ms, 0 = none)  8 last_job ('' = none)  9 fired  10 skipped
# No nils: a hole would turn the Lua table into a msgpack map.


class _Record(msgspec.Struct, array_like=True, gc=False):
    """A schedule as stored (order = the Lua indices above)."""

    version: int
    cron: str
    timezone: str
    message: str  # JSON of the engine.models.MessageIn to send at each tick
    created_at: int
    updated_at: int
    last_tick: int
    last_job: str
    fired: int
    skipped: int


_decode_record = msgspec.msgpack.Decoder(_Record).decode


@dataclass(frozen=True, slots=True)
class Schedule:
    """A recurring schedule and what it has done so far."""

    name: str
    cron: str
    timezone: str
    message: str  # JSON of the engine.models.MessageIn sent at each tick
    version: int  # 1 when created, +1 at each replace (part of the tick job ids)
    created_at_ms: int
    updated_at_ms: int
    next_tick_ms: int | None  # the tick the scheduler fires next (None: being deleted)
    last_tick_ms: int | None  # the last tick fired
    last_job_id: str | None  # the job that tick enqueued
    fired: int  # ticks fired (each enqueued one job)
    skipped: int  # ticks skipped: missed by more than the misfire grace, or unsendable


def _scored(reply: Sequence[Any]) -> list[tuple[str, int]]:
    """(member, score) pairs of a WITHSCORES reply; scores here are whole ms."""
    return [(bytes(member).decode(), int(score)) for member, score in reply]


def _schedule(name: str, raw: bytes, due: int | None) -> Schedule:
    r = _decode_record(raw)
    return Schedule(
        name=name,
        cron=r.cron,
        timezone=r.timezone,
        message=r.message,
        version=r.version,
        created_at_ms=r.created_at,
        updated_at_ms=r.updated_at,
        next_tick_ms=due,
        last_tick_ms=r.last_tick or None,
        last_job_id=r.last_job or None,
        fired=r.fired,
        skipped=r.skipped,
    )


class ScheduleStore:
    """The recurring schedules of one queue shard.

    Validates nothing but the cron expression and zone (to compute the next tick);
    the API validates the message before ``put``.
    """

    def __init__(
        self, client: Redis, keys: Keys, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.client = client
        self.keys = keys
        self._clock = clock
        self._scripts = Scripts(client)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def put(self, name: str, cron: str, timezone: str, message: str) -> tuple[bool, Schedule]:
        """Create or replace ``name``; (created, the stored schedule).

        ``cron`` is stored normalized (``@daily`` -> ``0 0 * * *``). The next tick is the
        first after now: a replace never fires a tick already passed. Raises
        ValidationError for a bad cron expression or zone.
        """
        cron = check_cron(cron)
        now = self.now_ms()
        due = next_tick_ms(cron, timezone, now)
        k = self.keys
        with translate_errors():
            out: Any = await self._scripts["schedule_put"](
                keys=[k.schedules, k.schedules_due],
                args=[name, cron, timezone, message, now, due],
            )
        return bool(int(out[0])), _schedule(name, out[1], due)

    async def get(self, name: str) -> Schedule | None:
        k = self.keys
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                raw_reply = p.hget(k.schedules, name)
                due_reply = p.zscore(k.schedules_due, name)
            raw, due = await raw_reply, await due_reply
        return None if raw is None else _schedule(name, raw, None if due is None else int(due))

    async def list_all(self) -> list[Schedule]:
        """Every schedule, by name."""
        k = self.keys
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                all_reply = p.hgetall(k.schedules)
                due_reply = p.zrange(k.schedules_due, 0, -1, withscores=True)
            records, dues = await all_reply, await due_reply
        due_of = dict(_scored(dues))
        return [
            _schedule(name, records[raw_name], due_of.get(name))
            for raw_name, name in sorted((n, n.decode()) for n in records)
        ]

    async def delete(self, name: str) -> bool:
        """Forget ``name``; False when there was no such schedule."""
        k = self.keys
        with translate_errors():
            out: Any = await self._scripts["schedule_delete"](
                keys=[k.schedules, k.schedules_due], args=[name]
            )
        return bool(int(out))

    async def due(self, now_ms: int, limit: int = 100) -> list[Schedule]:
        """Up to ``limit`` schedules whose next tick is at or before ``now_ms``, most
        overdue first (``next_tick_ms`` is the tick due)."""
        k = self.keys
        with translate_errors():
            dues = await self.client.zrange(
                k.schedules_due, 0, now_ms, sortby=PureToken.BYSCORE, offset=0, count=limit,
                withscores=True,
            )  # fmt: skip
            ticks = _scored(dues)
            if not ticks:
                return []
            raws = await self.client.hmget(k.schedules, [name for name, _ in ticks])
        return [
            _schedule(name, raw, tick)
            for (name, tick), raw in zip(ticks, raws, strict=True)
            if raw is not None  # deleted between the two reads
        ]

    async def advance(
        self,
        name: str,
        expected_tick_ms: int,
        next_tick_ms: int,
        *,
        version: int,
        fired_job_id: str = "",
        skipped: int = 0,
    ) -> bool:
        """Move ``name``'s due tick from ``expected_tick_ms`` to ``next_tick_ms`` if it
        is still there and the schedule still at ``version`` (compare-and-set).

        With ``fired_job_id`` the expected tick counts as fired by that job; ``skipped``
        ticks count as skipped. False: another replica advanced it first, or the
        schedule was replaced or deleted (nothing is counted then).
        """
        k = self.keys
        args: Sequence[str | int] = [
            name, version, expected_tick_ms, next_tick_ms, 1 if fired_job_id else 0, skipped,
            expected_tick_ms, fired_job_id,
        ]  # fmt: skip
        with translate_errors():
            out: Any = await self._scripts["schedule_advance"](
                keys=[k.schedules, k.schedules_due], args=args
            )
        return bool(int(out))
