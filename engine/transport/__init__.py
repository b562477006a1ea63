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
from engine.transport.compose import MissingAttachment, attachment_body, compose
from engine.transport.dkim import DkimKey, key_for, sign_with, signing_key
from engine.transport.dkim import sign as dkim_sign
from engine.transport.memory import FailRule, MemoryTransport
from engine.transport.smtp import SmtpPool

__all__ = [
    "DkimKey",
    "FailRule",
    "MemoryTransport",
    "MissingAttachment",
    "OutgoingMail",
    "RecipientRejected",
    "SendOutcome",
    "SendResult",
    "SmtpPool",
    "Transport",
    "attachment_body",
    "compose",
    "dkim_sign",
    "key_for",
    "sign_with",
    "signing_key",
]
