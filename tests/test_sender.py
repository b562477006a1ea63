"""Sender pool logic against a real Redis with the in-memory transport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
import trio

from engine.config import QueueSettings, SenderSettings
from engine.errors import PermanentFailure, TemporaryFailure, TransportUnavailable
from engine.ids import new_ids
from engine.models import Message
from engine.queue import NewJob, Queue, Redis
from engine.sender import SenderPool
from engine.transport.base import OutgoingMail
from engine.transport.memory import MemoryTransport


def _payload(to: str = "ann@example.com") -> bytes:
    msg = Message("e@localhost", [to], [], [], "Subject", "body", None, [], [], [])
    return msgspec.msgpack.encode(msg)


@pytest.fixture
async def q(redis: Redis) -> AsyncIterator[Queue]:
    queue = Queue(redis, QueueSettings(lease_s=5, heartbeat_s=1, max_attempts=3,
                                       backoff_base_s=0.01, backoff_max_s=0.02), "s1")  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.serve)
        yield queue
        nursery.cancel_scope.cancel()


async def _enqueue(q: Queue, n: int, to: str = "ann@example.com") -> list[str]:
    ids = new_ids(n)
    await q.enqueue([NewJob(i, _payload(to)) for i in ids])
    return ids


async def _state(q: Queue, job_id: str) -> str:
    rec = await q.get(job_id)
    assert rec is not None
    return rec.state


async def _run_until(pool: SenderPool, condition: object, timeout: float = 10) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        with trio.fail_after(timeout):
            while not await condition():  # type: ignore[operator]
                await trio.sleep(0.01)
        pool.stop_claiming()


async def test_every_job_is_sent_once_and_acked(q: Queue) -> None:
    ids = await _enqueue(q, 200)
    transport = MemoryTransport()
    pool = SenderPool(q, transport, SenderSettings(senders=4, claim_batch=8), q.settings)

    async def done() -> bool:
        return (await q.counts()).sent_total == 200

    await _run_until(pool, done)
    assert sorted(m.job_id for m in transport.sent) == sorted(ids)
    assert pool.statistics().sent == 200 and pool.holding() == []
    assert (await q.counts()).processing == 0


async def test_temporary_failure_is_retried_then_sent(q: Queue) -> None:
    (job_id,) = await _enqueue(q, 1)
    transport = MemoryTransport()
    transport.script(TemporaryFailure("421 busy", code=421))
    pool = SenderPool(q, transport, SenderSettings(senders=1), q.settings)
    reaped = 0

    async def done() -> bool:
        nonlocal reaped
        reaped += (await q.reap()).promoted  # the reaper's job, done by hand here
        return await _state(q, job_id) == "sent"

    await _run_until(pool, done)
    rec = await q.get(job_id)
    assert rec is not None and rec.attempts == 2 and reaped == 1
    assert pool.statistics().retried == 1


async def test_permanent_failure_is_dead_lettered(q: Queue, redis: Redis) -> None:
    (job_id,) = await _enqueue(q, 1)
    transport = MemoryTransport()
    transport.script(PermanentFailure("550 no such user", code=550))
    pool = SenderPool(q, transport, SenderSettings(senders=1), q.settings)

    async def done() -> bool:
        return await _state(q, job_id) == "failed"

    await _run_until(pool, done)
    rec = await q.get(job_id)
    assert rec is not None and rec.last_error is not None and "550" in rec.last_error
    assert await redis.lrange(q.keys.dead, 0, -1) == [job_id.encode()]


async def test_attempts_are_capped(q: Queue) -> None:
    (job_id,) = await _enqueue(q, 1)

    def always_busy(mail: OutgoingMail) -> TemporaryFailure:
        return TemporaryFailure("451 later", code=451)

    pool = SenderPool(q, MemoryTransport(fail=always_busy), SenderSettings(senders=1), q.settings)

    async def done() -> bool:
        await q.reap()
        return await _state(q, job_id) == "failed"

    await _run_until(pool, done)
    rec = await q.get(job_id)
    assert rec is not None and rec.attempts == 3  # max_attempts


async def test_rate_limit_paces_sends(q: Queue) -> None:
    await _enqueue(q, 30)
    transport = MemoryTransport()
    pool = SenderPool(q, transport, SenderSettings(senders=8, rate_per_s=100, burst=10), q.settings)
    start = trio.current_time()

    async def done() -> bool:
        return len(transport.sent) == 30

    await _run_until(pool, done)
    # 10 at once, then 20 more at 100/s: at least 0.2 s.
    assert trio.current_time() - start >= 0.19


async def test_stop_hands_claimed_unsent_jobs_back(q: Queue, redis: Redis) -> None:
    await _enqueue(q, 20)
    transport = MemoryTransport(delay_s=0.2)
    pool = SenderPool(q, transport, SenderSettings(senders=1, claim_batch=10), q.settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        with trio.fail_after(5):
            while len(pool.holding()) < 10:
                await trio.sleep(0.01)
        pool.stop_claiming()
    # The message in hand was finished; the other 9 claimed ones went back to ready.
    assert len(transport.sent) == 1
    assert pool.statistics().released == 9
    counts = await q.counts()
    assert counts.ready == 19 and counts.processing == 0
    assert await redis.llen(q.keys.processing("s1")) == 0


async def test_cancel_mid_send_leaves_job_leased_for_the_reaper(q: Queue, redis: Redis) -> None:
    (job_id,) = await _enqueue(q, 1)
    pool = SenderPool(q, MemoryTransport(delay_s=10), SenderSettings(senders=1), q.settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        with trio.fail_after(5):
            while not pool.holding():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # Unknown whether the server got it: never acked, never lost -- still leased.
    assert await _state(q, job_id) == "processing"
    assert await redis.zscore(q.keys.leases, job_id) is not None


async def test_partial_delivery_retries_only_refused_recipients(q: Queue) -> None:
    from engine.transport.base import RecipientRejected, SendResult

    (job_id,) = await _enqueue(q, 1)
    transport = MemoryTransport()
    transport.script(SendResult(250, "ok", [RecipientRejected("ann@example.com", 451, "later")]))
    pool = SenderPool(q, transport, SenderSettings(senders=1), q.settings)

    async def done() -> bool:
        await q.reap()
        return await _state(q, job_id) == "sent"

    await _run_until(pool, done)
    # The retry went to the refused recipient only.
    assert [m.recipients for m in transport.attempts] == [["ann@example.com"], ["ann@example.com"]]


async def test_permanent_refusal_of_some_recipients_still_counts_as_sent(q: Queue) -> None:
    from engine.transport.base import RecipientRejected, SendResult

    (job_id,) = await _enqueue(q, 1)
    transport = MemoryTransport()
    transport.script(SendResult(250, "ok", [RecipientRejected("x@example.com", 550, "unknown")]))
    pool = SenderPool(q, transport, SenderSettings(senders=1), q.settings)

    async def done() -> bool:
        return await _state(q, job_id) == "sent"

    await _run_until(pool, done)
    rec = await q.get(job_id)
    assert rec is not None and rec.last_error is not None and "x@example.com: 550" in rec.last_error


async def test_per_message_max_attempts(q: Queue) -> None:
    msg = Message("e@localhost", ["a@example.com"], [], [], "S", "b", None, [], [], [], 1)
    (job_id,) = new_ids(1)
    await q.enqueue([NewJob(job_id, msgspec.msgpack.encode(msg))])

    def busy(mail: OutgoingMail) -> TemporaryFailure:
        return TemporaryFailure("451 later", code=451)

    pool = SenderPool(q, MemoryTransport(fail=busy), SenderSettings(senders=1), q.settings)

    async def done() -> bool:
        return await _state(q, job_id) == "failed"

    await _run_until(pool, done)
    rec = await q.get(job_id)
    assert rec is not None and rec.attempts == 1


async def test_transport_down_costs_no_attempt_and_opens_the_breaker(q: Queue) -> None:
    # The server refuses connections for a while: nothing is dead-lettered, no attempt
    # is spent, one breaker (shared in Redis) stops every sender, a probe reopens it.
    ids = await _enqueue(q, 20)
    down = [True]

    def refused(mail: OutgoingMail) -> TransportUnavailable | None:
        return TransportUnavailable("connect to mx:25: connection refused") if down[0] else None

    transport = MemoryTransport(fail=refused)
    settings = SenderSettings(senders=4, claim_batch=5, breaker_probe_s=0.05,
                              breaker_probe_max_s=0.2)  # fmt: skip
    pool = SenderPool(q, transport, settings, q.settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        with trio.fail_after(10):
            while (
                state := await pool.router.routes["smtp"].gate.breaker.state()
            ) is None or state.trips < 3:
                await trio.sleep(0.01)
        assert "connection refused" in state.reason
        # Probes only: the senders do not keep hammering the dead server.
        tried = len(transport.attempts)
        await trio.sleep(0.3)
        assert len(transport.attempts) - tried <= 3
        for job_id in ids:
            rec = await q.get(job_id)
            assert rec is not None and rec.state == "queued" and rec.attempts == 0, rec
        down[0] = False
        with trio.fail_after(10):
            await transport.wait_sent(20)
        pool.stop_claiming()
    assert await pool.router.routes["smtp"].gate.breaker.state() is None
    assert sorted(m.job_id for m in transport.sent) == sorted(ids)
    for job_id in ids:
        rec = await q.get(job_id)
        assert rec is not None and rec.state == "sent" and rec.attempts == 1


async def test_temporary_failures_retry_until_the_budget_not_a_count(redis: Redis) -> None:
    queue = Queue(redis, QueueSettings(lease_s=5, heartbeat_s=1, retry_for_s=0.5,
                                       backoff_base_s=0.01, backoff_max_s=0.05), "s2")  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.serve)
        (job_id,) = await _enqueue(queue, 1)

        def busy(mail: OutgoingMail) -> TemporaryFailure:
            return TemporaryFailure("451 4.3.0 try later", code=451)

        pool = SenderPool(queue, MemoryTransport(fail=busy), SenderSettings(senders=1),
                          queue.settings)  # fmt: skip
        start = trio.current_time()

        async def done() -> bool:
            await queue.reap()
            return await _state(queue, job_id) == "failed"

        await _run_until(pool, done)
        nursery.cancel_scope.cancel()
    rec = await queue.get(job_id)
    # Many more attempts than the old count limit, for as long as the budget allowed.
    assert rec is not None and rec.attempts > 5, rec
    assert trio.current_time() - start >= 0.5
    assert rec.last_error is not None and "451" in rec.last_error
