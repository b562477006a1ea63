"""The ASGI application: fast-path router in front of a Quart-Trio app.

The router answers the ingest, status, health and metrics routes itself; every other path goes
to Quart (the place for the dashboard, websockets and admin routes of later issues).
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio
from quart import Response
from quart_trio import QuartTrio

from engine.api.asgi import ASGIApp, Receive, Scope, Send, send_json, send_problem
from engine.api.backend import ApiBackend
from engine.api.dashboard import register_dashboard_routes
from engine.api.dead import register_dead_routes
from engine.api.hub import register_history_route
from engine.api.ingest import Ingest
from engine.api.limits import register_limit_routes
from engine.api.metrics import send_metrics, timed
from engine.api.responses import json_response, problem_response
from engine.api.routes import index, openapi
from engine.api.schedules import register_schedule_routes
from engine.api.transports import register_transport_routes
from engine.config import Settings
from engine.errors import QueueError
from engine.models import CLOSE_POLICY

_MESSAGES = "/v1/messages"
_BATCH = "/v1/messages/batch"
_ONE = "/v1/messages/{id}"
_EVENTS = "/v1/events"
_OPS_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # all a sender-only replica serves


def _quart_app(backend: ApiBackend, settings: Settings) -> QuartTrio:
    queue = backend.queue
    app = QuartTrio("engine")
    register_dead_routes(app, queue)
    # The dashboard page at "/" and its JSON (issue 5, scope 4).
    register_dashboard_routes(app, backend)
    register_limit_routes(app, backend.limits)
    register_transport_routes(app, backend.breaker)
    if backend.events is not None:
        register_history_route(app, backend.events.log, settings.events)
    register_schedule_routes(
        app,
        backend.schedules,
        default_from=settings.sender.default_from,
        max_body_bytes=settings.http.max_body_bytes,
    )

    spec = msgspec.json.encode(openapi())

    @app.get("/v1")
    async def list_routes() -> Response:
        return json_response(200, index())

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return Response(spec, status=200, content_type="application/json")

    @app.errorhandler(QueueError)
    async def queue_unavailable(exc: QueueError) -> Response:
        # One answer for every Quart route that cannot reach Redis.
        return problem_response(
            503, "queue-unavailable", "Queue unavailable", str(exc), headers={"Retry-After": "1"}
        )

    @app.errorhandler(404)
    async def not_found(_: Exception) -> Response:
        return problem_response(404, "not-found", "Not Found", "no such route")

    @app.errorhandler(405)
    async def not_allowed(_: Exception) -> Response:
        return problem_response(405, "method-not-allowed", "Method Not Allowed")

    return app


def build_app(backend: ApiBackend, settings: Settings) -> ASGIApp:
    ingest = Ingest(
        backend.queue,
        settings.http,
        settings.sender.default_from,
        settings.ingest,
        backend.drain,
        backend.metrics.ingest,
    )
    # ASGI; typed with its own scope TypedDicts
    quart: Any = _quart_app(backend, settings)
    measure = backend.metrics.ingest

    async def draining(send: Send) -> None:
        await send_problem(
            send,
            503,
            "draining",
            "Shutting down",
            "this instance is shutting down; retry on another",
            extra_headers=[(b"retry-after", b"1")],
        )

    async def readyz(send: Send) -> None:
        redis_ok = False
        with trio.move_on_after(1.0):
            try:
                redis_ok = await backend.queue.ping()
            except QueueError:
                redis_ok = False
        senders = backend.senders.statistics().running
        senders_ok = senders > 0 or not backend.expects_senders
        draining = backend.stopping.is_set()
        ok = redis_ok and senders_ok and not draining
        await send_json(
            send,
            200 if ok else 503,
            {
                "ready": ok,
                "redis": "ok" if redis_ok else "unavailable",
                "senders": senders,
                "draining": draining,
            },
        )

    async def method_not_allowed(send: Send, allowed: bytes) -> None:
        await send_problem(
            send,
            405,
            "method-not-allowed",
            "Method Not Allowed",
            extra_headers=[(b"allow", allowed)],
        )

    async def messages(route: str, scope: Scope, receive: Receive, send: Send) -> None:
        """The ingest and status routes (timed by the caller)."""
        method: str = scope["method"]
        if route != _ONE:
            if method != "POST":
                await method_not_allowed(send, b"POST")
            elif backend.stopping.is_set():
                measure.rejected("draining")
                await draining(send)
            elif route == _MESSAGES:
                await ingest.post_message(scope, receive, send)
            else:
                await ingest.post_batch(scope, receive, send)
        elif method == "GET":
            await ingest.get_message(scope["path"].rsplit("/", 1)[1], send)
        elif method == "DELETE":
            await ingest.cancel_message(scope["path"].rsplit("/", 1)[1], send)
        else:
            await method_not_allowed(send, b"GET, DELETE")

    ops_only = settings.role == "sender"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if ops_only and scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": CLOSE_POLICY})
                return
            if scope["type"] == "websocket" and scope["path"] == _EVENTS and backend.events:
                await backend.events.websocket(scope, receive, send)
                return
            await quart(scope, receive, send)  # lifespan, other websockets
            return
        path: str = scope["path"]
        method: str = scope["method"]
        if ops_only and path not in _OPS_PATHS:
            await send_problem(
                send,
                404,
                "not-found",
                "Not Found",
                "this replica runs senders only (role sender): it answers "
                "/healthz, /readyz and /metrics; send to an api replica",
            )
            return
        if path in (_MESSAGES, _BATCH):
            await timed(measure, path, messages, scope, receive, send)
            return
        if path.startswith("/v1/messages/") and path.count("/") == 3:
            await timed(measure, _ONE, messages, scope, receive, send)
            return
        if path == "/healthz":
            await send_json(send, 200, {"alive": True})
            return
        if path == "/readyz":
            await readyz(send)
            return
        if path == "/metrics":
            if method == "GET":
                await send_metrics(backend.queue, backend.metrics, send)
            else:
                await method_not_allowed(send, b"GET")
            return
        await quart(scope, receive, send)

    return app
