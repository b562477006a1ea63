"""Shared by the HTTP server tests: a tiny ASGI test app, both servers started on it
(the built-in one and hypercorn's trio worker), and a raw-socket client that reads
answers byte for byte (its own parser, so it checks our framing rather than trusting it)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from engine.http import ServerSettings, serve_http

KINDS = ("builtin", "hypercorn")

# Small limits and short timeouts, the same for both servers where hypercorn has them.
SETTINGS = ServerSettings(
    bind="127.0.0.1:0",
    max_body_bytes=1000,
    stalled_client_timeout_s=0.5,
    max_connections=100,
    keep_alive_timeout_s=0.5,
    head_timeout_s=0.5,
    body_timeout_s=0.5,
    max_url_bytes=1024,
    max_headers=20,
    max_header_bytes=2048,
    ws_max_message_bytes=4096,
    ws_close_timeout_s=0.5,
    shutdown_timeout_s=2.0,
)

# What the app saw, for tests that look behind the answer (disconnects, close codes).
SEEN: dict[str, Any] = {}


# -- the test application --------------------------------------------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    kind = scope["type"]
    if kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if kind == "websocket":
        await ws_app(scope, receive, send)
        return
    path: str = scope["path"]
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if path.startswith("/echo"):
        body = await read_all(receive)
        await send_body(
            send,
            200,
            json.dumps(
                {
                    "method": scope["method"],
                    "path": path,
                    "raw_path": scope["raw_path"].decode("latin-1"),
                    "query": scope["query_string"].decode("latin-1"),
                    "http_version": scope["http_version"],
                    "headers": [
                        [k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]
                    ],
                    "body": body.decode("latin-1"),
                }
            ).encode(),
            b"application/json",
        )
    elif path == "/hello":
        await send_body(send, 200, b"hello")  # for HEAD too: the server drops the body
    elif path == "/stream":  # no content-length: chunked (1.1) or close-delimited (1.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"one,", b"two,", b"three"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/status":
        await send({"type": "http.response.start", "status": int(query["code"]), "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/sleep":
        await trio.sleep(float(query.get("s", "0.3")))
        await send_body(send, 200, b"slept")
    elif path == "/nobody":  # answers without reading the request body
        await send_body(send, 200, b"unread")
    elif path == "/fail":
        raise RuntimeError("the test app fails before answering")
    elif path == "/fail-after":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"10")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"abc", "more_body": True})
        raise RuntimeError("the test app fails halfway through its answer")
    elif path == "/big":  # streams until the client is gone
        chunk = b"x" * 65536
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            while True:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except OSError:
            SEEN["big"] = "send raised"
            raise
    elif path == "/disconnect":  # reads the body, then waits for the client to leave
        await read_all(receive)
        message = await receive()
        SEEN["disconnect"] = message["type"]
    elif path == "/inject":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-a", b"1\r\nx-injected: 1")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})
    else:
        await send_body(send, 404, b"no such path")


async def ws_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert (await receive())["type"] == "websocket.connect"
    path = scope["path"]
    if path == "/ws/refuse":
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
            await send({"type": "websocket.http.response.body", "body": b"refused"})
        else:
            await send({"type": "websocket.close"})
        return
    if path == "/ws/deny":
        await send({"type": "websocket.close"})
        return
    subprotocols = scope.get("subprotocols") or []
    await send({"type": "websocket.accept", "subprotocol": subprotocols[0] if subprotocols
                else None, "headers": [(b"x-ws", b"yes")]})  # fmt: skip
    if path == "/ws/close":
        await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
        SEEN["ws_after_close"] = (await receive())["type"]
        return
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            SEEN["ws_disconnect"] = message.get("code")
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})
        else:
            await send({"type": "websocket.send", "bytes": message["bytes"]})


async def read_all(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return body
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def send_body(
    send: Any, status: int, body: bytes, content_type: bytes = b"text/plain"
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the servers -----------------------------------------------------------------------


@dataclass
class Running:
    kind: str
    host: str
    port: int
    shutdown: trio.Event
    done: trio.Event


def hypercorn_config(settings: ServerSettings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [settings.bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.test")
    config.keep_alive_timeout = settings.keep_alive_timeout_s
    config.h11_max_incomplete_size = settings.max_header_bytes * 2
    config.websocket_max_message_size = settings.ws_max_message_bytes
    config.graceful_timeout = settings.shutdown_timeout_s
    return config


@asynccontextmanager
async def running(kind: str, **overrides: Any) -> AsyncIterator[Running]:
    """One server of ``kind`` on the test app, in a nursery of its own."""
    settings = replace(SETTINGS, **overrides)
    shutdown, done = trio.Event(), trio.Event()

    async def serve(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            if kind == "builtin":
                await serve_http(app, settings, shutdown, task_status=task_status)
            else:
                await hypercorn_serve(
                    app,  # type: ignore[arg-type]
                    hypercorn_config(settings),
                    shutdown_trigger=shutdown.wait,
                    task_status=task_status,
                )
        finally:
            done.set()

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve)
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        yield Running(kind, host, int(port), shutdown, done)
        nursery.cancel_scope.cancel()


# -- the client ------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes = field(repr=False)

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        return b", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Closed(Exception):
    """The server closed the connection before a whole answer came."""


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        if self.eof:
            raise Closed
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:  # reset
            data = b""
        if not data:
            self.eof = True
            raise Closed
        self.buffer += data

    async def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            await self._fill()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def _line(self) -> bytes:
        while (i := self.buffer.find(b"\r\n")) < 0:
            await self._fill()
        return await self._take(i + 2)

    async def answer(self, *, head: bool = False, informational: bool = False) -> Answer:
        """The next answer (skipping 1xx unless ``informational``); ``head``: to a HEAD."""
        while True:
            while (end := self.buffer.find(b"\r\n\r\n")) < 0:
                await self._fill()
            raw_head = await self._take(end + 4)
            lines = raw_head[:-4].split(b"\r\n")
            version, status_text = lines[0].split(b" ", 2)[:2]
            assert version == b"HTTP/1.1", lines[0]
            status = int(status_text)
            headers = []
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers.append((name.strip().lower(), value.strip()))
            answer = Answer(status, headers, b"", raw_head)
            if 100 <= status < 200 and status != 101:
                if informational:
                    return answer
                continue
            break
        body = b""
        if head or status in (101, 204, 304):
            pass
        elif (answer.header(b"transfer-encoding") or b"").lower() == b"chunked":
            raw = b""
            while True:
                size_line = await self._line()
                raw += size_line
                size = int(size_line.split(b";")[0], 16)
                data = await self._take(size + 2)
                raw += data
                assert data.endswith(b"\r\n")
                if size == 0:
                    break
                body += data[:-2]
            answer.raw += raw
        elif (length := answer.header(b"content-length")) is not None:
            body = await self._take(int(length))
            answer.raw += body
        else:  # close-delimited
            try:
                while True:
                    await self._fill()
            except Closed:
                body = bytes(self.buffer)
                self.buffer.clear()
            answer.raw += body
        answer.body = body
        return answer

    async def closed(self, timeout: float = 1.5) -> bool:
        """True when the server closes (EOF or reset) within ``timeout`` with nothing more
        to read; False when the connection stays open (or more bytes come)."""
        if self.buffer:
            return False
        with trio.move_on_after(timeout):
            try:
                await self._fill()
            except Closed:
                return True
            return False  # bytes came
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


@asynccontextmanager
async def connect(server: Running) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream(server.host, server.port)
    client = Client(stream)
    try:
        yield client
    finally:
        await client.aclose()


def mask_date(raw: bytes) -> bytes:
    """An answer's bytes with its date header's value blanked (it changes each second)."""
    lines = raw.split(b"\r\n")
    return b"\r\n".join(b"date: -" if line.lower().startswith(b"date:") else line for line in lines)
