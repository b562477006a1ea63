"""Email providers' delivery webhooks: is a delivery really the provider's (each one's own
signature scheme), and what do its events mean in the engine's terms (``ProviderEvent``:
delivered, bounced with its class, complained, delayed). Pure: no I/O and no clock (the
caller passes ``now_s``; it fetches SNS signing certificates itself). Imports the leaves
and ``engine.bounce``; never the queue or the API.

The schemes, as each provider documents them:

    resend    Svix: HMAC-SHA256 (key: base64 after ``whsec_``) over "id.timestamp.body",
              headers svix-id / svix-timestamp / svix-signature ("v1,<b64>", several
              space-separated), the timestamp within tolerance_s (Svix: 5 min).
              https://docs.svix.com/receiving/verifying-payloads/how-manual
              https://resend.com/docs/webhooks/verify-webhooks-requests
    sendgrid  Signed Event Webhook: ECDSA P-256 / SHA-256 over timestamp + body, the
              signature (base64 DER) in X-Twilio-Email-Event-Webhook-Signature, the
              timestamp in X-Twilio-Email-Event-Webhook-Timestamp.
              https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features
    ses       SNS message signature: SignatureVersion 1 (RSA SHA1) or 2 (RSA SHA256) over
              "Name\\nvalue\\n" of the type's fields in byte order; the certificate from
              SigningCertURL, which must be https on sns.<region>.amazonaws.com (checked
              before anything is fetched); and a TopicArn we listed.
              https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html
              https://docs.aws.amazon.com/sns/latest/dg/http-notification-json.html
    postmark  HTTP Basic auth: the user and password written into the webhook's URL.
              https://postmarkapp.com/developer/webhooks/webhooks-overview
    mailgun   HMAC-SHA256 (the webhook signing key) over timestamp + token, hex, in the
              body's ``signature`` object; the timestamp within tolerance_s and each token
              used once (the caller's store remembers it: ``Delivery.nonce``).
              https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks

Event shapes: Resend https://resend.com/docs/dashboard/webhooks/event-types; SendGrid
https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event; SES
https://docs.aws.amazon.com/ses/latest/dg/event-publishing-retrieving-sns-contents.html;
Postmark https://postmarkapp.com/developer/webhooks/bounce-webhook (and delivery-webhook,
spam-complaint-webhook); Mailgun
https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhook-payloads.
Our job id rides in each provider's metadata, as the transports attach it: Resend tag
``job_id``, SendGrid custom_args ``job_id`` (top-level keys of its events), Postmark
Metadata ``job_id``, Mailgun user-variables ``job_id``, SES EmailTags ``job_id``
(``mail.tags.job_id[0]``).

A bounce's class comes from ``engine.bounce.classify`` over the diagnostic the provider
passes on (SMTP code, enhanced status, text), the provider's own category where that says
nothing; a hard bounce of the invalid-recipient class, and every complaint, carries a
suppression reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from engine.bounce import MAX_TEXT_CHARS, BounceClass, classify
from engine.config import ProviderEventSettings
from engine.errors import EngineError
from engine.ids import is_id
from engine.models import ProviderEvent, ProviderEventType, bare_address

PROVIDERS: Final = ("resend", "sendgrid", "ses", "postmark", "mailgun")
# The settings each provider needs before its deliveries are taken.
REQUIRED: Final[Mapping[str, tuple[str, ...]]] = {
    "resend": ("resend_secret",),
    "sendgrid": ("sendgrid_public_key",),
    "ses": ("ses_topic_arns",),
    "postmark": ("postmark_user", "postmark_password"),
    "mailgun": ("mailgun_signing_key",),
}
# How much of a provider's text is kept with an event (the stream's error field).
MAX_DETAIL_CHARS: Final = 1000
# A provider's event id longer than this (or with other characters) is hashed into the
# key that remembers it.
_MAX_ID_CHARS: Final = 128
_ID_CHARS: Final = re.compile(r"[0-9A-Za-z._:@+=/-]+")
# An SMTP reply code in front of a diagnostic ("smtp; 550 5.1.1 ...", "550-5.1.1 ...").
_REPLY_CODE: Final = re.compile(r"(?:smtp;\s*)?([245]\d\d)(?:[\s:-]|$)", re.IGNORECASE)
_ENHANCED: Final = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# Genuine SNS endpoints: sns.<region>.amazonaws.com (.com.cn in China), as AWS's own
# validators read the host.
_SNS_HOST: Final = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(?:\.cn)?")
_SNS_HASHES: Final[Mapping[str, type[hashes.HashAlgorithm]]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}
# The fields an SNS signature covers, per message type, in the order they are signed.
_SNS_SIGNED: Final[Mapping[str, tuple[str, ...]]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
    "UnsubscribeConfirmation": (
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
    ),
}  # fmt: skip
_MAX_CERT_BYTES: Final = 16 * 1024

_decode_json = msgspec.json.Decoder().decode


class SignatureInvalid(EngineError):
    """A delivery is not shown to be the provider's (401): no signature, a wrong one, an
    old timestamp, a certificate from elsewhere, a topic not ours."""


class MalformedDelivery(EngineError):
    """A delivery that is the provider's but not in its documented shape (400)."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One verified delivery, mapped."""

    events: list[ProviderEvent] = field(default_factory=list)
    ignored: int = 0  # events of other kinds (sent, opened, clicked...) or unreadable
    nonce: str = ""  # a one-time token the store must not have seen (Mailgun)


def missing_settings(settings: ProviderEventSettings, provider: str) -> list[str]:
    """The settings ``provider`` still needs (none: its deliveries are taken)."""
    return [name for name in REQUIRED[provider] if not getattr(settings, name)]


# -- verification -------------------------------------------------------------------------


def verify_svix(
    secret: str, headers: Mapping[str, str], body: bytes, *, now_s: float, tolerance_s: float
) -> str:
    """Check a Svix-signed delivery (Resend); returns its message id (svix-id: the same on
    a retry, so the event's id)."""

    def get(name: str) -> str:
        # Svix's white-labelled headers are webhook-*: the Standard Webhooks names.
        return headers.get(f"svix-{name}") or headers.get(f"webhook-{name}") or ""

    msg_id, stamp, signatures = get("id"), get("timestamp"), get("signature")
    if not (msg_id and stamp and signatures):
        raise SignatureInvalid("no svix-id, svix-timestamp and svix-signature headers")
    _check_time(stamp, now_s=now_s, tolerance_s=tolerance_s)
    b64 = secret.partition("_")[2]
    key = base64.b64decode(b64 + "=" * (-len(b64) % 4))  # Svix's own tools pad it too
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(mac)
    for item in signatures.split():
        version, _, value = item.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return msg_id
    raise SignatureInvalid(
        "no svix-signature matches the body (is resend_secret the one of this webhook?)"
    )


def sendgrid_key(text: str) -> ec.EllipticCurvePublicKey:
    """The verification key as SendGrid shows it: base64 DER (or PEM) of a P-256 key."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
    except ValueError as exc:
        raise ValueError(f"not a public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("not an ECDSA P-256 public key")
    return key


def verify_sendgrid(
    key: ec.EllipticCurvePublicKey,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now_s: float,
    tolerance_s: float,
) -> None:
    signature = headers.get("x-twilio-email-event-webhook-signature", "")
    stamp = headers.get("x-twilio-email-event-webhook-timestamp", "")
    if not (signature and stamp):
        raise SignatureInvalid(
            "no X-Twilio-Email-Event-Webhook-Signature and -Timestamp headers (turn on the "
            "Signed Event Webhook)"
        )
    _check_time(stamp, now_s=now_s, tolerance_s=tolerance_s)
    try:
        key.verify(_b64(signature), stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid(
            "the signature does not match the body (is sendgrid_public_key this account's?)"
        ) from None


def verify_basic(user: str, password: str, authorization: str | None) -> None:
    """HTTP Basic credentials (Postmark), compared in constant time."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        raise SignatureInvalid("no Basic credentials (put them in the webhook's URL)")
    given_user, sep, given_password = _b64(token.strip()).partition(b":")
    # Both compared whatever the first says: the time taken tells nothing.
    ok = hmac.compare_digest(given_user, user.encode())
    ok &= hmac.compare_digest(given_password, password.encode())
    if not (ok and sep):
        raise SignatureInvalid("wrong Basic credentials")


def verify_mailgun(signing_key: str, doc: Any, *, now_s: float, tolerance_s: float) -> str:
    """Check the ``signature`` object of a Mailgun delivery; returns its token (used once)."""
    sig = doc.get("signature") if isinstance(doc, dict) else None
    if not isinstance(sig, dict):
        raise SignatureInvalid("no signature object in the body")
    stamp, token, signature = (str(sig.get(k) or "") for k in ("timestamp", "token", "signature"))
    if not (stamp and token and signature) or len(token) > 256:
        raise SignatureInvalid("the signature object lacks timestamp, token or signature")
    mac = hmac.new(signing_key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac.encode(), signature.lower().encode()):
        raise SignatureInvalid(
            "the signature does not match (is mailgun_signing_key this account's?)"
        )
    _check_time(stamp, now_s=now_s, tolerance_s=tolerance_s)
    return token


def _check_time(stamp: str, *, now_s: float, tolerance_s: float) -> None:
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise SignatureInvalid(f"the timestamp {stamp[:20]!r} is not seconds since the epoch")
    if abs(now_s - int(stamp)) > tolerance_s:
        raise SignatureInvalid(
            f"the timestamp is {int(now_s) - int(stamp)} s off this machine's clock (more "
            f"than provider_events.tolerance_s = {tolerance_s:g}): a replay, or a clock wrong"
        )


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureInvalid("a signature or credential is not base64") from None


# -- SNS (SES's events) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SnsMessage:
    """An SNS message as posted (its fields not verified yet)."""

    fields: dict[str, str]

    @property
    def type(self) -> str:
        return self.fields.get("Type", "")

    @property
    def message_id(self) -> str:
        return self.fields.get("MessageId", "")

    @property
    def topic_arn(self) -> str:
        return self.fields.get("TopicArn", "")

    @property
    def cert_url(self) -> str:
        return self.fields.get("SigningCertURL", "")

    @property
    def subscribe_url(self) -> str:
        return self.fields.get("SubscribeURL", "")


def parse_sns(body: bytes) -> SnsMessage:
    doc = _json(body)
    if not isinstance(doc, dict):
        raise SignatureInvalid("not an SNS message (a JSON object; raw delivery must be off)")
    # Absent and null are alike: neither is signed.
    fields = {k: v for k, v in doc.items() if isinstance(v, str)}
    for name in ("Type", "MessageId", "TopicArn", "Signature", "SignatureVersion",
                 "SigningCertURL"):  # fmt: skip
        if not fields.get(name):
            raise SignatureInvalid(
                f"not a signed SNS message: no {name} (raw message delivery must be off)"
            )
    return SnsMessage(fields)


def check_topic(msg: SnsMessage, allowed: list[str]) -> None:
    """SNS signs every topic's messages alike: only the listed topics are ours."""
    if msg.topic_arn not in allowed:
        raise SignatureInvalid(
            f"topic {msg.topic_arn[:200]!r} is not one of provider_events.ses_topic_arns"
        )


def check_sns_url(url: str, *, what: str, pem: bool = False) -> None:
    """An https URL on a genuine SNS host (sns.<region>.amazonaws.com), nothing else: read
    with the URL parser, so "sns.x.amazonaws.com.evil.example" or a user@ trick fails."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SignatureInvalid(f"{what} is not a URL") from None
    host = (parts.hostname or "").lower()
    if (
        parts.scheme != "https" or parts.username is not None or port not in (None, 443)
        or not _SNS_HOST.fullmatch(host) or (pem and not parts.path.endswith(".pem"))
    ):  # fmt: skip
        raise SignatureInvalid(
            f"{what} {url[:200]!r} is not an https URL on sns.<region>.amazonaws.com"
            + (" ending .pem" if pem else "")
        )


class SigningKey(NamedTuple):
    key: rsa.RSAPublicKey
    not_after_s: float  # when its certificate expires (seconds since the epoch)


def sns_certificate_key(pem: bytes, *, now_s: float) -> SigningKey:
    """The RSA key of an SNS signing certificate that is valid now."""
    if len(pem) > _MAX_CERT_BYTES:
        raise SignatureInvalid("the signing certificate is too large")
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise SignatureInvalid("SigningCertURL did not give a PEM certificate") from None
    not_after = cert.not_valid_after_utc.timestamp()
    if not cert.not_valid_before_utc.timestamp() <= now_s <= not_after:
        raise SignatureInvalid("the signing certificate is not valid now")
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise SignatureInvalid("the signing certificate's key is not RSA")
    return SigningKey(key, not_after)


def sns_string_to_sign(msg: SnsMessage) -> bytes:
    names = _SNS_SIGNED.get(msg.type)
    if names is None:
        raise SignatureInvalid(f"unknown SNS message type {msg.type[:40]!r}")
    f = msg.fields
    return "".join(f"{n}\n{f[n]}\n" for n in names if n in f).encode()


def verify_sns(msg: SnsMessage, key: rsa.RSAPublicKey) -> None:
    algorithm = _SNS_HASHES.get(msg.fields["SignatureVersion"])
    if algorithm is None:
        raise SignatureInvalid("SignatureVersion is neither 1 nor 2")
    try:
        key.verify(
            _b64(msg.fields["Signature"]), sns_string_to_sign(msg), padding.PKCS1v15(),
            algorithm(),
        )  # fmt: skip
    except InvalidSignature:
        raise SignatureInvalid("the SNS signature does not match the message") from None


# -- mapping -------------------------------------------------------------------------------

_RESEND: Final[Mapping[str, ProviderEventType]] = {
    "email.delivered": "delivered",
    "email.bounced": "bounced",
    "email.complained": "complained",
    "email.delivery_delayed": "delayed",
}
# SES's bounce types and subtypes (Resend's bounce object uses them too): the class their
# words mean when the diagnostic says nothing plainer. AWS: remove the address on a
# Permanent bounce of any subtype.
_SES_HINTS: Final[Mapping[tuple[str, str], BounceClass]] = {
    ("Permanent", "General"): "invalid-recipient",
    ("Permanent", "NoEmail"): "invalid-recipient",
    ("Permanent", "Suppressed"): "invalid-recipient",
    ("Permanent", "OnAccountSuppressionList"): "invalid-recipient",
    ("Transient", "MailboxFull"): "mailbox-full",
    ("Transient", "MessageTooLarge"): "message-too-large",
    ("Transient", "ContentRejected"): "content-rejected",
    ("Transient", "AttachmentRejected"): "content-rejected",
}
_SENDGRID_HINTS: Final[Mapping[str, BounceClass]] = {
    "invalid address": "invalid-recipient",
    "mailbox unavailable": "invalid-recipient",
    "content": "content-rejected",
    "reputation": "policy-block",
    "frequency or volume too high": "rate-limited",
}
# Why SendGrid dropped a message without trying it: these say the address is dead.
_SENDGRID_DEAD_DROPS: Final = frozenset({"bounced address", "invalid"})
# Postmark's bounce Type -> (our type, hard, class when its text says nothing plainer);
# the others (AutoResponder, AddressChange, Subscribe, Unsubscribe, OpenRelayTest,
# ChallengeVerification, InboundError, Unconfirmed) are not about delivery: ignored.
_POSTMARK: Final[Mapping[str, tuple[ProviderEventType, bool, BounceClass | None]]] = {
    "HardBounce": ("bounced", True, "invalid-recipient"),
    "BadEmailAddress": ("bounced", True, "invalid-recipient"),
    "SoftBounce": ("bounced", False, None),
    "Transient": ("delayed", False, "temporary"),
    "DnsError": ("bounced", False, "dns-routing"),
    "SpamNotification": ("bounced", False, "content-rejected"),
    "VirusNotification": ("bounced", False, "content-rejected"),
    "Blocked": ("bounced", True, "policy-block"),
    "DMARCPolicy": ("bounced", True, "policy-block"),
    "ManuallyDeactivated": ("bounced", True, None),
    "SMTPApiError": ("bounced", True, None),
    "TemplateRenderingFailed": ("bounced", True, None),
    "Unknown": ("bounced", False, None),
    "SpamComplaint": ("complained", False, None),
}
# Mailgun's reason for a permanent failure that says the address is dead.
_MAILGUN_HINTS: Final[Mapping[str, BounceClass]] = {"suppress-bounce": "invalid-recipient"}


def resend_events(body: bytes, event_id: str, *, now_ms: int) -> Delivery:
    """A Resend delivery (one event; ``event_id``: its svix-id)."""
    doc = _object(_json(body))
    kind = _RESEND.get(_str(doc, "type"))
    if kind is None:
        return Delivery(ignored=1)
    data = _object(doc.get("data"))
    at = _iso_ms(_str(doc, "created_at")) or _iso_ms(_str(data, "created_at")) or now_ms
    tags = data.get("tags")
    job = ""
    if isinstance(tags, dict):
        job = _str(tags, "job_id")
    elif isinstance(tags, list):  # as they were sent: [{"name": ..., "value": ...}]
        job = next((_str(t, "value") for t in tags if _str(t, "name") == "job_id"), "")
    to = data.get("to")
    recipients = [to] if isinstance(to, str) else [t for t in to or () if isinstance(t, str)]
    detail, cls, hard = "", None, False
    if kind == "bounced":
        b = _object(data.get("bounce"))
        btype, sub, text = _str(b, "type"), _str(b, "subType"), _str(b, "message")
        hard = btype == "Permanent"
        cls, _ = _classify(hard=hard, text=text, hint=_SES_HINTS.get((btype, sub)))
        detail = _join(f"{btype} {sub}".strip(), text)
    elif kind == "delayed":
        cls, detail = "temporary", "delivery delayed"
    events = [
        _event("resend", event_id if len(recipients) == 1 else f"{event_id}:{i}", kind, job,
               rcpt, _str(data, "email_id"), at, detail, cls, hard)
        for i, rcpt in enumerate(recipients)
    ]  # fmt: skip
    return Delivery(events, ignored=0 if events else 1)


def sendgrid_events(body: bytes, *, now_ms: int) -> Delivery:
    """A SendGrid delivery: a JSON array of events."""
    doc = _json(body)
    if not isinstance(doc, list):
        raise MalformedDelivery("a SendGrid delivery is a JSON array of events")
    events: list[ProviderEvent] = []
    ignored = 0
    for ev in doc:
        mapped = _sendgrid_event(ev, now_ms) if isinstance(ev, dict) else None
        if mapped is None:
            ignored += 1
        else:
            events.append(mapped)
    return Delivery(events, ignored)


def _sendgrid_event(ev: dict[str, Any], now_ms: int) -> ProviderEvent | None:
    name, rcpt = _str(ev, "event"), _str(ev, "email")
    kind: ProviderEventType
    detail, cls, hard = "", None, False
    if name == "delivered":
        kind, detail = "delivered", _str(ev, "response")
    elif name == "bounce":
        # type "bounce": the server refused the recipient for good; "blocked": it refused
        # the message (reputation, content), the address may be fine.
        kind, hard = "bounced", _str(ev, "type") != "blocked"
        reason, status = _str(ev, "reason"), _str(ev, "status")
        hint = _SENDGRID_HINTS.get(_str(ev, "bounce_classification").lower())
        cls, _ = _classify(hard=hard, text=reason, status=status, hint=hint)
        detail = _join(status, reason)
    elif name == "dropped":  # never tried: SendGrid's own suppressions, invalid...
        reason = _str(ev, "reason")
        hint = "invalid-recipient" if reason.lower() in _SENDGRID_DEAD_DROPS else None
        kind, hard = "bounced", True
        cls, _ = _classify(hard=True, text=reason, hint=hint)
        detail = _join("dropped", reason)
    elif name == "deferred":
        kind, detail = "delayed", _str(ev, "response")
        cls, _ = _classify(hard=False, text=detail, hint="temporary")
    elif name == "spamreport":
        kind = "complained"
    else:
        return None
    if not rcpt:
        return None
    event_id = _str(ev, "sg_event_id") or _digest(
        f"{_str(ev, 'sg_message_id')}|{name}|{rcpt}|{ev.get('timestamp')}"
    )
    stamp = ev.get("timestamp")
    at = int(stamp * 1000) if isinstance(stamp, int | float) and stamp > 0 else now_ms
    # sg_message_id is the X-Message-Id the send got, and what SendGrid's filters added.
    mid = _str(ev, "sg_message_id").split(".filter", 1)[0]
    return _event("sendgrid", event_id, kind, _str(ev, "job_id"), rcpt, mid, at, detail, cls,
                  hard)  # fmt: skip


def postmark_events(body: bytes, *, now_ms: int) -> Delivery:
    """A Postmark delivery: one record (Delivery, Bounce, SpamComplaint; others ignored)."""
    doc = _object(_json(body))
    record, mid = _str(doc, "RecordType"), _str(doc, "MessageID")
    job = _str(_object(doc.get("Metadata")), "job_id")
    kind: ProviderEventType
    if record == "Delivery":
        rcpt = _str(doc, "Recipient")
        at = _iso_ms(_str(doc, "DeliveredAt")) or now_ms
        event = _event("postmark", f"delivery:{mid}:{rcpt.lower()}", "delivered", job, rcpt,
                       mid, at, _str(doc, "Details"), None, False)  # fmt: skip
        return Delivery([event]) if rcpt else Delivery(ignored=1)
    if record not in ("Bounce", "SpamComplaint"):
        return Delivery(ignored=1)
    known = _POSTMARK.get(_str(doc, "Type"))
    rcpt = _str(doc, "Email")
    if known is None or not rcpt:
        return Delivery(ignored=1)
    kind, hard, hint = known
    if record == "SpamComplaint":
        kind, hard, hint = "complained", False, None
    text = _str(doc, "Details") or _str(doc, "Description")
    cls = None
    if kind != "complained":
        cls, _ = _classify(hard=hard, text=text, hint=hint)
    at = _iso_ms(_str(doc, "BouncedAt")) or now_ms
    ident = doc.get("ID")
    event_id = f"{record.lower()}:{ident}" if isinstance(ident, int | str) and ident else (
        _digest(f"{record}|{mid}|{rcpt}|{at}")
    )  # fmt: skip
    event = _event("postmark", event_id, kind, job, rcpt, mid, at,
                   _join(_str(doc, "Type"), text), cls, hard)  # fmt: skip
    return Delivery([event])


def mailgun_events(doc: Any, *, now_ms: int) -> Delivery:
    """A Mailgun delivery (its signature checked already): one event-data object."""
    data = doc.get("event-data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise MalformedDelivery("a Mailgun delivery has an event-data object")
    name, severity = _str(data, "event"), _str(data, "severity")
    kind: ProviderEventType
    status = _object(data.get("delivery-status"))
    code = status.get("code")
    text = _join(str(code) if isinstance(code, int) else "",
                 _str(status, "message") or _str(status, "description"))  # fmt: skip
    enhanced = _str(status, "enhanced-code")
    detail, cls, hard = "", None, False
    if name == "delivered":
        kind, detail = "delivered", text
    elif name == "failed" and severity == "permanent":
        kind, hard = "bounced", True
        hint = _MAILGUN_HINTS.get(_str(data, "reason"))
        cls, _ = _classify(hard=True, text=text, status=enhanced, hint=hint)
        detail = _join(_str(data, "reason"), enhanced, text)
    elif name == "failed":
        kind, detail = "delayed", _join(enhanced, text)
        cls, _ = _classify(hard=False, text=text, status=enhanced, hint="temporary")
    elif name == "complained":
        kind = "complained"
    else:
        return Delivery(ignored=1)
    rcpt = _str(data, "recipient")
    if not rcpt:
        return Delivery(ignored=1)
    stamp = data.get("timestamp")
    at = int(stamp * 1000) if isinstance(stamp, int | float) and stamp > 0 else now_ms
    headers = _object(_object(data.get("message")).get("headers"))
    job = _str(_object(data.get("user-variables")), "job_id")
    event_id = _str(data, "id") or _digest(f"{name}|{rcpt}|{stamp}")
    event = _event("mailgun", event_id, kind, job, rcpt, _str(headers, "message-id"), at,
                   detail, cls, hard)  # fmt: skip
    return Delivery([event])


def ses_events(msg: SnsMessage, *, now_ms: int) -> Delivery:
    """The SES event in a verified SNS Notification: one ProviderEvent per recipient.

    Configuration-set event publishing names the kind ``eventType`` and carries the
    message's tags; identity notifications say ``notificationType`` and carry none (their
    events are unmatched: publish through a configuration set).
    """
    doc = _object(_json(msg.fields.get("Message", "").encode()))
    name = _str(doc, "eventType") or _str(doc, "notificationType")
    mail = _object(doc.get("mail"))
    tags = _object(mail.get("tags")).get("job_id")
    job = tags[0] if isinstance(tags, list) and tags and isinstance(tags[0], str) else ""
    mid = _str(mail, "messageId")
    rows: list[tuple[str, str, BounceClass | None, bool]] = []  # recipient, detail, class, hard
    kind: ProviderEventType
    if name == "Delivery":
        kind, part = "delivered", _object(doc.get("delivery"))
        smtp = _str(part, "smtpResponse")
        rows = [(r, smtp, None, False) for r in _strings(part.get("recipients"))]
    elif name == "Bounce":
        kind, part = "bounced", _object(doc.get("bounce"))
        btype, sub = _str(part, "bounceType"), _str(part, "bounceSubType")
        hard = btype == "Permanent"
        for r in _objects(part.get("bouncedRecipients")):
            diag, status = _str(r, "diagnosticCode"), _str(r, "status")
            cls, _ = _classify(hard=hard, text=diag, status=status,
                               hint=_SES_HINTS.get((btype, sub)))  # fmt: skip
            rows.append((_str(r, "emailAddress"), _join(f"{btype} {sub}".strip(), diag), cls,
                         hard))  # fmt: skip
    elif name == "Complaint":
        kind, part = "complained", _object(doc.get("complaint"))
        feedback = _str(part, "complaintFeedbackType")
        rows = [(_str(r, "emailAddress"), feedback, None, False)
                for r in _objects(part.get("complainedRecipients"))]  # fmt: skip
    elif name == "DeliveryDelay":
        kind, part = "delayed", _object(doc.get("deliveryDelay"))
        for r in _objects(part.get("delayedRecipients")):
            diag, status = _str(r, "diagnosticCode"), _str(r, "status")
            cls, _ = _classify(hard=False, text=diag, status=status, hint="temporary")
            rows.append((_str(r, "emailAddress"), _join(_str(part, "delayType"), diag), cls,
                         False))  # fmt: skip
    else:
        return Delivery(ignored=1)
    at = _iso_ms(_str(part, "timestamp")) or _iso_ms(_str(mail, "timestamp")) or now_ms
    events = [
        _event("ses", f"{msg.message_id}:{rcpt.lower()}", kind, job, rcpt, mid, at, detail, cls,
               hard)
        for rcpt, detail, cls, hard in rows if rcpt
    ]  # fmt: skip
    return Delivery(events, ignored=0 if events else 1)


# -- helpers -------------------------------------------------------------------------------


def _classify(
    *, hard: bool, text: str, status: str = "", hint: BounceClass | None = None
) -> tuple[BounceClass, bool]:
    """(class, the address is dead) of what a provider reported: engine.bounce over its
    diagnostic, with the provider's own word on permanence; ``hint`` (the provider's
    category) where the diagnostic names no plainer class."""
    text = text[:MAX_TEXT_CHARS]
    m = _REPLY_CODE.match(text.strip())
    code = int(m.group(1)) if m else 0
    if not code or (code >= 500) != hard:
        code = 550 if hard else 450
    enhanced = status if _ENHANCED.fullmatch(status.strip()) else None
    cls = classify(code, enhanced, text).cls
    if hint is not None and cls in ("unknown", "temporary"):
        cls = hint
    return cls, hard and cls == "invalid-recipient"


def _event(
    provider: str,
    event_id: str,
    kind: ProviderEventType,
    job: str,
    rcpt: str,
    message_id: str,
    at_ms: int,
    detail: str,
    cls: BounceClass | None,
    hard: bool,
) -> ProviderEvent:
    recipient = bare_address(rcpt.strip())[:254]
    detail = detail[:MAX_DETAIL_CHARS]
    reason = ""
    if kind == "complained":
        reason = _join(f"{provider} spam complaint", detail)[:200]
    elif kind == "bounced" and hard and cls == "invalid-recipient":
        reason = _join(f"{provider} hard bounce", detail)[:200]
    return ProviderEvent(
        provider, _key(event_id), kind, job if is_id(job) else "", recipient,
        message_id[:200], at_ms, detail, cls if kind in ("bounced", "delayed") else None,
        hard and kind == "bounced", reason,
    )  # fmt: skip


def _key(event_id: str) -> str:
    """An event id as it may name a key: itself when short and plain, else its digest."""
    if len(event_id) <= _MAX_ID_CHARS and _ID_CHARS.fullmatch(event_id):
        return event_id
    return _digest(event_id)


def _digest(text: str) -> str:
    return "h-" + hashlib.sha256(text.encode()).hexdigest()[:40]


def _join(*parts: str) -> str:
    return ": ".join(p for p in parts if p)


def _json(body: bytes) -> Any:
    try:
        return _decode_json(body)
    except msgspec.DecodeError as exc:
        raise MalformedDelivery(f"not JSON: {exc}") from None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _objects(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _strings(value: Any) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _str(doc: Any, key: str) -> str:
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else ""


def _iso_ms(text: str) -> int:
    """ms since the epoch of an ISO 8601 time (UTC when it names no zone); 0: none."""
    if not text or len(text) > 64:
        return 0
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return 0
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)
