"""The HTTP/1.1 + WebSocket server: listeners, one task per connection, graceful drain.

    HttpServer.serve
    ├── lifespan              the application's startup and shutdown, when it speaks lifespan
    ├── accept (per socket)   takes a connection slot (max_connections), then accepts
    └── connection (each)       read → parse → decide → run the application → answer

llhttp's callbacks only collect (``h1.Requests``); ``Connection`` is the one place that
decides: which request is next, what a broken one is answered, whether the connection
stays open. The application runs in the connection's task, and the socket is read only
when it asks for body (or waits for a disconnect) or when the next request is due: a
pipelining client gets at most one read (64 KiB) ahead of us.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, NoReturn

import trio
from trio.lowlevel import checkpoint, notify_closing, wait_readable

from engine.http import h1, websocket
from engine.http.h1 import Request
from engine.http.settings import ServerSettings
from engine.http.stream import (
    ClientDisconnected,
    Stream,
    accept_errno_is_aborted,
    accept_errno_is_transient,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ASGI = {"version": "3.0", "spec_version": "2.4"}
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}
_BACKLOG = 1024  # connections the kernel holds for us while we are at max_connections
_DRAIN_BYTES = 64 * 1024  # unread request body we read and drop to keep a connection
_BIG_BODY = 16 * 1024  # response bodies at least this big are not copied into one write
_NO_BODY = frozenset({204, 304})
_HEAD_TIMEOUT = (408, "request head not received in time")
_BODY_TIMEOUT = (408, "request body not received in time")


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    connections: int  # open now, websockets included
    websockets: int  # open now
    requests: int  # HTTP requests answered since start (the server's own errors too)
    draining: bool  # shutdown began: no longer accepting


class HttpServer:
    """Serves one ASGI application; ``serve`` runs until ``shutdown`` is set, then drains."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self.requests = 0
        self.websockets = 0
        self.draining = False
        self._slots = trio.Semaphore(settings.max_connections)
        self._connections: set[Connection] = set()
        self._all_closed = trio.Event()

    def statistics(self) -> ServerStatistics:
        return ServerStatistics(
            connections=len(self._connections),
            websockets=self.websockets,
            requests=self.requests,
            draining=self.draining,
        )

    async def serve(
        self,
        shutdown: trio.Event,
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen, serve until ``shutdown``, then stop accepting, let in-flight requests
        finish, close idle connections and websockets (1001), all within
        ``shutdown_timeout_s``; what is left then is cancelled."""
        listeners = await _listen(self.settings)
        try:
            async with trio.open_nursery() as nursery:
                lifespan = _Lifespan(self.app)
                await nursery.start(lifespan.run)
                nursery.start_soon(self._sweep)
                if lifespan.failure is not None:
                    raise RuntimeError(f"application startup failed: {lifespan.failure}")
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept, listener, nursery)
                    binds = [_url(listener) for listener in listeners]
                    log.info("http.listening binds=%s", binds)
                    task_status.started(binds)
                    await shutdown.wait()
                    accepting.cancel_scope.cancel()
                _close_all(listeners)  # new connections are refused from here on
                with trio.move_on_after(self.settings.shutdown_timeout_s) as deadline:
                    await self._drain()
                    await lifespan.shutdown()
                if deadline.cancelled_caught:
                    log.warning("http.drain.cut connections=%d", len(self._connections))
                nursery.cancel_scope.cancel()
        finally:
            _close_all(listeners)

    async def _sweep(self) -> NoReturn:
        """End connections whose wait outlived its deadline (head, body, keep-alive):
        one timer for all, so a request enters no cancel scope of its own. A deadline
        fires up to one tick late."""
        settings = self.settings
        shortest = min(settings.head_timeout_s, settings.body_timeout_s,
                       settings.keep_alive_timeout_s)  # fmt: skip
        tick = max(0.05, min(1.0, shortest / 8))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for connection in self._connections:
                if connection.deadline <= now:
                    connection.expire()

    async def _drain(self) -> None:
        self.draining = True
        for connection in list(self._connections):
            connection.drain()
        if self._connections:
            await self._all_closed.wait()

    async def _accept(self, listener: socket.socket, nursery: trio.Nursery) -> NoReturn:
        while True:
            # At the cap we stop accepting: the kernel's backlog holds the newcomers.
            await self._slots.acquire()
            try:
                sock = await _accept_one(listener)
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._connection, sock)

    async def _connection(self, sock: socket.socket) -> None:
        connection: Connection | None = None
        try:
            sock.setblocking(False)
            connection = Connection(self, sock)
            self._connections.add(connection)
            await connection.serve()
        except OSError:
            pass  # the client went away (reset, broken pipe, stalled past TCP_USER_TIMEOUT)
        except Exception:
            log.exception("http.connection.failed")
        finally:
            if connection is not None:
                self._connections.discard(connection)
                connection.stream.close()
            else:
                sock.close()
            self._slots.release()
            if self.draining and not self._connections:
                self._all_closed.set()


class Connection:
    """One client connection: the loop that decides, and the ASGI side of each request.

    Every way a connection ends early goes through one cancel scope around it (entered
    once, so a request costs no scope of its own): the sweeper cancels it when
    ``deadline`` passes, ``drain`` when idle, ``abort`` when a body breaks a limit. What
    is answered then (``expiry``: 408, 413, 400, or nothing) is decided after it."""

    __slots__ = ("_idle", "_ws", "app", "client", "deadline", "draining", "exchange",
                 "expiry", "local", "requests", "scope", "server", "settings",
                 "stream")  # fmt: skip

    def __init__(self, server: HttpServer, sock: socket.socket) -> None:
        self.server = server
        self.app = server.app
        self.settings = settings = server.settings
        self.stream = Stream(sock, settings.stalled_client_timeout_s)
        self.requests = h1.Requests(settings)
        self.client = _address(sock.getpeername())
        self.local = _address(sock.getsockname())
        self.scope = trio.CancelScope()
        self.deadline = math.inf  # when the wait in progress (if any) expires
        self.expiry: tuple[int, str] | None = None  # the answer if it does (None: close)
        self.draining = server.draining
        self.exchange: _Exchange | None = None  # the request in progress
        self._idle = False  # waiting for a next request, none of it received yet
        self._ws: websocket.Session | None = None

    def expire(self) -> None:
        """The sweeper found ``deadline`` passed."""
        self.scope.cancel()

    def drain(self) -> None:
        """Shutdown: close when idle, after the request in flight, or (websocket) 1001."""
        self.draining = True
        if self._idle:
            self.expiry = None
            self.scope.cancel()
        if self._ws is not None:
            self._ws.going_away()

    def abort(self, status: int, detail: str) -> None:
        """End the request in progress (and the connection) with our own answer."""
        self.expiry = (status, detail)
        self.scope.cancel()

    async def wait_recv(self, deadline: float, expiry: tuple[int, str] | None) -> bytes:
        """The next bytes (b"" at EOF); when ``deadline`` passes first the connection
        ends, answered with ``expiry``."""
        self.deadline = deadline
        self.expiry = expiry
        data = await self.stream.recv_wait()
        self.deadline = math.inf
        if self.scope.cancel_called:  # expired as the bytes came: the expiry wins
            await checkpoint()
        return data

    async def serve(self) -> None:
        with self.scope:
            await self._serve()
        if self.scope.cancelled_caught and self.expiry is not None:
            exchange = self.exchange
            if exchange is None or not exchange.head_sent:
                await self._refuse(*self.expiry)
        requests = self.requests
        if requests.incoming is not None or requests.ready or requests.error is not None:
            await self.stream.linger()  # the client may still be sending: let it read us

    async def _serve(self) -> None:
        served = 0
        while True:
            request = await self._next_request(served)
            if request is None:
                return
            served += 1
            if request.websocket:
                await self._websocket(request)
                return
            if not await self._respond(request):
                return

    # -- the next request ------------------------------------------------------------------

    async def _next_request(self, served: int) -> Request | None:
        requests, stream = self.requests, self.stream
        if requests.ready:
            await checkpoint()  # pipelined: others get a turn between requests
            return requests.ready.popleft()
        settings = self.settings
        # A new connection has head_timeout_s to send its first request; an open one,
        # keep_alive_timeout_s until the next begins, then head_timeout_s to finish it.
        idle_deadline = trio.current_time() + (
            settings.keep_alive_timeout_s if served else settings.head_timeout_s
        )
        head_deadline = math.inf
        if served:
            # Let the other connections run first: by then this client has usually sent
            # its next request, and a read finds it without arming the poller (one
            # failed read and an epoll_ctl fewer per request under load).
            await checkpoint()
        while True:
            if requests.error is not None:
                await self._refuse(*requests.error)
                return None
            idle = requests.incoming is None
            if stream.eof or (self.draining and idle):
                return None
            data = stream.recv_nowait()
            if data is None:
                if idle:
                    self._idle = True
                    data = await self.wait_recv(idle_deadline, None)
                    self._idle = False
                else:
                    if head_deadline == math.inf:
                        head_deadline = trio.current_time() + settings.head_timeout_s
                    data = await self.wait_recv(head_deadline, _HEAD_TIMEOUT)
            if data:
                requests.feed(data)
                if requests.ready:
                    return requests.ready.popleft()

    async def _refuse(self, status: int, detail: str) -> None:
        """Answer with the server's own error, closing (the caller closes)."""
        self.server.requests += 1
        log.debug("http.request.refused status=%d detail=%s", status, detail)
        with contextlib.suppress(ClientDisconnected):
            await self.stream.write(h1.error_response(status, detail))

    # -- HTTP ------------------------------------------------------------------------------

    async def _respond(self, request: Request) -> bool:
        """Run the application for one request; True when the connection stays open."""
        error = h1.request_error(request, request.max_body)
        target = h1.split_target(request.url) if error is None else None
        if target is None:
            await self._refuse(*(error or (400, "invalid request target")))
            return False
        self.server.requests += 1
        path, raw_path, query = target
        method = request.method
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": request.version,
            "server": self.local,
            "client": self.client,
            "scheme": "http",
            "method": _METHODS.get(method) or method.decode("ascii"),
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": request.headers,
        }
        self.exchange = exchange = _Exchange(self, request)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        except ClientDisconnected:
            return False
        except Exception:
            log.exception("http.app.failed method=%s path=%s", scope["method"], path)
            if not exchange.head_sent:
                await self._refuse(500, "the application failed")
            return False
        if not exchange.complete:
            if not exchange.head_sent:
                log.error("http.app.no_response method=%s path=%s", scope["method"], path)
                await self._refuse(500, "the application sent no response")
            return False
        self.exchange = None
        if not exchange.keep_alive:
            return False
        if not request.complete:
            return await self._drop_body(request)
        return True

    async def _drop_body(self, request: Request) -> bool:
        """Read and drop the rest of a small body the application did not read."""
        deadline = trio.current_time() + self.settings.body_timeout_s
        while not request.complete:
            data = await self.stream.recv(deadline)
            if not data:
                return False
            self.requests.feed(data)
            request.body.clear()
            if self.requests.error is not None:
                return False
        return True

    # -- websockets ------------------------------------------------------------------------

    async def _websocket(self, request: Request) -> None:
        error = websocket.handshake_error(request)
        target = h1.split_target(request.url) if error is None else None
        if target is None:
            await self._refuse(*(error or (400, "invalid request target")))
            return
        path, raw_path, query = target
        settings = self.settings
        session = websocket.Session(
            self.stream,
            request,
            max_message_bytes=settings.ws_max_message_bytes,
            close_timeout_s=settings.ws_close_timeout_s,
        )
        scope: Scope = {
            "type": "websocket",
            "asgi": _ASGI,
            "http_version": "1.1",
            "scheme": "ws",
            "server": self.local,
            "client": self.client,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": request.headers,
            "subprotocols": websocket.subprotocols(request),
            "extensions": {"websocket.http.response": {}},
        }
        self._ws = session
        self.server.websockets += 1
        if self.draining:
            session.going_away()
        try:
            await session.run(self.app, scope)
        finally:
            self.server.websockets -= 1
            self._ws = None


class _Exchange:
    """The ASGI ``receive`` and ``send`` of one HTTP request."""

    __slots__ = ("_body_done", "_chunked", "_conn", "_continued", "_head_only", "_headers",
                 "_length", "_request", "_sent", "_status", "_waiter", "complete",
                 "head_sent", "keep_alive", "started")  # fmt: skip

    def __init__(self, conn: Connection, request: Request) -> None:
        self._conn = conn
        self._request = request
        self.started = False  # http.response.start received
        self.head_sent = False  # ... and written (with the first body message)
        self.complete = False
        self.keep_alive = False
        self._status = 200
        self._headers: Any = ()
        self._chunked = False
        self._head_only = False
        self._length: int | None = None
        self._sent = 0
        self._body_done = False
        self._continued = False
        self._waiter: trio.CancelScope | None = None

    # -- receive ---------------------------------------------------------------------------

    async def receive(self) -> Message:
        request = self._request
        if not request.complete and self._conn.requests.error is not None:
            await self._abort(*self._conn.requests.error)  # bad chunk, body too large
        if request.body:
            body = request.body[0] if len(request.body) == 1 else b"".join(request.body)
            request.body.clear()
            more = not request.complete
            self._body_done = not more
            return {"type": "http.request", "body": body, "more_body": more}
        if request.complete:
            if not self._body_done:
                self._body_done = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await self._disconnect()
        if self.complete:
            return {"type": "http.disconnect"}
        return await self._more_body()

    async def _more_body(self) -> Message:
        conn, request = self._conn, self._request
        stream, requests = conn.stream, conn.requests
        if request.expect_continue and not self._continued and not self.head_sent:
            self._continued = True  # the application wants the body: ask for it
            await stream.write(h1.CONTINUE)
        timeout = conn.settings.body_timeout_s
        while True:
            data = stream.recv_nowait()
            if data is None:
                data = await conn.wait_recv(trio.current_time() + timeout, _BODY_TIMEOUT)
            if not data:
                return {"type": "http.disconnect"}
            requests.feed(data)
            if request.body or request.complete or requests.error is not None:
                return await self.receive()

    async def _disconnect(self) -> Message:
        """The body was read: wait until the client leaves or the response is complete."""
        conn = self._conn
        requests, stream = conn.requests, conn.stream
        if self.complete or stream.eof:
            return {"type": "http.disconnect"}
        self._waiter = trio.CancelScope()
        if not (requests.ready or requests.incoming or requests.halted or requests.error):
            # Nothing of a next request yet: one read tells whether the client is gone.
            data = await stream.recv_within(self._waiter)
            if data == b"" or data is None:
                return {"type": "http.disconnect"}
            requests.feed(data)
            self._waiter = trio.CancelScope(deadline=-math.inf if self.complete else math.inf)
        with self._waiter:
            await trio.sleep_forever()
        return {"type": "http.disconnect"}

    async def _abort(self, status: int, detail: str) -> NoReturn:
        self._conn.abort(status, detail)
        await checkpoint()
        raise AssertionError("unreachable: the connection's scope is cancelled")

    # -- send ------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started or self.complete:
                raise RuntimeError("http.response.body outside a response")
            await self._body(message.get("body", b""), message.get("more_body", False))
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self._status = message["status"]
            self._headers = message.get("headers", ())
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def _body(self, body: bytes, more: bool) -> None:
        stream = self._conn.stream
        big = None
        if not self.head_sent:
            out = self._head(None if more else len(body))
            self.head_sent = True
            if self._head_only:
                pass
            elif self._chunked:
                out += _chunk(body, more)
            elif len(body) < _BIG_BODY:
                out += body
                self._sent += len(body)
            else:
                big = body
                self._sent += len(body)
        elif self._head_only:
            out = b""
        elif self._chunked:
            out = _chunk(body, more)
        else:
            out = body
            self._sent += len(body)
        if self._length is not None and self._sent > self._length:
            raise RuntimeError("response body longer than its content-length")
        if not more:
            self.complete = True
            if self._length is not None and self._sent < self._length and not self._head_only:
                self.keep_alive = False  # the client waits for bytes that never come
        if big is not None:
            await stream.write_parts(out, big)
        elif out:
            await stream.write(out)
        if self.complete and self._waiter is not None:
            self._waiter.cancel()

    def _head(self, full_length: int | None) -> bytes:
        """The response head; decides the framing and whether the connection stays open.
        ``full_length``: the body's length when the first body message is the last."""
        conn, request = self._conn, self._request
        status = self._status
        parts = [h1.STATUS_LINES[status]]
        length: int | None = None
        chunked = close = date = server = False
        for name, value in self._headers:
            parts += (name, b": ", value, b"\r\n")
            lname = name.lower()
            if lname == b"content-length":
                length = int(value)
            elif lname == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif lname == b"connection":
                close = b"close" in value.lower()
            elif lname == b"date":
                date = True
            elif lname == b"server":
                server = True
        lines = len(parts) // 4 + 2
        no_body = status in _NO_BODY or status < 200
        self._head_only = no_body or request.method == b"HEAD"
        if length is None and not chunked and not no_body:
            if full_length is not None and (full_length or request.method != b"HEAD"):
                parts.append(b"content-length: %d\r\n" % full_length)
                length = full_length
                lines += 1
            elif full_length is not None:
                pass  # HEAD with no body given: its length is unknown; say nothing
            elif request.version == "1.1":
                parts.append(b"transfer-encoding: chunked\r\n")
                chunked = True
                lines += 1
            else:
                close = True  # HTTP/1.0: the end of the body is the end of the connection
        self._chunked = chunked and not self._head_only
        self._length = length
        keep = request.keep_alive and not close and not conn.draining
        if keep and not request.complete:
            # Keep the connection only if the rest of the body can be read and dropped.
            unread = (request.content_length or 0) - request.received
            if request.expect_continue and not self._continued:
                keep = False  # the client may never send it
            elif request.chunked or unread > _DRAIN_BYTES:
                keep = False
        self.keep_alive = keep
        if not keep and not close:
            parts.append(b"connection: close\r\n")
            lines += 1
        elif keep and request.version == "1.0":
            parts.append(b"connection: keep-alive\r\n")
            lines += 1
        if not (date or server):
            parts.append(h1.date_server())
            lines += 2
        elif not date:
            parts.append(h1.date_only())
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        if not h1.head_lines_ok(head, lines):
            raise RuntimeError("invalid response header field (CR or LF inside)")
        return head


def _chunk(body: bytes, more: bool) -> bytes:
    data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
    return data if more else data + b"0\r\n\r\n"


class _Lifespan:
    """ASGI lifespan, when the application speaks it (one that fails on the scope at once
    does not, and is served all the same)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._to_app, self._inbox = trio.open_memory_channel[Message](2)
        self._task_status: trio.TaskStatus[None] | None = None
        self._running = False  # startup complete, shutdown not yet asked
        self._done = trio.Event()
        self.failure: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._task_status = task_status
        self._to_app.send_nowait({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": _ASGI, "state": {}}
        try:
            await self._app(scope, self._inbox.receive, self._send)
        except Exception as exc:
            if self._task_status is not None:
                log.debug("http.lifespan.unsupported error=%r", exc)
            else:
                log.exception("http.lifespan.failed")
        finally:
            self._running = False
            self._done.set()
            self._started()

    def _started(self) -> None:
        if self._task_status is not None:
            status, self._task_status = self._task_status, None
            status.started()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._running = True
            self._started()
        elif kind == "lifespan.startup.failed":
            self.failure = message.get("message") or "lifespan.startup.failed"
            self._started()
        elif kind == "lifespan.shutdown.failed":
            log.error("http.lifespan.shutdown_failed message=%s", message.get("message"))

    async def shutdown(self) -> None:
        if self._running:
            self._running = False
            await self._to_app.send({"type": "lifespan.shutdown"})
            await self._done.wait()


# -- sockets -----------------------------------------------------------------------------


async def _listen(settings: ServerSettings) -> list[socket.socket]:
    host, _, port = settings.bind.rpartition(":")
    infos = await trio.socket.getaddrinfo(
        host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
    user_timeout_ms = int(settings.stalled_client_timeout_s * 1000)
    listeners: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # Accepted sockets inherit both (Linux): no per-connection syscalls. The user
            # timeout bounds what the kernel holds for a client that stopped reading.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if user_timeout is not None and user_timeout_ms > 0:
                sock.setsockopt(socket.IPPROTO_TCP, user_timeout, user_timeout_ms)
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except OSError:
        _close_all(listeners)
        raise
    return listeners


async def _accept_one(listener: socket.socket) -> socket.socket:
    while True:
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            await wait_readable(listener)
            continue
        except OSError as exc:
            if accept_errno_is_aborted(exc):
                continue
            if not accept_errno_is_transient(exc):
                raise
            log.warning("http.accept.backoff error=%s", exc)
            await trio.sleep(0.1)
            continue
        return sock


def _close_all(listeners: list[socket.socket]) -> None:
    for sock in listeners:
        if sock.fileno() != -1:
            notify_closing(sock)
            sock.close()


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return (address[0], address[1])
    return None


def _url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    if listener.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"http://{host}:{port}"
