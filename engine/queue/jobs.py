"""Queue operations on one shard for one instance: enqueue, claim, ack, fail, leases, reap.

Each multi-key transition is one Lua script; enqueue and ack are group-committed so
concurrent callers share a round-trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import trio
from coredis import PureToken

from engine.config import QueueSettings
from engine.keys import Keys
from engine.queue.commit import GroupCommitter
from engine.queue.redis import Redis, Scripts, translate_errors


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: str
    payload: bytes  # msgpack-encoded engine.models.Message
    attempt: int  # 1 for the first delivery attempt


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    state: str
    attempts: int
    created_at_ms: int
    updated_at_ms: int
    last_error: str | None
    next_attempt_at_ms: int | None


@dataclass(frozen=True, slots=True)
class ReapResult:
    promoted: int
    requeued: int
    instances_removed: int


@dataclass(frozen=True, slots=True)
class QueueCounts:
    ready: int
    processing: int  # jobs under a lease, all instances
    delayed: int
    dead: int
    instances: int
    enqueued_total: int
    sent_total: int
    failed_total: int


@dataclass(frozen=True, slots=True)
class Failure:
    job_id: str
    outcome: str  # "retry" | "dead"
    due_ms: int
    error: str


class Queue:
    """One queue shard as seen by one engine instance.

    ``serve`` must be running (it flushes the group commits) before ``enqueue``/``ack``.
    """

    def __init__(
        self,
        client: Redis,
        settings: QueueSettings,
        instance: str,
        *,
        keep_sent_s: int = 7 * 24 * 3600,
        keep_failed_s: int = 30 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.instance = instance
        self.keys = Keys(settings.name, settings.shard)
        self._scripts = Scripts(client)
        self._clock = clock
        self._keep_sent_s = keep_sent_s
        self._keep_failed_s = keep_failed_s
        self._processing = self.keys.processing(instance)
        self._enqueuer: GroupCommitter[tuple[str, bytes]] = GroupCommitter(
            self._flush_enqueue, max_items=settings.enqueue_batch_max
        )
        self._acker: GroupCommitter[str] = GroupCommitter(self._flush_ack, max_items=1000)

    async def load_scripts(self) -> None:
        await self._scripts.load(self.client)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._enqueuer.serve)
            await nursery.start(self._acker.serve)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    # -- ingest ------------------------------------------------------------------------

    async def enqueue(self, jobs: list[tuple[str, bytes]]) -> None:
        """Store ``(id, payload)`` jobs and queue them; returns once Redis has them."""
        await self._enqueuer.submit(jobs)

    async def _flush_enqueue(self, jobs: list[tuple[str, bytes]]) -> None:
        args: list[str | bytes | int] = [
            self.keys.job_prefix,
            self.now_ms(),
            self.settings.events_maxlen,
        ]
        for job_id, payload in jobs:
            args.append(job_id)
            args.append(payload)
        k = self.keys
        with translate_errors():
            await self._scripts["enqueue"](keys=[k.ready(), k.events, k.stats], args=args)

    async def get(self, job_id: str) -> JobRecord | None:
        with translate_errors():
            rec = await self.client.hmget(
                self.keys.job(job_id),
                ["state", "attempts", "created_at", "updated_at", "last_error", "next_attempt_at"],
            )
        state, attempts, created, updated, error, next_at = rec
        if state is None:
            return None
        return JobRecord(
            id=job_id,
            state=state.decode(),
            attempts=int(attempts or 0),
            created_at_ms=int(created or 0),
            updated_at_ms=int(updated or 0),
            last_error=error.decode() if error else None,
            next_attempt_at_ms=int(next_at) if next_at else None,
        )

    # -- senders -----------------------------------------------------------------------

    async def claim(self, n: int, *, block_s: float = 0.0) -> list[ClaimedJob]:
        """Claim up to ``n`` jobs. When none is ready and ``block_s`` > 0, wait up to
        ``block_s`` seconds in BLMOVE for one (then claim it plus up to n-1 more)."""
        jobs = await self._claim(n, [])
        if jobs or block_s <= 0:
            return jobs
        with translate_errors():
            moved = await self.client.blmove(
                self.keys.ready(), self._processing, PureToken.LEFT, PureToken.RIGHT, block_s
            )
        if moved is None:
            return []
        # If we are cancelled right here the id sits in processing without a lease;
        # renew gives it one that is never extended, and the reaper returns it.
        return await self._claim(n - 1, [moved.decode()])

    async def _claim(self, more: int, moved: list[str]) -> list[ClaimedJob]:
        now = self.now_ms()
        k = self.keys
        args: list[str | int] = [
            k.job_prefix,
            now,
            now + int(self.settings.lease_s * 1000),
            self.settings.events_maxlen,
            self.instance,
            more,
            *moved,
        ]
        with translate_errors():
            out: Any = await self._scripts["claim"](
                keys=[k.ready(), self._processing, k.leases, k.events], args=args
            )
        assert isinstance(out, list)
        return [
            ClaimedJob(out[i].decode(), out[i + 1], int(out[i + 2])) for i in range(0, len(out), 3)
        ]

    async def ack(self, job_id: str) -> None:
        """Record the job as sent (group-committed); returns once Redis has it."""
        await self._acker.submit([job_id])

    async def _flush_ack(self, ids: list[str]) -> None:
        k = self.keys
        args: list[str | int] = [
            k.job_prefix,
            self.now_ms(),
            self.settings.events_maxlen,
            self._keep_sent_s,
            *ids,
        ]
        with translate_errors():
            await self._scripts["ack"](
                keys=[self._processing, k.leases, k.events, k.stats], args=args
            )

    async def fail(self, failures: Sequence[Failure]) -> int:
        """Schedule retries or dead-letter jobs whose attempt failed."""
        k = self.keys
        args: list[str | int] = [
            k.job_prefix,
            self.now_ms(),
            self.settings.events_maxlen,
            self._keep_failed_s,
        ]
        for f in failures:
            args += [f.job_id, f.outcome, f.due_ms, f.error]
        with translate_errors():
            n: Any = await self._scripts["fail"](
                keys=[self._processing, k.leases, k.delayed, k.dead, k.events, k.stats],
                args=args,
            )
        return int(n)

    async def release(self, ids: Iterable[str]) -> int:
        """Hand claimed-but-unsent jobs back to the front of the ready lane."""
        ids = list(ids)
        if not ids:
            return 0
        k = self.keys
        args: list[str | int] = [k.job_prefix, self.now_ms(), self.settings.events_maxlen, *ids]
        with translate_errors():
            n: Any = await self._scripts["release"](
                keys=[k.ready(), self._processing, k.leases, k.events], args=args
            )
        return int(n)

    # -- leases and the reaper ---------------------------------------------------------

    async def renew(self, holding: Iterable[str]) -> int:
        """Heartbeat this instance and extend the leases of the jobs it holds."""
        now = self.now_ms()
        lease_ms = int(self.settings.lease_s * 1000)
        k = self.keys
        args: list[str | int] = [
            self.instance,
            now + lease_ms,
            now + lease_ms,
            k.job_prefix,
            *holding,
        ]
        with translate_errors():
            n: Any = await self._scripts["renew"](
                keys=[k.instances, k.leases, self._processing], args=args
            )
        return int(n)

    async def leave(self) -> None:
        """Forget this instance's heartbeat (after a clean shutdown released its jobs)."""
        with translate_errors():
            await self.client.zrem(self.keys.instances, [self.instance])

    async def reap(self, *, limit: int = 1000) -> ReapResult:
        """Promote due delayed jobs; requeue jobs of expired leases and dead instances."""
        k = self.keys
        args: list[str | int] = [
            k.prefix,
            k.job_prefix,
            self.now_ms(),
            self.settings.events_maxlen,
            limit,
        ]
        with translate_errors():
            out: Any = await self._scripts["reap"](
                keys=[k.ready(), k.delayed, k.leases, k.instances, k.events, k.stats], args=args
            )
        assert isinstance(out, list)
        return ReapResult(int(out[0]), int(out[1]), int(out[2]))

    # -- observation -------------------------------------------------------------------

    async def ping(self) -> bool:
        with translate_errors():
            return bool(await self.client.ping())

    async def counts(self) -> QueueCounts:
        k = self.keys
        with translate_errors():
            async with self.client.pipeline(transaction=False) as p:
                ready = p.llen(k.ready())
                leases = p.zcard(k.leases)
                delayed = p.zcard(k.delayed)
                dead = p.llen(k.dead)
                instances = p.zcard(k.instances)
                stats = p.hgetall(k.stats)
        s = {key.decode(): int(v) for key, v in (await stats).items()}
        return QueueCounts(
            ready=await ready,
            processing=await leases,
            delayed=await delayed,
            dead=await dead,
            instances=await instances,
            enqueued_total=s.get("enqueued", 0),
            sent_total=s.get("sent", 0),
            failed_total=s.get("failed", 0),
        )
