"""Composition root: ``build`` makes every component of one engine process, ``run``
runs its task tree; ``run_engine`` does both on one Redis connection.

    run
    ├── queue.serve      group-commit flushers (enqueue, ack)
    ├── reaper.serve     heartbeat + lease renewal, recovery, delayed promotion
    ├── scheduler.serve  fires due ticks of recurring schedules (every replica; exactly once)
    ├── drain.serve      samples how fast the queue drains (Retry-After of a full backlog)
    ├── signer.serve     DKIM keys: reloads /v1/domains' when they change (sender roles)
    ├── senders.serve    N sender tasks
    ├── hub.serve        tails the event stream for this replica's websockets (API roles)
    └── serve_http       the HTTP server (engine/http, or hypercorn) running the API

Shutdown (SIGTERM/SIGINT): stop intake (503), stop claiming, let in-flight sends
finish within the grace period, hand claimed-but-unsent jobs back, exit. A second
signal cancels at once (the reaper of any replica covers what is left).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
from dataclasses import dataclass

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hypercorn_serve

from engine.api import ApiBackend, ASGIApp, EventHub, body_limits, build_app
from engine.auth import AccessTable, AdminKey, ensure_admin
from engine.config import HttpSettings, Settings, redact_url
from engine.errors import ConfigError, EngineError
from engine.history import History, build_history
from engine.http import ServerSettings, serve_http
from engine.metrics import Metrics
from engine.queue import (
    AccessStore,
    BlobStore,
    Breaker,
    DomainStore,
    DrainMeter,
    EventLog,
    Queue,
    RateLimits,
    Redis,
    RespConnection,
    ScheduleStore,
    WebhookStore,
    open_redis,
)
from engine.reaper import Reaper
from engine.scheduler import Scheduler
from engine.sender import AttachmentCache, Route, Router, SenderPool, Signer, TransportGate
from engine.transport import (
    PROVIDER_SCHEMES,
    MemoryTransport,
    SmtpPool,
    Transport,
    is_provider_url,
    transport_for,
)
from engine.webhooks import Dispatcher

log = logging.getLogger(__name__)

# Seconds shutdown gives the steps after the senders (hand-back, websocket goodbyes,
# closing SMTP connections), on top of the senders' grace period.
_CLOSE_S = 5.0


@dataclass(frozen=True, slots=True)
class Running:
    """Handed to ``task_status.started`` once the engine serves."""

    instance: str
    http_binds: list[str]
    queue: Queue
    senders: SenderPool
    # The admin key this start made (shown once) and the file that keeps it; None: auth off.
    admin: AdminKey | None = None


def instance_id(settings: Settings) -> str:
    if settings.instance:
        return settings.instance
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _HypercornConfig(HypercornConfig):
    """Hypercorn's config whose listening sockets carry TCP_USER_TIMEOUT (accepted
    connections inherit it): hypercorn shields its socket writes from cancellation, so
    only the kernel can end a write to a client that stopped reading."""

    def __init__(self, stalled_client_timeout_s: float) -> None:
        super().__init__()
        self._user_timeout_ms = int(stalled_client_timeout_s * 1000)

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        option = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
        if option is not None and self._user_timeout_ms > 0:
            for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
                if sock.family in (socket.AF_INET, socket.AF_INET6):
                    sock.setsockopt(socket.IPPROTO_TCP, option, self._user_timeout_ms)
        return sockets


async def serve_hypercorn(
    app: ASGIApp,
    settings: HttpSettings,
    shutdown: trio.Event,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    config = _HypercornConfig(settings.stalled_client_timeout_s)
    config.bind = [settings.bind]
    config.accesslog = None
    config.errorlog = logging.getLogger("engine.http")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 5
    await hypercorn_serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Components:
    """One engine process, built and not yet running (``build``; ``run`` runs it)."""

    settings: Settings
    instance: str
    queue: Queue
    rate_limits: RateLimits
    router: Router  # the transports, by name, and their breakers
    senders: SenderPool
    reaper: Reaper
    scheduler: Scheduler
    drain: DrainMeter
    hub: EventHub
    app: ASGIApp
    stopping: trio.Event  # set when shutdown begins: intake answers 503
    access: AccessTable | None  # None: auth.enabled is false
    dispatcher: Dispatcher | None  # None: webhooks.enabled is false
    signer: Signer  # DKIM keys (settings and /v1/domains) the senders sign with
    history: History | None = None  # None: no history.dsn (no PostgreSQL history)


def build(
    settings: Settings,
    client: Redis,
    *,
    smtp_url: str,
    transport: Transport | None = None,
    sink_maildir: str | None = None,
    redis_url: str,
) -> Components:
    """Build every component of one process on one Redis client; starts nothing.
    ``redis_url``: the client's, for the lean stream readers (webhooks, history)."""
    instance = instance_id(settings)
    queue = Queue(
        client, settings.queue, instance, rate_limits=settings.limits, ingest=settings.ingest
    )
    rate_limits = RateLimits(client, queue.keys, settings.limits, settings.routing.rates)
    # One registry per process, shared by the parts that count (GET /metrics).
    metrics = Metrics(instance=instance, role=settings.role)
    router = _router(settings, client, queue, metrics, smtp_url=smtp_url, smtp=transport)
    domains = DomainStore(client, queue.keys)
    signer = Signer.from_settings(settings.dkim, domains)
    senders = SenderPool(
        queue, None, settings.sender, settings.queue, rate_limits,
        metrics=metrics.sender, router=router,
        attachments=AttachmentCache(
            BlobStore(client, queue.keys, settings.queue),
            max_bytes=settings.attachments.cache_bytes,
        ),
        signer=signer,
    )  # fmt: skip
    schedules = ScheduleStore(client, queue.keys)
    drain = DrainMeter(queue)
    hub = EventHub(EventLog(client, queue.keys), settings.events)
    metrics.subscribers = lambda: hub.statistics().subscribers
    stopping = trio.Event()
    access = (
        AccessTable(
            AccessStore(client, queue.keys),
            refresh_s=settings.auth.refresh_s,
            identities=settings.auth.identities,
        )
        if settings.auth.enabled
        else None
    )
    hooks = None
    if settings.webhooks.enabled:
        reader = RespConnection(  # connects only when the dispatcher first reads
            redis_url, connect_timeout_s=settings.redis.connect_timeout_s,
            command_timeout_s=settings.redis.command_timeout_s,
        )  # fmt: skip
        hooks = WebhookStore(client, queue.keys, reader)
    history = build_history(settings, queue, metrics, redis_url=redis_url)
    backend = ApiBackend(
        queue=queue,
        limits=rate_limits,
        breakers=[route.gate.breaker for route in router.routes.values()],
        schedules=schedules,
        senders=senders,
        expects_senders=settings.role in ("all", "sender"),
        stopping=stopping,
        drain=drain,
        metrics=metrics,
        events=hub,
        sink_maildir=sink_maildir,
        access=access,
        webhooks=hooks,
        domains=domains,
        history=history,
    )
    return Components(
        settings=settings,
        instance=instance,
        queue=queue,
        rate_limits=rate_limits,
        router=router,
        senders=senders,
        reaper=Reaper(queue, senders.holding, settings.queue, metrics=metrics.reaper),
        scheduler=Scheduler(
            schedules, queue, settings.scheduler, default_from=settings.sender.default_from
        ),
        drain=drain,
        hub=hub,
        app=build_app(backend, settings),
        stopping=stopping,
        access=access,
        dispatcher=(
            Dispatcher(
                hooks,
                settings.webhooks,
                instance,
                metrics=metrics.webhooks,
                events_maxlen=settings.queue.events_maxlen,
            )
            if hooks
            else None
        ),
        signer=signer,
        history=history,
    )


def _router(
    settings: Settings,
    client: Redis,
    queue: Queue,
    metrics: Metrics,
    *,
    smtp_url: str,
    smtp: Transport | None,
) -> Router:
    """The transports routing names (``smtp``: ``smtp`` if given, else a pool for
    ``smtp_url``), each with its breaker shared through Redis. An api-only replica runs
    no senders: it opens no connection (nor needs an FQDN), in-memory stand-ins serve."""
    sends = settings.role in ("all", "sender")
    routes: dict[str, Route] = {}
    for name in settings.routing.names():
        if name == "smtp":
            url = smtp_url
            transport = smtp
        else:
            url, transport = settings.routing.transports[name], None
        if transport is None:
            transport = open_transport(url, settings) if sends else MemoryTransport()
        breaker = Breaker(
            client, queue.keys, name, first_wait_s=settings.sender.breaker_probe_s,
            max_wait_s=settings.sender.breaker_probe_max_s,
        )  # fmt: skip
        routes[name] = Route(name, transport, TransportGate(breaker, queue, metrics.sender))
    return Router(routes, settings.routing, queue)


def open_transport(url: str, settings: Settings) -> Transport:
    """The transport a routing URL names: SMTP (smtp://, smtps://) or a provider's API."""
    scheme = url.partition("://")[0].lower()
    if scheme in ("smtp", "smtps"):
        return SmtpPool(msgspec.structs.replace(settings.smtp, url=url), url)
    if is_provider_url(url):
        return transport_for(url, settings.providers)
    raise ConfigError(
        f"routing: {redact_url(url)!r} is no transport URL: smtp://, smtps://, or one of "
        f"{', '.join(s + '://' for s in PROVIDER_SCHEMES)}"
    )


async def run_engine(
    settings: Settings,
    *,
    redis_url: str,
    smtp_url: str,
    transport: Transport | None = None,
    shutdown_grace_s: float | None = None,
    handle_signals: bool = True,
    stop: trio.Event | None = None,
    sink_maildir: str | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one engine process until SIGTERM/SIGINT (or ``stop`` is set).

    ``sink_maildir``: where the embedded sink keeps mail (the dashboard lists it).
    """
    async with open_redis(
        redis_url,
        connect_timeout_s=settings.redis.connect_timeout_s,
        command_timeout_s=settings.redis.command_timeout_s,
    ) as client:
        parts = build(
            settings, client, smtp_url=smtp_url, transport=transport,
            sink_maildir=sink_maildir, redis_url=redis_url,
        )  # fmt: skip
        try:
            await run(
                parts,
                stop=stop if stop is not None else trio.Event(),
                grace_s=settings.sender.shutdown_grace_s
                if shutdown_grace_s is None
                else shutdown_grace_s,
                handle_signals=handle_signals,
                task_status=task_status,
            )
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_S):
                await parts.router.aclose()
                if parts.dispatcher is not None:
                    await parts.dispatcher.store.aclose()
                if parts.history is not None:
                    await parts.history.aclose()
    log.info("engine.stopped instance=%s", parts.instance)


async def run(
    parts: Components,
    *,
    stop: trio.Event,
    grace_s: float,
    handle_signals: bool,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the task tree until ``stop``, then shut down under one deadline."""
    try:
        await parts.queue.load_scripts()
        await parts.rate_limits.publish()
    except EngineError as exc:  # Redis may be down now; EVALSHA reloads later
        log.warning("engine.scripts.not_loaded error=%s", exc)
    http_stop = trio.Event()
    async with trio.open_nursery() as root:
        if handle_signals:
            root.start_soon(_watch_signals, stop, root.cancel_scope)
        await root.start(parts.queue.serve)
        await root.start(parts.reaper.serve)
        await root.start(parts.scheduler.serve)
        senders = trio.CancelScope()
        senders_done = trio.Event()

        async def run_senders() -> None:
            try:
                with senders:
                    await parts.senders.serve()
            finally:
                senders_done.set()

        role = parts.settings.role
        # Every role listens on http.bind: sender-only replicas answer /healthz, /readyz
        # and /metrics there (probes and scrapes), and nothing else.
        if role in ("all", "api"):
            await root.start(parts.drain.serve)
            await root.start(parts.hub.serve)
        if parts.access is not None:
            await _load_access(parts.access)
            await root.start(parts.access.serve)
        else:
            log.warning(
                "auth.disabled: every request acts as admin (auth.enabled = false); put "
                "the engine behind something that authenticates, or turn auth on"
            )
        # Bound before the senders start: a busy port fails the start cleanly.
        http = parts.settings.http
        http_done = trio.Event()

        async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                if http.server == "builtin":
                    server = ServerSettings.from_http(http, body_limits=body_limits(parts.settings))
                    await serve_http(parts.app, server, http_stop, task_status=task_status)
                else:
                    await serve_hypercorn(parts.app, http, http_stop, task_status=task_status)
            finally:
                http_done.set()

        binds = await root.start(run_http)
        # Only once the port is ours: a start that fails writes no key.
        admin = await _bootstrap_access(parts.access, parts.settings) if parts.access else None
        if role in ("all", "sender") and parts.dispatcher is not None:
            await root.start(parts.dispatcher.serve)
        if parts.history is not None:  # every role: the writers share the consumer group
            await root.start(parts.history.writer.serve)
            log.info(
                "history.enabled db=%r writer=%s",
                parts.history.db,
                parts.settings.history.writer,
            )
        else:
            log.info("history.disabled: no history.dsn; messages are kept in Redis only")
        if role in ("all", "sender"):
            await root.start(parts.signer.serve)  # DKIM keys, kept fresh
            await root.start(parts.router.serve)  # closes idle connections in time
            root.start_soon(run_senders)
        else:
            senders_done.set()
        log.info("engine.started instance=%s role=%s http=%s", parts.instance, role, binds)
        task_status.started(Running(parts.instance, binds, parts.queue, parts.senders, admin))

        await stop.wait()
        # One deadline for the whole shutdown: in-flight sends get the grace period,
        # the hand-back and the websocket goodbyes a few seconds more.
        deadline = trio.current_time() + grace_s + _CLOSE_S
        log.info(
            "engine.stopping grace=%.1fs in_flight=%d",
            grace_s,
            parts.senders.statistics().in_flight,
        )
        parts.stopping.set()
        parts.senders.stop_claiming()
        with trio.move_on_at(deadline - _CLOSE_S):
            await senders_done.wait()
        senders.cancel()
        await senders_done.wait()
        with trio.move_on_at(deadline):
            await _hand_back(parts)
            await parts.hub.close()  # websockets get 1001 and can resume elsewhere
        # The server drains (in-flight requests answered, idle connections closed)
        # within the same deadline.
        http_stop.set()
        with trio.move_on_at(deadline + http.shutdown_timeout_s):
            await http_done.wait()
        root.cancel_scope.cancel()


async def _load_access(access: AccessTable) -> None:
    try:
        await access.load()
    except EngineError as exc:  # Redis down: keys are refused until it is back
        log.warning("auth.load.failed error=%s", exc)


async def _bootstrap_access(access: AccessTable, settings: Settings) -> AdminKey:
    """Load the key table and make sure an admin can get in (the first start makes a
    key). With Redis down the engine still starts: keys are refused until it is back."""
    try:
        if access.version < 0:
            await access.load()
        return await ensure_admin(
            access, admin_key=settings.auth.admin_key, key_file=settings.auth.admin_key_file
        )
    except EngineError as exc:
        if isinstance(exc, ConfigError):
            raise
        log.warning("auth.bootstrap.failed error=%s", exc)
        return AdminKey(None, None)


async def _hand_back(parts: Components) -> None:
    """Return jobs whose claim we never learned of (a claim reply lost) now rather than
    after a lease; sends cut off by the grace period stay leased (they may have reached
    the server). Then leave, so any replica's reaper covers what is left."""
    try:
        released = await parts.queue.release_unheld(parts.senders.holding())
        if released:
            log.info("engine.released_unheld jobs=%d", released)
        await parts.queue.leave()
    except EngineError as exc:
        log.warning("engine.leave.failed error=%s", exc)


async def _watch_signals(stop: trio.Event, root: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            if stop.is_set():
                log.warning("engine.stop.forced second signal: exiting now")
                root.cancel()
                return
            stop.set()
