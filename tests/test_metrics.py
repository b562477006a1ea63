"""GET /metrics of a real engine (in-process, real Redis, real TCP): sends by outcome,
latency histograms, ingest statuses and rejections, queue depth per state and lane."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from engine.config import load_settings
from engine.embedded import RedisServer, free_port
from engine.errors import PermanentFailure, TemporaryFailure, TransportError
from engine.ids import id_time_ms, new_id
from engine.metrics import INGEST_ROUTES, Metrics
from engine.queue import open_redis
from engine.transport.base import OutgoingMail
from engine.transport.memory import FailRule, MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

MSG = {"to": "ann@example.com", "subject": "Hello", "text": "Hi Ann"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@asynccontextmanager
async def _engine(
    redis_server: RedisServer, overrides: dict[str, Any], fail: FailRule | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, MemoryTransport]]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(environ={}, overrides={**overrides, "http": {"bind": bind}})
    transport = MemoryTransport(fail=fail)
    async with (
        inprocess_engine(settings, redis_server.url, transport),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        yield client, transport


async def _scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def _until(client: httpx.AsyncClient, name: str, value: float, **labels: str) -> Samples:
    with trio.fail_after(10):
        while True:
            samples = await _scrape(client)
            if samples.get((name, frozenset(labels.items()))) == value:
                return samples
            await trio.sleep(0.05)


async def test_sends_ingest_and_rejections_are_counted(redis_server: RedisServer) -> None:
    flaky_failed = [False]

    def fail(mail: OutgoingMail) -> TransportError | None:
        rcpt = mail.recipients[0]
        if rcpt.startswith("gone@"):
            return PermanentFailure("550 no such user", code=550)
        if rcpt.startswith("flaky@") and not flaky_failed[0]:
            flaky_failed[0] = True
            return TemporaryFailure("451 try later", code=451)
        return None

    overrides = {
        "queue": {"backoff_base_s": 0.01, "backoff_max_s": 0.02},
        "limits": {"domains": {"busy.test": 50}},  # a 451 from there halves its rate
        "ingest": {"client_rate_per_s": 1, "client_burst": 50},
    }
    async with _engine(redis_server, overrides, fail) as (client, transport):
        for to in ("a@example.com", "b@example.com", "gone@example.com", "flaky@busy.test"):
            r = await client.post("/v1/messages", json={**MSG, "to": to})
            assert r.status_code == 202, r.text
        r = await client.post("/v1/messages/batch", json={"messages": [MSG] * 2})
        assert r.status_code == 202
        r = await client.post("/v1/messages", json={**MSG, "priority": "urgent"})
        assert r.status_code == 422
        r = await client.post("/v1/messages/batch", json={"messages": [MSG] * 51})
        assert r.status_code == 429  # larger than the client's whole burst
        assert (await client.get(f"/v1/messages/{new_id()}")).status_code == 404
        assert (await client.request("PATCH", "/v1/messages")).status_code == 405

        s = await _until(client, "engine_sends_total", 5, outcome="sent")
        assert len(transport.sent) == 5
        assert _get(s, "engine_sends_total", outcome="retry") == 1
        assert _get(s, "engine_sends_total", outcome="dead") == 1
        assert _get(s, "engine_sends_total", outcome="released") == 0
        assert _get(s, "engine_rate_slowdowns_total") == 1
        assert _get(s, "engine_send_latency_seconds_count", attempt="first") == 4
        assert _get(s, "engine_send_latency_seconds_count", attempt="retry") == 1
        first_sum = _get(s, "engine_send_latency_seconds_sum", attempt="first")
        assert 0 < first_sum < 4 * 10

        def requests(route: str, method: str, status: str) -> float:
            name = "engine_ingest_request_duration_seconds_count"
            return _get(s, name, route=route, method=method, status=status)

        assert requests("/v1/messages", "POST", "202") == 4
        assert requests("/v1/messages/batch", "POST", "202") == 1
        assert requests("/v1/messages", "POST", "422") == 1
        assert requests("/v1/messages/batch", "POST", "429") == 1
        assert requests("/v1/messages/{id}", "GET", "404") == 1
        assert requests("/v1/messages", "other", "405") == 1
        bucket = "engine_ingest_request_duration_seconds_bucket"
        assert _get(s, bucket, route="/v1/messages", method="POST", status="202", le="+Inf") == 4
        assert _get(s, "engine_ingest_messages_total") == 6
        assert _get(s, "engine_ingest_rejected_total", reason="rate-limited") == 1
        assert _get(s, "engine_ingest_rejected_total", reason="backlog-full") == 0

        # Redis's view: one dead-lettered job, nothing left waiting.
        assert _get(s, "engine_queue_up") == 1
        assert _get(s, "engine_queue_jobs", state="dead") == 1
        assert _get(s, "engine_queue_jobs", state="ready") == 0
        assert _get(s, "engine_queue_sent_total") == 5
        assert _get(s, "engine_queue_failed_total") == 1
        assert _get(s, "engine_queue_instances") == 1
        assert _get(s, "engine_websocket_subscribers") == 0
        assert ("engine_reaped_jobs_total", frozenset({("outcome", "requeued")})) in s
        assert ("process_resident_memory_bytes", frozenset()) in s


async def test_queue_depth_per_state_and_lane(redis_server: RedisServer) -> None:
    # No senders: what is enqueued stays where it is.
    overrides = {"role": "api", "ingest": {"max_backlog": 5}}
    async with _engine(redis_server, overrides) as (client, _):
        for priority in ("high", "high", "low"):
            r = await client.post("/v1/messages", json={**MSG, "priority": priority})
            assert r.status_code == 202
        r = await client.post("/v1/messages", json={**MSG, "delay_s": 600})
        assert r.status_code == 202
        r = await client.post("/v1/messages/batch", json={"messages": [MSG] * 2})
        assert r.status_code == 503 and r.json()["type"].endswith("backlog-full")
        s = await _scrape(client)
        assert _get(s, "engine_queue_ready_jobs", lane="high") == 2
        assert _get(s, "engine_queue_ready_jobs", lane="normal") == 0
        assert _get(s, "engine_queue_ready_jobs", lane="low") == 1
        assert _get(s, "engine_queue_jobs", state="ready") == 3
        assert _get(s, "engine_queue_jobs", state="delayed") == 1
        assert _get(s, "engine_queue_jobs", state="processing") == 0
        assert _get(s, "engine_queue_enqueued_total") == 4
        assert _get(s, "engine_ingest_rejected_total", reason="backlog-full") == 1
        info = [k for k in s if k[0] == "engine_info"]
        assert len(info) == 1 and ("role", "api") in info[0][1]
        assert (await client.post("/metrics")).status_code == 405


async def test_a_sender_only_replica_serves_probes_and_metrics_only(
    redis_server: RedisServer,
) -> None:
    async with _engine(redis_server, {"role": "sender"}) as (client, _):
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["senders"] > 0
        s = await _scrape(client)
        info = [k for k in s if k[0] == "engine_info"]
        assert len(info) == 1 and ("role", "sender") in info[0][1]
        assert _get(s, "engine_queue_up") == 1
        for method, path in (("POST", "/v1/messages"), ("GET", "/v1/stats"), ("GET", "/")):
            r = await client.request(method, path, json=MSG)
            assert r.status_code == 404, (path, r.text)
            assert "role sender" in r.json()["detail"]


def test_without_the_queue_only_up_is_reported() -> None:
    text = Metrics().render(None).decode()
    assert "engine_queue_up 0.0" in text
    assert "engine_queue_jobs" not in text and "engine_queue_ready_jobs{" not in text


def test_labels_are_bounded() -> None:
    m = Metrics()
    for method in ("GET", "BREW", "PROPFIND"):
        m.ingest.observe(INGEST_ROUTES[0], method, 405, 0.001)
    text = m.render(None).decode()
    assert 'method="other"' in text and "BREW" not in text
    assert text.count('engine_ingest_request_duration_seconds_count{method="other"') == 1


def test_enqueue_time_is_read_from_the_id() -> None:
    assert id_time_ms(new_id(now_ms=1_700_000_000_123)) == 1_700_000_000_123
    assert id_time_ms("not-an-id") == 0
    assert id_time_ms("z" * 32) == 0
