"""Our SMTP client on trio streams: URL parsing, one connection, and the pool senders share.

Own client rather than smtpproto 2.0, which forbids command pipelining and serializes an
EmailMessage per message: too slow for our throughput goal. Imports only the leaves.
"""

from __future__ import annotations

import base64
import logging
import ssl
from collections.abc import AsyncGenerator, Iterator, Sequence
from contextlib import aclosing, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import unquote, urlsplit

import trio

from engine.config import SmtpSettings
from engine.errors import ConfigError, PermanentFailure, TemporaryFailure, TransportError
from engine.transport.base import OutgoingMail, RecipientRejected, SendOutcome, SendResult

log = logging.getLogger(__name__)

STARTTLS_MODES: Final = ("auto", "require", "never")
_MAX_REPLY_BYTES: Final = 64 * 1024  # a reply that has not ended by then is garbage
_RECV_BYTES: Final = 64 * 1024
_QUIT_TIMEOUT_S: Final = 1.0  # best-effort QUIT and close; never hold shutdown longer
# Errors that mean the connection is unusable; all become TemporaryFailure(code=None).
_IO_ERRORS: Final = (OSError, trio.BrokenResourceError, trio.ClosedResourceError)


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
        """Parse ``url``; raise ConfigError naming what is wrong."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"smtp url {_redact(url)!r}: {exc}") from None
        if parts.scheme not in ("smtp", "smtps"):
            raise ConfigError(
                f"smtp url {_redact(url)!r}: scheme must be smtp or smtps, not {parts.scheme!r}"
            )
        if not parts.hostname:
            raise ConfigError(f"smtp url {_redact(url)!r}: no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"smtp url {_redact(url)!r}: no path, query or fragment allowed")
        if port == 0:
            raise ConfigError(f"smtp url {_redact(url)!r}: port 0 is not a valid port")
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        if (username is None) != (password is None) or username == "":
            raise ConfigError(f"smtp url {_redact(url)!r}: give both user and password, or none")
        implicit = parts.scheme == "smtps"
        default_port = 465 if implicit else 25
        return cls(parts.hostname, port or default_port, implicit, username, password)


def _redact(url: str) -> str:
    """The URL with any password replaced, for error messages and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"


def make_ssl_context(settings: SmtpSettings) -> ssl.SSLContext:
    """Client TLS context: default verification, plus ``tls_ca_file``, or none at all."""
    ctx = ssl.create_default_context()
    if settings.tls_ca_file:
        try:
            ctx.load_verify_locations(cafile=settings.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"smtp.tls_ca_file {settings.tls_ca_file!r}: {exc}") from None
    if not settings.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


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
    """The engine error for a refusing reply: 5xx is permanent, anything else temporary."""
    message = f"{what}: {reply.code} {reply.text}"
    if 500 <= reply.code < 600:
        return PermanentFailure(message, code=reply.code)
    return TemporaryFailure(message, code=reply.code)


class ConnectionDropped(TemporaryFailure):
    """The connection failed under us (reset, EOF, TLS error, garbage, timeout)."""

    def __init__(self, message: str, *, before_reply: bool) -> None:
        super().__init__(message)
        # True when no reply of the current transaction was read: the server cannot
        # have accepted anything, so the message may safely go over another connection.
        self.before_reply = before_reply


class _StaleConnection(Exception):
    """A reused idle connection was dead before any reply (pool-internal; never escapes)."""


@dataclass(slots=True)
class _Batch:
    """Where a pipelined ``send_many`` stands.

    At most one mail's content and the next mail's envelope are on the wire; their
    replies come in that order (the final reply, then MAIL, RCPT..., DATA).
    """

    mails: Sequence[OutgoingMail]
    # ``_replies`` when the batch began, if a dead connection must raise _StaleConnection
    # rather than yield; None otherwise.
    stale_mark: int | None
    next: int = 0  # index of the first mail not yet looked at
    body: tuple[OutgoingMail, list[RecipientRejected]] | None = None  # content written
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

    Use ``await SmtpConnection.open(...)``; after any I/O error ``broken`` is True and the
    connection must be closed, never reused.
    """

    def __init__(self, stream: trio.abc.Stream, url: SmtpUrl, settings: SmtpSettings) -> None:
        self._stream = stream
        self._url = url
        self._settings = settings
        self._parser = ReplyParser()
        self._closed = False
        self._replies = 0  # replies read on this connection
        self._send_mark = 0  # ``_replies`` when the current ``_send_one`` began
        self._scope: trio.CancelScope | None = None
        self.extensions: dict[str, str] = {}
        self.tls = url.implicit_tls
        self.broken = False
        self.messages = 0  # transactions finished (accepted or refused) on this connection
        self.pipelined_sends = 0  # transactions whose MAIL/RCPT/DATA went in one write
        self.writes = 0  # send_all calls
        self.reads = 0  # receive_some calls
        self.idle_since = 0.0

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    @classmethod
    async def open(
        cls, url: SmtpUrl, settings: SmtpSettings, ssl_context: ssl.SSLContext | None
    ) -> SmtpConnection:
        """Connect, greet, upgrade to TLS and authenticate, all within ``connect_timeout_s``."""
        if settings.starttls not in STARTTLS_MODES:
            raise ConfigError(f"smtp.starttls must be one of {STARTTLS_MODES}")
        tls_ctx = ssl_context or make_ssl_context(settings)
        try:
            with trio.fail_after(settings.connect_timeout_s):
                return await cls._open(url, settings, tls_ctx)
        except trio.TooSlowError:
            raise TemporaryFailure(
                f"connect to {url.host}:{url.port}: timed out after {settings.connect_timeout_s}s"
            ) from None
        except _IO_ERRORS as exc:
            raise TemporaryFailure(f"connect to {url.host}:{url.port}: {exc!r}") from None

    @classmethod
    async def _open(
        cls, url: SmtpUrl, settings: SmtpSettings, tls_ctx: ssl.SSLContext
    ) -> SmtpConnection:
        stream: trio.abc.Stream = await trio.open_tcp_stream(url.host, url.port)
        conn: SmtpConnection | None = None
        try:
            if url.implicit_tls:
                stream = trio.SSLStream(stream, tls_ctx, server_hostname=url.host)
                await stream.do_handshake()
            conn = cls(stream, url, settings)
            await conn._handshake(tls_ctx)
        except BaseException:
            if conn is None:
                await trio.aclose_forcefully(stream)
            else:
                conn.broken = True  # half-open session: close without QUIT
                await conn.aclose()
            raise
        return conn

    async def _handshake(self, tls_ctx: ssl.SSLContext) -> None:
        greeting = await self._read_reply()
        if greeting.code != 220:
            # A refusal to serve is about this server, not the message: always temporary.
            raise TemporaryFailure(f"greeting: {greeting.code} {greeting.text}", code=greeting.code)
        await self._ehlo()
        mode = self._settings.starttls
        if not self.tls and mode != "never":
            if "STARTTLS" in self.extensions:
                reply = await self._command(b"STARTTLS\r\n")
                if reply.code != 220:
                    raise TemporaryFailure(f"STARTTLS: {reply.code} {reply.text}", code=reply.code)
                if self._parser.pending:
                    # Plaintext injected after STARTTLS must not be read as if it were secure.
                    raise TemporaryFailure("STARTTLS: server sent data before the TLS handshake")
                with self._io("STARTTLS handshake"):
                    ssl_stream = trio.SSLStream(
                        self._stream, tls_ctx, server_hostname=self._url.host
                    )
                    self._stream = ssl_stream
                    await ssl_stream.do_handshake()
                self.tls = True
                await self._ehlo()
            elif mode == "require":
                raise TemporaryFailure("server does not offer STARTTLS and smtp.starttls=require")
        if self._url.username is not None and self._url.password is not None:
            await self._auth(self._url.username, self._url.password)

    async def _ehlo(self) -> None:
        name = self._settings.helo_name.encode("ascii")
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
        reply = await self._command(b"HELO " + name + b"\r\n")
        if not reply.ok:
            raise TemporaryFailure(f"HELO: {reply.code} {reply.text}", code=reply.code)

    async def _auth(self, username: str, password: str) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, secret = username.encode("utf-8"), password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + secret)
            reply = await self._command(b"AUTH PLAIN " + token + b"\r\n")
        elif "LOGIN" in mechanisms:
            reply = await self._command(b"AUTH LOGIN\r\n")
            for item in (user, secret):
                if reply.code != 334:
                    break
                reply = await self._command(base64.b64encode(item) + b"\r\n")
        else:
            raise TemporaryFailure(
                f"server offers no AUTH mechanism we support (PLAIN, LOGIN): {mechanisms}"
            )
        if reply.code != 235:
            # Bad credentials are a configuration problem: defer, do not dead-letter mail.
            raise TemporaryFailure(f"AUTH: {reply.code} {reply.text}", code=reply.code)

    # -- I/O --------------------------------------------------------------------------

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Map socket, TLS, timeout and protocol errors to ConnectionDropped; mark broken."""
        try:
            yield
        except trio.TooSlowError:
            self.broken = True
            raise ConnectionDropped(
                f"{what}: no reply within {self._settings.command_timeout_s}s",
                before_reply=False,  # a slow server may still be working on the message
            ) from None
        except (*_IO_ERRORS, SmtpProtocolError) as exc:
            self.broken = True
            raise ConnectionDropped(
                f"{what}: {exc!r}", before_reply=self._replies == self._send_mark
            ) from exc

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
            self._replies += 1
            return reply
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
                self._replies += 1
                return reply

    async def _command(self, line: bytes) -> Reply:
        await self._write(line)
        return await self._read_reply()

    # -- sending ----------------------------------------------------------------------

    async def _send_one(self, mail: OutgoingMail) -> SendResult:
        """One mail transaction. Raises TemporaryFailure / PermanentFailure on refusal.

        Refusals leave the connection usable; I/O errors and cancellation mark it broken.
        """
        if self.broken or self._closed:
            raise ConnectionDropped("connection is not usable", before_reply=True)
        self._send_mark = self._replies
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
            raise ConnectionDropped(
                f"send: no reply within {self._settings.command_timeout_s}s",
                before_reply=False,  # a slow server may still be working on the message
            )
        self.messages += 1
        if isinstance(outcome, TransportError):
            raise outcome
        return outcome

    def _mail_params(self, mail: OutgoingMail, size: int) -> str | TransportError:
        params = ""
        if "SIZE" in self.extensions:
            limit = self.extensions["SIZE"]
            if limit.isdigit() and 0 < int(limit) < size:
                return PermanentFailure(f"message is {size} bytes; the server takes {limit}")
            params += f" SIZE={size}"
        if not mail.data.isascii() and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        if not (mail.sender.isascii() and all(r.isascii() for r in mail.recipients)):
            if "SMTPUTF8" not in self.extensions:
                return PermanentFailure("non-ASCII address but the server lacks SMTPUTF8")
            params += " SMTPUTF8"
        return params

    def _envelope(self, mail: OutgoingMail) -> list[bytes] | TransportError:
        """The MAIL, RCPT... and DATA lines for ``mail``, or why it cannot go to this server."""
        if not mail.recipients:
            return PermanentFailure("message has no recipients")
        params = self._mail_params(mail, len(mail.data))
        if isinstance(params, TransportError):
            return params
        return [
            f"MAIL FROM:<{mail.sender}>{params}\r\n".encode(),
            *[f"RCPT TO:<{r}>\r\n".encode() for r in mail.recipients],
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
        final = await self._command(_dot_stuff(mail.data))
        return _final_outcome(mail, final, accepted)

    async def _read_envelope(self, mail: OutgoingMail) -> list[RecipientRejected] | TransportError:
        """Read the replies to a pipelined envelope.

        The refused recipients when the server now waits for the content; else the refusal,
        after RSET.
        """
        mail_reply = await self._read_reply()
        rcpt_replies = [await self._read_reply() for _ in mail.recipients]
        data_reply = await self._read_reply()
        rejected = _rejected(mail, rcpt_replies)
        if not mail_reply.ok:
            refusal = _failure("MAIL FROM", mail_reply)
        elif len(rejected) == len(mail.recipients):
            refusal = _all_rejected(rejected)
        elif data_reply.code != 354:
            refusal = _failure("DATA", data_reply)
        else:
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
        rcpt_replies = [await self._command(cmd) for cmd in envelope[1:-1]]
        rejected = _rejected(mail, rcpt_replies)
        if len(rejected) == len(mail.recipients):
            return await self._abort(_all_rejected(rejected))
        data_reply = await self._command(envelope[-1])
        if data_reply.code != 354:
            return await self._abort(_failure("DATA", data_reply))
        return rejected

    async def _abort(self, refusal: TransportError) -> TransportError:
        """RSET after a refused transaction so the connection can carry the next one."""
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
        """``send_many``; with ``stale``, a connection that fails before giving any reply
        raises _StaleConnection instead (nothing was accepted: the pool tries another).
        """
        stale_mark = self._replies if stale else None
        if not self.pipelining:
            for mail in mails:
                outcome: SendResult | TransportError
                try:
                    outcome = await self._send_one(mail)
                except ConnectionDropped as exc:
                    if exc.before_reply and stale_mark == self._replies:
                        raise _StaleConnection from exc
                    outcome = exc
                except TransportError as exc:
                    outcome = exc
                yield mail, outcome
            return
        batch = _Batch(mails, stale_mark)
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
        if self.broken or self._closed:
            return _dropped(batch, "connection is not usable")
        outcomes: list[SendOutcome] | None = None
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                outcomes = await self._batch_advance(batch)
        except (*_IO_ERRORS, SmtpProtocolError) as exc:
            self.broken = True
            if batch.stale_mark == self._replies:
                raise _StaleConnection from exc
            return _dropped(batch, repr(exc))
        except BaseException:
            self.broken = True  # state unknown mid-transaction (includes Cancelled)
            raise
        finally:
            self._scope = None
        if outcomes is None:  # our deadline expired
            self.broken = True
            return _dropped(batch, f"no reply within {self._settings.command_timeout_s}s")
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
            await self._write(_dot_stuff(mail.data, self._take_next(batch)))
        mail, rejected = batch.body
        final = await self._read_reply()
        batch.body = None
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


def _dropped(batch: _Batch, reason: str) -> list[SendOutcome]:
    """The connection failed: the outcome of every mail of ``batch`` not yet yielded."""
    outcomes: list[SendOutcome] = []
    if batch.body is not None:
        # The content was (perhaps partly) written: the server may have taken it.
        outcomes.append((batch.body[0], ConnectionDropped(f"send: {reason}", before_reply=False)))
    outcomes += batch.skipped
    unsent = [] if batch.envelope is None else [batch.envelope]
    unsent += batch.mails[batch.next :]
    # No content went out for these: the server cannot have taken them.
    outcomes += [(m, ConnectionDropped(f"not sent: {reason}", before_reply=True)) for m in unsent]
    batch.body = batch.envelope = None
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
    """Every recipient refused: temporary if any refusal was, since a retry may then work."""
    temporary = [r for r in rejected if not 500 <= r.code < 600]
    first = (temporary or rejected)[0]
    message = (
        f"all {len(rejected)} recipients refused, first {first.address}: {first.code} {first.text}"
    )
    if temporary:
        return TemporaryFailure(message, code=first.code)
    return PermanentFailure(message, code=first.code)


def _dot_stuff(data: bytes, then: bytes = b"") -> bytes:
    """RFC 5321 4.5.2 transparency, CRLF-terminated, the ``.`` end-of-data line, ``then``."""
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if stuffed and not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return b"".join((stuffed, b".\r\n", then))


# -- the pool ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SmtpPoolStatistics:
    open: int  # connections open now (idle + in use)
    idle: int  # open connections waiting in the pool
    in_use: int  # open connections carrying a transaction
    connects: int  # connections opened since the pool was made
    sends: int  # messages accepted by the server since the pool was made


class SmtpPool:
    """The Transport over SMTP: up to ``pool_size`` connections, reused LIFO, shared by tasks."""

    def __init__(self, settings: SmtpSettings, url: str) -> None:
        if settings.starttls not in STARTTLS_MODES:
            raise ConfigError(f"smtp.starttls must be one of {STARTTLS_MODES}")
        if settings.pool_size < 1:
            raise ConfigError("smtp.pool_size must be at least 1")
        self._settings = settings
        self._url = SmtpUrl.parse(url)
        self._ssl_context = make_ssl_context(settings)  # built once: contexts are costly
        self._slots = trio.Semaphore(settings.pool_size)
        self._idle: list[SmtpConnection] = []  # LIFO: the hottest connection on top
        self._open = 0
        self._connects = 0
        self._sends = 0
        self._closed = False

    def statistics(self) -> SmtpPoolStatistics:
        idle = len(self._idle)
        return SmtpPoolStatistics(self._open, idle, self._open - idle, self._connects, self._sends)

    async def send_many(self, mails: Sequence[OutgoingMail]) -> AsyncGenerator[SendOutcome, None]:
        """``Transport.send_many`` over one connection of the pool (contract there).

        The connection is held, with a pool slot, until the generator finishes or is
        closed. A reused connection found dead before it gave any reply is replaced
        once, transparently.
        """
        if not mails:
            return
        async with self._slots:
            done = 0  # mails yielded so far
            reuse = True
            while True:
                try:
                    conn, reused = await self._acquire(reuse=reuse)
                except TransportError as exc:  # pool closed, or connect failed
                    failure = exc
                    break
                dropped = False
                try:
                    outcomes = conn._send_many(mails[done:] if done else mails, stale=reused)
                    async with aclosing(outcomes):
                        async for mail, outcome in outcomes:
                            done += 1
                            if isinstance(outcome, SendResult):
                                self._sends += 1
                            elif isinstance(outcome, ConnectionDropped) and not dropped:
                                dropped = True
                                log.warning(
                                    "smtp.send_many.failed job=%s unsent=%d error=%s",
                                    mail.job_id,
                                    len(mails) - done,
                                    outcome,
                                )
                            yield mail, outcome
                    return
                except _StaleConnection as stale:
                    # The server had closed this idle connection: nothing was accepted.
                    log.info(
                        "smtp.send_many.stale_retry job=%s unsent=%d error=%s",
                        mails[done].job_id,
                        len(mails) - done,
                        stale.__cause__,
                    )
                    reuse = False
                finally:
                    await self._checkin(conn)
            for mail in mails[done:]:
                yield mail, failure

    async def _acquire(self, *, reuse: bool) -> tuple[SmtpConnection, bool]:
        """A live connection, and whether it was reused; raise TemporaryFailure if none."""
        if self._closed:
            raise TemporaryFailure("the SMTP pool is closed")
        conn, expired = self._checkout() if reuse else (None, [])
        for old in expired:
            await self._discard(old)
        if conn is not None:
            return conn, True
        return await self._connect(), False

    def _checkout(self) -> tuple[SmtpConnection | None, list[SmtpConnection]]:
        """Pop the most recently used live connection; also hand back the expired ones."""
        deadline = trio.current_time() - self._settings.idle_timeout_s
        # LIFO: the bottom of the stack has idled longest, so expiry works from there.
        cut = 0
        while cut < len(self._idle) and self._idle[cut].idle_since < deadline:
            cut += 1
        expired, self._idle = self._idle[:cut], self._idle[cut:]
        return (self._idle.pop() if self._idle else None), expired

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

    async def _connect(self) -> SmtpConnection:
        try:
            conn = await SmtpConnection.open(self._url, self._settings, self._ssl_context)
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
        async with trio.open_nursery() as nursery:
            for conn in idle:
                nursery.start_soon(self._discard, conn)
