"""The chaos scenarios: which faults, when, and for how long.

A scenario is a list of steps, each started ``at_s`` seconds after the load began;
a step injects one fault into the running ``Cluster``, waits for its window, ends it,
and returns the fault's record for RUN/faults.json (see loadtest/RUNDIR.md). Steps run
one after another on the runner's thread, so their windows never overlap.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadtest.chaos import providers
from loadtest.cluster import Cluster

Fault = dict[str, Any]


@dataclass(frozen=True)
class Step:
    at_s: float  # seconds after the load started
    run: Callable[[Cluster], Fault]


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    steps: tuple[Step, ...]
    min_seconds: float  # shortest load that leaves room to see recovery after the last step
    replicas: int = 2
    webhooks: bool = False  # a webhook receiver and endpoint, reconciled at the end
    history: bool = False  # a PostgreSQL the replicas write their history to, reconciled
    providers: bool = False  # a Resend emulator routed first, the sink second, reconciled


def _fault(
    name: str, kind: str, target: str, at: float, until: float | None, in_flight: int | None = None
) -> Fault:
    return {
        "name": name,
        "kind": kind,
        "target": target,
        "at": at,
        "until": until,
        "in_flight": in_flight,
    }


def kill9(replica: int, down_s: float) -> Callable[[Cluster], Fault]:
    """kill -9 a replica, leave it dead ``down_s``, start it again (same instance name:
    its processing list is its own again, and the reaper returns what it held)."""

    def run(c: Cluster) -> Fault:
        name = c.names[replica]
        at = time.time()
        held = c.kill_replica(replica, signal.SIGKILL)
        time.sleep(down_s)
        c.start_replica(replica)
        return _fault(f"kill -9 {name}", "kill9", name, at, time.time(), held)

    return run


def rolling_restart(gap_s: float) -> Callable[[Cluster], Fault]:
    """SIGTERM each replica in turn (it drains and hands unsent jobs back), start it
    again, wait until it is ready, pause ``gap_s``: a release rollout."""

    def run(c: Cluster) -> Fault:
        at = time.time()
        for i in range(c.replicas):
            c.sigterm_replica(i, wait=True)
            c.start_replica(i)
            time.sleep(gap_s)
        return _fault("rolling restart (SIGTERM)", "sigterm", "all replicas", at, time.time())

    return run


def redis_restart(down_s: float) -> Callable[[Cluster], Fault]:
    """Kill Redis (SIGKILL, no shutdown save), keep it down ``down_s``, start it again on
    its AOF. Acknowledged writes are in the AOF file (the page cache survives a process
    kill), so nothing accepted may be missing afterwards."""

    def run(c: Cluster) -> Fault:
        at, ready = c.restart_redis(down_s)
        return _fault(f"Redis killed for {down_s:g} s", "redis-restart", "redis", at, ready)

    return run


def sink_fail(window_s: float, code: int = 451) -> Callable[[Cluster], Fault]:
    """Every delivery is refused with ``code`` (temporary) for ``window_s``: the engine
    must retry with backoff and deliver everything once the window ends."""

    def run(c: Cluster) -> Fault:
        at = time.time()
        c.sink_faults(fail_ratio=1.0, fail_code=code)
        time.sleep(window_s)
        c.sink_clear()
        return _fault(
            f"sink answers {code} for {window_s:g} s", "sink-fail", "sink", at, time.time()
        )

    return run


def sink_slow(window_s: float, delay_ms: int) -> Callable[[Cluster], Fault]:
    """Every delivery waits ``delay_ms`` for its reply for ``window_s``."""

    def run(c: Cluster) -> Fault:
        at = time.time()
        c.sink_faults(delay_ms=delay_ms)
        time.sleep(window_s)
        c.sink_clear()
        return _fault(
            f"sink {delay_ms} ms slow for {window_s:g} s", "sink-slow", "sink", at, time.time()
        )

    return run


def smtp_outage(down_s: float) -> Callable[[Cluster], Fault]:
    """The SMTP server is stopped for ``down_s`` (open sessions cut, connections
    refused), then back on its port. The engine must spend no attempt on it (circuit
    breaker), dead-letter nothing, and resume within its longest probe interval + 2 s
    of the server's return."""

    def run(c: Cluster) -> Fault:
        at = time.time()
        c.stop_sink()
        time.sleep(down_s)
        c.start_sink()
        return _fault(f"SMTP server down for {down_s:g} s", "smtp-outage", "sink", at, time.time())

    return run


def receiver_down(seconds: float) -> Callable[[Cluster], Fault]:
    """The webhook receiver is killed, and started again ``seconds`` later (same port):
    deliveries owed meanwhile are retried with backoff."""

    def run(c: Cluster) -> Fault:
        receiver = c.webhook_receiver
        assert receiver is not None, "a webhooks scenario starts a receiver"
        at = time.time()
        receiver.stop()
        time.sleep(seconds)
        receiver.start()
        return _fault(
            f"webhook receiver down for {seconds:g} s", "receiver-down", "receiver", at,
            time.time(),
        )  # fmt: skip

    return run


def postgres_restart() -> Callable[[Cluster], Fault]:
    """PostgreSQL restarted (fast shutdown: sessions cut, then started again at once):
    the writers' connections break mid-batch and come back."""

    def run(c: Cluster) -> Fault:
        pg = c.history_postgres
        assert pg is not None, "a history scenario starts a PostgreSQL"
        at = time.time()
        pg.stop()
        pg.start()
        return _fault("PostgreSQL restarted", "postgres-restart", "postgres", at, time.time())

    return run


def postgres_outage(seconds: float) -> Callable[[Cluster], Fault]:
    """PostgreSQL killed (-9: crash recovery at its start), down ``seconds`` under load:
    the writers retry, their lag grows, nothing may be lost."""

    def run(c: Cluster) -> Fault:
        pg = c.history_postgres
        assert pg is not None, "a history scenario starts a PostgreSQL"
        at = time.time()
        pg.kill()
        time.sleep(seconds)
        pg.start()
        return _fault(
            f"PostgreSQL killed, down {seconds:g} s", "postgres-outage", "postgres", at,
            time.time(),
        )  # fmt: skip

    return run


def redis_cut(replica: int, seconds: float) -> Callable[[Cluster], Fault]:
    """Reset one replica's connections to Redis and refuse new ones for ``seconds``
    (a network partition between that replica and Redis)."""

    def run(c: Cluster) -> Fault:
        name = c.names[replica]
        at = time.time()
        held = c.in_flight(replica)
        until = c.cut_redis(replica, seconds, wait=True)
        return _fault(
            f"{name} cut from Redis for {seconds:g} s", "redis-cut", name, at, until, held
        )

    return run


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("baseline", "no fault: load capacity and latency", (), min_seconds=20),
        Scenario(
            "kill9",
            "kill -9 one replica under load, restart it 3 s later",
            (Step(15, kill9(1, 3.0)),),
            min_seconds=40,
        ),
        Scenario(
            "rolling",
            "SIGTERM each replica in turn and start it again (rollout)",
            (Step(15, rolling_restart(3.0)),),
            min_seconds=60,
        ),
        Scenario(
            "redis-restart",
            "kill Redis, 3 s down, restart on its AOF",
            (Step(15, redis_restart(3.0)),),
            min_seconds=45,
        ),
        Scenario(
            "sink-fail",
            "the SMTP sink answers 451 to everything for 8 s",
            (Step(15, sink_fail(8.0)),),
            min_seconds=45,
        ),
        Scenario(
            "sink-slow",
            "the SMTP sink takes 500 ms per reply for 10 s",
            (Step(15, sink_slow(10.0, 500)),),
            min_seconds=45,
        ),
        Scenario(
            "smtp-outage",
            "the SMTP server is stopped for 60 s under load, then back",
            (Step(15, smtp_outage(60.0)),),
            min_seconds=100,
        ),
        Scenario(
            "redis-cut",
            "one replica loses its Redis connections for 5 s",
            (Step(15, redis_cut(0, 5.0)),),
            min_seconds=45,
        ),
        Scenario(
            "webhooks",
            "webhooks under load: kill -9 a replica mid-delivery, then the receiver down 30 s",
            (Step(15, kill9(1, 3.0)), Step(25, receiver_down(30.0))),
            min_seconds=75,
            webhooks=True,
        ),
        Scenario(
            "history",
            "the message history under load: PostgreSQL restarted, then killed and down 30 s",
            (Step(15, postgres_restart()), Step(30, postgres_outage(30.0))),
            min_seconds=90,
            history=True,
        ),
        Scenario(
            "provider-outage",
            "Resend emulator first, sink second: Resend answers 500 for 20 s, then "
            "accepts 5 requests without answering, then kill -9 of a replica",
            (
                Step(15, providers.outage(20.0)),
                Step(40, providers.accept_then_hang(5)),
                Step(55, kill9(1, 3.0)),
            ),
            min_seconds=75,
            providers=True,
        ),
        Scenario(
            "kill9-twice",
            "kill -9 each replica in turn (one at a time), 20 s apart",
            (Step(15, kill9(1, 3.0)), Step(35, kill9(0, 3.0))),
            min_seconds=60,
        ),
    )
}
