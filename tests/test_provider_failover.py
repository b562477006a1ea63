"""A provider's HTTP API as the primary transport, SMTP behind it (issue 16), end to end:
an in-process engine routes to the Resend emulator over real HTTP, records the provider's
message id, fails over to SMTP while Resend answers 500, and a timeout after Resend took
a message never makes a second email (the job id is the idempotency key)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from engine.config import load_settings
from engine.embedded import RedisServer, free_port
from engine.queue import open_redis
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine
from fixtures.providers import running
from fixtures.providers.resend import ResendEmulator

KEY = "re_test_key"
MSG = {"from": "app@example.com", "to": "ann@example.net", "subject": "Hi", "text": "Hello"}


@pytest.fixture
async def env(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[httpx.AsyncClient, ResendEmulator, MemoryTransport]]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    smtp = MemoryTransport()
    async with running(ResendEmulator(key=KEY)) as emu:
        settings = load_settings(environ={}, overrides={
            "http": {"bind": bind},
            "routing": {"transports": {"resend": f"resend://{KEY}@?api_base={emu.url}"},
                        "order": ["resend", "smtp"], "trip_after_failures": 3},
            "providers": {"request_timeout_s": 1.0},
            "queue": {"backoff_base_s": 0.05, "backoff_max_s": 0.2},
            "sender": {"breaker_probe_s": 0.2, "breaker_probe_max_s": 0.5},
        })  # fmt: skip
        async with (
            inprocess_engine(settings, redis_server.url, smtp),
            httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
        ):
            yield client, emu, smtp


async def _send(c: httpx.AsyncClient, n: int) -> list[str]:
    r = await c.post("/v1/messages/batch", json={"messages": [MSG] * n})
    assert r.status_code == 202, r.text
    ids: list[str] = r.json()["ids"]
    return ids


async def _final(c: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]]:
    with trio.fail_after(15):
        while True:
            views = [(await c.get(f"/v1/messages/{i}")).json() for i in ids]
            if all(v["state"] == "sent" for v in views):
                return views
            await trio.sleep(0.05)


async def test_sent_through_the_provider_with_its_id_recorded(env: Any) -> None:
    c, emu, smtp = env
    ids = await _send(c, 5)
    views = await _final(c, ids)
    by_job = {}
    for email in emu.emails:
        body = json.loads(email.request.body)
        by_job[email.idempotency_key] = email.id
        assert {"name": "job_id", "value": email.idempotency_key} in body["tags"]
    assert set(by_job) == set(ids) and not smtp.sent
    for v in views:
        assert v["transport"] == "resend" and v["provider_id"] == by_job[v["id"]]


async def test_a_failing_provider_fails_over_to_smtp_and_nothing_is_lost(env: Any) -> None:
    c, emu, smtp = env
    emu.set_faults({"status": 500, "count": 10_000})
    ids = await _send(c, 20)
    views = await _final(c, ids)
    assert {m.job_id for m in smtp.sent} == set(ids) and emu.count == 0
    assert all(v["transport"] == "smtp" for v in views)
    down = {t["name"]: t for t in (await c.get("/v1/transports")).json()["transports"]}
    assert down["resend"]["state"] == "down" and "500" in down["resend"]["reason"]
    assert down["smtp"]["state"] == "up"
    # Back: a probe goes through, the breaker closes, mail goes to Resend again.
    emu.clear_faults()
    with trio.fail_after(10):
        while True:
            later = await _send(c, 2)
            await _final(c, later)
            if emu.count:
                break
            await trio.sleep(0.2)
    views = await _final(c, await _send(c, 3))
    assert all(v["transport"] == "resend" for v in views)


async def test_a_timeout_after_the_provider_took_it_never_makes_a_second_email(
    env: Any,
) -> None:
    c, emu, smtp = env
    emu.set_faults({"accept_then_hang": 1})  # takes it, never answers: our 1 s timeout
    (job_id,) = await _send(c, 1)
    (view,) = await _final(c, [job_id])
    stored = [e for e in emu.emails if e.idempotency_key == job_id]
    assert len(stored) == 1, "the retry carried the same Idempotency-Key"
    assert view["attempts"] == 2 and view["provider_id"] == stored[0].id
    assert not smtp.sent
