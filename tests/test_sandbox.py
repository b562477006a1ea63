"""Sandbox (test mode), per message and per API key: the message is validated, rendered
and queued like any other, composed by a sender, and its wire form kept for
GET /v1/messages/{id}/raw -- but nothing reaches the transport."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from engine.embedded import RedisServer
from engine.transport.memory import MemoryTransport
from fixtures.inproc import engine_client

Api = tuple[httpx.AsyncClient, MemoryTransport]


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Api]:
    async with engine_client(redis_server.url) as (client, transport, _):
        yield client, transport


async def _final(c: httpx.AsyncClient, job_id: str, headers: Any = None) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            body: dict[str, Any] = (await c.get(f"/v1/messages/{job_id}", headers=headers)).json()
            if body["state"] in ("sent", "failed"):
                return body
            await trio.sleep(0.02)


async def test_a_sandboxed_message_is_kept_not_sent(api: Api) -> None:
    c, transport = api
    r = await c.post("/v1/messages", json={"to": "ann@example.com", "subject": "Test run",
                                           "html": "<p>Hi</p>", "sandbox": True})  # fmt: skip
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    rec = await _final(c, job_id)
    assert rec["state"] == "sent" and rec["last_error"].startswith("sandbox: kept")
    raw = await c.get(f"/v1/messages/{job_id}/raw")
    assert raw.status_code == 200 and raw.headers["content-type"] == "message/rfc822"
    parsed = email.message_from_bytes(raw.content, policy=email.policy.default)
    assert parsed["Subject"] == "Test run" and parsed["To"] == "ann@example.com"
    preview = (await c.get(f"/v1/messages/{job_id}/preview")).json()
    assert (preview["subject"], preview["to"]) == ("Test run", "ann@example.com")
    assert preview["html"].strip() == "<p>Hi</p>" and preview["attachments"] == []
    # A real one goes to the transport, and has no kept wire form.
    real = (await c.post("/v1/messages", json={"to": "bob@example.com", "text": "x"})).json()
    await _final(c, real["id"])
    assert [m.job_id for m in transport.sent] == [real["id"]]
    assert (await c.get(f"/v1/messages/{real['id']}/raw")).status_code == 404


async def test_a_sandbox_key_sandboxes_everything_it_sends(api: Api) -> None:
    c, transport = api
    made = await c.post("/v1/keys", json={"name": "ci", "scopes": ["send", "read"],
                                          "sandbox": True})  # fmt: skip
    assert made.status_code == 201 and made.json()["sandbox"] is True
    key = {"Authorization": f"Bearer {made.json()['key']}"}
    one = await c.post("/v1/messages", json={"to": "a@example.com", "text": "1"}, headers=key)
    batch = {"messages": [{"to": f"b{i}@example.com", "text": "2"} for i in range(3)]}
    many = await c.post("/v1/messages/batch", json=batch, headers=key)
    ids = [one.json()["id"], *many.json()["ids"]]
    for job_id in ids:
        assert (await _final(c, job_id, key))["state"] == "sent"
        raw = await c.get(f"/v1/messages/{job_id}/raw", headers=key)
        assert raw.status_code == 200 and b"X-Engine-Job-Id: " + job_id.encode() in raw.content
    assert transport.sent == []
    listed = (await c.get("/v1/keys")).json()["items"]
    assert any(k["name"] == "ci" and k["sandbox"] for k in listed)
