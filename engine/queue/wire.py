"""The job's wire format: how a message becomes a stored job, a job record an API view,
and a stream entry events. Callers never build stored jobs or parse entries themselves.

Imports the leaves and the queue's own dataclasses; never Redis.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

import msgspec

from engine.attachments import BlobIndex
from engine.models import (
    DEFAULT_TENANT,
    Event,
    JobView,
    MessageIn,
    ms_to_iso,
    normalize,
    recipient_domains,
    route,
)
from engine.queue.jobs import JobRecord, NewJob
from engine.unsubscribe import ALL, list_name

# Joins a message's tags in its job record and events: tags hold no CR or LF (validated
# in engine.models), so a newline never splits one.
TAG_SEPARATOR: Final = "\n"
# Separates the jobs' tags in an enqueue entry that announces many jobs (enqueue.lua).
_JOB_TAGS_SEPARATOR: Final = "\r"
_EVENT_ID_RE: Final = re.compile(r"^(\d{1,20})-(\d{1,20})(?:\.(\d{1,6}))?$")

encode_message = msgspec.msgpack.Encoder().encode


def new_job(
    incoming: MessageIn,
    job_id: str,
    *,
    default_from: str,
    now_ms: int,
    default_tenant: str = DEFAULT_TENANT,
    blobs: BlobIndex | None = None,
) -> NewJob:
    """Validate a decoded request and build the job that stores it.

    ``blobs``: the attachments the request may use and gives (without it, a message
    with attachments is refused). Raises ``engine.errors.ValidationError`` naming the
    offending field.
    """
    routing = route(incoming, now_ms=now_ms, default_tenant=default_tenant)
    message = normalize(incoming, default_from=default_from, blobs=blobs)
    # Checked against the tenant's suppression list -- and, for a message of a list
    # ("unsubscribe": "<list>"), that list's own (enqueue.lua: "<list>\n" in front).
    recipients = ",".join(message.envelope_recipients())
    unsubscribe = incoming.unsubscribe
    if unsubscribe not in (None, False, True):
        scope = list_name(unsubscribe or False)
        if scope != ALL:
            recipients = f"{scope}\n{recipients}"
    return NewJob(
        job_id, encode_message(message), routing.lane, routing.tenant,
        recipient_domains(message), routing.due_ms, TAG_SEPARATOR.join(message.tags),
        recipients, expires_ms=routing.expires_ms,
    )  # fmt: skip


def job_view(rec: JobRecord) -> JobView:
    """A job record as the API shows it (GET /v1/messages/{id}, GET /v1/dead)."""
    next_attempt_at = None
    if rec.state in ("retrying", "scheduled") and rec.next_attempt_at_ms:
        next_attempt_at = ms_to_iso(rec.next_attempt_at_ms)
    return JobView(
        rec.id, rec.state, rec.attempts, ms_to_iso(rec.created_at_ms),
        ms_to_iso(rec.updated_at_ms), rec.last_error, next_attempt_at, rec.lane, rec.tenant,
        rec.bounce, expires_at=ms_to_iso(rec.expires_at_ms) if rec.expires_at_ms else None,
        transport=rec.transport, provider_id=rec.provider_id, provider_state=rec.provider_state,
    )  # fmt: skip


# -- events ---------------------------------------------------------------------------


def parse_event_id(text: str) -> tuple[str, int]:
    """``"1718000000000-0"`` -> (entry id, -1); ``"1718000000000-0.7"`` -> (entry id, 7).

    Raises ValueError for anything else.
    """
    m = _EVENT_ID_RE.match(text)
    if m is None:
        raise ValueError(f"not an event id: {text!r} (ids look like 1718000000000-0 or ...-0.3)")
    entry = f"{int(m.group(1))}-{int(m.group(2))}"
    return entry, int(m.group(3)) if m.group(3) is not None else -1


def event_order(event_id: str) -> tuple[int, int, int]:
    """Sort key of an event id: events compare in stream order. A bare entry id sorts
    after every numbered event of that entry (it stands for the whole entry)."""
    entry, index = parse_event_id(event_id)
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq), index if index >= 0 else 1 << 30


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


_PLAIN_NAMES: Final = (b"type", b"id", b"at", b"attempt", b"state")


def parse_flat_entry(entry_id: str, flat: Sequence[bytes]) -> list[Event]:
    """``parse_entry`` of an entry as RESP lists it, ``[field, value, ...]``: the plain
    lifecycle entry (lib_event's five fields, in its order) without building a dict."""
    if len(flat) == 10 and tuple(flat[0::2]) == _PLAIN_NAMES:
        kind = flat[1].decode()
        state = kind if flat[9] == flat[1] else flat[9].decode()
        return [Event(entry_id, kind, flat[3].decode(), int(flat[5]), int(flat[7]), state)]
    it = iter(flat)
    return parse_entry(entry_id, dict(zip(it, it, strict=False)))


def parse_entry(entry_id: str, fields: Mapping[bytes, bytes]) -> list[Event]:
    """The events of one stream entry (several for an enqueue entry with ``ids``)."""
    # Every webhook delivery and websocket frame starts here, ~3 entries a message: the
    # optional fields are looked up once each and the state is the type unless it differs.
    get = fields.get
    raw_kind = fields[b"type"]
    kind = raw_kind.decode()
    at = int(fields[b"at"])
    attempt = int(get(b"attempt") or 0)
    raw_state = get(b"state")
    state = kind if raw_state is None or raw_state == raw_kind else raw_state.decode()
    raw = get(b"tenant")
    tenant = raw.decode() if raw else DEFAULT_TENANT
    raw = get(b"error")
    error = raw.decode() if raw is not None else None
    raw = get(b"tags")
    tags = raw.decode() if raw is not None else None
    single = get(b"id")
    if single is not None:
        if len(fields) == 5 and raw_state is not None and b"attempt" in fields:
            # type, id, at, attempt and state only: most entries
            return [Event(entry_id, kind, single.decode(), at, attempt, state)]
        split = tags.split(TAG_SEPARATOR) if tags else []
        bounce = _text(get(b"bounce"))  # retrying and failed entries
        dropped = get(b"rcpts")  # suppressed entries: the recipients dropped
        return [
            Event(
                entry_id,
                kind,
                single.decode(),
                at,
                attempt,
                state,
                tenant,
                error,
                split,
                bounce,
                dropped.decode().split(",") if dropped else [],
            )
        ]
    ids = fields[b"ids"].decode().split(",")
    per_job = tags.split(_JOB_TAGS_SEPARATOR) if tags else []
    return [
        Event(
            f"{entry_id}.{i}", kind, job_id, at, attempt, state, tenant, error,
            per_job[i].split(TAG_SEPARATOR) if i < len(per_job) and per_job[i] else [],
        )
        for i, job_id in enumerate(ids)
    ]  # fmt: skip
