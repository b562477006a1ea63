"""SMTP credentials are only ever sent over TLS.

With a user and password in smtp.url, ``starttls = "auto"`` behaves as ``"require"``;
``"never"`` on a plain port is refused at start-up; a server that stops offering
STARTTLS (a downgrade) fails the connection with TransportUnavailable before AUTH. The
server here is a raw one in the test's trio run that records every byte it received in
clear, so the tests assert on the wire itself; then the same against a real Postfix.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from engine import cli
from engine.config import SmtpSettings
from engine.embedded import RedisServer, free_port
from engine.errors import ConfigError, TransportError, TransportUnavailable
from engine.transport import OutgoingMail, SendResult, SmtpPool
from engine.transport.smtp import SmtpConnection, SmtpUrl
from fixtures.postfix import PostfixError, PostfixServer

HOST = "127.0.0.1"
USER, PASSWORD = "mailer", "s3cret-pw"
USERINFO = f"{USER}:{PASSWORD}@"
# Every form the password could take on the wire: as is, in AUTH PLAIN, in AUTH LOGIN.
SECRET_FORMS = (
    PASSWORD.encode(),
    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()),
    base64.b64encode(PASSWORD.encode()),
)


# -- a server that records what it got in clear ------------------------------------------


@dataclass
class Wire:
    """SMTP server: STARTTLS offered on the connections ``starttls_on`` says (index =
    connection number; True past its end), AUTH ``mechanisms`` offered with or without
    TLS (as a careless or hostile server would), every byte received before TLS kept."""

    tls: ssl.SSLContext
    starttls_on: tuple[bool, ...] = ()
    mechanisms: str = "PLAIN LOGIN"
    implicit: bool = False
    port: int = 0
    clear: list[bytearray] = field(default_factory=list)  # per connection
    auths: list[tuple[int, bool, str, bool]] = field(default_factory=list)  # conn, tls, mech, ok
    delivered: list[bytes] = field(default_factory=list)

    def offers_starttls(self, conn: int) -> bool:
        return self.starttls_on[conn] if conn < len(self.starttls_on) else True

    def received_in_clear(self) -> bytes:
        return b"".join(bytes(b) for b in self.clear)

    async def handle(self, raw: trio.SocketStream) -> None:
        conn = len(self.clear)
        self.clear.append(bytearray())
        stream: trio.abc.Stream = raw
        secure = False
        buf = bytearray()

        async def line() -> bytes | None:
            while b"\r\n" not in buf:
                data = await stream.receive_some(65536)
                if not data:
                    return None
                if not secure:
                    self.clear[conn].extend(data)
                buf.extend(data)
            cut = buf.index(b"\r\n") + 2
            got = bytes(buf[:cut])
            del buf[:cut]
            return got

        async def say(text: str) -> None:
            await stream.send_all(text.encode() + b"\r\n")

        try:
            if self.implicit:
                stream = trio.SSLStream(raw, self.tls, server_side=True)
                secure = True
            await say("220 wire.test ESMTP")
            while (got := await line()) is not None:
                verb, _, arg = got.decode().rstrip("\r\n").partition(" ")
                verb = verb.upper()
                if verb == "EHLO":
                    ext = ["wire.test", "PIPELINING", f"AUTH {self.mechanisms}"]
                    if not secure and self.offers_starttls(conn):
                        ext.append("STARTTLS")
                    await say("\r\n".join(f"250-{x}" for x in ext[:-1]) + f"\r\n250 {ext[-1]}")
                elif verb == "STARTTLS" and not secure:
                    await say("220 go ahead")
                    stream = trio.SSLStream(raw, self.tls, server_side=True)
                    secure = True
                elif verb == "AUTH":
                    await self._auth(conn, secure, arg, say, line)
                elif verb == "DATA":
                    await say("354 go ahead")
                    content = bytearray()
                    while (part := await line()) is not None and part != b".\r\n":
                        content.extend(part)
                    self.delivered.append(bytes(content))
                    await say("250 2.0.0 Ok: queued")
                elif verb == "QUIT":
                    await say("221 bye")
                    return
                else:
                    await say("250 OK")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    async def _auth(
        self,
        conn: int,
        secure: bool,
        arg: str,
        say: Callable[[str], Awaitable[None]],
        line: Callable[[], Awaitable[bytes | None]],
    ) -> None:
        mechanism, _, token = arg.partition(" ")
        if mechanism.upper() == "PLAIN":
            _, user, secret = base64.b64decode(token).split(b"\0")
        else:
            await say("334 VXNlcm5hbWU6")
            user = base64.b64decode((await line()) or b"")
            await say("334 UGFzc3dvcmQ6")
            secret = base64.b64decode((await line()) or b"")
        ok = (user.decode(), secret.decode()) == (USER, PASSWORD)
        self.auths.append((conn, secure, mechanism.upper(), ok))
        await say("235 2.7.0 Authentication successful" if ok else "535 5.7.8 Bad credentials")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST, "localhost").configure_cert(ctx)
    return ctx


@pytest.fixture
async def wire(nursery: trio.Nursery, server_tls: ssl.SSLContext) -> Callable[..., Awaitable[Wire]]:
    async def start(**options: Any) -> Wire:
        server = Wire(server_tls, **options)
        listeners = await nursery.start(partial(trio.serve_tcp, server.handle, 0, host=HOST))
        server.port = listeners[0].socket.getsockname()[1]
        return server

    return start


@pytest.fixture
async def pools(ca_file: str) -> AsyncIterator[Callable[..., SmtpPool]]:
    made: list[SmtpPool] = []

    def make(url: str, **settings: Any) -> SmtpPool:
        settings.setdefault("tls_ca_file", ca_file)
        settings.setdefault("connect_timeout_s", 5.0)
        settings.setdefault("command_timeout_s", 5.0)
        pool = SmtpPool(SmtpSettings(**settings), url)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.aclose()


def url_of(server: Wire, scheme: str = "smtp", userinfo: str = USERINFO) -> str:
    return f"{scheme}://{userinfo}{HOST}:{server.port}"


def mail(n: int = 0) -> OutgoingMail:
    data = f"From: a@example.org\r\nTo: b@example.com\r\nSubject: m{n}\r\n\r\nHi.\r\n"
    return OutgoingMail(f"J{n}", "a@example.org", ["b@example.com"], data.encode())


async def send(pool: SmtpPool, *mails: OutgoingMail) -> list[SendResult | TransportError]:
    async with aclosing(pool.send_many(list(mails))) as outcomes:
        return [outcome async for _, outcome in outcomes]


def assert_no_secret_in(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for form in SECRET_FORMS:
        assert form not in raw, f"{form!r} was sent or shown in clear"


# -- auto behaves as require --------------------------------------------------------------


@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
async def test_credentials_go_over_starttls(
    wire: Callable[..., Awaitable[Wire]], pools: Callable[..., SmtpPool], mechanisms: str
) -> None:
    server = await wire(mechanisms=mechanisms)
    [result] = await send(pools(url_of(server)), mail())  # starttls = "auto"
    assert isinstance(result, SendResult)
    assert server.auths == [(0, True, mechanisms.split(maxsplit=1)[0], True)]
    assert len(server.delivered) == 1
    assert b"STARTTLS" in server.received_in_clear()
    assert_no_secret_in(server.received_in_clear())


async def test_implicit_tls_with_credentials_even_with_starttls_never(
    wire: Callable[..., Awaitable[Wire]], pools: Callable[..., SmtpPool]
) -> None:
    server = await wire(implicit=True)
    [result] = await send(pools(url_of(server, "smtps"), starttls="never"), mail())
    assert isinstance(result, SendResult)
    assert server.auths == [(0, True, "PLAIN", True)]


async def test_auth_offered_only_in_clear_is_never_used(
    wire: Callable[..., Awaitable[Wire]], pools: Callable[..., SmtpPool]
) -> None:
    """A server offering AUTH but no STARTTLS: with credentials, no AUTH at all."""
    server = await wire(starttls_on=(False,))
    [outcome] = await send(pools(url_of(server)), mail())
    assert isinstance(outcome, TransportUnavailable)
    assert str(outcome) == (
        f"{HOST}:{server.port} does not offer STARTTLS, and smtp.url has a user and "
        "password: they are only ever sent over TLS (a server that offered STARTTLS "
        "before may be under a downgrade attack; else use smtps://)"
    )
    assert server.auths == [] and server.delivered == []
    assert b"AUTH" not in server.received_in_clear()
    assert_no_secret_in(server.received_in_clear())


async def test_without_credentials_auto_still_sends_in_clear(
    wire: Callable[..., Awaitable[Wire]], pools: Callable[..., SmtpPool]
) -> None:
    """Nothing secret to protect: "auto" stays opportunistic."""
    server = await wire(starttls_on=(False,))
    [result] = await send(pools(url_of(server, userinfo="")), mail())
    assert isinstance(result, SendResult)
    assert len(server.delivered) == 1 and server.auths == []


async def test_a_server_that_stops_offering_starttls_fails_the_connection(
    wire: Callable[..., Awaitable[Wire]], pools: Callable[..., SmtpPool]
) -> None:
    """Downgrade: the first connection has STARTTLS, the next one (an attacker strips
    it) has not: that connection fails as the transport's, and AUTH never goes."""
    server = await wire(starttls_on=(True, False))
    pool = pools(url_of(server), max_messages_per_connection=1)  # a new connection per mail
    [first] = await send(pool, mail(1))
    assert isinstance(first, SendResult)
    [second] = await send(pool, mail(2))
    assert isinstance(second, TransportUnavailable)
    assert "does not offer STARTTLS, and smtp.url has a user and password" in str(second)
    assert [(conn, tls) for conn, tls, _, _ in server.auths] == [(0, True)]
    assert len(server.delivered) == 1
    assert b"AUTH" not in bytes(server.clear[1])
    assert_no_secret_in(server.received_in_clear())
    assert_no_secret_in(str(second))


async def test_bad_credentials_over_tls_are_transport_unavailable(
    wire: Callable[..., Awaitable[Wire]], pools: Callable[..., SmtpPool]
) -> None:
    server = await wire()
    [outcome] = await send(pools(url_of(server, userinfo=f"{USER}:wrong@")), mail())
    assert isinstance(outcome, TransportUnavailable) and outcome.code == 535
    assert str(outcome) == (
        f"AUTH PLAIN as {USER!r} to {HOST}:{server.port}: 535 5.7.8 Bad credentials "
        "(check the user and password in smtp.url)"
    )


async def test_no_auth_offered_under_tls_says_so(
    wire: Callable[..., Awaitable[Wire]], pools: Callable[..., SmtpPool]
) -> None:
    server = await wire(mechanisms="X-NONE")
    [outcome] = await send(pools(url_of(server)), mail())
    assert isinstance(outcome, TransportUnavailable)
    assert "offers AUTH X-NONE, none of which we speak" in str(outcome)
    assert_no_secret_in(str(outcome))


# -- never with credentials: refused at start-up ----------------------------------------


def test_never_with_credentials_is_a_start_up_error() -> None:
    with pytest.raises(ConfigError) as info:
        SmtpPool(SmtpSettings(starttls="never"), f"smtp://{USERINFO}{HOST}:587")
    message = str(info.value)
    assert message.startswith('smtp.url has a user and password but smtp.starttls is "never"')
    assert "smtps://" in message and "\n" not in message
    assert_no_secret_in(message)
    # Implicit TLS, or no credentials: fine.
    SmtpPool(SmtpSettings(starttls="never"), f"smtps://{USERINFO}{HOST}:465")
    SmtpPool(SmtpSettings(starttls="never"), f"smtp://{HOST}:25")


async def test_a_connection_opened_directly_refuses_never_with_credentials(
    wire: Callable[..., Awaitable[Wire]],
) -> None:
    server = await wire()
    with pytest.raises(ConfigError, match="AUTH would send them in clear"):
        await SmtpConnection.open(
            SmtpUrl.parse(url_of(server)), SmtpSettings(starttls="never"), None
        )
    assert server.clear == [], "nothing went on the wire"


def test_cli_prints_the_refusal_as_one_line(
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENGINE_SMTP__STARTTLS", "never")
    monkeypatch.setenv("ENGINE_SMTP__HELO_NAME", "client.engine.test")
    monkeypatch.setenv("ENGINE_AUTH__ENABLED", "false")
    code = cli.main(
        ["serve", "--redis-url", redis_server.url, "--bind", f"{HOST}:{free_port()}",
         "--smtp-url", f"smtp://{USERINFO}mx.example.com:587"]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: smtp.url has a user and password but smtp.starttls is "never"')
    assert err.count("\n") == 1
    assert_no_secret_in(err)


# -- a real Postfix -----------------------------------------------------------------------


@contextmanager
def postfix(**options: Any) -> Iterator[PostfixServer]:
    server = PostfixServer(users={USER: PASSWORD}, implicit_tls=False, **options)
    try:
        server.start()
    except PostfixError as exc:
        server.close()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.close()


def postfix_mail(tag: str) -> OutgoingMail:
    data = f"From: ann@sender.test\r\nTo: r@example.test\r\nSubject: {tag}\r\n\r\nHello.\r\n"
    return OutgoingMail(tag, "ann@sender.test", ["r@example.test"], data.encode())


async def test_postfix_offering_auth_without_starttls_gets_no_auth() -> None:
    with postfix(starttls=False) as server:
        pool = SmtpPool(
            SmtpSettings(helo_name="client.engine.test", tls_ca_file=str(server.ca_pem)),
            server.url(USER, PASSWORD),
        )
        try:
            [outcome] = await send(pool, postfix_mail("clear"))
        finally:
            await pool.aclose()
        assert isinstance(outcome, TransportUnavailable)
        assert "does not offer STARTTLS, and smtp.url has a user and password" in str(outcome)
        await trio.sleep(0.3)  # postlogd writes a moment after the fact
        logs = server.logs()
        assert "sasl_method" not in logs and "authentication failed" not in logs
        assert server.received() == []


async def test_postfix_with_starttls_gets_auth_over_tls() -> None:
    with postfix(starttls=True) as server:
        pool = SmtpPool(
            SmtpSettings(helo_name="client.engine.test", tls_ca_file=str(server.ca_pem)),
            server.url(USER, PASSWORD),
        )
        try:
            [outcome] = await send(pool, postfix_mail("over-tls"))
        finally:
            await pool.aclose()
        assert isinstance(outcome, SendResult), outcome
        server.wait_received(1)
        with trio.fail_after(5):
            while "sasl_method=PLAIN" not in (logs := server.logs()):
                await trio.sleep(0.05)
        assert "TLS connection established" in logs
        # The session's TLS came before its AUTH.
        assert logs.index("TLS connection established") < logs.index("sasl_method=PLAIN")
