"""The Transport protocol the senders talk to, and the shapes it exchanges."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol, TypeAlias

import trio

from engine.errors import PermanentFailure, TransportError
from engine.models import Message


@dataclass(frozen=True, slots=True)
class SevenBitForm:
    """How to send a mail to a server without 8BITMIME or SMTPUTF8 (``compose`` makes it).

    The mail's ``data`` is its header section, ``data[:split]``, then the rest (MIME
    part headers and bodies); each half has a 7-bit stand-in here unless it is 7-bit
    already, so the two extensions are decided independently.
    """

    split: int
    # The rest with every 8bit part quoted-printable; None: ``data[split:]`` is 7-bit.
    body: bytes | None
    # The header section with IDNA A-label domains; None: ``data[:split]`` is ASCII, or
    # there is no ASCII form (``unsendable``).
    head: bytes | None
    # Envelope address -> its ASCII form, for each non-ASCII one (domain to A-labels).
    addresses: Mapping[str, str]
    # Why the mail needs SMTPUTF8 whatever we do (a non-ASCII local part); "" if it does not.
    unsendable: str = ""
    # DKIM (engine.transport.dkim): bytes at the start of ``data`` that sign ``data``
    # only (its DKIM-Signature), and what signs a form made of the stand-ins.
    signed: int = 0
    signer: FormSigner | None = None


class FormSigner(Protocol):
    def header_for(self, message: bytes, form: str) -> bytes:
        """The header field(s) that sign ``message``, which is the mail's ``form``
        ("ascii-head", "7bit-body" or both): the same form gets the same answer."""
        ...


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    """One message ready for the wire.

    ``data`` is the whole RFC 5322 message with CRLF line endings and *no* SMTP
    dot-stuffing (the transport does that); ``recipients`` are bare addresses. ``data``
    is 7-bit ASCII unless a ``needs_*`` flag says otherwise: then it is the best form,
    for a server that offers that extension, and ``fallback`` says how to send it to
    one that does not (``for_server`` picks). ``message`` and ``parts`` are what it was
    composed from, for transports that send the structured message (providers' JSON APIs).
    """

    job_id: str
    sender: str
    recipients: list[str]
    data: bytes
    # A MIME part is Content-Transfer-Encoding: 8bit (RFC 6152: BODY=8BITMIME).
    needs_8bitmime: bool = False
    # An address in the envelope or the headers is UTF-8 (RFC 6531/6532: SMTPUTF8).
    needs_smtputf8: bool = False
    fallback: SevenBitForm | None = None
    # The message ``data`` was composed from (None: built some other way).
    message: Message | None = None
    # Its attachments' part bodies by SHA-256 (``compose.attachment_body``: base64 in
    # 76-character lines); may hold other messages' parts too.
    parts: Mapping[bytes, bytes] | None = None

    def for_server(self, extensions: Collection[str]) -> OutgoingMail | PermanentFailure:
        """This mail as a server offering ``extensions`` (upper-case EHLO keywords) may
        take it: itself when it can, else its 7-bit stand-ins (addresses, headers and
        the body as needed), else why it cannot go to that server at all."""
        utf8 = not self.needs_smtputf8 or "SMTPUTF8" in extensions
        eight = not self.needs_8bitmime or "8BITMIME" in extensions
        if utf8 and eight:
            return self
        alt = self.fallback
        if not utf8 and (alt is None or alt.unsendable):
            why = alt.unsendable if alt is not None else "the mail has non-ASCII addresses"
            return PermanentFailure(f"the server does not offer SMTPUTF8; {why}")
        if not eight and (alt is None or alt.body is None):
            return PermanentFailure("the server does not offer 8BITMIME; the mail is 8bit")
        assert alt is not None
        own_head, own_body = utf8 or alt.head is None, eight or alt.body is None
        if own_head and own_body:  # only the envelope differs (a UTF-8 Bcc address)
            data = self.data
        else:
            view = memoryview(self.data)
            head = view[alt.signed : alt.split] if own_head else alt.head
            body = view[alt.split :] if own_body else alt.body
            assert head is not None and body is not None
            data = b"".join((head, body))
            if alt.signer is not None:
                form = "+".join(
                    f for f, own in (("ascii-head", own_head), ("7bit-body", own_body)) if not own
                )
                data = alt.signer.header_for(data, form) + data
        sender, recipients = self.sender, self.recipients
        if not utf8:
            sender = alt.addresses.get(sender, sender)
            recipients = [alt.addresses.get(r, r) for r in recipients]
        return OutgoingMail(
            self.job_id,
            sender,
            recipients,
            data,
            needs_8bitmime=self.needs_8bitmime and eight,
            needs_smtputf8=self.needs_smtputf8 and utf8,
        )

    def data_for(self, extensions: Collection[str]) -> bytes:
        """The content to send to a server offering ``extensions``: ``for_server``'s."""
        if self.fallback is None:
            return self.data
        form = self.for_server(extensions)
        return self.data if isinstance(form, PermanentFailure) else form.data


@dataclass(frozen=True, slots=True)
class RecipientRejected:
    address: str
    code: int
    text: str


@dataclass(frozen=True, slots=True)
class SendResult:
    """The server's final reply to DATA, and any recipients it refused at RCPT. A
    provider's API accepting the mail is ``code`` 250, its message id ``provider_id``."""

    code: int
    text: str
    rejected: list[RecipientRejected] = field(default_factory=list)
    provider_id: str = ""


# One mail's outcome in a batch: accepted, or refused or failed (see ``Transport.send_many``).
SendOutcome: TypeAlias = tuple[OutgoingMail, SendResult | TransportError]


class Transport(Protocol):
    """Hands messages to a mail server. Safe to use from many tasks at once."""

    def send_many(self, mails: Sequence[OutgoingMail]) -> AsyncGenerator[SendOutcome, None]:
        """Deliver ``mails`` in order over one connection; yield each ``(mail, outcome)``.

        An async generator. Each outcome is yielded as soon as that mail's final reply
        is read (ack it right away: that keeps the duplicate window short). It is a
        ``SendResult`` when the server accepted the mail (final 250) for at least one
        recipient, else an ``engine.errors.TemporaryFailure`` or ``PermanentFailure``
        (a PermanentFailure when every recipient was refused with 5xx). Every mail is
        yielded exactly once, in order; nothing is skipped. Refusals never raise.

        Only the server's answers to a mail's own transaction are that mail's outcome.
        When the transport itself fails -- no connection (refused, reset, timed out), a
        TLS failure, a greeting other than 220, EHLO/HELO, STARTTLS or AUTH refused, a
        refusal about this client rather than the message (Postfix's HELO check) --
        every mail not yet yielded gets ``engine.errors.TransportUnavailable``: it was
        not tried, and no attempt should be counted. A connection lost mid-batch yields
        a ``TemporaryFailure`` for the mail in flight (the server may or may not have
        taken it); the mails behind it are resent over a new connection, or get
        TransportUnavailable when that fails too. The generator raises only
        ``Cancelled`` (never swallowed) and bugs.

        Stopping early (``break``, or an exception or cancellation in the consumer's
        loop body) is safe: a mail that was not yielded was not delivered. Close the
        generator promptly, ideally ``async with contextlib.aclosing(t.send_many(m))``;
        until it is closed it holds its connection (trio closes it when garbage
        collected otherwise). Closing aborts what is already on the wire without
        delivering it (for SMTP that costs the connection: the next envelope is already
        pipelined); a connection goes back to a pool only in a known state.
        Cancelling the generator while it waits for the server leaves the mail in
        flight undecided: the server may have taken it, and it is not yielded.
        """
        ...

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Upkeep while the engine runs (SMTP: close idle connections as soon as the
        server does, or when idle too long). ``send_many`` works without it."""
        ...

    async def aclose(self) -> None: ...
