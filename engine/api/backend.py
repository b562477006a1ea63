"""What the API needs from the rest of the process: ``ApiBackend``, built by the
composition root, and the small protocols it holds (the API never imports the senders)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import trio

from engine.api.hub import EventHub
from engine.auth import AccessTable
from engine.history import History
from engine.metrics import Metrics
from engine.queue import (
    Breaker,
    DomainStore,
    DrainMeter,
    Queue,
    RateLimits,
    ScheduleStore,
    WebhookStore,
)


class SenderCounts(Protocol):
    @property
    def running(self) -> int: ...


class Senders(Protocol):
    """What the API reads of the sender pool (it never imports the senders)."""

    def statistics(self) -> SenderCounts: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiBackend:
    """What the API needs from the rest of the process (built by the composition root)."""

    queue: Queue
    limits: RateLimits
    # Each transport's circuit breaker, in routing order (GET /v1/transports, the
    # dashboard's banner).
    breakers: list[Breaker]
    schedules: ScheduleStore
    senders: Senders
    # False for an ingest-only replica (role "api"): readiness does not wait for senders.
    expects_senders: bool
    # Set when shutdown begins: ingest answers 503 instead of accepting.
    stopping: trio.Event
    # How fast the queue drains (all replicas): Retry-After when the backlog is full.
    drain: DrainMeter
    # This process's metrics (GET /metrics); the composition root shares them.
    metrics: Metrics = field(default_factory=Metrics)
    # The websocket event hub (WS /v1/events, GET /v1/messages/{id}/events); None: no
    # event routes. Its tail runs in the composition root's task tree.
    events: EventHub | None = None
    # Maildir of the embedded sink (the dashboard lists captured mail); None: no such sink.
    sink_maildir: str | None = None
    # API keys and tenants (kept fresh by the composition root); None: auth is off.
    access: AccessTable | None = None
    # Webhook endpoints and deliveries (/v1/webhooks); None: webhooks are off.
    webhooks: WebhookStore | None = None
    # DKIM signing domains (/v1/domains); None: no such routes.
    domains: DomainStore | None = None
    # The message history in PostgreSQL (/v1/history, fallbacks); None: no history.dsn.
    history: History | None = None
