"""Our SMTP pool against a real Postfix (fixtures/postfix.py): the transport's own
failures -- refused connections, TLS, HELO, AUTH, a wrong scheme for the port, the
server's idle timeout -- are TransportUnavailable with a message that says what to fix,
or are ridden out without any outcome; never a failure of a message.

Each Postfix instance starts in ~0.5 s; every test here takes a few seconds at most.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from engine.config import SmtpSettings
from engine.errors import TransportError, TransportUnavailable
from engine.transport import OutgoingMail, SendOutcome, SendResult, SmtpPool
from fixtures.postfix import PostfixError, PostfixServer

CLIENT = "client.engine.test"  # a fully-qualified EHLO name
USER, PASSWORD = "mailer", "s3cret/pw"
CLOSE_WAIT = "08"  # the state column of /proc/net/tcp


@contextmanager
def running(**options: Any) -> Iterator[PostfixServer]:
    server = PostfixServer(**options)
    try:
        server.start()
    except PostfixError as exc:
        server.close()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def server() -> Iterator[PostfixServer]:
    """STARTTLS on ``port``, implicit TLS on ``smtps_port``, AUTH for USER."""
    with running(users={USER: PASSWORD}) as server:
        yield server


@pytest.fixture(scope="module")
def impatient() -> Iterator[PostfixServer]:
    """Ends idle sessions after 1 s: "421 4.4.2 ... Error: timeout exceeded"."""
    with running(timeout_s=1, implicit_tls=False) as server:
        yield server


@pytest.fixture(scope="module")
def strict() -> Iterator[PostfixServer]:
    """Refuses HELO names that are not fully qualified (at RCPT, smtpd_delay_reject)."""
    with running(strict_helo=True, implicit_tls=False) as server:
        yield server


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., SmtpPool]]:
    made: list[SmtpPool] = []

    def make(url: str, server: PostfixServer, **settings: Any) -> SmtpPool:
        settings.setdefault("tls_ca_file", str(server.ca_pem))
        settings.setdefault("helo_name", CLIENT)
        settings.setdefault("connect_timeout_s", 5.0)
        settings.setdefault("command_timeout_s", 5.0)
        pool = SmtpPool(SmtpSettings(**settings), url)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.aclose()


def mails(n: int, tag: str) -> list[OutgoingMail]:
    out = []
    for i in range(n):
        to = f"r{i}@example.test"
        data = f"From: ann@sender.test\r\nTo: {to}\r\nSubject: {tag}-{i}\r\n\r\nHello.\r\n"
        out.append(OutgoingMail(f"{tag}-{i}", "ann@sender.test", [to], data.encode()))
    return out


async def send(pool: SmtpPool, batch: list[OutgoingMail]) -> list[SendOutcome]:
    async with aclosing(pool.send_many(batch)) as outcomes:
        return [item async for item in outcomes]


def results(outcomes: list[SendOutcome]) -> list[SendResult | TransportError]:
    return [outcome for _, outcome in outcomes]


def only_unavailable(outcomes: list[SendOutcome]) -> TransportUnavailable:
    """Assert every outcome is TransportUnavailable; the first one."""
    found = results(outcomes)
    assert all(isinstance(o, TransportUnavailable) for o in found), found
    first = found[0]
    assert isinstance(first, TransportUnavailable)
    return first


def log_lines(server: PostfixServer, text: str) -> list[str]:
    return [line for line in server.logs().splitlines() if text in line]


async def wait_log(server: PostfixServer, text: str, *, seen: int = 0) -> str:
    """The next line of Postfix's log with ``text`` after the ``seen`` ones before it
    (postlogd writes it a moment after the fact)."""
    with trio.fail_after(5):
        while len(found := log_lines(server, text)) <= seen:
            await trio.sleep(0.02)
    return found[seen]


async def wait_delivered(server: PostfixServer, subjects: set[str]) -> None:
    with trio.fail_after(10):
        while not subjects <= {m.subject for m in server.received()}:
            await trio.sleep(0.02)


def tcp_states(local_port: int) -> set[str]:
    """The states of our TCP sockets bound to ``local_port`` (Linux /proc/net/tcp)."""
    states = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == local_port:
            states.add(fields[3])
    return states


def local_port(pool: SmtpPool) -> int:
    [conn] = pool._idle
    fd = conn.fileno()
    assert fd is not None
    with socket.socket(fileno=fd) as sock:
        try:
            port: int = sock.getsockname()[1]
        finally:
            sock.detach()  # the connection still owns the descriptor
    return port


# -- the server's idle timeout ----------------------------------------------------------


async def test_idle_timeout_421_is_ridden_out_without_an_outcome(
    impatient: PostfixServer, pools: Callable[..., SmtpPool]
) -> None:
    """Postfix ends an idle session with 421 and closes. Without ``serve`` the pool notices
    at the next checkout (the socket sat in CLOSE-WAIT until then) and sends the whole
    batch over a new connection: every mail delivered, none charged an attempt."""
    pool = pools(impatient.url(), impatient, idle_timeout_s=30.0)
    timeouts = len(log_lines(impatient, "timeout after END-OF-MESSAGE"))
    assert isinstance(results(await send(pool, mails(1, "first")))[0], SendResult)
    port = local_port(pool)
    await wait_log(impatient, "timeout after END-OF-MESSAGE", seen=timeouts)
    await trio.sleep(0.05)
    assert CLOSE_WAIT in tcp_states(port), "(unwatched: closed only at the next checkout)"
    outcomes = await send(pool, mails(3, "after-timeout"))
    assert all(isinstance(o, SendResult) for o in results(outcomes)), outcomes
    stats = pool.statistics()
    assert (stats.connects, stats.stale, stats.sends, stats.open) == (2, 1, 4, 1)
    assert CLOSE_WAIT not in tcp_states(port)
    await wait_delivered(impatient, {f"after-timeout-{i}" for i in range(3)})


async def test_serve_closes_the_connection_postfix_times_out_at_once(
    impatient: PostfixServer,
    pools: Callable[..., SmtpPool],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="engine.transport.smtp")
    pool = pools(impatient.url(), impatient, idle_timeout_s=30.0)
    await nursery.start(pool.serve)
    assert isinstance(results(await send(pool, mails(1, "watched")))[0], SendResult)
    port = local_port(pool)
    with trio.fail_after(3):
        while pool.statistics().open:
            await trio.sleep(0.01)
    assert pool.statistics().idle_closed == 1
    with trio.fail_after(1):  # (closed just after: over TLS, close_notify goes first)
        while CLOSE_WAIT in tcp_states(port):
            await trio.sleep(0.01)
    [said] = [r.message for r in caplog.records if "smtp.idle.closed_by_server" in r.message]
    assert "421 4.4.2 mx.postfix.test Error: timeout exceeded" in said
    outcomes = await send(pool, mails(2, "after-watch"))
    assert all(isinstance(o, SendResult) for o in results(outcomes))
    stats = pool.statistics()
    assert (stats.connects, stats.stale, stats.sends) == (2, 0, 3)


async def test_our_idle_timeout_quits_before_postfix_does(
    impatient: PostfixServer, pools: Callable[..., SmtpPool], nursery: trio.Nursery
) -> None:
    pool = pools(impatient.url(), impatient, idle_timeout_s=0.3)
    await nursery.start(pool.serve)
    quits = len(log_lines(impatient, "quit=1"))
    start = time.monotonic()
    assert isinstance(results(await send(pool, mails(1, "quit")))[0], SendResult)
    with trio.fail_after(3):
        while pool.statistics().open:
            await trio.sleep(0.01)
    assert time.monotonic() - start < 0.9, "before Postfix's 1 s"
    await wait_log(impatient, "quit=1", seen=quits)  # a clean QUIT, not Postfix's timeout
    assert pool.statistics().idle_closed == 1


# -- the server is down -----------------------------------------------------------------


async def test_refused_connection_is_transport_unavailable_for_every_mail(
    pools: Callable[..., SmtpPool],
) -> None:
    with running(implicit_tls=False) as server:
        pool = pools(server.url(), server)
        assert isinstance(results(await send(pool, mails(1, "before")))[0], SendResult)
        await trio.to_thread.run_sync(server.stop)
        outcomes = await send(pool, mails(3, "outage"))
        first = only_unavailable(outcomes)
        assert str(first) == f"connect to {server.host}:{server.port}: connection refused"
        await trio.to_thread.run_sync(server.start)
        outcomes = await send(pool, mails(3, "after"))
        assert all(isinstance(o, SendResult) for o in results(outcomes))
        assert pool.statistics().connects == 2


# -- HELO, AUTH -------------------------------------------------------------------------

HELO_REFUSED = "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
HELO_HINT = "(set smtp.helo_name (ENGINE_SMTP__HELO_NAME) to this machine's fully-qualified name)"


async def test_strict_helo_refused_at_rcpt_is_transport_unavailable(
    strict: PostfixServer, pools: Callable[..., SmtpPool]
) -> None:
    # "" on loopback sends "localhost", which this Postfix refuses (at RCPT TO).
    pool = pools(strict.url(), strict, helo_name="")
    outcomes = await send(pool, mails(3, "helo"))
    first = only_unavailable(outcomes)
    assert first.code == 504
    assert str(first) == (
        f"all 1 recipients refused, first r0@example.test: {HELO_REFUSED} {HELO_HINT}"
    )
    assert pool.statistics().open == 0
    fixed = pools(strict.url(), strict)  # helo_name=CLIENT
    assert all(isinstance(o, SendResult) for o in results(await send(fixed, mails(2, "ok"))))


async def test_strict_helo_refused_at_ehlo_is_transport_unavailable(
    pools: Callable[..., SmtpPool],
) -> None:
    with running(strict_helo=True, delay_reject=False, implicit_tls=False) as server:
        pool = pools(server.url(), server, helo_name="localhost")
        first = only_unavailable(await send(pool, mails(2, "ehlo")))
        assert first.code == 504
        assert str(first) == (
            f"EHLO and HELO localhost to {server.host}:{server.port}: {HELO_REFUSED} {HELO_HINT}"
        )


async def test_wrong_password_is_transport_unavailable(
    server: PostfixServer, pools: Callable[..., SmtpPool]
) -> None:
    pool = pools(server.url(USER, "wrong"), server)
    first = only_unavailable(await send(pool, mails(2, "auth")))
    assert first.code == 535
    assert str(first) == (
        f"AUTH PLAIN as {USER!r} to {server.host}:{server.port}: 535 5.7.8 Error: "
        "authentication failed: authentication failure (check the user and password in "
        "smtp.url)"
    )
    good = pools(server.url(USER, PASSWORD), server)
    assert isinstance(results(await send(good, mails(1, "authed")))[0], SendResult)


# -- TLS --------------------------------------------------------------------------------

ISSUER = (
    "certificate verify failed: unable to get local issuer certificate (set "
    "smtp.tls_ca_file to your CA, or check the server's certificate)"
)


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


@pytest.mark.parametrize("ca", ["missing", "wrong"])
@pytest.mark.parametrize("smtps", [False, True], ids=["starttls", "implicit-tls"])
async def test_untrusted_certificate_says_so_and_tells_postfix(
    server: PostfixServer,
    pools: Callable[..., SmtpPool],
    other_ca: str,
    ca: str,
    smtps: bool,
) -> None:
    """Our alert reaches Postfix: its log says "unknown ca", not just "lost connection"."""
    ca_file = None if ca == "missing" else other_ca
    pool = pools(server.url(smtps=smtps), server, tls_ca_file=ca_file)
    alerts = len(log_lines(server, "alert unknown ca"))
    first = only_unavailable(await send(pool, mails(1, "tls")))
    port = server.smtps_port if smtps else server.port
    assert str(first) == f"{'TLS' if smtps else 'STARTTLS'} to {server.host}:{port}: {ISSUER}"
    line = await wait_log(server, "alert unknown ca", seen=alerts)
    assert "SSL alert number 48" in line


async def test_hostname_mismatch_says_so_and_tells_postfix(
    server: PostfixServer, pools: Callable[..., SmtpPool]
) -> None:
    # 127.1 is 127.0.0.1, but not a name the certificate (localhost, 127.0.0.1) is for.
    alerts = len(log_lines(server, "alert bad certificate"))
    pool = pools(f"smtp://127.1:{server.port}", server)
    first = only_unavailable(await send(pool, mails(1, "mismatch")))
    assert str(first) == (
        f"STARTTLS to 127.1:{server.port}: certificate verify failed: Hostname mismatch, "
        "certificate is not valid for '127.1' (use a host name in smtp.url that the "
        "certificate is for, or fix the certificate)"
    )
    line = await wait_log(server, "alert bad certificate", seen=alerts)
    assert "SSL alert number 42" in line


async def test_smtps_on_the_plain_port_says_so(
    server: PostfixServer, pools: Callable[..., SmtpPool]
) -> None:
    pool = pools(f"smtps://{server.host}:{server.port}", server)
    start = time.monotonic()
    first = only_unavailable(await send(pool, mails(1, "scheme")))
    assert time.monotonic() - start < 1.0
    assert str(first) == (
        f"TLS to {server.host}:{server.port}: wrong version number: the server speaks plain "
        "SMTP on this port: use smtp:// (STARTTLS) or the implicit-TLS port"
    )


async def test_smtp_on_the_implicit_tls_port_says_so_fast(
    server: PostfixServer, pools: Callable[..., SmtpPool]
) -> None:
    pool = pools(f"smtp://{server.host}:{server.smtps_port}", server, greeting_probe_s=0.5)
    start = time.monotonic()
    first = only_unavailable(await send(pool, mails(1, "scheme")))
    assert time.monotonic() - start < 2.0, "not the 5 s connect timeout"
    assert str(first) == (
        f"connect to {server.host}:{server.smtps_port}: no SMTP greeting within 0.5s, and "
        "the port answers TLS: it is an implicit-TLS port (like 465): use smtps://"
    )


async def test_verified_tls_still_delivers(
    server: PostfixServer, pools: Callable[..., SmtpPool]
) -> None:
    for smtps in (False, True):
        pool = pools(server.url(USER, PASSWORD, smtps=smtps), server, starttls="require")
        assert isinstance(results(await send(pool, mails(1, f"tls-{smtps}")))[0], SendResult)
