"""Every Lua script against a real Redis: enqueue, claim, ack, fail, release, renew, reap."""

from __future__ import annotations

import trio

from engine.config import QueueSettings
from engine.ids import new_id
from engine.queue import EnqueueRequest, Failure, NewJob, Queue, Redis


async def _enqueue(queue: Queue, n: int) -> list[str]:
    ids = [new_id() for _ in range(n)]
    await queue.enqueue([NewJob(i, f"payload-{i}".encode()) for i in ids])
    return ids


async def test_enqueue_stores_jobs_and_fills_ready(queue: Queue, redis: Redis) -> None:
    ids = await _enqueue(queue, 3)
    assert [x.decode() for x in await redis.lrange(queue.keys.ready(), 0, -1)] == ids
    rec = await queue.get(ids[0])
    assert rec is not None and rec.state == "queued" and rec.attempts == 0
    counts = await queue.counts()
    assert counts.ready == 3 and counts.enqueued_total == 3
    # One "queued" entry lists all three ids.
    (entry,) = await redis.xrange(queue.keys.events)
    assert entry.field_values[b"ids"].decode().split(",") == ids


async def test_enqueue_is_idempotent_per_id(queue: Queue, redis: Redis) -> None:
    job_id = new_id()
    await queue.enqueue([NewJob(job_id, b"a")])
    await queue.enqueue([NewJob(job_id, b"b")])
    assert await redis.llen(queue.keys.ready()) == 1
    assert await redis.hget(queue.keys.job(job_id), "msg") == b"a"


async def test_concurrent_enqueues_are_group_committed(queue: Queue) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(_enqueue, queue, 1)
    stats = queue._enqueuer.statistics()
    assert stats.items == 200
    # 200 concurrent callers must not cost 200 round-trips.
    assert stats.flushes < 50
    assert (await queue.counts()).ready == 200


async def test_claim_marks_processing_with_lease_and_owner(queue: Queue, redis: Redis) -> None:
    ids = await _enqueue(queue, 5)
    jobs = await queue.claim(3)
    assert [j.id for j in jobs] == ids[:3]
    assert all(j.attempt == 1 for j in jobs)
    assert jobs[0].payload == f"payload-{ids[0]}".encode()
    assert await redis.llen(queue.keys.processing("test-instance")) == 3
    assert await redis.zcard(queue.keys.leases) == 3
    rec = await queue.get(ids[0])
    assert rec is not None and rec.state == "processing" and rec.attempts == 1
    assert await redis.hget(queue.keys.job(ids[0]), "owner") == b"test-instance"


async def test_blocking_claim_waits_for_work(queue: Queue, redis: Redis) -> None:
    got: list[str] = []
    async with trio.open_nursery() as nursery:

        async def claimer() -> None:
            got.extend(j.id for j in await queue.claim(4, block_s=5.0))

        nursery.start_soon(claimer)
        # Enqueue only once the claimer waits on the doorbell (Redis lists it blocked).
        with trio.fail_after(5):
            while int((await redis.info("clients"))["blocked_clients"]) < 1:
                await trio.sleep(0.01)
        assert got == []
        ids = await _enqueue(queue, 1)
    assert got == ids


async def test_blocking_claim_times_out_empty(queue: Queue) -> None:
    with trio.fail_after(3):
        assert await queue.claim(4, block_s=0.2) == []


async def test_ack_marks_sent_and_cleans_up(queue: Queue, redis: Redis) -> None:
    ids = await _enqueue(queue, 2)
    jobs = await queue.claim(2)
    await queue.ack(jobs[0].id)
    rec = await queue.get(ids[0])
    assert rec is not None and rec.state == "sent"
    assert [
        x.decode() for x in await redis.lrange(queue.keys.processing("test-instance"), 0, -1)
    ] == [ids[1]]
    assert await redis.zscore(queue.keys.leases, ids[0]) is None
    assert await redis.ttl(queue.keys.job(ids[0])) > 0
    counts = await queue.counts()
    assert counts.sent_total == 1
    # A second ack (lost reply, retried) changes nothing.
    await queue.ack(jobs[0].id)
    assert (await queue.counts()).sent_total == 1


async def test_redelivery_of_sent_job_is_skipped(redis: Redis) -> None:
    # The race the skip is for: a sender stalls past its lease, the reaper requeues the
    # job, then the stalled attempt succeeds and acks. The copy in ready must not go out.
    clock = [1000.0]
    q = Queue(redis, QueueSettings(lease_s=2, heartbeat_s=1), "i1", clock=lambda: clock[0])
    job_id = new_id()
    await q._flush_enqueue([EnqueueRequest([NewJob(job_id, b"x")])])
    assert [j.id for j in await q._claim(1)] == [job_id]
    clock[0] += 3
    assert (await q.reap()).requeued == 1
    assert await redis.lrange(q.keys.ready(), 0, -1) == [job_id.encode()]
    await q._flush_ack([(job_id, "", "", "")])
    rec = await q.get(job_id)
    assert rec is not None and rec.state == "sent"
    assert await q._claim(5) == []
    assert await redis.llen(q.keys.ready()) == 0  # the copy was taken and dropped
    assert await redis.llen(q.keys.processing("i1")) == 0
    rec = await q.get(job_id)
    assert rec is not None and rec.state == "sent" and rec.attempts == 1


async def test_fail_retry_then_promote(queue: Queue, redis: Redis) -> None:
    (job_id,) = await _enqueue(queue, 1)
    await queue.claim(1)
    due = queue.now_ms() - 1
    assert await queue.fail([Failure(job_id, "retry", due, "451 try later")]) == 1
    rec = await queue.get(job_id)
    assert rec is not None and rec.state == "retrying" and rec.last_error == "451 try later"
    assert rec.next_attempt_at_ms == due
    assert await redis.zscore(queue.keys.delayed, job_id) is not None
    result = await queue.reap()
    assert result.promoted == 1
    jobs = await queue.claim(1)
    assert [j.id for j in jobs] == [job_id] and jobs[0].attempt == 2


async def test_fail_dead_letters(queue: Queue, redis: Redis) -> None:
    (job_id,) = await _enqueue(queue, 1)
    await queue.claim(1)
    await queue.fail([Failure(job_id, "dead", 0, "550 no such user")])
    rec = await queue.get(job_id)
    assert rec is not None and rec.state == "failed"
    assert await redis.lrange(queue.keys.dead, 0, -1) == [job_id.encode()]
    assert (await queue.counts()).failed_total == 1


async def test_release_returns_unsent_jobs_to_front(queue: Queue, redis: Redis) -> None:
    ids = await _enqueue(queue, 3)
    jobs = await queue.claim(2)
    assert await queue.release([j.id for j in jobs]) == 2
    assert [x.decode() for x in await redis.lrange(queue.keys.ready(), 0, -1)] == [
        ids[1],
        ids[0],
        ids[2],
    ]
    rec = await queue.get(ids[0])
    assert rec is not None and rec.state == "queued" and rec.attempts == 0
    assert await redis.zcard(queue.keys.leases) == 0


async def test_renew_extends_only_held_leases(queue: Queue, redis: Redis) -> None:
    await _enqueue(queue, 2)
    a, b = await queue.claim(2)
    before = await redis.zscore(queue.keys.leases, a.id)
    await trio.sleep(0.05)
    assert await queue.renew([a.id]) == 1
    assert (await redis.zscore(queue.keys.leases, a.id) or 0) > (before or 0)
    assert await redis.zscore(queue.keys.leases, b.id) == before
    assert await redis.zscore(queue.keys.instances, "test-instance") is not None


async def test_expired_lease_is_requeued_once_by_concurrent_reapers(redis: Redis) -> None:
    clock = [1000.0]
    settings = QueueSettings(lease_s=2, heartbeat_s=1)
    worker = Queue(redis, settings, "worker", clock=lambda: clock[0])
    reapers = [Queue(redis, settings, f"r{i}", clock=lambda: clock[0]) for i in range(4)]
    ids = [new_id() for _ in range(50)]
    await worker._flush_enqueue([EnqueueRequest([NewJob(i, b"x") for i in ids])])
    await worker._claim(50)
    clock[0] += 3  # the worker hung: leases expire
    results: list[int] = []

    async def reap(q: Queue) -> None:
        results.append((await q.reap()).requeued)

    async with trio.open_nursery() as nursery:
        for q in reapers:
            nursery.start_soon(reap, q)
    assert sum(results) == 50
    ready = [x.decode() for x in await redis.lrange(worker.keys.ready(), 0, -1)]
    assert sorted(ready) == sorted(ids)  # each exactly once
    assert await redis.llen(worker.keys.processing("worker")) == 0


async def test_dead_instance_processing_list_is_recovered(redis: Redis) -> None:
    clock = [1000.0]
    settings = QueueSettings(lease_s=2, heartbeat_s=1)
    dead = Queue(redis, settings, "dead", clock=lambda: clock[0])
    live = Queue(redis, settings, "live", clock=lambda: clock[0])
    ids = [new_id() for _ in range(3)]
    await dead._flush_enqueue([EnqueueRequest([NewJob(i, b"x") for i in ids])])
    await dead._claim(2)
    await dead.renew([ids[0], ids[1]])
    clock[0] += 3
    result = await live.reap()
    assert result.requeued == 2 and result.instances_removed == 1
    assert await redis.exists([dead.keys.processing("dead")]) == 0
    assert await redis.llen(dead.keys.ready()) == 3


async def test_job_that_stalls_too_often_is_dead_lettered(redis: Redis) -> None:
    clock = [1000.0]
    q = Queue(
        redis, QueueSettings(lease_s=2, heartbeat_s=1, max_stalls=2), "i1", clock=lambda: clock[0]
    )
    job_id = new_id()
    await q._flush_enqueue([EnqueueRequest([NewJob(job_id, b"x")])])
    for stall in range(1, 4):
        assert [j.id for j in await q._claim(1)] == [job_id]
        clock[0] += 3  # the sender hangs: the lease expires
        result = await q.reap()
        if stall <= 2:
            assert result.requeued == 1
        else:
            assert result.dead_lettered == 1
    rec = await q.get(job_id)
    assert rec is not None and rec.state == "failed"
    assert rec.last_error is not None and "stalled 3 times" in rec.last_error
    assert await redis.lrange(q.keys.dead, 0, -1) == [job_id.encode()]


async def test_retry_of_some_recipients_only(queue: Queue) -> None:
    (job_id,) = await _enqueue(queue, 1)
    await queue.claim(1)
    await queue.fail([Failure(job_id, "retry", queue.now_ms() - 1, "451", ["b@x.org"])])
    await queue.reap()
    (job,) = await queue.claim(1)
    assert job.recipients == ["b@x.org"] and job.attempt == 2
    await queue.ack(job_id, "delivered in part")
    rec = await queue.get(job_id)
    assert rec is not None and rec.state == "sent" and rec.last_error == "delivered in part"


async def test_dead_retry_and_delete(queue: Queue, redis: Redis) -> None:
    ids = await _enqueue(queue, 3)
    await queue.claim(3)
    await queue.fail([Failure(i, "dead", 0, "550") for i in ids])
    assert await queue.dead_retry([ids[0], "0" * 32]) == [ids[0]]
    rec = await queue.get(ids[0])
    assert rec is not None and rec.state == "queued" and rec.attempts == 0
    assert await redis.ttl(queue.keys.job(ids[0])) == -1  # no longer expiring
    assert await queue.dead_delete([ids[1]]) == [ids[1]]
    assert await queue.get(ids[1]) is None
    total, records = await queue.dead_page(0, 10)
    assert total == 1 and [r.id for r in records] == [ids[2]]
    # A dead-lettered id whose record expired is pruned from the list when listed.
    await redis.delete([queue.keys.job(ids[2])])
    assert await queue.dead_page(0, 10) == (0, [])
    assert await redis.llen(queue.keys.dead) == 0


async def test_idempotent_enqueue(queue: Queue) -> None:
    a = await queue.enqueue([NewJob(new_id(), b"a")], idempotency_key="k", fingerprint="f1")
    b = await queue.enqueue([NewJob(new_id(), b"b")], idempotency_key="k", fingerprint="f1")
    c = await queue.enqueue([NewJob(new_id(), b"c")], idempotency_key="k", fingerprint="f2")
    assert a.outcome == "stored" and b.outcome == "replayed" and b.ids == a.ids
    assert c.outcome == "conflict"
    assert (await queue.counts()).enqueued_total == 1
