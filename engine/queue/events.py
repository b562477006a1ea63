"""The lifecycle event stream: read live (XREAD), by range (XRANGE), or per job (history).

Entries become ``engine.models.Event``s through ``engine.queue.wire`` (an enqueue entry
that announces many jobs becomes one event per job, numbered ``<entry id>.<n>``); the hub
in ``engine.api`` fans them out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final, cast

from coredis.response.types import StreamEntry

from engine.ids import is_id
from engine.keys import Keys
from engine.models import Event
from engine.queue.redis import Redis, translate_errors
from engine.queue.wire import parse_entry, parse_event_id

log = logging.getLogger(__name__)

# States after which a job has no further events until an operator acts on it.
_SETTLED: Final = frozenset({b"sent", b"failed", b"cancelled"})
# Job ids carry their creation time; the stream ids use the Redis server's clock. A
# history scan starts this much before the id's time to allow for skewed clocks.
_CLOCK_SKEW_MS: Final = 60_000
_PAGE: Final = 1000


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events read in one round trip, oldest first."""

    events: list[Event]
    # Stream id of the last entry read (pass it on to continue after it); None: no entry.
    last: str | None
    entries: int = 0  # stream entries read (an enqueue entry holds many events)


@dataclass(frozen=True, slots=True)
class JobHistory:
    events: list[Event]  # oldest first
    complete: bool  # False: the scan stopped at its bound before the stream's end
    exists: bool  # the job's record exists (it may have expired; its events may remain)


def _id(entry: StreamEntry) -> str:
    raw = entry.identifier
    return raw.decode() if isinstance(raw, bytes) else raw


def _fields(entry: StreamEntry) -> Mapping[bytes, bytes]:
    return cast(Mapping[bytes, bytes], entry.field_values)  # the client decodes nothing


def _parse_all(entries: Iterable[StreamEntry]) -> list[Event]:
    out: list[Event] = []
    for entry in entries:
        try:
            out += parse_entry(_id(entry), _fields(entry))
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            log.warning("events.entry.malformed id=%s error=%r", _id(entry), exc)
    return out


class EventLog:
    """The event stream of one queue shard (written by the Lua scripts, read here)."""

    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    async def last_id(self) -> str:
        """Id of the newest entry ("0-0" when the stream is empty): where a live tail starts."""
        with translate_errors():
            newest = await self.client.xrevrange(self.keys.events, "+", "-", count=1)
        return _id(newest[0]) if newest else "0-0"

    async def first_id(self) -> str | None:
        """Id of the oldest entry the stream still holds (None when empty)."""
        with translate_errors():
            oldest = await self.client.xrange(self.keys.events, "-", "+", count=1)
        return _id(oldest[0]) if oldest else None

    async def tail(self, after: str, *, block_s: float, count: int = _PAGE) -> EventPage:
        """Entries after the entry id ``after``, waiting up to ``block_s`` for the first
        (XREAD BLOCK; cancellable: a cancelled read drops its connection)."""
        with translate_errors():
            reply = await self.client.xread(
                {self.keys.events: after}, count=count, block=max(1, int(block_s * 1000))
            )
        if not reply:
            return EventPage([], None)
        entries = next(iter(reply.values()))
        if not entries:
            return EventPage([], None)
        return EventPage(_parse_all(entries), _id(entries[-1]), len(entries))

    async def range(self, since: str = "", *, until: str = "+", limit: int = _PAGE) -> EventPage:
        """Events after the event id ``since`` ('' = from the oldest kept) up to the entry
        id ``until`` (inclusive), reading at most ``limit`` entries (XRANGE).

        Continue with ``since=page.last``. Raises ValueError for a malformed ``since``.
        """
        skip_entry, skip_to = "", -1
        if not since:
            start = "-"
        else:
            entry, index = parse_event_id(since)
            if index < 0:
                start = "(" + entry
            else:
                start, skip_entry, skip_to = entry, entry, index
        with translate_errors():
            entries = await self.client.xrange(self.keys.events, start, until, count=limit)
        if not entries:
            return EventPage([], None)
        events = _parse_all(entries)
        if skip_entry:
            prefix = skip_entry + "."
            events = [
                e
                for e in events
                if not (
                    e.event_id == skip_entry
                    or (e.event_id.startswith(prefix) and int(e.event_id[len(prefix) :]) <= skip_to)
                )
            ]
        return EventPage(events, _id(entries[-1]), len(entries))

    async def history(self, job_id: str, *, max_entries: int = 50_000) -> JobHistory:
        """The job's events that the stream still holds.

        The stream has no index by job: this scans it, from shortly before the job's
        creation (its id carries the time) to its last update once it has settled, at
        most ``max_entries`` entries, parsing only the entries that name the job. Events
        older than the stream's retention (queue.events_maxlen) are gone.
        """
        start = "-"
        if is_id(job_id):
            start = f"{max(0, int(job_id[:12], 16) - _CLOCK_SKEW_MS)}-0"
        end = "+"
        with translate_errors():
            state, updated = await self.client.hmget(self.keys.job(job_id), ["state", "updated_at"])
        if state in _SETTLED and updated:
            end = f"{int(updated) + _CLOCK_SKEW_MS}-0"
        needle = job_id.encode()
        found: list[StreamEntry] = []
        scanned = 0
        while scanned < max_entries:
            count = min(_PAGE, max_entries - scanned)
            with translate_errors():
                entries = await self.client.xrange(self.keys.events, start, end, count=count)
            scanned += len(entries)
            for e in entries:
                fields = _fields(e)
                if fields.get(b"id") == needle or needle in fields.get(b"ids", b""):
                    found.append(e)
            if len(entries) < count:
                break
            start = "(" + _id(entries[-1])
        events = [e for e in _parse_all(found) if e.id == job_id]
        return JobHistory(events, scanned < max_entries, state is not None)
