"""Dispatch from the route table: the ASGI application that matches a request to its
``Route`` in ``routes.ROUTES`` and runs the handler bound to the route's ``op``.

It owns what every route shares: the guard (host, credentials, the route's scope), 404
and 405 (with ``Allow``) in problem+json, HEAD for GET routes, ``Fail`` and
``QueueError`` turned into answers, the ingest routes' latency
metrics, websocket routes (handed the raw ASGI triple: the hub streams), and ASGI lifespan.
A table route without a handler, or a handler without a route, is an error at build time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Final, cast

from engine.api.asgi import Receive, Scope, Send
from engine.api.exchange import RETRY_AFTER_1, Fail, Reply, Request, refuse_upgrade
from engine.api.guard import PRINCIPAL, Guard
from engine.api.routes import Route
from engine.errors import QueueError
from engine.metrics import INGEST_ROUTES, IngestMetrics
from engine.models import CLOSE_POLICY

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Reply]]
Socket = Callable[[Scope, Receive, Send], Awaitable[None]]  # a websocket route: raw ASGI

_TIMED: Final = frozenset(INGEST_ROUTES)
# Health and metrics: load balancers and scrapers call them with Host names of their own.
PROBES: Final = frozenset({"healthz", "readyz", "metrics"})


@dataclass(frozen=True, slots=True)
class _Entry:
    route: Route
    handler: Handler
    timed: bool


class _Path:
    """One path template's routes by method, and how to match it."""

    __slots__ = ("allow", "methods", "parts")

    def __init__(self, template: str) -> None:
        # None where the template has a {parameter}; its name is kept in the table's path.
        self.parts: tuple[str | None, ...] = tuple(
            None if p.startswith("{") else p for p in template.split("/")
        )
        self.methods: dict[str, _Entry] = {}
        self.allow = b""

    def match(self, segments: list[str], names: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.parts):
            return None
        params: dict[str, str] = {}
        for want, got, name in zip(self.parts, segments, names, strict=True):
            if want is None:
                if not got:
                    return None
                params[name] = got
            elif want != got:
                return None
        return params


class Router:
    """An ASGI app over ``routes`` with ``handlers`` by op; ``only`` (ops) limits what this
    replica serves, answering 404 with ``refusal`` for the rest."""

    def __init__(
        self,
        routes: Iterable[Route],
        handlers: Mapping[str, Handler | Socket],
        metrics: IngestMetrics,
        *,
        guard: Guard | None = None,
        only: frozenset[str] | None = None,
        refusal: str = "",
    ) -> None:
        routes = tuple(routes)
        missing = {r.op for r in routes} ^ set(handlers)
        if missing:
            raise ValueError(f"routes and handlers disagree on {sorted(missing)}")
        self._metrics = metrics
        self._guard = guard if guard is not None else Guard(None, None)
        self._refusal = refusal
        self._static: dict[str, _Path] = {}
        self._dynamic: list[tuple[_Path, list[str]]] = []
        self._sockets: dict[str, tuple[Route, Socket]] = {}
        by_template: dict[str, _Path] = {}
        for r in routes:
            if only is not None and r.op not in only:
                continue
            handler = handlers[r.op]
            if r.method == "WS":
                self._sockets[r.path] = (r, cast(Socket, handler))
                continue
            entry = by_template.get(r.path)
            if entry is None:
                entry = by_template[r.path] = _Path(r.path)
                if "{" in r.path:
                    names = [p[1:-1] if p.startswith("{") else "" for p in r.path.split("/")]
                    self._dynamic.append((entry, names))
                else:
                    self._static[r.path] = entry
            entry.methods[r.method] = _Entry(r, cast(Handler, handler), r.path in _TIMED)
        for entry in by_template.values():
            methods = list(entry.methods)
            if "GET" in methods:
                methods.append("HEAD")
            entry.allow = ", ".join(methods).encode()
        # Literal templates first: /v1/messages/batch is not /v1/messages/{id}.
        self._dynamic.sort(key=lambda e: e[0].parts.count(None))

    def _find(self, path: str) -> tuple[_Path, dict[str, str]] | None:
        static = self._static.get(path)
        if static is not None:
            return static, {}
        segments = path.split("/")
        for entry, names in self._dynamic:
            params = entry.match(segments, names)
            if params is not None:
                return entry, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            found = self._sockets.get(scope["path"])
            if found is None:
                await send({"type": "websocket.close", "code": CLOSE_POLICY})
                return
            route, socket = found
            try:
                scope[PRINCIPAL] = await self._guard.principal(scope, route.scope)
            except Fail as fail:
                await refuse_upgrade(scope, send, fail)
                return
            await socket(scope, receive, send)
        elif kind == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._find(scope["path"])
        if found is None:
            detail = self._refusal or "no such route (GET /v1 lists them)"
            await _send(send, Fail(404, "not-found", "Not Found", detail).reply())
            return
        path, params = found
        method: str = scope["method"]
        entry = path.methods.get(method)
        if entry is None and method == "HEAD":
            entry = path.methods.get("GET")  # the server sends the head only
        if entry is None:
            fail = Fail(405, "method-not-allowed", "Method Not Allowed",
                        headers=[(b"allow", path.allow)])  # fmt: skip
            await _send(send, fail.reply())
            template = next(iter(path.methods.values())).route.path
            if template in _TIMED:
                self._metrics.observe(template, method, 405, 0.0)
            return
        start = perf_counter()
        try:
            principal = await self._guard.principal(
                scope, entry.route.scope, probe=entry.route.op in PROBES
            )
            reply = await entry.handler(Request(scope, receive, params, principal))
        except Fail as fail:
            reply = fail.reply()
        except QueueError as exc:  # one answer for every route that cannot reach Redis
            reply = Fail(503, "queue-unavailable", "Queue unavailable", str(exc),
                         headers=[RETRY_AFTER_1]).reply()  # fmt: skip
        except Exception:
            # The server answers 500 when nothing was sent yet.
            if entry.timed:
                self._metrics.observe(entry.route.path, method, 500, perf_counter() - start)
            raise
        await _send(send, reply)
        if entry.timed:
            self._metrics.observe(entry.route.path, method, reply.status, perf_counter() - start)


async def _send(send: Send, reply: Reply) -> None:
    # 204 and 304 carry no body and no Content-Length (RFC 9110 8.6).
    headers = (
        [] if reply.status in (204, 304) else [(b"content-length", str(len(reply.body)).encode())]
    )
    if reply.content_type is not None:
        headers.append((b"content-type", reply.content_type))
    headers += reply.headers
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to start or stop here (the service owns the resources): acknowledge both."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
