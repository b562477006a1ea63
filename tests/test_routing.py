"""Routing and failover (issue 16): which transport a message takes (rules, then the
default order), and mail moving to the next transport while the first one's breaker is
open -- opened by it being down or by temporary failures in a row -- and back once a
probe goes through. Real Redis (breakers are shared there), in-memory transports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
import trio

from engine.config import (
    QueueSettings,
    RateLimitSettings,
    RouteRule,
    RoutingSettings,
    SenderSettings,
    load_settings,
)
from engine.errors import ConfigError, PermanentFailure, TemporaryFailure, TransportUnavailable
from engine.ids import new_ids
from engine.metrics import Metrics
from engine.models import Message
from engine.policy import route_order
from engine.queue import Breaker, NewJob, Queue, RateLimits, Redis
from engine.sender import Route, Router, SenderPool, TransportGate
from engine.transport.base import OutgoingMail
from engine.transport.memory import MemoryTransport

RULES = [
    RouteRule(order=["ses"], tenant="acme"),
    RouteRule(order=["postmark", "smtp"], tag="receipts"),
    RouteRule(order=["mailgun"], domain="gmail.com"),
]


@pytest.mark.parametrize(
    ("tenant", "tags", "domains", "expected"),
    [
        ("default", [], ["example.com"], ["resend", "smtp"]),  # no rule: the default
        ("acme", ["receipts"], ["gmail.com"], ["ses"]),  # the first rule that matches wins
        ("other", ["x", "receipts"], ["gmail.com"], ["postmark", "smtp"]),
        ("other", [], ["example.com", "GMAIL.com"], ["mailgun"]),  # any recipient's domain
    ],
)
def test_a_message_takes_the_first_matching_rules_order(
    tenant: str, tags: list[str], domains: list[str], expected: list[str]
) -> None:
    got = route_order(["resend", "smtp"], RULES, tenant=tenant, tags=tags, domains=domains)
    assert list(got) == expected


def test_every_name_routing_uses_must_be_a_transport() -> None:
    with pytest.raises(ConfigError, match=r"'resend'.*routing\.transports"):
        load_settings(environ={}, overrides={"routing": {"order": ["resend", "smtp"]}})
    good = load_settings(environ={}, overrides={"routing": {
        "transports": {"resend": "resend://re_key@", "postmark": "postmark://t@"},
        "order": ["resend", "smtp"], "rules": [{"order": ["postmark", "smtp"], "tag": "r"}],
    }})  # fmt: skip
    assert good.routing.names() == ["resend", "smtp", "postmark"]


def _payload(to: str, tags: list[str] | None = None) -> bytes:
    msg = Message("e@localhost", [to], [], [], "Subject", "body", None, [], [], tags or [])
    return msgspec.msgpack.encode(msg)


@pytest.fixture
async def q(redis: Redis) -> AsyncIterator[Queue]:
    queue = Queue(redis, QueueSettings(lease_s=5, heartbeat_s=1, max_attempts=10,
                                       backoff_base_s=0.01, backoff_max_s=0.02), "r1")  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.serve)
        yield queue
        nursery.cancel_scope.cancel()


def _pool(q: Queue, transports: dict[str, MemoryTransport], routing: RoutingSettings) -> SenderPool:
    settings = SenderSettings(senders=4, claim_batch=5, breaker_probe_s=0.05,
                              breaker_probe_max_s=0.2)  # fmt: skip
    metrics = Metrics().sender
    routes = {
        name: Route(name, t, TransportGate(_breaker(q, name), q, metrics))
        for name, t in transports.items()
    }
    return SenderPool(q, None, settings, q.settings, router=Router(routes, routing, q))


def _breaker(q: Queue, name: str) -> Breaker:
    return Breaker(q.client, q.keys, name, first_wait_s=0.05, max_wait_s=0.2)


async def _enqueue(q: Queue, n: int, tenant: str = "default") -> list[str]:
    ids = new_ids(n)
    await q.enqueue([NewJob(i, _payload(f"u{k}@example.com"), tenant=tenant)
                     for k, i in enumerate(ids)])  # fmt: skip
    return ids


async def _all_sent(q: Queue, ids: list[str]) -> None:
    recs = []
    with trio.move_on_after(15):
        while True:
            recs = await q.get_many(ids)
            if all(r is not None and r.state == "sent" for r in recs):
                return
            await q.reap()  # the reaper's job (due retries back to ready), done by hand
            await trio.sleep(0.02)
    raise AssertionError(f"not all sent: {[(r.state, r.attempts) for r in recs if r]}")


async def test_failing_primary_fails_over_and_comes_back_after_a_probe(q: Queue) -> None:
    # The primary answers 503 to everything: after trip_after_failures in a row its
    # breaker opens (for every replica), its mail goes to the secondary, and nothing is
    # lost; once it works again a probe closes the breaker and mail goes back to it.
    failing = [True]

    def outage(mail: OutgoingMail) -> TemporaryFailure | None:
        return TemporaryFailure("HTTP 503: provider unavailable") if failing[0] else None

    primary, secondary = MemoryTransport(fail=outage), MemoryTransport()
    routing = RoutingSettings(order=["primary", "secondary"], trip_after_failures=3)
    pool = _pool(q, {"primary": primary, "secondary": secondary}, routing)
    breaker = pool.router.routes["primary"].gate.breaker
    ids = await _enqueue(q, 40)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        await _all_sent(q, ids)
        state = await breaker.state()
        assert state is not None and "HTTP 503" in state.reason
        assert len(secondary.sent) == 40 and not primary.sent  # all of it, at the secondary
        # Only the batches in flight when it tripped (4 senders x 5) and probes reached
        # the failing primary, not every message.
        assert len(primary.attempts) < 30, len(primary.attempts)
        failing[0] = False
        # Under load again: one of these messages tests the primary (its breaker is due
        # a probe), it goes through, the breaker closes and the rest go back to it.
        more: list[str] = []
        with trio.fail_after(10):
            while await breaker.state() is not None:
                more += await _enqueue(q, 2)  # a trickle: whichever is there when it is due
                await trio.sleep(0.05)
        await _all_sent(q, more)
        last = await _enqueue(q, 10)
        await _all_sent(q, last)
        assert {m.job_id for m in primary.sent} >= set(last)
        pool.stop_claiming()


async def test_a_down_primary_fails_over_at_once_and_costs_no_attempt(q: Queue) -> None:
    primary = MemoryTransport(fail=lambda m: TransportUnavailable("connect: refused"))
    secondary = MemoryTransport()
    pool = _pool(q, {"primary": primary, "secondary": secondary},
                 RoutingSettings(order=["primary", "secondary"]))  # fmt: skip
    ids = await _enqueue(q, 20)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        await _all_sent(q, ids)
        pool.stop_claiming()
    recs = await q.get_many(ids)
    assert all(r is not None and r.attempts == 1 for r in recs)  # the refusals cost none
    assert len(secondary.sent) == 20


async def test_permanent_failures_never_fail_over(q: Queue) -> None:
    primary = MemoryTransport(fail=lambda m: PermanentFailure("HTTP 422: invalid to"))
    secondary = MemoryTransport()
    routing = RoutingSettings(order=["primary", "secondary"], trip_after_failures=2)
    pool = _pool(q, {"primary": primary, "secondary": secondary}, routing)
    ids = await _enqueue(q, 6)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        with trio.fail_after(10):
            while not all(r is not None and r.state == "failed" for r in await q.get_many(ids)):
                await trio.sleep(0.02)
        pool.stop_claiming()
    assert not secondary.attempts
    assert await pool.router.routes["primary"].gate.breaker.state() is None


async def test_rules_route_a_tenants_mail_and_every_transport_down_holds_it(q: Queue) -> None:
    a, b = MemoryTransport(), MemoryTransport(fail=lambda m: TransportUnavailable("down"))
    routing = RoutingSettings(order=["a"], rules=[RouteRule(order=["b"], tenant="acme")])
    pool = _pool(q, {"a": a, "b": b}, routing)
    plain = await _enqueue(q, 5)
    acme = await _enqueue(q, 5, tenant="acme")
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        await _all_sent(q, plain)
        with trio.fail_after(10):
            while await pool.router.routes["b"].gate.breaker.state() is None:
                await trio.sleep(0.02)
        await trio.sleep(0.2)
        pool.stop_claiming()
    assert {m.job_id for m in a.sent} == set(plain), "acme's mail never goes to a"
    recs = await q.get_many(acme)
    # Its only transport is down: waiting, not failed, no attempt spent.
    states = [(r.state, r.attempts) if r else None for r in recs]
    assert all(s == ("queued", 0) for s in states), states


async def test_a_transports_rate_holds_and_its_429_halves_it(q: Queue) -> None:
    # routing.rates: 20 messages/s through "a" across replicas (a bucket in Redis, burst
    # 10): 30 messages take about a second. A provider's 429 halves that bucket.
    limits = RateLimits(q.client, q.keys, RateLimitSettings(), {"a": 20.0})
    await limits.publish()
    a = MemoryTransport()
    settings = SenderSettings(senders=4, claim_batch=10)
    gate = TransportGate(_breaker(q, "a"), q, Metrics().sender)
    router = Router({"a": Route("a", a, gate)}, RoutingSettings(order=["a"]), q)
    pool = SenderPool(q, None, settings, q.settings, limits, router=router)
    ids = await _enqueue(q, 30)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        await _all_sent(q, ids)
        took = trio.current_time() - start
        pool.stop_claiming()
    assert 0.8 <= took <= 5, took  # (30 - 10 burst) / 20 per s = 1 s
    assert "transport:a" in {b.name for b in await limits.state()}
    # A 429 from the provider: the bucket's rate halves (once per cooldown).
    limited = TemporaryFailure("resend: 429 rate_limit_exceeded", retry_after_s=0.05)
    limited.http_status = 429
    a.script(limited)
    more = await _enqueue(q, 1)
    pool = SenderPool(q, None, settings, q.settings, limits, router=router)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        with trio.fail_after(10):
            while not (rates := {b.name: b.rate_per_s for b in await limits.state()}) or (
                rates.get("transport:a", 20.0) >= 20.0
            ):
                await trio.sleep(0.02)
        await _all_sent(q, more)
        pool.stop_claiming()
    assert rates["transport:a"] < 20.0
