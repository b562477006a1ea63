"""Composition root: builds every component and runs the task tree of one engine process.

    run_engine
    ├── queue.serve      group-commit flushers (enqueue, ack)
    ├── serve_reaper     heartbeat + lease renewal, recovery, delayed promotion
    ├── scheduler.serve  fires due ticks of recurring schedules (every replica; exactly once)
    ├── drain.serve      samples how fast the queue drains (Retry-After of a full backlog)
    ├── serve_senders    N sender tasks
    ├── hub.serve        tails the event stream for this replica's websockets (API roles)
    └── serve_http       hypercorn (trio worker) running the API

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

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio import serve as hypercorn_serve

from engine.api import ApiBackend, build_app
from engine.api.asgi import ASGIApp
from engine.api.drain import DrainMeter
from engine.api.hub import EventHub
from engine.config import HttpSettings, Settings
from engine.errors import EngineError
from engine.metrics import Metrics
from engine.queue import Queue, RateLimits, open_redis
from engine.queue.events import EventLog
from engine.queue.schedules import ScheduleStore
from engine.reaper import Reaper
from engine.scheduler import Scheduler
from engine.sender import SenderPool
from engine.transport.base import Transport
from engine.transport.smtp import SmtpPool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Running:
    """Handed to ``task_status.started`` once the engine serves."""

    instance: str
    http_binds: list[str]
    queue: Queue
    senders: SenderPool


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


async def serve_http(
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
    instance = instance_id(settings)
    if shutdown_grace_s is None:
        shutdown_grace_s = settings.sender.shutdown_grace_s
    stop = stop if stop is not None else trio.Event()
    async with open_redis(
        redis_url,
        connect_timeout_s=settings.redis.connect_timeout_s,
        command_timeout_s=settings.redis.command_timeout_s,
    ) as client:
        queue = Queue(
            client, settings.queue, instance, limits=settings.limits, ingest=settings.ingest
        )
        limits = RateLimits(client, queue.keys, settings.limits)
        try:
            await queue.load_scripts()
            await limits.publish()
        except EngineError as exc:  # Redis may be down now; EVALSHA reloads later
            log.warning("engine.scripts.not_loaded error=%s", exc)
        transport = transport or SmtpPool(settings.smtp, smtp_url)
        # One registry per process, shared by the parts that count (GET /metrics).
        metrics = Metrics(instance=instance, role=settings.role)
        pool = SenderPool(
            queue, transport, settings.sender, settings.queue, limits, metrics=metrics.sender
        )
        reaper = Reaper(queue, pool.holding, settings.queue, metrics=metrics.reaper)
        schedules = ScheduleStore(client, queue.keys)
        scheduler = Scheduler(
            schedules, queue, settings.scheduler, default_from=settings.sender.default_from
        )
        draining = False
        with_senders = settings.role in ("all", "sender")
        # Every role listens on http.bind: sender-only replicas answer /healthz, /readyz
        # and /metrics there (probes and scrapes), and nothing else.
        with_api = settings.role in ("all", "api")
        drain = DrainMeter(queue)
        hub = EventHub(EventLog(client, queue.keys), settings.events)
        metrics.subscribers = lambda: hub.statistics().subscribers
        backend = ApiBackend(
            queue,
            lambda: pool.statistics().running,
            with_senders,
            lambda: draining,
            limits,
            schedules,
            drain.rate,
            sink_maildir=sink_maildir,
            metrics=metrics,
            events=hub,
        )
        app = build_app(backend, settings)
        http_stop = trio.Event()
        try:
            async with trio.open_nursery() as root:
                if handle_signals:
                    root.start_soon(_watch_signals, stop, root.cancel_scope)
                await root.start(queue.serve)
                await root.start(reaper.serve)
                await root.start(scheduler.serve)
                senders = trio.CancelScope()
                senders_done = trio.Event()

                async def run_senders() -> None:
                    try:
                        with senders:
                            await pool.serve()
                    finally:
                        senders_done.set()

                if with_senders:
                    root.start_soon(run_senders)
                else:
                    senders_done.set()
                binds: list[str] = []
                if with_api:
                    await root.start(drain.serve)
                    await root.start(hub.serve)
                binds = await root.start(serve_http, app, settings.http, http_stop)
                log.info(
                    "engine.started instance=%s role=%s http=%s", instance, settings.role, binds
                )
                task_status.started(Running(instance, binds, queue, pool))

                await stop.wait()
                log.info(
                    "engine.stopping grace=%.1fs in_flight=%d",
                    shutdown_grace_s,
                    pool.statistics().in_flight,
                )
                draining = True
                pool.stop_claiming()
                with trio.move_on_after(shutdown_grace_s):
                    await senders_done.wait()
                senders.cancel()
                await senders_done.wait()
                with trio.move_on_after(5):
                    try:
                        # Jobs whose claim we never learned of (a claim reply lost),
                        # go back now rather than after a lease; sends cut off by the
                        # grace period stay leased (they may have reached the server).
                        released = await queue.release_unheld(pool.holding())
                        if released:
                            log.info("engine.released_unheld jobs=%d", released)
                        await queue.leave()
                    except EngineError as exc:
                        log.warning("engine.leave.failed error=%s", exc)
                with trio.move_on_after(1):
                    await hub.close()  # websockets get 1001 and can resume elsewhere
                http_stop.set()
                root.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await transport.aclose()
    log.info("engine.stopped instance=%s", instance)


async def _watch_signals(stop: trio.Event, root: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            if stop.is_set():
                log.warning("engine.stop.forced second signal: exiting now")
                root.cancel()
                return
            stop.set()
