"""A lean HTTP/1.1 client for provider APIs: keep-alive connections to one origin, a
bounded pool, requests written as bytes in one send, answers parsed by llhttp (httptools).

Knows nothing of email; its failures say how far a request got (``HttpFailure.stage``),
and the providers decide what that means for a mail. Imports only config and errors.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal, NoReturn
from urllib.parse import urlsplit

import httptools
import trio

from engine.errors import ConfigError

Stage = Literal["connect", "send", "answer"]

_RECV_BYTES: Final = 64 * 1024
_MAX_HEAD_BYTES: Final = 64 * 1024  # an answer's status line and header fields together
_SWEEP_S: Final = 1.0  # how often ``serve`` looks at the idle connections
_IO_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


class HttpFailure(Exception):
    """A request got no usable answer. ``stage`` says how far it got: "connect" (no
    connection could be made: refused, DNS, TLS, timed out), "send" (the connection
    failed before the whole request was written: the server cannot have acted on it),
    "answer" (the whole request was written, then no complete status line and header
    came: timeout, connection closed or reset, garbage; the server may have acted)."""

    def __init__(self, message: str, *, stage: Stage) -> None:
        super().__init__(message)
        self.stage: Stage = stage

    @property
    def sent(self) -> bool:
        """The whole request was written before the failure."""
        return self.stage == "answer"


class _Stale(Exception):
    """A kept connection had been closed by the server: nothing of the answer came
    (pool-internal: the request goes once more over a new connection)."""


class _TooLarge(Exception):
    """Raised in a parser callback to stop at ``max_response_bytes``."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-cased, in order
    body: bytes
    # False: the body was cut at max_response_bytes, or the connection ended inside it.
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests go: ``scheme://host:port``, and the path prefix of the base URL."""

    scheme: str
    host: str
    port: int
    prefix: str = ""  # "/v1" of https://api.example.com/v1, never a trailing "/"

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        try:
            parts = urlsplit(base_url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"API base URL {base_url!r}: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"API base URL {base_url!r}: give http(s)://host[:port][/path], "
                "e.g. https://api.eu.mailgun.net"
            )
        if parts.username is not None or parts.query or parts.fragment:
            raise ConfigError(f"API base URL {base_url!r}: no user, query or fragment")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        """The Host field's value (the port only when it is not the scheme's)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.scheme == "https" else 80)
        return host if default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}"


def header_lines(fields: Iterable[tuple[str, str]]) -> bytes:
    """Header fields as request lines (each ending in CRLF); ValueError for a CR, LF or
    NUL in one (a field of its own smuggled in) or a colon or space in a name."""
    out = []
    for name, value in fields:
        if not name or any(c in name for c in ": \r\n\0") or any(c in value for c in "\r\n\0"):
            raise ValueError(f"invalid header field {name!r}")
        out.append(f"{name}: {value}\r\n")
    return "".join(out).encode("utf-8")


def make_ssl_context(*, verify: bool = True, ca_file: str | None = None) -> ssl.SSLContext:
    """The client's TLS context: the system's CAs (plus ``ca_file``), or no checks at all."""
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"providers.tls_ca_file {ca_file!r}: {exc}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- one connection ---------------------------------------------------------------------


class _Connection:
    """One keep-alive connection, and the llhttp parser its answers go through (the
    parser calls the ``on_*`` methods: they only collect).

    A plain connection is a non-blocking socket used directly: a request is one send(2)
    and its answer usually one recv(2) after the wait, without trio's stream layers
    (their extra checkpoints and the recv that would find nothing yet). TLS goes through
    ``trio.SSLStream``.
    """

    __slots__ = (
        "_parser",
        "body",
        "body_bytes",
        "done",
        "framed",
        "head_bytes",
        "head_done",
        "head_too_large",
        "headers",
        "idle_since",
        "keep_alive",
        "max_body",
        "received",
        "reused",
        "sock",
        "stage",
        "status",
        "tls",
        "truncated",
    )

    def __init__(
        self, sock: socket.socket, tls: trio.SSLStream[trio.SocketStream] | None, max_body: int
    ) -> None:
        self.sock = sock  # the TCP socket (under TLS too: for the liveness check)
        self.tls = tls
        self.max_body = max_body
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.reused = False  # answered a request before this one
        self._reset()

    def _reset(self) -> None:
        self.stage: Stage = "send"
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.head_done = False
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.done = False
        self.framed = False  # Content-Length or chunked: the end is known without EOF
        self.keep_alive = False
        self.truncated = False  # the body passed max_body: what fits was kept
        self.head_too_large = False
        self.received = 0  # bytes of the answer received

    # -- llhttp callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:  # bytes after the answer, unasked for: do not reuse the connection
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value)
        if self.head_bytes > _MAX_HEAD_BYTES:
            self.head_too_large = True
            raise _TooLarge
        name = name.lower()
        self.headers.append((name, value))
        if name in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        room = self.max_body - self.body_bytes
        if len(body) > room:
            self.body.append(body[:room])
            self.body_bytes = self.max_body
            self.truncated = True
            raise _TooLarge
        self.body.append(body)
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        if self.status < 200:  # 100 Continue, 103 Early Hints: the answer is still to come
            self.status, self.headers, self.head_bytes, self.head_done = 0, [], 0, False
            return
        self.keep_alive = self._parser.should_keep_alive()
        self.done = True

    # -- I/O ------------------------------------------------------------------------------

    def looks_closed(self) -> bool:
        """Whether the server closed (or wrote to) this idle connection: a kept
        connection at rest gets nothing unless it is being closed. One recv(2)."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # EOF, or bytes nobody asked for
        except BlockingIOError:
            return False
        except OSError:
            pass
        return True

    async def exchange(self, data: bytes) -> Response:
        """Write ``data`` (one request) and read its answer; ``stage`` follows how far
        it got. Raises _Stale or HttpFailure (and what cancels it: the caller's timeout)."""
        self._reset()
        try:
            await self._send(data)
            self.stage = "answer"
            while not self.done:
                chunk = await self._receive()
                if not chunk:
                    return self._at_eof()
                self.received += len(chunk)
                try:
                    self._parser.feed_data(chunk)
                except httptools.HttpParserCallbackError:
                    if self.truncated:
                        return self._answer(complete=False)
                    if self.head_too_large:
                        raise HttpFailure(
                            f"answer head longer than {_MAX_HEAD_BYTES} bytes", stage="answer"
                        ) from None
                    raise
                except httptools.HttpParserError as exc:
                    if self.done:  # bytes after the answer: it stands, the connection not
                        self.keep_alive = False
                        break
                    raise HttpFailure(f"not an HTTP/1.1 answer ({exc})", stage="answer") from None
        except _IO_ERRORS as exc:
            if self.reused and self.received == 0:
                raise _Stale from exc
            if self.head_done:
                return self._answer(complete=False)
            raise HttpFailure(_describe(exc), stage=self.stage) from exc
        return self._answer(complete=True)

    def _at_eof(self) -> Response:
        if self.head_done and not self.framed:  # a body that ends with the connection
            self.keep_alive = False
            return self._answer(complete=True)
        if self.head_done:
            return self._answer(complete=False)
        if self.reused and self.received == 0:
            raise _Stale
        said = "a partial answer" if self.received else "no answer"
        raise HttpFailure(f"the server closed the connection with {said}", stage="answer")

    def _answer(self, *, complete: bool) -> Response:
        if not complete:
            self.keep_alive = False
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        return Response(self.status, self.headers, body, complete)

    async def _send(self, data: bytes) -> None:
        if self.tls is not None:
            await self.tls.send_all(data)
            return
        sock = self.sock
        view = memoryview(data)
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            view = view[sent:]

    async def _receive(self) -> bytes:
        if self.tls is not None:
            return bytes(await self.tls.receive_some(_RECV_BYTES))
        sock = self.sock
        while True:
            # The answer cannot be there yet: wait first, then one recv.
            await trio.lowlevel.wait_readable(sock)
            try:
                return sock.recv(_RECV_BYTES)
            except BlockingIOError:
                continue

    async def aclose(self) -> None:
        if self.tls is not None:
            await trio.aclose_forcefully(self.tls)  # closes the socket too
        else:
            self.sock.close()


def _describe(exc: BaseException) -> str:
    """A short account of a socket or TLS error."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return _describe(exc.__cause__)
    if isinstance(exc, trio.ClosedResourceError):
        return "the connection was closed"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, OSError):
        code = exc.errno
        if code is None and isinstance(exc.__cause__, BaseExceptionGroup):
            # open_tcp_stream: one error per address tried; the first says it.
            tried = [e for e in exc.__cause__.exceptions if isinstance(e, OSError)]
            code = tried[0].errno if tried else None
        if code is not None:
            return "connection reset" if code == errno.ECONNRESET else os.strerror(code).lower()
        return str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


# -- the pool ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Http1PoolStatistics:
    open: int  # connections open now (idle + in use)
    idle: int  # open connections waiting in the pool
    connects: int  # connections opened since the pool was made
    requests: int  # requests answered (any status)
    # Requests that met a kept connection the server had closed, before any answer,
    # and went once more over a new one.
    stale: int
    idle_closed: int  # idle connections closed: expired, or closed by the server


class Http1Pool:
    """Connections to one origin, reused most-recent first, at most ``max_connections``
    at once (a request waits for one). Safe to use from many tasks at once.

    A request that meets a kept connection the server closed while it idled (EOF or a
    reset before any byte of the answer) goes once more over a new connection. ``serve``
    closes idle connections the server closed, or that idled ``idle_timeout_s``; without
    it the same checks happen when a connection is taken.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 16,
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 20.0,
        max_response_bytes: int = 64 * 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.origin = Origin.parse(base_url)
        if max_connections < 1 or min(connect_timeout_s, idle_timeout_s) <= 0:
            raise ConfigError("an HTTP pool needs max_connections >= 1 and timeouts > 0")
        self._connect_timeout_s = connect_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._max_body = max_response_bytes
        self._ssl = ssl_context
        if self.origin.scheme == "https" and ssl_context is None:
            self._ssl = make_ssl_context()
        self._head = f"Host: {self.origin.host_header}\r\n".encode("ascii")
        self._slots = trio.Semaphore(max_connections)
        self._idle: list[_Connection] = []  # LIFO: the most recently used on top
        self._open = 0
        self._connects = 0
        self._requests = 0
        self._stale = 0
        self._idle_closed = 0
        self._closed = False

    def statistics(self) -> Http1PoolStatistics:
        return Http1PoolStatistics(
            self._open, len(self._idle), self._connects, self._requests, self._stale,
            self._idle_closed,
        )  # fmt: skip

    async def request(
        self, method: bytes, path: bytes, headers: bytes, body: bytes, *, timeout_s: float
    ) -> Response:
        """``method path`` (``path`` after the origin's prefix) with ``headers`` (CRLF
        lines: ``header_lines``; Host and Content-Length are added) and ``body``. The
        answer within ``timeout_s`` of the first byte written, or HttpFailure."""
        data = b"%s %s%s HTTP/1.1\r\n%sContent-Length: %d\r\n%s\r\n%s" % (
            method, self.origin.prefix.encode("ascii"), path, self._head, len(body), headers,
            body,
        )  # fmt: skip
        async with self._slots:
            conn = self._checkout()
            for _ in range(2):
                if conn is None:
                    conn = await self._connect()
                try:
                    with trio.fail_after(timeout_s):
                        response = await conn.exchange(data)
                except _Stale:
                    self._stale += 1
                    await self._discard(conn)
                    conn = None
                    continue
                except trio.TooSlowError:
                    await self._discard(conn)
                    what = "no answer" if conn.stage == "answer" else "the request was not written"
                    raise HttpFailure(
                        f"{what} within {timeout_s:g}s ({self.origin})", stage=conn.stage
                    ) from None
                except HttpFailure as exc:
                    await self._discard(conn)
                    raise HttpFailure(f"{exc} ({self.origin})", stage=exc.stage) from None
                except BaseException:  # cancelled mid-request: the connection's state is unknown
                    await self._discard(conn)
                    raise
                self._requests += 1
                if response.complete and conn.keep_alive and not self._closed:
                    conn.reused = True
                    conn.idle_since = trio.current_time()
                    self._idle.append(conn)
                else:
                    await self._discard(conn)
                return response
        raise HttpFailure(
            f"two connections were closed before answering ({self.origin})", stage="answer"
        )

    def _checkout(self) -> _Connection | None:
        """The most recently used live idle connection; expired ones and ones the
        server closed are dropped on the way (synchronously: nothing else runs)."""
        cutoff = trio.current_time() - self._idle_timeout_s
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_since >= cutoff and not conn.looks_closed():
                return conn
            self._idle_closed += 1
            self._close_now(conn)
        return None

    async def _connect(self) -> _Connection:
        if self._closed:
            raise HttpFailure(f"the HTTP pool for {self.origin} is closed", stage="connect")
        origin = self.origin
        try:
            with trio.fail_after(self._connect_timeout_s):
                stream = await trio.open_tcp_stream(origin.host, origin.port)
                tls: trio.SSLStream[trio.SocketStream] | None = None
                if self._ssl is not None:
                    tls = trio.SSLStream(
                        stream, self._ssl, server_hostname=origin.host, https_compatible=True
                    )
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(stream)
                        raise
        except trio.TooSlowError:
            raise HttpFailure(
                f"connect to {origin}: no connection within {self._connect_timeout_s:g}s",
                stage="connect",
            ) from None
        except _IO_ERRORS as exc:
            raise HttpFailure(f"connect to {origin}: {_describe(exc)}", stage="connect") from None
        if tls is None:
            # The socket is used directly from here on (see _Connection).
            sock = socket.socket(fileno=stream.socket.detach())
            sock.setblocking(False)
        else:
            sock = socket.socket(fileno=os.dup(stream.socket.fileno()))  # only peeked at
            sock.setblocking(False)
        self._open += 1
        self._connects += 1
        return _Connection(sock, tls, self._max_body)

    def _close_now(self, conn: _Connection) -> None:
        """Close a plain connection at once; a TLS one's stream is dropped (its socket
        closed) without the close_notify exchange."""
        self._open -= 1
        conn.sock.close()
        if conn.tls is not None:
            conn.tls.transport_stream.socket.close()

    async def _discard(self, conn: _Connection) -> None:
        self._open -= 1
        with trio.CancelScope(shield=True):  # no I/O for a plain one; forceful for TLS
            if conn.tls is not None:
                conn.sock.close()
            await conn.aclose()

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Every second, close the idle connections that expired or that the server
        closed: no socket lingers half-closed (CLOSE-WAIT) while the pool is quiet."""
        task_status.started()
        while True:
            await trio.sleep(_SWEEP_S)
            cutoff = trio.current_time() - self._idle_timeout_s
            keep = []
            for conn in self._idle:
                if conn.idle_since >= cutoff and not conn.looks_closed():
                    keep.append(conn)
                else:
                    self._idle_closed += 1
                    self._close_now(conn)
            self._idle = keep

    async def aclose(self) -> None:
        """Close every idle connection; those in use close as their requests end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._close_now(conn)
        await trio.lowlevel.checkpoint()
