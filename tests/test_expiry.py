"""Deliver-by (expires_at / ttl_s / queue.lane_ttl_s): a message not handed to the SMTP
server by its deadline ends ``expired`` and is never sent late.

Queue-level tests run against real Redis on a clock the test moves (the queue's
``clock``): no waiting. The API tests run a real in-process engine (real Redis, HTTP
over TCP, MemoryTransport) with deadlines of a second or two of real time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import trio

from engine.config import QueueSettings, RateLimitSettings, load_settings
from engine.embedded import RedisServer, free_port
from engine.errors import ConfigError, PermanentFailure, TemporaryFailure
from engine.models import MessageIn, ms_to_iso
from engine.queue import (
    EventLog,
    Failure,
    NewJob,
    Queue,
    RateLimits,
    Redis,
    decode_message,
    new_job,
)
from engine.service import Running
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

FROM = "app@example.com"


class Clock:
    """The queue's clock (seconds), moved by the test."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


MakeQueue = Callable[..., Awaitable[Queue]]


@pytest.fixture
async def make_queue(redis: Redis, clock: Clock) -> AsyncIterator[MakeQueue]:
    """Build queues on the test's clock; each is served until the test ends."""
    async with trio.open_nursery() as nursery:

        async def make(
            settings: QueueSettings | None = None,
            instance: str = "expiry-test",
            rate_limits: RateLimitSettings | None = None,
        ) -> Queue:
            q = Queue(
                redis,
                settings or QueueSettings(lease_s=2.0, heartbeat_s=0.5),
                instance,
                rate_limits=rate_limits,
                clock=clock,
            )
            await nursery.start(q.serve)
            if rate_limits is not None:
                await RateLimits(redis, q.keys, rate_limits).publish()
            return q

        yield make
        nursery.cancel_scope.cancel()


def _job(q: Queue, n: int, **fields: object) -> NewJob:
    incoming = MessageIn(to=f"u{n}@example.com", subject=f"m{n}", text="hi", **fields)  # type: ignore[arg-type]
    return new_job(incoming, f"{n:032x}", default_from=FROM, now_ms=q.now_ms())


async def _enqueue(q: Queue, *jobs: NewJob) -> list[str]:
    result = await q.enqueue(list(jobs))
    assert result.outcome == "stored"
    return result.ids


async def _types(q: Queue, job_id: str) -> list[str]:
    history = await EventLog(q.client, q.keys).history(job_id)
    return [e.type for e in history.events]


# -- the claim: expired instead of handed out ------------------------------------------


async def test_claim_expires_a_job_past_its_deadline_and_hands_out_the_rest(
    make_queue: MakeQueue, clock: Clock
) -> None:
    q: Queue = await make_queue()
    late, plain = _job(q, 1, ttl_s=60), _job(q, 2)
    await _enqueue(q, late, plain)
    deadline = late.expires_ms
    assert deadline == q.now_ms() + 60_000

    clock.t += 61
    claimed = await q.claim(10)

    assert [j.id for j in claimed] == [plain.id]  # the late one is never handed out
    rec = await q.get(late.id)
    assert rec is not None and rec.state == "expired" and rec.expires_at_ms == deadline
    assert rec.attempts == 0  # no attempt was made
    assert (await _types(q, late.id))[-1] == "expired"
    counts = await q.counts()
    assert counts.expired_total == 1 and counts.ready == 0 and counts.processing == 1
    # Final: cancelling it is too late, and a second claim finds nothing left to send.
    assert await q.cancel(late.id) == ("too_late", "expired")
    assert await q.claim(10) == []


async def test_a_job_claimed_before_its_deadline_goes_out_unchanged(
    make_queue: MakeQueue, clock: Clock
) -> None:
    q: Queue = await make_queue()
    job = _job(q, 1, expires_at=ms_to_iso(q.now_ms() + 30_000))
    await _enqueue(q, job)
    waiting = await q.get(job.id)  # never claimed: read from the stored message
    assert waiting is not None and waiting.state == "queued"
    assert waiting.expires_at_ms == job.expires_ms

    clock.t += 29
    [claimed] = await q.claim(1)
    assert claimed.expires_ms == job.expires_ms
    assert claimed.payload == job.payload  # the deadline does not reach the sender's bytes
    assert decode_message(claimed.payload).to == ["u1@example.com"]
    rec = await q.get(job.id)
    assert rec is not None and rec.state == "processing" and rec.expires_at_ms == job.expires_ms


async def test_lane_default_applies_and_a_message_deadline_wins(
    make_queue: MakeQueue, clock: Clock
) -> None:
    settings = QueueSettings(lane_ttl_s={"high": 900, "normal": 0, "low": 0})
    q: Queue = await make_queue(settings)
    t0 = q.now_ms()
    high = _job(q, 1, priority="high")
    own = _job(q, 2, priority="high", ttl_s=3600)
    normal = _job(q, 3)
    later = _job(q, 4, priority="high", delay_s=600)  # counted from its send time
    await _enqueue(q, high, own, normal, later)
    rec = await q.get(later.id)
    assert rec is not None and rec.state == "scheduled"
    assert rec.expires_at_ms == t0 + 600_000 + 900_000

    clock.t += 901
    assert (await q.reap()).promoted == 1
    claimed = {j.id for j in await q.claim(10)}

    assert claimed == {own.id, normal.id, later.id}
    rec = await q.get(high.id)
    assert rec is not None and rec.state == "expired" and rec.expires_at_ms == t0 + 900_000


async def test_a_retry_due_after_the_deadline_expires_instead_of_going_out(
    make_queue: MakeQueue, clock: Clock
) -> None:
    q: Queue = await make_queue()
    job = _job(q, 1, ttl_s=120)
    await _enqueue(q, job)
    [first] = await q.claim(1)
    retry_at = q.now_ms() + 300_000  # the backoff outlasts the deadline
    await q.fail([Failure(first.id, "retry", retry_at, "451 try later")])

    clock.t += 301
    await q.reap()  # promotes the retry: queued again, past its deadline
    assert await q.claim(1) == []
    rec = await q.get(job.id)
    assert rec is not None and rec.state == "expired"
    assert rec.last_error == "451 try later"  # what held it up stays visible
    assert (await _types(q, job.id))[-2:] == ["queued", "expired"]


async def test_a_stalled_job_reaped_after_its_deadline_expires(
    make_queue: MakeQueue, clock: Clock
) -> None:
    q: Queue = await make_queue()
    job = _job(q, 1, ttl_s=5)
    await _enqueue(q, job)
    assert len(await q.claim(1)) == 1  # its sender then dies: the lease runs out

    clock.t += 10
    assert (await q.reap()).requeued == 1
    assert await q.claim(1) == []
    rec = await q.get(job.id)
    assert rec is not None and rec.state == "expired"


async def test_a_rate_limit_slot_after_the_deadline_expires_the_job(
    make_queue: MakeQueue,
) -> None:
    # One message a second through one bucket (burst 1); a claimed job may wait up to
    # 1 s for its slot, a later one is deferred (scheduled) to its slot.
    limits = RateLimitSettings(global_per_s=1, burst_s=1, max_wait_s=1)
    q: Queue = await make_queue(rate_limits=limits)
    jobs = [
        _job(q, 1),  # slot now
        _job(q, 2, ttl_s=0.5),  # slot 1 s on, within the wait: past its deadline
        _job(q, 3),  # slot 1 s on: claimed, waits 1 s
        _job(q, 4, ttl_s=1.2),  # deferred to 1 s on: before its deadline
        _job(q, 5, ttl_s=1.9),  # deferred to 2 s on: past its deadline
    ]
    await _enqueue(q, *jobs)

    claimed = await q.claim(5)

    assert [(j.id, j.wait_s) for j in claimed] == [(jobs[0].id, 0.0), (jobs[2].id, 1.0)]
    states = [rec.state for rec in await q.get_many([j.id for j in jobs]) if rec]
    assert states == ["processing", "expired", "processing", "scheduled", "expired"]
    for late in (jobs[1], jobs[4]):
        rec = await q.get(late.id)
        assert rec is not None
        assert rec.last_error == "its rate-limit slot comes after its deadline"
    assert (await q.counts()).expired_total == 2


# -- the dead-letter retry ---------------------------------------------------------------


async def test_dead_retry_refuses_a_dead_letter_past_its_deadline(
    make_queue: MakeQueue, clock: Clock
) -> None:
    q: Queue = await make_queue()
    timed, untimed, fresh = _job(q, 1, ttl_s=60), _job(q, 2), _job(q, 3, ttl_s=3600)
    await _enqueue(q, timed, untimed, fresh)
    claimed = await q.claim(3)
    await q.fail([Failure(j.id, "dead", 0, "550 no such user") for j in claimed])
    assert sorted(await q.dead_ids()) == sorted([timed.id, untimed.id, fresh.id])

    clock.t += 61
    done = await q.dead_requeue([timed.id, untimed.id, fresh.id])

    assert sorted(done.retried) == sorted([untimed.id, fresh.id])
    assert done.expired == {timed.id: timed.expires_ms}
    assert await q.dead_ids() == [timed.id]  # still a dead letter, to read or delete
    rec = await q.get(timed.id)
    assert rec is not None and rec.state == "failed"
    assert await q.dead_retry([timed.id]) == []
    assert await q.dead_delete([timed.id]) == [timed.id]


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"ttl_s": 60, "expires_at": "+3600"}, "expires_at", "not both"),
        ({"ttl_s": -5}, "ttl_s", "more than 0"),
        ({"ttl_s": 0}, "ttl_s", "more than 0"),
        ({"ttl_s": 3 * 366 * 24 * 3600}, "ttl_s", "at most"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "in the past"),
        ({"expires_at": "tomorrow"}, "expires_at", "RFC 3339"),
        ({"expires_at": "2099-01-01T00:00:00"}, "expires_at", "offset"),
        ({"expires_at": "2099-01-01T00:00:00Z"}, "expires_at", "at most"),
        ({"expires_at": "+3600", "send_at": "+7200"}, "expires_at", "before the message's send_at"),
        ({"ttl_s": 30, "delay_s": 60}, "ttl_s", "before the message's delay_s"),
    ],
)  # fmt: skip
def test_invalid_deadlines_name_the_field(
    fields: dict[str, object], field: str, words: str
) -> None:
    from engine.errors import ValidationError

    now_ms = int(time.time() * 1000)
    # "+N": N seconds from now.
    fields = {
        k: ms_to_iso(now_ms + int(v[1:]) * 1000) if isinstance(v, str) and v[0] == "+" else v
        for k, v in fields.items()
    }
    incoming = MessageIn(to="ann@example.com", text="hi", **fields)  # type: ignore[arg-type]
    with pytest.raises(ValidationError) as err:
        new_job(incoming, "0" * 32, default_from=FROM, now_ms=now_ms)
    assert err.value.field == field and words in err.value.detail


@pytest.mark.parametrize(
    "lane_ttl_s",
    [{"high": 900, "normal": 0}, {"high": -1, "normal": 0, "low": 0}],
)
def test_lane_ttl_setting_is_checked(lane_ttl_s: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="lane_ttl_s"):
        load_settings(environ={}, overrides={"queue": {"lane_ttl_s": lane_ttl_s}})


# -- over the API --------------------------------------------------------------------------


@dataclass
class Engine:
    base: str
    running: Running
    transport: MemoryTransport


@pytest.fixture
async def engine(redis_server: RedisServer) -> AsyncIterator[Engine]:
    from engine.queue import open_redis

    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={},
        overrides={
            "http": {"bind": bind},
            # Retries come quickly, so a message keeps failing past a short deadline.
            "queue": {"backoff_base_s": 0.1, "backoff_max_s": 0.2},
        },
    )
    transport = MemoryTransport()
    async with inprocess_engine(settings, redis_server.url, transport) as running:
        yield Engine(f"http://{bind}", running, transport)


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=engine.base, headers=AUTH, timeout=10) as c:
        yield c


MSG = {"to": "ann@example.com", "subject": "Your code", "text": "123456"}


async def _wait_state(client: httpx.AsyncClient, job_id: str, state: str) -> dict[str, object]:
    with trio.fail_after(15):
        while True:
            body: dict[str, object] = (await client.get(f"/v1/messages/{job_id}")).json()
            if body["state"] == state:
                return body
            await trio.sleep(0.05)


async def test_a_message_failing_past_its_ttl_expires_and_is_never_delivered(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    engine.transport.script(*[TemporaryFailure("450 4.2.1 mailbox busy", code=450)] * 500)
    r = await client.post("/v1/messages", json={**MSG, "ttl_s": 1})
    assert r.status_code == 202
    job_id = r.json()["id"]

    body = await _wait_state(client, job_id, "expired")

    assert engine.transport.sent == []
    assert body["expires_at"] and "450" in str(body["last_error"])
    attempts = len(engine.transport.attempts)
    assert attempts >= 1 and body["attempts"] == attempts
    events = (await client.get(f"/v1/messages/{job_id}/events")).json()
    assert events[-1]["type"] == "expired" and events[-1]["state"] == "expired"
    assert (await client.delete(f"/v1/messages/{job_id}")).status_code == 409
    await trio.sleep(0.5)  # nothing more happens to it
    assert len(engine.transport.attempts) == attempts and engine.transport.sent == []


async def test_a_dead_letter_past_its_deadline_is_not_retried_409(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    engine.transport.script(PermanentFailure("550 5.1.1 no such user", code=550))
    r = await client.post("/v1/messages", json={**MSG, "ttl_s": 1.5})
    job_id = r.json()["id"]
    body = await _wait_state(client, job_id, "failed")
    deadline = str(body["expires_at"])
    [item] = (await client.get("/v1/dead")).json()["items"]
    assert item["id"] == job_id and item["expires_at"] == deadline
    await trio.sleep(1.6)

    r = await client.post(f"/v1/dead/{job_id}/retry")

    assert r.status_code == 409
    problem = r.json()
    assert problem["type"].endswith("/deadline-passed") and deadline in problem["detail"]
    r = await client.post("/v1/dead/retry", json={"ids": [job_id]})
    assert r.status_code == 202 and r.json() == {"retried": 0, "ids": [], "expired": [job_id]}
    assert (await client.get("/v1/dead")).json()["total"] == 1
    assert engine.transport.sent == []


async def test_api_validates_and_shows_the_deadline(client: httpx.AsyncClient) -> None:
    both = {**MSG, "ttl_s": 60, "expires_at": "2099-01-01T00:00:00Z"}
    r = await client.post("/v1/messages", json=both)
    assert r.status_code == 422 and r.json()["field"] == "expires_at"
    r = await client.post("/v1/messages", json={**MSG, "ttl_s": -1})
    assert r.status_code == 422 and r.json()["field"] == "ttl_s"
    r = await client.post("/v1/messages", json={**MSG, "expires_at": "x" * 65})  # over the cap
    assert r.status_code == 422 and r.json()["field"] == "expires_at"
    now_ms = int(time.time() * 1000)
    r = await client.post(
        "/v1/messages/batch",
        json={"messages": [MSG, {**MSG, "send_at": ms_to_iso(now_ms + 7_200_000),
                                 "expires_at": ms_to_iso(now_ms + 3_600_000)}]},
    )  # fmt: skip
    assert r.status_code == 422 and r.json()["field"] == "messages[1].expires_at"

    # A scheduled message shows its deadline while it waits, and can still be cancelled.
    send_at = ms_to_iso(int(time.time() * 1000) + 3_600_000)
    expires = ms_to_iso(int(time.time() * 1000) + 7_200_000)
    r = await client.post("/v1/messages", json={**MSG, "send_at": send_at, "expires_at": expires})
    assert r.status_code == 202
    job_id = r.json()["id"]
    body = (await client.get(f"/v1/messages/{job_id}")).json()
    assert body["state"] == "scheduled" and body["expires_at"] == expires
    assert (await client.delete(f"/v1/messages/{job_id}")).status_code == 200
