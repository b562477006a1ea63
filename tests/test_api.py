"""HTTP API against a real engine (in-process, real Redis, real TCP), in-memory transport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
import trio

from engine.config import HttpSettings, Settings, load_settings
from engine.embedded import RedisServer, free_port
from engine.ids import is_id
from engine.service import Running
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine


@dataclass
class Engine:
    base: str
    running: Running
    transport: MemoryTransport
    stop: trio.Event


@pytest.fixture
async def engine(redis_server: RedisServer) -> AsyncIterator[Engine]:
    from engine.queue import open_redis

    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={}, overrides={"http": {"bind": bind, "max_body_bytes": 20_000}}
    )
    transport = MemoryTransport()
    stop = trio.Event()
    async with inprocess_engine(settings, redis_server.url, transport, stop) as running:
        yield Engine(f"http://{bind}", running, transport, stop)


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=engine.base, headers=AUTH, timeout=10) as c:
        yield c


MSG = {"to": "ann@example.com", "subject": "Hello", "text": "Hi Ann"}


async def _wait_state(client: httpx.AsyncClient, job_id: str, state: str) -> dict[str, object]:
    with trio.fail_after(10):
        while True:
            r = await client.get(f"/v1/messages/{job_id}")
            body: dict[str, object] = r.json()
            if body["state"] == state:
                return body
            await trio.sleep(0.02)


async def test_post_message_is_accepted_and_delivered(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    r = await client.post("/v1/messages", json=MSG)
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] == "queued" and is_id(body["id"])
    assert r.headers["location"] == f"/v1/messages/{body['id']}"
    status = await _wait_state(client, body["id"], "sent")
    assert status["attempts"] == 1 and status["last_error"] is None
    assert status["created_at"].endswith("Z")  # type: ignore[union-attr]
    (mail,) = engine.transport.sent
    assert mail.job_id == body["id"] and mail.recipients == ["ann@example.com"]
    assert f"Message-ID: <{body['id']}@".encode() in mail.data


async def test_batch_is_accepted_whole(client: httpx.AsyncClient, engine: Engine) -> None:
    msgs = [{**MSG, "to": f"u{i}@example.com"} for i in range(50)]
    r = await client.post("/v1/messages/batch", json={"messages": msgs})
    assert r.status_code == 202, r.text
    ids = r.json()["ids"]
    assert len(ids) == 50 == len(set(ids))
    for job_id in ids:
        await _wait_state(client, job_id, "sent")
    assert sorted(m.job_id for m in engine.transport.sent) == sorted(ids)


async def test_batch_with_one_bad_message_is_rejected_whole(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    msgs = [MSG, {**MSG, "to": "broken"}, MSG]
    r = await client.post("/v1/messages/batch", json={"messages": msgs})
    assert r.status_code == 422
    assert r.json()["field"] == "messages[1].to"
    counts = await engine.running.queue.counts()
    assert counts.enqueued_total == 0


async def test_batch_limits(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages/batch", json={"messages": []})
    assert r.status_code == 422 and r.json()["field"] == "messages"


def _problem(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = r.json()
    assert body["status"] == status and body["title"]
    return body


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/messages", content=b'{"to": ', headers={"content-type": "application/json"}
    )
    _problem(r, 400)


async def test_wrong_content_type_is_415(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/messages",
        content=b"to=a",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    _problem(r, 415)
    r = await client.post("/v1/messages", content=b"{}")
    _problem(r, 415)


async def test_body_over_limit_is_413(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json={**MSG, "text": "x" * 30_000})
    body = _problem(r, 413)
    assert "20000" in str(body["detail"])


async def test_body_over_limit_without_content_length_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b" " * 1000

    r = await client.post(
        "/v1/messages", content=chunks(), headers={"content-type": "application/json"}
    )
    _problem(r, 413)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**MSG, "to": "nope"}, "to"),
        ({**MSG, "to": []}, "to"),
        ({"subject": "x", "text": "y"}, "to"),
        ({**MSG, "subject": "a\r\nBcc: x@y.z"}, "subject"),
        ({**MSG, "headers": {"X-A": "1\n2"}}, "headers.X-A"),
        ({**MSG, "to": 42}, "to"),
        ({**MSG, "unknown": 1}, "unknown"),
    ],
)
async def test_invalid_input_is_422_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, object], field: str
) -> None:
    assert _problem(await client.post("/v1/messages", json=body), 422)["field"] == field


async def test_unknown_message_is_404(client: httpx.AsyncClient) -> None:
    _problem(await client.get("/v1/messages/0190f5a3c2e1000000000000000000ff"), 404)
    _problem(await client.get("/v1/messages/not-an-id"), 404)


async def test_wrong_method_is_405(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/messages")
    _problem(r, 405)
    assert r.headers["allow"] == "POST"


async def test_unknown_route_is_problem_404(client: httpx.AsyncClient) -> None:
    _problem(await client.get("/v2/nothing"), 404)


async def test_health_and_readiness(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"alive": True}
    r = await client.get("/readyz")
    assert r.status_code == 200 and r.json()["redis"] == "ok" and r.json()["senders"] == 16


async def test_draining_answers_503(client: httpx.AsyncClient, engine: Engine) -> None:
    # A send in flight keeps the engine draining (HTTP still up) for about a second.
    engine.transport.delay_s = 1.0
    assert (await client.post("/v1/messages", json=MSG)).status_code == 202
    with trio.fail_after(5):
        while engine.transport.statistics().in_flight == 0:
            await trio.sleep(0.01)
    engine.stop.set()
    r = await client.post("/v1/messages", json=MSG)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["type"].endswith("draining")
    ready = await client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["draining"] is True


def test_http_settings_default_limit() -> None:
    assert HttpSettings().max_body_bytes >= 1_000_000
    assert Settings().http.max_batch_messages == 1000


# -- idempotency -------------------------------------------------------------------------


async def test_idempotency_key_returns_the_first_id(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await client.post("/v1/messages", json=MSG, headers=headers)
    assert first.status_code == 202
    again = await client.post("/v1/messages", json=MSG, headers=headers)
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert (await engine.running.queue.counts()).enqueued_total == 1


async def test_idempotency_key_with_other_body_is_409(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "order-43"}
    assert (await client.post("/v1/messages", json=MSG, headers=headers)).status_code == 202
    r = await client.post("/v1/messages", json={**MSG, "subject": "changed"}, headers=headers)
    assert _problem(r, 409)["field"] == "Idempotency-Key"


async def test_idempotency_key_on_batches(client: httpx.AsyncClient, engine: Engine) -> None:
    headers = {"Idempotency-Key": "batch-1"}
    body = {"messages": [MSG, MSG, MSG]}
    first = await client.post("/v1/messages/batch", json=body, headers=headers)
    again = await client.post("/v1/messages/batch", json=body, headers=headers)
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["ids"] == first.json()["ids"]
    # The same key on the single endpoint is a different request: conflict.
    r = await client.post("/v1/messages", json=MSG, headers=headers)
    assert r.status_code == 409
    assert (await engine.running.queue.counts()).enqueued_total == 3


async def test_concurrent_requests_with_one_key_make_one_job(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    headers = {"Idempotency-Key": "race"}
    answers: list[httpx.Response] = []

    async def post() -> None:
        answers.append(await client.post("/v1/messages", json=MSG, headers=headers))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(post)
    assert len({r.json()["id"] for r in answers}) == 1
    assert sorted(r.status_code for r in answers) == [200] * 9 + [202]


async def test_bad_idempotency_key_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/messages", json=MSG, headers={"Idempotency-Key": "x" * 300})
    assert _problem(r, 400)["field"] == "Idempotency-Key"


# -- dead-letter API ---------------------------------------------------------------------


async def test_dead_letter_list_retry_delete(client: httpx.AsyncClient, engine: Engine) -> None:
    from engine.errors import PermanentFailure

    # Not "no such user": that would suppress the address, and a retry of the dead letter
    # would end "suppressed" (tests/test_suppression.py).
    engine.transport.script(*[PermanentFailure("554 transaction failed", code=554)] * 3)
    ids = [
        (await client.post("/v1/messages", json={**MSG, "to": f"u{i}@example.com"})).json()["id"]
        for i in range(3)
    ]
    for job_id in ids:
        await _wait_state(client, job_id, "failed")
    page = (await client.get("/v1/dead", params={"limit": 2})).json()
    assert page["total"] == 3 and len(page["items"]) == 2 and page["next_offset"] == 2
    assert all("554" in item["last_error"] for item in page["items"])

    r = await client.post(f"/v1/dead/{ids[0]}/retry")
    assert r.status_code == 202
    status = await _wait_state(client, ids[0], "sent")
    assert status["attempts"] == 1  # attempts start afresh
    assert (await client.post(f"/v1/dead/{ids[0]}/retry")).status_code == 404

    assert (await client.delete(f"/v1/dead/{ids[1]}")).status_code == 204
    assert (await client.get(f"/v1/messages/{ids[1]}")).status_code == 404
    assert (await client.delete(f"/v1/dead/{ids[1]}")).status_code == 404

    r = await client.post("/v1/dead/retry", json={"error_contains": "transaction FAILED"})
    assert r.json() == {"retried": 1, "ids": [ids[2]]}
    await _wait_state(client, ids[2], "sent")
    assert (await client.get("/v1/dead")).json()["total"] == 0


async def test_dead_retry_all_with_empty_body(client: httpx.AsyncClient, engine: Engine) -> None:
    from engine.errors import PermanentFailure

    engine.transport.script(*[PermanentFailure("554 rejected", code=554)] * 2)
    ids = [(await client.post("/v1/messages", json=MSG)).json()["id"] for _ in range(2)]
    for job_id in ids:
        await _wait_state(client, job_id, "failed")
    r = await client.post("/v1/dead/retry")
    assert r.status_code == 202 and sorted(r.json()["ids"]) == sorted(ids)


async def test_dead_list_rejects_bad_paging(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/dead", params={"limit": 0})
    assert _problem(r, 422)["field"] == "limit"


async def test_retrying_message_shows_next_attempt(
    client: httpx.AsyncClient, engine: Engine
) -> None:
    from engine.errors import TemporaryFailure

    engine.transport.script(TemporaryFailure("451 later", code=451))
    job_id = (await client.post("/v1/messages", json=MSG)).json()["id"]
    status = await _wait_state(client, job_id, "retrying")
    assert status["next_attempt_at"] and "451" in str(status["last_error"])
