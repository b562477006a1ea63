"""The built-in HTTP server: its sans-IO parts (request collection and limits, targets,
heads) byte by byte, then what only it promises over TCP (statistics, lifespan, framing
of odd responses, disconnects, a flood of pipelined requests). Conformance shared with
hypercorn lives in test_http_conformance.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from engine.config import HttpSettings
from engine.http import HttpServer, ServerSettings, h1
from engine.http.h1 import Requests, request_error, split_target
from tests.http_support import SEEN, SETTINGS, connect, running

H = b"Host: test\r\n"


def feed(*pieces: bytes, **limits: Any) -> Requests:
    requests = Requests(ServerSettings(**limits))
    for piece in pieces:
        requests.feed(piece)
    return requests


# -- collecting requests ------------------------------------------------------------------


def test_pipelined_requests_are_collected_in_order_across_any_split() -> None:
    data = (b"GET /1 HTTP/1.1\r\n" + H + b"\r\n"
            b"POST /2 HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabc"
            b"GET /3 HTTP/1.1\r\n" + H + b"\r\n")  # fmt: skip
    for cut in range(1, len(data)):
        requests = feed(data[:cut], data[cut:])
        assert [r.url for r in requests.ready] == [b"/1", b"/2", b"/3"]
        assert [b"".join(r.body) for r in requests.ready] == [b"", b"abc", b""]
        assert all(r.complete for r in requests.ready)
        assert requests.error is None


def test_headers_are_lower_cased_and_kept_in_order() -> None:
    (request,) = feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-One: 1\r\nx-ONE: 2\r\n\r\n").ready
    assert request.headers == [(b"host", b"a"), (b"x-one", b"1"), (b"x-one", b"2")]
    assert (request.method, request.version, request.keep_alive) == (b"GET", "1.1", True)


def test_url_limit_is_checked_while_the_url_still_arrives() -> None:
    requests = feed(b"GET /" + b"a" * 600, b"a" * 600, max_url_bytes=1000)
    assert requests.error is not None and requests.error[0] == 414


def test_header_count_and_size_limits() -> None:
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(6)) + b"\r\n"
    assert feed(b"GET / HTTP/1.1\r\n" + many, max_headers=5).error[0] == 431  # type: ignore[index]
    big = b"X: " + b"a" * 200 + b"\r\n"
    assert feed(b"GET / HTTP/1.1\r\n" + big * 3 + b"\r\n", max_header_bytes=500).error[0] == 431  # type: ignore[index]


def test_a_header_value_growing_across_reads_is_cut_off() -> None:
    """httptools keeps a header value until it ends and reports nothing meanwhile: the
    bytes fed without any callback are capped instead."""
    requests = Requests(ServerSettings(max_url_bytes=100, max_header_bytes=1000))
    requests.feed(b"GET / HTTP/1.1\r\nX-Slow: ")
    for _ in range(20):
        requests.feed(b"a" * 100)
        if requests.error:
            break
    assert requests.error is not None and requests.error[0] == 431


def test_trailer_count_is_limited() -> None:
    trailers = b"".join(b"T-%d: 1\r\n" % i for i in range(8))
    requests = feed(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                    b"1\r\na\r\n0\r\n" + trailers + b"\r\n", max_headers=5)  # fmt: skip
    assert requests.error is not None and requests.error[0] == 431


def test_body_over_the_limit_stops_the_parser_with_413() -> None:
    requests = feed(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                    b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n", max_body_bytes=10)  # fmt: skip
    assert requests.error is not None and requests.error[0] == 413
    assert not requests.ready[0].complete


def test_websocket_upgrade_halts_the_parser_and_keeps_the_frames() -> None:
    requests = feed(b"GET /ws HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n\x81\x80")  # fmt: skip
    (request,) = requests.ready
    assert request.websocket and request.trailing == b"\x81\x80"
    requests.feed(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more
    assert len(requests.ready) == 1 and requests.error is None


def test_other_upgrades_are_ignored_unless_they_carry_a_body() -> None:
    offer = b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
    requests = feed(b"GET /1 HTTP/1.1\r\n" + H + offer + b"\r\nGET /2 HTTP/1.1\r\n" + H + b"\r\n")
    assert [r.url for r in requests.ready] == [b"/1", b"/2"]
    assert not requests.ready[0].websocket
    with_body = feed(b"POST / HTTP/1.1\r\n" + H + offer + b"Content-Length: 3\r\n\r\nabc")
    assert with_body.error == (400, "an upgrade request cannot have a body")
    assert not with_body.ready
    assert feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").error[0] == 501  # type: ignore[index]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\n\r\n", None),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.3\r\nHost: a\r\n\r\n", None),  # served as 1.1
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", 413),
    ],
)
def test_request_error(raw: bytes, status: int | None) -> None:
    (request,) = feed(raw).ready
    error = request_error(request, max_body_bytes=10)
    assert (error[0] if error else None) == status


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"/", ("/", b"/", b"")),
        (b"/a/b?x=1&y", ("/a/b", b"/a/b", b"x=1&y")),
        (b"/a%20b%2Fc?q", ("/a b/c", b"/a%20b%2Fc", b"q")),
        (b"/caf%C3%A9", ("/café", b"/caf%C3%A9", b"")),
        (b"/x#frag", ("/x", b"/x", b"")),
        (b"http://host:8080/p?q=1", ("/p", b"/p", b"q=1")),
        (b"HTTPS://host", ("/", b"/", b"")),
        (b"*", ("*", b"*", b"")),
        (b"host:443", None),
        (b"ftp://host/p", None),
        (b"/caf\xc3\xa9", None),
    ],
)
def test_split_target(url: bytes, expected: tuple[str, bytes, bytes] | None) -> None:
    assert split_target(url) == expected


# -- building answers ---------------------------------------------------------------------


def test_error_response_is_problem_json_and_closes() -> None:
    raw = h1.error_response(431, 'too "many" fields')
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in head and b"content-type: application/problem+json" in head
    assert json.loads(body) == {"type": "about:blank", "status": 431,
                                "title": "Request Header Fields Too Large",
                                "detail": 'too "many" fields'}  # fmt: skip
    assert b"sec-websocket-version: 13" in h1.error_response(426, "version")


def test_response_fields_are_checked_for_injection() -> None:
    h1.check_fields([(b"x-ok", b"a b, c")])
    for bad in ([(b"x", b"a\r\nb: c")], [(b"x y", b"1")], [(b"x:", b"1")], [(b"x", b"\x00")]):
        with pytest.raises(RuntimeError):
            h1.check_fields(bad)
    assert h1.head_lines_ok(b"HTTP/1.1 200 OK\r\nx: 1\r\n\r\n", 3)
    assert not h1.head_lines_ok(b"HTTP/1.1 200 OK\r\nx: 1\r\ny: 2\r\n\r\n", 3)


def test_date_is_formatted_once_per_second() -> None:
    first = h1.date_server()
    assert first.startswith(b"date: ") and first.endswith(b"\r\nserver: engine\r\n")
    assert h1.date_server() is first or h1.date_server() != first  # same second: cached


def test_settings_from_the_engine_config() -> None:
    http = HttpSettings(bind="0.0.0.0:9000", max_body_bytes=123, stalled_client_timeout_s=7)
    settings = ServerSettings.from_http(http)
    assert (settings.bind, settings.max_body_bytes, settings.stalled_client_timeout_s) == (
        "0.0.0.0:9000", 123, 7)  # fmt: skip
    assert settings.keep_alive_timeout_s == ServerSettings().keep_alive_timeout_s


# -- over TCP -----------------------------------------------------------------------------


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\n" + H + b"\r\n"


async def test_statistics_count_connections_websockets_and_requests() -> None:
    shutdown = trio.Event()
    from tests.http_support import app

    server = HttpServer(app, SETTINGS)
    async with trio.open_nursery() as nursery:
        (bind,) = await nursery.start(server.serve, shutdown)
        host, port = bind.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(get(b"/hello") + get(b"/hello"))
        with trio.fail_after(2):
            while server.statistics().requests < 2:
                await trio.sleep(0.01)
        stats = server.statistics()
        assert (stats.connections, stats.websockets, stats.draining) == (1, 0, False)
        await stream.aclose()
        shutdown.set()
    assert server.statistics().connections == 0


async def serve_app(app: Any, nursery: trio.Nursery, **overrides: Any) -> tuple[str, int]:
    from dataclasses import replace

    server = HttpServer(app, replace(SETTINGS, **overrides))
    (bind,) = await nursery.start(server.serve, trio.Event())
    host, port = bind.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def exchange(host: str, port: int, data: bytes, timeout: float = 2.0) -> bytes:
    """Everything the server sends until it closes."""
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(data)
    received = b""
    with trio.fail_after(timeout):
        while chunk := await stream.receive_some(65536):
            received += chunk
    await stream.aclose()
    return received


async def test_body_longer_than_content_length_closes_the_connection(
    nursery: trio.Nursery,
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"abc"})

    host, port = await serve_app(app, nursery)
    received = await exchange(host, port, get(b"/"))
    assert received.startswith(b"HTTP/1.1 500") or received == b""


async def test_app_returning_without_an_answer_gets_500(nursery: trio.Nursery) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return

    host, port = await serve_app(app, nursery)
    assert (await exchange(host, port, get(b"/"))).startswith(b"HTTP/1.1 500 ")


async def test_head_gets_the_length_of_the_body_it_does_not_get(nursery: trio.Nursery) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"twelve bytes"})

    host, port = await serve_app(app, nursery)
    head = b"HEAD / HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n"
    received = await exchange(host, port, head)
    assert b"content-length: 12\r\n" in received
    assert received.endswith(b"\r\n\r\n")  # and no body


async def test_large_unread_body_closes_instead_of_draining(nursery: trio.Nursery) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    host, port = await serve_app(app, nursery, max_body_bytes=1024 * 1024)
    body = b"x" * 200_000
    request = b"POST / HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(body)
    received = await exchange(host, port, request + body)
    assert received.startswith(b"HTTP/1.1 202 ")
    assert b"connection: close\r\n" in received


async def test_disconnect_reaches_an_app_waiting_after_the_body() -> None:
    SEEN.pop("disconnect", None)
    async with running("builtin") as server:
        async with connect(server) as client:
            await client.send(get(b"/disconnect"))
            await trio.sleep(0.05)
        with trio.fail_after(2):
            while "disconnect" not in SEEN:
                await trio.sleep(0.01)
    assert SEEN["disconnect"] == "http.disconnect"


async def test_a_finished_response_wakes_a_receive_waiting_for_disconnect(
    nursery: trio.Nursery,
) -> None:
    """Quart's pattern: one task waits in receive() while another answers."""
    woke = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            woke.set()

        async with trio.open_nursery() as inner:
            inner.start_soon(watch)
            await trio.sleep(0.05)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})

    host, port = await serve_app(app, nursery)
    received = await exchange(host, port, get(b"/")[:-2] + b"Connection: close\r\n\r\n")
    assert received.endswith(b"done") and woke.is_set()


async def test_send_after_the_response_is_an_error(nursery: trio.Nursery) -> None:
    failed: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        try:
            await send({"type": "http.response.body", "body": b"more"})
        except RuntimeError as exc:
            failed.append(exc)

    host, port = await serve_app(app, nursery)
    await exchange(host, port, get(b"/")[:-2] + b"Connection: close\r\n\r\n")
    assert failed


async def test_a_flood_of_pipelined_requests_is_answered_in_order() -> None:
    count = 2000
    data = b"".join(get(b"/echo?n=%d" % i) for i in range(count))
    async with (
        running("builtin") as server,
        connect(server) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(client.send, data)
        with trio.fail_after(20):
            for i in range(count):
                answer = await client.answer()
                assert answer.json()["query"] == f"n={i}"


async def test_lifespan_startup_and_shutdown_run() -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            events.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(HttpServer(app, SETTINGS).serve, shutdown)
        assert events == ["lifespan.startup"]
        shutdown.set()
    assert events == ["lifespan.startup", "lifespan.shutdown"]


async def test_lifespan_startup_failure_stops_the_server() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})
        await trio.sleep_forever()

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(HttpServer(app, SETTINGS).serve, trio.Event())
    error: BaseException = info.value
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    assert "no database" in str(error)


async def test_an_app_without_lifespan_is_served(nursery: trio.Nursery) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError("only http")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    host, port = await serve_app(app, nursery)
    request = get(b"/")[:-2] + b"Connection: close\r\n\r\n"
    assert (await exchange(host, port, request)).startswith(b"HTTP/1.1 204 ")


async def test_accepted_sockets_inherit_nodelay_and_user_timeout() -> None:
    """Set once on the listener (no syscalls per connection): Linux copies both."""
    import socket

    from engine.http.server import _accept_one, _listen

    (listener,) = await _listen(ServerSettings(bind="127.0.0.1:0", stalled_client_timeout_s=7))
    try:
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        accepted = await _accept_one(listener)
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000
        accepted.close()
        client.close()
    finally:
        listener.close()


async def test_websocket_send_waits_for_a_slow_reader(nursery: trio.Nursery) -> None:
    """``websocket.send`` returns when the socket took the frame: a client that stops
    reading stalls its sender (the hub counts on it to spot slow subscribers), and past
    the write deadline the send raises."""
    sent: list[int] = []
    outcome: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        try:
            while True:
                await send({"type": "websocket.send", "bytes": b"x" * 65536})
                sent.append(1)
        except OSError:
            outcome.append("raised")

    host, port = await serve_app(app, nursery, stalled_client_timeout_s=0.5)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    await sock.send(b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    b"\r\n")  # fmt: skip
    with trio.fail_after(3):
        while not outcome:
            await trio.sleep(0.05)
    assert len(sent) < 200  # far less than the ~13 MB it would have pushed unhindered
    sock.close()


@pytest.mark.parametrize("announce", [True, False])
async def test_a_large_body_arrives_whole(nursery: trio.Nursery, announce: bool) -> None:
    """Head and a big body go out in one vectored write, finished in pieces when the
    kernel takes only part of it."""
    body = bytes(range(256)) * 12_000  # 3 MB

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"%d" % len(body))] if announce else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    host, port = await serve_app(app, nursery, stalled_client_timeout_s=5)
    received = await exchange(host, port, get(b"/")[:-2] + b"Connection: close\r\n\r\n", 10)
    head, _, got = received.partition(b"\r\n\r\n")
    assert b"content-length: %d" % len(body) in head
    assert got == body
