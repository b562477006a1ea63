"""Delivery transports behind one small Protocol: pooled SMTP, and in-memory for tests.

Imports only policy and the leaves; never the queue or the API.
"""

from engine.transport.base import (
    OutgoingMail,
    RecipientRejected,
    SendOutcome,
    SendResult,
    Transport,
)
from engine.transport.compose import compose
from engine.transport.memory import FailRule, MemoryTransport
from engine.transport.smtp import SmtpPool

__all__ = [
    "FailRule",
    "MemoryTransport",
    "OutgoingMail",
    "RecipientRejected",
    "SendOutcome",
    "SendResult",
    "SmtpPool",
    "Transport",
    "compose",
]
