"""Recurring schedules: cron arithmetic (DST), the store's compare-and-set against a real
Redis, the HTTP routes, and the scheduler: each tick exactly once across two replicas,
catch-up after a restart within the misfire grace, skipping beyond it, Redis outages.

Wall-clock time is a fake clock shared by the queue, store and scheduler, so minutes
of ticks pass in milliseconds; trio's own clock stays real (Redis I/O is real).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from engine.api.router import Router
from engine.api.routes import ROUTES
from engine.api.schedules import ScheduleRoutes
from engine.config import IngestSettings, QueueSettings, SchedulerSettings
from engine.cron import check_cron, check_timezone, next_tick_ms
from engine.embedded import RedisServer
from engine.errors import ValidationError
from engine.ids import is_id
from engine.keys import Keys
from engine.metrics import Metrics
from engine.models import Message
from engine.queue import NewJob, Queue, Redis, ScheduleStore, open_redis
from engine.scheduler import Scheduler, build_tick_job, tick_job_id

MINUTE = 60_000
MSG = {"to": "ann@example.com", "subject": "Daily digest", "text": "Hi Ann"}
MSG_JSON = msgspec.json.encode(MSG).decode()
FAST = SchedulerSettings(interval_s=0.005, misfire_grace_s=300)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


T0 = ms("2025-01-01T00:00:30+00:00")  # half a minute before the first tick of "* * * * *"


class FakeClock:
    """Wall-clock seconds that only move when told (``clock.ms += MINUTE``)."""

    def __init__(self, at_ms: int) -> None:
        self.ms = at_ms

    def __call__(self) -> float:
        return self.ms / 1000


async def wait_until(cond: Callable[..., Awaitable[bool]], *args: Any) -> None:
    """Poll ``await cond(*args)`` until true (5 s at most)."""
    with trio.fail_after(5):
        while not await cond(*args):
            await trio.sleep(0.005)


# -- cron -------------------------------------------------------------------------------


def ticks(expr: str, tz: str, start: str, n: int) -> list[str]:
    """The next ``n`` ticks after ``start``, as UTC minutes."""
    out, t = [], ms(start)
    for _ in range(n):
        t = next_tick_ms(expr, tz, t)
        out.append(datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m-%dT%H:%M"))
    return out


def test_cron_follows_dst_in_berlin() -> None:
    # 09:00 local is 08:00 UTC in winter and 07:00 UTC from the spring change (30 March).
    assert ticks("0 9 * * *", "Europe/Berlin", "2025-03-29T00:00:00+00:00", 3) == [
        "2025-03-29T08:00", "2025-03-30T07:00", "2025-03-31T07:00",
    ]  # fmt: skip
    # 02:30 does not exist on 30 March: it fires once, at the end of the gap (03:00 CEST).
    assert ticks("30 2 * * *", "Europe/Berlin", "2025-03-29T12:00:00+00:00", 2) == [
        "2025-03-30T01:00", "2025-03-31T00:30",
    ]  # fmt: skip
    # 02:30 happens twice on 26 October: it fires once, on the first pass (CEST).
    assert ticks("30 2 * * *", "Europe/Berlin", "2025-10-25T12:00:00+00:00", 2) == [
        "2025-10-26T00:30", "2025-10-27T01:30",
    ]  # fmt: skip
    # Started inside the repeated hour, the first pass (already gone) is not answered.
    assert ticks("30 2 * * *", "Europe/Berlin", "2025-10-26T01:15:00+00:00", 1) == [
        "2025-10-27T01:30"
    ]
    # Interval schedules keep real intervals through the repeated hour.
    assert ticks("*/30 * * * *", "Europe/Berlin", "2025-10-26T00:10:00+00:00", 4) == [
        "2025-10-26T00:30", "2025-10-26T01:00", "2025-10-26T01:30", "2025-10-26T02:00",
    ]  # fmt: skip


def test_next_tick_is_strictly_after() -> None:
    tick = ms("2025-01-01T00:01:00+00:00")
    assert next_tick_ms("* * * * *", "UTC", tick - 1) == tick
    assert next_tick_ms("* * * * *", "UTC", tick) == tick + MINUTE
    assert next_tick_ms("* * * * *", "UTC", tick + 500) == tick + MINUTE


@pytest.mark.parametrize(
    "expr",
    ["* * * * * *", "*/10 * * * * *", "61 * * * *", "* * *", "", "bad", "0 0 30 2 *", "@reboot",
     "x" * 300],
)  # fmt: skip
def test_bad_cron_is_refused_on_field_cron(expr: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_cron(expr)
    assert info.value.field == "cron"


def test_cron_is_normalized() -> None:
    assert check_cron("  */5   9-17 * *  MON-FRI ") == "*/5 9-17 * * MON-FRI"
    assert check_cron("@daily") == "0 0 * * *"


@pytest.mark.parametrize(
    "tz", ["Mars/Olympus", "", "../../etc/passwd", "/etc/localtime", "Europe/"]
)
def test_bad_timezone_is_refused_on_field_timezone(tz: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_timezone(tz)
    assert info.value.field == "timezone"


def test_tick_job_ids_are_deterministic_ids() -> None:
    tick = ms("2025-01-01T00:01:00+00:00")
    job_id = tick_job_id("digest", 1, tick)
    assert is_id(job_id) and job_id == tick_job_id("digest", 1, tick)
    assert int(job_id[:12], 16) == tick  # time-ordered like every other id
    others = {tick_job_id("digest", 2, tick), tick_job_id("digest2", 1, tick),
              tick_job_id("digest", 1, tick + MINUTE)}  # fmt: skip
    assert job_id not in others and len(others) == 3


# -- the store ----------------------------------------------------------------------------


async def test_put_creates_then_replaces_keeping_counters(redis: Redis) -> None:
    clock = FakeClock(T0)
    store = ScheduleStore(redis, Keys(), clock=clock)
    created, s = await store.put("digest", "* * * * *", "UTC", MSG_JSON)
    assert created and s.version == 1 and s.created_at_ms == T0 == s.updated_at_ms
    assert s.next_tick_ms == T0 + 30_000 and (s.fired, s.skipped, s.last_job_id) == (0, 0, None)
    assert await store.advance("digest", T0 + 30_000, T0 + 90_000, version=1, fired_job_id="j1")
    clock.ms += 45_000
    created, s = await store.put("digest", "0 * * * *", "Europe/Berlin", MSG_JSON)
    assert not created and s.version == 2 and s.created_at_ms == T0
    assert s.updated_at_ms == T0 + 45_000 and s.next_tick_ms == ms("2025-01-01T01:00:00+00:00")
    got = await store.get("digest")
    assert got == s
    assert (got.fired, got.last_job_id, got.last_tick_ms) == (1, "j1", T0 + 30_000)
    assert (got.cron, got.timezone) == ("0 * * * *", "Europe/Berlin")


async def test_advance_is_a_compare_and_set(redis: Redis) -> None:
    store = ScheduleStore(redis, Keys(), clock=FakeClock(T0))
    _, s = await store.put("a", "* * * * *", "UTC", MSG_JSON)
    tick = s.next_tick_ms
    assert tick is not None
    assert not await store.advance("a", tick, tick + MINUTE, version=2, fired_job_id="x")
    assert not await store.advance("a", tick - MINUTE, tick, version=1, fired_job_id="x")
    assert await store.advance("a", tick, tick + MINUTE, version=1, fired_job_id="x")
    # The loser of a race (same expected tick) changes nothing.
    assert not await store.advance("a", tick, tick + MINUTE, version=1, fired_job_id="y")
    assert await store.advance("a", tick + MINUTE, tick + 5 * MINUTE, version=1, skipped=4)
    got = await store.get("a")
    assert got is not None
    assert (got.next_tick_ms, got.fired, got.skipped, got.last_job_id) == (
        tick + 5 * MINUTE, 1, 4, "x",
    )  # fmt: skip
    assert await store.delete("a")
    assert not await store.advance("a", tick + 5 * MINUTE, tick + 6 * MINUTE, version=1, skipped=1)
    assert not await store.delete("a") and await store.get("a") is None


async def test_due_list_and_delete(redis: Redis) -> None:
    clock = FakeClock(T0)
    store = ScheduleStore(redis, Keys(), clock=clock)
    await store.put("minutely", "* * * * *", "UTC", MSG_JSON)
    await store.put("hourly", "0 * * * *", "UTC", MSG_JSON)
    await store.put("b-daily", "@daily", "UTC", MSG_JSON)
    assert await store.due(T0, 10) == []
    assert [s.name for s in await store.due(T0 + 30_000, 10)] == ["minutely"]
    assert [s.name for s in await store.due(ms("2025-01-02T00:00:00+00:00"), 10)] == [
        "minutely", "hourly", "b-daily",
    ]  # fmt: skip
    assert len(await store.due(ms("2025-01-02T00:00:00+00:00"), 2)) == 2
    assert [s.name for s in await store.list_all()] == ["b-daily", "hourly", "minutely"]
    assert await store.delete("hourly")
    assert [s.name for s in await store.list_all()] == ["b-daily", "minutely"]
    assert await redis.zcard(Keys().schedules_due) == 2


async def test_messages_of_any_size_and_script_survive_the_lua_round_trip(redis: Redis) -> None:
    store = ScheduleStore(redis, Keys(), clock=FakeClock(T0))
    big = msgspec.json.encode({**MSG, "subject": "Grüße ✉ 日本", "text": "é" * 40_000}).decode()
    _, s = await store.put("big", "* * * * *", "UTC", big)
    assert s.next_tick_ms is not None
    assert await store.advance("big", s.next_tick_ms, s.next_tick_ms + MINUTE, version=1,
                               fired_job_id="j")  # fmt: skip
    _, s = await store.put("big", "* * * * *", "UTC", big)
    got = await store.get("big")
    assert got is not None and got.message == big and got.version == 2 and got.fired == 1


# -- HTTP routes --------------------------------------------------------------------------


@pytest.fixture
async def api(redis: Redis) -> AsyncIterator[httpx.AsyncClient]:
    store = ScheduleStore(redis, Keys(), clock=FakeClock(T0))
    handlers = ScheduleRoutes(store, default_from="engine@example.com", max_body_bytes=100_000)
    ops = ("put_schedule", "list_schedules", "get_schedule", "delete_schedule")
    routes = [r for r in ROUTES if r.op in ops]
    app = Router(routes, {op: getattr(handlers, op) for op in ops}, Metrics().ingest)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
        yield client


async def test_schedule_routes(api: httpx.AsyncClient) -> None:
    body = {"name": "digest", "cron": "0 9 * * MON-FRI", "timezone": "Europe/Berlin",
            "message": MSG}  # fmt: skip
    r = await api.post("/v1/schedules", json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v1/schedules/digest"
    view = r.json()
    # 2025-01-01 is a Wednesday; 09:00 in Berlin (CET) is 08:00 UTC.
    assert view["next_tick"] == "2025-01-01T08:00:00.000Z"
    # The message is pinned to a tenant: the caller's (here auth is off: "default").
    assert view["message"] == {**MSG, "tenant": "default"} and view["version"] == 1
    assert (view["fired"], view["skipped"], view["last_tick"], view["last_job_id"]) == (
        0, 0, None, None,
    )  # fmt: skip
    r = await api.post("/v1/schedules", json={**body, "cron": "@hourly"})
    assert r.status_code == 200 and r.json()["version"] == 2
    assert r.json()["cron"] == "0 * * * *" and r.json()["next_tick"] == "2025-01-01T01:00:00.000Z"
    r = await api.post("/v1/schedules", json={"name": "utc", "cron": "* * * * *", "message": MSG})
    assert r.status_code == 201 and r.json()["timezone"] == "UTC"
    r = await api.get("/v1/schedules")
    assert [s["name"] for s in r.json()["items"]] == ["digest", "utc"]
    r = await api.get("/v1/schedules/digest")
    assert r.status_code == 200 and r.json()["version"] == 2
    r = await api.delete("/v1/schedules/digest")
    assert r.status_code == 204
    for method in ("GET", "DELETE"):
        r = await api.request(method, "/v1/schedules/digest")
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "has space"}, "name"),
        ({"name": "x" * 65}, "name"),
        ({"cron": "* * * * * *"}, "cron"),
        ({"cron": "99 * * * *"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"message": {**MSG, "to": "broken"}}, "message.to"),
        ({"message": {**MSG, "cc": ["ok@example.com", "bad"]}}, "message.cc[1]"),
        ({"message": {**MSG, "send_at": "2025-02-01T00:00:00Z"}}, "message.send_at"),
        ({"message": {**MSG, "delay_s": 5}}, "message.delay_s"),
        ({"message": {**MSG, "priority": 11}}, "message.priority"),
        ({"message": {**MSG, "tenant": "a b"}}, "message.tenant"),
        ({"message": {**MSG, "bogus": 1}}, "message.bogus"),
        ({"message": {"subject": "no to"}}, "message.to"),
        ({"message": 5}, "message"),
        ({"extra": 1}, "extra"),
    ],
)
async def test_bad_schedules_are_refused_naming_the_field(
    api: httpx.AsyncClient, change: dict[str, Any], field: str
) -> None:
    body = {"name": "digest", "cron": "* * * * *", "message": MSG, **change}
    r = await api.post("/v1/schedules", json=body)
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["field"] == field
    assert (await api.get("/v1/schedules")).json()["items"] == []


async def test_non_json_bodies_are_refused(api: httpx.AsyncClient) -> None:
    r = await api.post("/v1/schedules", content=b"name=x")
    assert r.status_code == 415
    r = await api.post("/v1/schedules", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = await api.post("/v1/schedules", json={"cron": "* * * * *", "message": MSG})
    assert r.status_code == 422 and r.json()["field"] == "name"


# -- the scheduler --------------------------------------------------------------------------


@dataclass
class Replica:
    client: Redis
    queue: Queue
    store: ScheduleStore
    scheduler: Scheduler


@asynccontextmanager
async def replica(
    url: str,
    instance: str,
    clock: FakeClock,
    *,
    run: bool = True,
    settings: SchedulerSettings = FAST,
    ingest: IngestSettings | None = None,
) -> AsyncIterator[Replica]:
    """One engine replica's share of the work: its own connection, queue and scheduler."""
    async with open_redis(url) as client, trio.open_nursery() as nursery:
        queue = Queue(client, QueueSettings(), instance, ingest=ingest, clock=clock)
        store = ScheduleStore(client, queue.keys, clock=clock)
        scheduler = Scheduler(store, queue, settings, clock=clock)
        await nursery.start(queue.serve)
        if run:
            await nursery.start(scheduler.serve)
        yield Replica(client, queue, store, scheduler)
        nursery.cancel_scope.cancel()


async def queued_ids(redis: Redis) -> list[str]:
    return [x.decode() for x in await redis.lrange(Keys().ready(), 0, -1)]


async def fired(store: ScheduleStore, name: str) -> tuple[int, int]:
    s = await store.get(name)
    assert s is not None
    return s.fired, s.skipped


def minute_ticks(first: int, last: int) -> list[int]:
    return [T0 + 30_000 + i * MINUTE for i in range(first, last + 1)]


async def test_two_replicas_fire_each_tick_exactly_once(
    redis_server: RedisServer, redis: Redis
) -> None:
    clock = FakeClock(T0)
    async with (
        replica(redis_server.url, "a", clock) as a,
        replica(redis_server.url, "b", clock) as b,
    ):
        await a.store.put("s", "* * * * *", "UTC", MSG_JSON)
        for i in range(1, 9):
            clock.ms += MINUTE
            await wait_until(_fired_is, a.store, i)
            await trio.sleep(0.02)  # let the other replica see the tick too
        sa, sb = a.scheduler.statistics(), b.scheduler.statistics()
    expected = [tick_job_id("s", 1, t) for t in minute_ticks(0, 7)]
    # One job per tick, each queued once, though both replicas looked for every tick.
    assert await queued_ids(redis) == expected
    assert int(await redis.hget(Keys().stats, "enqueued") or 0) == 8
    assert sa.fired + sb.fired == 8 and sa.passes > 8 and sb.passes > 8
    assert (sa.errors, sb.errors) == (0, 0)
    s = await ScheduleStore(redis, Keys()).get("s")
    assert s is not None and (s.fired, s.skipped, s.last_job_id) == (8, 0, expected[-1])
    assert s.next_tick_ms == minute_ticks(8, 8)[0]
    # The jobs carry the schedule's message.
    raw = await redis.hget(Keys().job(expected[0]), "msg")
    assert raw is not None
    msg = msgspec.msgpack.decode(raw, type=Message)
    assert (msg.to, msg.subject, msg.sender) == (
        ["ann@example.com"],
        "Daily digest",
        "engine@localhost",
    )


async def _fired_is(store: ScheduleStore, n: int) -> bool:
    return (await fired(store, "s"))[0] >= n


async def test_racing_replicas_and_a_crash_before_advance_enqueue_one_job(
    redis_server: RedisServer, redis: Redis
) -> None:
    clock = FakeClock(T0)
    async with (
        replica(redis_server.url, "a", clock, run=False) as a,
        replica(redis_server.url, "b", clock, run=False) as b,
    ):
        await a.store.put("s", "* * * * *", "UTC", MSG_JSON)
        clock.ms += MINUTE
        # Both replicas run the same pass at the same instant.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.scheduler.fire_due)
            nursery.start_soon(b.scheduler.fire_due)
        assert a.scheduler.statistics().fired + b.scheduler.statistics().fired == 1
        # Replica a "crashes" after enqueueing the next tick, before recording it:
        # replica b enqueues the same id (a no-op) and records the tick.
        clock.ms += MINUTE
        (s,) = await a.store.due(clock.ms, 10)
        assert s.next_tick_ms is not None
        job = build_tick_job(s, s.next_tick_ms, default_from="x@example.com")
        await a.queue.enqueue([job])
        assert await b.scheduler.fire_due() == 1
    assert await queued_ids(redis) == [tick_job_id("s", 1, t) for t in minute_ticks(0, 1)]
    assert int(await redis.hget(Keys().stats, "enqueued") or 0) == 2
    assert await fired(ScheduleStore(redis, Keys()), "s") == (2, 0)


async def test_restarts_catch_up_within_grace_and_skip_beyond(
    redis_server: RedisServer, redis: Redis
) -> None:
    clock = FakeClock(T0)
    async with replica(redis_server.url, "a", clock) as a:
        await a.store.put("s", "* * * * *", "UTC", MSG_JSON)
        clock.ms += 40_000  # 00:01:10: the 00:01 tick
        await wait_until(_fired_is, a.store, 1)
    # Every replica down for three minutes (< grace): all missed ticks are sent.
    clock.ms += 3 * MINUTE  # 00:04:10
    async with replica(redis_server.url, "b", clock) as b:
        await wait_until(_fired_is, b.store, 4)
        assert await fired(b.store, "s") == (4, 0)
    # Down for eleven minutes (> grace): ticks older than 300 s are skipped, not sent.
    clock.ms += 11 * MINUTE + 20_000  # 00:15:30; due: 00:05; stale: before 00:10:30
    async with replica(redis_server.url, "c", clock) as c:
        await wait_until(_fired_is, c.store, 9)
        assert await fired(c.store, "s") == (9, 6)
        assert c.scheduler.statistics().skipped == 6
    sent = [*minute_ticks(0, 3), *minute_ticks(10, 14)]  # 00:01-00:04, 00:11-00:15
    assert await queued_ids(redis) == [tick_job_id("s", 1, t) for t in sent]


async def test_replacing_a_schedule_starts_a_new_version(
    redis_server: RedisServer, redis: Redis
) -> None:
    clock = FakeClock(T0)
    async with replica(redis_server.url, "a", clock, run=False) as a:
        await a.store.put("s", "* * * * *", "UTC", MSG_JSON)
        clock.ms += MINUTE
        assert await a.scheduler.fire_due() == 1
        _, s = await a.store.put("s", "*/2 * * * *", "UTC", MSG_JSON)
        assert s.version == 2 and s.next_tick_ms == T0 + 90_000  # 00:02
        assert await a.scheduler.fire_due() == 0  # 00:01:30: nothing due again
        clock.ms += MINUTE
        assert await a.scheduler.fire_due() == 1
    assert await queued_ids(redis) == [
        tick_job_id("s", 1, T0 + 30_000), tick_job_id("s", 2, T0 + 90_000),
    ]  # fmt: skip


async def test_an_unsendable_stored_message_is_skipped_not_retried_forever(
    redis_server: RedisServer, redis: Redis
) -> None:
    clock = FakeClock(T0)
    async with replica(redis_server.url, "a", clock, run=False) as a:
        await a.store.put("s", "* * * * *", "UTC", '{"to": "not an address"}')
        clock.ms += MINUTE
        assert await a.scheduler.fire_due() == 0
        assert await fired(a.store, "s") == (0, 1)
        s = await a.store.get("s")
        assert s is not None and s.next_tick_ms == T0 + 90_000
    assert await queued_ids(redis) == []


async def test_a_full_backlog_delays_the_tick_until_there_is_room(
    redis_server: RedisServer, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(T0)
    ingest = IngestSettings(max_backlog=1)
    async with replica(redis_server.url, "a", clock, run=False, ingest=ingest) as a:
        await a.queue.enqueue([_job("0" * 32)])  # the backlog is now full
        await a.store.put("s", "* * * * *", "UTC", MSG_JSON)
        clock.ms += MINUTE
        with caplog.at_level(logging.WARNING, "engine.scheduler"):
            assert await a.scheduler.fire_due() == 0
            assert await a.scheduler.fire_due() == 0
        assert [r.message for r in caplog.records].count(
            "scheduler.enqueue.refused schedule=s outcome=backlog value=1"
        ) == 1
        assert await fired(a.store, "s") == (0, 0)
        assert [j.id for j in await a.queue.claim(1)] == ["0" * 32]
        assert await a.scheduler.fire_due() == 1
    assert await queued_ids(redis) == [tick_job_id("s", 1, T0 + 30_000)]


def _job(job_id: str) -> NewJob:
    return NewJob(job_id, b"payload")


async def test_redis_outage_is_logged_once_and_no_tick_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        clock = FakeClock(T0)
        with caplog.at_level(logging.INFO, "engine.scheduler"):
            async with replica(server.url, "a", clock) as a:
                await a.store.put("s", "* * * * *", "UTC", MSG_JSON)
                clock.ms += MINUTE
                await wait_until(_fired_is, a.store, 1)
                server.stop()
                clock.ms += MINUTE
                await wait_until(_stat, a.scheduler, "errors", 5)
                server.start()
                await wait_until(_stat, a.scheduler, "fired", 2)
        messages = [r.message for r in caplog.records]
        assert sum(m.startswith("scheduler.pass.failed") for m in messages) == 1
        assert messages.count("scheduler.recovered") == 1
        async with open_redis(server.url) as r:
            assert await queued_ids(r) == [tick_job_id("s", 1, t) for t in minute_ticks(0, 1)]
    finally:
        server.close()


async def _stat(scheduler: Scheduler, name: str, at_least: int) -> bool:
    return bool(getattr(scheduler.statistics(), name) >= at_least)
