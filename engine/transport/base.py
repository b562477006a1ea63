"""The Transport protocol the senders talk to, and the shapes it exchanges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


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


class Transport(Protocol):
    """Hands messages to a mail server.

    ``send`` returns when the server accepted the message (final 250) for at least
    one recipient; it raises ``engine.errors.TemporaryFailure`` or
    ``PermanentFailure`` otherwise (a PermanentFailure when every recipient was
    refused with 5xx). It must be safe to call from many tasks at once.
    """

    async def send(self, mail: OutgoingMail) -> SendResult: ...

    async def aclose(self) -> None: ...
