"""Our SMTP client on trio streams: URL parsing, one connection, and the pool senders share.

Own client rather than smtpproto 2.0, which forbids command pipelining and serializes an
EmailMessage per message: too slow for our throughput goal. Imports only the leaves.
"""

from __future__ import annotations

import base64
import errno
import ipaddress
import logging
import os
import re
import select
import socket
import ssl
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Final, NoReturn
from urllib.parse import unquote, urlsplit

import trio

from engine.config import SmtpSettings, redact_url
from engine.errors import (
    ConfigError,
    DeliveryUncertain,
    PermanentFailure,
    TemporaryFailure,
    TransportError,
    TransportUnavailable,
)
from engine.transport.base import OutgoingMail, RecipientRejected, SendOutcome, SendResult

log = logging.getLogger(__name__)

STARTTLS_MODES: Final = ("auto", "require", "never")
_MAX_REPLY_BYTES: Final = 64 * 1024  # a reply that has not ended by then is garbage
_RECV_BYTES: Final = 64 * 1024
_QUIT_TIMEOUT_S: Final = 1.0  # best-effort QUIT and close; never hold shutdown longer
_GOODBYE_READ_S: Final = 0.1  # what an idle connection's server said as it closed (a log line)
# Errors that mean the connection is unusable; all become TemporaryFailure(code=None).
_IO_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)
_HELO_HINT: Final = (
    "set smtp.helo_name (ENGINE_SMTP__HELO_NAME) to this machine's fully-qualified name"
)
# A refusal of MAIL or RCPT that is about this client, not the message: the same for every
# message, so a transport failure. Postfix words the HELO check's refusal this way.
_HELO_REFUSED: Final = re.compile(r"helo command rejected", re.IGNORECASE)


# -- URL and TLS ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpUrl:
    """A parsed ``smtp://[user:pass@]host[:port]`` or ``smtps://`` URL."""

    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> SmtpUrl:
        """Parse ``url``; raise ConfigError saying what is wrong and how to fix it."""
        where = f"smtp.url {redact_url(url)!r}"
        scheme, sep, rest = url.partition("://")
        if not sep:
            raise ConfigError(f"{where}: no scheme: write smtp://host:port or smtps://host:port")
        if scheme.lower() not in ("smtp", "smtps"):
            raise ConfigError(
                f"{where}: the scheme must be smtp:// (STARTTLS when offered) or smtps:// "
                f"(implicit TLS), not {scheme + '://'!r}"
            )
        # Only the last @ ends the user info, so an @ in it is unambiguous (as in Python's
        # and curl's parsers); these characters end it early and leave a garbled host.
        user, _, password = rest.rpartition("@")[0].partition(":")
        for part, text in (("user", user), ("password", password)):
            bad = sorted({c for c in text if c in _URL_DELIMITERS})
            if bad:
                codes = ", ".join(f"{c} is {_URL_DELIMITERS[c]}" for c in bad)
                raise ConfigError(
                    f"{where}: the {part} contains {' '.join(bad)}, which ends the user "
                    f"part of a URL: percent-encode it ({codes})"
                )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not parts.hostname:
            raise ConfigError(f"{where}: no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{where}: no path, query or fragment allowed")
        if port == 0:
            raise ConfigError(f"{where}: port 0 is not a valid port")
        name = unquote(parts.username) if parts.username is not None else None
        secret = unquote(parts.password) if parts.password is not None else None
        if (name is None) != (secret is None) or name == "":
            raise ConfigError(f"{where}: give both user and password, or none")
        implicit = parts.scheme.lower() == "smtps"
        default_port = 465 if implicit else 25
        return cls(parts.hostname, port or default_port, implicit, name, secret)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None and self.password is not None


# Characters that may not appear as such in a URL's user or password, and their escapes.
_URL_DELIMITERS: Final = {"/": "%2F", "?": "%3F", "#": "%23", "[": "%5B", "]": "%5D"}


def starttls_mode(settings: SmtpSettings, url: SmtpUrl) -> str:
    """The STARTTLS mode in force: with credentials, "auto" is "require" (AUTH is only
    ever sent over TLS); ConfigError for "never" with credentials on a plain port."""
    mode = settings.starttls
    if mode not in STARTTLS_MODES:
        raise ConfigError(f"smtp.starttls must be one of {STARTTLS_MODES}")
    if not url.has_credentials or url.implicit_tls:
        return mode
    if mode == "never":
        raise ConfigError(
            'smtp.url has a user and password but smtp.starttls is "never": AUTH would '
            'send them in clear; set smtp.starttls to "require" (or "auto") for a server '
            "that offers STARTTLS, or use smtps:// (implicit TLS)"
        )
    return "require"


def make_ssl_context(settings: SmtpSettings) -> ssl.SSLContext:
    """Client TLS context: default verification, plus ``tls_ca_file``, or none at all."""
    ctx = ssl.create_default_context()
    if settings.tls_ca_file:
        where = f"smtp.tls_ca_file {settings.tls_ca_file!r}"
        what = "give a PEM file of the CA that signed the server's certificate"
        try:
            ctx.load_verify_locations(cafile=settings.tls_ca_file)
        except ssl.SSLError as exc:
            problem = f"no usable certificate in it ({_ssl_text(exc)})"
            raise ConfigError(f"{where}: {problem}: {what}") from None
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise ConfigError(f"{where}: {reason}: {what}") from None
    if not settings.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def helo_name_for(settings: SmtpSettings, host: str) -> str:
    """The name to send in EHLO: ``smtp.helo_name``, else this machine's fully-qualified
    name. ConfigError when that is not fully qualified, unless the server is on loopback
    (the embedded sink, tests), where "localhost" does."""
    name = settings.helo_name.strip()
    if name:
        if not name.isascii() or any(c.isspace() or c in "<>" for c in name):
            raise ConfigError(
                f"smtp.helo_name {name!r}: give an ASCII host name (mail.example.com) or an "
                "address literal ([192.0.2.1])"
            )
        return name
    fqdn = socket.getfqdn()  # blocking, but once, at start-up
    if "." in fqdn.strip(".") and fqdn.isascii() and not fqdn.startswith("localhost."):
        return fqdn
    if _is_loopback(host):
        return "localhost"
    raise ConfigError(
        f"this machine's name {fqdn!r} is not fully qualified, and mail servers refuse such "
        f"a name in EHLO (Postfix: 504 need fully-qualified hostname): {_HELO_HINT}, "
        "e.g. mail.example.com"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- describing failures ----------------------------------------------------------------

# What to do about a certificate OpenSSL refused, by X509_V_ERR_* code.
_ISSUER_HINT: Final = "set smtp.tls_ca_file to your CA, or check the server's certificate"
_CERT_HINTS: Final = {
    2: _ISSUER_HINT,  # unable to get issuer certificate
    18: _ISSUER_HINT,  # self-signed certificate
    19: _ISSUER_HINT,  # self-signed certificate in certificate chain
    20: _ISSUER_HINT,  # unable to get local issuer certificate
    21: _ISSUER_HINT,  # unable to verify the first certificate
    9: "check this machine's clock, or the server's certificate",  # not yet valid
    10: "the server's certificate must be renewed, or this machine's clock is wrong",
    62: "use a host name in smtp.url that the certificate is for, or fix the certificate",
    64: "use a host name in smtp.url that the certificate is for, or fix the certificate",
}
# OpenSSL's complaints when what came back is not TLS at all (e.g. "220 mx ESMTP").
_NOT_TLS: Final = frozenset(
    {"WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"}
)


def _ssl_text(exc: ssl.SSLError) -> str:
    """OpenSSL's words without the ``[SSL: X]`` and ``(_ssl.c:N)`` around them."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message.rstrip('.')}"
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or type(exc).__name__


def _describe_io(exc: BaseException) -> str:
    """A short account of a socket, TLS, protocol or timeout error, for a message."""
    if isinstance(exc, TransportError | SmtpProtocolError):
        return str(exc)
    if isinstance(exc, trio.BrokenResourceError):
        cause = exc.__cause__
        return _describe_io(cause) if cause is not None else str(exc) or "connection lost"
    if isinstance(exc, trio.ClosedResourceError):
        return "the connection was closed"
    if isinstance(exc, ssl.SSLError):
        return _ssl_text(exc)
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, OSError):
        code = exc.errno
        if code is None and isinstance(exc.__cause__, BaseExceptionGroup):
            # trio's open_tcp_stream: one error per address it tried; the first says it.
            tried = [e for e in exc.__cause__.exceptions if isinstance(e, OSError)]
            code = tried[0].errno if tried else None
        if code is not None:
            return os.strerror(code).lower() if code != errno.ECONNRESET else "connection reset"
        return str(exc)
    return repr(exc)


def _tls_problem(cause: BaseException | None, *, implicit: bool) -> str:
    """Why a TLS handshake failed, and what to change when we can tell."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        hint = _CERT_HINTS.get(cause.verify_code, _ISSUER_HINT)
        return f"{_ssl_text(cause)} ({hint})"
    if isinstance(cause, ssl.SSLError) and implicit and cause.reason in _NOT_TLS:
        return (
            f"{_ssl_text(cause)}: the server speaks plain SMTP on this port: use smtp:// "
            "(STARTTLS) or the implicit-TLS port"
        )
    if cause is None:
        return "the TLS handshake failed"
    return f"TLS handshake: {_describe_io(cause)}"


@dataclass(slots=True)
class _Step:
    """Where opening a connection stands, for the message when it fails there."""

    now: str = ""  # "" while the TCP connection is being made

    def __str__(self) -> str:
        return f" (during {self.now})" if self.now else ""


def _readable_now(fd: int) -> bool:
    """Whether ``fd`` has data, EOF or an error pending; never blocks."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])


async def _start_tls(
    stream: trio.abc.Stream, ctx: ssl.SSLContext, url: SmtpUrl, what: str
) -> trio.SSLStream[trio.abc.Stream]:
    """TLS over ``stream``. A failed handshake raises TransportUnavailable saying why,
    after sending the server the alert that tells it why."""
    tls = trio.SSLStream(stream, ctx, server_hostname=url.host)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await _send_alert(tls)
        problem = _tls_problem(exc.__cause__, implicit=url.implicit_tls)
        raise TransportUnavailable(f"{what} to {url.host}:{url.port}: {problem}") from None
    return tls


async def _send_alert(tls: trio.SSLStream[trio.abc.Stream]) -> None:
    """Send what OpenSSL wrote for the server when our handshake failed: the alert
    ("unknown ca", "bad certificate"). trio raises before sending it (python-trio/trio
    PR 3413), and without it the server logs only "lost connection"."""
    outgoing = getattr(tls, "_outgoing", None)  # trio's private BIO: no alert if it moves
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    with trio.move_on_after(_QUIT_TIMEOUT_S), suppress(*_IO_ERRORS):
        await tls.transport_stream.send_all(outgoing.read())


async def _speaks_tls(url: SmtpUrl, timeout_s: float) -> bool:
    """Whether ``url``'s port completes a TLS handshake (certificate not checked): tells
    an implicit-TLS port, silent until the client's hello, from a server slow to greet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(url.host, url.port)
        except OSError:
            return False
        try:
            await trio.SSLStream(stream, ctx, server_hostname=url.host).do_handshake()
        except trio.BrokenResourceError:
            return False
        finally:
            await trio.aclose_forcefully(stream)
        return True
    return False


# -- replies ----------------------------------------------------------------------------


class SmtpProtocolError(Exception):
    """The server sent something that is not an SMTP reply (internal; never escapes)."""


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300


class ReplyParser:
    """Splits received bytes into replies; several pipelined replies may share one recv."""

    __slots__ = ("_buf", "_code", "_lines")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished or unread reply are buffered."""
        return bool(self._buf) or bool(self._lines)

    @property
    def buffered(self) -> str:
        """The bytes not yet parsed into a reply, as text."""
        return self._buf.decode("utf-8", "replace")

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None until more bytes are fed."""
        while True:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > _MAX_REPLY_BYTES:
                    raise SmtpProtocolError("reply line too long")
                return None
            line = bytes(self._buf[:end]).rstrip(b"\r")
            del self._buf[: end + 1]
            sep = line[3:4]
            if len(line) < 3 or not line[:3].isdigit() or sep not in (b"", b" ", b"-"):
                raise SmtpProtocolError(f"malformed reply line {line[:80]!r}")
            code = int(line[:3])
            if self._lines and code != self._code:
                raise SmtpProtocolError(f"reply code changed mid-reply: {self._code} -> {code}")
            self._code = code
            self._lines.append(line[4:].decode("utf-8", "replace"))
            if sep != b"-":
                reply = Reply(code, tuple(self._lines))
                self._lines = []
                return reply
            if len(self._lines) > 1000:
                raise SmtpProtocolError("reply has too many lines")


def _failure(what: str, reply: Reply) -> TransportError:
    """The engine error for a refusing reply: 5xx is permanent, anything else temporary;
    TransportUnavailable when the refusal is about this client, not the message."""
    message = f"{what}: {reply.code} {reply.text}"
    about_us = _about_us(reply.code, reply.text)
    if about_us is not None:
        return TransportUnavailable(f"{message} ({about_us})", code=reply.code)
    if 500 <= reply.code < 600:
        return PermanentFailure(message, code=reply.code)
    return TemporaryFailure(message, code=reply.code)


def _about_us(code: int, text: str) -> str | None:
    """What to change when a refusal of MAIL, RCPT or DATA concerns this client rather
    than the message (so every message would get it), else None. Postfix checks the HELO
    name at RCPT (smtpd_delay_reject); 530 asks for AUTH or TLS first."""
    if _HELO_REFUSED.search(text):
        return _HELO_HINT
    if code == 530:
        return "the server wants AUTH or TLS first: credentials in smtp.url, smtp.starttls"
    return None


class ConnectionDropped(TemporaryFailure):
    """The connection failed under us (reset, EOF, TLS error, garbage, timeout, 421)."""

    def __init__(self, message: str, *, before_reply: bool) -> None:
        super().__init__(message)
        # True when the message's content was not sent (no 354 acted on): the server
        # cannot have accepted it, so it may safely go over another connection.
        self.before_reply = before_reply


class DroppedAfterData(ConnectionDropped, DeliveryUncertain):
    """The whole content, end-of-data dot included, was written; then the connection
    failed, or the final reply did not come in time: the server may have taken it."""

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message} (delivery uncertain: the whole message was sent)", before_reply=False
        )


class _StaleConnection(Exception):
    """A reused idle connection had been closed by the server (EOF, or its 421 read as
    the first answer): nothing was accepted (pool-internal; never escapes)."""


@dataclass(slots=True)
class _Batch:
    """Where a pipelined ``send_many`` stands.

    At most one mail's content and the next mail's envelope are on the wire; their
    replies come in that order (the final reply, then MAIL, RCPT..., DATA).
    """

    mails: Sequence[OutgoingMail]
    next: int = 0  # index of the first mail not yet looked at
    body: tuple[OutgoingMail, list[RecipientRejected]] | None = None  # content written
    body_sent: bool = False  # ``body``'s write returned: its end-of-data dot went out
    envelope: OutgoingMail | None = None  # MAIL/RCPT/DATA written, replies not read
    # Refused before reaching the wire; yielded after ``body``'s outcome, in order.
    skipped: list[SendOutcome] = field(default_factory=list)

    @property
    def on_wire(self) -> bool:
        return self.body is not None or self.envelope is not None

    @property
    def done(self) -> bool:
        return self.next >= len(self.mails) and not self.on_wire and not self.skipped


# -- one connection ---------------------------------------------------------------------


class SmtpConnection:
    """One SMTP session. Not safe for concurrent use: the pool hands it to one task at a time.

    Use ``await SmtpConnection.open(...)``; after any I/O error, or a 421 (the server
    hangs up), ``broken`` is True and the connection must be closed, never reused.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        url: SmtpUrl,
        settings: SmtpSettings,
        *,
        helo_name: str = "localhost",
    ) -> None:
        self._stream = stream
        self._url = url
        self._where = f"{url.host}:{url.port}"
        self._settings = settings
        self._helo_name = helo_name
        self._parser = ReplyParser()
        self._closed = False
        self._replies = 0  # replies read on this connection
        # ``_replies`` when a batch on a reused connection began: a 421 or EOF before any
        # reply then means the server had closed it while idle (_StaleConnection).
        self._stale_mark: int | None = None
        self._data_accepted = False  # the current transaction's DATA got its 354
        self._data_sent = False  # ... and its content and end-of-data dot were written
        self._broken_why = "the connection is not usable"
        # Set once a refusal showed that no message can go over this connection.
        self._unavailable: TransportUnavailable | None = None
        self._scope: trio.CancelScope | None = None
        self.extensions: dict[str, str] = {}
        self.tls = url.implicit_tls
        self.broken = False
        self.messages = 0  # transactions finished (accepted or refused) on this connection
        self.pipelined_sends = 0  # transactions whose MAIL/RCPT/DATA went in one write
        self.writes = 0  # send_all calls
        self.reads = 0  # receive_some calls
        self.idle_since = 0.0
        self.watch: trio.CancelScope | None = None  # the pool's idle watcher, while idle

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @classmethod
    async def open(
        cls,
        url: SmtpUrl,
        settings: SmtpSettings,
        ssl_context: ssl.SSLContext | None,
        *,
        helo_name: str | None = None,
    ) -> SmtpConnection:
        """Connect, greet, upgrade to TLS and authenticate, all within ``connect_timeout_s``.

        Any failure is the transport's, not a message's: TransportUnavailable, saying
        where it failed and, when that can be told, what to change.
        """
        starttls_mode(settings, url)  # ConfigError before anything goes on the wire
        tls_ctx = ssl_context or make_ssl_context(settings)
        name = helo_name or helo_name_for(settings, url.host)
        where = f"{url.host}:{url.port}"
        step = _Step()
        try:
            with trio.fail_after(settings.connect_timeout_s):
                return await cls._open(url, settings, tls_ctx, name, step)
        except trio.TooSlowError:
            raise TransportUnavailable(
                f"connect to {where}: no answer within {settings.connect_timeout_s:g}s{step}"
            ) from None
        except (ConnectionDropped, SmtpProtocolError, *_IO_ERRORS) as exc:
            cause = exc.__cause__ if isinstance(exc, ConnectionDropped) else None
            raise TransportUnavailable(
                f"connect to {where}: {_describe_io(cause or exc)}{step}"
            ) from None

    @classmethod
    async def _open(
        cls,
        url: SmtpUrl,
        settings: SmtpSettings,
        tls_ctx: ssl.SSLContext,
        helo_name: str,
        step: _Step,
    ) -> SmtpConnection:
        stream: trio.abc.Stream = await trio.open_tcp_stream(url.host, url.port)
        conn: SmtpConnection | None = None
        try:
            if url.implicit_tls:
                step.now = "the TLS handshake"
                stream = await _start_tls(stream, tls_ctx, url, "TLS")
            conn = cls(stream, url, settings, helo_name=helo_name)
            await conn._handshake(tls_ctx, step)
        except BaseException:
            if conn is None:
                await trio.aclose_forcefully(stream)
            else:
                conn.broken = True  # half-open session: close without QUIT
                await conn.aclose()
            raise
        return conn

    async def _handshake(self, tls_ctx: ssl.SSLContext, step: _Step) -> None:
        where = self._where
        step.now = "the greeting"
        greeting = await self._greeting()
        if greeting.code != 220:
            raise TransportUnavailable(
                f"greeting from {where}: {greeting.code} {greeting.text}", code=greeting.code
            )
        step.now = "EHLO"
        await self._ehlo()
        mode = starttls_mode(self._settings, self._url)
        if not self.tls and mode != "never":
            if "STARTTLS" in self.extensions:
                step.now = "STARTTLS"
                reply = await self._command(b"STARTTLS\r\n")
                if reply.code != 220:
                    raise TransportUnavailable(
                        f"STARTTLS to {where}: {reply.code} {reply.text}", code=reply.code
                    )
                if self._parser.pending:
                    # Plaintext injected after STARTTLS must not be read as if it were secure.
                    raise TransportUnavailable(
                        f"STARTTLS to {where}: the server sent data before the TLS handshake"
                    )
                self._stream = await _start_tls(self._stream, tls_ctx, self._url, "STARTTLS")
                self.tls = True
                step.now = "EHLO after STARTTLS"
                await self._ehlo()
            elif self._url.has_credentials:
                # Offered before, or expected: its absence may be an attacker stripping it.
                raise TransportUnavailable(
                    f"{where} does not offer STARTTLS, and smtp.url has a user and "
                    "password: they are only ever sent over TLS (a server that offered "
                    "STARTTLS before may be under a downgrade attack; else use smtps://)"
                )
            elif mode == "require":
                raise TransportUnavailable(
                    f'{where} does not offer STARTTLS, and smtp.starttls is "require"'
                )
        if self._url.username is not None and self._url.password is not None:
            step.now = "AUTH"
            await self._auth(self._url.username, self._url.password)

    async def _greeting(self) -> Reply:
        """The server's first reply. An implicit-TLS port sends none (it waits for our TLS
        hello): after ``greeting_probe_s`` of silence a second connection asks the port
        whether it speaks TLS, and if it does we stop waiting and say so."""
        probe_s = self._settings.greeting_probe_s
        if self.tls or probe_s <= 0:
            return await self._read_reply()
        with trio.move_on_after(probe_s):
            return await self._read_reply()
        if not self._parser.pending and await _speaks_tls(self._url, probe_s):
            raise TransportUnavailable(
                f"connect to {self._where}: no SMTP greeting within {probe_s:g}s, and the "
                "port answers TLS: it is an implicit-TLS port (like 465): use smtps://"
            )
        return await self._read_reply()  # a plain server slow to greet (greet_pause)

    async def _ehlo(self) -> None:
        name = self._helo_name.encode("ascii")
        reply = await self._command(b"EHLO " + name + b"\r\n")
        self.extensions = {}
        if reply.ok:
            for line in reply.lines[1:]:
                keyword, _, params = line.partition(" ")
                keyword = keyword.upper()
                if keyword.startswith("AUTH="):  # old-style advertisement: AUTH=LOGIN
                    keyword, params = "AUTH", f"{keyword[5:]} {params}"
                if keyword == "AUTH" and "AUTH" in self.extensions:
                    params = f"{self.extensions['AUTH']} {params}"
                self.extensions[keyword] = params.strip()
            return
        command = "EHLO"
        if reply.code != 421:  # 421: the server is hanging up; HELO would get nowhere
            command = "EHLO and HELO"
            reply = await self._command(b"HELO " + name + b"\r\n")
            if reply.ok:
                return
        hint = f" ({_HELO_HINT})" if 500 <= reply.code < 600 else ""
        raise TransportUnavailable(
            f"{command} {self._helo_name} to {self._where}: {reply.code} {reply.text}{hint}",
            code=reply.code,
        )

    async def _auth(self, username: str, password: str) -> None:
        if not self.tls:  # starttls_mode and _handshake see to it; never in clear regardless
            raise TransportUnavailable(f"AUTH to {self._where}: refused to send it without TLS")
        offered = self.extensions.get("AUTH")
        if offered is None:
            later = "" if self.tls else " (servers often offer it only after STARTTLS)"
            raise TransportUnavailable(
                f"{self._where} offers no AUTH, but smtp.url has a user and password{later}"
            )
        mechanisms = offered.upper().split()
        user, secret = username.encode("utf-8"), password.encode("utf-8")
        if "PLAIN" in mechanisms:
            mechanism = "PLAIN"
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = await self._command(b"AUTH PLAIN " + token + b"\r\n")
        elif "LOGIN" in mechanisms:
            mechanism = "LOGIN"
            reply = await self._command(b"AUTH LOGIN\r\n")
            for item in (user, secret):
                if reply.code != 334:
                    break
                reply = await self._command(base64.b64encode(item) + b"\r\n")
        else:
            raise TransportUnavailable(
                f"{self._where} offers AUTH {offered}, none of which we speak (PLAIN, LOGIN)"
            )
        if reply.code != 235:
            # Bad credentials are a configuration problem: no message is at fault.
            hint = " (check the user and password in smtp.url)" if reply.code == 535 else ""
            raise TransportUnavailable(
                f"AUTH {mechanism} as {username!r} to {self._where}: {reply.code} {reply.text}"
                f"{hint}",
                code=reply.code,
            )

    # -- the pool's view ----------------------------------------------------------------

    def fileno(self) -> int | None:
        """The TCP socket's descriptor (under TLS too: TLS runs over it), or None."""
        stream = self._stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            fd = stream.socket.fileno()
            return fd if fd >= 0 else None
        return None

    def has_unread(self) -> bool:
        """Whether the server sent something we did not ask for. A session at rest gets
        nothing unless the server is closing it (421, EOF, TLS close_notify)."""
        if self._parser.pending:
            return True
        fd = self.fileno()
        return fd is not None and _readable_now(fd)

    async def last_words(self) -> str:
        """What the server sent an idle connection before hanging up (for a log line)."""
        said = self._parser.buffered
        with trio.move_on_after(_GOODBYE_READ_S), suppress(*_IO_ERRORS):
            said += (await self._stream.receive_some(_RECV_BYTES)).decode("utf-8", "replace")
        return said.strip() or "EOF"

    # -- I/O --------------------------------------------------------------------------

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Map socket, TLS, timeout and protocol errors to ConnectionDropped; mark broken."""
        try:
            yield
        except trio.TooSlowError:
            self.broken = True
            raise self._drop(
                f"{what}: no reply within {self._settings.command_timeout_s}s"
            ) from None
        except (*_IO_ERRORS, SmtpProtocolError) as exc:
            self.broken = True
            raise self._drop(f"{what}: {self._lost(exc)}") from exc

    def _drop(self, message: str) -> ConnectionDropped:
        """The error for a connection lost (or silent) mid-transaction: uncertain once the
        whole content went out; before the 354 (``before_reply``) the server cannot have
        taken it, nor in between, with the content only partly written."""
        if self._data_sent:
            return DroppedAfterData(message)
        return ConnectionDropped(message, before_reply=not self._data_accepted)

    def _lost(self, exc: BaseException) -> str:
        self._broken_why = f"connection to {self._where} lost: {_describe_io(exc)}"
        return self._broken_why

    def _counted(self, reply: Reply) -> Reply:
        """Count ``reply``. A 421 means the server is closing the connection: it is
        broken, and if it was the first answer on a reused connection, stale."""
        if reply.code == 421:
            self.broken = True
            self._broken_why = f"{self._where} is closing the connection: 421 {reply.text}"
            if self._stale_mark == self._replies:
                # Its idle timeout's 421, read as the answer to our MAIL FROM: the
                # server saw nothing of ours, so it accepted nothing.
                raise _StaleConnection(f"421 {reply.text}")
        self._replies += 1
        return reply

    # Inside ``_send_one`` one cancel scope covers the whole transaction (inside a
    # pipelined ``send_many`` one covers the I/O between two outcomes) and its deadline
    # is pushed forward before each I/O step: a scope and an error-mapping context per
    # step cost ~15 % of the sender's CPU (profiled). Outside them (greeting, EHLO,
    # AUTH) each step gets its own.

    async def _write(self, data: bytes) -> None:
        self.writes += 1
        scope = self._scope
        if scope is None:
            with self._io("write"), trio.fail_after(self._settings.command_timeout_s):
                await self._stream.send_all(data)
            return
        scope.deadline = trio.current_time() + self._settings.command_timeout_s
        await self._stream.send_all(data)

    async def _read_reply(self) -> Reply:
        reply = self._parser.next_reply()
        if reply is not None:
            return self._counted(reply)
        scope = self._scope
        if scope is None:
            with self._io("read reply"), trio.fail_after(self._settings.command_timeout_s):
                return await self._receive_reply()
        scope.deadline = trio.current_time() + self._settings.command_timeout_s
        return await self._receive_reply()

    async def _receive_reply(self) -> Reply:
        while True:
            self.reads += 1
            data = await self._stream.receive_some(_RECV_BYTES)
            if not data:
                raise trio.BrokenResourceError("server closed the connection")
            self._parser.feed(data)
            reply = self._parser.next_reply()
            if reply is not None:
                return self._counted(reply)

    async def _command(self, line: bytes) -> Reply:
        await self._write(line)
        return await self._read_reply()

    # -- sending ----------------------------------------------------------------------

    async def _send_one(self, mail: OutgoingMail) -> SendResult:
        """One mail transaction. Raises TemporaryFailure / PermanentFailure on refusal;
        TransportUnavailable when the refusal is about this client (and then for every
        later mail, untried).

        Refusals leave the connection usable; I/O errors, a 421 and cancellation mark it
        broken.
        """
        if self._unavailable is not None:
            raise TransportUnavailable(
                f"not tried: {self._unavailable}", code=self._unavailable.code
            )
        if self.broken or self._closed:
            raise ConnectionDropped(f"not sent: {self._broken_why}", before_reply=True)
        self._data_accepted = self._data_sent = False
        outcome: SendResult | TransportError | None = None
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                with self._io("send"):
                    outcome = await self._transaction(mail)
        except BaseException:
            self.broken = True  # state unknown mid-transaction (includes Cancelled)
            raise
        finally:
            self._scope = None
        if outcome is None:  # our deadline expired
            self.broken = True
            raise self._drop(f"send: no reply within {self._settings.command_timeout_s}s")
        self.messages += 1
        if isinstance(outcome, TransportUnavailable):
            self._unusable(outcome)
        if isinstance(outcome, TransportError):
            raise outcome
        return outcome

    def _unusable(self, why: TransportUnavailable) -> None:
        """No message can go over this connection (a refusal about this client)."""
        self._unavailable = why
        self.broken = True

    def _mail_params(self, mail: OutgoingMail, size: int) -> str | TransportError:
        params = ""
        if "SIZE" in self.extensions:
            limit = self.extensions["SIZE"]
            if limit.isdigit() and 0 < int(limit) < size:
                return PermanentFailure(f"message is {size} bytes; the server takes {limit}")
            params += f" SIZE={size}"
        if not mail.data.isascii() and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if mail.needs_smtputf8 or not (
            mail.sender.isascii() and all(r.isascii() for r in mail.recipients)
        ):
            if "SMTPUTF8" not in self.extensions:
                return PermanentFailure("non-ASCII address but the server lacks SMTPUTF8")
            params += " SMTPUTF8"
        return params

    def _envelope(self, mail: OutgoingMail) -> list[bytes] | TransportError:
        """The MAIL, RCPT... and DATA lines for ``mail``, or why it cannot go to this server."""
        if not mail.recipients:
            return PermanentFailure("message has no recipients")
        # The form this server can take: 8bit and UTF-8 as they are, or 7-bit stand-ins.
        form = mail.for_server(self.extensions)
        if isinstance(form, TransportError):
            return form
        params = self._mail_params(form, len(form.data))
        if isinstance(params, TransportError):
            return params
        return [
            f"MAIL FROM:<{form.sender}>{params}\r\n".encode(),
            *[f"RCPT TO:<{r}>\r\n".encode() for r in form.recipients],
            b"DATA\r\n",
        ]

    async def _transaction(self, mail: OutgoingMail) -> SendResult | TransportError:
        """Run MAIL/RCPT/DATA; return the result or the refusal (raise only on I/O errors)."""
        envelope = self._envelope(mail)
        if isinstance(envelope, TransportError):
            return envelope
        if self.pipelining:
            # RFC 2920: MAIL, every RCPT and DATA go in one write; replies come in order.
            self.pipelined_sends += 1
            await self._write(b"".join(envelope))
            accepted = await self._read_envelope(mail)
        else:
            accepted = await self._sequential_envelope(mail, envelope)
        if isinstance(accepted, TransportError):
            return accepted
        await self._write(_dot_stuff(mail.data_for(self.extensions)))
        self._data_sent = True  # from here a lost connection leaves delivery uncertain
        final = await self._read_reply()
        return _final_outcome(mail, final, accepted)

    async def _read_envelope(self, mail: OutgoingMail) -> list[RecipientRejected] | TransportError:
        """Read the replies to a pipelined envelope.

        The refused recipients when the server now waits for the content; else the refusal,
        after RSET.
        """
        replies: list[Reply] = []
        for _ in range(len(mail.recipients) + 2):
            replies.append(await self._read_reply())
            if replies[-1].code == 421:
                # The server hangs up: no more replies, no RSET; the rest of the batch
                # goes over a new connection.
                what = "MAIL FROM" if len(replies) == 1 else "RCPT TO"
                if len(replies) == len(mail.recipients) + 2:
                    what = "DATA"
                return _failure(what, replies[-1])
        mail_reply, *rcpt_replies, data_reply = replies
        rejected = _rejected(mail, rcpt_replies)
        if not mail_reply.ok:
            refusal = _failure("MAIL FROM", mail_reply)
        elif len(rejected) == len(mail.recipients):
            refusal = _all_rejected(rejected)
        elif data_reply.code != 354:
            refusal = _failure("DATA", data_reply)
        else:
            self._data_accepted = True
            return rejected
        if data_reply.code == 354:
            # Pipelined DATA was accepted although nothing may be sent: end it empty.
            await self._command(b".\r\n")
        return await self._abort(refusal)

    async def _sequential_envelope(
        self, mail: OutgoingMail, envelope: list[bytes]
    ) -> list[RecipientRejected] | TransportError:
        """``_read_envelope`` for a server without PIPELINING: one command at a time."""
        mail_reply = await self._command(envelope[0])
        if not mail_reply.ok:
            return await self._abort(_failure("MAIL FROM", mail_reply))
        rcpt_replies: list[Reply] = []
        for command in envelope[1:-1]:
            rcpt_replies.append(await self._command(command))
            if rcpt_replies[-1].code == 421:  # the server hangs up
                return _failure("RCPT TO", rcpt_replies[-1])
        rejected = _rejected(mail, rcpt_replies)
        if len(rejected) == len(mail.recipients):
            return await self._abort(_all_rejected(rejected))
        data_reply = await self._command(envelope[-1])
        if data_reply.code != 354:
            return await self._abort(_failure("DATA", data_reply))
        self._data_accepted = True
        return rejected

    async def _abort(self, refusal: TransportError) -> TransportError:
        """RSET after a refused transaction so the connection can carry the next one
        (not after a 421: the server is hanging up)."""
        if self.broken:
            return refusal
        reply = await self._command(b"RSET\r\n")
        if not reply.ok:
            self.broken = True
        return refusal

    # -- batches ------------------------------------------------------------------------

    def send_many(self, mails: Sequence[OutgoingMail]) -> AsyncGenerator[SendOutcome, None]:
        """``Transport.send_many`` over this connection (read the contract there).

        With PIPELINING, pipelines across messages (RFC 2920): each mail's content goes
        in one write with the next mail's MAIL/RCPT/DATA, and the final reply, which
        is yielded at once, usually arrives in one read with the replies to that
        envelope. Without PIPELINING, one transaction after the other. After a
        connection-level failure ``broken`` is True, as it is when the consumer stopped
        early while an envelope was on the wire.
        """
        return self._send_many(mails, stale=False)

    async def _send_many(
        self, mails: Sequence[OutgoingMail], *, stale: bool
    ) -> AsyncGenerator[SendOutcome, None]:
        """``send_many``; with ``stale`` (a reused connection), a 421 or EOF before any
        reply raises _StaleConnection instead: the server had closed the connection while
        it idled and accepted nothing, so the pool sends over a new one.
        """
        self._stale_mark = self._replies if stale else None
        if not self.pipelining:
            for mail in mails:
                outcome: SendResult | TransportError
                try:
                    outcome = await self._send_one(mail)
                except ConnectionDropped as exc:
                    if exc.before_reply and self._stale_mark == self._replies:
                        raise _StaleConnection(str(exc)) from exc
                    outcome = exc
                except TransportError as exc:
                    outcome = exc
                yield mail, outcome
            return
        batch = _Batch(mails)
        try:
            while not batch.done:
                # No cancel scope may be open across a yield (it would cover the consumer).
                for item in await self._batch_step(batch):
                    yield item
        finally:
            if batch.on_wire:
                # Stopped early: the server may already wait for the next mail's content,
                # and only closing the connection aborts that without delivering it.
                self.broken = True

    async def _batch_step(self, batch: _Batch) -> list[SendOutcome]:
        """Advance ``batch`` to its next outcomes, in one cancel scope; map I/O errors."""
        if self._unavailable is not None:
            reason = f"not tried: {self._unavailable}"
            return _dropped(batch, reason, unavailable=self._unavailable)
        if self.broken or self._closed:
            return _dropped(batch, self._broken_why)
        outcomes: list[SendOutcome] | None = None
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                outcomes = await self._batch_advance(batch)
        except (*_IO_ERRORS, SmtpProtocolError) as exc:
            self.broken = True
            if self._stale_mark == self._replies:
                raise _StaleConnection(_describe_io(exc)) from exc
            return _dropped(batch, self._lost(exc))
        except BaseException:
            self.broken = True  # state unknown mid-transaction (includes Cancelled)
            raise
        finally:
            self._scope = None
        if outcomes is None:  # our deadline expired
            self.broken = True
            return _dropped(batch, f"no reply within {self._settings.command_timeout_s}s")
        for _, outcome in outcomes:
            if isinstance(outcome, TransportUnavailable):
                self._unusable(outcome)
        return outcomes

    async def _batch_advance(self, batch: _Batch) -> list[SendOutcome]:
        """Run the I/O up to the next outcomes: one write and one read in steady state.

        Raises on I/O errors, leaving in ``batch`` what is on the wire.
        """
        if batch.body is None:
            if batch.envelope is None:
                # Nothing on the wire (start of batch, or after a refused envelope).
                envelope = self._take_next(batch)
                if envelope:
                    await self._write(envelope)
                if batch.skipped or batch.envelope is None:
                    outcomes, batch.skipped = batch.skipped, []
                    return outcomes
            mail = batch.envelope
            assert mail is not None
            accepted = await self._read_envelope(mail)  # RSET after a refusal
            if isinstance(accepted, TransportError):
                batch.envelope = None
                self.messages += 1
                return [(mail, accepted)]
            batch.body, batch.envelope = (mail, accepted), None
            # RFC 2920 3.1: the content may open a group, and DATA end it.
            await self._write(_dot_stuff(mail.data_for(self.extensions), self._take_next(batch)))
            batch.body_sent = True  # from here a lost connection leaves delivery uncertain
        mail, rejected = batch.body
        final = await self._read_reply()
        batch.body, batch.body_sent = None, False
        self.messages += 1
        outcomes = [(mail, _final_outcome(mail, final, rejected))]
        if batch.skipped:
            outcomes += batch.skipped
            batch.skipped = []
        return outcomes

    def _take_next(self, batch: _Batch) -> bytes:
        """The envelope of the next mail that may go to this server, marked on the wire.

        Mails refused before the wire (SIZE, SMTPUTF8) go to ``batch.skipped`` on the way.
        """
        while batch.next < len(batch.mails):
            mail = batch.mails[batch.next]
            batch.next += 1
            envelope = self._envelope(mail)
            if isinstance(envelope, TransportError):
                self.messages += 1
                batch.skipped.append((mail, envelope))
                continue
            batch.envelope = mail
            self.pipelined_sends += 1
            return b"".join(envelope)
        return b""

    async def aclose(self) -> None:
        """Send QUIT (best effort, shielded, short timeout), then close the stream."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            if not self.broken:
                with trio.move_on_after(_QUIT_TIMEOUT_S), suppress(*_IO_ERRORS):
                    await self._stream.send_all(b"QUIT\r\n")
                    await self._stream.receive_some(_RECV_BYTES)
            with trio.move_on_after(_QUIT_TIMEOUT_S), suppress(*_IO_ERRORS):
                await self._stream.aclose()


def _dropped(
    batch: _Batch, reason: str, *, unavailable: TransportUnavailable | None = None
) -> list[SendOutcome]:
    """The connection failed (or is no use: ``unavailable``): the outcome of every mail
    of ``batch`` not yet yielded."""
    outcomes: list[SendOutcome] = []
    if batch.body is not None:
        # Its whole content went out: the server may have taken it (uncertain). Its write
        # failed part-way: a failure of this message, retried like any connection loss.
        why = f"send: {reason}"
        failure = (
            DroppedAfterData(why) if batch.body_sent else ConnectionDropped(why, before_reply=False)
        )
        outcomes.append((batch.body[0], failure))
    outcomes += batch.skipped
    unsent = [] if batch.envelope is None else [batch.envelope]
    unsent += batch.mails[batch.next :]
    # No content went out for these: the server cannot have taken them.
    if unavailable is not None:
        outcomes += [(m, TransportUnavailable(reason, code=unavailable.code)) for m in unsent]
    else:
        outcomes += [
            (m, ConnectionDropped(f"not sent: {reason}", before_reply=True)) for m in unsent
        ]
    batch.body = batch.envelope = None
    batch.body_sent = False
    batch.skipped = []
    batch.next = len(batch.mails)
    return outcomes


def _rejected(mail: OutgoingMail, rcpt_replies: list[Reply]) -> list[RecipientRejected]:
    return [
        RecipientRejected(addr, reply.code, reply.text)
        for addr, reply in zip(mail.recipients, rcpt_replies, strict=True)
        if not reply.ok
    ]


def _final_outcome(
    mail: OutgoingMail, final: Reply, rejected: list[RecipientRejected]
) -> SendResult | TransportError:
    """The outcome once the server answered the content."""
    if not final.ok:
        return _failure("end of DATA", final)
    for r in rejected:
        log.info("smtp.rcpt.rejected job=%s rcpt=%s code=%d", mail.job_id, r.address, r.code)
    return SendResult(final.code, final.text, rejected)


def _all_rejected(rejected: list[RecipientRejected]) -> TransportError:
    """Every recipient refused: temporary if any refusal was, since a retry may then work;
    TransportUnavailable when the refusal is about this client (Postfix's HELO check)."""
    temporary = [r for r in rejected if not 500 <= r.code < 600]
    first = (temporary or rejected)[0]
    message = (
        f"all {len(rejected)} recipients refused, first {first.address}: {first.code} {first.text}"
    )
    about_us = _about_us(first.code, first.text)
    if about_us is not None:
        return TransportUnavailable(f"{message} ({about_us})", code=first.code)
    if temporary:
        return TemporaryFailure(message, code=first.code)
    return PermanentFailure(
        message, code=first.code, refused=tuple((r.address, r.code, r.text) for r in rejected)
    )


def _dot_stuff(data: bytes, then: bytes = b"") -> bytes:
    """RFC 5321 4.5.2 transparency, CRLF-terminated, the ``.`` end-of-data line, ``then``."""
    stuffed = data.replace(b"\r\n.", b"\r\n..") if _may_have_dot_lines(data) else data
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return b"".join((stuffed, b".\r\n", then))


def _may_have_dot_lines(data: bytes) -> bool:
    """False when no line of ``data`` starts with "." after its first: found by looking at
    its dots (memchr) while they are few. bytes.find of a 3-byte needle such as "\r\n."
    crawls (~0.8 ns a byte here: 110 us for a 100 KiB attachment's base64, which has no
    dot at all); past 32 dots, the full search decides."""
    at = data.find(b".", 1)
    for _ in range(32):
        if at < 0:
            return False
        if data[at - 1] == 0x0A:  # after a LF: the full search looks for CRLF "."
            return True
        at = data.find(b".", at + 1)
    return at >= 0


# -- the pool ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpPoolStatistics:
    open: int  # connections open now (idle + in use)
    idle: int  # open connections waiting in the pool
    in_use: int  # open connections carrying a transaction
    connects: int  # connections opened since the pool was made
    sends: int  # messages accepted by the server since the pool was made
    # Reused connections the server had closed meanwhile (a 421 or EOF at the first
    # command, or pending at checkout): replaced, their mails sent over a new one.
    stale: int = 0
    # Mails sent again over a new connection after theirs was lost before they reached
    # the server (stale, or lost mid-batch); they got no outcome from the lost one.
    resent: int = 0
    # Idle connections closed while in the pool: idle_timeout_s reached (QUIT), or the
    # server closed them (seen at once while ``serve`` runs).
    idle_closed: int = 0


class SmtpPool:
    """The Transport over SMTP: up to ``pool_size`` connections, reused LIFO, shared by tasks.

    ``serve`` watches the idle connections; without it the pool works the same, and
    notices idle connections that expired or that the server closed at checkout.
    """

    def __init__(self, settings: SmtpSettings, url: str) -> None:
        if settings.starttls not in STARTTLS_MODES:
            raise ConfigError(f"smtp.starttls must be one of {STARTTLS_MODES}")
        if settings.pool_size < 1:
            raise ConfigError("smtp.pool_size must be at least 1")
        timeouts = (settings.connect_timeout_s, settings.command_timeout_s, settings.idle_timeout_s)
        if min(timeouts) <= 0:
            raise ConfigError("smtp.*_timeout_s must be > 0")
        if settings.greeting_probe_s < 0:
            raise ConfigError("smtp.greeting_probe_s must be >= 0 (0 = never probe)")
        self._settings = settings
        self._url = SmtpUrl.parse(url)
        starttls_mode(settings, self._url)  # credentials in clear: refused at start-up
        self._ssl_context = make_ssl_context(settings)  # built once: contexts are costly
        self._helo_name = helo_name_for(settings, self._url.host)
        self._slots = trio.Semaphore(settings.pool_size)
        self._idle: list[SmtpConnection] = []  # LIFO: the hottest connection on top
        self._nursery: trio.Nursery | None = None  # the idle watchers', while serve runs
        self._open = 0
        self._connects = 0
        self._sends = 0
        self._stale = 0
        self._resent = 0
        self._idle_closed = 0
        self._closed = False

    def statistics(self) -> SmtpPoolStatistics:
        idle = len(self._idle)
        return SmtpPoolStatistics(
            self._open,
            idle,
            self._open - idle,
            self._connects,
            self._sends,
            self._stale,
            self._resent,
            self._idle_closed,
        )

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Watch each idle connection until cancelled: close it as soon as the server
        does (a 421, EOF or TLS close_notify makes its socket readable), else QUIT it
        at ``idle_timeout_s``. No socket lingers half-closed (CLOSE-WAIT)."""
        if self._nursery is not None:
            raise RuntimeError("SmtpPool.serve is already running")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                for conn in self._idle:
                    self._watch_soon(conn)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None
                for conn in self._idle:
                    conn.watch = None  # its watcher ends with the nursery
        raise AssertionError("unreachable")

    async def send_many(self, mails: Sequence[OutgoingMail]) -> AsyncGenerator[SendOutcome, None]:
        """``Transport.send_many`` over one connection of the pool (contract there).

        The connection is held, with a pool slot, until the generator finishes or is
        closed. Mails that never reached the server go over a new connection when
        theirs fails under them: always when a reused connection turns out to have been
        closed by the server (stale), and once per call when a connection is lost
        mid-batch (the mail in flight then fails: the server may have taken it). When
        no connection can be had, or the new one is lost too, every mail not yet
        yielded gets TransportUnavailable: the transport is down, no message is at fault.
        """
        if not mails:
            return
        async with self._slots:
            done = 0  # mails yielded so far
            reuse = True
            resends = 1  # new connections allowed after one was lost mid-batch
            while True:
                try:
                    conn, reused = await self._acquire(reuse=reuse)
                except TransportError as exc:  # connect failed, or pool closed
                    failure: TransportError = exc
                    break
                lost: ConnectionDropped | None = None
                try:
                    outcomes = conn._send_many(mails[done:] if done else mails, stale=reused)
                    async with aclosing(outcomes):
                        async for mail, outcome in outcomes:
                            if isinstance(outcome, ConnectionDropped) and outcome.before_reply:
                                lost = outcome  # it and the rest never reached the server
                                break
                            done += 1
                            if isinstance(outcome, SendResult):
                                self._sends += 1
                            elif isinstance(outcome, ConnectionDropped):
                                log.warning(
                                    "smtp.send_many.failed job=%s unsent=%d error=%s",
                                    mail.job_id,
                                    len(mails) - done,
                                    outcome,
                                )
                            yield mail, outcome
                except _StaleConnection as stale:
                    self._stale += 1
                    self._resent += len(mails) - done
                    log.info(
                        "smtp.send_many.stale_retry job=%s unsent=%d error=%s",
                        mails[done].job_id,
                        len(mails) - done,
                        stale,
                    )
                    reuse = False
                    continue
                finally:
                    await self._checkin(conn)
                if lost is None:
                    return
                if not resends:
                    failure = TransportUnavailable(f"{lost} (a new connection was lost too)")
                    break
                resends -= 1
                reuse = False
                self._resent += len(mails) - done
                log.warning(
                    "smtp.send_many.resend job=%s unsent=%d error=%s",
                    mails[done].job_id,
                    len(mails) - done,
                    lost,
                )
            for mail in mails[done:]:
                yield mail, failure

    async def _acquire(self, *, reuse: bool) -> tuple[SmtpConnection, bool]:
        """A live connection, and whether it was reused; raise TransportUnavailable if none."""
        if self._closed:
            raise TransportUnavailable("the SMTP pool is closed (shutting down)")
        conn, done = self._checkout() if reuse else (None, [])
        for old in done:
            await self._discard(old)
        if conn is not None:
            return conn, True
        return await self._connect(), False

    def _checkout(self) -> tuple[SmtpConnection | None, list[SmtpConnection]]:
        """Pop the most recently used live connection; also hand back the ones to close:
        expired, and closed by the server meanwhile (``serve`` may not run, or not have
        run since: the check costs one poll(2))."""
        cutoff = trio.current_time() - self._settings.idle_timeout_s
        # LIFO: the bottom of the stack has idled longest, so expiry works from there.
        cut = 0
        while cut < len(self._idle) and self._idle[cut].idle_since < cutoff:
            cut += 1
        done, self._idle = self._idle[:cut], self._idle[cut:]
        self._idle_closed += cut
        conn: SmtpConnection | None = None
        while self._idle and conn is None:
            conn = self._idle.pop()
            if conn.has_unread():
                conn.broken = True  # the server is closing it: no QUIT
                self._stale += 1
                done.append(conn)
                conn = None
        for old in done:
            _unwatch(old)
        if conn is not None:
            _unwatch(conn)  # before anything reads from its socket
        return conn, done

    async def _checkin(self, conn: SmtpConnection) -> None:
        if (
            conn.broken
            or self._closed
            or conn.messages >= self._settings.max_messages_per_connection
        ):
            await self._discard(conn)
        else:
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
            self._watch_soon(conn)

    def _watch_soon(self, conn: SmtpConnection) -> None:
        if self._nursery is not None:
            conn.watch = trio.CancelScope()
            self._nursery.start_soon(self._watch, conn, conn.watch)

    async def _watch(self, conn: SmtpConnection, watch: trio.CancelScope) -> None:
        """While ``conn`` idles: wait until its socket is readable (the server closes it)
        or its idle time is up, then take it out of the pool and close it. A checkout
        cancels ``watch`` first (synchronously: the socket is free for the sender)."""
        fd = conn.fileno()
        if watch.cancel_called or fd is None:
            return
        deadline = conn.idle_since + self._settings.idle_timeout_s
        # (An I/O error: the socket was closed under us, by the pool.)
        with watch, trio.move_on_at(deadline) as idle, suppress(*_IO_ERRORS):
            await trio.lowlevel.wait_readable(fd)
        if watch.cancel_called or conn not in self._idle:
            return  # checked out, or being closed by the pool
        self._idle.remove(conn)
        conn.watch = None
        self._idle_closed += 1
        if idle.cancelled_caught:
            log.debug("smtp.idle.expired host=%s port=%d", self._url.host, self._url.port)
        else:
            conn.broken = True  # the server hung up (or is about to): no QUIT
            said = await conn.last_words()
            log.debug(
                "smtp.idle.closed_by_server host=%s port=%d said=%r",
                self._url.host,
                self._url.port,
                said,
            )
        await self._discard(conn)

    async def _connect(self) -> SmtpConnection:
        try:
            conn = await SmtpConnection.open(
                self._url, self._settings, self._ssl_context, helo_name=self._helo_name
            )
        except TransportError as exc:
            log.warning(
                "smtp.connect.failed host=%s port=%d error=%s", self._url.host, self._url.port, exc
            )
            raise
        self._open += 1
        self._connects += 1
        log.debug(
            "smtp.connect.ok host=%s port=%d tls=%s pipelining=%s",
            self._url.host,
            self._url.port,
            conn.tls,
            conn.pipelining,
        )
        return conn

    async def _discard(self, conn: SmtpConnection) -> None:
        self._open -= 1
        await conn.aclose()

    async def aclose(self) -> None:
        """Close every idle connection; in-use ones are closed as their sends finish."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            _unwatch(conn)
        async with trio.open_nursery() as nursery:
            for conn in idle:
                nursery.start_soon(self._discard, conn)


def _unwatch(conn: SmtpConnection) -> None:
    if conn.watch is not None:
        conn.watch.cancel()
        conn.watch = None
