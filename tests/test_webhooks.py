"""Webhooks against real receivers over TCP: endpoints through the API (secret shown
once, per tenant), deliveries signed per Standard Webhooks (checked with the reference
verifier), filters, retries with backoff, 410 and the retry window disabling an endpoint,
attempts listed, replay, SSRF refusals, and at-least-once across a dispatcher's crash."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
import trio
from standardwebhooks.webhooks import Webhook

from engine.config import Settings, load_settings
from engine.embedded import RedisServer, free_port
from engine.keys import Keys
from engine.queue import RespConnection, WebhookStore, open_redis
from engine.transport.memory import MemoryTransport
from engine.webhooks import Endpoint, sign
from engine.webhooks.target import Refused, check_address, forbidden, parse_url
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine
from fixtures.receiver import Receiver, webhook_receiver

MSG = {"to": "ann@example.com", "subject": "Hi", "text": "Hello"}


def _settings(bind: str, **hooks: Any) -> Settings:
    webhooks = {"allow": ["127.0.0.1/32"], "first_retry_s": 0.2, "max_retry_s": 0.5, **hooks}
    return load_settings(environ={}, overrides={"http": {"bind": bind}, "webhooks": webhooks})


@pytest.fixture
async def env(redis_server: RedisServer) -> AsyncIterator[tuple[str, Receiver]]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    async with (
        webhook_receiver() as receiver,
        inprocess_engine(_settings(bind), redis_server.url, MemoryTransport()),
    ):
        yield f"http://{bind}", receiver


async def _until(what: str, check: Callable[[], bool], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.02)


def test_ssrf_rules_refuse_internal_addresses() -> None:
    for addr in ("127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "fd00::1",
                 "100.64.0.1", "0.0.0.0", "::ffff:127.0.0.1", "224.0.0.1"):  # fmt: skip
        assert forbidden(ipaddress.ip_address(addr)), addr
    assert forbidden(ipaddress.ip_address("93.184.216.34")) is None
    check_address(ipaddress.ip_address("10.1.2.3"), [ipaddress.ip_network("10.1.2.0/24")])
    with pytest.raises(Refused):
        check_address(ipaddress.ip_address("10.1.3.3"), [ipaddress.ip_network("10.1.2.0/24")])
    for url in ("ftp://x.org/", "http://user:pw@x.org/", "http:///nohost", "http://x.org:99999/"):
        with pytest.raises(Refused):
            parse_url(url)


def test_signatures_follow_standard_webhooks() -> None:
    secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"type":"message.sent"}'
    header = sign(secret, "msg_1", 1_700_000_000, body)
    verified = Webhook(secret)
    now = int(time.time())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(secret, "msg_1", now, body)}  # fmt: skip
    assert verified.verify(body, headers) == {"type": "message.sent"}
    assert header.startswith("v1,") and header != headers["webhook-signature"]


async def test_events_reach_the_endpoint_signed_and_filtered(env: tuple[str, Receiver]) -> None:
    base, receiver = env
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as c:
        r = await c.post("/v1/webhooks", json={"url": receiver.url, "events": ["sent"],
                                               "tags": ["billing"]})  # fmt: skip
        assert r.status_code == 201, r.text
        hook = r.json()
        secret = hook["secret"]
        assert secret.startswith("whsec_")
        listed = (await c.get("/v1/webhooks")).json()["items"]
        assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in json.dumps(listed)
        other = await c.post("/v1/messages", json={**MSG, "tags": ["marketing"]})
        mine = await c.post("/v1/messages", json={**MSG, "tags": ["billing"]})
        await _until("a delivery", lambda: len(receiver.requests) >= 1)
        await trio.sleep(0.5)  # nothing else is coming: the filters hold
        assert len(receiver.requests) == 1
        got = receiver.requests[0]
        event = Webhook(secret).verify(got.body, got.headers)  # raises if the signature is bad
        assert event["type"] == "message.sent" and event["data"]["id"] == mine.json()["id"]
        assert event["data"]["tags"] == ["billing"]
        assert got.headers["webhook-id"] == event["data"]["event_id"]
        assert other.json()["id"] != mine.json()["id"]
        attempts = (await c.get(f"/v1/webhooks/{hook['id']}/attempts")).json()["items"]
        assert attempts[0]["outcome"] == "delivered" and attempts[0]["status"] == 200
        metrics = (await c.get("/metrics")).text
        assert 'engine_webhook_requests_total{outcome="delivered"} 1.0' in metrics
        assert "engine_webhook_events_total 1.0" in metrics


async def test_a_failing_endpoint_is_retried_then_410_disables_it(
    env: tuple[str, Receiver],
) -> None:
    base, receiver = env
    receiver.status = 500
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as c:
        hook = (
            await c.post("/v1/webhooks", json={"url": receiver.url, "events": ["queued"]})
        ).json()
        await c.post("/v1/messages", json=MSG)
        await _until("three tries", lambda: len(receiver.requests) >= 3)
        ids = {r.headers["webhook-id"] for r in receiver.requests}
        assert len(ids) == 1  # the same event, again: receivers deduplicate on the id
        gaps = [b.at - a.at for a, b in zip(receiver.requests, receiver.requests[1:], strict=False)]
        assert all(g >= 0.09 for g in gaps), gaps  # backoff, not a hammering loop
        receiver.status = 200
        await _until_delivered(c, hook["id"])
        receiver.status = 410
        await c.post("/v1/messages", json=MSG)
        await _until_disabled(c, hook["id"])
        view = (await c.get(f"/v1/webhooks/{hook['id']}")).json()
        assert "410" in view["disabled_reason"]
        again = await c.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": True})
        assert again.json()["enabled"] and again.json()["disabled_reason"] == ""


async def _until_delivered(c: httpx.AsyncClient, hook_id: str) -> None:
    with trio.fail_after(10):
        while True:
            items = (await c.get(f"/v1/webhooks/{hook_id}/attempts")).json()["items"]
            if items and items[0]["outcome"] == "delivered":
                return
            await trio.sleep(0.05)


async def _until_disabled(c: httpx.AsyncClient, hook_id: str) -> None:
    with trio.fail_after(10):
        while (await c.get(f"/v1/webhooks/{hook_id}")).json()["enabled"]:
            await trio.sleep(0.05)


async def test_refused_urls_and_other_tenants(env: tuple[str, Receiver]) -> None:
    base, receiver = env
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as c:
        for url in ("http://169.254.169.254/latest/meta-data", "http://10.0.0.1/x",
                    "file:///etc/passwd"):  # fmt: skip
            r = await c.post("/v1/webhooks", json={"url": url})
            assert r.status_code == 422 and r.json()["field"] == "url", url
        made = await c.post("/v1/keys", json={"scopes": ["webhooks", "send"], "tenant": "acme"})
        acme = {"Authorization": f"Bearer {made.json()['key']}"}
        hook = (await c.post("/v1/webhooks", json={"url": receiver.url}, headers=acme)).json()
        assert hook["tenant"] == "acme"
        assert (await c.get(f"/v1/webhooks/{hook['id']}")).status_code == 200  # admin: all
        made = await c.post("/v1/keys", json={"scopes": ["webhooks"], "tenant": "zeta"})
        zeta = {"Authorization": f"Bearer {made.json()['key']}"}
        assert (await c.get(f"/v1/webhooks/{hook['id']}", headers=zeta)).status_code == 404
        # The default tenant's message is not acme's event.
        await c.post("/v1/messages", json=MSG)
        mine = await c.post("/v1/messages", json=MSG, headers=acme)
        await _until("acme's events", lambda: len(receiver.requests) >= 1)
        await trio.sleep(0.5)
        ids = {json.loads(r.body)["data"]["id"] for r in receiver.requests}
        assert ids == {mine.json()["id"]}


async def test_every_event_arrives_at_least_once_across_a_dispatcher_crash(
    redis_server: RedisServer,
) -> None:
    """One replica's dispatcher is cancelled mid-stream (its claimed deliveries and read
    entries in hand); another replica delivers everything after the lease."""
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    one, two = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    async with webhook_receiver() as receiver:
        receiver.delay_s = 0.05
        stop_one = trio.Event()
        async with trio.open_nursery() as nursery:

            async def first() -> None:
                async with inprocess_engine(
                    _settings(one, lease_s=1.0), redis_server.url, MemoryTransport(), stop_one
                ):
                    await stop_one.wait()

            nursery.start_soon(first)
            await trio.sleep(1.5)
            async with httpx.AsyncClient(base_url=f"http://{one}", headers=AUTH, timeout=10) as c:
                await c.post("/v1/webhooks", json={"url": receiver.url, "events": ["sent"]})
                await trio.sleep(1.1)  # the dispatchers' endpoint cache
                batch = {"messages": [{**MSG, "to": f"u{i}@example.com"} for i in range(200)]}
                ids = set((await c.post("/v1/messages/batch", json=batch)).json()["ids"])
            await _until("some deliveries", lambda: len(receiver.requests) >= 5)
            stop_one.set()  # the first replica goes away mid-delivery
        settings = _settings(two, lease_s=1.0)
        async with inprocess_engine(settings, redis_server.url, MemoryTransport()):

            def all_there() -> bool:
                return {json.loads(r.body)["data"]["id"] for r in receiver.requests} >= ids

            await _until("every sent event", all_there, timeout=30)
        seen = [json.loads(r.body)["data"]["event_id"] for r in receiver.requests]
        assert len(set(seen)) == 200


async def test_claims_are_leased_not_taken(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
        store = WebhookStore(r, Keys(), RespConnection(redis_server.url))
        await store.ensure_group()
        await store.ensure_group()  # a second replica finds it made: no error
        ep = Endpoint("wh_1", "default", "http://x.org/", "whsec_AAAA", "now")
        assert ep.enabled
        await store.fan_out([("wh_1|1-0", b"{}"), ("wh_1|2-0", b"{}")], [], now_ms=1000)
        await store.fan_out([("wh_1|1-0", b"{changed}")], [], now_ms=1000)  # a redo: no-op
        taken = await store.claim(2000, lease_ms=500, count=10)
        assert [o.member for o in taken] == ["wh_1|1-0", "wh_1|2-0"]
        assert taken[0].event == b"{}" and taken[0].first_ms == 1000
        assert await store.claim(2400, lease_ms=500, count=10) == []  # leased
        again = await store.claim(2600, lease_ms=500, count=10)  # the lease ran out
        assert len(again) == 2
        await store.retry("wh_1|1-0", due_ms=5000)
        await store.settle(["wh_1|2-0"])
        later = await store.claim(6000, lease_ms=500, count=10)
        assert [(o.member, o.attempts) for o in later] == [("wh_1|1-0", 1)]
        assert await store.owed() == 1
        # The group's lag: entries of the stream it has not read yet.
        await r.xadd(Keys().events, {"type": "queued", "at": 1, "id": "0" * 32})
        lag, pending = await store.lag()
        assert (lag, pending) == (1, 0)
        read = await store.read("c1", count=10, block_ms=10)
        assert len(read) == 1 and await store.lag() == (0, 1)  # read, not yet acknowledged
        # With no endpoint anywhere the group skips to the stream's end (nothing owed to
        # anyone is read or parsed); with one, it stays where it is.
        await r.xadd(Keys().events, {"type": "queued", "at": 1, "id": "1" * 32})
        assert (await store.lag())[0] == 1
        assert await store.idle() is True and (await store.lag())[0] in (0, None)
        await store.put_endpoint("wh_1", msgspec.json.encode(ep))
        assert await store.idle() is False
        await store.aclose()


async def test_batches_carry_many_events_in_one_signed_request(env: tuple[str, Receiver]) -> None:
    base, receiver = env
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as c:
        r = await c.post("/v1/webhooks", json={"url": receiver.url, "events": ["queued"],
                                               "batch_max": 50})  # fmt: skip
        assert r.status_code == 201 and r.json()["batch_max"] == 50
        secret = r.json()["secret"]
        bad = await c.post("/v1/webhooks", json={"url": receiver.url, "batch_max": 1001})
        assert bad.status_code == 422 and bad.json()["field"] == "batch_max"
        batch = {"messages": [{**MSG, "to": f"u{i}@example.com"} for i in range(120)]}
        ids = set((await c.post("/v1/messages/batch", json=batch)).json()["ids"])

        def events() -> list[dict[str, Any]]:
            return [e for r in receiver.requests for e in json.loads(r.body)]

        await _until("120 queued events", lambda: {e["data"]["id"] for e in events()} >= ids)
        assert len(receiver.requests) < 120  # batched, not one request per event
        for got in receiver.requests:
            assert got.headers["webhook-id"].startswith("batch_")
            Webhook(secret).verify(got.body, got.headers)


def test_batches_are_bounded_by_count_and_by_bytes() -> None:
    from engine.webhooks.dispatcher import _batches
    from engine.webhooks.endpoint import MAX_BATCH_BYTES

    small = [b"x" * 100] * 25
    assert [len(b) for b in _batches(small, 10, len)] == [10, 10, 5]
    big = MAX_BATCH_BYTES // 3
    mixed = [b"a" * big, b"b" * big, b"c" * big, b"d" * 10, b"e" * (MAX_BATCH_BYTES + 1)]
    runs = list(_batches(mixed, 1000, len))
    assert [len(r) for r in runs] == [3, 1, 1]  # an oversized event still goes, alone
    assert [item for run in runs for item in run] == mixed  # every item, in order


async def test_a_hanging_endpoint_does_not_delay_a_healthy_one(
    redis_server: RedisServer,
) -> None:
    """Events go straight to healthy endpoints; a first try that hangs is cut short
    (dispatcher._DIRECT_TIMEOUT_S) and owed, then delivered by a retry with the full
    timeout -- meanwhile the healthy endpoint gets every event at once."""
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    async with (
        webhook_receiver() as slow,
        webhook_receiver() as quick,
        inprocess_engine(_settings(bind, timeout_s=5.0), redis_server.url, MemoryTransport()),
    ):
        slow.delay_s = 3.0  # longer than a first try waits, shorter than a retry
        async with httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as c:
            for receiver in (slow, quick):
                r = await c.post("/v1/webhooks", json={"url": receiver.url, "events": ["queued"]})
                assert r.status_code == 201
            await trio.sleep(1.1)  # the dispatchers' endpoint cache
            started = time.monotonic()
            sent = [(await c.post("/v1/messages", json=MSG)).json()["id"] for _ in range(3)]

            def got(receiver: Receiver) -> set[str]:
                return {json.loads(q.body)["data"]["id"] for q in receiver.requests}

            await _until("the quick endpoint's events", lambda: got(quick) >= set(sent))
            assert time.monotonic() - started < 1.5  # not behind the slow one's 3 s
            hooks = (await c.get("/v1/webhooks")).json()["items"]
            slow_hook = next(h for h in hooks if h["url"] == slow.url)
            with trio.fail_after(20):  # the slow receiver logs a request when it arrives
                while True:
                    attempts = (await c.get(f"/v1/webhooks/{slow_hook['id']}/attempts")).json()[
                        "items"
                    ]
                    if sum(a["outcome"] == "delivered" for a in attempts) >= len(sent):
                        break
                    await trio.sleep(0.1)
            cut = [a for a in attempts if a["outcome"] == "retrying"]
            assert cut and all("no answer within 2 s" in a["response"] for a in cut), attempts
