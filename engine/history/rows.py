"""Pure decisions of the history writer: a read's stream entries -> the rows one
transaction writes (an event row each, one message row per message with its latest
state, search terms and metadata for messages whose record was read). No I/O.

A message's row is merged in SQL with what is already there by stream position (``ev_ms``,
``ev_seq``): the latest event's state wins whichever writer commits first, so replicas
writing different entries of one message, or an entry written twice, end the same.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec

from engine.ids import id_time_ms, is_id
from engine.models import Event, Message, bare_address
from engine.queue import StoredJob, parse_event_id

# Events that announce a job (its first event, written by enqueue): its record is read
# then for what the events do not carry (From, recipients, subject, metadata).
ANNOUNCE: Final = frozenset({"queued", "scheduled", "suppressed"})
# A provider's report of a job it took: its record holds the provider's message id.
PROVIDER: Final = frozenset({"delivered", "bounced", "complained", "delayed"})
# Joins recipients (bare addresses hold no comma) and tags (no CR or LF) into one text
# each, which SQL splits back (string_to_array): unnest() cannot take arrays of arrays.
RCPT_SEP: Final = ","
TAG_SEP: Final = "\n"
_DAY_MS: Final = 86_400_000
_EPOCH_DAY: Final = dt.date(1970, 1, 1)
_encode_json = msgspec.json.Encoder().encode


def position(event_id: str) -> tuple[int, int]:
    """An event's place in the stream as (ms, seq * 1024 + n): later events compare
    greater (``n``: the job's place in an enqueue entry, below 1024)."""
    # String methods, not parse_event_id's regex: this runs for every event written.
    ms, _, rest = event_id.partition("-")
    seq, _, index = rest.partition(".")
    if not (ms.isdigit() and seq.isdigit() and (not index or index.isdigit())):
        parse_event_id(event_id)  # raises ValueError naming it
    return int(ms), int(seq) * 1024 + (int(index) if index else 0)


def day_of(ms: int) -> dt.date:
    """The UTC day of a time in ms: the partition a message's rows go to."""
    return _EPOCH_DAY + dt.timedelta(days=ms // _DAY_MS)


@dataclass(slots=True)
class MessageRow:
    """One message's part of a batch: its latest state as its events in the batch say."""

    id: str
    created_ms: int
    tenant: str
    state: str
    attempts: int
    updated_ms: int
    ev_ms: int
    ev_seq: int
    tags: list[str]
    sent_ms: int | None = None
    last_error: str | None = None
    bounce: str | None = None
    provider_state: str | None = None
    read_record: bool = False  # an announce or provider event: its record is read
    read_provider_id: bool = False  # sent: its transport may have been given an id


@dataclass(slots=True)
class Plan:
    """What a read holds, by message, before records are read."""

    messages: dict[str, MessageRow] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)  # one per event id, stream order
    malformed: int = 0  # events whose job id has no time in it (never made by the engine)

    def record_ids(self) -> list[str]:
        return [m.id for m in self.messages.values() if m.read_record]

    def provider_ids(self) -> list[str]:
        """Messages sent in this batch whose whole record is not read anyway."""
        return [m.id for m in self.messages.values() if m.read_provider_id and not m.read_record]

    def days(self) -> set[dt.date]:
        return {day_of(m.created_ms) for m in self.messages.values()}


def plan(entries: Iterable[tuple[str, Sequence[Event]]]) -> Plan:
    """Merge a read's events by message (latest by stream position wins the state)."""
    out = Plan()
    seen: set[str] = set()
    ordered: list[tuple[tuple[int, int], Event]] = []
    in_order = True  # one read's entries come in stream order: no sort needed
    last = (0, 0)
    for _, events in entries:
        for event in events:
            if event.event_id in seen:
                continue
            seen.add(event.event_id)
            if len(event.id) != 32 or not is_id(event.id):
                out.malformed += 1
                continue
            at = position(event.event_id)
            in_order = in_order and at > last
            last = at
            ordered.append((at, event))
    if not in_order:
        ordered.sort(key=lambda pe: pe[0])
    for (ms, seq), event in ordered:
        out.events.append(event)
        row = out.messages.get(event.id)
        if row is None:
            row = out.messages[event.id] = MessageRow(
                event.id, id_time_ms(event.id), event.tenant, event.state, event.attempt,
                event.at, ms, seq, list(event.tags),
            )  # fmt: skip
        else:
            row.state, row.ev_ms, row.ev_seq = event.state, ms, seq
            row.attempts = max(row.attempts, event.attempt)
            row.updated_ms = max(row.updated_ms, event.at)
            if event.tags and not row.tags:
                row.tags = list(event.tags)
        if event.error is not None:
            row.last_error = event.error
        if event.bounce is not None:
            row.bounce = event.bounce
        if event.type == "sent":
            row.sent_ms = event.at
            row.read_provider_id = True
        if event.type in PROVIDER:
            row.provider_state = event.type
            row.read_record = True
        elif event.type in ANNOUNCE:
            row.read_record = True
    return out


@dataclass(slots=True)
class Batch:
    """One transaction's rows as COPY text (tab-separated lines, ``\\N`` for NULL): COPY
    into temporary tables, then one INSERT ... ON CONFLICT each (sql.py). Text, not
    parameter arrays: psycopg dumps list parameters element by element in Python, which
    was a third of the writer's CPU (py-spy); a line here is one f-string."""

    events: str
    messages: str
    terms: str
    bodies: str
    days: list[dt.date]
    counts: tuple[int, int]  # (events, messages) in it
    dropped: int = 0  # events of messages older than the retention (their day is gone)


# COPY's text format: backslash, tab, newline and carriage return are escaped in a value.
_COPY_ESCAPES: Final = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
NULL: Final = "\\N"


def _t(value: str | None) -> str:
    """A free-text value for COPY (NULL for None)."""
    return NULL if value is None else value.translate(_COPY_ESCAPES)


def _n(value: int | None) -> str:
    return NULL if value is None else str(value)


def _metadata(message: Message, lane: str | None, deadline_ms: int) -> bytes:
    meta: dict[str, object] = {"to": message.to}
    if message.cc:
        meta["cc"] = message.cc
    if message.bcc:
        meta["bcc"] = message.bcc
    if message.reply_to:
        meta["reply_to"] = message.reply_to
    if message.headers:
        meta["headers"] = dict(message.headers)
    meta["priority"] = lane or "normal"
    if message.attachments:
        meta["attachments"] = [
            {"filename": a.filename, "content_type": a.content_type, "size": a.size}
            for a in message.attachments
        ]
    if message.sandbox:
        meta["sandbox"] = True
    if deadline_ms:
        meta["expires_at_ms"] = deadline_ms
    return _encode_json(meta)


def _idem(note: str | None) -> tuple[str | None, str | None, int | None, int | None]:
    """'<fingerprint>|<position>|<count>|<key>' -> (key, fingerprint, position, count)."""
    if not note:
        return None, None, None, None
    parts = note.split("|", 3)
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return None, None, None, None
    return parts[3], parts[0], int(parts[1]), int(parts[2])


def build(
    p: Plan,
    records: dict[str, StoredJob],
    *,
    oldest_day: dt.date,
    keep_bodies: bool,
) -> Batch:
    """The rows of a plan, with the records read for it (``records``: job id -> record).
    Messages made before ``oldest_day`` (their partitions were dropped) are left out.
    Values the engine made (ids, types, states, tenants, bare addresses) need no escape;
    free text (subjects, errors, From, tags, metadata) does."""
    msgs: list[str] = []
    terms: list[str] = []
    bodies: list[str] = []
    kept: set[str] = set()
    days: set[dt.date] = set()
    for row in sorted(p.messages.values(), key=lambda r: r.id):  # one lock order
        day = day_of(row.created_ms)
        if day < oldest_day:
            continue
        kept.add(row.id)
        days.add(day)
        rec = records.get(row.id)
        message, deadline_ms = rec.decoded() if rec is not None else (None, 0)
        key, fp, pos, n = _idem(rec.idem if rec is not None else None)
        tags = row.tags or (list(message.tags) if message is not None else [])
        sender = recipients = subject = metadata = NULL
        if message is not None:
            sender, subject = _t(message.sender), _t(message.subject)
            rcpts = message.envelope_recipients()
            recipients = RCPT_SEP.join(rcpts)
            metadata = _t(_metadata(message, rec.lane if rec else None, deadline_ms).decode())
            found = [f"to:{a.lower()}" for a in rcpts]
            found.append(f"from:{bare_address(message.sender).lower()}")
            found += [f"tag:{t}" for t in tags]
            for term in dict.fromkeys(found):
                terms.append(f"{_t(term)}\t{row.id}\t{row.created_ms}\t{row.tenant}\n")
            if keep_bodies:
                bodies.append(
                    f"{row.id}\t{row.created_ms}\t{_t(message.text)}\t{_t(message.html)}\n"
                )
        provider_id = rec.provider_message_id if rec else None
        msgs.append(
            f"{row.id}\t{row.created_ms}\t{row.tenant}\t{sender}\t{recipients or NULL}\t"
            f"{subject}\t{_t(TAG_SEP.join(tags))}\t{metadata}\t{row.state}\t{row.attempts}\t"
            f"{row.updated_ms}\t{_n(row.sent_ms)}\t{_t(row.last_error)}\t{_t(row.bounce)}\t"
            f"{_t(row.provider_state)}\t{_t(provider_id)}\t{_t(key)}\t{_t(fp)}\t{_n(pos)}\t"
            f"{_n(n)}\t{row.ev_ms}\t{row.ev_seq}\n"
        )
    events: list[str] = []
    for e in p.events:
        if e.id not in kept:
            continue
        rcpts_text = RCPT_SEP.join(e.recipients) if e.recipients else NULL
        events.append(
            f"{e.id}\t{id_time_ms(e.id)}\t{e.event_id}\t{e.at}\t{e.type}\t{e.state}\t"
            f"{e.attempt}\t{e.tenant}\t{_t(e.error)}\t{_t(e.bounce)}\t{rcpts_text}\n"
        )
    return Batch(
        "".join(events), "".join(msgs), "".join(terms), "".join(bodies), sorted(days),
        (len(events), len(msgs)), len(p.events) - len(events),
    )  # fmt: skip


def oldest_kept_day(now_ms: int, retention_days: int) -> dt.date:
    """The first day still kept: ``retention_days`` days back from today (UTC)."""
    return day_of(now_ms - (retention_days - 1) * _DAY_MS)
