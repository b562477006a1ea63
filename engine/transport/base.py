"""The Transport protocol the senders talk to, and the shapes it exchanges."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

from engine.errors import TransportError


@dataclass(frozen=True, slots=True)
class OutgoingMail:
    """One message ready for the wire.

    ``data`` is the whole RFC 5322 message with CRLF line endings and *no* SMTP
    dot-stuffing (the transport does that); ``recipients`` are bare addresses.
    """

    job_id: str
    sender: str
    recipients: list[str]
    data: bytes


@dataclass(frozen=True, slots=True)
class RecipientRejected:
    address: str
    code: int
    text: str


@dataclass(frozen=True, slots=True)
class SendResult:
    """The server's final reply to DATA, and any recipients it refused at RCPT."""

    code: int
    text: str
    rejected: list[RecipientRejected] = field(default_factory=list)


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
        yielded exactly once, in order; nothing is skipped. Refusals never raise. A
        connection-level failure (I/O error, timeout, dropped connection, failed
        connect) yields a ``TemporaryFailure`` for the mail in flight (which the server
        may or may not have taken) and then for every mail not yet sent. The generator
        raises only ``Cancelled`` (never swallowed) and bugs.

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

    async def aclose(self) -> None: ...
