"""Delivery transports behind one small Protocol: pooled SMTP, providers' HTTP APIs
(``transport_for(url, settings)``: resend://, sendgrid://, postmark://, mailgun://, ses://),
and in-memory for tests.

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
from engine.transport.providers import (
    PROVIDER_SCHEMES,
    ProviderTransport,
    ProviderUrl,
    is_provider_url,
    transport_for,
)
from engine.transport.smtp import SmtpPool

__all__ = [
    "PROVIDER_SCHEMES",
    "DkimKey",
    "FailRule",
    "MemoryTransport",
    "MissingAttachment",
    "OutgoingMail",
    "ProviderTransport",
    "ProviderUrl",
    "RecipientRejected",
    "SendOutcome",
    "SendResult",
    "SmtpPool",
    "Transport",
    "attachment_body",
    "compose",
    "dkim_sign",
    "is_provider_url",
    "key_for",
    "sign_with",
    "signing_key",
    "transport_for",
]
