"""The SMTP client and pool against a real aiosmtpd server over loopback TCP.

aiosmtpd's Controller runs its own asyncio loop in a thread; the tests drive our trio
client against it and assert on what the server received and on ``statistics()``.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from engine import cli
from engine.config import SmtpSettings
from engine.embedded import RedisServer
from engine.errors import (
    ConfigError,
    DeliveryUncertain,
    PermanentFailure,
    TemporaryFailure,
    TransportError,
    TransportUnavailable,
)
from engine.models import Message
from engine.transport import OutgoingMail, SendOutcome, SendResult, SmtpPool, Transport, compose
from engine.transport.smtp import (
    ConnectionDropped,
    ReplyParser,
    SmtpConnection,
    SmtpProtocolError,
    SmtpUrl,
    helo_name_for,
)

HOST = "127.0.0.1"


# -- server side ------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]


@dataclass
class Handler:
    """aiosmtpd handler that records envelopes and misbehaves on request."""

    pipelining: bool = False
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    drop_at_data: bool = False
    stall_at_data_s: float = 0.0
    # The same, only for messages to the given recipient.
    data_replies: dict[str, str] = field(default_factory=dict)
    drop_at_data_for: str | None = None
    stall_at_data_for: str | None = None
    received: list[Received] = field(default_factory=list)
    peers: set[Any] = field(default_factory=set)
    servers: list[Any] = field(default_factory=list)
    auth_mechanisms: list[str] = field(default_factory=list)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        session.host_name = hostname
        self.peers.add(session.peer)
        if server not in self.servers:
            self.servers.append(server)
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        if address in self.mail_replies:
            return self.mail_replies[address]
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.drop_at_data or self.drop_at_data_for in envelope.rcpt_tos:
            server.transport.abort()
            return "250 never delivered"
        if self.stall_at_data_s and (
            self.stall_at_data_for is None or self.stall_at_data_for in envelope.rcpt_tos
        ):
            await asyncio.sleep(self.stall_at_data_s)
        if self.data_reply is not None:
            return self.data_reply
        for rcpt in envelope.rcpt_tos:
            if rcpt in self.data_replies:
                return self.data_replies[rcpt]
        self.received.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
            )
        )
        return "250 2.0.0 Ok: queued"


def authenticator(handler: Handler) -> Callable[..., AuthResult]:
    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        handler.auth_mechanisms.append(mechanism)
        ok = isinstance(data, LoginPassword) and data == (b"us@r", b"p:ss w/rd")
        return AuthResult(success=ok, handled=False)

    return check


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    handler: Handler
    port: int
    controller: Controller

    def url(self, scheme: str = "smtp", userinfo: str = "") -> str:
        return f"{scheme}://{userinfo}{HOST}:{self.port}"

    def close_all_connections(self) -> None:
        """Close every server-side session, as an MTA does to idle clients."""
        for server in self.handler.servers:
            if server.transport is not None:
                self.controller.loop.call_soon_threadsafe(server.transport.close)


@pytest.fixture
def start_server() -> Iterator[Callable[..., Server]]:
    controllers: list[Controller] = []

    def start(handler: Handler | None = None, **kwargs: Any) -> Server:
        handler = handler or Handler()
        port = free_port()
        controller = Controller(
            handler, hostname=HOST, port=port, server_hostname="sink.test", **kwargs
        )
        controller.start()
        controllers.append(controller)
        return Server(handler, port, controller)

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server()


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST, "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., SmtpPool]]:
    made: list[SmtpPool] = []

    def make(url: str, **settings: Any) -> SmtpPool:
        settings.setdefault("connect_timeout_s", 5.0)
        settings.setdefault("command_timeout_s", 5.0)
        pool = SmtpPool(SmtpSettings(**settings), url)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.aclose()


# -- messages ---------------------------------------------------------------------------


def mail(
    *to: str,
    job_id: str = "01J00000000000000000000001",
    text: str = "Hello\nWorld\n",
    sender: str = "Ann <ann@example.org>",
) -> OutgoingMail:
    msg = Message(
        sender=sender,
        to=list(to or ["bob@example.com"]),
        cc=[],
        bcc=[],
        subject="Test",
        text=text,
        html=None,
        headers=[],
        reply_to=[],
        tags=[],
    )
    return compose(job_id, msg, message_id_domain="engine.test", now=1_700_000_000.0)


async def send_one(transport: Transport, m: OutgoingMail) -> SendResult:
    """``send_many`` of one mail: its SendResult, or its TransportError raised."""
    async with aclosing(transport.send_many([m])) as outcomes:
        [(_, outcome)] = [item async for item in outcomes]
    if isinstance(outcome, TransportError):
        raise outcome
    return outcome


# -- tests ------------------------------------------------------------------------------


async def test_plain_send(server: Server, pools: Callable[..., SmtpPool]) -> None:
    pool = pools(server.url(), starttls="never")
    m = mail("bob@example.com", "carl@example.com")
    result = await send_one(pool, m)
    assert result.code == 250
    assert result.rejected == []
    [got] = server.handler.received
    assert got.mail_from == "ann@example.org"
    assert got.rcpt_tos == ["bob@example.com", "carl@example.com"]
    assert got.data == m.data
    assert f"SIZE={len(m.data)}" in got.mail_options
    stats = pool.statistics()
    assert (stats.open, stats.idle, stats.in_use, stats.connects, stats.sends) == (1, 1, 0, 1, 1)


async def test_8bit_body_declares_8bitmime(server: Server) -> None:
    raw = OutgoingMail(
        "job", "a@example.org", ["b@example.com"], "Subject: ü\r\n\r\nü\r\n".encode()
    )
    settings = SmtpSettings(starttls="never")
    conn = await SmtpConnection.open(SmtpUrl.parse(server.url()), settings, None)
    try:
        await send_one(conn, raw)
    finally:
        await conn.aclose()
    [got] = server.handler.received
    assert "BODY=8BITMIME" in got.mail_options
    assert got.data == raw.data


@pytest.mark.parametrize("pipelining", [True, False])
async def test_pipelining_flag(start_server: Callable[..., Server], pipelining: bool) -> None:
    server = start_server(Handler(pipelining=pipelining))
    conn = await SmtpConnection.open(
        SmtpUrl.parse(server.url()), SmtpSettings(starttls="never"), None
    )
    try:
        assert conn.pipelining is pipelining
        for i in range(3):
            await send_one(conn, mail(f"r{i}@example.com", "x@example.com", job_id=f"J{i}"))
        assert conn.pipelined_sends == (3 if pipelining else 0)
        assert conn.messages == 3
    finally:
        await conn.aclose()
    assert [r.rcpt_tos for r in server.handler.received] == [
        [f"r{i}@example.com", "x@example.com"] for i in range(3)
    ]


async def test_connection_reuse(server: Server, pools: Callable[..., SmtpPool]) -> None:
    pool = pools(server.url(), starttls="never")
    for i in range(5):
        await send_one(pool, mail(job_id=f"J{i}"))
    assert len(server.handler.received) == 5
    assert len(server.handler.peers) == 1
    assert pool.statistics().connects == 1
    assert pool.statistics().sends == 5


async def test_concurrent_sends_share_pool_size_connections(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(Handler(pipelining=True))
    pool = pools(server.url(), starttls="never", pool_size=3)
    max_in_use = 0

    async def one(i: int) -> None:
        nonlocal max_in_use
        await send_one(pool, mail(job_id=f"J{i}"))
        max_in_use = max(max_in_use, pool.statistics().in_use)

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(one, i)
    stats = pool.statistics()
    assert len(server.handler.received) == 30
    assert stats.sends == 30
    assert stats.connects <= 3
    assert len(server.handler.peers) == stats.connects
    assert stats.open == stats.idle == stats.connects
    assert stats.in_use == 0


async def test_connection_recycled_after_max_messages(
    server: Server, pools: Callable[..., SmtpPool]
) -> None:
    pool = pools(server.url(), starttls="never", max_messages_per_connection=2)
    for i in range(5):
        await send_one(pool, mail(job_id=f"J{i}"))
    assert pool.statistics().connects == 3
    assert pool.statistics().open == 1
    assert len(server.handler.peers) == 3


async def test_idle_connection_replaced_after_idle_timeout(
    server: Server, pools: Callable[..., SmtpPool]
) -> None:
    pool = pools(server.url(), starttls="never", idle_timeout_s=0.05)
    await send_one(pool, mail(job_id="J1"))
    await trio.sleep(0.1)
    await send_one(pool, mail(job_id="J2"))
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.sends) == (2, 1, 2)


async def test_starttls_with_ca_file(
    start_server: Callable[..., Server],
    server_tls: ssl.SSLContext,
    ca_file: str,
    pools: Callable[..., SmtpPool],
) -> None:
    server = start_server(tls_context=server_tls, require_starttls=True)
    pool = pools(server.url(), starttls="require", tls_ca_file=ca_file)
    m = mail()
    await send_one(pool, m)
    await send_one(pool, mail(job_id="J2"))
    assert server.handler.received[0].data == m.data
    assert pool.statistics().connects == 1


async def test_starttls_untrusted_certificate_fails(
    start_server: Callable[..., Server], server_tls: ssl.SSLContext, pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(tls_context=server_tls, require_starttls=True)
    pool = pools(server.url())
    with pytest.raises(TransportUnavailable) as info:
        await send_one(pool, mail())
    assert info.value.code is None
    assert str(info.value) == (
        f"STARTTLS to {HOST}:{server.port}: certificate verify failed: unable to get local "
        "issuer certificate (set smtp.tls_ca_file to your CA, or check the server's "
        "certificate)"
    )
    assert server.handler.received == []
    assert pool.statistics().open == 0


async def test_starttls_without_verification(
    start_server: Callable[..., Server], server_tls: ssl.SSLContext, pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(tls_context=server_tls, require_starttls=True)
    pool = pools(server.url(), tls_verify=False)
    await send_one(pool, mail())
    assert len(server.handler.received) == 1


async def test_starttls_require_refuses_plain_server(
    server: Server, pools: Callable[..., SmtpPool]
) -> None:
    pool = pools(server.url(), starttls="require")
    with pytest.raises(TransportUnavailable) as info:
        await send_one(pool, mail())
    assert str(info.value) == (
        f'{HOST}:{server.port} does not offer STARTTLS, and smtp.starttls is "require"'
    )
    assert server.handler.received == []


async def test_implicit_tls(
    start_server: Callable[..., Server],
    server_tls: ssl.SSLContext,
    ca_file: str,
    pools: Callable[..., SmtpPool],
) -> None:
    server = start_server(ssl_context=server_tls)
    pool = pools(server.url("smtps"), tls_ca_file=ca_file)
    m = mail()
    await send_one(pool, m)
    await send_one(pool, mail(job_id="J2"))
    assert server.handler.received[0].data == m.data
    assert pool.statistics().connects == 1


async def test_auth_plain_over_starttls(
    start_server: Callable[..., Server],
    server_tls: ssl.SSLContext,
    ca_file: str,
    pools: Callable[..., SmtpPool],
) -> None:
    handler = Handler()
    server = start_server(
        handler, tls_context=server_tls, authenticator=authenticator(handler), auth_required=True
    )
    pool = pools(server.url(userinfo="us%40r:p%3Ass%20w%2Frd@"), tls_ca_file=ca_file)
    await send_one(pool, mail())
    assert handler.auth_mechanisms == ["PLAIN"]
    assert len(handler.received) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_refused_recipient_is_permanent(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    handler = Handler(
        pipelining=pipelining, rcpt_replies={"nobody@example.com": "550 5.1.1 No such user"}
    )
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    with pytest.raises(PermanentFailure) as info:
        await send_one(pool, mail("nobody@example.com"))
    assert info.value.code == 550
    assert handler.received == []
    # The refusal left the connection clean: the next message goes over it.
    await send_one(pool, mail("bob@example.com", job_id="J2"))
    assert [r.rcpt_tos for r in handler.received] == [["bob@example.com"]]
    assert pool.statistics().connects == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_all_recipients_refused_temporarily(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    handler = Handler(
        pipelining=pipelining,
        rcpt_replies={
            "a@example.com": "550 5.1.1 No such user",
            "b@example.com": "450 4.2.0 Mailbox busy",
        },
    )
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    with pytest.raises(TemporaryFailure) as info:
        await send_one(pool, mail("a@example.com", "b@example.com"))
    assert info.value.code == 450


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mixed_recipients(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    handler = Handler(
        pipelining=pipelining, rcpt_replies={"nobody@example.com": "550 5.1.1 No such user"}
    )
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    result = await send_one(pool, mail("nobody@example.com", "bob@example.com"))
    assert result.code == 250
    assert [(r.address, r.code) for r in result.rejected] == [("nobody@example.com", 550)]
    assert "No such user" in result.rejected[0].text
    assert [r.rcpt_tos for r in handler.received] == [["bob@example.com"]]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_refused_sender(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    handler = Handler(
        pipelining=pipelining, mail_replies={"spam@example.org": "553 5.7.1 Sender rejected"}
    )
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    with pytest.raises(PermanentFailure) as info:
        await send_one(pool, mail(sender="spam@example.org"))
    assert info.value.code == 553
    await send_one(pool, mail(job_id="J2"))
    assert len(handler.received) == 1
    assert pool.statistics().connects == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_451_at_end_of_data_is_temporary(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    handler = Handler(pipelining=pipelining, data_reply="451 4.3.0 Try again later")
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    with pytest.raises(TemporaryFailure) as info:
        await send_one(pool, mail())
    assert info.value.code == 451
    handler.data_reply = None
    await send_one(pool, mail(job_id="J2"))
    assert len(handler.received) == 1
    assert pool.statistics().connects == 1


async def test_552_at_end_of_data_is_permanent(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(Handler(data_reply="552 5.3.4 Message too big"))
    pool = pools(server.url(), starttls="never")
    with pytest.raises(PermanentFailure) as info:
        await send_one(pool, mail())
    assert info.value.code == 552


async def test_server_drops_connection_mid_transaction(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    handler = Handler(drop_at_data=True)
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    with pytest.raises(TemporaryFailure) as info:
        await send_one(pool, mail())
    assert info.value.code is None
    assert pool.statistics().open == 0, "a broken connection is never kept"
    handler.drop_at_data = False
    await send_one(pool, mail(job_id="J2"))
    assert len(handler.received) == 1
    assert pool.statistics().connects == 2


@pytest.mark.parametrize("pipelining", [True, False])
async def test_idle_connection_closed_by_server_is_replaced_at_checkout(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    server = start_server(Handler(pipelining=pipelining))
    pool = pools(server.url(), starttls="never")  # serve() not running: checked at checkout
    await send_one(pool, mail(job_id="J1"))
    server.close_all_connections()
    await trio.sleep(0.2)  # let the FIN arrive
    result = await send_one(pool, mail(job_id="J2"))
    assert result.code == 250
    assert len(server.handler.received) == 2
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.sends, stats.stale) == (2, 1, 2, 1)
    assert (stats.resent, stats.idle_closed) == (0, 0), "seen before anything was sent on it"


async def test_command_timeout(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(Handler(stall_at_data_s=2.0))
    pool = pools(server.url(), starttls="never", command_timeout_s=0.2)
    with pytest.raises(TemporaryFailure) as info:
        await send_one(pool, mail())
    assert info.value.code is None
    assert "0.2" in str(info.value)
    assert pool.statistics().open == 0


async def test_cancelled_send_discards_connection(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(Handler(stall_at_data_s=2.0))
    pool = pools(server.url(), starttls="never")
    with trio.move_on_after(0.2) as scope:
        await send_one(pool, mail())
    assert scope.cancelled_caught
    stats = pool.statistics()
    assert (stats.open, stats.idle, stats.in_use, stats.sends) == (0, 0, 0, 0)


async def test_connection_refused(pools: Callable[..., SmtpPool]) -> None:
    pool = pools(f"smtp://{HOST}:{free_port()}", starttls="never")
    with pytest.raises(TemporaryFailure) as info:
        await send_one(pool, mail())
    assert info.value.code is None
    assert pool.statistics().open == 0


async def test_dot_stuffing_preserves_lines_starting_with_dots(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(Handler(pipelining=True))
    pool = pools(server.url(), starttls="never")
    m = mail(text=".\n.leading dot\n..two dots\nmiddle . dot\n.")
    await send_one(pool, m)
    [got] = server.handler.received
    assert got.data == m.data
    assert b"\r\n.\r\n.leading dot\r\n..two dots\r\n" in got.data


async def test_closed_pool_refuses(server: Server, pools: Callable[..., SmtpPool]) -> None:
    pool = pools(server.url(), starttls="never")
    await send_one(pool, mail())
    await pool.aclose()
    assert pool.statistics().open == 0
    with pytest.raises(TemporaryFailure):
        await send_one(pool, mail(job_id="J2"))


# -- send_many --------------------------------------------------------------------------


def batch(n: int, *, text: str = "Hello\n.dot line\n..two\n.") -> list[OutgoingMail]:
    """``n`` mails, the i-th to ``r{i}@example.com``, with bodies that need dot-stuffing."""
    return [mail(f"r{i}@example.com", job_id=f"J{i:03d}", text=f"{text}\n{i}") for i in range(n)]


async def collect(outcomes: AsyncGenerator[SendOutcome, None]) -> list[SendOutcome]:
    async with aclosing(outcomes):
        return [item async for item in outcomes]


def kinds(outcomes: list[SendOutcome]) -> list[tuple[str, str, int | None]]:
    """(job id, outcome class, code) per outcome, for compact assertions."""
    return [
        (m.job_id, type(o).__name__, o.code)
        for m, o in outcomes  # SendResult and TransportError both carry .code
    ]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_send_many_delivers_in_order_exactly_once(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    server = start_server(Handler(pipelining=pipelining))
    pool = pools(server.url(), starttls="never")
    mails = batch(25)
    outcomes = await collect(pool.send_many(mails))
    assert [m for m, _ in outcomes] == mails
    assert all(isinstance(o, SendResult) and o.code == 250 for _, o in outcomes)
    received = server.handler.received
    assert [r.rcpt_tos for r in received] == [m.recipients for m in mails]
    assert [r.data for r in received] == [m.data for m in mails]  # dot-stuffing undone
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.idle, stats.sends) == (1, 1, 1, 25)
    assert len(server.handler.peers) == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_send_many_pipelines_across_messages(
    start_server: Callable[..., Server], pipelining: bool
) -> None:
    server = start_server(Handler(pipelining=pipelining))
    conn = await SmtpConnection.open(
        SmtpUrl.parse(server.url()), SmtpSettings(starttls="never"), None
    )
    try:
        writes = conn.writes
        outcomes = await collect(conn.send_many(batch(10)))
        assert all(isinstance(o, SendResult) for _, o in outcomes)
        if pipelining:
            # The first envelope alone, then each content with the next envelope behind it.
            assert conn.writes - writes == 11
            assert conn.pipelined_sends == 10
        else:
            assert conn.writes - writes == 10 * 4  # MAIL, RCPT, DATA, content
        assert conn.messages == 10
        assert not conn.broken
    finally:
        await conn.aclose()
    assert len(server.handler.received) == 10


@pytest.mark.parametrize("pipelining", [True, False])
async def test_send_many_mixed_outcomes(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool], pipelining: bool
) -> None:
    handler = Handler(
        pipelining=pipelining,
        rcpt_replies={"nobody@example.com": "550 5.1.1 No such user"},
        mail_replies={"spam@example.org": "553 5.7.1 Sender rejected"},
        data_replies={"later@example.com": "451 4.3.0 Try again later"},
    )
    server = start_server(handler, data_size_limit=20_000)
    pool = pools(server.url(), starttls="never")
    mails = [
        mail("r0@example.com", job_id="J0"),
        mail("r1@example.com", job_id="J1"),
        mail("nobody@example.com", job_id="J2"),  # every recipient refused: RSET
        mail("r3@example.com", job_id="J3", sender="spam@example.org"),  # MAIL refused
        mail("r4@example.com", job_id="J4", text="x" * 30_000),  # over SIZE: never sent
        mail("later@example.com", job_id="J5"),  # 451 after the content
        mail("r6@example.com", job_id="J6"),
        mail("nobody@example.com", "r7@example.com", job_id="J7"),  # one refused
    ]
    outcomes = await collect(pool.send_many(mails))
    assert kinds(outcomes) == [
        ("J0", "SendResult", 250),
        ("J1", "SendResult", 250),
        ("J2", "PermanentFailure", 550),
        ("J3", "PermanentFailure", 553),
        ("J4", "PermanentFailure", None),
        ("J5", "TemporaryFailure", 451),
        ("J6", "SendResult", 250),
        ("J7", "SendResult", 250),
    ]
    last = outcomes[-1][1]
    assert isinstance(last, SendResult)
    assert [(r.address, r.code) for r in last.rejected] == [("nobody@example.com", 550)]
    assert [r.rcpt_tos for r in handler.received] == [
        ["r0@example.com"],
        ["r1@example.com"],
        ["r6@example.com"],
        ["r7@example.com"],
    ]
    assert [r.data for r in handler.received] == [mails[i].data for i in (0, 1, 6, 7)]
    # Refusals left the connection in a known state: it carried the whole batch, and more.
    await send_one(pool, mail(job_id="J8"))
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.sends) == (1, 1, 5)


async def test_send_many_refused_envelope_at_batch_end(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    """A refused envelope pipelined behind the last good content: RSET, then clean."""
    handler = Handler(
        pipelining=True, rcpt_replies={"nobody@example.com": "550 5.1.1 No such user"}
    )
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    mails = [mail(job_id="J0"), mail("nobody@example.com", job_id="J1")]
    assert kinds(await collect(pool.send_many(mails))) == [
        ("J0", "SendResult", 250),
        ("J1", "PermanentFailure", 550),
    ]
    assert kinds(await collect(pool.send_many([mail(job_id="J2")]))) == [("J2", "SendResult", 250)]
    assert len(handler.received) == 2
    assert pool.statistics().connects == 1


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("failure", ["drop", "timeout"])
async def test_send_many_connection_failure_mid_batch(
    start_server: Callable[..., Server],
    pools: Callable[..., SmtpPool],
    pipelining: bool,
    failure: str,
) -> None:
    handler = Handler(pipelining=pipelining)
    if failure == "drop":
        handler.drop_at_data_for = "r3@example.com"
    else:
        handler.stall_at_data_s, handler.stall_at_data_for = 2.0, "r3@example.com"
    server = start_server(handler)
    pool = pools(server.url(), starttls="never", command_timeout_s=0.3)
    mails = batch(8)
    outcomes = await collect(pool.send_many(mails))
    assert [m for m, _ in outcomes] == mails, "each mail exactly once, in order"
    # The content of J003 went out, so the server may have taken it: a failure of that
    # message. The ones behind it never reached the server: sent over a new connection.
    in_flight = outcomes[3][1]
    assert isinstance(in_flight, ConnectionDropped) and not in_flight.before_reply
    assert isinstance(in_flight, DeliveryUncertain), "sent whole, then no final reply"
    assert in_flight.code is None
    if failure == "timeout":
        assert "0.3" in str(in_flight)
    assert all(isinstance(o, SendResult) for _, o in outcomes[:3] + outcomes[4:])
    # (A stalled server may still record J003 after we gave up on it.)
    received = [r.rcpt_tos for r in handler.received if r.rcpt_tos != ["r3@example.com"]]
    assert received == [m.recipients for m in mails[:3] + mails[4:]]
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.in_use) == (2, 1, 0), "broken one dropped"
    assert (stats.sends, stats.resent, stats.stale) == (7, 4, 0)


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize("close", ["aclosing", "garbage-collected"])
@pytest.mark.filterwarnings("ignore:Async generator:ResourceWarning")
async def test_send_many_stopped_early_leaves_pool_usable(
    start_server: Callable[..., Server],
    pools: Callable[..., SmtpPool],
    pipelining: bool,
    close: str,
) -> None:
    handler = Handler(pipelining=pipelining)
    server = start_server(handler)
    pool = pools(server.url(), starttls="never", pool_size=1)
    mails = batch(10)
    seen: list[SendOutcome] = []
    if close == "aclosing":
        async with aclosing(pool.send_many(mails)) as outcomes:
            async for item in outcomes:
                seen.append(item)
                if len(seen) == 3:
                    break
        assert pool.statistics().in_use == 0, "closing gave the connection back at once"
    else:
        async for item in pool.send_many(mails):
            seen.append(item)
            if len(seen) == 3:
                break  # trio closes the abandoned generator soon after
    assert all(isinstance(o, SendResult) for _, o in seen)
    # pool_size=1: this waits until the abandoned batch gave its slot back.
    with trio.fail_after(5):
        rest = await collect(pool.send_many(mails[3:]))
    assert all(isinstance(o, SendResult) for _, o in rest)
    assert [r.rcpt_tos for r in handler.received] == [m.recipients for m in mails]
    # J003's envelope was already on the wire when the consumer stopped: only closing
    # the connection could abort it. Without pipelining the connection stayed clean.
    assert pool.statistics().connects == (2 if pipelining else 1)
    assert pool.statistics().in_use == 0


async def test_send_many_stopped_after_last_mail_keeps_connection(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    server = start_server(Handler(pipelining=True))
    pool = pools(server.url(), starttls="never")
    async with aclosing(pool.send_many(batch(2))) as outcomes:
        async for _, outcome in outcomes:
            assert isinstance(outcome, SendResult)
        await send_one(pool, mail(job_id="J9"))  # the connection is already back
    assert pool.statistics().connects == 1
    assert len(server.handler.received) == 3


async def test_send_many_cancelled_mid_batch(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    handler = Handler(pipelining=True, stall_at_data_s=2.0, stall_at_data_for="r2@example.com")
    server = start_server(handler)
    pool = pools(server.url(), starttls="never", pool_size=1)
    seen: list[SendOutcome] = []
    with trio.move_on_after(0.5) as scope:
        async with aclosing(pool.send_many(batch(5))) as outcomes:
            async for item in outcomes:
                seen.append(item)
    assert scope.cancelled_caught, "Cancelled was not swallowed"
    assert [m.job_id for m, _ in seen] == ["J000", "J001"]
    stats = pool.statistics()
    assert (stats.open, stats.in_use, stats.sends) == (0, 0, 2)
    handler.stall_at_data_for = "none"
    await send_one(pool, mail(job_id="J9"))  # the slot was given back


@pytest.mark.parametrize("pipelining", [True, False])
async def test_send_many_retries_stale_idle_connection(
    start_server: Callable[..., Server],
    pools: Callable[..., SmtpPool],
    caplog: pytest.LogCaptureFixture,
    pipelining: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="engine.transport.smtp")
    server = start_server(Handler(pipelining=pipelining), data_size_limit=20_000)
    pool = pools(server.url(), starttls="never")
    await send_one(pool, mail(job_id="J0"))
    server.close_all_connections()
    await trio.sleep(0.2)  # let the FIN arrive
    too_big = mail(job_id="J1", text="x" * 30_000)
    mails = [too_big, *batch(3)]  # refused before the wire, so nothing was written yet
    outcomes = await collect(pool.send_many(mails))
    assert [m for m, _ in outcomes] == mails
    assert isinstance(outcomes[0][1], PermanentFailure)
    assert all(isinstance(o, SendResult) for _, o in outcomes[1:])
    assert len(server.handler.received) == 4
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.sends, stats.stale) == (2, 1, 4, 1)
    # Found closed at checkout (one poll): the stale retry at the first reply is for a
    # server that closes as we send (test_stale_421_as_first_reply_is_resent).
    assert "smtp.send_many.stale_retry" not in caplog.text


async def test_send_many_of_one_is_send(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    handler = Handler(
        pipelining=True, rcpt_replies={"nobody@example.com": "550 5.1.1 No such user"}
    )
    server = start_server(handler)
    pool = pools(server.url(), starttls="never")
    m = mail("bob@example.com", "nobody@example.com")
    sent = await send_one(pool, m)
    [(same, batched)] = await collect(pool.send_many([m]))
    assert same is m
    assert isinstance(batched, SendResult)
    assert (batched.code, batched.rejected) == (sent.code, sent.rejected)
    with pytest.raises(PermanentFailure) as info:
        await send_one(pool, mail("nobody@example.com"))
    [(_, refused)] = await collect(pool.send_many([mail("nobody@example.com")]))
    assert type(refused) is type(info.value)
    assert (refused.code, str(refused)) == (info.value.code, str(info.value))
    assert [r.data for r in handler.received] == [m.data, m.data]
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.sends) == (1, 1, 2)
    assert await collect(pool.send_many([])) == []


async def test_send_many_connect_failure_and_closed_pool(
    server: Server, pools: Callable[..., SmtpPool]
) -> None:
    dead = pools(f"smtp://{HOST}:{free_port()}", starttls="never")
    mails = batch(3)
    outcomes = await collect(dead.send_many(mails))
    assert [m for m, _ in outcomes] == mails
    assert all(isinstance(o, TransportUnavailable) and o.code is None for _, o in outcomes)
    assert dead.statistics().open == 0
    pool = pools(server.url(), starttls="never")
    await pool.aclose()
    outcomes = await collect(pool.send_many(mails))
    assert all(isinstance(o, TransportUnavailable) for _, o in outcomes)
    assert server.handler.received == []


# -- a scripted server: what aiosmtpd cannot be made to do ------------------------------


@dataclass
class Scripted:
    """A raw SMTP server in the test's own trio run, answering from a script.

    ``answers[(connection, verb, transaction)]`` overrides the answer to that command
    (connections and transactions count from 0; verbs: GREETING, EHLO, HELO, MAIL, RCPT,
    DATA, "." for the final reply, RSET, QUIT); ``always[verb]`` for every connection.
    An answer of None hangs up without one; after a 421 the server hangs up too.
    """

    greeting: str | None = "220 scripted.test ESMTP"  # None: silent, like an implicit-TLS port
    extensions: tuple[str, ...] = ("PIPELINING",)
    answers: dict[tuple[int, str, int], str | None] = field(default_factory=dict)
    always: dict[str, str | None] = field(default_factory=dict)
    port: int = 0
    connections: int = 0
    log: list[tuple[int, str]] = field(default_factory=list)  # (connection, command)
    delivered: list[tuple[int, bytes]] = field(default_factory=list)

    def commands(self, verb: str) -> list[tuple[int, str]]:
        return [(c, line) for c, line in self.log if line[:4].upper().startswith(verb)]

    def _answer(self, conn: int, verb: str, txn: int, default: str | None) -> str | None:
        if (conn, verb, txn) in self.answers:
            return self.answers[(conn, verb, txn)]
        return self.always.get(verb, default)

    async def handle(self, stream: trio.SocketStream) -> None:
        conn, self.connections = self.connections, self.connections + 1
        buf = bytearray()

        async def until(end: bytes) -> bytes | None:
            while end not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return None
                buf.extend(data)
            cut = buf.index(end) + len(end)
            got = bytes(buf[:cut])
            del buf[:cut]
            return got

        try:
            answer = self._answer(conn, "GREETING", 0, self.greeting)
            if answer is None:
                await trio.sleep_forever()
            await stream.send_all(answer.encode() + b"\r\n")
            txn = 0
            while True:
                raw = await until(b"\r\n")
                if raw is None:
                    return
                line = raw.decode().rstrip("\r\n")
                self.log.append((conn, line))
                verb = line[:4].upper().strip()
                ehlo = "\r\n".join(f"250-{x}" for x in ("scripted.test", *self.extensions))
                default = {"EHLO": ehlo + "\r\n250 HELP", "DATA": "354 go ahead"}
                default["QUIT"] = "221 bye"
                answer = self._answer(conn, verb, txn, default.get(verb, "250 OK"))
                if verb == "DATA" and answer is not None and answer.startswith("354"):
                    await stream.send_all(answer.encode() + b"\r\n")
                    buf[:0] = b"\r\n"  # the content may be empty: "." right away
                    content = await until(b"\r\n.\r\n")
                    if content is None:
                        return
                    content = content[2:]
                    verb, txn = ".", txn + 1
                    answer = self._answer(conn, ".", txn - 1, "250 2.0.0 Ok: queued")
                    if answer is not None and answer.startswith("250"):
                        self.delivered.append((conn, content))
                if answer is None:
                    return
                await stream.send_all(answer.encode() + b"\r\n")
                if answer.startswith("421") or verb == "QUIT":
                    # Read what the client had pipelined, so closing sends FIN, not RST.
                    with trio.move_on_after(0.05):
                        while await stream.receive_some(65536):
                            pass
                    return
        except trio.BrokenResourceError:
            return
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture
async def scripted(nursery: trio.Nursery) -> Callable[..., Awaitable[Scripted]]:
    async def start(**kwargs: Any) -> Scripted:
        server = Scripted(**kwargs)
        serve = partial(trio.serve_tcp, server.handle, 0, host=HOST)
        listeners = await nursery.start(serve)
        server.port = listeners[0].socket.getsockname()[1]
        return server

    return start


def url_of(server: Scripted, scheme: str = "smtp") -> str:
    return f"{scheme}://{HOST}:{server.port}"


PIPELINING = pytest.mark.parametrize(
    "extensions", [("PIPELINING",), ()], ids=["pipelining", "one-by-one"]
)


# -- the transport's failures are not the messages' ---------------------------------------


def unavailable(outcomes: list[SendOutcome]) -> list[TransportUnavailable]:
    """The outcomes, each asserted to be TransportUnavailable."""
    found = [o for _, o in outcomes]
    assert all(isinstance(o, TransportUnavailable) for o in found), kinds(outcomes)
    return found  # type: ignore[return-value]


async def test_refused_connection_is_transport_unavailable(
    pools: Callable[..., SmtpPool],
) -> None:
    port = free_port()
    pool = pools(f"smtp://{HOST}:{port}")
    outcomes = await collect(pool.send_many(batch(3)))
    assert [m.job_id for m, _ in outcomes] == ["J000", "J001", "J002"]
    failures = unavailable(outcomes)
    assert str(failures[0]) == f"connect to {HOST}:{port}: connection refused"
    assert pool.statistics().connects == 0


async def test_refusing_greeting_is_transport_unavailable(
    scripted: Callable[..., Awaitable[Scripted]], pools: Callable[..., SmtpPool]
) -> None:
    server = await scripted(greeting="421 4.3.2 scripted.test busy, come back later")
    outcomes = await collect(pools(url_of(server)).send_many(batch(2)))
    [first, _] = unavailable(outcomes)
    assert first.code == 421
    assert str(first) == (
        f"greeting from {HOST}:{server.port}: 421 4.3.2 scripted.test busy, come back later"
    )


async def test_ehlo_and_helo_refused_names_the_setting(
    scripted: Callable[..., Awaitable[Scripted]], pools: Callable[..., SmtpPool]
) -> None:
    refusal = "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    server = await scripted(always={"EHLO": refusal, "HELO": refusal})
    outcomes = await collect(pools(url_of(server)).send_many(batch(2)))
    [first, _] = unavailable(outcomes)
    assert first.code == 504
    assert str(first) == (
        f"EHLO and HELO localhost to {HOST}:{server.port}: {refusal} (set smtp.helo_name "
        "(ENGINE_SMTP__HELO_NAME) to this machine's fully-qualified name)"
    )


async def test_421_to_ehlo_sends_no_helo(
    scripted: Callable[..., Awaitable[Scripted]], pools: Callable[..., SmtpPool]
) -> None:
    server = await scripted(always={"EHLO": "421 4.7.0 scripted.test closing"})
    [(_, outcome)] = await collect(pools(url_of(server)).send_many(batch(1)))
    assert isinstance(outcome, TransportUnavailable) and outcome.code == 421
    assert "set smtp.helo_name" not in str(outcome)
    assert server.commands("HELO") == []


@PIPELINING
async def test_helo_refused_at_rcpt_is_transport_unavailable_for_the_batch(
    scripted: Callable[..., Awaitable[Scripted]],
    pools: Callable[..., SmtpPool],
    extensions: tuple[str, ...],
) -> None:
    """Postfix checks the HELO name at RCPT (smtpd_delay_reject): about us, every mail."""
    refusal = "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    server = await scripted(extensions=extensions, always={"RCPT": refusal})
    pool = pools(url_of(server))
    outcomes = await collect(pool.send_many(batch(3)))
    [first, *rest] = unavailable(outcomes)
    assert first.code == 504
    assert str(first).endswith(
        f"{refusal} (set smtp.helo_name (ENGINE_SMTP__HELO_NAME) to this machine's "
        "fully-qualified name)"
    )
    assert all(str(r).startswith("not tried: ") and r.code == 504 for r in rest)
    assert len(server.commands("MAIL")) == 1, "the batch stopped at the first refusal"
    assert pool.statistics().open == 0


async def test_530_at_mail_from_is_transport_unavailable(
    scripted: Callable[..., Awaitable[Scripted]], pools: Callable[..., SmtpPool]
) -> None:
    server = await scripted(always={"MAIL": "530 5.7.0 Must issue a STARTTLS command first"})
    outcomes = await collect(pools(url_of(server)).send_many(batch(2)))
    [first, _] = unavailable(outcomes)
    assert "530 5.7.0 Must issue a STARTTLS command first (the server wants AUTH or TLS" in str(
        first
    )


@PIPELINING
async def test_stale_421_as_first_reply_is_resent(
    scripted: Callable[..., Awaitable[Scripted]],
    pools: Callable[..., SmtpPool],
    caplog: pytest.LogCaptureFixture,
    extensions: tuple[str, ...],
) -> None:
    """The server's idle-timeout 421 crosses our MAIL FROM on a reused connection: it
    saw nothing of ours, so the batch goes over a new connection, with no outcome lost."""
    caplog.set_level(logging.INFO, logger="engine.transport.smtp")
    timeout = "421 4.4.2 scripted.test Error: timeout exceeded"
    server = await scripted(extensions=extensions, answers={(0, "MAIL", 1): timeout})
    pool = pools(url_of(server))
    await send_one(pool, mail(job_id="J"))
    outcomes = await collect(pool.send_many(batch(3)))
    assert kinds(outcomes) == [(f"J00{i}", "SendResult", 250) for i in range(3)]
    assert [c for c, _ in server.delivered] == [0, 1, 1, 1]
    stats = pool.statistics()
    assert (stats.connects, stats.stale, stats.resent, stats.sends) == (2, 1, 3, 4)
    assert "smtp.send_many.stale_retry job=J000 unsent=3 error=421 4.4.2" in caplog.text


@PIPELINING
@pytest.mark.parametrize("where", [".", "RCPT"])
async def test_421_mid_batch_fails_that_mail_and_resends_the_rest(
    scripted: Callable[..., Awaitable[Scripted]],
    pools: Callable[..., SmtpPool],
    extensions: tuple[str, ...],
    where: str,
) -> None:
    """A 421 answering a mail's own transaction is that mail's (temporary) failure; the
    server hangs up, so the connection is not pooled and the rest go over a new one."""
    server = await scripted(extensions=extensions, answers={(0, where, 1): "421 4.3.0 bye"})
    pool = pools(url_of(server))
    outcomes = await collect(pool.send_many(batch(4)))
    assert kinds(outcomes) == [
        ("J000", "SendResult", 250),
        ("J001", "TemporaryFailure", 421),
        ("J002", "SendResult", 250),
        ("J003", "SendResult", 250),
    ]
    assert [c for c, _ in server.delivered] == [0, 1, 1]
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.resent, stats.stale) == (2, 1, 2, 0)


async def test_lost_mid_batch_then_no_new_connection(
    scripted: Callable[..., Awaitable[Scripted]], pools: Callable[..., SmtpPool]
) -> None:
    server = await scripted(
        answers={(0, ".", 1): None, (1, "GREETING", 0): "554 5.3.2 scripted.test: no more"}
    )
    outcomes = await collect(pools(url_of(server)).send_many(batch(4)))
    assert kinds(outcomes) == [
        ("J000", "SendResult", 250),
        ("J001", "DroppedAfterData", None),  # its content went out: may have arrived
        ("J002", "TransportUnavailable", 554),  # never reached a server
        ("J003", "TransportUnavailable", 554),
    ]
    assert "greeting from" in str(outcomes[2][1])


@PIPELINING
async def test_lost_mid_batch_twice(
    scripted: Callable[..., Awaitable[Scripted]],
    pools: Callable[..., SmtpPool],
    extensions: tuple[str, ...],
) -> None:
    server = await scripted(
        extensions=extensions, answers={(0, ".", 1): None, (1, "MAIL", 0): None}
    )
    pool = pools(url_of(server))
    outcomes = await collect(pool.send_many(batch(4)))
    assert kinds(outcomes) == [
        ("J000", "SendResult", 250),
        ("J001", "DroppedAfterData", None),
        ("J002", "TransportUnavailable", None),
        ("J003", "TransportUnavailable", None),
    ]
    assert str(outcomes[2][1]).endswith("(a new connection was lost too)")
    assert server.connections == 2, "one new connection per batch, not more"
    assert pool.statistics().open == 0


async def test_silent_plain_server_is_waited_for_until_the_connect_timeout(
    scripted: Callable[..., Awaitable[Scripted]], pools: Callable[..., SmtpPool]
) -> None:
    """No greeting and no TLS on the port either: a slow server; wait it out."""
    server = await scripted(greeting=None)
    pool = pools(url_of(server), connect_timeout_s=0.6, greeting_probe_s=0.2)
    [(_, outcome)] = await collect(pool.send_many(batch(1)))
    assert isinstance(outcome, TransportUnavailable)
    assert str(outcome) == (
        f"connect to {HOST}:{server.port}: no answer within 0.6s (during the greeting)"
    )
    assert server.connections == 2, "the probe asked the port whether it speaks TLS"


async def test_smtp_scheme_on_implicit_tls_port_fails_fast_with_a_hint(
    start_server: Callable[..., Server],
    server_tls: ssl.SSLContext,
    pools: Callable[..., SmtpPool],
) -> None:
    server = start_server(ssl_context=server_tls)  # TLS from the first byte
    pool = pools(server.url("smtp"), connect_timeout_s=10.0, greeting_probe_s=0.2)
    start = trio.current_time()
    [(_, outcome)] = await collect(pool.send_many(batch(1)))
    assert trio.current_time() - start < 2.0
    assert isinstance(outcome, TransportUnavailable)
    assert str(outcome) == (
        f"connect to {HOST}:{server.port}: no SMTP greeting within 0.2s, and the port "
        "answers TLS: it is an implicit-TLS port (like 465): use smtps://"
    )


async def test_smtps_scheme_on_plain_port_says_so(
    server: Server, ca_file: str, pools: Callable[..., SmtpPool]
) -> None:
    [(_, outcome)] = await collect(
        pools(server.url("smtps"), tls_ca_file=ca_file).send_many(batch(1))
    )
    assert isinstance(outcome, TransportUnavailable)
    assert str(outcome) == (
        f"TLS to {HOST}:{server.port}: wrong version number: the server speaks plain SMTP "
        "on this port: use smtp:// (STARTTLS) or the implicit-TLS port"
    )


async def test_expired_certificate_says_so(
    start_server: Callable[..., Server],
    ca: trustme.CA,
    ca_file: str,
    pools: Callable[..., SmtpPool],
) -> None:
    expired = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(
        HOST, not_after=datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    ).configure_cert(expired)
    server = start_server(tls_context=expired, require_starttls=True)
    [(_, outcome)] = await collect(pools(server.url(), tls_ca_file=ca_file).send_many(batch(1)))
    assert isinstance(outcome, TransportUnavailable)
    assert str(outcome) == (
        f"STARTTLS to {HOST}:{server.port}: certificate verify failed: certificate has "
        "expired (the server's certificate must be renewed, or this machine's clock is wrong)"
    )


# -- idle connections -------------------------------------------------------------------


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 3.0) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():
            await trio.sleep(0.01)


async def test_serve_drops_an_idle_connection_the_server_closes(
    server: Server,
    pools: Callable[..., SmtpPool],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="engine.transport.smtp")
    pool = pools(server.url(), starttls="never")
    await nursery.start(pool.serve)
    await send_one(pool, mail(job_id="J1"))
    [conn] = pool._idle
    server.close_all_connections()
    await wait_for(lambda: pool.statistics().open == 0)  # without any send
    await wait_for(lambda: conn.fileno() is None)  # our end is closed too: no CLOSE-WAIT
    assert pool.statistics().idle_closed == 1
    assert "smtp.idle.closed_by_server" in caplog.text
    await send_one(pool, mail(job_id="J2"))
    stats = pool.statistics()
    assert (stats.connects, stats.sends, stats.stale) == (2, 2, 0)


async def test_serve_quits_an_idle_connection_at_idle_timeout(
    scripted: Callable[..., Awaitable[Scripted]],
    pools: Callable[..., SmtpPool],
    nursery: trio.Nursery,
) -> None:
    server = await scripted()
    pool = pools(url_of(server), idle_timeout_s=0.2)
    await nursery.start(pool.serve)
    await send_one(pool, mail(job_id="J1"))
    await wait_for(lambda: pool.statistics().open == 0)
    assert pool.statistics().idle_closed == 1
    await wait_for(lambda: server.commands("QUIT") == [(0, "QUIT")])  # (sent just after)


async def test_checkout_takes_a_watched_connection_over(
    server: Server, pools: Callable[..., SmtpPool], nursery: trio.Nursery
) -> None:
    """A checkout cancels the watcher at once: the sender reads the socket itself."""
    pool = pools(server.url(), starttls="never", pool_size=2)
    await send_one(pool, mail(job_id="J0"))  # idle before serve starts: watched from then
    await nursery.start(pool.serve)
    for i in range(1, 6):
        await trio.sleep(0.01)  # let the watcher wait on the socket
        await send_one(pool, mail(job_id=f"J{i}"))
    async with trio.open_nursery() as senders:
        for i in range(6, 12):
            senders.start_soon(send_one, pool, mail(job_id=f"J{i}"))
    stats = pool.statistics()
    assert stats.sends == 12 and stats.connects <= 2 and stats.idle_closed == 0
    server.close_all_connections()  # the connections idle since serve started: watched
    await wait_for(lambda: pool.statistics().open == 0)


async def test_serve_twice_is_an_error(server: Server, pools: Callable[..., SmtpPool]) -> None:
    pool = pools(server.url())
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.serve)
        with pytest.raises(RuntimeError, match="already running"):
            await pool.serve()
        nursery.cancel_scope.cancel()


# -- start-up errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "smtp://mailer:pa/ss@mx.example.com:587",
            "smtp.url 'smtp://mailer:***@mx.example.com:587': the password contains /, which "
            "ends the user part of a URL: percent-encode it (/ is %2F)",
        ),
        (
            "smtp://mailer:a?b#c@mx.example.com",
            "smtp.url 'smtp://mailer:***@mx.example.com': the password contains # ?, which "
            "ends the user part of a URL: percent-encode it (# is %23, ? is %3F)",
        ),
        (
            "http://mx.example.com",
            "smtp.url 'http://mx.example.com': the scheme must be smtp:// (STARTTLS when "
            "offered) or smtps:// (implicit TLS), not 'http://'",
        ),
        (
            "mx.example.com:25",
            "smtp.url 'mx.example.com:25': no scheme: write smtp://host:port or smtps://host:port",
        ),
    ],
)
def test_url_errors_say_what_to_fix(url: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        SmtpUrl.parse(url)
    assert str(info.value) == message


def test_url_user_may_hold_an_at_sign() -> None:
    """The last @ ends the user info: an address as the user name works unencoded."""
    parsed = SmtpUrl.parse("smtp://mailer@example.com:p@ss@mx.example.com:587")
    assert (parsed.username, parsed.password, parsed.host) == (
        "mailer@example.com",
        "p@ss",
        "mx.example.com",
    )


def test_ca_file_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        SmtpPool(SmtpSettings(tls_ca_file="/nonexistent/ca.pem"), "smtp://127.0.0.1")
    assert str(info.value) == (
        "smtp.tls_ca_file '/nonexistent/ca.pem': no such file or directory: give a PEM "
        "file of the CA that signed the server's certificate"
    )
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"^smtp.tls_ca_file '.*junk.pem': no usable cert"):
        SmtpPool(SmtpSettings(tls_ca_file=str(junk)), "smtp://127.0.0.1")


def test_helo_name_defaults_to_the_fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "mail.example.org")
    assert helo_name_for(SmtpSettings(), "mx.example.com") == "mail.example.org"
    assert helo_name_for(SmtpSettings(helo_name="out.example.net"), "mx.example.com") == (
        "out.example.net"
    )


@pytest.mark.parametrize("fqdn", ["vm", "localhost", "localhost.localdomain"])
def test_helo_name_not_qualified_is_a_start_up_error(
    monkeypatch: pytest.MonkeyPatch, fqdn: str
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    with pytest.raises(ConfigError) as info:
        SmtpPool(SmtpSettings(), "smtp://mx.example.com:587")
    assert "set smtp.helo_name (ENGINE_SMTP__HELO_NAME)" in str(info.value)
    assert "\n" not in str(info.value)
    # On loopback (the embedded sink, tests) "localhost" is fine.
    for host in ("127.0.0.1", "localhost", "[::1]"):
        SmtpPool(SmtpSettings(), f"smtp://{host}:2525")
    assert helo_name_for(SmtpSettings(), "127.0.0.1") == "localhost"


def test_helo_name_must_be_a_host_name() -> None:
    with pytest.raises(ConfigError, match=r"smtp\.helo_name 'my host'"):
        helo_name_for(SmtpSettings(helo_name="my host"), "127.0.0.1")


async def test_ehlo_sends_the_configured_name(
    scripted: Callable[..., Awaitable[Scripted]], pools: Callable[..., SmtpPool]
) -> None:
    server = await scripted()
    await send_one(pools(url_of(server)), mail(job_id="J1"))
    await send_one(pools(url_of(server), helo_name="out.example.net"), mail(job_id="J2"))
    assert server.commands("EHLO") == [(0, "EHLO localhost"), (1, "EHLO out.example.net")]


# -- pure parts -------------------------------------------------------------------------


def test_reply_parser_pipelined_and_partial() -> None:
    parser = ReplyParser()
    parser.feed(b"250-first\r\n250-SIZE 10\r\n250 last\r\n354 go ahead\r\n55")
    first = parser.next_reply()
    assert first is not None
    assert (first.code, first.lines) == (250, ("first", "SIZE 10", "last"))
    second = parser.next_reply()
    assert second is not None and second.code == 354 and second.text == "go ahead"
    assert parser.next_reply() is None
    parser.feed(b"0 no\n")  # bare LF tolerated
    third = parser.next_reply()
    assert third is not None and (third.code, third.text) == (550, "no")
    parser.feed(b"250\r\n")
    fourth = parser.next_reply()
    assert fourth is not None and (fourth.code, fourth.lines) == (250, ("",))
    assert not parser.pending


@pytest.mark.parametrize("garbage", [b"hello\r\n", b"25\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n"])
def test_reply_parser_rejects_garbage(garbage: bytes) -> None:
    parser = ReplyParser()
    parser.feed(garbage)
    with pytest.raises(SmtpProtocolError):
        while parser.next_reply() is not None:
            pass


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mx.example.com", SmtpUrl("mx.example.com", 25, False)),
        ("smtp://mx.example.com:2525", SmtpUrl("mx.example.com", 2525, False)),
        ("smtps://mx.example.com", SmtpUrl("mx.example.com", 465, True)),
        ("smtp://u%40x:p%3Aw%2F@h:587", SmtpUrl("h", 587, False, "u@x", "p:w/")),
        ("smtp://[::1]:26", SmtpUrl("::1", 26, False)),
    ],
)
def test_smtp_url_parse(url: str, expected: SmtpUrl) -> None:
    assert SmtpUrl.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://h", "scheme"),
        ("smtp://", "no host"),
        ("smtp://h:99999", "out of range"),
        ("smtp://h:port", "port"),
        ("smtp://h/path", "path"),
        ("smtp://user@h", "user and password"),
        ("mx.example.com:25", "scheme"),
    ],
)
def test_smtp_url_parse_errors(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        SmtpUrl.parse(url)


def test_url_password_not_in_errors_or_repr() -> None:
    with pytest.raises(ConfigError) as info:
        SmtpUrl.parse("smtp://u:secret@h/x")
    assert "secret" not in str(info.value)
    assert "secret" not in repr(SmtpUrl.parse("smtp://u:secret@h"))


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="starttls"):
        SmtpPool(SmtpSettings(starttls="maybe"), "smtp://h")
    with pytest.raises(ConfigError, match="tls_ca_file"):
        SmtpPool(SmtpSettings(tls_ca_file="/nonexistent/ca.pem"), "smtp://h")


def test_cli_prints_an_smtp_setting_error_as_one_line(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found as the engine builds its parts, inside trio.run: still one line, exit 2."""
    argv = ["serve", "--redis-url", redis_server.url, "--bind", f"{HOST}:{free_port()}"]
    code = cli.main([*argv, "--smtp-url", "smtp://mailer:pa/ss@mx.example.com:587"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: smtp.url 'smtp://mailer:***@mx.example.com:587': the password contains /, "
        "which ends the user part of a URL: percent-encode it (/ is %2F)\n"
    )
