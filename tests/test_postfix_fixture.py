"""The real-Postfix fixture (fixtures/postfix.py) does what the outage tests will rely
on: TLS with its private CA, AUTH, strict HELO, idle timeout, delivery read back,
stop/start on the same ports -- proven with Python's smtplib and with our own SmtpPool.

One instance is shared by the module (tests that do not disturb it); tests that need
other options or stop the server start their own (about 0.5 s each).
"""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import aclosing

import pytest
import trustme

from engine.config import SmtpSettings
from engine.errors import TransportUnavailable
from engine.transport.base import OutgoingMail, SendResult
from engine.transport.smtp import SmtpPool
from fixtures.postfix import PostfixServer

CLIENT = "client.example.test"  # an FQDN, which strict HELO checking wants
USER, PASSWORD = "alice", "s3cret pass:word"


@pytest.fixture(scope="module")
def server() -> Iterator[PostfixServer]:
    """Strict like a hardened MTA: AUTH needed to relay, FQDN HELO, no pipelining before
    it is allowed, no bare LF."""
    with PostfixServer(
        users={USER: PASSWORD},
        mynetworks=(),
        strict_helo=True,
        forbid_unauth_pipelining=True,
        forbid_bare_newline="reject",
    ) as srv:
        yield srv


def smtp(server: PostfixServer, helo: str = CLIENT) -> smtplib.SMTP:
    return smtplib.SMTP(server.host, server.port, local_hostname=helo, timeout=10)


def message(subject: str, to: str = "bob@example.test") -> bytes:
    return (
        f"From: ann@sender.test\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello Postfix.\r\n"
    ).encode()


class Raw:
    """A bare TCP SMTP session, for what smtplib will not do (pipelining, bare LF)."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, str]:
        """The next reply (all its lines); (0, "") when the server closed first."""
        lines: list[bytes] = []
        while True:
            line, nl, rest = self.buf.partition(b"\r\n")
            if not nl:
                chunk = self.sock.recv(4096)
                if not chunk:
                    return 0, ""
                self.buf += chunk
                continue
            self.buf = rest
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(x[4:].decode() for x in lines)

    def closed(self) -> bool:
        return self.sock.recv(4096) == b""

    def close(self) -> None:
        self.sock.close()


# -- TLS --------------------------------------------------------------------------------


def test_starttls_verifies_with_the_fixture_ca(server: PostfixServer) -> None:
    with smtp(server) as client:
        code, text = client.ehlo()
        assert code == 250
        assert text.decode().splitlines()[0] == server.hostname
        assert client.has_extn("starttls")
        client.starttls(context=server.client_context())
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.noop()[0] == 250


def test_starttls_with_another_ca_fails(server: PostfixServer) -> None:
    stranger = ssl.create_default_context()
    trustme.CA().configure_trust(stranger)
    with smtp(server) as client, pytest.raises(ssl.SSLCertVerificationError):
        client.starttls(context=stranger)


def test_implicit_tls_port(server: PostfixServer) -> None:
    assert server.smtps_port is not None
    with smtplib.SMTP_SSL(
        server.host,
        server.smtps_port,
        local_hostname=CLIENT,
        context=server.client_context(),
        timeout=10,
    ) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.ehlo()[0] == 250
        assert not client.has_extn("starttls")  # already encrypted
        assert client.has_extn("auth")


# -- AUTH and relaying ------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_with_the_right_password(server: PostfixServer, mechanism: str) -> None:
    with smtp(server) as client:
        client.starttls(context=server.client_context())
        client.ehlo()
        assert set(client.esmtp_features["auth"].upper().split()) == {"PLAIN", "LOGIN"}
        client.user, client.password = USER, PASSWORD
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        code, _ = client.auth(mechanism, authobject)
        assert code == 235
        # Authenticated, it may relay (into the fixture's maildir: nothing leaves).
        client.mail("ann@sender.test")
        assert client.rcpt("someone@elsewhere.test")[0] == 250
        client.rset()


def test_auth_with_a_wrong_password_fails(server: PostfixServer) -> None:
    with smtp(server) as client:
        client.starttls(context=server.client_context())
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.login(USER, "wrong")
        assert refused.value.smtp_code == 535
        # Not authenticated: relaying is refused, local delivery is not.
        client.mail("ann@sender.test")
        code, text = client.rcpt("someone@elsewhere.test")
        assert (code, b"Relay access denied" in text) == (554, True)
        assert client.rcpt("bob@example.test")[0] == 250
        client.rset()


def test_tls_required_and_auth_only_under_tls() -> None:
    with (
        PostfixServer(
            users={USER: PASSWORD}, require_tls=True, auth_tls_only=True, implicit_tls=False
        ) as srv,
        smtp(srv) as client,
    ):
        client.ehlo()
        assert not client.has_extn("auth")
        code, text = client.mail("ann@sender.test")
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=srv.client_context())
        client.login(USER, PASSWORD)
        client.sendmail("ann@sender.test", ["bob@example.test"], message("under tls"))
        assert srv.wait_received(1)[0].subject == "under tls"


# -- strictness -------------------------------------------------------------------------


def test_non_fqdn_helo_is_refused_at_rcpt(server: PostfixServer) -> None:
    # smtpd_delay_reject (the default): EHLO passes, the HELO check answers at RCPT TO.
    with smtp(server, helo="localhost") as client:
        assert client.ehlo()[0] == 250
        assert client.mail("ann@sender.test")[0] == 250
        code, text = client.rcpt("bob@example.test")
        assert code == 504
        assert b"5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname" in text


def test_non_fqdn_helo_is_refused_at_ehlo_without_delay_reject() -> None:
    with (
        PostfixServer(strict_helo=True, delay_reject=False, implicit_tls=False) as srv,
        smtp(srv, helo="localhost") as client,
    ):
        code, text = client.ehlo()
        assert code == 504
        assert b"need fully-qualified hostname" in text
        assert client.ehlo(CLIENT)[0] == 250


def test_unauthorized_pipelining_is_refused(server: PostfixServer) -> None:
    raw = Raw(server.port)
    try:
        assert raw.reply()[0] == 220
        # RFC 2920: EHLO ends a pipelined group; nothing may follow it unanswered.
        raw.send(b"EHLO " + CLIENT.encode() + b"\r\nNOOP\r\n")
        assert raw.reply() == (554, "5.5.0 Error: SMTP protocol synchronization")
        assert raw.closed()
    finally:
        raw.close()


def test_bare_newline_is_refused(server: PostfixServer) -> None:
    raw = Raw(server.port)
    try:
        assert raw.reply()[0] == 220
        raw.send(b"EHLO " + CLIENT.encode() + b"\n")
        code, text = raw.reply()
        assert code == 550
        assert "bare <LF>" in text
    finally:
        raw.close()


# -- delivery ---------------------------------------------------------------------------


def test_message_is_delivered_and_read_back(server: PostfixServer) -> None:
    before = len(server.received())
    with smtp(server) as client:
        client.starttls(context=server.client_context())
        refused = client.sendmail("ann@sender.test", ["bob@example.test"], message("delivered"))
        assert refused == {}
    got = server.wait_received(before + 1)[-1]
    assert (got.recipient, got.sender) == ("bob@example.test", "ann@sender.test")
    assert got.subject == "delivered"
    assert got.message.get_content() == "Hello Postfix.\n"
    assert "with ESMTPS" in got.message["Received"]


def test_unknown_mailbox_is_refused() -> None:
    with (
        PostfixServer(mailboxes=["known"], implicit_tls=False) as srv,
        smtp(srv) as client,
    ):
        client.mail("ann@sender.test")
        code, text = client.rcpt("unknown@example.test")
        assert code == 550
        assert b"User unknown in virtual mailbox table" in text
        assert client.rcpt("known@example.test")[0] == 250
        client.data(message("known"))
        assert srv.wait_received(1)[0].recipient == "known@example.test"


# -- timeout and outages ----------------------------------------------------------------


def test_idle_session_gets_421_after_smtpd_timeout() -> None:
    with PostfixServer(timeout_s=1, implicit_tls=False) as srv:
        raw = Raw(srv.port)
        try:
            assert raw.reply()[0] == 220
            raw.send(b"EHLO " + CLIENT.encode() + b"\r\n")
            assert raw.reply()[0] == 250
            idle_since = time.monotonic()
            code, text = raw.reply()
            waited = time.monotonic() - idle_since
            assert (code, text) == (421, f"4.4.2 {srv.hostname} Error: timeout exceeded")
            assert 0.9 <= waited < 5
            assert raw.closed()
        finally:
            raw.close()


def test_stop_and_start_on_the_same_ports(postfix: PostfixServer) -> None:
    ports = (postfix.port, postfix.smtps_port)
    with smtp(postfix) as client:
        client.sendmail("ann@sender.test", ["bob@example.test"], message("before"))
    postfix.wait_received(1)
    master = postfix.master_pid
    postfix.stop()
    assert not postfix.running
    with pytest.raises(ProcessLookupError):
        os.killpg(master, 0)  # the master and all its children are gone, and reaped
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((postfix.host, postfix.port), timeout=2)
    postfix.start()
    assert (postfix.port, postfix.smtps_port) == ports
    with smtp(postfix) as client:
        client.sendmail("ann@sender.test", ["bob@example.test"], message("after"))
    assert [m.subject for m in postfix.wait_received(2)] == ["before", "after"]


def test_queued_mail_survives_a_crash() -> None:
    # Held by defer_transports, the message waits in Postfix's queue across the crash.
    with PostfixServer(implicit_tls=False, main_cf={"defer_transports": "virtual"}) as srv:
        with smtp(srv) as client:
            client.sendmail("ann@sender.test", ["bob@example.test"], message("queued"))
        deadline = time.monotonic() + 5
        while not [q for q in srv.queue() if q["queue_name"] == "deferred"]:
            assert time.monotonic() < deadline, srv.queue()
            time.sleep(0.02)
        [queued] = srv.queue()
        assert queued["recipients"][0]["address"] == "bob@example.test"
        srv.kill()
        srv.configure(defer_transports="")
        srv.start()
        srv.flush()  # else it waits for its retry time (5 minutes)
        assert [m.subject for m in srv.wait_received(1)] == ["queued"]
        assert srv.received()[0].recipient == "bob@example.test"
        assert srv.queue() == []


# -- our own client ---------------------------------------------------------------------


def outgoing(subject: str, to: str = "bob@example.test") -> OutgoingMail:
    return OutgoingMail("job-" + subject, "ann@sender.test", [to], message(subject, to))


@pytest.mark.parametrize("smtps", [False, True], ids=["starttls", "implicit-tls"])
async def test_engine_pool_delivers_through_postfix(server: PostfixServer, smtps: bool) -> None:
    # Also proves the pool's pipelining (envelope in one write, the next envelope behind
    # the content) passes smtpd_forbid_unauth_pipelining, on by default in Postfix 3.9.
    settings = SmtpSettings(
        starttls="require",
        tls_ca_file=str(server.ca_pem),
        helo_name=CLIENT,
        connect_timeout_s=5.0,
        command_timeout_s=5.0,
    )
    pool = SmtpPool(settings, server.url(USER, PASSWORD, smtps=smtps))
    # Authenticated, so the relayed one is taken too (and lands in the same maildir).
    mails = [
        outgoing(f"local-{smtps}", "carol@example.test"),
        outgoing(f"relayed-{smtps}", "dave@elsewhere.test"),
    ]
    try:
        async with aclosing(pool.send_many(mails)) as outcomes:
            results = [outcome async for _, outcome in outcomes]
    finally:
        await pool.aclose()
    assert [r.code if isinstance(r, SendResult) else r for r in results] == [250, 250]
    deadline = time.monotonic() + 10
    while True:
        got = {m.subject: m.recipient for m in server.received()}
        if f"relayed-{smtps}" in got and f"local-{smtps}" in got:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.02)
    assert got[f"local-{smtps}"] == "carol@example.test"
    assert got[f"relayed-{smtps}"] == "dave@elsewhere.test"


async def test_a_non_fqdn_helo_name_is_a_transport_failure_at_strict_postfix(
    server: PostfixServer,
) -> None:
    settings = SmtpSettings(tls_ca_file=str(server.ca_pem), helo_name="localhost")
    pool = SmtpPool(settings, server.url(USER, PASSWORD))
    try:
        async with aclosing(pool.send_many([outgoing("helo")])) as outcomes:
            [(_, outcome)] = [item async for item in outcomes]
    finally:
        await pool.aclose()
    # The server refuses us, not the message: no attempt is spent, the breaker opens.
    assert isinstance(outcome, TransportUnavailable)
    assert outcome.code == 504
    assert "need fully-qualified hostname" in str(outcome) and "smtp.helo_name" in str(outcome)
