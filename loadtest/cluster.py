"""The load/chaos topology on 127.0.0.1: N ``engine serve`` replicas, one Redis (AOF,
``appendfsync everysec``), the SMTP sink and HAProxy in front -- and the fault hooks
chaos scenarios call (kill, SIGTERM, restart Redis, cut one replica off Redis, sink
faults). Each replica reaches Redis through its own ``loadtest.tcpcut`` proxy (the
``cut_redis`` hook), unless ``redis_proxies=False``.

Synchronous: subprocesses, files and sockets, usable from threads, pytest and scripts::

    with Cluster(run_dir, replicas=2) as c:        # up() ... down()
        post(c.lb_url + "/v1/messages", ...)
        held = c.kill_replica(0)                   # SIGKILL; jobs it held
        c.start_replica(0)
        c.cut_redis(1, seconds=2)
        c.restart_redis(down_s=1)
        c.sink_faults(fail_ratio=1); c.sink_clear()

Every process runs in its own session (it outlives the process that started it) and is
recorded with its pid in RUN/cluster.json, so ``Cluster.attach(run_dir)`` -- and
``scripts/cluster status|down`` -- can find and stop it from anywhere (``detach=False``:
they die with this process instead, as ``fixtures.chaos.Rig`` wants). Logs go to
RUN/logs/<name>.log (a restarted process appends to its log). Command line: ``python -m
loadtest.cluster --help`` (``scripts/cluster``). The processes are ``engine.embedded``'s
(``Child``, ``RedisServer``, ``SinkProcess``); from the engine it imports only those and
its key names.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import http.client
import io
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.embedded import Child, ChildError, RedisServer, SinkProcess, free_port, redis_run
from engine.keys import Keys
from fixtures.auth import AUTH_ENV, TEST_ADMIN_KEY
from loadtest import tcpcut
from loadtest.haproxy import LbSettings, check_config, engine_toml, ensure_haproxy, render

ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "cluster.json"
HOST = "127.0.0.1"


class ClusterError(ChildError):
    """A hook cannot act (e.g. no proxies) or a run dir is taken; a process that does not
    start raises the ChildError this is one of."""


# -- HTTP -------------------------------------------------------------------------------


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; raises OSError when nothing answers."""
    assert url.startswith("http://")
    hostport, _, path = url[len("http://") :].partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/" + path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the cluster -------------------------------------------------------------------------


class Cluster:
    """The topology of one run directory; ``up()`` starts it, ``down()`` stops it.

    Replica ``i`` (0-based) is named ``engine{i+1}``: its ``ENGINE_INSTANCE`` (so its
    processing list keeps its name across restarts), its HAProxy server name and its
    log's name. ``engine_args`` are extra ``engine serve`` flags and ``engine_env``
    extra environment (``ENGINE_QUEUE__LEASE_S``...) for every replica; ``sink_args``
    extra ``engine sink`` flags. Ports are free ones picked at construction, or
    consecutive from ``base_port`` (lb, stats, redis, sink, engines..., proxies...).
    ``redis_proxies=False`` connects the replicas to Redis directly (no ``cut_redis``;
    the proxy costs ~30 us per Redis round trip and ~5 us of CPU per message);
    ``lb=False`` runs no HAProxy (then ``replicas`` may be 0: Redis and the sink only).
    """

    def __init__(
        self,
        run_dir: Path | str,
        replicas: int = 2,
        senders: int = 16,
        base_port: int | None = None,
        engine_args: Sequence[str] = (),
        *,
        engine_env: Mapping[str, str] | None = None,
        redis_proxies: bool = True,
        sink_args: Sequence[str] = (),
        ports: Mapping[str, int] | None = None,
        startup_timeout_s: float = 60.0,
        lb: bool = True,
        detach: bool = True,
    ) -> None:
        if replicas < lb:
            raise ValueError("a cluster with a balancer needs at least one replica")
        self.run_dir = Path(run_dir).resolve()
        self.replicas = replicas
        self.senders = senders
        self.engine_args = list(engine_args)
        self.engine_env = dict(engine_env or {})
        self.redis_proxies = redis_proxies
        self.sink_args = list(sink_args)
        self.lb = lb
        self.detach = detach
        self.startup_timeout_s = startup_timeout_s
        self.names = [f"engine{i + 1}" for i in range(replicas)]
        self.ports = dict(ports) if ports is not None else self._plan_ports(base_port)
        self.keys = Keys()  # queue "mail", shard 0: the engine's defaults
        self.logs = self.run_dir / "logs"
        self.created_at: float | None = None
        # A webhook receiver next to the cluster (loadtest/chaos/webhooks.py), when a
        # scenario uses one; its faults reach it through here.
        self.webhook_receiver: Any = None
        self.history_postgres: Any = None  # a PostgresServer (chaos scenario history)
        self.provider_emulator: Any = None  # a ProviderEmulator (provider-outage)
        self._lock = threading.RLock()
        self.procs: dict[str, Child] = {}
        self._define()

    # -- layout -------------------------------------------------------------------------

    def _plan_ports(self, base: int | None) -> dict[str, int]:
        names = ["lb", "stats", "redis", "sink", *self.names]
        if self.redis_proxies:
            names += [f"redis-proxy{i + 1}" for i in range(self.replicas)]
        if base is None:
            taken: set[int] = set()
            ports: dict[str, int] = {}
            for name in names:
                port = free_port(HOST)
                while port in taken:
                    port = free_port(HOST)
                taken.add(port)
                ports[name] = port
            return ports
        return {name: base + n for n, name in enumerate(names)}

    def _define(self) -> None:
        py = sys.executable
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {"PYTHONPATH": path}
        self.redis = RedisServer(
            self.run_dir / "redis", port=self.ports["redis"], log=self.logs / "redis.log",
            loglevel="notice",
        )  # fmt: skip
        self.sink_control = self.run_dir / "sink-control.json"
        self.sink = SinkProcess(
            workdir=self.run_dir / "sink", bind=f"{HOST}:{self.ports['sink']}",
            log=self.run_dir / "sink.jsonl", stats=self.run_dir / "sink-stats.json",
            output=self.logs / "sink.log",
            extra_args=["--control", str(self.sink_control), *self.sink_args],
        )  # fmt: skip
        self.procs["redis"], self.procs["sink"] = self.redis.child, self.sink.child
        redis = self.ports["redis"]
        for i, name in enumerate(self.names):
            if self.redis_proxies:
                proxy = f"redis-proxy{i + 1}"
                proxy_argv = [
                    py, "-m", "loadtest.tcpcut", "--listen", f"{HOST}:{self.ports[proxy]}",
                    "--target", f"{HOST}:{redis}", "--control", str(self._cut_file(i)),
                ]  # fmt: skip
                log = self.logs / f"{proxy}.log"
                self.procs[proxy] = Child(proxy, proxy_argv, log, env, self.ports[proxy])
            engine_argv = [
                py, "-m", "engine", "serve", "--redis-url", self.replica_redis_urls[i],
                "--smtp-url", self.sink.url, "--bind", f"{HOST}:{self.ports[name]}",
                "--senders", str(self.senders), "--config", str(self.run_dir / "engine.toml"),
                *self.engine_args,
            ]  # fmt: skip
            # Every replica registers the test admin key (fixtures/auth.py): send AUTH.
            engine_env = {**env, **AUTH_ENV, **self.engine_env, "ENGINE_INSTANCE": name}
            log = self.logs / f"{name}.log"
            self.procs[name] = Child(name, engine_argv, log, engine_env, self.ports[name])
        if self.lb:
            haproxy_argv = ["haproxy", "-db", "-f", str(self.run_dir / "haproxy.cfg")]
            log = self.logs / "haproxy.log"
            self.procs["haproxy"] = Child("haproxy", haproxy_argv, log, port=self.ports["lb"])

    def _cut_file(self, i: int) -> Path:
        return self.run_dir / f"redis-proxy{i + 1}.cut.json"

    @property
    def lb_url(self) -> str:
        """HTTP base of the load balancer (API, dashboard at /, websockets)."""
        return f"http://{HOST}:{self.ports['lb']}"

    @property
    def stats_url(self) -> str:
        """HAProxy's statistics page (append ";csv" for CSV)."""
        return f"http://{HOST}:{self.ports['stats']}/"

    @property
    def replica_urls(self) -> list[str]:
        return [f"http://{HOST}:{self.ports[name]}" for name in self.names]

    @property
    def redis_url(self) -> str:
        """Redis itself (not through a proxy)."""
        return f"redis://{HOST}:{self.ports['redis']}/0"

    @property
    def replica_redis_urls(self) -> list[str]:
        """The Redis URL each replica uses: its own proxy, or Redis itself."""
        if not self.redis_proxies:
            return [self.redis_url] * self.replicas
        return [
            f"redis://{HOST}:{self.ports[f'redis-proxy{i + 1}']}/0" for i in range(self.replicas)
        ]

    @property
    def replica_pids(self) -> list[int | None]:
        """The pid of each replica's current run, None while it is down."""
        return [self._pid(name) for name in self.names]

    @property
    def pids(self) -> dict[str, int | None]:
        """Every process by name: its pid while it runs, else None."""
        return {name: self._pid(name) for name in self.procs}

    def _pid(self, name: str) -> int | None:
        proc = self.procs[name]
        return proc.pid if proc.alive() else None

    def replica(self, which: int | str) -> int:
        """Index of a replica given as an index or a name (``engine2`` -> 1)."""
        if isinstance(which, str):
            if which not in self.names:
                raise ClusterError(f"no replica {which!r}; replicas are {self.names}")
            return self.names.index(which)
        if not 0 <= which < self.replicas:
            raise ClusterError(f"replica index {which} out of range 0..{self.replicas - 1}")
        return which

    # -- state file ---------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        sink = self.sink
        return {
            "run_dir": str(self.run_dir),
            "created_at": self.created_at,
            "replicas": self.replicas,
            "senders": self.senders,
            "names": self.names,
            "lb_url": self.lb_url,
            "stats_url": self.stats_url,
            "dashboard_url": self.lb_url + "/",
            "replica_urls": self.replica_urls,
            "redis_url": self.redis_url,
            "replica_redis_urls": self.replica_redis_urls,
            "redis_proxies": self.redis_proxies,
            "lb": self.lb,
            "redis_dir": str(self.run_dir / "redis"),
            "sink": {
                "url": sink.url,
                "log": str(sink.log_file),
                "stats": str(sink.stats_file),
                "control": str(self.sink_control),
            },
            "engine_args": self.engine_args,
            "engine_env": self.engine_env,
            "sink_args": self.sink_args,
            "ports": self.ports,
            "logs": str(self.logs),
            "processes": {name: proc.state() for name, proc in self.procs.items()},
        }

    def save(self) -> None:
        with self._lock:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            data = json.dumps(self.describe(), indent=2).encode()
            _write_atomic(self.run_dir / STATE_FILE, data)

    @classmethod
    def attach(cls, run_dir: Path | str) -> Cluster:
        """The cluster recorded in ``run_dir``/cluster.json (started by another process)."""
        path = Path(run_dir) / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no cluster in {run_dir} ({STATE_FILE} is missing)") from None
        cluster = cls(
            data["run_dir"],
            replicas=data["replicas"],
            senders=data["senders"],
            engine_args=data["engine_args"],
            engine_env=data["engine_env"],
            redis_proxies=data["redis_proxies"],
            sink_args=data["sink_args"],
            ports=data["ports"],
            lb=data.get("lb", True),
        )
        cluster.created_at = data["created_at"]
        for name, recorded in data["processes"].items():
            proc = cluster.procs.get(name)
            if proc is not None:
                proc.argv = recorded["argv"]
                proc.env = recorded["env"]
                proc.pid = recorded["pid"]
                proc.start_ticks = recorded["start_ticks"]
        return cluster

    # -- up and down --------------------------------------------------------------------

    def up(self, *, reuse: bool = False) -> Cluster:
        """Start everything and wait until the balancer has every replica in rotation.

        A run dir that already holds a cluster is refused unless ``reuse`` (then its Redis
        data, AOF included, and its sink log are kept). On failure whatever was started
        is stopped again and ChildError carries the failing process's log tail.
        """
        with self._lock:
            state = self.run_dir / STATE_FILE
            if state.exists():
                running = [n for n, p in Cluster.attach(self.run_dir).procs.items() if p.alive()]
                if running:
                    raise ClusterError(
                        f"a cluster runs in {self.run_dir} ({', '.join(running)}); "
                        "stop it first (scripts/cluster down)"
                    )
                if not reuse:
                    raise ClusterError(
                        f"{self.run_dir} already held a cluster; use a new run dir "
                        "(or reuse=True / --reuse to start on its data again)"
                    )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.logs.mkdir(exist_ok=True)
            (self.run_dir / "engine.toml").write_text(engine_toml([HOST]))
            if self.lb:
                haproxy = self.procs["haproxy"].argv[0] = ensure_haproxy()
                lb_config = self.run_dir / "haproxy.cfg"
                lb_config.write_text(render(self.lb_settings()))
                try:
                    check_config(haproxy, str(lb_config))
                except ValueError as exc:
                    raise ClusterError(str(exc)) from None
            self.created_at = time.time()
            try:
                self.start_redis()
                self.start_sink()
                for i in range(self.replicas):
                    if self.redis_proxies:
                        self._start_proxy(i)
                for i in range(self.replicas):
                    self.start_replica(i, wait_ready=False)
                for i in range(self.replicas):
                    self.wait_replica_ready(i)
                if self.lb:
                    self._spawn("haproxy")
                    self.wait_lb(timeout=self.startup_timeout_s)
            except BaseException:
                self.down(graceful=False)
                raise
            return self

    def lb_settings(self) -> LbSettings:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        # Two descriptors per client connection, and some room for listeners and checks.
        maxconn = max(256, min(10_000, (soft - 64) // 2))
        return LbSettings(
            bind=f"{HOST}:{self.ports['lb']}",
            stats_bind=f"{HOST}:{self.ports['stats']}",
            servers=[(name, f"{HOST}:{self.ports[name]}") for name in self.names],
            maxconn=maxconn,
        )

    def down(self, *, graceful: bool = True, timeout_s: float = 15.0) -> list[str]:
        """Stop every process (idempotent); return the names of those that were running.

        Order: the balancer, then the replicas (SIGTERM: they hand unsent jobs back;
        SIGKILL after ``timeout_s``; at once unless ``graceful``), the proxies, the sink
        (flushes its log) and Redis (SIGTERM: it fsyncs the AOF).
        """
        with self._lock:
            stopped: list[str] = []

            def stop(names: list[str], sig: int) -> None:
                live = [n for n in names if n in self.procs and self.procs[n].send(sig)]
                for n in live:
                    proc = self.procs[n]
                    if not proc.wait(timeout_s):
                        proc.send(signal.SIGKILL)
                        proc.wait(10.0)
                stopped.extend(live)

            engine_sig = signal.SIGTERM if graceful else signal.SIGKILL
            stop(["haproxy"], signal.SIGTERM)
            stop(self.names, engine_sig)
            stop([n for n in self.procs if n.startswith("redis-proxy")], signal.SIGTERM)
            stop(["sink"], signal.SIGTERM)
            stop(["redis"], signal.SIGTERM)
            if self.run_dir.exists():
                self.save()
            return stopped

    def __enter__(self) -> Cluster:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # -- starting pieces ----------------------------------------------------------------

    def _spawn(self, name: str) -> Child:
        proc = self._not_running(name)
        proc.spawn(self.run_dir, detach=self.detach)
        self.save()
        return proc

    def _not_running(self, name: str) -> Child:
        proc = self.procs[name]
        if proc.alive():
            raise ClusterError(f"{name} already runs (pid {proc.pid})")
        return proc

    def start_redis(self) -> None:
        """Start Redis (same port, same data dir) and wait until it has loaded its AOF."""
        with self._lock:
            self._not_running("redis")
            self.redis.start(self.startup_timeout_s, detach=self.detach)
            self.save()

    def start_sink(self) -> None:
        with self._lock:
            self._not_running("sink")
            self.sink.start(detach=self.detach)
            self.save()

    def _start_proxy(self, i: int) -> None:
        proc = self._spawn(f"redis-proxy{i + 1}")
        proc.wait_until("listening", lambda: _port_open(proc.port), 30.0)

    def start_replica(self, i: int | str, *, wait_ready: bool = True) -> int:
        """Start replica ``i`` again (same port, instance name, flags); return its pid."""
        i = self.replica(i)
        with self._lock:
            proc = self._spawn(self.names[i])
            if wait_ready:
                self.wait_replica_ready(i)
            assert proc.pid is not None
            return proc.pid

    def wait_replica_ready(self, i: int | str, timeout: float | None = None) -> None:
        """Wait until replica ``i`` answers ``/readyz`` with 200."""
        i = self.replica(i)
        proc = self.procs[self.names[i]]
        url = self.replica_urls[i] + "/readyz"
        proc.wait_until("ready", lambda: self.probe(url) == 200 or None,
                        timeout or self.startup_timeout_s)  # fmt: skip

    @staticmethod
    def probe(url: str, timeout: float = 1.0) -> int | None:
        """HTTP status of a GET, None when nothing answers."""
        try:
            return http_get(url, timeout)[0]
        except OSError:
            return None

    # -- the balancer -------------------------------------------------------------------

    def lb_servers(self) -> dict[str, str]:
        """HAProxy's view of each replica: "UP", "DOWN", "UP 1/2" (going down)..."""
        status, body = http_get(self.stats_url + ";csv", timeout=2.0)
        if status != 200:
            raise ClusterError(f"haproxy stats answered {status}")
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == "engines" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_lb(self, up: Sequence[str] | None = None, timeout: float = 30.0) -> dict[str, str]:
        """Wait until HAProxy has every replica in ``up`` (default: all) UP."""
        want = list(up) if up is not None else self.names
        proc = self.procs["haproxy"]

        def check() -> dict[str, str] | None:
            try:
                servers = self.lb_servers()
            except (OSError, ClusterError):
                return None
            return servers if all(servers.get(n) == "UP" for n in want) else None

        return proc.wait_until(f"showing {', '.join(want)} UP", check, timeout)

    # -- fault hooks --------------------------------------------------------------------

    def in_flight(self, i: int | str) -> int | None:
        """Jobs in replica ``i``'s processing list right now (claimed, not yet acked or
        failed); None when Redis does not answer."""
        key = self.keys.processing(self.names[self.replica(i)])
        try:
            return redis_run(self.redis_url, lambda r: r.llen(key), timeout_s=2.0)
        except Exception:  # refused, reset, LOADING, timed out: coredis's or the OS's
            return None

    def kill_replica(self, i: int | str, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` (SIGKILL: a crash) to replica ``i``; return the jobs it held just
        before (``in_flight``). With SIGKILL, returns once the process is gone."""
        i = self.replica(i)
        proc = self.procs[self.names[i]]
        held = self.in_flight(i)
        if not proc.send(sig):
            raise ClusterError(f"{proc.name} is not running")
        if sig == signal.SIGKILL:
            proc.wait(10.0)
        self.save()
        return held

    def sigterm_replica(self, i: int | str, wait: bool = True, timeout: float = 30.0) -> int | None:
        """SIGTERM replica ``i`` (graceful: it drains and hands unsent jobs back); with
        ``wait``, wait for it to exit and return its exit code (None when not known:
        a process this one did not start)."""
        i = self.replica(i)
        proc = self.procs[self.names[i]]
        if not proc.send(signal.SIGTERM):
            raise ClusterError(f"{proc.name} is not running")
        if wait and not proc.wait(timeout):
            raise ClusterError(f"{proc.name} still runs {timeout:.0f}s after SIGTERM")
        return proc.returncode

    def stop_redis(self, *, graceful: bool = False) -> None:
        """Stop Redis: SIGKILL (a crash; AOF everysec may lose its last ~1 s of writes)
        or, when ``graceful``, SIGTERM (it fsyncs the AOF and exits)."""
        with self._lock:
            proc = self.procs["redis"]
            sig = signal.SIGTERM if graceful else signal.SIGKILL
            if not proc.send(sig):
                raise ClusterError("redis is not running")
            if not proc.wait(30.0):
                proc.send(signal.SIGKILL)
                proc.wait(10.0)
            self.save()

    def stop_sink(self) -> None:
        """Stop the SMTP sink as an operator stops a mail server (SIGTERM: it records
        what it answered 250 to, cuts open sessions and exits); new connections are
        refused until ``start_sink`` starts it again on the same port."""
        with self._lock:
            proc = self.procs["sink"]
            if not proc.send(signal.SIGTERM):
                raise ClusterError("the sink is not running")
            if not proc.wait(10.0):
                proc.send(signal.SIGKILL)
                proc.wait(10.0)
            self.save()

    def restart_redis(self, down_s: float = 1.0, *, graceful: bool = False) -> tuple[float, float]:
        """Stop Redis, keep it down ``down_s``, start it again on the same port and data
        dir (the AOF brings the data back); return (stopped_at, ready_at), unix seconds."""
        self.stop_redis(graceful=graceful)
        stopped_at = time.time()
        time.sleep(down_s)
        self.start_redis()
        return stopped_at, time.time()

    def cut_redis(self, i: int | str, seconds: float, *, wait: bool = False) -> float:
        """Reset replica ``i``'s connections to Redis and refuse new ones for ``seconds``
        (its proxy heals by itself); return the unix time the cut ends. ``wait``: return
        only then."""
        i = self.replica(i)
        if not self.redis_proxies:
            raise ClusterError("cut_redis needs the Redis proxies (redis_proxies=True)")
        proc = self.procs[f"redis-proxy{i + 1}"]
        if not proc.alive():
            raise ClusterError(f"{proc.name} is not running")
        until = tcpcut.request_cut(self._cut_file(i), proc.pid, seconds)
        if wait:
            time.sleep(max(0.0, until - time.time()))
        return until

    def heal_redis(self, i: int | str) -> None:
        """End a ``cut_redis`` of replica ``i`` now."""
        i = self.replica(i)
        if self.redis_proxies:
            proc = self.procs[f"redis-proxy{i + 1}"]
            tcpcut.request_heal(self._cut_file(i), proc.pid if proc.alive() else None)

    def sink_faults(
        self,
        *,
        fail_ratio: float | None = None,
        fail_code: int | None = None,
        delay_ms: int | None = None,
        drop_ratio: float | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Override the sink's fault flags (those given; the others keep the sink's flags)
        through its control file; with ``wait``, return once the sink applies them (its
        stats file's "faults"), else at once."""
        control = {
            key: value
            for key, value in (
                ("fail_ratio", fail_ratio),
                ("fail_code", fail_code),
                ("delay_ms", delay_ms),
                ("drop_ratio", drop_ratio),
            )
            if value is not None
        }
        _write_atomic(self.sink_control, json.dumps(control).encode())
        if not wait:
            return control
        return self._wait_sink_faults(
            lambda f: (
                f.get("source") == "control"
                and f.get("error") is None
                and all(f.get(k) == v for k, v in control.items())
            )
        )

    def sink_clear(self, *, wait: bool = True) -> dict[str, Any]:
        """Remove the control file: the sink's own flags apply again."""
        with contextlib.suppress(FileNotFoundError):
            self.sink_control.unlink()
        if not wait:
            return {}
        return self._wait_sink_faults(lambda f: f.get("source") == "flags")

    def _wait_sink_faults(self, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            faults: dict[str, Any] = self.sink.stats().get("faults", {})
            if faults.get("error"):
                raise ClusterError(f"the sink refused its control file: {faults['error']}")
            return faults if ok(faults) else None

        return self.sink.child.wait_until("applying the fault control", check, 5.0)

    # -- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What runs (pid or None), HAProxy's view of the replicas, Redis, the sink."""
        out: dict[str, Any] = {"run_dir": str(self.run_dir), "processes": self.pids}
        balancer = self.procs.get("haproxy")
        try:
            out["lb_servers"] = self.lb_servers() if balancer and balancer.alive() else None
        except (OSError, ClusterError) as exc:
            out["lb_servers"] = f"unknown ({exc})"
        out["redis"] = "up" if self.redis.ping() else "down"
        out["in_flight"] = {n: self.in_flight(i) for i, n in enumerate(self.names)}
        stats = self.sink.stats()
        out["sink"] = {k: stats.get(k) for k in ("received", "duplicates", "refused", "faults")}
        return out


def _port_open(port: int | None) -> bool | None:
    assert port is not None
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return None


# -- command line ------------------------------------------------------------------------

DEFAULT_RUNS = ROOT / "var" / "cluster"
LATEST = DEFAULT_RUNS / "latest"

HELP = """\
Run the load/chaos topology on 127.0.0.1: N engine replicas, Redis (AOF everysec), the
SMTP sink and HAProxy in front (round robin, /readyz checks every 0.5 s, websockets),
each replica reaching Redis through its own cuttable proxy. Processes run in the
background; their pids are in RUN/cluster.json, their logs in RUN/logs/.

  up       start a cluster in a new run dir (default var/cluster/run-<time>, and
           var/cluster/latest points at it); prints the URLs
  status   what runs, HAProxy's view of the replicas, Redis, the sink
  down     stop everything (idempotent) and print where the logs are
  kill NAME [--signal SIG]      SIGKILL (or SIG) a replica (engine1, engine2, ...)
  start NAME                    start a stopped replica again (same port and instance)
  sigterm NAME                  graceful stop of a replica, waits for its exit
  restart-redis [--down S] [--graceful]   stop Redis (SIGKILL, or SIGTERM), start again
  cut NAME SECONDS              cut a replica off Redis for SECONDS
  sink-faults [--fail-ratio R] [--fail-code N] [--delay-ms N] [--drop-ratio R] | --clear

Without --run-dir every command but up acts on var/cluster/latest. HAProxy comes from
Debian (installed by `up` when missing and run as root)."""


def _run_dir(args: argparse.Namespace) -> Path:
    if args.run_dir is not None:
        return Path(args.run_dir)
    if not LATEST.exists():
        raise ClusterError(f"no --run-dir given and {LATEST} does not exist")
    return LATEST.resolve()


def _print_urls(c: Cluster) -> None:
    sink = c.sink
    print(f"cluster up in {c.run_dir} ({c.replicas} replicas, {c.senders} senders each)")
    print(f"  load balancer  {c.lb_url}   (dashboard {c.lb_url}/)")
    print(f"  haproxy stats  {c.stats_url}")
    for i, name in enumerate(c.names):
        via = f", redis via {c.replica_redis_urls[i]}" if c.redis_proxies else ""
        print(f"  {name:<14} {c.replica_urls[i]}   (instance {name}{via})")
    print(f"  redis          {c.redis_url}   (AOF everysec, data {c.run_dir / 'redis'})")
    print(f"  sink           {sink.url}   (log {sink.log_file}, control {c.sink_control})")
    print(f"  logs           {c.logs}/")
    print(f"  api key        {TEST_ADMIN_KEY}   (admin, the test key of fixtures/auth.py)")
    print(f"stop with: scripts/cluster down --run-dir {c.run_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=[
        "up", "status", "down", "kill", "start", "sigterm", "restart-redis", "cut", "sink-faults",
    ])  # fmt: skip
    parser.add_argument("target", nargs="*", help="replica name (and seconds for cut)")
    parser.add_argument("--run-dir", metavar="DIR", help="the run directory")
    parser.add_argument("--replicas", type=int, default=2, help="up: engine replicas (default 2)")
    parser.add_argument("--senders", type=int, default=16, help="up: senders per replica (16)")
    parser.add_argument("--base-port", type=int, help="up: consecutive ports from here")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="ARG",
                        help="up: extra `engine serve` argument (repeatable)")  # fmt: skip
    parser.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                        help="up: replica environment, e.g. ENGINE_QUEUE__LEASE_S=5")  # fmt: skip
    parser.add_argument("--no-redis-proxies", action="store_true",
                        help="up: replicas talk to Redis directly (no `cut`)")  # fmt: skip
    parser.add_argument("--reuse", action="store_true", help="up: start on an old run dir's data")
    parser.add_argument("--signal", default="SIGKILL", help="kill: the signal (default SIGKILL)")
    parser.add_argument("--down", type=float, default=1.0, help="restart-redis: seconds down")
    parser.add_argument("--graceful", action="store_true", help="restart-redis: SIGTERM Redis")
    parser.add_argument("--fail-ratio", type=float)
    parser.add_argument("--fail-code", type=int)
    parser.add_argument("--delay-ms", type=int)
    parser.add_argument("--drop-ratio", type=float)
    parser.add_argument("--clear", action="store_true", help="sink-faults: back to the flags")
    parser.add_argument("--json", action="store_true", help="up/status: print JSON")
    args = parser.parse_args(argv)
    try:
        return _command(args)
    except ChildError as exc:  # a ClusterError, or a process that did not start
        print(f"cluster: {exc}", file=sys.stderr)
        return 1


def _command(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "up":
        if args.run_dir is None:
            run_dir = DEFAULT_RUNS / time.strftime("run-%Y%m%d-%H%M%S")
        else:
            run_dir = Path(args.run_dir)
        env = dict(item.split("=", 1) for item in args.engine_env)
        cluster = Cluster(
            run_dir,
            replicas=args.replicas,
            senders=args.senders,
            base_port=args.base_port,
            engine_args=args.engine_arg,
            engine_env=env,
            redis_proxies=not args.no_redis_proxies,
        )
        try:
            cluster.up(reuse=args.reuse)
        except Exception as exc:
            raise ClusterError(str(exc)) from exc
        if args.run_dir is None:
            with contextlib.suppress(OSError):
                LATEST.unlink(missing_ok=True)
                LATEST.symlink_to(run_dir.name)
        if args.json:
            print(json.dumps(cluster.describe(), indent=2))
        else:
            _print_urls(cluster)
        return 0
    cluster = Cluster.attach(_run_dir(args))
    if cmd == "status":
        status = cluster.status()
        if args.json:
            print(json.dumps(status, indent=2))
            return 0
        print(f"cluster in {cluster.run_dir}: load balancer {cluster.lb_url}")
        for name, pid in status["processes"].items():
            port = cluster.ports.get("lb" if name == "haproxy" else name)
            where = f"port {port}" if port else ""
            print(f"  {name:<14} {'running, pid ' + str(pid) if pid else 'stopped':<22} {where}")
        print(f"  haproxy sees   {status['lb_servers']}")
        print(f"  redis {status['redis']}; in flight {status['in_flight']}")
        print(f"  sink           {status['sink']}")
        return 0
    if cmd == "down":
        stopped = cluster.down()
        print(f"stopped {', '.join(stopped) if stopped else 'nothing (nothing was running)'}")
        print(f"logs in {cluster.logs}/; sink log {cluster.sink.log_file}")
        print(f"state in {cluster.run_dir / STATE_FILE}")
        return 0
    if cmd in ("kill", "start", "sigterm", "cut"):
        if not args.target:
            raise ClusterError(f"{cmd} needs a replica name: {', '.join(cluster.names)}")
        name = args.target[0]
        if cmd == "kill":
            sig_name = args.signal.upper()
            sig = signal.Signals[sig_name if sig_name.startswith("SIG") else "SIG" + sig_name]
            held = cluster.kill_replica(name, sig)
            print(f"{name}: sent {sig.name}; it held {held} jobs")
        elif cmd == "start":
            print(f"{name}: started, pid {cluster.start_replica(name)}")
        elif cmd == "sigterm":
            cluster.sigterm_replica(name)
            print(f"{name}: stopped after SIGTERM")
        else:
            seconds = float(args.target[1]) if len(args.target) > 1 else 2.0
            until = cluster.cut_redis(name, seconds)
            print(f"{name}: cut off Redis until {time.strftime('%H:%M:%S', time.localtime(until))}")
        return 0
    if cmd == "restart-redis":
        stopped_at, ready_at = cluster.restart_redis(args.down, graceful=args.graceful)
        print(f"redis: down at {stopped_at:.3f}, ready again at {ready_at:.3f}")
        return 0
    if args.clear:
        faults = cluster.sink_clear()
    else:
        faults = cluster.sink_faults(
            fail_ratio=args.fail_ratio,
            fail_code=args.fail_code,
            delay_ms=args.delay_ms,
            drop_ratio=args.drop_ratio,
        )
    print(f"sink faults in force: {faults}")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `scripts/cluster status | head` is fine
    sys.exit(main())
