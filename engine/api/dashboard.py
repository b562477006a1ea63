"""The operator dashboard: the page at ``/``, its static files, and the JSON it polls
(``GET /v1/stats``, ``GET /v1/sink/messages``). Reads Redis only through ``Queue``.
"""

from __future__ import annotations

import email.policy
import hashlib
import heapq
import os
import re
from collections.abc import Callable
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Final

import msgspec
import trio

from engine.api.backend import ApiBackend
from engine.api.exchange import Fail, Headers, Reply, Request, empty_reply, json_reply, not_found
from engine.api.preview import HTML_HEADERS, preview_of
from engine.api.transports import TransportView, transport_view
from engine.models import ms_to_iso

STATIC_DIR: Final = Path(__file__).parent / "static"
# The only files served under /static/ (no directory walking, no path from the URL).
ASSETS: Final = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
}
_PAGE: Final = "index.html"
_DOCS: Final = "docs.html"
# Same-origin only: the page loads nothing from elsewhere and runs no inline script.
_SAFE: Final = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
_PAGE_HEADERS: Final = [
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
        b"script-src 'self'; style-src 'self'; base-uri 'none'; frame-ancestors 'none'; "
        b"form-action 'none'",
    ),
    *_SAFE,
]
# The API reference (Redoc) injects its styles and runs its search in a blob worker.
_DOCS_HEADERS: Final = [
    (
        b"content-security-policy",
        b"default-src 'self'; connect-src 'self'; img-src 'self' data:; font-src 'self' data:; "
        b"script-src 'self'; style-src 'self' 'unsafe-inline'; worker-src 'self' blob:; "
        b"base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    ),
    *_SAFE,
]
_NO_STORE: Final = (b"cache-control", b"no-store")

SINK_PAGE_MAX: Final = 500
# A message's header block is read up to this many bytes (the body is never read).
_HEADER_MAX_BYTES: Final = 64 * 1024
# Names our sink (and most MDAs) give: "<seconds>.M<microseconds>P<pid>..."
_MAILDIR_NAME = re.compile(r"(\d+)\.M(\d+)P")


class StatsTotals(msgspec.Struct, frozen=True):
    enqueued: int
    sent: int
    failed: int
    cancelled: int
    throttled: int
    reaped: int


class Stats(msgspec.Struct, frozen=True):
    """Answer of GET /v1/stats: queue-wide counts (all replicas) and this replica's senders."""

    at: int  # when counted, ms since the epoch (the answering replica's clock)
    ready: int
    ready_by_lane: dict[str, int]
    processing: int
    delayed: int
    dead: int
    instances: int
    totals: StatsTotals
    senders: int  # running on the replica that answered
    transports: list[TransportView]  # the dashboard shows a banner while one is down


class SinkMessage(msgspec.Struct, frozen=True, rename={"sender": "from"}):
    """One message the embedded sink captured (headers only)."""

    key: str  # Maildir file name
    received_at: str
    sender: str | None
    to: str | None
    subject: str | None
    date: str | None
    message_id: str | None
    job_id: str | None  # X-Engine-Job-Id
    size: int  # bytes


class SinkPage(msgspec.Struct, frozen=True):
    maildir: str
    total: int
    items: list[SinkMessage]


class _Asset(msgspec.Struct, frozen=True):
    body: bytes
    content_type: bytes
    etag: bytes


class StaticFiles:
    """The page and its assets, read from the package once (off the Trio loop) and cached."""

    def __init__(self, root: Path = STATIC_DIR) -> None:
        self._root = root
        self._cache: dict[str, _Asset] = {}

    async def get(self, name: str) -> _Asset | None:
        if name in self._cache:
            return self._cache[name]
        content_type = ASSETS.get(name) or (
            "text/html; charset=utf-8" if name in (_PAGE, _DOCS) else None
        )
        if content_type is None:
            return None
        body = await trio.Path(self._root / name).read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode() + b'"'
        asset = self._cache[name] = _Asset(body, content_type.encode(), etag)
        return asset


def _respond(req: Request, asset: _Asset, extra: Headers) -> Reply:
    headers = [(b"etag", asset.etag), (b"cache-control", b"no-cache"), *extra]
    if req.header(b"if-none-match") == asset.etag:
        return empty_reply(304, headers)
    return Reply(200, asset.body, asset.content_type, headers)


def _header(msg: EmailMessage, name: str) -> str | None:
    try:
        value = msg.get(name)
    except (ValueError, TypeError, IndexError):  # a header too broken to parse
        return None
    return None if value is None else str(value)


def _received_us(entry: os.DirEntry[str]) -> int:
    """When the message arrived (µs since the epoch): from its name, else its mtime."""
    m = _MAILDIR_NAME.match(entry.name)
    if m:
        return int(m[1]) * 1_000_000 + int(m[2])
    try:
        return entry.stat().st_mtime_ns // 1000
    except FileNotFoundError:
        return 0


def read_maildir(root: Path, limit: int) -> SinkPage:
    """The newest ``limit`` messages of a Maildir (new/ and cur/), headers only.

    Blocking: run it in a worker thread. Files moved away meanwhile are skipped.
    """
    entries: list[os.DirEntry[str]] = []
    for sub in ("new", "cur"):
        try:
            with os.scandir(root / sub) as it:
                entries += [e for e in it if not e.name.startswith(".")]
        except FileNotFoundError:
            continue
    newest = heapq.nlargest(limit, ((_received_us(e), e) for e in entries), key=lambda p: p[0])
    parser = BytesHeaderParser(policy=email.policy.default)
    items: list[SinkMessage] = []
    for received_us, entry in newest:
        try:
            with open(entry.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = _read_header_block(f.readline)
        except FileNotFoundError:
            continue
        msg = parser.parsebytes(head)
        assert isinstance(msg, EmailMessage)  # policy.default makes EmailMessage
        items.append(
            SinkMessage(
                key=entry.name.split(":", 1)[0],
                received_at=ms_to_iso(received_us // 1000),
                sender=_header(msg, "From"),
                to=_header(msg, "To"),
                subject=_header(msg, "Subject"),
                date=_header(msg, "Date"),
                message_id=_header(msg, "Message-ID"),
                job_id=_header(msg, "X-Engine-Job-Id"),
                size=size,
            )
        )
    return SinkPage(str(root), len(entries), items)


_MAILDIR_KEY: Final = re.compile(r"[A-Za-z0-9._-]{1,200}")


def read_maildir_message(root: Path, key: str) -> bytes | None:
    """The message whose file name starts with ``key`` (its name before ``:``), or None.
    Blocking: run it in a worker thread."""
    for sub in ("new", "cur"):
        try:
            with os.scandir(root / sub) as it:
                for entry in it:
                    if entry.name.split(":", 1)[0] == key:
                        try:
                            return Path(entry.path).read_bytes()
                        except FileNotFoundError:
                            return None
        except FileNotFoundError:
            continue
    return None


def _read_header_block(readline: Callable[[int], bytes]) -> bytes:
    lines: list[bytes] = []
    budget = _HEADER_MAX_BYTES
    while budget > 0:
        line = readline(budget)
        if not line or line in (b"\r\n", b"\n"):
            break
        lines.append(line)
        budget -= len(line)
    return b"".join(lines)


class DashboardRoutes:
    """Handlers of the page, its files and the JSON it polls."""

    def __init__(self, backend: ApiBackend) -> None:
        self._backend = backend
        self._static = StaticFiles()

    async def dashboard(self, req: Request) -> Reply:
        asset = await self._static.get(_PAGE)
        assert asset is not None
        return _respond(req, asset, _PAGE_HEADERS)

    async def docs(self, req: Request) -> Reply:
        asset = await self._static.get(_DOCS)
        assert asset is not None
        return _respond(req, asset, _DOCS_HEADERS)

    async def static(self, req: Request) -> Reply:
        name = req.params["name"]
        found = await self._static.get(name) if name in ASSETS else None
        if found is None:
            raise not_found("Not Found", f"no static file {name!r}")
        return _respond(req, found, [(b"x-content-type-options", b"nosniff")])

    async def stats(self, _: Request) -> Reply:
        backend = self._backend
        c = await backend.queue.counts()
        body = Stats(
            at=backend.queue.now_ms(),
            ready=c.ready,
            ready_by_lane=c.ready_by_lane,
            processing=c.processing,
            delayed=c.delayed,
            dead=c.dead,
            instances=c.instances,
            totals=StatsTotals(
                enqueued=c.enqueued_total,
                sent=c.sent_total,
                failed=c.failed_total,
                cancelled=c.cancelled_total,
                throttled=c.throttled_total,
                reaped=c.reaped_total,
            ),
            senders=backend.senders.statistics().running,
            transports=[await transport_view(b) for b in backend.breakers],
        )
        return json_reply(200, body, [_NO_STORE])

    async def sink_messages(self, req: Request) -> Reply:
        maildir = self._backend.sink_maildir
        if maildir is None:
            raise Fail(
                404,
                "no-sink",
                "No embedded sink",
                "this engine sends to an external SMTP server (smtp.url is set) or its "
                "embedded sink keeps no mail (sink.maildir is empty)",
            )
        limit = req.int_query("limit", 50, 1, SINK_PAGE_MAX)
        body = await trio.to_thread.run_sync(read_maildir, Path(maildir), limit)
        return json_reply(200, body, [_NO_STORE])

    async def sink_message_html(self, req: Request) -> Reply:
        """A captured message's html, for the preview frame (its own strict CSP)."""
        maildir = self._backend.sink_maildir
        key = req.params["key"]
        raw = None
        if maildir is not None and _MAILDIR_KEY.fullmatch(key):
            raw = await trio.to_thread.run_sync(read_maildir_message, Path(maildir), key)
        html = preview_of(raw).html if raw is not None else None
        if html is None:
            raise not_found("No html", f"no captured message {key!r} with an html part")
        return Reply(200, html.encode(), b"text/html; charset=utf-8", list(HTML_HEADERS))

    async def sink_message_preview(self, req: Request) -> Reply:
        """One captured message read back: headers, text, html, attachments."""
        maildir = self._backend.sink_maildir
        key = req.params["key"]
        if maildir is None or not _MAILDIR_KEY.fullmatch(key):
            raise not_found("No such captured message", f"key {key!r}")
        raw = await trio.to_thread.run_sync(read_maildir_message, Path(maildir), key)
        if raw is None:
            raise not_found("No such captured message", f"key {key!r}")
        return json_reply(200, preview_of(raw), [_NO_STORE])
