"""HTTP/1.1 conformance as a table: raw-byte requests and the answers RFC 9110/9112 (and
RFC 6455 for websockets) call for, sent over TCP to the built-in server and to hypercorn
(trio worker) serving the same app, with the same assertions. A row hypercorn fails
where it is the one that differs from the RFCs (or has no such limit) is xfail for it,
with the reason; the built-in server must pass every row."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.http_support import KINDS, SEEN, Closed, Running, connect, mask_date, running

H = b"Host: test\r\n"


@dataclass
class Expect:
    status: int | tuple[int, ...]
    headers: dict[bytes, bytes | None] = field(default_factory=dict)  # None: absent
    body: bytes | None = None
    echo: dict[str, Any] | None = None  # keys of the /echo JSON that must match
    head: bool = False  # the answer to a HEAD request


@dataclass
class Row:
    id: str
    send: bytes
    expect: list[Expect]
    open: bool | None  # does the connection serve another request after? None: either
    hypercorn: str | None = None  # why hypercorn fails this row (xfail), if it does
    hangs: bool = False  # ... by waiting: not run for hypercorn (the suite stays fast)


def get(path: bytes = b"/echo", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + path + b" HTTP/" + version + b"\r\n" + H + extra + b"\r\n"


def post(body: bytes, extra: bytes = b"", path: bytes = b"/echo") -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\n" + H
    return head + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


def chunked(raw_body: bytes, extra: bytes = b"", path: bytes = b"/echo") -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    return head + extra + b"\r\n" + raw_body


BAD = Expect(400, {b"connection": b"close"})
NO_LIMIT = "hypercorn has no such limit: the request reaches the application"
# A hypercorn row marked ``hangs`` is an xfail not run: hypercorn waits there (for a body
# or a deadline it does not have) and the suite stays fast.

ROWS = [
    # -- framing, keep-alive, versions --------------------------------------------------
    Row("get", get(), [Expect(200, echo={"method": "GET", "path": "/echo"})], open=True),
    Row("keep-alive-default-1.1", get() + get(b"/hello"),
        [Expect(200), Expect(200, body=b"hello")], open=True),
    Row("pipelined-in-order",
        get(b"/echo?n=1") + post(b"two", path=b"/echo?n=2") + get(b"/echo?n=3"),
        [Expect(200, echo={"query": "n=1"}), Expect(200, echo={"query": "n=2", "body": "two"}),
         Expect(200, echo={"query": "n=3"})], open=True),
    Row("content-length-body", post(b"hello"), [Expect(200, echo={"body": "hello"})],
        open=True),
    Row("chunked-body", chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        [Expect(200, echo={"body": "hello world"})], open=True),
    Row("chunked-extension-and-trailer",
        chunked(b"5;name=value\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n"),
        [Expect(200, echo={"body": "hello"})], open=True),
    Row("head-has-no-body",
        b"HEAD /hello HTTP/1.1\r\n" + H + b"\r\n",
        [Expect(200, {b"content-length": b"5"}, head=True)], open=True),
    Row("http-1.0-closes", get(version=b"1.0"),
        [Expect(200, echo={"http_version": "1.0"})], open=False),
    Row("http-1.0-keep-alive", get(extra=b"Connection: keep-alive\r\n", version=b"1.0"),
        [Expect(200, {b"connection": b"keep-alive"})], open=True,
        hypercorn="closes: allowed (RFC 9112 C.2.2 makes 1.0 keep-alive optional); we keep"),
    Row("http-1.0-stream-close-delimited", get(b"/stream", version=b"1.0"),
        [Expect(200, {b"transfer-encoding": None}, body=b"one,two,three")], open=False),
    Row("connection-close", get(extra=b"Connection: close\r\n"),
        [Expect(200, {b"connection": b"close"})], open=False),
    Row("chunked-response", get(b"/stream"),
        [Expect(200, {b"transfer-encoding": b"chunked"}, body=b"one,two,three")], open=True),
    Row("204-no-body", get(b"/status?code=204"),
        [Expect(204, {b"transfer-encoding": None})], open=True),
    Row("304-no-body", get(b"/status?code=304"),
        [Expect(304, {b"transfer-encoding": None})], open=True),
    Row("absolute-form-target", get(b"http://test/echo?a=1"),
        [Expect(200, echo={"path": "/echo", "query": "a=1"})], open=True,
        hypercorn="hands 'http://test/echo' over as the path; RFC 9112 3.2.2: a server "
                  "MUST accept the absolute-form"),
    Row("percent-encoded-path", get(b"/echo/a%20b"),
        [Expect(200, echo={"path": "/echo/a b", "raw_path": "/echo/a%20b"})], open=True),
    Row("leading-empty-line-ignored", b"\r\n" + get(), [Expect(200)], open=True,
        hypercorn="answers 400; RFC 9112 2.2: a server SHOULD ignore an empty line first"),
    Row("http-1.2-served-as-1.1", get(version=b"1.2"), [Expect(200)], open=True),
    Row("h2c-upgrade-offer-ignored",
        get(extra=b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                  b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
        [Expect(200)], open=None,
        hypercorn="switches to HTTP/2 (101) on an h2c offer: allowed, but not this table"),
    Row("date-and-server-headers", get(b"/hello"),
        [Expect(200, {b"date": ..., b"server": ...})], open=True),  # type: ignore[dict-item]
    Row("app-fails-before-answering", get(b"/fail"), [Expect(500)], open=None),
    Row("response-header-injection-refused", get(b"/inject"), [Expect(500)], open=None),
    # -- limits ---------------------------------------------------------------------------
    Row("target-too-long-414", get(b"/echo?" + b"a" * 1100),
        [Expect(414, {b"connection": b"close"})], open=False, hypercorn=NO_LIMIT),
    Row("too-many-header-fields-431",
        get(extra=b"".join(b"X-%d: 1\r\n" % i for i in range(25))),
        [Expect(431, {b"connection": b"close"})], open=False, hypercorn=NO_LIMIT),
    Row("header-fields-too-large-431", get(extra=b"X-Big: " + b"a" * 2100 + b"\r\n"),
        [Expect(431, {b"connection": b"close"})], open=False, hypercorn=NO_LIMIT),
    Row("head-larger-than-any-buffer-431", get(extra=b"X-Big: " + b"a" * 9000 + b"\r\n"),
        [Expect(431, {b"connection": b"close"})], open=False,
        hypercorn="no such limit: h11's buffer cap only applies to a head still incomplete "
                  "after a read"),
    Row("declared-body-too-large-413",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5000\r\n\r\n" + b"a" * 100,
        [Expect(413, {b"connection": b"close"})], open=False, hypercorn=NO_LIMIT, hangs=True),
    Row("chunked-body-too-large-413", chunked(b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n"),
        [Expect(413, {b"connection": b"close"})], open=False, hypercorn=NO_LIMIT),
    Row("unread-small-body-then-next-request", post(b"ignored", path=b"/nobody") + get(),
        [Expect(200, body=b"unread"), Expect(200)], open=True),
    # -- malformed: 400 and close -------------------------------------------------------
    Row("garbage-request-line", b"GARBAGE\r\n\r\n", [BAD], open=False),
    Row("invalid-method-token", b"G@T /echo HTTP/1.1\r\n" + H + b"\r\n", [BAD], open=False),
    Row("space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", [BAD], open=False),
    Row("missing-host-1.1", b"GET /echo HTTP/1.1\r\n\r\n", [BAD], open=False),
    Row("two-host-fields", get(extra=b"Host: other\r\n"), [BAD], open=False),
    Row("space-before-colon", get(extra=b"X-A : 1\r\n"), [BAD], open=False),
    Row("bare-cr-in-field", get(extra=b"X-A: 1\rX-B: 2\r\n"), [BAD], open=False),
    Row("nul-in-field-value", get(extra=b"X-A: 1\x002\r\n"), [BAD], open=False),
    Row("obs-fold", get(extra=b"X-A: 1\r\n 2\r\n"), [BAD], open=False,
        hypercorn="h11 unfolds it (RFC 9112 5.2 allows that too; we refuse)"),
    Row("http-0.9", b"GET /echo\r\n\r\n", [Expect((400, 505))], open=False),
    Row("http-2-prior-knowledge", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        [Expect((400, 505))], open=False, hypercorn="speaks HTTP/2 with prior knowledge",
        hangs=True),
    Row("connect-method", b"CONNECT test:443 HTTP/1.1\r\nHost: test:443\r\n\r\n",
        [Expect((400, 405, 501))], open=False,
        hypercorn="hands CONNECT to the application as an ordinary request"),
    # -- smuggling ----------------------------------------------------------------------
    Row("content-length-and-transfer-encoding",
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        [BAD], open=False,
        hypercorn="lets Transfer-Encoding win and keeps the connection open; RFC 9112 6.1: "
                  "the server MUST close after answering"),
    Row("two-different-content-lengths", post(b"hello", b"Content-Length: 6\r\n"),
        [BAD], open=False),
    Row("repeated-equal-content-length", post(b"hello", b"Content-Length: 5\r\n"),
        [BAD], open=False, hypercorn="merges equal values (RFC 9110 8.6 allows it)"),
    Row("content-length-list", b"POST /echo HTTP/1.1\r\n" + H
        + b"Content-Length: 5, 5\r\n\r\nhello", [BAD], open=False,
        hypercorn="accepts a list of equal values (RFC 9110 8.6 allows it)"),
    Row("content-length-plus-sign", b"POST /echo HTTP/1.1\r\n" + H
        + b"Content-Length: +5\r\n\r\nhello", [BAD], open=False),
    Row("content-length-hex", b"POST /echo HTTP/1.1\r\n" + H
        + b"Content-Length: 0x5\r\n\r\nhello", [BAD], open=False),
    Row("content-length-negative", b"POST /echo HTTP/1.1\r\n" + H
        + b"Content-Length: -1\r\n\r\n", [BAD], open=False),
    Row("invalid-chunk-size", chunked(b"zz\r\nhello\r\n0\r\n\r\n"),
        [BAD], open=False),
    Row("chunk-size-overflow", chunked(b"ffffffffffffffffff1\r\nhello\r\n0\r\n\r\n"),
        [Expect((400, 413), {b"connection": b"close"})], open=False,
        hypercorn="takes a 76-bit chunk size and waits for it (not run: it hangs); RFC "
                  "9112 7.1: recipients MUST guard against overflow", hangs=True),
    Row("chunk-data-longer-than-size", chunked(b"3\r\nhello\r\n0\r\n\r\n"),
        [BAD], open=False),
    Row("transfer-encoding-not-chunked-last",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        [BAD], open=False,
        hypercorn="answers 501; RFC 9112 6.3: 400 when chunked is not the final coding"),
    Row("transfer-encoding-unknown",
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nhello",
        [Expect((400, 501), {b"connection": b"close"})], open=False),
    Row("transfer-encoding-in-http-1.0",
        b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        [BAD], open=False,
        hypercorn="serves it (then closes); RFC 9112 6.1: treat the framing as faulty"),
]  # fmt: skip


def _cases() -> list[Any]:
    cases = []
    for row in ROWS:
        for kind in KINDS:
            marks = []
            if kind == "hypercorn" and row.hypercorn:
                marks.append(pytest.mark.xfail(reason=row.hypercorn, strict=True,
                                               run=not row.hangs))  # fmt: skip
            cases.append(pytest.param(kind, row, id=f"{kind}-{row.id}", marks=marks))
    return cases


@pytest.mark.parametrize(("kind", "row"), _cases())
async def test_table(kind: str, row: Row) -> None:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(5):
            await client.send(row.send)
            for expect in row.expect:
                try:
                    answer = await client.answer(head=expect.head)
                except Closed:
                    pytest.fail(f"closed without an answer (wanted {expect.status})")
                statuses = expect.status if isinstance(expect.status, tuple) else (expect.status,)
                assert answer.status in statuses, answer
                for name, value in expect.headers.items():
                    if value is None:
                        assert answer.header(name) is None, (name, answer)
                    elif value is ...:
                        assert answer.header(name), (name, answer)
                    else:
                        assert (answer.header(name) or b"").lower() == value, (name, answer)
                if expect.body is not None:
                    assert answer.body == expect.body
                if expect.echo is not None:
                    echoed = answer.json()
                    assert {k: echoed[k] for k in expect.echo} == expect.echo
            if row.open is True:
                await client.send(get(b"/hello"))
                assert (await client.answer()).body == b"hello"
            elif row.open is False:
                assert await client.closed(), "the connection should be closed"


# -- Expect: 100-continue ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_expect_continue_sent_when_the_app_reads_the_body(kind: str) -> None:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(3):
            await client.send(b"POST /echo HTTP/1.1\r\n" + H
                              + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
            interim = await client.answer(informational=True)
            assert interim.status == 100
            await client.send(b"hello")
            answer = await client.answer()
            assert answer.status == 200
            assert answer.json()["body"] == "hello"


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(
        reason="sends 100 before the application asks for the body (allowed by RFC 9110 "
               "10.1.1, but the client then sends a body nobody reads)", strict=True))],
)  # fmt: skip
async def test_expect_continue_not_sent_when_the_app_answers_without_the_body(
    kind: str,
) -> None:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(3):
            await client.send(b"POST /nobody HTTP/1.1\r\n" + H
                              + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n")  # fmt: skip
            answer = await client.answer(informational=True)
            assert answer.status == 200  # no 100 first
            assert answer.body == b"unread"


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(reason=NO_LIMIT, strict=True))],
)
async def test_expect_continue_with_a_body_too_large_gets_413_not_100(kind: str) -> None:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(3):
            await client.send(
                b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5000\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            answer = await client.answer(informational=True)
            assert answer.status == 413
            assert await client.closed()


# -- the application fails halfway ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_app_failing_after_the_head_closes_the_connection(kind: str) -> None:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(3):
            await client.send(get(b"/fail-after"))
            with pytest.raises(Closed):
                await client.answer()  # 3 of the 10 announced bytes, then the close


# -- timeouts -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_slowloris_head_is_cut_off(kind: str) -> None:
    """A head trickling in byte by byte is ended by the head timeout (408 or a close;
    hypercorn closes through its keep-alive timer)."""
    async with running(kind) as server, connect(server) as client:
        request = get(extra=b"X-Slow: " + b"a" * 100 + b"\r\n")

        async def trickle() -> None:
            try:
                for byte in request[:-2]:
                    await client.send(bytes([byte]))
                    await trio.sleep(0.02)
            except trio.BrokenResourceError:
                pass

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            with trio.fail_after(1.5):
                with contextlib.suppress(Closed):  # a close without 408 is fine too
                    assert (await client.answer()).status == 408
                assert await client.closed()
            nursery.cancel_scope.cancel()
        assert trio.current_time() - start < 1.5


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(
        reason="no body timeout: the application waits for the body forever",
        strict=True, run=False))],
)  # fmt: skip
async def test_body_timeout_answers_408(kind: str) -> None:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(1.5):
            await client.send(b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc")
            answer = await client.answer()
            assert answer.status == 408
            assert await client.closed()


@pytest.mark.parametrize("kind", KINDS)
async def test_idle_keep_alive_connection_is_closed(kind: str) -> None:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(3):
            await client.send(get())
            assert (await client.answer()).status == 200
            start = trio.current_time()
            assert await client.closed(timeout=2)
            assert 0.4 < trio.current_time() - start < 1.6


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(
        reason="shields its writes: only the kernel (TCP_USER_TIMEOUT) ends them",
        strict=True, run=False))],
)  # fmt: skip
async def test_client_that_stops_reading_is_dropped(kind: str) -> None:
    SEEN.pop("big", None)
    async with running(kind) as server:
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            await sock.connect((server.host, server.port))
            with trio.fail_after(3):
                await sock.send(get(b"/big"))
                while SEEN.get("big") is None:  # we never read: the server's writes stall
                    await trio.sleep(0.05)
        finally:
            sock.close()  # (hypercorn's shielded write ends only when we go)
    assert SEEN["big"] == "send raised"


# -- the connection cap ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(
        reason="no connection cap", strict=True))],
)  # fmt: skip
async def test_max_connections_stops_accepting_until_one_closes(kind: str) -> None:
    async with (
        running(kind, max_connections=2, keep_alive_timeout_s=5.0) as server,
        connect(server) as first,
        connect(server) as second,
    ):
        for client in (first, second):
            await client.send(get())
            assert (await client.answer()).status == 200
        async with connect(server) as third:  # the kernel's backlog takes it
            await third.send(get())
            with trio.move_on_after(0.3) as waited:
                await third.answer()
            assert waited.cancelled_caught, "a third connection was served at the cap"
            await first.aclose()  # a slot frees: the third is accepted and served
            with trio.fail_after(2):
                assert (await third.answer()).status == 200


# -- graceful shutdown ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_graceful_shutdown(kind: str) -> None:
    """Stop accepting, answer the request in flight (then close), close idle
    connections, and return within the deadline."""
    async with (
        running(kind, keep_alive_timeout_s=30.0) as server,
        connect(server) as idle,
        connect(server) as busy,
    ):
        await idle.send(get())
        assert (await idle.answer()).status == 200
        await busy.send(get(b"/sleep?s=0.3"))
        await trio.sleep(0.05)  # the request is in flight
        start = trio.current_time()
        server.shutdown.set()
        with trio.fail_after(2):
            assert await idle.closed(), "idle keep-alive connection stays open"
            answer = await busy.answer()
            assert answer.status == 200 and answer.body == b"slept"
            assert await busy.closed()
            await server.done.wait()
        assert trio.current_time() - start < 1.0
        with pytest.raises(OSError):
            await trio.open_tcp_stream(server.host, server.port)


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(
        reason="sends no close frame at shutdown: websockets are cut at graceful_timeout "
               "(not run: it waits for that)", strict=True, run=False))],
)  # fmt: skip
async def test_graceful_shutdown_closes_websockets_1001(kind: str) -> None:
    async with running(kind) as server:
        ws_stream, ws = await ws_connect(server, "/ws")
        start = trio.current_time()
        server.shutdown.set()
        events = await ws_events(ws_stream, ws, until=CloseConnection)
        assert [e.code for e in events if isinstance(e, CloseConnection)] == [1001]
        with trio.fail_after(2):
            assert await ws_stream.receive_some(10) == b""
            await server.done.wait()
        assert trio.current_time() - start < 1.0
        await ws_stream.aclose()


# -- websockets ---------------------------------------------------------------------------


async def ws_connect(
    server: Running, path: str, subprotocols: list[str] | None = None
) -> tuple[trio.SocketStream, WSConnection]:
    stream = await trio.open_tcp_stream(server.host, server.port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="test", target=path,
                                          subprotocols=subprotocols or [])))  # fmt: skip
    events = await ws_events(stream, ws, until=(AcceptConnection, RejectConnection))
    assert isinstance(events[-1], AcceptConnection), events
    return stream, ws


async def ws_events(stream: trio.SocketStream, ws: WSConnection, until: Any) -> list[Any]:
    """Events until one of type ``until`` (answering the close handshake), or EOF."""
    events: list[Any] = []
    with trio.fail_after(3):
        while True:
            for event in ws.events():
                events.append(event)
                if isinstance(event, CloseConnection) and ws.state.name == "REMOTE_CLOSING":
                    await stream.send_all(ws.send(event.response()))
                if isinstance(event, until):
                    return events
            data = await stream.receive_some(65536)
            if not data:
                return events
            ws.receive_data(data)


async def raw_handshake(server: Running, headers: bytes) -> Any:
    async with connect(server) as client:
        with trio.fail_after(3):
            await client.send(b"GET /ws HTTP/1.1\r\n" + H + headers + b"\r\n")
            return await client.answer()


KEY = base64.b64encode(os.urandom(16))
UPGRADE = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_handshake(kind: str) -> None:
    async with running(kind) as server:
        answer = await raw_handshake(server, UPGRADE + b"Sec-WebSocket-Version: 13\r\n"
                                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                     b"Sec-WebSocket-Protocol: chat, other\r\n")  # fmt: skip
        assert answer.status == 101
        # RFC 6455 4.2.2: the accept key of the RFC's own example
        assert answer.header(b"sec-websocket-accept") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert answer.header(b"sec-websocket-protocol") == b"chat"
        assert answer.header(b"upgrade").lower() == b"websocket"  # type: ignore[union-attr]
        assert answer.header(b"x-ws") == b"yes"


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(
        reason="answers 400 without Sec-WebSocket-Version; RFC 6455 4.4: 426 with it",
        strict=True))],
)  # fmt: skip
async def test_ws_handshake_wrong_version_gets_426(kind: str) -> None:
    async with running(kind) as server:
        answer = await raw_handshake(
            server, UPGRADE + b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
        )
        assert answer.status == 426
        assert answer.header(b"sec-websocket-version") == b"13"


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_handshake_without_key_is_refused(kind: str) -> None:
    async with running(kind) as server:
        answer = await raw_handshake(server, UPGRADE + b"Sec-WebSocket-Version: 13\r\n")
        assert answer.status == 400


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_refused_with_an_http_response(kind: str) -> None:
    async with running(kind) as server:
        answer = await raw_handshake(server, UPGRADE + b"Sec-WebSocket-Version: 13\r\n"
                                     b"Sec-WebSocket-Key: " + KEY + b"\r\n")  # fmt: skip
        assert answer.status == 101
        async with connect(server) as client:
            await client.send(b"GET /ws/refuse HTTP/1.1\r\n" + H + UPGRADE
                              + b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY
                              + b"\r\n\r\n")  # fmt: skip
            with trio.fail_after(3):
                answer = await client.answer()
            assert answer.status == 403
            assert answer.body == b"refused"


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_closed_before_accept_is_403(kind: str) -> None:
    async with running(kind) as server, connect(server) as client:
        await client.send(b"GET /ws/deny HTTP/1.1\r\n" + H + UPGRADE
                          + b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + KEY
                          + b"\r\n\r\n")  # fmt: skip
        with trio.fail_after(3):
            assert (await client.answer()).status == 403


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_echo_text_and_bytes(kind: str) -> None:
    async with running(kind) as server:
        stream, ws = await ws_connect(server, "/ws")
        await stream.send_all(ws.send(TextMessage(data="héllo")))
        await stream.send_all(ws.send(BytesMessage(data=b"\x00\xff")))
        events = await ws_events(stream, ws, until=BytesMessage)
        assert [(type(e), e.data) for e in events] == [
            (TextMessage, "héllo"),
            (BytesMessage, b"\x00\xff"),
        ]
        await stream.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_fragmented_message_is_reassembled(kind: str) -> None:
    async with running(kind) as server:
        stream, ws = await ws_connect(server, "/ws")
        for i, piece in enumerate(("frag", "men", "ted")):
            await stream.send_all(ws.send(TextMessage(data=piece, message_finished=i == 2)))
            await trio.sleep(0.01)
        events = await ws_events(stream, ws, until=TextMessage)
        text = "".join(e.data for e in events if isinstance(e, TextMessage))
        assert text == "fragmented"
        assert events[-1].message_finished
        await stream.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_ping_is_answered(kind: str) -> None:
    async with running(kind) as server:
        stream, ws = await ws_connect(server, "/ws")
        await stream.send_all(ws.send(Ping(payload=b"are you there")))
        events = await ws_events(stream, ws, until=Pong)
        assert events[-1].payload == b"are you there"
        await stream.aclose()


@pytest.mark.parametrize(
    "kind",
    ["builtin", pytest.param("hypercorn", marks=pytest.mark.xfail(
        reason="hands the application code 1006, not the client's 1000 (ASGI: the "
               "client's code)", strict=True))],
)  # fmt: skip
async def test_ws_client_close_is_answered(kind: str) -> None:
    SEEN.pop("ws_disconnect", None)
    async with running(kind) as server:
        stream, ws = await ws_connect(server, "/ws")
        await stream.send_all(ws.send(CloseConnection(code=1000, reason="done")))
        events = await ws_events(stream, ws, until=CloseConnection)
        assert events[-1].code == 1000
        with trio.fail_after(2):
            assert await stream.receive_some(10) == b""  # then the server closes TCP
            while "ws_disconnect" not in SEEN:
                await trio.sleep(0.01)
        assert SEEN["ws_disconnect"] == 1000
        await stream.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_server_close_code(kind: str) -> None:
    async with running(kind) as server:
        stream, ws = await ws_connect(server, "/ws/close")
        events = await ws_events(stream, ws, until=CloseConnection)
        assert (events[-1].code, events[-1].reason) == (4001, "bye")
        with trio.fail_after(2):
            assert await stream.receive_some(10) == b""
        await stream.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_message_too_big_closes_1009(kind: str) -> None:
    async with running(kind) as server:
        stream, ws = await ws_connect(server, "/ws")
        await stream.send_all(ws.send(BytesMessage(data=b"x" * 5000)))
        events = await ws_events(stream, ws, until=CloseConnection)
        assert events[-1].code == 1009
        await stream.aclose()


@pytest.mark.parametrize("kind", KINDS)
async def test_ws_fragments_too_big_together_close_1009(kind: str) -> None:
    async with running(kind) as server:
        stream, ws = await ws_connect(server, "/ws")
        for _ in range(5):
            await stream.send_all(ws.send(BytesMessage(data=b"x" * 1000, message_finished=False)))
        events = await ws_events(stream, ws, until=CloseConnection)
        assert events[-1].code == 1009
        await stream.aclose()


# -- the same answers however the bytes are split -------------------------------------------

VALID = [
    get(),
    get(b"/hello"),
    b"HEAD /hello HTTP/1.1\r\n" + H + b"\r\n",
    post(b'{"to": "a@example.com"}', b"Content-Type: application/json\r\n"),
    chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n"),
    get(b"/stream"),
    get(b"/echo/a%20b?x=1&y=2", b"Accept: */*\r\nX-Many: a, b, c\r\n"),
]  # each request on its own answers one response


async def _answers(kind: str, pieces: list[bytes], count: int, heads: list[bool]) -> list[bytes]:
    async with running(kind) as server, connect(server) as client:
        with trio.fail_after(5):
            for piece in pieces:
                await client.send(piece)
                # the server has taken the piece before the next one is sent
                await trio.testing.wait_all_tasks_blocked(cushion=0.001)
            return [mask_date((await client.answer(head=h)).raw) for h in heads[:count]]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_split_requests_get_identical_answers(kind: str, data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(range(len(VALID))), min_size=1, max_size=4))
    stream = b"".join(VALID[i] for i in chosen)
    heads = [VALID[i].startswith(b"HEAD") for i in chosen]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    whole = trio.run(_answers, kind, [stream], len(chosen), heads)
    split = trio.run(_answers, kind, pieces, len(chosen), heads)
    assert split == whole
    assert len(whole) == len(chosen)


def test_table_covers_both_servers() -> None:
    ids = [c.id for c in _cases()]
    assert len(ids) == 2 * len(ROWS) == len(set(ids))
    assert json.dumps([r.id for r in ROWS])  # ids are plain strings
