"""The route table: the router serves exactly its routes (a route without a handler, or a
handler without a route, is refused at build), dispatch picks the right route, and every
answer of the running API has a status the spec lists."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from engine.api.exchange import Reply, Request, json_reply
from engine.api.router import Router
from engine.api.routes import ROUTES, Route, openapi, statuses
from engine.config import load_settings
from engine.embedded import RedisServer, free_port
from engine.metrics import Metrics
from engine.queue import open_redis
from engine.transport import MemoryTransport
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.inproc import inprocess_engine

MSG = {"to": "ann@example.com", "subject": "Hi", "text": "Hello"}
UNKNOWN = "0" * 32


def test_a_route_without_a_handler_or_a_handler_without_a_route_is_refused() -> None:
    async def handler(_: Request) -> Reply:
        return json_reply(200, {})

    handlers: dict[str, Any] = {r.op: handler for r in ROUTES}
    Router(ROUTES, handlers, Metrics().ingest)  # all bound: fine
    with pytest.raises(ValueError, match="stats"):
        Router(ROUTES, {op: h for op, h in handlers.items() if op != "stats"}, Metrics().ingest)
    with pytest.raises(ValueError, match="extra"):
        Router(ROUTES, {**handlers, "extra": handler}, Metrics().ingest)


async def test_dispatch_matches_literal_segments_before_parameters() -> None:
    def answer(op: str) -> Any:
        async def handler(req: Request) -> Reply:
            return json_reply(200, {"op": op, "params": req.params})

        return handler

    app = Router(ROUTES, {r.op: answer(r.op) for r in ROUTES}, Metrics().ingest)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:

        async def op(method: str, path: str) -> Any:
            r = await client.request(method, path)
            return r.status_code, r.json()

        assert await op("POST", "/v1/messages/batch") == (200, {"op": "send_batch", "params": {}})
        assert await op("GET", "/v1/messages/abc") == (
            200, {"op": "get_message", "params": {"id": "abc"}},
        )  # fmt: skip
        assert (await op("GET", "/v1/messages/abc/events"))[1]["op"] == "message_events"
        assert (await op("POST", "/v1/dead/retry"))[1]["op"] == "retry_dead_many"
        assert (await op("POST", "/v1/dead/abc/retry"))[1]["op"] == "retry_dead"
        # HEAD is GET without the body; a method the path lacks is 405 naming the others.
        head = await client.head("/v1/stats")
        assert head.status_code == 200
        wrong = await client.put("/v1/messages/abc")
        assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, DELETE, HEAD"
        assert wrong.headers["content-type"] == "application/problem+json"
        # An empty parameter is no match: not a message called "".
        for path in ("/v1/messages/", "/v1/messages/a/b/c", "/nothing"):
            missing = await client.get(path)
            assert missing.status_code == 404 and missing.json()["status"] == 404, path


def test_the_spec_lists_every_route_with_its_statuses() -> None:
    spec = openapi()
    assert spec["openapi"] == "3.1.0"
    for r in ROUTES:
        op = spec["paths"][r.path]["get" if r.method == "WS" else r.method.lower()]
        assert {int(s) for s in op["responses"]} >= set(r.responses), r.path
        for status, response in op["responses"].items():
            if int(status) >= 400 and "content" in response:
                # /readyz answers its JSON; an unsubscribe link's 404 is a page for people.
                assert "application/problem+json" in response["content"] or r.path in (
                    "/readyz", "/u/{token}",
                )  # fmt: skip
    refs = re.findall(r'"#/components/schemas/(\w+)"', str(spec).replace("'", '"'))
    assert set(refs) <= set(spec["components"]["schemas"])
    # A message's status lists the files it carries (the dashboard's lookup shows them).
    status = spec["paths"]["/v1/messages/{id}"]["get"]["responses"]["200"]["content"]
    assert status["application/json"]["schema"] == {"$ref": "#/components/schemas/MessageView"}
    assert "attachments" in spec["components"]["schemas"]["MessageView"]["properties"]


@pytest.fixture
async def base(redis_server: RedisServer) -> AsyncIterator[str]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(environ={}, overrides={"http": {"bind": bind}})
    async with inprocess_engine(settings, redis_server.url, MemoryTransport()):
        yield f"http://{bind}"


def _requests(r: Route) -> list[tuple[str, str, dict[str, Any]]]:
    """(method, path, httpx kwargs) to try on a route: a plain one and bad ones."""
    path = r.path.replace("{id}", UNKNOWN).replace("{name}", "nope").replace("{kid}", "nope")
    path = path.replace("/static/nope", "/static/dashboard.js")
    out: list[tuple[str, str, dict[str, Any]]] = []
    if r.method in ("POST", "PUT"):
        good: dict[str, Any] = {
            "/v1/messages": MSG, "/v1/messages/batch": {"messages": [MSG]},
            "/v1/schedules": {"name": "daily", "cron": "@daily", "message": MSG},
            "/v1/keys": {"name": "routes", "scopes": ["send"], "tenant": "t1"},
            "/v1/tenants/{name}": {"identities": ["example.com"]},
            "/v1/session": {"key": TEST_ADMIN_KEY},
        }.get(r.path, {})  # fmt: skip
        bad = {"content": b"{nope", "headers": {"content-type": "application/json"}}
        out += [(r.method, path, {"json": good}), (r.method, path, bad),
                (r.method, path, {"json": {"unexpected": 1}})]  # fmt: skip
    elif r.method != "WS":
        out.append((r.method, path, {}))
        if r.path == "/v1/dead":
            out.append(("GET", path, {"params": {"limit": "0"}}))
    if r.method != "WS":
        out.append(("PATCH", path, {}))  # a method nobody serves: 405
    return out


async def test_every_answer_is_a_status_the_spec_lists(base: str) -> None:
    seen: dict[str, set[int]] = {}
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as client:
        for r in ROUTES:
            allowed = statuses(r)
            for method, path, kwargs in _requests(r):
                got = await client.request(method, path, **kwargs)
                assert got.status_code in allowed, (method, path, got.status_code, got.text)
                seen.setdefault(f"{r.method} {r.path}", set()).add(got.status_code)
        # An undeclared path is a 404 problem, not a route.
        missing = await client.get("/v1/nothing-here")
        assert missing.status_code == 404
    # The canned requests reached the routes (not only 405s).
    assert all(statuses - {405} for statuses in seen.values()), seen
    assert 202 in seen["POST /v1/messages"] and 201 in seen["POST /v1/schedules"]
    assert 201 in seen["POST /v1/keys"] and 201 in seen["PUT /v1/tenants/{name}"]
    assert 200 in seen["POST /v1/session"] and 200 in seen["GET /v1/session"]
