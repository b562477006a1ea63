"""Every Prometheus metric of one engine process -- names, labels, buckets -- in its own
``CollectorRegistry``, made by the composition root and handed down (never the global one).

A leaf: imports nothing of the engine. Hot paths get objects whose labelled children
are bound once (``IngestMetrics``, ``SenderMetrics``): a request or a send costs one
dict lookup, an observe and an increment, never a label resolution.

Process-local series count what this process did (sum them over replicas); the
``engine_queue_*`` series are read from Redis at scrape time and are the same on every
replica (take ``max``, not ``sum``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Final, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# The text format Prometheus scrapes (prometheus_client's CONTENT_TYPE_PLAIN_0_0_4).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# Ingest requests: a single enqueue is ~1 ms, a 500-message batch tens of ms, and the
# enqueue timeout (http.enqueue_timeout_s) caps the tail at a few seconds.
INGEST_BUCKETS_S: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Enqueue -> 250: milliseconds when senders keep up, minutes in a backlog or behind a
# rate limit, hours for retries after backoff. A scheduled send counts from when it was
# posted (the id's time), so its wait until send_at is in it.
SEND_BUCKETS_S: Final = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 14400.0,
)  # fmt: skip

# Label values, fixed so that no request can mint a new series.
INGEST_ROUTES: Final = ("/v1/messages", "/v1/messages/batch", "/v1/messages/{id}")
INGEST_METHODS: Final = frozenset({"GET", "POST", "DELETE"})  # any other: "other"
# Why ingest answered 429/503 (the problem type's slug).
REJECT_REASONS: Final = (
    "rate-limited", "backlog-full", "queue-unavailable", "queue-error", "queue-timeout",
    "draining", "history-behind",
)  # fmt: skip
# The history writer: stream entry written -> its commit; seconds.
HISTORY_DELAY_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def _zero() -> int:
    return 0


def _version() -> str:
    try:
        return version("engine")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class IngestMetrics:
    """The raw-ASGI ingest routes' metrics, children bound on first use."""

    __slots__ = ("_duration", "_messages", "_rejected", "_requests")

    def __init__(self, duration: Histogram, messages: Counter, rejected: Counter) -> None:
        self._duration = duration
        self._requests: dict[tuple[str, str, int], Histogram] = {}
        self._messages = messages
        self._rejected = {reason: rejected.labels(reason) for reason in REJECT_REASONS}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request to ``route`` (one of INGEST_ROUTES)."""
        key = (route, method if method in INGEST_METHODS else "other", status)
        child = self._requests.get(key)
        if child is None:  # once per (route, method, status)
            child = self._requests[key] = self._duration.labels(key[0], key[1], str(status))
        child.observe(seconds)

    def accepted(self, messages: int) -> None:
        """Messages stored (not replays of an Idempotency-Key)."""
        self._messages.inc(messages)

    def rejected(self, reason: str) -> None:
        """A 429/503 that stored nothing; ``reason`` is one of REJECT_REASONS."""
        self._rejected[reason].inc()


class SenderMetrics:
    """The sender loop's metrics, children bound at construction."""

    __slots__ = (
        "_bounces", "_dead", "_first", "_later", "_released", "_retry", "_sent",
        "_slowdowns", "_trips", "_up",
    )  # fmt: skip

    def __init__(
        self,
        sends: Counter,
        latency: Histogram,
        slowdowns: Counter,
        trips: Counter | None = None,
        up: Gauge | None = None,
        bounces: Counter | None = None,
    ) -> None:
        self._bounces = bounces
        self._sent = sends.labels("sent")
        self._retry = sends.labels("retry")
        self._dead = sends.labels("dead")
        self._released = sends.labels("released")
        self._first = latency.labels("first")
        self._later = latency.labels("retry")
        self._slowdowns = slowdowns
        self._trips = trips
        self._up = up

    def transport(self, name: str, *, up: bool, tripped: bool = False) -> None:
        """The transport's breaker as this replica sees it (tripped: this replica saw
        the failure that opened it, or a failed probe)."""
        if self._up is not None:
            self._up.labels(name).set(1 if up else 0)
        if tripped and self._trips is not None:
            self._trips.labels(name).inc()

    def sent(self, attempt: int, latency_s: float | None) -> None:
        """A 250 acknowledged; ``latency_s`` from enqueue (the id's time) to the 250."""
        self._sent.inc()
        if latency_s is not None:  # clocks of replicas may disagree by a little
            (self._first if attempt <= 1 else self._later).observe(max(0.0, latency_s))

    def retried(self) -> None:
        self._retry.inc()

    def dead(self) -> None:
        self._dead.inc()

    def released(self, jobs: int) -> None:
        """Claimed jobs handed back unsent (shutdown, or the transport is down)."""
        self._released.inc(jobs)

    def bounced(self, cls: str) -> None:
        """A failed attempt, by its bounce class (engine.bounce)."""
        if self._bounces is not None:
            self._bounces.labels(cls).inc()

    def slowed_down(self, buckets: int) -> None:
        """Buckets whose shared rate a 421/451 made us ask Redis to halve."""
        self._slowdowns.inc(buckets)


class HistoryMetrics:
    """The history writer (PostgreSQL): what it wrote, and how far behind it is."""

    __slots__ = ("_delay", "_events", "_failures", "_gap", "_lag_entries", "_lag_s",
                 "_messages", "_up")  # fmt: skip

    def __init__(
        self,
        events: Counter,
        messages: Counter,
        delay: Histogram,
        lag_entries: Gauge,
        lag_s: Gauge,
        up: Gauge,
        failures: Counter,
        gap: Counter,
    ) -> None:
        self._events, self._messages, self._delay = events, messages, delay
        self._lag_entries, self._lag_s, self._up = lag_entries, lag_s, up
        self._failures, self._gap = failures, gap

    def written(self, events: int, messages: int, delays_s: list[float]) -> None:
        self._events.inc(events)
        self._messages.inc(messages)
        for d in delays_s:
            self._delay.observe(d)

    def behind(self, entries: int, seconds: float) -> None:
        self._lag_entries.set(entries)
        self._lag_s.set(seconds)

    def reachable(self, up: bool) -> None:
        self._up.set(1 if up else 0)

    def failed(self) -> None:
        self._failures.inc()

    def missed(self, entries: int) -> None:
        self._gap.inc(entries)


class WebhookMetrics:
    """What the webhook dispatcher did, and how far behind the event stream it is."""

    __slots__ = ("_events", "_lag", "_requests")

    def __init__(self, requests: Counter, events: Counter, lag: Gauge | None = None) -> None:
        self._requests = requests
        self._events = events
        self._lag = lag

    def behind(self, entries: int) -> None:
        if self._lag is not None:
            self._lag.set(entries)

    def request(self, outcome: str, events: int) -> None:
        self._requests.labels(outcome).inc()
        if outcome == "delivered":
            self._events.inc(events)


class ReaperMetrics:
    """What the reaper recovered."""

    __slots__ = ("_dead", "_errors", "_instances", "_promoted", "_requeued")

    def __init__(
        self, reaped: Counter, promoted: Counter, instances: Counter, errors: Counter
    ) -> None:
        self._requeued = reaped.labels("requeued")
        self._dead = reaped.labels("dead")
        self._promoted = promoted
        self._instances = instances
        self._errors = errors

    def reaped(self, *, requeued: int, dead: int, promoted: int, instances: int) -> None:
        self._requeued.inc(requeued)
        self._dead.inc(dead)
        self._promoted.inc(promoted)
        self._instances.inc(instances)

    def error(self) -> None:
        self._errors.inc()


class QueueCountsLike(Protocol):
    """What ``engine.queue.QueueCounts`` offers (structural: this module is a leaf)."""

    @property
    def ready(self) -> int: ...
    @property
    def ready_by_lane(self) -> Mapping[str, int]: ...
    @property
    def processing(self) -> int: ...
    @property
    def delayed(self) -> int: ...
    @property
    def dead(self) -> int: ...
    @property
    def instances(self) -> int: ...
    @property
    def enqueued_total(self) -> int: ...
    @property
    def sent_total(self) -> int: ...
    @property
    def failed_total(self) -> int: ...


class _QueueCollector:
    """The queue's depth as last read from Redis; nothing but ``engine_queue_up 0`` when
    that read failed (a stale depth would look like a healthy, stuck queue)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: QueueCountsLike | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(None, describe=True)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.counts)

    @staticmethod
    def _families(c: QueueCountsLike | None, *, describe: bool = False) -> list[Metric]:
        up = GaugeMetricFamily("engine_queue_up", "1 when this scrape could read the queue")
        jobs = GaugeMetricFamily(
            "engine_queue_jobs",
            "Jobs per state, all replicas (delayed = scheduled + retrying)",
            labels=["state"],
        )
        lanes = GaugeMetricFamily(
            "engine_queue_ready_jobs", "Ready jobs per priority lane", labels=["lane"]
        )
        instances = GaugeMetricFamily("engine_queue_instances", "Live engine instances")
        enqueued = CounterMetricFamily("engine_queue_enqueued", "Jobs enqueued, all replicas")
        sent = CounterMetricFamily("engine_queue_sent", "Jobs sent, all replicas")
        failed = CounterMetricFamily("engine_queue_failed", "Jobs dead-lettered, all replicas")
        families: list[Metric] = [up, jobs, lanes, instances, enqueued, sent, failed]
        if describe:
            return families
        if c is None:
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        for state, n in (
            ("ready", c.ready), ("processing", c.processing), ("delayed", c.delayed),
            ("dead", c.dead),
        ):  # fmt: skip
            jobs.add_metric([state], n)
        for lane, n in c.ready_by_lane.items():
            lanes.add_metric([lane], n)
        instances.add_metric([], c.instances)
        enqueued.add_metric([], c.enqueued_total)
        sent.add_metric([], c.sent_total)
        failed.add_metric([], c.failed_total)
        return families


class Metrics:
    """The metrics of one engine process and the registry that renders them."""

    def __init__(
        self,
        *,
        instance: str = "",
        role: str = "all",
        subscribers: Callable[[], int] = _zero,
    ) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        # "instance" is the label Prometheus gives every target: ours would be renamed.
        Info("engine", "This engine process", registry=r).info(
            {"instance_id": instance, "role": role, "version": _version()}
        )
        self.ingest = IngestMetrics(
            Histogram(
                "engine_ingest_request_duration_seconds",
                "Ingest API requests (their _count) and latency, by route, method, status",
                ["route", "method", "status"],
                buckets=INGEST_BUCKETS_S,
                registry=r,
            ),
            Counter("engine_ingest_messages", "Messages accepted (202)", registry=r),
            Counter(
                "engine_ingest_rejected",
                "Ingest requests refused with 429/503, nothing stored, by reason",
                ["reason"],
                registry=r,
            ),
        )
        self.sender = SenderMetrics(
            Counter(
                "engine_sends",
                "Delivery attempts by outcome: sent (250), retry, dead (dead-lettered), "
                "released (handed back unsent at shutdown)",
                ["outcome"],
                registry=r,
            ),
            Histogram(
                "engine_send_latency_seconds",
                "Enqueue to 250, by attempt (first, or a retry after backoff)",
                ["attempt"],
                buckets=SEND_BUCKETS_S,
                registry=r,
            ),
            Counter(
                "engine_rate_slowdowns",
                "Shared rate-limit buckets halved after a 421/451",
                registry=r,
            ),
            Counter(
                "engine_transport_trips",
                "Transport failures seen here that opened its breaker or failed its probe",
                ["transport"],
                registry=r,
            ),
            Gauge(
                "engine_transport_up",
                "1 while the transport's breaker is closed, 0 while its mail fails over or waits",
                ["transport"],
                registry=r,
            ),
            Counter(
                "engine_bounces",
                "Failed delivery attempts by bounce class (engine/bounce.py)",
                ["class"],
                registry=r,
            ),
        )
        self.webhooks = WebhookMetrics(
            Counter(
                "engine_webhook_requests",
                "Webhook requests by outcome: delivered, retrying, given-up, disabled",
                ["outcome"],
                registry=r,
            ),
            Counter("engine_webhook_events", "Events delivered to webhook endpoints", registry=r),
            Gauge(
                "engine_webhook_lag_entries",
                "Event-stream entries the webhooks consumer group has not read yet (past "
                "queue.events_maxlen they are trimmed unread: endpoints would miss them)",
                registry=r,
            ),
        )
        self.history = HistoryMetrics(
            Counter("engine_history_events", "Events stored in PostgreSQL (new rows)", registry=r),
            Counter(
                "engine_history_messages", "Message rows written or merged (per batch)", registry=r
            ),
            Histogram(
                "engine_history_delay_seconds",
                "Stream entry (its Redis time) to its commit in PostgreSQL",
                buckets=HISTORY_DELAY_BUCKETS_S,
                registry=r,
            ),
            Gauge(
                "engine_history_lag_entries",
                "Event-stream entries not yet in PostgreSQL (unread + being written); past "
                "queue.events_maxlen they are trimmed unwritten",
                registry=r,
            ),
            Gauge(
                "engine_history_lag_seconds",
                "Age of the oldest stream entry not yet in PostgreSQL (0: caught up)",
                registry=r,
            ),
            Gauge("engine_history_up", "1 while PostgreSQL takes the writes", registry=r),
            Counter(
                "engine_history_write_failures",
                "Batches PostgreSQL did not take (retried: nothing is acknowledged)",
                registry=r,
            ),
            Counter(
                "engine_history_gap_entries",
                "Stream entries trimmed before the history writer read them: LOST history",
                registry=r,
            ),
        )
        self.reaper = ReaperMetrics(
            Counter(
                "engine_reaped_jobs",
                "Jobs of expired leases or dead instances: requeued or dead-lettered",
                ["outcome"],
                registry=r,
            ),
            Counter(
                "engine_reaper_promoted",
                "Delayed jobs (scheduled, retry backoff) moved to ready",
                registry=r,
            ),
            Counter(
                "engine_reaper_instances_removed",
                "Dead instances whose jobs were recovered",
                registry=r,
            ),
            Counter("engine_reaper_errors", "Reaper rounds that failed", registry=r),
        )
        self.subscribers = subscribers
        Gauge(
            "engine_websocket_subscribers", "Websocket event subscribers", registry=r
        ).set_function(self._subscribers)
        self._queue = _QueueCollector()
        r.register(self._queue)

    def _subscribers(self) -> float:
        # Looked up at scrape time, so the hub can be wired in after construction.
        return float(self.subscribers())

    def render(self, counts: QueueCountsLike | None) -> bytes:
        """The text exposition, with the queue depth ``counts`` (None: unreadable)."""
        self._queue.counts = counts
        return generate_latest(self.registry)
