"""Webhook POSTs over HTTP/1.1 (h11), to addresses checked by ``target``: bounded in time
and in how much of an answer is read; redirects are not followed (a 3xx is a failed
delivery). Each endpoint keeps a few idle keep-alive connections (a new connection costs
more than the request); a request that meets a connection the endpoint closed while it
sat idle is sent again on a fresh one, once.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from typing import Final

import h11
import trio

from engine.webhooks.target import IPNetwork, Refused, Target, parse_url, resolve

SNIPPET_BYTES: Final = 512
IDLE_S: Final = 30.0  # an idle connection older than this is closed, not reused
_IDLE_KEPT: Final = 8  # idle connections kept per endpoint


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 0: no HTTP answer (refused, unreachable, timed out)
    snippet: str  # the start of the body, or what went wrong
    elapsed_ms: int


class _Stale(Exception):
    """A kept connection was closed by the other side before it answered anything."""


@dataclass(slots=True)
class _Conn:
    stream: trio.abc.Stream
    h11: h11.Connection
    since: float = field(default_factory=time.monotonic)
    used: bool = False  # answered a request before: it may have been closed while idle


class EndpointClient:
    """Connections to one URL."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        max_response_bytes: int,
        allow: list[IPNetwork],
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self._timeout_s = timeout_s
        self._max_bytes = max_response_bytes
        self._allow = allow
        self._ssl = ssl_context
        self._idle: list[_Conn] = []
        self._target: Target | None = None

    async def post(
        self, body: bytes, headers: list[tuple[str, str]], *, timeout_s: float | None = None
    ) -> Answer:
        """POST ``body``; no answer within ``timeout_s`` (default: the client's) is a
        failed delivery with status 0."""
        start = time.monotonic()
        limit = self._timeout_s if timeout_s is None else min(timeout_s, self._timeout_s)

        def done(status: int, snippet: str) -> Answer:
            return Answer(status, snippet[:SNIPPET_BYTES], int((time.monotonic() - start) * 1000))

        try:
            target = self._target = self._target or parse_url(self.url)
        except Refused as exc:
            return done(0, f"refused: {exc}")
        with trio.move_on_after(limit):
            try:
                for _ in range(2):
                    conn = await self._reuse() or await self._connect(target)
                    try:
                        status, snippet = await self._exchange(conn, target, body, headers)
                    except _Stale:
                        await trio.aclose_forcefully(conn.stream)
                        continue
                    except BaseException:
                        await trio.aclose_forcefully(conn.stream)
                        raise
                    await self._keep(conn)
                    return done(status, snippet)
                return done(0, "the connection closed before an answer")
            except Refused as exc:
                return done(0, f"refused: {exc}")
            except (OSError, trio.BrokenResourceError, ssl.SSLError, h11.ProtocolError) as exc:
                return done(0, f"{type(exc).__name__}: {exc}")
        return done(0, f"no answer within {limit:g} s")

    async def aclose(self) -> None:
        for conn in self._idle:
            await trio.aclose_forcefully(conn.stream)
        self._idle.clear()

    async def _reuse(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if time.monotonic() - conn.since < IDLE_S:
                return conn
            await trio.aclose_forcefully(conn.stream)
        return None

    async def _keep(self, conn: _Conn) -> None:
        c = conn.h11
        if c.our_state is h11.DONE and c.their_state is h11.DONE and len(self._idle) < _IDLE_KEPT:
            c.start_next_cycle()
            conn.since, conn.used = time.monotonic(), True
            self._idle.append(conn)
        else:  # closed by them, or an answer we stopped reading: not reusable
            await trio.aclose_forcefully(conn.stream)

    async def _connect(self, target: Target) -> _Conn:
        ip = await resolve(target, self._allow)  # checked, then connected to: no rebinding
        stream: trio.abc.Stream = await trio.open_tcp_stream(str(ip), target.port)
        if target.scheme == "https":
            context = self._ssl or ssl.create_default_context()
            tls = trio.SSLStream(stream, context, server_hostname=target.host)
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            stream = tls
        return _Conn(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=16 * 1024))

    async def _exchange(
        self, conn: _Conn, target: Target, body: bytes, headers: list[tuple[str, str]]
    ) -> tuple[int, str]:
        c = conn.h11
        reused = conn.used
        default_port = target.port in (80, 443)
        request = h11.Request(
            method="POST",
            target=target.path,
            headers=[
                ("Host", target.host if default_port else f"{target.host}:{target.port}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("User-Agent", "engine-webhooks"),
                *headers,
            ],
        )
        try:
            await conn.stream.send_all(
                c.send(request) + c.send(h11.Data(data=body)) + c.send(h11.EndOfMessage())
            )
        except (trio.BrokenResourceError, OSError):
            if reused:
                raise _Stale from None
            raise
        status = 0
        got = bytearray()
        while True:
            event = c.next_event()
            if event is h11.NEED_DATA:
                data = await conn.stream.receive_some(16 * 1024)
                if not data and reused and status == 0:
                    raise _Stale
                c.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                got += event.data[: self._max_bytes - len(got)]
                if len(got) >= self._max_bytes:
                    break  # enough read; the connection is not kept (the rest is unread)
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                if reused and status == 0:
                    raise _Stale
                break
        return status, got[:SNIPPET_BYTES].decode("utf-8", "replace")
