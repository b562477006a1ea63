"""One chaos run end to end, into one run directory (loadtest/RUNDIR.md):

1. ``Cluster.up()``: N replicas behind HAProxy, Redis with AOF, the sink.
2. Locust (``loadtest.load.start_load``) against the balancer for the run's length.
3. The scenario's fault steps at their times (RUN/faults.json after each).
4. Locust ends; then the drain: wait until every accepted id was delivered or
   dead-lettered (or the drain time runs out: those ids are reported as pending).
5. RUN/states.json: every accepted id's state, read straight from Redis.
6. ``Cluster.down()``, then ``loadtest.report.write_report``: report.md and the plots.

Progress goes to stderr, one line every few seconds. The exit code is the report's
(0 nothing lost, 1 something accepted was lost or a watcher saw events out of order,
2 the run could not be reconciled).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.embedded import ChildError, redis_run
from engine.queue import Redis
from fixtures.auth import TEST_ADMIN_KEY
from loadtest.chaos import history, providers, webhooks
from loadtest.chaos.scenarios import Fault, Scenario
from loadtest.cluster import Cluster
from loadtest.load import (
    LoadRun,
    LoadSettings,
    default_lease_s,
    default_probe_max_s,
    start_load,
    update_meta,
)
from loadtest.recorder import write_json
from loadtest.report import write_report

PENDING = ("queued", "scheduled", "processing", "retrying")
_PROGRESS_S = 5.0
_OVERRUN_S = 10.0  # Locust's time past its run time to write its reports and exit


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@dataclass
class ChaosSettings:
    scenario: Scenario
    run_dir: Path
    seconds: float = 60.0  # load duration (at least the scenario's min_seconds)
    users: int = 20
    spawn_rate: float = 10.0
    replicas: int = 2
    senders: int = 16
    drain_s: float = 120.0  # how long undelivered accepted ids get after the load
    weights: str | None = None  # LOAD_WEIGHTS for the Locust users
    wait: str | None = None  # LOAD_WAIT
    lease_s: float | None = None  # queue.lease_s of the replicas (None: the default)
    engine_env: dict[str, str] = field(default_factory=dict)


class Tally:
    """Accepted ids (Locust's files) and deliveries (the sink's log, and ``extra``: ids
    delivered elsewhere since its last call, e.g. at a provider emulator), read
    incrementally."""

    def __init__(
        self, run_dir: Path, sink_log: Path, extra: Callable[[], Iterable[str]] | None = None
    ) -> None:
        self.run_dir = run_dir
        self.sink_log = sink_log
        self.extra = extra
        self.accepted: set[str] = set()
        self.delivered: set[str] = set()
        self._offsets: dict[Path, int] = {}

    def _lines(self, path: Path) -> Iterable[str]:
        try:
            with path.open("rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a trailing partial line waits for the next poll
        self._offsets[path] = self._offsets.get(path, 0) + end
        return data[:end].decode(errors="replace").splitlines()

    def poll(self) -> None:
        for path in sorted((self.run_dir / "accepted").glob("*.csv")):
            for line in self._lines(path):
                job_id = line.partition(",")[0].strip()
                if job_id:
                    self.accepted.add(job_id)
        for line in self._lines(self.sink_log):
            try:
                job_id = json.loads(line).get("job_id")
            except ValueError:
                continue
            if job_id:
                self.delivered.add(job_id)
        if self.extra is not None:
            self.delivered.update(self.extra())

    def undelivered(self) -> set[str]:
        return self.accepted - self.delivered


def read_states(cluster: Cluster, ids: Iterable[str], chunk: int = 2000) -> dict[str, str]:
    """Each id's ``state`` field, pipelined HGETs straight to Redis; ``missing`` for an
    id without a record."""
    ids = list(ids)

    async def go(r: Redis) -> dict[str, str]:
        out: dict[str, str] = {}
        for i in range(0, len(ids), chunk):
            part = ids[i : i + chunk]
            async with r.pipeline(transaction=False) as p:
                replies = [p.hget(cluster.keys.job(j), "state") for j in part]
            for job_id, reply in zip(part, replies, strict=True):
                value = await reply
                out[job_id] = value.decode() if isinstance(value, bytes) else "missing"
        return out

    return redis_run(cluster.redis_url, go, timeout_s=30.0)


def _wait_redis(cluster: Cluster, timeout_s: float) -> None:
    """Redis answers PING (it may still be loading its AOF after a restart)."""
    deadline = time.monotonic() + timeout_s
    while not cluster.redis.ping():
        if time.monotonic() > deadline:
            raise ChildError(f"redis not answering PING after {timeout_s:g}s")
        time.sleep(0.2)


def _progress(tally: Tally, cluster: Cluster, started: float, what: str) -> None:
    tally.poll()
    up = [n for n, pid in zip(cluster.names, cluster.replica_pids, strict=True) if pid]
    say(
        f"{what} +{time.time() - started:.0f}s: accepted {len(tally.accepted):,}, "
        f"delivered {len(tally.delivered & tally.accepted):,}, replicas running "
        f"{', '.join(up) or 'none'}"
    )


def _sleep_until(t: float, tally: Tally, cluster: Cluster, started: float, load: LoadRun) -> None:
    while True:
        left = t - time.time()
        if left <= 0 or not load.running():
            return
        time.sleep(min(left, _PROGRESS_S))
        if time.time() < t and load.running():
            _progress(tally, cluster, started, "load")


def run(settings: ChaosSettings) -> int:
    """Run the scenario; return the report's exit code (see the module docstring)."""
    s = settings
    sc = s.scenario
    seconds = max(s.seconds, sc.min_seconds)
    run_dir = s.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(s.engine_env)
    if s.lease_s is not None:
        env["ENGINE_QUEUE__LEASE_S"] = str(s.lease_s)
    lease_s = s.lease_s if s.lease_s is not None else default_lease_s()
    if sc.webhooks:
        env.update(webhooks.ENGINE_ENV)
    pg = history.start() if sc.history else None
    if pg is not None:
        env.update(history.ENGINE_ENV, ENGINE_HISTORY_DSN=pg.dsn)
    emulator = providers.ProviderEmulator(run_dir) if sc.providers else None
    if emulator is not None:
        env.update(providers.engine_env(emulator.port))
    cluster = Cluster(run_dir, replicas=s.replicas, senders=s.senders, engine_env=env)
    cluster.history_postgres = pg
    cluster.provider_emulator = emulator
    receiver = webhooks.Receiver(run_dir) if sc.webhooks else None
    cluster.webhook_receiver = receiver
    faults: list[Fault] = []
    say(f"scenario {sc.name}: {sc.summary}")
    say(
        f"run dir {run_dir}; {s.replicas} replicas x {s.senders} senders behind HAProxy; "
        f"{os.cpu_count()} cores; load {seconds:g} s, {s.users} users"
    )
    try:
        if emulator is not None:
            emulator.start()
            say(f"{providers.PROVIDER} emulator at {emulator.base}, routed first; smtp second")
        cluster.up()
        say(f"cluster up: balancer {cluster.lb_url}, replicas {', '.join(cluster.replica_urls)}")
        update_meta(
            run_dir,
            scenario=sc.name,
            summary=sc.summary,
            replicas=s.replicas,
            senders=s.senders,
            cores=os.cpu_count(),
            lease_s=lease_s,
            breaker_probe_max_s=float(
                env.get("ENGINE_SENDER__BREAKER_PROBE_MAX_S", default_probe_max_s())
            ),
            host=cluster.lb_url,
        )
        sink_log = cluster.sink.log_file
        assert sink_log is not None, "the cluster's sink logs every delivery"
        tally = Tally(run_dir, sink_log, emulator.new_ids if emulator is not None else None)
        sampler = history.LagSampler(cluster.replica_urls).start() if pg is not None else None
        if receiver is not None:
            receiver.start()
            hook = receiver.subscribe(cluster.lb_url, {"Authorization": f"Bearer {TEST_ADMIN_KEY}"})
            say(f"webhook endpoint {hook} -> {receiver.url}")
        load = start_load(
            LoadSettings(
                cluster.lb_url,
                run_dir,
                seconds=seconds,
                users=s.users,
                spawn_rate=s.spawn_rate,
                weights=s.weights,
                wait=s.wait,
                print_stats=False,
                api_key=TEST_ADMIN_KEY,  # the key every replica registers (Cluster)
            )
        )
        started = load.started_at
        update_meta(run_dir, started_at=started)
        write_json(run_dir / "faults.json", faults)
        for step in sc.steps:
            _sleep_until(started + step.at_s, tally, cluster, started, load)
            if not load.running():
                say("Locust ended before the fault step: see RUN/locust.log")
                break
            say(f"fault +{time.time() - started:.0f}s: starting")
            fault = step.run(cluster)
            faults.append(fault)
            write_json(run_dir / "faults.json", faults)
            held = "" if fault["in_flight"] is None else f" ({fault['in_flight']} jobs held)"
            say(
                f"fault {fault['name']}{held}: over after "
                f"{(fault['until'] or fault['at']) - fault['at']:.1f} s"
            )
        _sleep_until(started + seconds + _OVERRUN_S, tally, cluster, started, load)
        if load.running():
            # Seen once in ~20 runs: Locust logged "Shape test stopping" and its users
            # went on. The run is bounded here, not by Locust.
            say(
                f"Locust still runs {_OVERRUN_S:g} s after its run time: stopping it "
                "(SIGINT; its greenlets' stacks go to RUN/locust-stacks-<pid>.txt)"
            )
            os.kill(load.pid, signal.SIGUSR2)
            time.sleep(1.0)
            result = load.stop()
        else:
            result = load.wait()
        say(
            f"load over: {result.summary.accepted:,} accepted, "
            f"{result.summary.requests_per_s:,.0f} requests/s, Locust exit {result.returncode}"
        )
        _drain(cluster, tally, s.drain_s, started)
        _wait_redis(cluster, 30)
        tally.poll()
        states = read_states(cluster, sorted(tally.accepted))
        write_json(run_dir / "states.json", states)
        if pg is not None:
            kept = history.reconcile(
                pg.dsn, tally.accepted, states,
                history.stream_events(cluster.redis_url, cluster.keys.events),
                cluster.replica_urls, wait_s=120,
            )  # fmt: skip
            kept["peak_lag_entries"] = sampler.stop() if sampler is not None else 0
            write_json(run_dir / "history.json", kept)
            say(
                f"history: {kept['messages_in_postgres']:,} messages of {kept['accepted']:,} "
                f"accepted, {kept['missing']:,} missing, {kept['duplicate_events']:,} duplicate "
                f"events, {kept['stream_events_missing']:,} stream events missing"
            )
        if receiver is not None:
            hooks = webhooks.reconcile(receiver, tally.delivered, wait_s=120)
            write_json(run_dir / "webhooks.json", hooks)
            say(
                f"webhooks: {hooks['distinct']:,} of {hooks['delivered_messages']:,} deliveries "
                f"told, {hooks['missing']:,} missing, {hooks['repeats']:,} repeats"
            )
        if emulator is not None:
            routed = providers.reconcile(emulator, tally.accepted, sink_log, faults)
            emulator.write_log(run_dir / "provider-emails.jsonl")
            write_json(run_dir / "providers.json", routed)
            say(providers.verdict(routed))
        update_meta(run_dir, ended_at=time.time())
    except ChildError as exc:  # a ClusterError, or a process that did not start
        say(f"cluster failed: {exc}")
        return 2
    finally:
        if receiver is not None:
            receiver.stop()
        if emulator is not None:
            emulator.stop()
        stopped = cluster.down(graceful=True)
        if pg is not None:
            pg.close()
        say(f"cluster down (stopped {', '.join(stopped) or 'nothing'}); logs in {cluster.logs}")
    report = write_report(run_dir)
    exit_code = report.exit_code
    if (run_dir / "history.json").exists():
        kept = json.loads((run_dir / "history.json").read_text())
        with (run_dir / "report.md").open("a", encoding="utf-8") as f:
            f.write(history.markdown(kept, kept.get("peak_lag_entries", 0)))
        if not history.ok(kept):
            exit_code = max(exit_code, 1)
    if (run_dir / "webhooks.json").exists():
        hooks = json.loads((run_dir / "webhooks.json").read_text())
        with (run_dir / "report.md").open("a", encoding="utf-8") as f:
            f.write(webhooks.markdown(hooks))
        if hooks["missing"]:
            exit_code = max(exit_code, 1)
    verdict = report.verdict
    if (run_dir / "providers.json").exists():
        routed = json.loads((run_dir / "providers.json").read_text())
        with (run_dir / "report.md").open("a", encoding="utf-8") as f:
            f.write(providers.markdown(routed))
        if not providers.ok(routed):
            exit_code = max(exit_code, 1)
            verdict = verdict.replace("PASS", "FAIL", 1)
        verdict += "\n" + providers.verdict(routed)
    say(f"report: {run_dir / 'report.md'}")
    print(verdict, flush=True)
    return exit_code


def _drain(cluster: Cluster, tally: Tally, drain_s: float, started: float) -> None:
    """Wait until every accepted id is delivered or dead-lettered, at most ``drain_s``."""
    deadline = time.time() + drain_s
    next_note = 0.0
    while True:
        tally.poll()
        waiting = tally.undelivered()
        if not waiting:
            say("drained: every accepted message reached the sink")
            return
        if time.time() >= next_note or time.time() >= deadline:
            try:
                states = read_states(cluster, waiting)
            except Exception:  # Redis down or loading: coredis's or the OS's error
                states = {}
            pending = sum(1 for v in states.values() if v in PENDING)
            if states and not pending:
                say(
                    f"drained: {len(waiting):,} accepted ids are undelivered but not pending "
                    "(dead-lettered or lost: see the report)"
                )
                return
            if time.time() >= deadline:
                say(f"drain time over: {pending:,} ids still pending")
                return
            say(
                f"drain +{time.time() - started:.0f}s: {len(waiting):,} undelivered, "
                f"{pending:,} of them pending"
            )
            next_note = time.time() + _PROGRESS_S
        time.sleep(0.5)
