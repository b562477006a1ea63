"""Flow control on a real Redis: lanes, tenant fairness, delayed sends, cancel, the
distributed token buckets (GCRA + AIMD), ingest back-pressure, and the doorbell."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import AsyncIterator

import pytest
import trio

from engine.config import IngestSettings, QueueSettings, RateLimitSettings
from engine.ids import new_id, new_ids
from engine.policy import recovered_rate
from engine.queue import NewJob, Queue, RateLimits, Redis

SETTINGS = QueueSettings(lease_s=5.0, heartbeat_s=1.0)


class Clock:
    def __init__(self) -> None:
        self.t = 2_000_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def _queue(
    redis: Redis,
    nursery: trio.Nursery,
    *,
    instance: str = "i1",
    limits: RateLimitSettings | None = None,
    ingest: IngestSettings | None = None,
    clock: Clock | None = None,
) -> Queue:
    kwargs = {"clock": clock} if clock is not None else {}
    q = Queue(redis, SETTINGS, instance, rate_limits=limits, ingest=ingest, **kwargs)  # type: ignore[arg-type]
    await nursery.start(q.serve)
    await q.renew([])
    if limits is not None:
        await RateLimits(redis, q.keys, limits).publish()
    return q


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


def _jobs(n: int, **kw: object) -> list[NewJob]:
    return [NewJob(i, b"m", **kw) for i in new_ids(n)]  # type: ignore[arg-type]


# -- lanes and tenants ------------------------------------------------------------------


async def test_high_lane_overtakes_a_low_backlog(redis: Redis, nursery: trio.Nursery) -> None:
    q = await _queue(redis, nursery)
    await q.enqueue(_jobs(20_000, lane="low"))
    (urgent,) = _jobs(1, lane="high")
    await q.enqueue([urgent])
    claimed = await q.claim(2)
    assert urgent.id in [j.id for j in claimed]


async def test_weighted_lanes_share_claims_and_none_starves(
    redis: Redis, nursery: trio.Nursery
) -> None:
    q = await _queue(redis, nursery)
    lane_of: dict[str, str] = {}
    for lane in ("high", "normal", "low"):
        jobs = _jobs(300, lane=lane)
        lane_of.update((j.id, lane) for j in jobs)
        await q.enqueue(jobs)
    got: Counter[str] = Counter()
    for _ in range(10):
        got.update(lane_of[j.id] for j in await q.claim(20))
    # Weights 6:3:1 while all three lanes have work.
    assert got == {"high": 120, "normal": 60, "low": 20}


async def test_an_empty_lanes_share_goes_to_the_others(redis: Redis, nursery: trio.Nursery) -> None:
    q = await _queue(redis, nursery)
    await q.enqueue(_jobs(50, lane="low"))
    assert len(await q.claim(50)) == 50


async def test_tenants_take_turns_within_a_lane(redis: Redis, nursery: trio.Nursery) -> None:
    q = await _queue(redis, nursery)
    blast = _jobs(5000, tenant="blast")
    await q.enqueue(blast)
    small = _jobs(5, tenant="small")
    await q.enqueue(small)
    claimed = [j.id for j in await q.claim(10)]
    # Round-robin: the small tenant's five are all in the first ten claims.
    assert {j.id for j in small} <= set(claimed)


async def test_backlog_counter_and_counts(redis: Redis, nursery: trio.Nursery) -> None:
    q = await _queue(redis, nursery)
    await q.enqueue(_jobs(30, lane="high", tenant="a") + _jobs(20, lane="low"))
    counts = await q.counts()
    assert counts.ready == 50
    assert counts.ready_by_lane == {"high": 30, "normal": 0, "low": 20}
    await q.claim(15)
    counts = await q.counts()
    assert counts.ready == 35
    assert sum(counts.ready_by_lane.values()) == 35 and counts.ready_by_lane["high"] < 30


# -- delayed send and cancel -----------------------------------------------------------


async def test_scheduled_job_waits_then_is_promoted(
    redis: Redis, nursery: trio.Nursery, clock: Clock
) -> None:
    q = await _queue(redis, nursery, clock=clock)
    (job,) = [NewJob(new_id(), b"m", due_ms=q.now_ms() + 60_000)]
    await q.enqueue([job])
    rec = await q.get(job.id)
    assert rec is not None and rec.state == "scheduled"
    assert rec.next_attempt_at_ms == job.due_ms
    assert await q.claim(5) == []
    clock.t += 59
    await q.reap()
    assert await q.claim(5) == []
    clock.t += 2
    assert (await q.reap()).promoted == 1
    assert [j.id for j in await q.claim(5)] == [job.id]


async def test_cancel_queued_scheduled_and_too_late(
    redis: Redis, nursery: trio.Nursery, clock: Clock
) -> None:
    q = await _queue(redis, nursery, clock=clock)
    queued, later, running = NewJob(new_id(), b"a"), NewJob(new_id(), b"b"), NewJob(new_id(), b"c")
    later = NewJob(later.id, b"b", due_ms=q.now_ms() + 10_000)
    await q.enqueue([queued, later])
    assert await q.cancel(queued.id) == ("cancelled", "cancelled")
    assert await q.cancel(queued.id) == ("cancelled", "cancelled")  # idempotent
    assert await q.cancel(later.id) == ("cancelled", "cancelled")
    assert await redis.zscore(q.keys.delayed, later.id) is None
    assert await q.cancel(new_id()) == ("unknown", "")
    await q.enqueue([running])
    claimed = await q.claim(5)
    # The cancelled queued id is dropped by claim, never handed to a sender.
    assert [j.id for j in claimed] == [running.id]
    assert await q.cancel(running.id) == ("too_late", "processing")
    await q.ack(running.id)
    assert await q.cancel(running.id) == ("too_late", "sent")
    clock.t += 20
    assert (await q.reap()).promoted == 0
    assert (await q.counts()).ready == 0


# -- distributed rate limits -------------------------------------------------------------

LIMITS = RateLimitSettings(domains={"slow.test": 10}, burst_s=0.1, max_wait_s=1.0)


async def test_bucket_spaces_slots_and_defers_the_rest_across_replicas(
    redis: Redis, nursery: trio.Nursery
) -> None:
    a = await _queue(redis, nursery, instance="a", limits=LIMITS)
    b = await _queue(redis, nursery, instance="b", limits=LIMITS)
    await a.enqueue(_jobs(40, domains="slow.test"))
    first = await a.claim(8)
    second = await b.claim(40)  # another replica shares the same bucket
    waits = sorted(j.wait_s for j in [*first, *second])
    # 10/s with a burst of 1: one slot every 100 ms, up to max_wait_s ahead.
    assert 10 <= len(waits) <= 12
    assert waits[0] < 0.05
    gaps = [y - x for x, y in itertools.pairwise(waits)]
    assert all(0.08 <= g <= 0.12 for g in gaps), gaps
    counts = await a.counts()
    assert counts.delayed == 40 - len(waits)  # deferred, not spun on
    assert counts.ready == 0
    due = sorted(s for _, s in await redis.zrange(a.keys.delayed, 0, -1, withscores=True))
    spacing = [y - x for x, y in itertools.pairwise(due)]
    assert all(95 <= g <= 105 for g in spacing), spacing  # deferred at the bucket's rate


async def test_unlimited_domains_are_not_held_back(redis: Redis, nursery: trio.Nursery) -> None:
    q = await _queue(redis, nursery, limits=LIMITS)
    await q.enqueue(_jobs(30, domains="slow.test") + _jobs(30, domains="fast.test"))
    claimed = await q.claim(64)
    fast = [j for j in claimed if j.wait_s == 0]
    assert len(fast) >= 30


async def test_global_and_tenant_buckets_apply(redis: Redis, nursery: trio.Nursery) -> None:
    limits = RateLimitSettings(global_per_s=100, tenants={"t1": 5}, burst_s=0.01)
    q = await _queue(redis, nursery, limits=limits)
    await q.enqueue(_jobs(20, tenant="t1") + _jobs(200, tenant="t2"))
    claimed = await q.claim(300)
    per_tenant_t1 = [j for j in claimed if j.wait_s >= 0]
    assert len(claimed) <= 101  # global: 100/s for max_wait_s = 1 s, plus the first
    assert len(per_tenant_t1) == len(claimed)
    state = {b.name: b for b in await RateLimits(redis, q.keys, limits).state()}
    assert state["global"].limit_per_s == 100
    assert state["tenant:t1"].limit_per_s == 5


async def test_slowdown_halves_once_per_cooldown_and_recovers(
    redis: Redis, nursery: trio.Nursery
) -> None:
    limits = RateLimitSettings(
        domains={"slow.test": 100}, slowdown_cooldown_s=0.5, recovery_per_s=1.0
    )
    q = await _queue(redis, nursery, limits=limits)
    rl = RateLimits(redis, q.keys, limits)
    assert await rl.slowdown(["domain:slow.test", "domain:free.test"]) == {"domain:slow.test": 50.0}
    again = await rl.slowdown(["domain:slow.test"])
    assert 50 <= again["domain:slow.test"] < 60  # within the cooldown: no second halving
    (bucket,) = [b for b in await rl.state() if b.name == "domain:slow.test"]
    assert bucket.rate_per_s < 100
    await trio.sleep(0.3)  # recovery: +100 % of the limit per second
    (bucket,) = [b for b in await rl.state() if b.name == "domain:slow.test"]
    assert bucket.rate_per_s >= 75
    await trio.sleep(0.6)
    (bucket,) = [b for b in await rl.state() if b.name == "domain:slow.test"]
    assert bucket.rate_per_s == 100


async def test_claim_recovers_a_slowed_rate_as_policy_computes_it(
    redis: Redis, nursery: trio.Nursery
) -> None:
    # claim.lua and engine.policy.recovered_rate (GET /v1/limits) must agree: compare
    # the rate claim.lua stores against the Python formula from the state before.
    limits = RateLimitSettings(domains={"slow.test": 100}, recovery_per_s=0.5)
    q = await _queue(redis, nursery, limits=limits)
    await RateLimits(redis, q.keys, limits).slowdown(["domain:slow.test"])
    key = q.keys.bucket("domain:slow.test")

    async def stored() -> tuple[float, float]:
        fields = (await redis.get(key) or b"").decode().split()
        return float(fields[2]), float(fields[3])  # rate, when it was stored (server ms)

    rate0, at0 = await stored()
    assert rate0 == 50.0
    await trio.sleep(0.3)
    await q.enqueue(_jobs(1, domains="slow.test"))
    assert len(await q.claim(1)) == 1
    rate1, at1 = await stored()
    assert at1 > at0 and 50 < rate1 < 100
    assert rate1 == pytest.approx(recovered_rate(rate0, at0, 100, at1, 0.5), abs=1e-5)


async def test_slowed_rate_spaces_claims_wider(redis: Redis, nursery: trio.Nursery) -> None:
    limits = RateLimitSettings(domains={"slow.test": 20}, burst_s=0.05, recovery_per_s=0.0)
    q = await _queue(redis, nursery, limits=limits)
    await RateLimits(redis, q.keys, limits).slowdown(["domain:slow.test"])
    await q.enqueue(_jobs(40, domains="slow.test"))
    claimed = await q.claim(40)
    assert 9 <= len(claimed) <= 11  # 10/s after halving, max_wait_s = 1


# -- ingest back-pressure ---------------------------------------------------------------


async def test_client_limit_refuses_without_storing(redis: Redis, nursery: trio.Nursery) -> None:
    ingest = IngestSettings(client_rate_per_s=10, client_burst=20)
    q = await _queue(redis, nursery, ingest=ingest)
    ok = await q.enqueue(_jobs(15), client="c1")
    assert ok.outcome == "stored" and ok.value == 5
    refused = await q.enqueue(_jobs(10), client="c1")
    assert refused.outcome == "limited" and 400 <= refused.value <= 600
    other = await q.enqueue(_jobs(10), client="c2")  # clients have their own buckets
    assert other.outcome == "stored"
    too_big = await q.enqueue(_jobs(21), client="c3")
    assert too_big.outcome == "limited" and too_big.value == -1
    assert (await q.counts()).ready == 25


async def test_backlog_high_water_refuses_new_work(redis: Redis, nursery: trio.Nursery) -> None:
    q = await _queue(redis, nursery, ingest=IngestSettings(max_backlog=100))
    assert (await q.enqueue(_jobs(60))).outcome == "stored"
    scheduled = [NewJob(new_id(), b"m", due_ms=q.now_ms() + 60_000) for _ in range(30)]
    assert (await q.enqueue(scheduled)).outcome == "stored"
    full = await q.enqueue(_jobs(20))
    assert full.outcome == "backlog" and full.value == 90
    await q.claim(50)
    assert (await q.enqueue(_jobs(20))).outcome == "stored"


# -- the doorbell ----------------------------------------------------------------------


async def test_idle_claim_wakes_on_enqueue(redis: Redis, nursery: trio.Nursery) -> None:
    q = await _queue(redis, nursery)
    got: list[str] = []

    async def waiter() -> None:
        got.extend(j.id for j in await q.claim(5, block_s=5))

    nursery.start_soon(waiter)
    # Enqueue only once the waiter blocks on the doorbell (Redis lists it blocked).
    with trio.fail_after(5):
        while int((await redis.info("clients"))["blocked_clients"]) < 1:
            await trio.sleep(0.01)
    assert got == []
    (job,) = _jobs(1, lane="low", tenant="x")
    with trio.fail_after(2):
        await q.enqueue([job])
        while not got:
            await trio.sleep(0.01)
    assert got == [job.id]
