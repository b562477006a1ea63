"""The route table against the running API: every declared route is served, every route
the code serves is declared, and every answer's status is one the spec lists."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.api.routes import ROUTES, Route, openapi
from engine.config import load_settings
from engine.embedded import RedisServer, free_port
from engine.queue import open_redis
from engine.transport import MemoryTransport
from fixtures.inproc import inprocess_engine

API = Path(__file__).resolve().parent.parent / "engine" / "api"
FAST_PATHS = {  # the raw-ASGI router in app.py (not Quart decorators)
    "POST /v1/messages", "POST /v1/messages/batch", "GET /v1/messages/{id}",
    "DELETE /v1/messages/{id}", "WS /v1/events", "GET /healthz", "GET /readyz",
    "GET /metrics",
}  # fmt: skip
MSG = {"to": "ann@example.com", "subject": "Hi", "text": "Hello"}
UNKNOWN = "0" * 32


def test_every_route_the_code_serves_is_declared_and_back() -> None:
    served = set(FAST_PATHS)
    for source in API.glob("*.py"):
        for method, path in re.findall(
            r'@app\.(get|post|put|delete)\("([^"]+)"\)', source.read_text()
        ):
            template = re.sub(r"<(\w+)>", r"{\1}", path)
            served.add(f"{method.upper()} {template}")
    declared = {f"{r.method} {r.path}" for r in ROUTES}
    # Quart names path parameters after the handler's argument; the table says {id}.
    served = {re.sub(r"\{job_id\}", "{id}", s) for s in served}
    assert served == declared, (served - declared, declared - served)


def test_the_spec_lists_every_route_with_its_statuses() -> None:
    spec = openapi()
    assert spec["openapi"] == "3.1.0"
    for r in ROUTES:
        op = spec["paths"][r.path]["get" if r.method == "WS" else r.method.lower()]
        assert {int(s) for s in op["responses"]} >= set(r.responses), r.path
        for status, response in op["responses"].items():
            if int(status) >= 400 and "content" in response:
                assert "application/problem+json" in response["content"] or r.path == "/readyz"
    refs = re.findall(r'"#/components/schemas/(\w+)"', str(spec).replace("'", '"'))
    assert set(refs) <= set(spec["components"]["schemas"])


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
    path = r.path.replace("{id}", UNKNOWN).replace("{name}", "nope")
    path = path.replace("/static/nope", "/static/dashboard.js")
    out: list[tuple[str, str, dict[str, Any]]] = []
    if r.method == "POST":
        good: dict[str, Any] = {
            "/v1/messages": MSG, "/v1/messages/batch": {"messages": [MSG]},
            "/v1/schedules": {"name": "daily", "cron": "@daily", "message": MSG},
        }.get(r.path, {})  # fmt: skip
        bad = {"content": b"{nope", "headers": {"content-type": "application/json"}}
        out += [("POST", path, {"json": good}), ("POST", path, bad),
                ("POST", path, {"json": {"unexpected": 1}})]  # fmt: skip
    elif r.method != "WS":
        out.append((r.method, path, {}))
        if r.path == "/v1/dead":
            out.append(("GET", path, {"params": {"limit": "0"}}))
    if r.method != "WS":
        out.append(("PATCH", path, {}))  # a method nobody serves: 405
    return out


async def test_every_answer_is_a_status_the_spec_lists(base: str) -> None:
    seen: dict[str, set[int]] = {}
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        for r in ROUTES:
            allowed = set(r.responses) | {405}
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
