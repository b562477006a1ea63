"""Flow control through the HTTP API of a real engine (in-process, real Redis, real TCP):
validation of the new fields, scheduled sends and cancel, 429/503 back-pressure with
their headers, GET /v1/limits, and a 421 slowing a domain down."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from engine.config import load_settings
from engine.embedded import RedisServer, free_port
from engine.errors import TemporaryFailure
from engine.queue import open_redis
from engine.service import Running
from engine.transport.base import OutgoingMail
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

MSG = {"to": "ann@example.com", "subject": "Hello", "text": "Hi Ann"}


@dataclass
class Engine:
    client: httpx.AsyncClient
    running: Running
    transport: MemoryTransport


@asynccontextmanager
async def engine(
    redis_server: RedisServer,
    overrides: dict[str, Any] | None = None,
    fail: Callable[[OutgoingMail], TemporaryFailure | None] | None = None,
) -> AsyncIterator[Engine]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    overrides = dict(overrides or {})
    overrides["http"] = {**overrides.get("http", {}), "bind": bind}
    settings = load_settings(environ={}, overrides=overrides)
    transport = MemoryTransport(fail=fail)
    headers = AUTH if settings.auth.enabled else {}
    async with (
        inprocess_engine(settings, redis_server.url, transport) as running,
        httpx.AsyncClient(base_url=f"http://{bind}", headers=headers, timeout=10) as client,
    ):
        yield Engine(client, running, transport)


async def _key(client: httpx.AsyncClient, name: str, *, x_api_key: bool = False) -> dict[str, str]:
    """Headers presenting a new send-only API key of tenant t1 (made with the admin key)."""
    r = await client.post("/v1/keys", json={"name": name, "scopes": ["send"], "tenant": "t1"})
    assert r.status_code == 201, r.text
    key = r.json()["key"]
    return {"X-API-Key": key} if x_api_key else {"Authorization": f"Bearer {key}"}


async def _state(client: httpx.AsyncClient, job_id: str, state: str) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            body: dict[str, Any] = (await client.get(f"/v1/messages/{job_id}")).json()
            if body["state"] == state:
                return body
            await trio.sleep(0.02)


async def test_flow_fields_are_validated_by_name(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        bad = [
            ({"priority": "urgent"}, "priority"),
            ({"priority": 11}, "priority"),
            ({"send_at": "tomorrow"}, "send_at"),
            ({"send_at": "2026-11-22T10:00:00"}, "send_at"),  # no offset
            ({"send_at": "2026-11-22T10:00:00Z", "delay_s": 5}, "send_at"),
            ({"delay_s": -1}, "delay_s"),
            ({"send_at": "2999-01-01T00:00:00Z"}, "send_at"),
            ({"tenant": "no spaces please"}, "tenant"),
        ]
        for extra, field in bad:
            r = await e.client.post("/v1/messages", json={**MSG, **extra})
            assert r.status_code == 422, (extra, r.text)
            assert r.json()["field"] == field, (extra, r.json())
        r = await e.client.post(
            "/v1/messages/batch", json={"messages": [MSG, {**MSG, "priority": 0}]}
        )
        assert r.status_code == 422 and r.json()["field"] == "messages[1].priority"


async def test_priority_and_tenant_are_kept(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        r = await e.client.post("/v1/messages", json={**MSG, "priority": 9, "tenant": "acme"})
        assert r.status_code == 202
        body = await _state(e.client, r.json()["id"], "sent")
        assert body["priority"] == "high" and body["tenant"] == "acme"
        # Without a tenant field, a message is the tenant's of the key that sent it.
        r = await e.client.post("/v1/messages", json=MSG, headers=await _key(e.client, "t1"))
        assert r.status_code == 202, r.text
        body = await _state(e.client, r.json()["id"], "sent")
        assert body["tenant"] == "t1"
        r = await e.client.post("/v1/messages", json=MSG)  # the admin key's own: "default"
        assert (await _state(e.client, r.json()["id"], "sent"))["tenant"] == "default"


async def test_scheduled_message_can_be_cancelled(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        r = await e.client.post("/v1/messages", json={**MSG, "delay_s": 3600})
        assert r.status_code == 202 and r.json()["state"] == "scheduled"
        job_id = r.json()["id"]
        body = (await e.client.get(f"/v1/messages/{job_id}")).json()
        assert body["state"] == "scheduled" and body["next_attempt_at"]
        r = await e.client.delete(f"/v1/messages/{job_id}")
        assert r.status_code == 200 and r.json() == {"id": job_id, "state": "cancelled"}
        assert (await e.client.delete(f"/v1/messages/{job_id}")).status_code == 200
        assert (await e.client.get(f"/v1/messages/{job_id}")).json()["state"] == "cancelled"
        r = await e.client.delete("/v1/messages/" + "0" * 32)
        assert r.status_code == 404
        sent = (await e.client.post("/v1/messages", json=MSG)).json()["id"]
        await _state(e.client, sent, "sent")
        r = await e.client.delete(f"/v1/messages/{sent}")
        assert r.status_code == 409 and "sent" in r.json()["detail"]
        assert len(e.transport.sent) == 1


async def test_send_at_in_the_near_future_is_sent_on_time(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        due = trio.current_time()
        when = e.running.queue.now_ms() + 1500
        from engine.models import ms_to_iso

        r = await e.client.post("/v1/messages", json={**MSG, "send_at": ms_to_iso(when)})
        assert r.status_code == 202
        await _state(e.client, r.json()["id"], "sent")
        took = trio.current_time() - due
        assert 1.2 <= took <= 3.5, took  # promoted by the reaper (every 0.5 s)


async def test_client_rate_limit_answers_429_with_headers(redis_server: RedisServer) -> None:
    overrides = {"ingest": {"client_rate_per_s": 2, "client_burst": 3}}
    async with engine(redis_server, overrides) as e:
        key, k3 = await _key(e.client, "k1"), await _key(e.client, "k3")
        k2 = await _key(e.client, "k2", x_api_key=True)  # either header names the key
        for left in (2, 1, 0):
            r = await e.client.post("/v1/messages", json=MSG, headers=key)
            assert r.status_code == 202
            assert r.headers["ratelimit-limit"] == "3"
            assert r.headers["ratelimit-remaining"] == str(left)
        r = await e.client.post("/v1/messages", json=MSG, headers=key)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1" and r.headers["ratelimit-remaining"] == "0"
        assert r.json()["type"].endswith("rate-limited")
        other = await e.client.post("/v1/messages", json=MSG, headers=k2)
        assert other.status_code == 202
        batch = {"messages": [MSG] * 4}  # a batch counts per message: over the burst
        r = await e.client.post("/v1/messages/batch", json=batch, headers=k3)
        assert r.status_code == 429 and r.json()["field"] == "messages"


async def test_full_backlog_answers_503_with_retry_after(redis_server: RedisServer) -> None:
    overrides = {"role": "api", "ingest": {"max_backlog": 5}}
    async with engine(redis_server, overrides) as e:
        r = await e.client.post("/v1/messages/batch", json={"messages": [MSG] * 5})
        assert r.status_code == 202
        r = await e.client.post("/v1/messages", json=MSG)
        assert r.status_code == 503
        assert r.json()["type"].endswith("backlog-full")
        assert int(r.headers["retry-after"]) >= 1


async def test_421_slows_the_domain_down_and_limits_show_it(redis_server: RedisServer) -> None:
    refusals = [0]

    def fail(mail: OutgoingMail) -> TemporaryFailure | None:
        if mail.recipients[0].endswith("@busy.test") and refusals[0] < 1:
            refusals[0] += 1
            return TemporaryFailure("421 4.7.0 slow down", code=421)
        return None

    overrides = {
        "limits": {"domains": {"busy.test": 50}, "recovery_per_s": 0.001},
        "queue": {"backoff_base_s": 0.1},
    }
    async with engine(redis_server, overrides, fail) as e:
        r = await e.client.post("/v1/messages", json={**MSG, "to": "bob@busy.test"})
        await _state(e.client, r.json()["id"], "sent")
        limits = (await e.client.get("/v1/limits")).json()
        assert limits["configured"] is True
        (busy,) = [b for b in limits["buckets"] if b["name"] == "domain:busy.test"]
        assert busy["limit_per_s"] == 50 and busy["slowed"] is True
        assert 25 <= busy["rate_per_s"] < 26


async def test_senders_keep_to_a_domain_limit(redis_server: RedisServer) -> None:
    times: list[float] = []

    def record(mail: OutgoingMail) -> None:
        if mail.recipients[0].endswith("@capped.test"):
            times.append(trio.current_time())

    overrides = {"limits": {"domains": {"capped.test": 20}, "burst_s": 0.05}}
    async with engine(redis_server, overrides, record) as e:  # type: ignore[arg-type]
        batch = {"messages": [{**MSG, "to": f"u{i}@capped.test"} for i in range(40)]}
        batch["messages"] += [{**MSG, "to": f"u{i}@free.test"} for i in range(40)]
        r = await e.client.post("/v1/messages/batch", json=batch)
        assert r.status_code == 202
        with trio.fail_after(10):
            await e.transport.wait_sent(80)
    times.sort()
    assert len(times) == 40
    # 20/s, burst 1: slots 50 ms apart, so 40 sends take ~2 s. A sender that wakes late
    # (a loaded machine) sends its overdue slots back to back, so a 1 s window may hold
    # a few more than 21 -- but never the unthrottled 40.
    assert max(sum(1 for t in times if s <= t < s + 1) for s in times) <= 26
    assert times[-1] - times[0] >= 1.8


async def test_schedules_are_served_by_the_engine(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        body = {"name": "digest", "cron": "0 8 * * 1-5", "timezone": "Europe/Berlin",
                "message": {**MSG, "priority": "low"}}  # fmt: skip
        r = await e.client.post("/v1/schedules", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["next_tick"].endswith("Z")
        assert (await e.client.get("/v1/schedules/digest")).json()["cron"] == "0 8 * * 1-5"
        r = await e.client.post("/v1/schedules", json={**body, "cron": "61 * * * *"})
        assert r.status_code == 422 and r.json()["field"] == "cron"
        assert (await e.client.delete("/v1/schedules/digest")).status_code == 204
        assert (await e.client.get("/v1/schedules")).json() == {"items": []}


async def test_high_priority_overtakes_a_20k_low_backlog(redis_server: RedisServer) -> None:
    async with engine(redis_server, {"http": {"max_body_bytes": 10_000_000}}) as e:
        low = {"messages": [{**MSG, "priority": "low"}] * 1000}
        for _ in range(20):
            assert (await e.client.post("/v1/messages/batch", json=low)).status_code == 202
        before = len(e.transport.sent)
        r = await e.client.post("/v1/messages", json={**MSG, "priority": "high"})
        urgent = r.json()["id"]
        await _state(e.client, urgent, "sent")
        order = [m.job_id for m in e.transport.sent]
        at = order.index(urgent)
        assert before < 19_000, "the backlog was gone before the test could use it"
        # Only what the 16 senders had already claimed (at most 16 x 32) went first.
        assert at - before <= 16 * 32 + 32, (before, at)


async def test_one_tenants_blast_does_not_hold_up_another(redis_server: RedisServer) -> None:
    async with engine(redis_server, {"http": {"max_body_bytes": 10_000_000}}) as e:
        blast = {"messages": [{**MSG, "tenant": "blaster"}] * 1000}
        for _ in range(20):
            assert (await e.client.post("/v1/messages/batch", json=blast)).status_code == 202
        before = len(e.transport.sent)
        r = await e.client.post("/v1/messages", json={**MSG, "tenant": "quiet"})
        other = r.json()["id"]
        await _state(e.client, other, "sent")
        at = [m.job_id for m in e.transport.sent].index(other)
        assert before < 19_000, "the blast was gone before the test could use it"
        # Same lane, tenants take turns: it waits for what was claimed, not the blast.
        assert at - before <= 16 * 32 + 32, (before, at)


def test_identify_uses_forwarded_for_only_behind_trusted_proxies() -> None:
    from engine.api.exchange import Request
    from engine.api.ingest import identify

    async def nothing() -> dict[str, Any]:
        return {}

    def scope(peer: str, *headers: tuple[bytes, bytes]) -> Request:
        return Request({"client": (peer, 5000), "headers": list(headers)}, nothing, {})

    lb = frozenset({"10.0.0.1", "10.0.0.2"})
    xff = (b"x-forwarded-for", b"6.6.6.6, 1.2.3.4, 10.0.0.2")
    assert identify(scope("10.0.0.1", xff), lb) == ("ip-1.2.3.4", "default")
    # Not from a trusted proxy: the header is the client's word, not trusted.
    assert identify(scope("9.9.9.9", xff), lb) == ("ip-9.9.9.9", "default")
    assert identify(scope("10.0.0.1"), lb) == ("ip-10.0.0.1", "default")
    key, tenant = identify(scope("10.0.0.1", (b"authorization", b"Bearer s3cret"), xff), lb)
    assert key == tenant and key.startswith("key-") and "s3cret" not in key


async def test_client_limit_behind_a_trusted_proxy(redis_server: RedisServer) -> None:
    # A request without a key is told apart by its address: with auth off (an authenticated
    # one is its key's, whatever the proxy says).
    overrides = {
        "ingest": {"client_rate_per_s": 1, "client_burst": 1, "trusted_proxies": ["127.0.0.1"]},
        "auth": {"enabled": False},
    }
    async with engine(redis_server, overrides) as e:
        ann = {"X-Forwarded-For": "1.1.1.1"}
        bob = {"X-Forwarded-For": "2.2.2.2"}
        assert (await e.client.post("/v1/messages", json=MSG, headers=ann)).status_code == 202
        assert (await e.client.post("/v1/messages", json=MSG, headers=ann)).status_code == 429
        assert (await e.client.post("/v1/messages", json=MSG, headers=bob)).status_code == 202
