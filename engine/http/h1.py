"""HTTP/1.1 without I/O: llhttp's callbacks collect requests (``Requests``), the limits
say which status a bad one gets, and response heads and error answers are built here.
The Trio loop in ``server`` feeds bytes in and decides what to do with what comes out."""

from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote

import httptools

from engine.http.settings import ServerSettings

SERVER = b"engine"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Request:
    """One request as the parser collected it: the head, then body pieces as they come."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "content_length",
        "expect_continue",
        "head_done",
        "header_bytes",
        "headers",
        "hosts",
        "keep_alive",
        "max_body",
        "method",
        "received",
        "trailers",
        "trailing",
        "upgrade",
        "url",
        "version",
        "websocket",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.head_done = False
        self.body: list[bytes] = []  # received, not yet handed to the application
        self.received = 0  # body bytes received in all
        self.max_body = 0  # its body's limit (bytes), set with its head
        self.complete = False  # the whole message (body included) was parsed
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.hosts = 0
        self.trailers = 0
        self.upgrade: bytes | None = None  # the Upgrade header's value
        self.websocket = False  # an upgrade to websocket: the connection changes hands
        self.trailing = b""  # bytes after a websocket upgrade request (the first frames)


class _Abort(Exception):
    """Raised in a callback to stop llhttp once a limit is passed (``Requests.error``)."""


class Requests:
    """Feeds llhttp and collects what its callbacks report; decides nothing itself beyond
    which limit a request broke. ``ready`` holds requests whose head is complete, in
    order; ``error`` is set once the byte stream cannot be parsed further."""

    __slots__ = (
        "_body_limits",
        "_max_body",
        "_max_header_bytes",
        "_max_headers",
        "_max_stall",
        "_max_url",
        "_parser",
        "_progress",
        "_stall",
        "error",
        "halted",
        "incoming",
        "ready",
    )

    def __init__(self, settings: ServerSettings) -> None:
        self._max_url = settings.max_url_bytes
        self._max_body = settings.max_body_bytes
        self._body_limits = {path.encode(): n for path, n in settings.body_limits}
        self._max_headers = settings.max_headers
        self._max_header_bytes = settings.max_header_bytes
        # llhttp reports nothing while a header value (or a chunk extension) grows across
        # reads, and httptools keeps what it has: bytes fed without any callback are capped.
        self._max_stall = settings.max_url_bytes + settings.max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        # Any HTTP/d.d gets through llhttp; ``request_error`` answers the ones we do not
        # speak (505), and HTTP/1.x above 1.1 is served as 1.1 (RFC 9110 2.5).
        self._parser.set_dangerous_leniencies(lenient_version=True)
        self._progress = False
        self._stall = 0
        self.ready: deque[Request] = deque()
        self.incoming: Request | None = None  # the request being parsed
        self.error: tuple[int, str] | None = None  # (status, detail): answer it, then close
        self.halted = False  # a websocket upgrade: the bytes after it are not HTTP

    def feed(self, data: bytes) -> None:
        if self.error is not None or self.halted:
            return
        self._progress = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            if self.error is None:
                self.error = _parse_error(exc)
        if self._progress:
            self._stall = 0
            return
        self._stall += len(data)
        if self._stall > self._max_stall and self.error is None:
            head = self.incoming is not None and not self.incoming.head_done
            self.error = (431, "header field too large") if head else (400, "chunk too large")

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after a request with ``Connection: upgrade`` (or CONNECT)."""
        request = self.ready[-1]
        has_body = request.chunked or bool(request.content_length)
        if request.method == b"CONNECT":
            self.ready.pop()
            self.error = (501, "CONNECT is not supported")
        elif has_body:  # llhttp skipped its body: refuse rather than misread it
            self.ready.pop()
            self.error = (400, "an upgrade request cannot have a body")
        elif request.upgrade is not None and b"websocket" in request.upgrade.lower():
            request.websocket = True
            request.trailing = rest
            self.halted = True
        else:  # another protocol (h2c): ignore the offer, go on with HTTP/1.1
            request.upgrade = None
            if rest:
                self.feed(rest)

    def abort(self, status: int, detail: str) -> None:
        if self.error is None:
            self.error = (status, detail)
        raise _Abort

    # -- llhttp callbacks: they only collect -----------------------------------------------

    def on_message_begin(self) -> None:
        self.incoming = Request()
        self._progress = True

    def on_url(self, url: bytes) -> None:
        request = self.incoming
        assert request is not None
        request.url += url
        self._progress = True
        if len(request.url) > self._max_url:
            self.abort(414, f"request target longer than {self._max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.incoming
        assert request is not None
        self._progress = True
        if request.head_done:  # a trailer field: counted, not kept
            request.trailers += 1
            if request.trailers > self._max_headers:
                self.abort(431, f"more than {self._max_headers} trailer fields")
            return
        name = name.lower()
        request.headers.append((name, value))
        request.header_bytes += len(name) + len(value)
        if len(request.headers) > self._max_headers:
            self.abort(431, f"more than {self._max_headers} header fields")
        if request.header_bytes > self._max_header_bytes:
            self.abort(431, f"header fields longer than {self._max_header_bytes} bytes")
        if name == b"content-length":
            request.content_length = int(value)  # llhttp checked: digits, no duplicate
        elif name == b"transfer-encoding":
            request.chunked = True  # llhttp checked: chunked, and last
        elif name == b"host":
            request.hosts += 1
        elif name == b"expect":
            request.expect_continue = value.lower() == b"100-continue"
        elif name == b"upgrade":
            request.upgrade = value

    def on_headers_complete(self) -> None:
        request = self.incoming
        assert request is not None
        parser = self._parser
        request.method = parser.get_method()
        version = parser.get_http_version()
        request.version = "1.1" if version[:2] == "1." and version != "1.0" else version
        request.keep_alive = parser.should_keep_alive()
        request.head_done = True
        request.max_body = self._max_body
        if self._body_limits:
            path = request.url.partition(b"?")[0]
            request.max_body = self._body_limits.get(path, self._max_body)
        self.ready.append(request)
        self._progress = True

    def on_body(self, body: bytes) -> None:
        request = self.incoming
        assert request is not None
        request.body.append(body)
        request.received += len(body)
        self._progress = True
        if request.received > request.max_body:
            self.abort(413, f"request body larger than {request.max_body} bytes")

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_message_complete(self) -> None:
        request = self.incoming
        assert request is not None
        request.complete = True
        self.incoming = None
        self._progress = True


def _parse_error(exc: httptools.HttpParserError) -> tuple[int, str]:
    detail = str(exc) or "malformed request"
    if "version" in detail.lower() or "PRI" in detail:
        return 505, detail
    return 400, detail


def request_error(request: Request, max_body_bytes: int) -> tuple[int, str] | None:
    """What is wrong with a parsed head that llhttp lets through (RFC 9112), if anything."""
    if request.version == "1.1":
        if request.hosts != 1:
            return 400, "an HTTP/1.1 request needs exactly one Host header"
    elif request.version == "1.0":
        if request.hosts > 1:
            return 400, "more than one Host header"
        if request.chunked:  # RFC 9112 6.1: faulty framing
            return 400, "Transfer-Encoding in an HTTP/1.0 request"
    else:
        return 505, f"HTTP/{request.version} is not supported"
    if request.content_length is not None and request.content_length > max_body_bytes:
        return 413, f"request body larger than {max_body_bytes} bytes"
    return None


def split_target(url: bytes) -> tuple[str, bytes, bytes] | None:
    """(path, raw_path, query_string) of a request target, or None when it is unusable."""
    if url[:1] == b"/":
        raw_path, _, query = url.partition(b"?")
    elif url == b"*":
        raw_path, query = url, b""
    elif url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            return None
        raw_path = parsed.path or b"/"
        query = parsed.query or b""
    else:
        return None
    raw_path = raw_path.partition(b"#")[0]
    try:
        path = raw_path.decode("ascii")
    except UnicodeDecodeError:
        return None
    if "%" in path:
        path = unquote(path)
    return path, raw_path, query


# -- responses ---------------------------------------------------------------------------


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")


STATUS_LINES = {status: _status_line(status) for status in range(100, 600)}

_date_second = -1
_date_line = b""
_date_server = b""


def date_server() -> bytes:
    """``date`` and ``server`` header lines; the date is formatted once per second."""
    global _date_second, _date_line, _date_server  # noqa: PLW0603  (a per-process cache)
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        _date_server = _date_line + b"server: " + SERVER + b"\r\n"
    return _date_server


def date_only() -> bytes:
    date_server()
    return _date_line


def check_fields(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Response header fields from the application: no CR, LF or NUL (header injection),
    no colon or space in a name."""
    for name, value in headers:
        if _BAD_NAME.search(name) or _BAD_VALUE.search(value):
            raise RuntimeError(f"invalid response header field {name!r}")


def head_lines_ok(head: bytes, lines: int) -> bool:
    """A response head built from ``lines`` CRLF-terminated lines (the blank one counted)
    holds no other CR or LF: one pass over the joined bytes instead of one per field."""
    return head.count(b"\n") == lines and head.count(b"\r") == lines


_BAD_NAME = re.compile(rb"[\x00-\x20:\x7f]")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")


def error_response(status: int, detail: str, *, keep_alive: bool = False) -> bytes:
    """A whole answer of the server's own (RFC 9457 problem+json), closing unless told."""
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        separators=(",", ":"),
    ).encode()
    extra = b"" if keep_alive else b"connection: close\r\n"
    if status == 426:
        extra += b"sec-websocket-version: 13\r\nupgrade: websocket\r\n"
    return b"".join(
        (
            STATUS_LINES.get(status) or _status_line(status),
            b"content-type: application/problem+json\r\n",
            b"content-length: %d\r\n" % len(body),
            extra,
            date_server(),
            b"\r\n",
            body,
        )
    )
