"""The SMTP client and pool against a real aiosmtpd server over loopback TCP.

aiosmtpd's Controller runs its own asyncio loop in a thread; the tests drive our trio
client against it and assert on what the server received and on ``statistics()``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from engine.config import SmtpSettings
from engine.errors import ConfigError, PermanentFailure, TemporaryFailure, TransportError
from engine.models import Message
from engine.transport import OutgoingMail, SendOutcome, SendResult, SmtpPool, Transport, compose
from engine.transport.smtp import (
    ConnectionDropped,
    ReplyParser,
    SmtpConnection,
    SmtpProtocolError,
    SmtpUrl,
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
    with pytest.raises(TemporaryFailure) as info:
        await send_one(pool, mail())
    assert info.value.code is None
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
    with pytest.raises(TemporaryFailure, match="STARTTLS"):
        await send_one(pool, mail())
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


async def test_auth_login_without_tls(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    handler = Handler()
    server = start_server(
        handler,
        authenticator=authenticator(handler),
        auth_require_tls=False,
        auth_exclude_mechanism=["PLAIN"],
    )
    pool = pools(server.url(userinfo="us%40r:p%3Ass%20w%2Frd@"), starttls="never")
    await send_one(pool, mail())
    assert handler.auth_mechanisms == ["LOGIN"]
    assert len(handler.received) == 1


async def test_auth_bad_credentials_is_temporary(
    start_server: Callable[..., Server], pools: Callable[..., SmtpPool]
) -> None:
    handler = Handler()
    server = start_server(handler, authenticator=authenticator(handler), auth_require_tls=False)
    pool = pools(server.url(userinfo="us%40r:wrong@"), starttls="never")
    with pytest.raises(TemporaryFailure) as info:
        await send_one(pool, mail())
    assert info.value.code == 535
    assert handler.received == []
    assert pool.statistics().open == 0


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
async def test_idle_connection_closed_by_server_is_retried_transparently(
    start_server: Callable[..., Server],
    pools: Callable[..., SmtpPool],
    caplog: pytest.LogCaptureFixture,
    pipelining: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="engine.transport.smtp")
    server = start_server(Handler(pipelining=pipelining))
    pool = pools(server.url(), starttls="never")
    await send_one(pool, mail(job_id="J1"))
    server.close_all_connections()
    await trio.sleep(0.2)  # let the FIN arrive
    result = await send_one(pool, mail(job_id="J2"))
    assert result.code == 250
    assert len(server.handler.received) == 2
    stats = pool.statistics()
    assert (stats.connects, stats.open, stats.sends) == (2, 1, 2)
    assert "smtp.send_many.stale_retry" in caplog.text


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
    assert all(isinstance(o, SendResult) for _, o in outcomes[:3])
    for _, o in outcomes[3:]:
        assert isinstance(o, ConnectionDropped)
        assert o.code is None
    # The content of J003 went out, so the server may have taken it; the rest never did.
    in_flight = outcomes[3][1]
    assert isinstance(in_flight, ConnectionDropped) and not in_flight.before_reply
    assert all(isinstance(o, ConnectionDropped) and o.before_reply for _, o in outcomes[4:])
    if failure == "timeout":
        assert "0.3" in str(in_flight)
    # (A stalled server may still record J003 after we gave up on it.)
    received = [r.rcpt_tos for r in handler.received if r.rcpt_tos != ["r3@example.com"]]
    assert received == [m.recipients for m in mails[:3]]
    stats = pool.statistics()
    assert (stats.open, stats.in_use, stats.sends) == (0, 0, 3), "broken connection dropped"
    # The pool recovers: the unsent mails go over a new connection.
    handler.drop_at_data_for = handler.stall_at_data_for = None
    handler.stall_at_data_s = 0.0
    again = await collect(pool.send_many(mails[4:]))
    assert all(isinstance(o, SendResult) for _, o in again)
    assert pool.statistics().connects == 2
    received = [r.rcpt_tos for r in handler.received if r.rcpt_tos != ["r3@example.com"]]
    assert received == [m.recipients for m in mails[:3] + mails[4:]]


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
    assert (stats.connects, stats.open, stats.sends) == (2, 1, 4)
    assert "smtp.send_many.stale_retry" in caplog.text


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
    assert all(isinstance(o, TemporaryFailure) and o.code is None for _, o in outcomes)
    assert dead.statistics().open == 0
    pool = pools(server.url(), starttls="never")
    await pool.aclose()
    outcomes = await collect(pool.send_many(mails))
    assert all(isinstance(o, TemporaryFailure) for _, o in outcomes)
    assert server.handler.received == []


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
