"""The HTTP edge's server: HTTP/1.1 and WebSockets for Trio on httptools (llhttp) and
wsproto, serving an ASGI 3 application. It knows sockets and ASGI, nothing of email:
it imports trio, httptools, wsproto, the stdlib and engine.config only.

    settings   ServerSettings (frozen; ``from_http`` maps the engine's [http] table)
    stream     one socket: non-blocking reads and writes, deadlines, lingering close
    h1         sans-IO HTTP/1.1: llhttp callbacks collect, limits, response heads
    websocket  the opening handshake, and the ASGI side of a websocket (wsproto frames)
    server     listeners, one task per connection, the loop that decides, graceful drain
"""

from __future__ import annotations

import trio

from engine.config import HttpSettings
from engine.http.server import ASGIApp, HttpServer, ServerStatistics
from engine.http.settings import ServerSettings
from engine.http.stream import ClientDisconnected

__all__ = [
    "ASGIApp",
    "ClientDisconnected",
    "HttpServer",
    "ServerSettings",
    "ServerStatistics",
    "serve_http",
]


async def serve_http(
    app: ASGIApp,
    settings: HttpSettings | ServerSettings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``shutdown`` is set, then drain (``shutdown_timeout_s``).
    ``task_status.started`` gets the bound URLs ("http://127.0.0.1:8080") once listening."""
    if isinstance(settings, HttpSettings):
        settings = ServerSettings.from_http(settings)
    await HttpServer(app, settings).serve(shutdown, task_status=task_status)
