"""WebSockets (RFC 6455) over an upgraded connection: the handshake is checked and
answered here (no second HTTP parser), frames are wsproto's, and ``Session`` is the ASGI
side: ``send`` awaits the socket write (a slow reader slows its sender), ``receive``
reassembles fragmented messages, answers pings and closes."""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import logging
import math
from collections import deque
from collections.abc import MutableMapping
from typing import Any

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    TextMessage,
)
from wsproto.utilities import generate_accept_token

from engine.http import h1
from engine.http.h1 import Request
from engine.http.stream import ClientDisconnected, Stream

log = logging.getLogger(__name__)

Message = dict[str, Any]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_ABNORMAL = 1006  # never sent: the connection ended without a close frame
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOO_BIG = 1009


def handshake_error(request: Request) -> tuple[int, str] | None:
    """What makes an upgrade request an invalid opening handshake (RFC 6455 4.2.1)."""
    if request.method != b"GET":
        return 400, "a websocket handshake is a GET request"
    if request.version != "1.1":
        return 400, "a websocket handshake needs HTTP/1.1"
    if request.hosts != 1:
        return 400, "an HTTP/1.1 request needs exactly one Host header"
    version = key = None
    for name, value in request.headers:
        if name == b"sec-websocket-version":
            version = value.strip()
        elif name == b"sec-websocket-key":
            key = value.strip()
    if version != b"13":
        return 426, "Sec-WebSocket-Version must be 13"
    if key is None:
        return 400, "Sec-WebSocket-Key is missing"
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return 400, "Sec-WebSocket-Key is not 16 bytes in base64"
    except binascii.Error:
        return 400, "Sec-WebSocket-Key is not base64"
    return None


def subprotocols(request: Request) -> list[str]:
    offered: list[str] = []
    for name, value in request.headers:
        if name == b"sec-websocket-protocol":
            offered.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
    return offered


class _State(enum.Enum):
    CONNECTING = 1  # handshake not answered yet
    OPEN = 2
    CLOSING = 3  # our close frame is sent; waiting for the client's
    CLOSED = 4  # close handshake done, or the connection is gone
    REFUSED = 5  # answered with an HTTP response instead of 101


class Session:
    """One websocket between the client and the ASGI application."""

    def __init__(
        self,
        stream: Stream,
        request: Request,
        *,
        max_message_bytes: int,
        close_timeout_s: float,
    ) -> None:
        self._stream = stream
        self._request = request
        self._max_message = max_message_bytes
        self._close_timeout_s = close_timeout_s
        self._state = _State.CONNECTING
        self._ws = Connection(ConnectionType.SERVER)
        self._write_lock = trio.Lock()  # the app's sends and our pongs share the socket
        self._connected = False  # websocket.connect handed out
        self._decided = trio.Event()  # accepted or refused: receive may go on
        self._pending = request.trailing  # bytes that came with the handshake
        self._messages: deque[Message] = deque()
        self._parts: list[Any] = []  # pieces of a fragmented message
        self._size = 0
        self._close_code = CLOSE_ABNORMAL
        self._close_reason = ""
        self._closing_deadline = math.inf
        self._draining = False
        self._read_scope: trio.CancelScope | None = None  # a receive waiting on the socket
        self._refusal: tuple[int, list[tuple[bytes, bytes]]] | None = None
        self._refusal_body: list[bytes] = []

    # -- the server's side -----------------------------------------------------------------

    async def run(self, app: Any, scope: MutableMapping[str, Any]) -> None:
        """Run the application on this websocket, then finish the close handshake."""
        try:
            await app(scope, self.receive, self.send)
        except ClientDisconnected:
            self._state = _State.CLOSED
        except Exception:
            log.exception("http.websocket.app_failed path=%s", scope.get("path"))
            if self._state is _State.CONNECTING:
                await self._refuse_plain(500, "the application failed")
            elif self._state is _State.OPEN:
                await self._close(CLOSE_INTERNAL_ERROR, "")
        else:
            if self._state is _State.CONNECTING:  # ASGI: returning before accept means 403
                await self._refuse_plain(403, "the application refused the websocket")
            elif self._state is _State.OPEN:
                await self._close(CLOSE_NORMAL, "")
        finally:
            self._decided.set()
        if self._state is _State.CLOSING:
            await self._await_close_reply()

    def going_away(self) -> None:
        """Shutdown: a receive waiting on the socket sends close 1001 and returns."""
        self._draining = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    # -- ASGI receive ----------------------------------------------------------------------

    async def receive(self) -> Message:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        if self._state is _State.CONNECTING:
            await self._decided.wait()
        data: bytes | None
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._state is not _State.OPEN:
                return self._disconnect()
            if self._draining:
                await self._close(CLOSE_GOING_AWAY, "server shutting down")
                continue
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                data = self._stream.recv_nowait()
                if data is None:
                    self._read_scope = trio.CancelScope()
                    try:
                        data = await self._stream.recv_within(self._read_scope)
                    finally:
                        self._read_scope = None
                else:
                    await trio.lowlevel.checkpoint()
                if data is None:  # shutdown woke us (going_away)
                    continue
                if not data:
                    self._state = _State.CLOSED
                    self._close_code = CLOSE_ABNORMAL
                    continue
            self._ws.receive_data(data)
            await self._events()

    def _disconnect(self) -> Message:
        return {"type": "websocket.disconnect", "code": self._close_code,
                "reason": self._close_reason}  # fmt: skip

    async def _events(self) -> None:
        """Turn what wsproto parsed into ASGI messages; answer pings and close frames."""
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                if self._state is not _State.OPEN:
                    continue  # closing: what still comes is dropped
                self._parts.append(event.data)
                self._size += len(event.data)
                if self._size > self._max_message:
                    self._parts.clear()
                    await self._close(CLOSE_TOO_BIG, "message too big")
                    continue
                if event.message_finished:
                    parts, self._parts, self._size = self._parts, [], 0
                    if isinstance(event, TextMessage):
                        text = parts[0] if len(parts) == 1 else "".join(parts)
                        self._messages.append({"type": "websocket.receive", "text": text})
                    else:
                        data = parts[0] if len(parts) == 1 else b"".join(parts)
                        self._messages.append({"type": "websocket.receive", "bytes": data})
            elif isinstance(event, Ping):
                if self._state is _State.OPEN:
                    await self._write_quietly(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                await self._closed_by_peer(event)
                return

    async def _closed_by_peer(self, event: CloseConnection) -> None:
        ws_state = self._ws.state
        if ws_state is ConnectionState.REMOTE_CLOSING:  # the client closes: answer it
            self._close_code, self._close_reason = event.code, event.reason or ""
            await self._write_quietly(self._ws.send(event.response()))
        elif ws_state is ConnectionState.OPEN:  # a protocol error: fail the connection
            self._close_code, self._close_reason = event.code, event.reason or ""
            await self._write_quietly(self._ws.send(CloseConnection(event.code, "")))
        # else: the client's answer to our close frame
        self._state = _State.CLOSED

    # -- ASGI send -------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            if self._state is not _State.OPEN:
                raise ClientDisconnected("websocket closed")
            text = message.get("text")
            event: Event = (
                TextMessage(data=text) if text is not None else BytesMessage(data=message["bytes"])
            )
            await self._write(self._ws.send(event))
        elif kind == "websocket.accept":
            if self._state is not _State.CONNECTING:
                raise RuntimeError(f"websocket.accept in state {self._state.name}")
            await self._accept(message)
        elif kind == "websocket.close":
            if self._state is _State.CONNECTING:
                await self._refuse_plain(403, "the application refused the websocket")
            elif self._state is _State.OPEN:
                await self._close(message.get("code") or CLOSE_NORMAL, message.get("reason") or "")
        elif kind == "websocket.http.response.start":
            if self._state is not _State.CONNECTING or self._refusal is not None:
                raise RuntimeError(f"{kind} in state {self._state.name}")
            self._refusal = (message["status"], list(message.get("headers", ())))
        elif kind == "websocket.http.response.body":
            if self._refusal is None or self._state is not _State.CONNECTING:
                raise RuntimeError(f"{kind} before websocket.http.response.start")
            self._refusal_body.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._refuse_with_response()
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a websocket")

    async def _accept(self, message: Message) -> None:
        key = next(v.strip() for n, v in self._request.headers if n == b"sec-websocket-key")
        parts = [
            h1.STATUS_LINES[101],
            b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
            generate_accept_token(key),
            b"\r\n",
        ]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            parts += (b"sec-websocket-protocol: ", subprotocol.encode(), b"\r\n")
        headers = message.get("headers", ())
        h1.check_fields(headers)
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        parts += (h1.date_server(), b"\r\n")
        head = b"".join(parts)
        self._state = _State.OPEN
        self._decided.set()
        await self._write(head)

    async def _refuse_plain(self, status: int, detail: str) -> None:
        self._state = _State.REFUSED
        self._decided.set()
        await self._write_quietly(h1.error_response(status, detail))

    async def _refuse_with_response(self) -> None:
        """The application's own HTTP answer to the handshake (websocket.http.response)."""
        assert self._refusal is not None
        status, headers = self._refusal
        body = b"".join(self._refusal_body)
        parts = [h1.STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        has_length = False
        h1.check_fields(headers)
        for name, value in headers:
            has_length = has_length or name.lower() == b"content-length"
            parts += (name, b": ", value, b"\r\n")
        if not has_length:
            parts.append(b"content-length: %d\r\n" % len(body))
        parts += (b"connection: close\r\n", h1.date_server(), b"\r\n")
        head = b"".join(parts)
        self._state = _State.REFUSED
        self._decided.set()
        await self._write_quietly(head + body)

    # -- closing ---------------------------------------------------------------------------

    async def _close(self, code: int, reason: str) -> None:
        """Send our close frame; the client's answer ends the handshake."""
        self._close_code, self._close_reason = code, reason
        self._state = _State.CLOSING
        self._closing_deadline = trio.current_time() + self._close_timeout_s
        await self._write_quietly(self._ws.send(CloseConnection(code, reason)))

    async def _await_close_reply(self) -> None:
        """Read (and drop) what comes until the client's close frame or the deadline."""
        data: bytes | None
        while self._state is _State.CLOSING and not self._stream.broken:
            if self._pending:
                data, self._pending = self._pending, b""
            else:
                data = await self._stream.recv(self._closing_deadline)
            if not data:  # EOF or deadline
                break
            self._ws.receive_data(data)
            await self._events()
        self._state = _State.CLOSED

    # -- writing ---------------------------------------------------------------------------

    async def _write(self, data: bytes) -> None:
        async with self._write_lock:
            try:
                await self._stream.write(data)
            except ClientDisconnected:
                self._state = _State.CLOSED
                raise

    async def _write_quietly(self, data: bytes) -> None:
        """A write of our own (pong, close, refusal): a gone client ends the websocket."""
        with contextlib.suppress(ClientDisconnected):
            await self._write(data)
