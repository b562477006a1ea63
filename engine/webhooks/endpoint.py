"""Webhook endpoints and what they are sent: the endpoint record, which events it wants,
the JSON body of one event, and the Standard Webhooks signature. Pure: no I/O.

Signatures follow the Standard Webhooks specification: the secret is ``whsec_`` + base64
of 32 random bytes; ``webhook-signature`` is ``v1,`` + base64(HMAC-SHA256(secret bytes,
"<webhook-id>.<webhook-timestamp>.<body>")); ``webhook-id`` is the event id (receivers
deduplicate on it), ``webhook-timestamp`` the sending time in seconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Final

import msgspec

from engine.models import DEFAULT_TENANT, Event, ms_to_iso

SECRET_PREFIX: Final = "whsec_"
# Events per request at most (an endpoint's batch_max), and bytes per batched request: a
# receiver of every event gets up to this many a POST (SendGrid's own event webhook posts
# arrays of up to ~768 KB). A POST costs ~0.3-0.5 ms of CPU here, nearly all of it the
# kernel's, whatever its size (measured), so a busy receiver is best served in large batches.
MAX_BATCH: Final = 1000
MAX_BATCH_BYTES: Final = 1024 * 1024
EVENT_TYPES: Final = (
    "queued", "scheduled", "processing", "sent", "retrying", "failed", "cancelled", "deleted",
    "suppressed", "expired", "delivered", "bounced", "complained", "delayed",
)  # fmt: skip


class Endpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An endpoint as stored (the secret too: it signs every delivery)."""

    id: str
    tenant: str
    url: str
    secret: str
    created_at: str
    events: list[str] = []  # event types it wants; []: all
    tags: list[str] = []  # events of messages with one of these tags; []: any
    description: str = ""
    enabled: bool = True
    disabled_reason: str = ""  # why it was disabled (by the engine or by a PATCH)
    # Seconds a delivery is retried before it is given up and the endpoint disabled.
    retry_window_s: float = 86_400.0
    # Events per request: 1 posts each event alone; more posts a JSON array of up to
    # that many (its webhook-id names the batch: deduplicate on each event's event_id).
    batch_max: int = 1

    def wants(self, e: Event, all_tenants: bool = False) -> bool:
        return (
            self.enabled
            and (all_tenants or e.tenant == self.tenant)
            and (not self.events or e.type in self.events)
            and (not self.tags or any(t in self.tags for t in e.tags))
        )


class Payload(msgspec.Struct):
    """The body of one delivery (Standard Webhooks shape: type, timestamp, data)."""

    type: str  # "message.sent", "message.failed", ...
    timestamp: str
    data: Event


_encode = msgspec.json.Encoder().encode
# Type, state, job id and event id of an event whose JSON needs no escaping.
_PLAIN: Final = re.compile(r"[a-z]+ [a-z]+ [0-9A-Za-z]+ [0-9]+-[0-9]+(?:\.[0-9]+)?")


def payload(e: Event) -> bytes:
    if (
        e.tenant == DEFAULT_TENANT and e.error is None and not e.tags and e.bounce is None
        and not e.recipients and _PLAIN.fullmatch(f"{e.type} {e.state} {e.id} {e.event_id}")
    ):  # fmt: skip
        # Most events (two of a message's three): formatted, the same bytes as msgspec
        # makes (a test holds them equal), at a third of the CPU. The match vouches that
        # nothing needs escaping.
        return (
            f'{{"type":"message.{e.type}","timestamp":"{ms_to_iso(e.at)}","data":'
            f'{{"event_id":"{e.event_id}","type":"{e.type}","id":"{e.id}","at":{e.at},'
            f'"attempt":{e.attempt},"state":"{e.state}"}}}}'
        ).encode()
    return _encode(Payload(f"message.{e.type}", ms_to_iso(e.at), e))


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """The ``webhook-signature`` header value."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp_s}.".encode() + body
    mac = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()
