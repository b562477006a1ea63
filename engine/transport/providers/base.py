"""What every provider shares, all of it pure: the ``Provider`` protocol (a mail to a
request, an answer to a message id or an error text), how answers and failures become
outcomes, and the pieces the JSON bodies are built from. No I/O; imports only leaves
and the transport's own base and HTTP client."""

from __future__ import annotations

import binascii
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Final, Protocol

import msgspec

from engine.attachments import AttachmentRef
from engine.errors import (
    DeliveryUncertain,
    PermanentFailure,
    TemporaryFailure,
    TransportError,
    TransportUnavailable,
)
from engine.models import Message, bare_address, split_address
from engine.transport.base import OutgoingMail, SendResult
from engine.transport.http1 import HttpFailure, Response

MAX_ERROR_CHARS: Final = 300  # of a provider's error text kept in the outcome
MAX_RETRY_AFTER_S: Final = 24 * 3600.0  # a longer Retry-After is read as this
AUTH_STATUSES: Final = frozenset({401, 403})
# 408 (the server gave up waiting for our request) and 425 are worth retrying too.
_TEMPORARY_4XX: Final = frozenset({408, 425, 429})
_TOKEN_BAD: Final = re.compile(r"[^A-Za-z0-9_-]")
encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One API request: ``path`` after the API base, ``headers`` as CRLF lines
    (``http1.header_lines``; Host and Content-Length are the client's)."""

    method: bytes
    path: bytes
    headers: bytes
    body: bytes


class Provider(Protocol):
    """One provider's API: pure translations between mails and its requests and answers."""

    @property
    def name(self) -> str: ...

    @property
    def idempotent(self) -> bool:
        """A retry of the same job cannot send it twice (Resend: the job id is the
        Idempotency-Key), so a request without an answer may simply be retried."""
        ...

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings never to show (in an outcome's text or a log line)."""
        ...

    def request(self, mail: OutgoingMail) -> ProviderRequest | PermanentFailure:
        """The request that sends ``mail``, or why it cannot be sent this way."""
        ...

    def message_id(self, response: Response) -> str:
        """The provider's id of the message an accepting answer is about ("" if none)."""
        ...

    def error_text(self, response: Response) -> str:
        """What a refusing answer says, in the provider's words."""
        ...


# -- answers and failures to outcomes ---------------------------------------------------


def outcome_of(provider: Provider, response: Response) -> SendResult | TransportError:
    """A provider's answer as the sender takes it: 2xx accepted (code 250); 429, 408 and
    5xx temporary (with Retry-After); any other status permanent (401/403: the key).
    A refusal carries the status as ``http_status`` (its ``code`` is for SMTP replies)."""
    status = response.status
    name = provider.name
    if 200 <= status < 300:
        try:
            pid = provider.message_id(response)
        except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
            pid = ""  # accepted all the same: the status says so
        return SendResult(250, f"{name} accepted {pid or '(no id)'}", provider_id=pid)
    try:
        said = provider.error_text(response)
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
        said = ""
    said = redact(said or body_text(response), provider.secrets)
    text = f"{name}: {status} {said}".rstrip()
    failure: TransportError
    if status >= 500 or status in _TEMPORARY_4XX:
        failure = TemporaryFailure(text, retry_after_s=retry_after_s(response))
    elif status in AUTH_STATUSES:
        failure = PermanentFailure(f"{text} (is the API key right?)")
    elif 400 <= status < 500:
        failure = PermanentFailure(text)
    else:  # 1xx or 3xx as a final answer: a wrong api_base (redirects are not followed)
        failure = TemporaryFailure(f"{text} (unexpected status: check the API base)")
    # An HTTP status, not an SMTP code: engine.bounce classifies it as one (an HTTP 503
    # is a busy provider, an SMTP 503 a refused command).
    failure.http_status = status
    return failure


def failure_outcome(provider: Provider, failure: HttpFailure) -> TransportError:
    """A request that got no answer: no connection is TransportUnavailable; lost before
    the whole request was written, temporary; written but unanswered, DeliveryUncertain
    -- or temporary for an idempotent provider, whose retry cannot send it twice."""
    text = f"{provider.name}: {redact(str(failure), provider.secrets)}"
    if failure.stage == "connect":
        return TransportUnavailable(text)
    if failure.stage == "send":
        return TemporaryFailure(f"{text} (not sent)")
    if provider.idempotent:
        return TemporaryFailure(f"{text} (may have been taken; a retry is safe: same key)")
    return DeliveryUncertain(f"{text} (delivery uncertain: the whole request was sent)")


def retry_after_s(response: Response, *, now: float | None = None) -> float | None:
    """Seconds the answer asks us to wait: Retry-After (seconds or an HTTP date), else
    RateLimit-Reset (seconds; Resend) or X-RateLimit-Reset (a Unix time; SendGrid)."""
    value = response.header(b"retry-after")
    if value is not None:
        text = value.decode("latin-1").strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                when = parsedate_to_datetime(text).timestamp()
            except (TypeError, ValueError, IndexError):
                return None
            seconds = when - (time.time() if now is None else now)
        return _bounded(seconds)
    for name in (b"ratelimit-reset", b"x-ratelimit-reset"):
        value = response.header(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            return None
        if seconds > 1e9:  # a Unix time
            seconds -= time.time() if now is None else now
        return _bounded(seconds)
    return None


def _bounded(seconds: float) -> float | None:
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def body_text(response: Response) -> str:
    return response.body[:MAX_ERROR_CHARS].decode("utf-8", "replace").strip()


def json_of(response: Response) -> Any:
    return _decode_json(response.body)


def clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# -- building requests ------------------------------------------------------------------


def message_of(mail: OutgoingMail, provider: str) -> Message | PermanentFailure:
    if mail.message is None:
        return PermanentFailure(f"{provider}: the mail was not composed from a message")
    return mail.message


def recipients_of(mail: OutgoingMail, msg: Message) -> tuple[list[str], list[str], list[str]]:
    """``msg``'s To, Cc and Bcc that are still owed the mail (``mail.recipients``: a
    retry after a partial delivery, or with suppressed addresses left out), each address
    once. APIs that need a To get the first group that is left as To."""
    owed = set(mail.recipients)
    seen: set[str] = set()
    groups: tuple[list[str], list[str], list[str]] = ([], [], [])
    for addresses, into in zip((msg.to, msg.cc, msg.bcc), groups, strict=True):
        for address in addresses:
            bare = bare_address(address)
            if bare in owed and bare.lower() not in seen:
                seen.add(bare.lower())
                into.append(address)
    to, cc, bcc = groups
    if not to and cc:
        return cc, [], bcc
    if not to and len(bcc) == 1:  # alone, the one Bcc recipient sees only itself
        return bcc, [], []
    return to, cc, bcc


def named(address: str) -> tuple[str, str]:
    """``(display name, bare address)``; the name without its quotes, "" if none."""
    name, bare = split_address(address)
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = re.sub(r"\\(.)", r"\1", name[1:-1])
    return name, bare


_SPECIALS: Final = frozenset('()<>[]:;@\\,."')


def mailbox(address: str) -> str:
    """``Name <a@b.c>`` with the name quoted when it needs it (a comma would otherwise
    split a comma-separated list), or the bare address."""
    name, bare = named(address)
    if not name:
        return bare
    if _SPECIALS.intersection(name):
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}" <{bare}>'
    return f"{name} <{bare}>"


def token(text: str) -> str:
    """``text`` as a tag name or value that Resend and SES take: ASCII letters,
    digits, ``_`` and ``-`` (anything else becomes ``_``)."""
    return _TOKEN_BAD.sub("_", text)[:256] or "_"


def tag_pairs(job_id: str, tags: Sequence[str], *, name: str, value: str) -> list[dict[str, str]]:
    """The job id, then each tag as ``{name: token(tag), value: "true"}`` (the keys
    named ``name`` and ``value``): key-value tags from the engine's plain ones."""
    pairs = [{name: "job_id", value: token(job_id)}]
    seen = {"job_id"}
    for tag in tags:
        key = token(tag)
        if key not in seen:
            seen.add(key)
            pairs.append({name: key, value: "true"})
    return pairs


def attachment_content(
    ref: AttachmentRef, parts: Mapping[bytes, bytes] | None, provider: str
) -> msgspec.Raw | PermanentFailure:
    """An attachment's bytes as a JSON string of base64 without line breaks, from its
    part body (already base64: only the CRLFs go)."""
    body = None if parts is None else parts.get(ref.sha256)
    if body is None:
        return PermanentFailure(
            f"{provider}: attachment-missing: {ref.filename!r} (sha256 {ref.sha256.hex()})"
        )
    return msgspec.Raw(b'"' + body.replace(b"\r\n", b"") + b'"')


def b64_json(data: bytes) -> msgspec.Raw:
    """``data`` as a JSON string of base64 (no line breaks)."""
    return msgspec.Raw(b'"' + binascii.b2a_base64(data, newline=False) + b'"')
