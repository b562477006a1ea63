"""Live job events: the websocket hub (WS /v1/events) and GET /v1/messages/{id}/events.

Each replica tails the Redis event stream once and fans every batch out to its own
subscribers through bounded buffers; a subscriber that falls behind is dropped, never
waited for. Imports the queue and the leaves; never the senders or transports.

The websocket, ``ws://HOST/v1/events?...`` (every parameter optional):

    id      a job id; repeat it or give a comma list for several
    type    an event type (queued, scheduled, processing, sent, retrying, failed,
            cancelled, deleted, suppressed, expired; a provider's delivered, bounced,
            complained, delayed); repeat or comma list
    tenant  a tenant; repeat or comma list
    tag     a tag; repeat for several (a tag may hold a comma: no comma list)
    since   an event id: first replay the events after it that the stream still
            holds (queue.events_maxlen), then go on live, without gap or duplicate.
            When the stream was trimmed past it, the handshake answer carries the
            header ``Events-Gap: <oldest event id kept>``: the replay starts there and
            what came between is gone (``engine watch`` prints a warning)

Kinds combine with AND, the values of one kind with OR. Every text message is a JSON
array of one or more events, oldest first (batches keep a busy feed cheap). Close
codes: 4008 too slow (more than events.subscriber_buffer events waited for this
client; reconnect with since=<the last event_id received>), 1011 the event stream is
unavailable, 1001 the server is shutting down. Bad parameters are refused before the
upgrade with 400 (503 when the replica has events.max_subscribers already).

A websocket route gets the raw ASGI triple from the router: the fan-out runs for every
event at full send rate, and the handshake is answered only once the subscriber is attached to the
tail, so a client that is connected misses nothing that happens afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import parse_qsl

import msgspec
import trio

from engine.api.asgi import Receive, Scope, Send
from engine.api.exchange import JSON, Fail, Reply, Request, not_found, refuse_upgrade
from engine.api.guard import PRINCIPAL
from engine.auth import Principal
from engine.config import EventsSettings
from engine.errors import QueueError, ValidationError
from engine.ids import is_id
from engine.models import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_SLOW,
    CLOSE_UNAVAILABLE,
    EVENT_TYPES,
    Event,
    check_tenant,
)
from engine.queue import EventLog, Queue, event_order, parse_event_id

log = logging.getLogger(__name__)

MAX_FILTER_VALUES: Final = 1000
# Seconds a dropped subscriber's socket gets to take the close frame; a subscription
# waits this long for the tail to find the stream's end.
_GRACE_S: Final = 5.0
_BLOCK_S: Final = 1.0  # longest XREAD BLOCK (under redis.command_timeout_s)
# Stream entries per live read: an enqueue entry expands to up to 100 events, so one
# read hands out at most 100k events (in practice most entries are single events).
_READ_COUNT: Final = 1000
_REPLAY_PAGE: Final = 1000  # stream entries per replay round trip
# A websocket message holds at most about this much: many clients refuse messages over
# 1 MiB (trio-websocket by default), and an enqueue entry expands to 100 events.
_CHUNK_EVENTS: Final = 256
_FRAME_BYTES: Final = 256 * 1024

_encode = msgspec.json.Encoder().encode


def pause_s(subscribers: int, settings: EventsSettings) -> float:
    """Seconds between two batches the tail hands out: longer with more subscribers,
    because every batch costs one socket write per subscriber."""
    grown = settings.batch_interval_s + subscribers * settings.batch_interval_per_subscriber_s
    return max(settings.batch_interval_s, min(grown, settings.max_batch_interval_s))


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a subscriber wants (an empty set: any)."""

    ids: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    tenants: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()

    @property
    def everything(self) -> bool:
        return not (self.ids or self.types or self.tenants or self.tags)

    def matches(self, e: Event) -> bool:
        return (
            (not self.ids or e.id in self.ids)
            and (not self.types or e.type in self.types)
            and (not self.tenants or e.tenant in self.tenants)
            and (not self.tags or not self.tags.isdisjoint(e.tags))
        )


def parse_query(query: bytes) -> tuple[EventFilter, str]:
    """(filter, since) of a websocket query string; raises ValidationError."""
    values: dict[str, list[str]] = {"id": [], "type": [], "tenant": [], "tag": [], "since": []}
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name not in values:
            raise ValidationError(name, "unknown parameter: use id, type, tenant, tag, since")
        if name == "tag":
            values[name].append(value)
        else:
            values[name] += [v for v in value.split(",") if v]
    for name, given in values.items():
        if len(given) > MAX_FILTER_VALUES:
            raise ValidationError(name, f"at most {MAX_FILTER_VALUES} values")
    for job_id in values["id"]:
        if not is_id(job_id):
            raise ValidationError("id", f"{job_id!r} is not a message id")
    for kind in values["type"]:
        if kind not in EVENT_TYPES:
            raise ValidationError(
                "type", f"{kind!r} is not one of {', '.join(sorted(EVENT_TYPES))}"
            )
    for tenant in values["tenant"]:
        check_tenant("tenant", tenant)
    for tag in values["tag"]:
        if not 1 <= len(tag) <= 64:
            raise ValidationError("tag", "tags are 1 to 64 characters")
    since = ""
    if values["since"]:
        if len(values["since"]) > 1:
            raise ValidationError("since", "give one event id")
        since = values["since"][0]
        try:
            parse_event_id(since)
        except ValueError as exc:
            raise ValidationError("since", str(exc)) from None
    f = EventFilter(*(frozenset(values[k]) for k in ("id", "type", "tenant", "tag")))
    return f, since


@dataclass(frozen=True, slots=True)
class HubStatistics:
    subscribers: int  # websocket subscribers attached now
    dropped: int  # subscribers dropped for falling behind, since start
    events_read: int  # events read from the stream
    events_sent: int  # events handed to subscribers (one event to three of them: 3)
    tailing: bool  # reading the stream (False while this replica has no subscriber)


class _Subscriber:
    """One websocket's place in the hub: its filter and its bounded buffer."""

    __slots__ = ("after", "attached", "boundary", "dropped", "filter", "pending", "receive", "send")

    def __init__(self, filt: EventFilter) -> None:
        self.filter = filt
        # (a websocket message's text: a JSON array, the events it holds)
        self.send, self.receive = trio.open_memory_channel[tuple[str, int]](math.inf)
        self.pending = 0  # events in the buffer or being written
        self.attached = False
        self.dropped = False
        # The tail's position when attached: a replay (since=) runs up to here.
        self.boundary = ""
        # Set when ``since`` is ahead of the tail (the client came from a replica whose
        # tail was further on): live events up to it were delivered there already.
        self.after: tuple[int, int, int] | None = None


class EventHub:
    """Tail the event stream (``serve``, one task) and fan it out to websockets.

    The tail reads only while someone listens, starting from the stream's end; a
    subscriber is attached between two reads, so it gets every event after the tail's
    position then (``since`` replays the rest from the stream).
    """

    def __init__(self, log: EventLog, settings: EventsSettings) -> None:
        self.log = log
        self.settings = settings
        self._everyone: set[_Subscriber] = set()
        self._by_id: dict[str, set[_Subscriber]] = {}
        # Other filters, grouped: subscribers with the same filter share one scan of each
        # batch and its encoded chunks.
        self._by_filter: dict[EventFilter, set[_Subscriber]] = {}
        self._scan: set[_Subscriber] = set()  # catching up to ``after``
        self._count = 0
        self._waiting = 0
        self._cursor: str | None = None  # last entry dispatched; None: not tailing
        self._positioned = trio.Event()
        self._wanted = trio.Event()
        self._closing = False
        self._sockets = 0  # websockets open (accepted, not yet closed)
        self._no_sockets = trio.Event()
        self._dropped = 0
        self._read = 0
        self._sent = 0

    def statistics(self) -> HubStatistics:
        return HubStatistics(
            self._count, self._dropped, self._read, self._sent, self._cursor is not None
        )

    # -- the tail -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        failing_since: float | None = None
        backoff = 0.1
        while True:
            if not self._count and not self._waiting:
                self._cursor = None
                if self._positioned.is_set():
                    self._positioned = trio.Event()
                self._wanted = trio.Event()
                await self._wanted.wait()
            try:
                if self._cursor is None:
                    self._cursor = await self.log.last_id()
                    self._positioned.set()
                page = await self.log.tail(self._cursor, block_s=_BLOCK_S, count=_READ_COUNT)
            except QueueError as exc:
                if failing_since is None:
                    failing_since = trio.current_time()
                    log.warning("events.tail.failed error=%s", exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if failing_since is not None:
                log.info("events.tail.recovered after_s=%.1f", trio.current_time() - failing_since)
                failing_since, backoff = None, 0.1
            if page.last is None:
                continue
            # No checkpoint from the read to here: a subscriber attaches either before
            # this batch (and gets it) or after the cursor moved past it.
            self._dispatch(page.events)
            self._cursor = page.last
            self._read += len(page.events)
            if page.entries < _READ_COUNT:  # a full page: behind, read on at once
                await trio.sleep(pause_s(self._count, self.settings))

    def _dispatch(self, events: list[Event]) -> None:
        """Hand a batch to every subscriber that wants some of it (never waits)."""
        if not events:
            return
        encoded = [_encode(e) for e in events]
        if self._everyone:
            # Encoded and framed once, the same text objects shared by every subscriber
            # without a filter: per subscriber there is only the socket write left.
            chunks = _chunks(encoded)
            for sub in list(self._everyone):
                self._offer(sub, chunks, len(encoded))
        if self._by_id:
            matched: dict[_Subscriber, list[bytes]] = {}
            for e, raw in zip(events, encoded, strict=True):
                for sub in self._by_id.get(e.id, ()):
                    if sub.filter.matches(e):
                        matched.setdefault(sub, []).append(raw)
            for sub, parts in matched.items():
                self._offer(sub, _chunks(parts), len(parts))
        for filt, group in list(self._by_filter.items()):
            parts = [raw for e, raw in zip(events, encoded, strict=True) if filt.matches(e)]
            if parts:
                chunks = _chunks(parts)
                for sub in list(group):
                    self._offer(sub, chunks, len(parts))
        for sub in list(self._scan):
            catching_up = sub.after is not None
            parts = [raw for e, raw in zip(events, encoded, strict=True) if self._wants(sub, e)]
            if parts:
                self._offer(sub, _chunks(parts), len(parts))
            if catching_up and sub.after is None and not sub.dropped:
                self._scan.discard(sub)
                self._index(sub)

    @staticmethod
    def _wants(sub: _Subscriber, e: Event) -> bool:
        if sub.after is not None:
            if event_order(e.event_id) <= sub.after:
                return False
            sub.after = None
        return sub.filter.matches(e)

    def _offer(self, sub: _Subscriber, chunks: list[tuple[str, int]], n: int) -> None:
        """Buffer ``n`` events for ``sub``, or drop it if its earlier ones still wait and
        all of them would pass the buffer's size (one batch, however big, always fits
        an empty buffer: a subscriber that keeps up is never dropped)."""
        if sub.dropped:
            return
        if sub.pending and sub.pending + n > self.settings.subscriber_buffer:
            sub.dropped = True
            self._dropped += 1
            self._detach(sub)
            log.info("events.subscriber.dropped waiting=%d", sub.pending + n)
            return
        sub.pending += n
        self._sent += n
        for chunk in chunks:
            sub.send.send_nowait(chunk)  # unbounded channel; bounded by ``pending``

    # -- subscribers ----------------------------------------------------------------------

    def _index(self, sub: _Subscriber) -> None:
        if sub.after is not None:
            self._scan.add(sub)
        elif sub.filter.everything:
            self._everyone.add(sub)
        elif sub.filter.ids:
            for job_id in sub.filter.ids:
                self._by_id.setdefault(job_id, set()).add(sub)
        else:
            self._by_filter.setdefault(sub.filter, set()).add(sub)

    async def _attach(self, sub: _Subscriber, since: str) -> None:
        """Wait until the tail runs, then join it at its position (sync from there on)."""
        self._waiting += 1
        try:
            while self._cursor is None:
                self._wanted.set()
                await self._positioned.wait()
        finally:
            self._waiting -= 1
        sub.boundary = self._cursor
        if since and event_order(since) > event_order(sub.boundary):
            sub.after = event_order(since)
        self._index(sub)
        sub.attached = True
        self._count += 1

    def _detach(self, sub: _Subscriber) -> None:
        sub.send.close()
        if not sub.attached:
            return
        sub.attached = False
        self._count -= 1
        self._everyone.discard(sub)
        self._scan.discard(sub)
        group = self._by_filter.get(sub.filter)
        if group is not None:
            group.discard(sub)
            if not group:
                del self._by_filter[sub.filter]
        for job_id in sub.filter.ids:
            subs = self._by_id.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._by_id[job_id]

    async def close(self) -> None:
        """Shutting down: end every subscription (close code 1001) and wait until their
        sockets are closed (bound it with a deadline)."""
        self._closing = True
        subs = {*self._everyone, *self._scan}
        subs.update(
            s for group in (*self._by_id.values(), *self._by_filter.values()) for s in group
        )
        for sub in subs:
            self._detach(sub)
        if self._sockets:
            await self._no_sockets.wait()

    # -- the websocket --------------------------------------------------------------------

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI handler of WS /v1/events."""
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            filt, since = parse_query(scope.get("query_string", b""))
            principal = scope.get(PRINCIPAL)
            if isinstance(principal, Principal):
                filt = within_tenants(filt, principal)
        except ValidationError as exc:
            await _refuse(
                scope, send, 400, "invalid-field", "Invalid parameter", exc.detail, exc.field
            )
            return
        if self._closing or self._count + self._waiting >= self.settings.max_subscribers:
            await _refuse(scope, send, 503, "too-many-subscribers", "Too many subscribers",
                          f"this replica serves {self.settings.max_subscribers} at most "
                          "(events.max_subscribers); try another")  # fmt: skip
            return
        sub = _Subscriber(filt)
        with trio.move_on_after(_GRACE_S):
            await self._attach(sub, since)
        if not sub.boundary:
            await _refuse(scope, send, 503, "queue-unavailable", "Event stream unavailable",
                          "the event stream cannot be read; retry shortly")  # fmt: skip
            return
        headers: list[tuple[bytes, bytes]] = []
        if since:
            try:
                oldest = await self.log.first_id()
            except QueueError:
                oldest = None  # the replay will say so (1011)
            if oldest is not None and event_order(oldest)[:2] > event_order(since)[:2]:
                # The stream no longer holds the entry of ``since`` (queue.events_maxlen):
                # the replay starts at its oldest entry, and events in between may be gone.
                headers.append((b"events-gap", oldest.encode()))
        self._sockets += 1
        try:
            await send({"type": "websocket.accept", "headers": headers})
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
                code, reason = await self._feed(sub, since, send)
                nursery.cancel_scope.deadline = trio.current_time() + _GRACE_S
                await send({"type": "websocket.close", "code": code, "reason": reason})
                nursery.cancel_scope.cancel()
        finally:
            self._detach(sub)
            self._sockets -= 1
            if self._closing and not self._sockets:
                self._no_sockets.set()

    async def _feed(self, sub: _Subscriber, since: str, send: Send) -> tuple[int, str]:
        """Replay, then pump live batches until the subscription ends: (close code, reason)."""
        if since:
            try:
                await self._replay(sub, since, send)
            except QueueError:
                return CLOSE_UNAVAILABLE, "event stream unavailable; reconnect with since"
        carry: tuple[str, int] | None = None
        while not sub.dropped:
            if carry is None:
                try:
                    carry = await sub.receive.receive()
                except trio.EndOfChannel:
                    break
            texts, count, size = [carry[0]], carry[1], len(carry[0])
            carry = None
            while size < _FRAME_BYTES:  # what else is waiting goes in the same message
                try:
                    carry = sub.receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                texts.append(carry[0])
                count += carry[1]
                size += len(carry[0])
                carry = None
            if sub.dropped:
                break
            # The tail paces the batches (events.batch_interval_s); a subscriber that
            # keeps up sends each one as it comes, one that lags merges what waits.
            text = texts[0] if len(texts) == 1 else _merge(texts)
            await send({"type": "websocket.send", "text": text})
            sub.pending -= count
        if sub.dropped:
            return CLOSE_TOO_SLOW, "too slow: reconnect with since=<last event_id>"
        return CLOSE_GOING_AWAY, "server shutting down"

    async def _replay(self, sub: _Subscriber, since: str, send: Send) -> None:
        cursor = since
        while not sub.dropped:
            page = await self.log.range(cursor, until=sub.boundary, limit=_REPLAY_PAGE)
            parts = [_encode(e) for e in page.events if sub.filter.matches(e)]
            for text, _ in _chunks(parts):
                await send({"type": "websocket.send", "text": text})
            if page.last is None or page.last == sub.boundary or page.entries < _REPLAY_PAGE:
                return
            cursor = page.last


def _chunks(parts: list[bytes]) -> list[tuple[str, int]]:
    """Encoded events as websocket message texts (JSON arrays) of at most _CHUNK_EVENTS
    events each: (text, events)."""
    return [
        ("[" + b",".join(parts[i : i + _CHUNK_EVENTS]).decode() + "]",
         len(parts[i : i + _CHUNK_EVENTS]))
        for i in range(0, len(parts), _CHUNK_EVENTS)
    ]  # fmt: skip


def _merge(texts: list[str]) -> str:
    """JSON arrays of events joined into one array."""
    return "[" + ",".join(t[1:-1] for t in texts) + "]"


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "websocket.disconnect":
        pass  # what a client sends is ignored
    scope.cancel()


async def _refuse(
    scope: Scope, send: Send, status: int, slug: str, title: str, detail: str,
    field: str | None = None,
) -> None:  # fmt: skip
    """Answer the handshake with an HTTP problem (403 where the server cannot)."""
    await refuse_upgrade(scope, send, Fail(status, slug, title, detail, field))


def within_tenants(filt: EventFilter, p: Principal) -> EventFilter:
    """A subscriber's filter narrowed to the tenants its key acts for."""
    if p.tenants is None:
        return filt
    if filt.tenants and not filt.tenants & p.tenants:
        raise ValidationError("tenant", "this API key acts for none of these tenants")
    return dataclasses.replace(filt, tenants=(filt.tenants & p.tenants) or p.tenants)


def history_route(
    log: EventLog, queue: Queue, settings: EventsSettings
) -> Callable[[Request], Awaitable[Reply]]:
    """GET /v1/messages/{id}/events: the message's events still in the stream, oldest
    first. ``Events-Complete: false`` when the scan stopped at events.history_scan_entries."""

    async def message_events(req: Request) -> Reply:
        job_id = req.params["id"]
        if req.principal.tenants is not None and is_id(job_id):
            rec = await queue.get(job_id)  # whose message is it?
            if rec is None or not req.principal.sees(rec.tenant):
                raise not_found("No such message", f"unknown id {job_id!r}")
        found = (
            await log.history(job_id, max_entries=settings.history_scan_entries)
            if is_id(job_id)
            else None
        )
        if found is None or (not found.events and not found.exists):
            raise not_found("No such message", f"unknown id {job_id!r}")
        complete = b"true" if found.complete else b"false"
        return Reply(200, _encode(found.events), JSON, [(b"events-complete", complete)])

    return message_events
