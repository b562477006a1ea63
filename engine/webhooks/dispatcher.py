"""The webhook dispatcher of one replica: delivers the event stream to the endpoints
that want it, at least once.

    Dispatcher.serve
    ├── _feed      XREADGROUP the stream (and XAUTOCLAIM what a dead dispatcher left)
    │   └── _pass  one read's events → POSTed straight to each healthy endpoint that
    │              wants them (signed, in batches, bounded) → what failed, and what is
    │              for an endpoint that is failing, becomes deliveries owed; the entries
    │              are acknowledged in the same script
    └── _deliver   claim due owed deliveries (leased) → POST → settle on 2xx; retry with
                   backoff; 410 or a retry window spent disables the endpoint

Why two paths: owing every (endpoint, event) as a record before trying it cost ~58 µs of
engine CPU per event (a record, a sorted-set member, a claim and a settle each: measured,
README); a healthy endpoint answers 2xx at once, so the record is written only for what
failed. The stream entries stay pending until both are done: a replica killed mid-POST
leaves them to XAUTOCLAIM (an endpoint may get an event twice; never not at all).

An endpoint that fails is paused on this replica until its next retry is due (its other
deliveries wait instead of hammering it, and new events go straight to its owed list): one
dead endpoint never slows the others. A first try that gets no answer within
``_DIRECT_TIMEOUT_S`` is cut short (owed, retried with the full timeout), so a hanging
endpoint holds a read for at most that long.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from typing import Final, NoReturn, TypeVar

import msgspec
import trio

from engine.config import WebhookSettings
from engine.errors import QueueError
from engine.metrics import Metrics, WebhookMetrics
from engine.models import Event, ms_to_iso
from engine.policy import backoff_s
from engine.queue import Owed, WebhookStore
from engine.webhooks.client import Answer, EndpointClient
from engine.webhooks.endpoint import MAX_BATCH_BYTES, Endpoint, payload, sign
from engine.webhooks.target import parse_allow

log = logging.getLogger(__name__)
T = TypeVar("T")

_decode_endpoint = msgspec.json.Decoder(Endpoint).decode
_encode = msgspec.json.Encoder().encode
_IDLE_S: Final = 0.2  # between claims when nothing was due
_RECLAIM_EVERY_S: Final = 15.0
_REFRESH_S: Final = 1.0
_READ_COUNT: Final = 1000  # stream entries per read
_READS_IN_HAND: Final = 4  # reads being delivered at once (the feed reads on meanwhile)
_DIRECT_TIMEOUT_S: Final = 2.0  # a first try's limit (owed deliveries get timeout_s)
# After a read that was not full, wait this long before the next: events gather into
# fewer, larger reads and batches. Reading whatever trickled in cost ~1 ms of CPU per
# request of a few events at the full send rate (measured); 50 ms of latency is cheap.
_LINGER_S: Final = 0.2


class Attempt(msgspec.Struct):
    """One delivery attempt, as GET /v1/webhooks/{id}/attempts lists it."""

    at: str
    event_id: str
    type: str
    status: int  # 0: no HTTP answer
    ms: int
    outcome: str  # delivered, retrying, given-up, disabled
    response: str = ""


class Dispatcher:
    def __init__(
        self,
        store: WebhookStore,
        settings: WebhookSettings,
        instance: str,
        *,
        clock: Callable[[], float] = time.time,
        metrics: WebhookMetrics | None = None,
        events_maxlen: int = 0,
    ) -> None:
        self.events_maxlen = events_maxlen
        self.metrics = metrics if metrics is not None else Metrics().webhooks
        self.store = store
        self.settings = settings
        self.instance = instance
        self._clock = clock
        self._allow = parse_allow(settings.allow)
        self._endpoints: dict[str, Endpoint] = {}
        self._loaded_at = 0.0
        self._paused: dict[str, float] = {}  # endpoint -> this replica waits until (s)
        self._per_endpoint: defaultdict[str, trio.Semaphore] = defaultdict(
            lambda: trio.Semaphore(settings.per_endpoint)
        )
        self._in_flight = trio.Semaphore(settings.max_in_flight)
        self._reads = trio.Semaphore(_READS_IN_HAND)
        self._retrying: Counter[str] = Counter()  # endpoint -> owed requests in flight
        self._clients: dict[str, EndpointClient] = {}
        self._wake = trio.Event()
        self.delivered = 0
        self.failed = 0

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def endpoints(self) -> dict[str, Endpoint]:
        """Every endpoint, re-read at most every second."""
        if time.monotonic() - self._loaded_at >= _REFRESH_S:
            fresh: dict[str, Endpoint] = {}
            for eid, raw in (await self.store.endpoints()).items():
                try:
                    fresh[eid] = _decode_endpoint(raw)
                except msgspec.DecodeError as exc:
                    log.error("webhooks.endpoint.unreadable id=%s error=%s", eid, exc)
            self._endpoints, self._loaded_at = fresh, time.monotonic()
        return self._endpoints

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._feed, nursery)
            nursery.start_soon(self._deliver, nursery)
            task_status.started()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    # -- stream → deliveries -------------------------------------------------------------

    async def _feed(self, nursery: trio.Nursery) -> NoReturn:
        reclaimed_at = 0.0
        while True:
            try:
                await self.store.ensure_group()
                while True:
                    # No endpoint anywhere: nothing to read (events for nobody cost a
                    # quarter of a request's CPU when parsed: measured).
                    # (The cached list first: when it has endpoints, Redis has too.)
                    if not await self.endpoints() and await self.store.idle():
                        await trio.sleep(_REFRESH_S)
                        continue
                    if time.monotonic() - reclaimed_at >= _RECLAIM_EVERY_S:
                        reclaimed_at = time.monotonic()
                        await self._watch_lag()
                        left = await self.store.reclaim(
                            self.instance, idle_ms=int(self.settings.lease_s * 1000), count=500
                        )
                        if left:
                            log.info("webhooks.reclaimed entries=%d", len(left))
                            await self._reads.acquire()
                            nursery.start_soon(self._pass, left)
                    entries = await self.store.read(self.instance, count=_READ_COUNT, block_ms=1000)
                    if entries:
                        await self._reads.acquire()
                        nursery.start_soon(self._pass, entries)
                    if len(entries) < _READ_COUNT:
                        await trio.sleep(_LINGER_S)
            except QueueError as exc:
                log.warning("webhooks.feed.failed error=%s", exc)
                await trio.sleep(1.0)

    async def _watch_lag(self) -> None:
        """How far behind the stream the group is (a metric; a warning past half of
        queue.events_maxlen, before entries would be trimmed unread)."""
        lag, pending = await self.store.lag()
        if lag is None:
            return
        self.metrics.behind(lag)
        if self.events_maxlen and lag > self.events_maxlen // 2:
            log.warning(
                "webhooks.lagging unread=%d pending=%d maxlen=%d: events past "
                "queue.events_maxlen are trimmed before endpoints get them",
                lag, pending, self.events_maxlen,
            )  # fmt: skip

    async def _pass(self, entries: list[tuple[str, list[Event]]]) -> None:
        """Deliver one read's events: straight to the endpoints that are healthy here,
        owed to the others and for what failed; then acknowledge the entries."""
        try:
            endpoints = [e for e in (await self.endpoints()).values() if e.enabled]
            now = self._clock()
            owe: list[tuple[str, bytes]] = []
            # Each endpoint's list for this pass: tried now (healthy here), or None (owed).
            targets: list[tuple[Endpoint, list[tuple[str, bytes]] | None]] = [
                (ep, [] if self._healthy(ep.id, now) else None) for ep in endpoints
            ]
            for _, events in entries:
                for event in events:
                    body = b""
                    for ep, now_list in targets:
                        if not ep.wants(event):
                            continue
                        body = body or payload(event)  # once per event, not per endpoint
                        if now_list is not None:
                            now_list.append((event.event_id, body))
                        else:
                            owe.append((f"{ep.id}|{event.event_id}", body))
            direct = {ep.id: items for ep, items in targets if items}
            attempts: defaultdict[str, list[bytes]] = defaultdict(list)
            if direct:
                by_id = {ep.id: ep for ep in endpoints}
                async with trio.open_nursery() as nursery:
                    for eid, items in direct.items():
                        for batch in _batches(items, by_id[eid].batch_max, lambda i: len(i[1])):
                            await self._in_flight.acquire()
                            nursery.start_soon(self._direct, by_id[eid], batch, owe, attempts[eid])
            # One script for the pass: its acks, what is owed now, and every attempt made
            # (a command costs ~250 µs of CPU in this client: measured; one per POST
            # was a third of the dispatcher's CPU).
            await self.store.fan_out(
                owe, [entry_id for entry_id, _ in entries], self.now_ms(), attempts
            )
            if owe:
                self._wake.set()
        except QueueError as exc:  # unacknowledged: XAUTOCLAIM brings them back
            log.warning("webhooks.pass.failed error=%s", exc)
        finally:
            self._reads.release()

    def _healthy(self, endpoint_id: str, now: float) -> bool:
        """Tried straight away: not paused here, and no owed retry of it in flight."""
        return self._paused.get(endpoint_id, 0.0) <= now and not self._retrying[endpoint_id]

    async def _direct(
        self,
        ep: Endpoint,
        items: list[tuple[str, bytes]],
        owe: list[tuple[str, bytes]],
        attempts: list[bytes],
    ) -> None:
        """A first try; what it does not deliver is added to ``owe``, the attempt to
        ``attempts`` (the pass records both with its acknowledgement)."""
        try:
            async with self._per_endpoint[ep.id]:
                answer, attempt = await self._post(
                    ep, [b for _, b in items], items[0][0], timeout_s=_DIRECT_TIMEOUT_S
                )
            if 200 <= answer.status < 300:
                self._paused.pop(ep.id, None)
                self.delivered += len(items)
                attempts.append(attempt("delivered", len(items)))
                return
            self.failed += len(items)
            if answer.status == 410:
                attempts.append(attempt("disabled", len(items)))
                await self._disable(ep, "the endpoint answered 410 Gone")
                return
            self._paused[ep.id] = self._clock() + backoff_s(
                1, base_s=self.settings.first_retry_s, max_s=self.settings.max_retry_s
            )
            owe.extend((f"{ep.id}|{event_id}", body) for event_id, body in items)
            attempts.append(attempt("retrying", len(items)))
        except QueueError as exc:  # disabling it failed: it is tried again
            log.warning("webhooks.disable.failed endpoint=%s error=%s", ep.id, exc)
        finally:
            self._in_flight.release()

    async def _post(
        self, ep: Endpoint, events: list[bytes], first_id: str, *, timeout_s: float | None = None
    ) -> tuple[Answer, Callable[[str, int], bytes]]:
        """One signed POST: one event, or (batch_max > 1) a JSON array of them; the answer
        and how to record it as an attempt (outcome, events)."""
        if ep.batch_max > 1:
            body = b"[" + b",".join(events) + b"]"
            msg_id, kind = f"batch_{first_id}_{len(events)}", f"batch of {len(events)}"
        else:
            body, msg_id, kind = events[0], first_id, _type_of(events[0])
        stamp = int(self._clock())
        headers = [
            ("webhook-id", msg_id),
            ("webhook-timestamp", str(stamp)),
            ("webhook-signature", sign(ep.secret, msg_id, stamp, body)),
        ]
        answer = await self._client(ep).post(body, headers, timeout_s=timeout_s)

        def attempt(outcome: str, n: int) -> bytes:
            self.metrics.request(outcome, n)
            return _encode(Attempt(
                ms_to_iso(self.now_ms()), msg_id, kind, answer.status, answer.elapsed_ms,
                outcome, answer.snippet,
            ))  # fmt: skip

        return answer, attempt

    # -- deliveries → endpoints ----------------------------------------------------------

    async def _deliver(self, nursery: trio.Nursery) -> NoReturn:
        while True:
            try:
                owed = await self.store.claim(
                    self.now_ms(), lease_ms=int(self.settings.lease_s * 1000), count=500
                )
            except QueueError as exc:
                log.warning("webhooks.claim.failed error=%s", exc)
                owed = []
            if not owed:
                self._wake = trio.Event()
                with trio.move_on_after(_IDLE_S):
                    await self._wake.wait()
                continue
            endpoints = await self.endpoints()
            gone: list[str] = []
            later: defaultdict[int, list[str]] = defaultdict(list)
            mine: defaultdict[str, list[Owed]] = defaultdict(list)
            now = self._clock()
            for item in owed:
                ep = endpoints.get(item.endpoint)
                if ep is None or not ep.enabled:
                    gone.append(item.member)
                elif self._paused.get(ep.id, 0.0) > now:
                    later[int(self._paused[ep.id] * 1000)].append(item.member)
                else:
                    mine[ep.id].append(item)
            try:
                await self.store.settle(gone)
                for due_ms, members in later.items():
                    await self.store.postpone(members, due_ms)
            except QueueError as exc:  # their leases bring them back
                log.warning("webhooks.postpone.failed error=%s", exc)
            for eid, items in mine.items():
                ep = endpoints[eid]
                for batch in _batches(items, ep.batch_max, lambda o: len(o.event)):
                    await self._in_flight.acquire()
                    nursery.start_soon(self._one, ep, batch)

    def _client(self, ep: Endpoint) -> EndpointClient:
        client = self._clients.get(ep.id)
        if client is None or client.url != ep.url:
            client = self._clients[ep.id] = EndpointClient(
                ep.url, timeout_s=self.settings.timeout_s,
                max_response_bytes=self.settings.max_response_bytes, allow=self._allow,
            )  # fmt: skip
        return client

    async def _one(self, ep: Endpoint, items: list[Owed]) -> None:
        self._retrying[ep.id] += 1
        try:
            async with self._per_endpoint[ep.id]:
                await self._request(ep, items)
        except QueueError as exc:  # the lease brings them back
            log.warning("webhooks.settle.failed endpoint=%s error=%s", ep.id, exc)
        finally:
            self._retrying[ep.id] -= 1
            if not self._retrying[ep.id]:
                del self._retrying[ep.id]
            self._in_flight.release()

    async def _request(self, ep: Endpoint, items: list[Owed]) -> None:
        """One POST of owed deliveries, then settle, retry or give them up."""
        answer, attempt = await self._post(ep, [i.event for i in items], items[0].event_id)
        members = [i.member for i in items]
        if 200 <= answer.status < 300:
            self._paused.pop(ep.id, None)
            self.delivered += len(items)
            await self.store.finish(endpoint_id=ep.id, attempt=attempt("delivered", len(items)),
                                    settle=members)  # fmt: skip
            return
        self.failed += len(items)
        tried_s = (self.now_ms() - min(i.first_ms for i in items)) / 1000
        if answer.status == 410 or tried_s >= ep.retry_window_s:
            reason = (
                "the endpoint answered 410 Gone" if answer.status == 410 else
                f"failing for {tried_s:.0f} s (retry window {ep.retry_window_s:g} s); "
                f"last: {answer.status or answer.snippet}"
            )  # fmt: skip
            await self._disable(ep, reason)
            outcome = "disabled" if answer.status == 410 else "given-up"
            await self.store.finish(endpoint_id=ep.id, attempt=attempt(outcome, len(items)),
                                    settle=members)  # fmt: skip
            return
        wait = backoff_s(
            max(i.attempts for i in items) + 1,
            base_s=self.settings.first_retry_s, max_s=self.settings.max_retry_s,
        )  # fmt: skip
        self._paused[ep.id] = self._clock() + wait
        await self.store.finish(
            endpoint_id=ep.id, attempt=attempt("retrying", len(items)), retry=members,
            due_ms=self.now_ms() + int(wait * 1000),
        )  # fmt: skip

    async def _disable(self, ep: Endpoint, reason: str) -> None:
        fresh = await self.store.endpoint(ep.id)
        if fresh is None:
            return
        current = _decode_endpoint(fresh)
        if not current.enabled:
            return
        log.warning("webhooks.endpoint.disabled id=%s reason=%s", ep.id, reason)
        disabled = msgspec.structs.replace(current, enabled=False, disabled_reason=reason)
        await self.store.put_endpoint(ep.id, _encode(disabled))
        self._loaded_at = 0.0  # re-read now


def _batches(items: list[T], most: int, size: Callable[[T], int]) -> Iterator[list[T]]:
    """``items`` in runs of at most ``most`` (at least 1) and ``MAX_BATCH_BYTES`` of
    events (a run holds at least one, whatever its size)."""
    run: list[T] = []
    total = 0
    for item in items:
        n = size(item)
        if run and (len(run) >= most or total + n > MAX_BATCH_BYTES):
            yield run
            run, total = [], 0
        run.append(item)
        total += n
    if run:
        yield run


def _type_of(event: bytes) -> str:
    kind = msgspec.json.decode(event, type=_Kind).type
    return kind


class _Kind(msgspec.Struct):
    type: str = ""
