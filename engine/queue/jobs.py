"""Queue operations on one shard for one instance: enqueue, claim, ack, fail, leases, reap.

Each multi-key transition is one Lua script; enqueue and ack are group-committed so
concurrent callers share a round-trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn

import msgspec
import trio

from engine.config import IngestSettings, QueueSettings, RateLimitSettings
from engine.errors import QueueUnavailable
from engine.keys import Keys
from engine.models import DEFAULT_TENANT, LANES, Message
from engine.policy import lane_pattern
from engine.queue.commit import GroupCommitter
from engine.queue.memory import MemoryGauge
from engine.queue.redis import Redis, Scripts, is_out_of_memory, translate_errors


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    id: str
    payload: bytes  # engine.queue.wire.encode_message(message)
    attempt: int  # 1 for the first delivery attempt
    # Recipients still to try after a partial delivery; None means all of the message's.
    recipients: list[str] | None = None
    # Seconds to wait before sending: the slot its rate-limit buckets reserved for it.
    wait_s: float = 0.0
    # When its first delivery attempt was claimed (ms): the retry budget counts from it.
    first_try_ms: int = 0
    # Its deliver-by deadline (ms; 0 = none): the claim checked it, wait included.
    expires_ms: int = 0
    tenant: str = DEFAULT_TENANT  # whose message (routing rules may name tenants)


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job to store: its id, message and where it waits."""

    id: str
    payload: bytes  # engine.queue.wire.encode_message(message)
    lane: str = "normal"
    tenant: str = DEFAULT_TENANT
    domains: str = ""  # distinct recipient domains, comma-separated (rate limits)
    due_ms: int = 0  # later than now: scheduled until then
    # The message's tags joined by wire.TAG_SEPARATOR ('' = none); kept in the job record so
    # every lifecycle event can carry them (see engine.queue.events).
    tags: str = ""
    # Its envelope recipients, comma-separated (bare addresses hold no comma): enqueue
    # drops those on the tenant's suppression list ('' = not checked).
    recipients: str = ""
    # Its own deliver-by deadline (ms; 0 = its lane's queue.lane_ttl_s, if any).
    expires_ms: int = 0


@dataclass(frozen=True, slots=True)
class EnqueueRequest:
    """One API request's jobs; with an idempotency key, a repeat returns the first ids."""

    jobs: list[NewJob]
    idempotency_key: str = ""
    fingerprint: str = ""  # of the request body: same key + other body is a conflict
    client: str = ""  # who sent it, for per-client ingest limits ('' = not limited)
    # What it takes from the client's bucket (0: one per job): its messages' recipients.
    cost: int = 0


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    outcome: Literal["stored", "replayed", "conflict", "limited", "backlog"]
    ids: list[str]  # stored: the request's ids; replayed: the first request's ids
    # stored: the client's tokens left (-1: no client limit); limited: ms until the
    # request would pass (-1: never, it is larger than the burst); backlog: jobs waiting
    # (-1: unknown).
    value: int = -1
    # backlog because Redis's memory is over its budget (ingest.max_memory_ratio): its
    # used_memory and the budget, in bytes; 0 when the job count was the reason.
    used_bytes: int = 0
    limit_bytes: int = 0


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    state: str
    attempts: int
    created_at_ms: int
    updated_at_ms: int
    last_error: str | None
    next_attempt_at_ms: int | None
    lane: str = "normal"
    tenant: str = DEFAULT_TENANT
    bounce: str | None = None  # the class of the last failure (engine.bounce)
    expires_at_ms: int | None = None  # its deliver-by deadline, when it has one
    transport: str | None = None  # the routing name that took it
    provider_id: str | None = None  # the message id a provider's API gave it
    provider_state: str | None = None  # what the provider last reported (delivered, ...)


@dataclass(frozen=True, slots=True)
class DeadRetry:
    retried: list[str]  # re-queued with fresh attempts
    expired: dict[str, int]  # refused: past their deliver-by deadline (ms)
    # Not queued: every recipient it still owed is suppressed now (state 'suppressed').
    suppressed: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ReapResult:
    promoted: int
    requeued: int
    instances_removed: int
    dead_lettered: int = 0


@dataclass(frozen=True, slots=True)
class QueueCounts:
    ready: int  # entries of all ready lists (cancelled ones included until claimed)
    ready_by_lane: dict[str, int]  # the same per priority lane
    processing: int  # jobs under a lease, all instances
    delayed: int
    dead: int
    instances: int
    enqueued_total: int
    sent_total: int
    failed_total: int
    cancelled_total: int = 0
    throttled_total: int = 0  # claims deferred by a rate limit
    reaped_total: int = 0  # jobs requeued after their lease expired
    expired_total: int = 0  # jobs that reached their deadline unsent (deliver-by)


@dataclass(frozen=True, slots=True)
class Failure:
    job_id: str
    outcome: str  # "retry" | "dead"
    due_ms: int
    error: str
    # On retry, only these recipients are tried again (the others got the message).
    recipients: list[str] | None = None
    bounce: str = ""  # the failure's class (engine.bounce), kept next to the error
    # Its class says the address is dead (a 5xx invalid-recipient): fail.lua puts the
    # recipient on the tenant's suppression list (when the attempt had only that one).
    suppress: bool = False
    # Recipients the server refused one by one as unknown (all of them refused): these
    # go on the suppression list, whatever the attempt's number of recipients.
    dead_addresses: tuple[str, ...] = ()


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
        rate_limits: RateLimitSettings | None = None,
        ingest: IngestSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.settings = settings
        self.rate_limits = rate_limits or RateLimitSettings()
        self.ingest = ingest or IngestSettings()
        self.instance = instance
        self._lanes = lane_pattern(settings.lane_weights)
        self._limits_on = "1" if self.rate_limits.configured() else "0"
        self.keys = Keys(settings.name, settings.shard)
        self._scripts = Scripts(client)
        # Ingest's byte budget; sampled while ``serve`` runs.
        self.memory = MemoryGauge(client, ratio=self.ingest.max_memory_ratio)
        self._clock = clock
        self._keep_sent_s = settings.keep_sent_s
        self._keep_failed_s = settings.keep_failed_s
        self._lane_ttl_ms = {lane: int(ttl * 1000) for lane, ttl in settings.lane_ttl_s.items()}
        self._processing = self.keys.processing(instance)
        self._enqueuer: GroupCommitter[EnqueueRequest, EnqueueResult] = GroupCommitter(
            self._flush_enqueue, max_weight=settings.enqueue_batch_max
        )
        self._acker: GroupCommitter[tuple[str, str, str, str], None] = GroupCommitter(
            self._flush_ack, max_weight=1000
        )

    async def load_scripts(self) -> None:
        await self._scripts.load(self.client)

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _stored(self, job: NewJob) -> bytes:
        """The payload enqueue stores: the message, behind its deadline when it has one
        (its own, else its lane's default counted from its send time)."""
        expires_ms = job.expires_ms
        if not expires_ms and self._lane_ttl_ms.get(job.lane):
            expires_ms = max(self.now_ms(), job.due_ms) + self._lane_ttl_ms[job.lane]
        return with_deadline(job.payload, expires_ms)

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._enqueuer.serve)
            await nursery.start(self._acker.serve)
            await nursery.start(self.memory.serve)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    # -- ingest ------------------------------------------------------------------------

    async def enqueue(
        self,
        jobs: list[NewJob],
        *,
        idempotency_key: str = "",
        fingerprint: str = "",
        client: str = "",
        cost: int = 0,
    ) -> EnqueueResult:
        """Store jobs and queue (or schedule) them; returns once Redis has them.

        With an ``idempotency_key`` already used (within idempotency_ttl_s) nothing is
        stored: the result is the first request's ids, or a conflict when ``fingerprint``
        differs from the first request's. Nothing is stored either when ``client`` is
        over ingest.client_rate_per_s ("limited") or the backlog is over
        ingest.max_backlog or Redis's memory over its budget, ingest.max_memory_ratio
        ("backlog"); a request takes ``cost`` from the client's bucket (its messages'
        recipients; 0: one per message).
        """
        request = EnqueueRequest(jobs, idempotency_key, fingerprint, client, cost)
        return await self._enqueuer.submit(request, len(jobs))

    async def _flush_enqueue(self, requests: list[EnqueueRequest]) -> list[EnqueueResult]:
        k = self.keys
        ingest = self.ingest
        memory = self.memory.statistics()
        args: list[str | bytes | int | float] = [
            k.prefix, self.now_ms(), self.settings.events_maxlen,
            self.settings.idempotency_ttl_s, ingest.max_backlog,
            ingest.client_rate_per_s, ingest.client_burst_or_default(), int(memory.full),
            self._keep_failed_s,
        ]  # fmt: skip
        for request in requests:
            args += [request.idempotency_key, request.fingerprint, request.client]
            args += [len(request.jobs), request.cost or len(request.jobs)]
            for job in request.jobs:
                args += [
                    job.id, self._stored(job), job.lane, job.tenant, job.domains, job.due_ms,
                    job.tags,
                    job.recipients,
                ]  # fmt: skip
        with translate_errors():
            try:
                out: Any = await self._scripts["enqueue"](
                    keys=[k.events, k.stats, k.delayed], args=args
                )
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                # Over maxmemory before the last sample said so: refused at the script's
                # first write, so nothing was stored; the same answer as a full budget.
                over = max(memory.used_bytes, memory.limit_bytes, 1)
                return [
                    EnqueueResult("backlog", [], -1, over, memory.limit_bytes) for _ in requests
                ]
        results: list[EnqueueResult] = []
        for request, entry in zip(requests, out, strict=True):
            code = int(entry[0])
            if code == 0:
                ids = [job.id for job in request.jobs]
                results.append(EnqueueResult("stored", ids, int(entry[1])))
            elif code == 1:
                results.append(EnqueueResult("replayed", entry[1].decode().split(",")))
            elif code == 2:
                results.append(EnqueueResult("conflict", []))
            elif code == 3:
                results.append(EnqueueResult("limited", [], int(entry[1])))
            elif code == 4:
                results.append(EnqueueResult("backlog", [], int(entry[1])))
            else:  # 5: memory over its budget
                results.append(
                    EnqueueResult(
                        "backlog", [], int(entry[1]), memory.used_bytes, memory.limit_bytes
                    )
                )
        return results

    async def get(self, job_id: str) -> JobRecord | None:
        """The job's record. A job never claimed has no ``expires_at`` copy yet (the
        claim writes it): while it waits, its deadline is read from its stored message."""
        with translate_errors():
            row = await self.client.hmget(self.keys.job(job_id), _RECORD_FIELDS)
        rec = _record(job_id, row)
        if rec is not None and rec.expires_at_ms is None and rec.state in _UNCLAIMED:
            with translate_errors():
                stored = await self.client.hget(self.keys.job(job_id), "msg")
            expires_ms = split_deadline(stored)[1] if stored else 0
            if expires_ms:
                rec = replace(rec, expires_at_ms=expires_ms)
        return rec

    async def message(self, job_id: str) -> Message | None:
        """The job's stored message (None when the job or its message is gone)."""
        with translate_errors():
            stored = await self.client.hget(self.keys.job(job_id), "msg")
        return decode_message(split_deadline(stored)[0]) if stored else None

    async def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Records of ``job_ids`` in one pipelined round trip (None where there is none)."""
        with translate_errors():
            async with self.client.pipeline(transaction=False) as p:
                replies = [p.hmget(self.keys.job(job_id), _RECORD_FIELDS) for job_id in job_ids]
            rows = [await reply for reply in replies]
        return [_record(job_id, row) for job_id, row in zip(job_ids, rows, strict=True)]

    # -- senders -----------------------------------------------------------------------

    async def claim(self, n: int, *, block_s: float = 0.0) -> list[ClaimedJob]:
        """Claim up to ``n`` jobs. When none is ready and ``block_s`` > 0, wait up to
        ``block_s`` seconds on the doorbell (BLPOP) for work, then claim again.

        Only the wait is cancellable. The claim script runs shielded: cancelled after
        Redis ran it, its jobs would be claimed in Redis but unknown to the caller.
        (Not BLMOVE from the ready list: there is one list per lane and tenant, and
        BLMOVE waits on one list. The doorbell holds no jobs, so a wait cut short
        loses nothing.)
        """
        jobs = await self._claim_shielded(n)
        if jobs or block_s <= 0:
            return jobs
        with translate_errors():
            rung = await self.client.blpop([self.keys.wake], block_s)
        if rung is None:
            return []
        return await self._claim_shielded(n)

    async def _claim_shielded(self, n: int) -> list[ClaimedJob]:
        jobs: list[ClaimedJob] = []
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.settings.lease_s
            jobs = await self._claim(n)
        if scope.cancelled_caught:
            raise QueueUnavailable(f"claim got no answer within {self.settings.lease_s}s")
        return jobs

    async def _claim(self, n: int) -> list[ClaimedJob]:
        now = self.now_ms()
        k = self.keys
        limits = self.rate_limits
        args: list[str | int | float] = [
            k.prefix, now, now + int(self.settings.lease_s * 1000), self.settings.events_maxlen,
            self.instance, n, self._lanes, self._limits_on, int(limits.max_wait_s * 1000),
            limits.recovery_per_s, self._keep_failed_s,
        ]  # fmt: skip
        with translate_errors():
            out: Any = await self._scripts["claim"](
                keys=[
                    self._processing,
                    k.leases,
                    k.events,
                    k.instances,
                    k.stats,
                    k.delayed,
                    k.cursor,
                    k.limits,
                ],
                args=args,
            )
        assert isinstance(out, list)
        jobs: list[ClaimedJob] = []
        for i in range(0, len(out), 7):
            payload, expires_ms = split_deadline(out[i + 1])
            jobs.append(
                ClaimedJob(
                    out[i].decode(), payload, int(out[i + 2]),
                    out[i + 3].decode().split(",") if out[i + 3] else None,
                    int(out[i + 4]) / 1000, int(out[i + 5]), expires_ms, out[i + 6].decode(),
                )
            )  # fmt: skip
        return jobs

    async def keep_raw(self, job_id: str, data: bytes) -> None:
        """Keep a sandboxed message's wire form as long as its sent record is kept."""
        with translate_errors():
            await self.client.set(self.keys.raw(job_id), data, ex=self._keep_sent_s or None)

    async def raw(self, job_id: str) -> bytes | None:
        with translate_errors():
            return await self.client.get(self.keys.raw(job_id))

    async def ack(
        self, job_id: str, note: str = "", *, transport: str = "", provider_id: str = ""
    ) -> None:
        """Record the job as sent (group-committed); returns once Redis has it.

        ``note`` is kept as the job's last_error (e.g. recipients refused for good);
        ``transport`` (the routing name that took it) and ``provider_id`` (the message id
        a provider's API gave it) are kept in its record when given.
        """
        await self._acker.submit((job_id, note, transport, provider_id))

    async def _flush_ack(self, acks: list[tuple[str, str, str, str]]) -> list[None]:
        k = self.keys
        args: list[str | int] = [
            k.job_prefix, self.now_ms(), self.settings.events_maxlen, self._keep_sent_s,
        ]  # fmt: skip
        for job_id, note, transport, provider_id in acks:
            args += [job_id, note, transport, provider_id]
        with translate_errors():
            await self._scripts["ack"](
                keys=[self._processing, k.leases, k.events, k.stats], args=args
            )
        return [None] * len(acks)

    async def suppress_refused(self, job_id: str, refused: Sequence[tuple[str, str, str]]) -> int:
        """Put recipients of a delivered job that the server refused as unknown, each
        ``(address, reason, bounce class)``, on its tenant's suppression list; how many
        were new."""
        args: list[str | int] = [self.keys.prefix, self.now_ms(), job_id]
        for address, reason, bounce in refused:
            args += [address, reason, bounce]
        with translate_errors():
            added: Any = await self._scripts["suppress_refused"](
                keys=[self.keys.job(job_id)], args=args
            )
        return int(added)

    async def fail(self, failures: Sequence[Failure]) -> int:
        """Schedule retries or dead-letter jobs whose attempt failed."""
        k = self.keys
        args: list[str | int] = [
            k.job_prefix,
            self.now_ms(),
            self.settings.events_maxlen,
            self._keep_failed_s,
            k.prefix,
        ]
        for f in failures:
            rcpts = ",".join(f.recipients) if f.recipients else ""
            dead = ",".join(f.dead_addresses) if f.dead_addresses else str(int(f.suppress))
            args += [f.job_id, f.outcome, f.due_ms, f.error, rcpts, f.bounce, dead]
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
        args: list[str | int] = [k.prefix, self.now_ms(), self.settings.events_maxlen, *ids]
        with translate_errors():
            n: Any = await self._scripts["release"](
                keys=[self._processing, k.leases, k.events], args=args
            )
        return int(n)

    # -- leases and the reaper ---------------------------------------------------------

    async def renew(self, holding: Iterable[str]) -> int:
        """Heartbeat this instance and extend the leases of the jobs it holds."""
        deadline = self.now_ms() + int(self.settings.lease_s * 1000)
        args: list[str | int] = [self.instance, deadline, deadline, *holding]
        with translate_errors():
            n: Any = await self._scripts["renew"](
                keys=[self.keys.instances, self.keys.leases], args=args
            )
        return int(n)

    async def release_unheld(self, holding: Iterable[str]) -> int:
        """Clean shutdown: hand back every job in this instance's processing list that is
        not in ``holding`` (claims whose result never reached us)."""
        with translate_errors():
            listed = await self.client.lrange(self._processing, 0, -1)
        held = set(holding)
        return await self.release(i for i in (x.decode() for x in listed) if i not in held)

    async def leave(self) -> None:
        """Mark this instance's heartbeat as expired (after a clean shutdown).

        Not a ZREM: a claim whose reply was lost during shutdown may still have put jobs
        in our processing list; as a dead instance, any replica's reaper returns them.
        """
        with translate_errors():
            await self.client.zadd(self.keys.instances, {self.instance: self.now_ms() - 1})

    async def reap(self, *, limit: int = 1000) -> ReapResult:
        """Promote due delayed jobs; requeue jobs of expired leases and dead instances
        (dead-lettering a job that stalled more than max_stalls times)."""
        k = self.keys
        args: list[str | int] = [
            k.prefix, k.job_prefix, self.now_ms(), self.settings.events_maxlen, limit,
            self.settings.max_stalls, self._keep_failed_s,
        ]  # fmt: skip
        with translate_errors():
            out: Any = await self._scripts["reap"](
                keys=[k.delayed, k.leases, k.instances, k.events, k.stats, k.dead],
                args=args,
            )
        return ReapResult(int(out[0]), int(out[1]), int(out[2]), int(out[3]))

    # -- dead-letter queue -------------------------------------------------------------

    async def dead_page(self, offset: int, limit: int) -> tuple[int, list[JobRecord]]:
        """(total, records) of the dead-letter list from ``offset``, oldest first.

        Ids whose record has expired (keep_failed_s) are dropped from the list as met.
        """
        k = self.keys
        with translate_errors():
            total = await self.client.llen(k.dead)
            raw = await self.client.lrange(k.dead, offset, offset + limit - 1)
        found = await self.get_many([item.decode() for item in raw])
        records: list[JobRecord] = []
        for item, rec in zip(raw, found, strict=True):
            if rec is None:
                with translate_errors():
                    await self.client.lrem(k.dead, 1, item)
                total -= 1
                continue
            records.append(rec)
        return total, records

    async def dead_ids(self) -> list[str]:
        with translate_errors():
            return [x.decode() for x in await self.client.lrange(self.keys.dead, 0, -1)]

    async def dead_retry(self, ids: Sequence[str]) -> list[str]:
        """Re-queue dead-lettered jobs with fresh attempts; returns the ids re-queued."""
        return (await self.dead_requeue(ids)).retried

    async def dead_requeue(self, ids: Sequence[str]) -> DeadRetry:
        """Re-queue dead-lettered jobs with fresh attempts, except those past their
        deliver-by deadline (they stay dead letters: sent now, they would be late)."""
        k = self.keys
        result = DeadRetry([], {})
        for start in range(0, len(ids), 500):
            args: list[str | int] = [
                k.prefix, self.now_ms(), self.settings.events_maxlen, *ids[start : start + 500],
            ]  # fmt: skip
            with translate_errors():
                out: Any = await self._scripts["dead_retry"](keys=[k.dead, k.events], args=args)
            retried, late, suppressed = out
            result.retried.extend(x.decode() for x in retried)
            result.suppressed.extend(x.decode() for x in suppressed)
            for i in range(0, len(late), 2):
                result.expired[late[i].decode()] = int(late[i + 1])
        return result

    async def dead_delete(self, ids: Sequence[str]) -> list[str]:
        """Delete dead-lettered jobs and their records; returns the ids deleted."""
        return await self._dead_op("dead_delete", [self.keys.dead, self.keys.events], ids)

    # -- cancelling ----------------------------------------------------------------------

    async def cancel(self, job_id: str) -> tuple[Literal["cancelled", "unknown", "too_late"], str]:
        """Cancel a queued, scheduled or retrying job: (outcome, the job's state)."""
        k = self.keys
        args: list[str | int] = [
            k.job_prefix, self.now_ms(), self.settings.events_maxlen, self._keep_failed_s, job_id,
        ]  # fmt: skip
        with translate_errors():
            out: Any = await self._scripts["cancel"](keys=[k.delayed, k.events, k.stats], args=args)
        code, state = int(out[0]), out[1].decode()
        if code == 0:
            return "cancelled", state
        return ("unknown", "") if code == 1 else ("too_late", state)

    async def _dead_op(self, script: str, keys: list[str], ids: Sequence[str]) -> list[str]:
        done: list[str] = []
        for start in range(0, len(ids), 500):
            args: list[str | int] = [
                self.keys.prefix, self.now_ms(), self.settings.events_maxlen,
                *ids[start : start + 500],
            ]  # fmt: skip
            with translate_errors():
                out: Any = await self._scripts[script](keys=keys, args=args)
            done += [x.decode() for x in out]
        return done

    # -- observation -------------------------------------------------------------------

    async def ping(self) -> bool:
        with translate_errors():
            return bool(await self.client.ping())

    async def counts(self) -> QueueCounts:
        k = self.keys
        with translate_errors():
            async with self.client.pipeline(transaction=False) as p:
                ready = p.hget(k.stats, "backlog")
                leases = p.zcard(k.leases)
                delayed = p.zcard(k.delayed)
                dead = p.llen(k.dead)
                instances = p.zcard(k.instances)
                stats = p.hgetall(k.stats)
        s = {key.decode(): int(v) for key, v in (await stats).items()}
        return QueueCounts(
            ready=int(await ready or 0),
            ready_by_lane={lane: s.get(f"ready:{lane}", 0) for lane in LANES},
            processing=await leases,
            delayed=await delayed,
            dead=await dead,
            instances=await instances,
            enqueued_total=s.get("enqueued", 0),
            sent_total=s.get("sent", 0),
            failed_total=s.get("failed", 0),
            cancelled_total=s.get("cancelled", 0),
            throttled_total=s.get("throttled", 0),
            reaped_total=s.get("reaped", 0),
            expired_total=s.get("expired", 0),
        )


# The stored message's codec (msgpack of engine.models.Message).
decode_message = msgspec.msgpack.Decoder(Message).decode
_RECORD_FIELDS = [
    "state", "attempts", "created_at", "updated_at", "last_error", "next_attempt_at", "lane",
    "tenant", "bounce", "expires_at", "transport", "provider_id", "provider_state",
]  # fmt: skip
# States of a job that has not been claimed yet (its record has no expires_at copy).
_UNCLAIMED = frozenset({"queued", "scheduled"})
# A deadline travels in front of the stored message as a msgpack uint64 (claim.lua and
# dead_retry.lua read it with _lib.lua's lib_deadline, without decoding the message).
_DEADLINE_MARK = 0xCF
_DEADLINE_BYTES = 9


def with_deadline(payload: bytes, expires_ms: int) -> bytes:
    """``payload`` as stored: behind its deadline (ms) when it has one (> 0)."""
    if expires_ms <= 0:
        return payload
    return bytes((_DEADLINE_MARK,)) + expires_ms.to_bytes(8, "big") + payload


def split_deadline(stored: bytes) -> tuple[bytes, int]:
    """A stored payload -> (the message, its deadline in ms or 0)."""
    if len(stored) < _DEADLINE_BYTES or stored[0] != _DEADLINE_MARK:
        return stored, 0
    return stored[_DEADLINE_BYTES:], int.from_bytes(stored[1:_DEADLINE_BYTES], "big")


def _record(job_id: str, row: Sequence[bytes | None]) -> JobRecord | None:
    state, attempts, created, updated, error, next_at, lane, tenant, bounce, expires = row[:10]
    transport, provider_id, provider_state = row[10:13]
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
        lane=lane.decode() if lane else "normal",
        tenant=tenant.decode() if tenant else DEFAULT_TENANT,
        bounce=bounce.decode() if bounce else None,
        expires_at_ms=int(expires) if expires else None,
        transport=transport.decode() if transport else None,
        provider_id=provider_id.decode() if provider_id else None,
        provider_state=provider_state.decode() if provider_state else None,
    )
