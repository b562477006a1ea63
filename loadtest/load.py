"""scripts/load: a bounded, headless Locust run against an engine, written into RUN/.

The run directory follows loadtest/RUNDIR.md. From Python (the chaos scenarios)::

    run = start_load(LoadSettings(host, run_dir, seconds=60, users=20))  # returns at once
    ...                                     # faults, while Locust runs in the background
    result = run.stop()                     # SIGTERM: Locust stops and writes its reports
    result = run.wait()                     # or: let the run end at its time bound
    result = run_load(host, run_dir, 30)    # both in one, blocking

Runs Locust as a subprocess (``python -m locust``): this module never imports Locust or
gevent, so importing it is safe in pytest and in the engine's own processes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from loadtest.recorder import RUN_DIR_ENV, merge_watchers, read_accepted, write_json

ROOT: Final = Path(__file__).resolve().parents[1]
LOCUSTFILE: Final = Path(__file__).resolve().with_name("locustfile.py")
DEFAULT_HOST: Final = "http://127.0.0.1:8080"
MAX_SECONDS: Final = 3600  # longer only with --force
STOP_GRACE_S: Final = 30.0  # Locust's time to write its reports after SIGTERM

EXIT_OK: Final = 0
EXIT_VIOLATIONS: Final = 1  # watchers saw events out of lifecycle order
EXIT_LOCUST: Final = 2  # Locust did not run, failed, or wrote no stats


@dataclass(frozen=True)
class LoadSettings:
    """One Locust run. ``None`` leaves a knob to the locustfile's defaults (see the
    docstrings of loadtest/users.py and loadtest/shapes.py)."""

    host: str
    run_dir: Path
    seconds: float = 60.0  # the run stops by itself after this long
    users: int = 10  # steady: all the time; step: the last step; spike: the baseline
    spawn_rate: float = 5.0  # users started per second
    shape: str = "steady"  # steady | step | spike
    weights: str | None = None  # LOAD_WEIGHTS, e.g. "single=4,batch=1,status=2,watch=1"
    wait: str | None = None  # LOAD_WAIT, e.g. "0.1,0.5" or "tput:2"
    batch_size: int | None = None  # LOAD_BATCH_SIZE
    watch_batch: int | None = None  # LOAD_WATCH_BATCH
    to_tags: str | None = None  # LOAD_TO_TAGS: sink fault tags on every recipient
    tags: tuple[str, ...] = ()  # Locust --tags (single, batch, status, watch)
    exclude_tags: tuple[str, ...] = ()  # Locust --exclude-tags
    processes: int = 0  # Locust --processes (0: one process)
    print_stats: bool = True  # Locust's table every 2 s (else only the final summary)
    extra_env: Mapping[str, str] = field(default_factory=dict)  # more LOAD_* variables
    extra_args: tuple[str, ...] = ()  # more Locust arguments
    # The API key the users present (ENGINE_API_KEY); None: the environment's, if any.
    api_key: str | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """The ``load`` object of meta.json."""
        out = asdict(self)
        out.pop("host")
        out.pop("run_dir")
        out.pop("print_stats")
        out.pop("api_key")  # a secret: never in meta.json
        out["tags"] = list(self.tags)
        out["exclude_tags"] = list(self.exclude_tags)
        out["extra_args"] = list(self.extra_args)
        out["extra_env"] = dict(self.extra_env)
        out["locustfile"] = str(LOCUSTFILE.relative_to(ROOT))
        return out

    def argv(self) -> list[str]:
        run = self.run_dir
        args = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", self.host,
            "--users", str(self.users), "--spawn-rate", str(self.spawn_rate),
            "--run-time", f"{max(1, round(self.seconds))}s",
            "--csv", str(run / "locust"), "--csv-full-history",
            "--html", str(run / "locust.html"),
            # 429/503/connection errors are failures in the stats but not a failed run.
            "--exit-code-on-error", "0",
        ]  # fmt: skip
        if not self.print_stats:
            args.append("--only-summary")
        if self.tags:
            args += ["--tags", *self.tags]
        if self.exclude_tags:
            args += ["--exclude-tags", *self.exclude_tags]
        if self.processes:
            args += ["--processes", str(self.processes)]
        return [*args, *self.extra_args]

    def env(self) -> dict[str, str]:
        env = {**os.environ, RUN_DIR_ENV: str(self.run_dir.resolve())}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        env["LOAD_SHAPE"] = self.shape
        env["LOAD_SECONDS"] = str(self.seconds)
        for var, value in (
            ("LOAD_WEIGHTS", self.weights),
            ("LOAD_WAIT", self.wait),
            ("LOAD_BATCH_SIZE", self.batch_size),
            ("LOAD_WATCH_BATCH", self.watch_batch),
            ("LOAD_TO_TAGS", self.to_tags),
        ):
            if value is not None:
                env[var] = str(value)
        env.update(self.extra_env)
        if self.api_key is not None:
            env["ENGINE_API_KEY"] = self.api_key
        return env


@dataclass(frozen=True)
class Summary:
    """What a run did, read back from RUN/ (see ``summarize``)."""

    accepted: int
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    failure_kinds: dict[str, int]
    watchers: dict[str, Any]
    stats_found: bool

    @property
    def order_violations(self) -> int:
        return int(self.watchers.get("order_violations", 0))


@dataclass(frozen=True)
class LoadResult:
    returncode: int  # Locust's exit code
    run_dir: Path
    summary: Summary

    @property
    def ok(self) -> bool:
        """Locust ran and wrote its stats, and no watcher saw an order violation."""
        return (
            self.returncode == 0 and self.summary.stats_found and not self.summary.order_violations
        )

    @property
    def exit_code(self) -> int:
        if self.returncode != 0 or not self.summary.stats_found:
            return EXIT_LOCUST
        return EXIT_VIOLATIONS if self.summary.order_violations else EXIT_OK


class LoadRun:
    """A Locust run in the background (``start_load``)."""

    def __init__(self, settings: LoadSettings, output: Path | None) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir
        self.started_at = time.time()
        self._log: IO[bytes] | None = None
        stdout: IO[bytes] | None = None
        if output is not None:
            self._log = stdout = output.open("ab")
        self.proc = subprocess.Popen(
            settings.argv(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            env=settings.env(),
            cwd=ROOT,
            # Its own process group: a Ctrl-C meant for the caller reaches Locust only
            # through stop(), so the caller decides when the reports get written.
            start_new_session=output is not None,
        )
        self._result: LoadResult | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_GRACE_S) -> LoadResult:
        """End the run now: SIGINT, as Ctrl-C (Locust stops its users, writes its CSV and
        HTML, the recorder its files; SIGTERM does the same), or SIGKILL after
        ``timeout``. Then as ``wait``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> LoadResult:
        """Wait for Locust to exit (SIGKILL when ``timeout`` runs out; None: the run's
        own bound plus a grace), merge the watcher parts, and summarize RUN/."""
        if self._result is not None:
            return self._result
        if timeout is None:
            timeout = self.settings.seconds + 2 * STOP_GRACE_S
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._log is not None:
            self._log.close()
        merge_watchers(self.run_dir)
        self._result = LoadResult(code, self.run_dir, summarize(self.run_dir))
        return self._result

    def elapsed(self) -> float:
        return max(1e-3, time.time() - self.started_at)


def start_load(settings: LoadSettings, *, output: Path | bool | None = True) -> LoadRun:
    """Start Locust and return at once. ``output``: a file for Locust's output (True:
    RUN/locust.log, its own process group), or None/False to share this terminal.
    Records the settings as the ``load`` object of RUN/meta.json."""
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    update_meta(run_dir, load=settings.describe())
    log_file = run_dir / "locust.log" if output is True else (output or None)
    return LoadRun(settings, log_file if isinstance(log_file, Path) else None)


def run_load(
    host: str,
    run_dir: Path,
    seconds: float = 60.0,
    users: int = 10,
    spawn_rate: float = 5.0,
    shape: str = "steady",
    extra_env: Mapping[str, str] | None = None,
    **more: Any,
) -> LoadResult:
    """Run Locust to its end (blocking); ``more``: other LoadSettings fields."""
    settings = LoadSettings(
        host, run_dir, seconds, users, spawn_rate, shape, extra_env=dict(extra_env or {}), **more
    )
    return start_load(settings).wait()


# -- RUN/ files -----------------------------------------------------------------------


def update_meta(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into RUN/meta.json (created when missing) and return it."""
    path = run_dir / "meta.json"
    meta: dict[str, Any] = {}
    if path.exists():
        try:
            meta = json.loads(path.read_text())
        except ValueError:
            meta = {}
    meta.update(fields)
    write_json(path, meta)
    return meta


def _number(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


_WRAPPED: Final = re.compile(r"^\w+\((['\"])(.*)\1\)$")


def failure_kind(error: str) -> str:
    """``CatchResponseError('backpressure 429: ...')`` -> ``backpressure 429``."""
    m = _WRAPPED.match(error.strip())
    text = m.group(2) if m else error.strip()
    return text.split(":", 1)[0] if ":" in text else text


def summarize(run_dir: Path) -> Summary:
    """Read RUN/locust_stats.csv (Aggregated row), RUN/locust_failures.csv,
    RUN/accepted/*.csv and RUN/watchers.json."""
    stats_file = run_dir / "locust_stats.csv"
    agg: dict[str, str] = {}
    if stats_file.exists():
        with stats_file.open(newline="") as f:
            for row in csv.DictReader(f):
                if row.get("Name") == "Aggregated":
                    agg = row
    kinds: Counter[str] = Counter()
    failures_file = run_dir / "locust_failures.csv"
    if failures_file.exists():
        with failures_file.open(newline="") as f:
            for row in csv.DictReader(f):
                kinds[failure_kind(row.get("Error", ""))] += int(_number(row.get("Occurrences")))
    watchers: dict[str, Any] = {}
    watchers_file = run_dir / "watchers.json"
    if watchers_file.exists():
        watchers = json.loads(watchers_file.read_text())
    return Summary(
        accepted=len(read_accepted(run_dir)),
        requests=int(_number(agg.get("Request Count"))),
        failures=int(_number(agg.get("Failure Count"))),
        requests_per_s=_number(agg.get("Requests/s")),
        p50_ms=_number(agg.get("50%")),
        p99_ms=_number(agg.get("99%")),
        failure_kinds=dict(kinds.most_common()),
        watchers=watchers,
        stats_found=bool(agg),
    )


def render(summary: Summary, elapsed_s: float) -> list[str]:
    s = summary
    lines = [
        f"accepted {s.accepted:,} messages ({s.accepted / max(elapsed_s, 1e-3):,.1f}/s)",
        f"requests {s.requests:,} ({s.requests_per_s:,.1f}/s), failures {s.failures:,}; "
        f"Aggregated p50 {s.p50_ms:g} ms, p99 {s.p99_ms:g} ms",
    ]
    if s.failure_kinds:
        kinds = ", ".join(f"{k}: {n:,}" for k, n in list(s.failure_kinds.items())[:6])
        lines.append(f"failures by kind: {kinds}")
    w = s.watchers
    if w.get("watchers"):
        lat = w.get("latency_ms", {})
        lines.append(
            f"watchers {w['watchers']}: followed {w.get('followed', 0):,}, finished "
            f"{w.get('finished', 0):,}, unfinished {w.get('unfinished', 0):,}, events "
            f"{w.get('events', 0):,}, order violations {w.get('order_violations', 0)}; "
            f"event latency p50 {lat.get('p50', 0):g} ms, p99 {lat.get('p99', 0):g} ms"
        )
        for example in w.get("examples", [])[:5]:
            lines.append(f"  violation: {example}")
    return lines


# -- the command line -----------------------------------------------------------------

_SPAN: Final = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")


def parse_seconds(text: str) -> float:
    """``"90"``, ``"90s"``, ``"2m"``, ``"1h30m"`` -> seconds; raises ValueError."""
    text = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(text):
        m = _SPAN.match(text, pos)
        if m is None:
            raise ValueError(f"not a duration: {text!r} (e.g. 60s, 2m, 1h30m)")
        total += float(m.group(1)) * {"h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]
        pos = m.end()
    if not text or total <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return total


def default_probe_max_s() -> float:
    """The engine's sender.breaker_probe_max_s default (10 s when not importable)."""
    try:
        from engine.config import SenderSettings

        return float(SenderSettings().breaker_probe_max_s)
    except ImportError:
        return 10.0


def default_lease_s() -> float:
    """The engine's queue.lease_s default (10 s when the engine is not importable)."""
    try:
        from engine.config import QueueSettings

        return float(QueueSettings().lease_s)
    except ImportError:  # the engine is not installed next to the load suite
        return 10.0


def api_key(given: str | None) -> str | None:
    """The key to present: ``given``, else ENGINE_API_KEY, else the admin key file that
    the first ``engine serve`` writes (ENGINE_AUTH__ADMIN_KEY_FILE, var/admin.key)."""
    if given:
        return given
    if os.environ.get("ENGINE_API_KEY"):
        return os.environ["ENGINE_API_KEY"]
    path = Path(os.environ.get("ENGINE_AUTH__ADMIN_KEY_FILE") or ROOT / "var" / "admin.key")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _check_host(host: str, timeout_s: float) -> str | None:
    """None when GET /healthz answers 200 within ``timeout_s``, else why not."""
    deadline = time.monotonic() + timeout_s
    why = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(host.rstrip("/") + "/healthz", timeout=2) as resp:
                if resp.status == 200:
                    return None
                why = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as exc:
            why = str(getattr(exc, "reason", exc))
        time.sleep(0.25)
    return why


HELP: Final = """\
Run the Locust load suite (loadtest/) headless against a running engine for a bounded
time, writing everything into one run directory (loadtest/RUNDIR.md):

  RUN/locust_stats.csv, locust_stats_history.csv, locust_failures.csv,
  locust_exceptions.csv, locust.html     Locust's own reports
  RUN/accepted/<pid>.csv                 every id answered 202: id,accepted_at
  RUN/watchers.json                      websocket watchers: order violations, latency
  RUN/meta.json                          scenario, cores, host, the load settings

Users (weights with --weights): SingleSender POSTs /v1/messages, BatchSender POSTs
/v1/messages/batch, StatusPoller GETs /v1/messages/[id] of accepted ids, Watcher posts 5
messages and follows their events on WS /v1/events, checking lifecycle order. 429 and
503 answers are backpressure and connection errors are expected under chaos: both are
Locust failures with a clear name, neither fails the run.

Exit status: 0; 1 when watchers saw events out of order; 2 when Locust did not run (or
the host did not answer /healthz, unless --no-check). Arguments after "--" go to Locust.
Start an engine first, e.g. ./scripts/run (or .venv/bin/engine serve --bind ...).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="scripts/load",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default=DEFAULT_HOST, help="engine base URL (default %(default)s)")
    p.add_argument(
        "--key",
        default=None,
        help="API key the users present (default: env ENGINE_API_KEY, else var/admin.key, "
        "the admin key the first `engine serve` writes)",
    )
    p.add_argument(
        "--time",
        default="60s",
        help="run time, e.g. 60s, 5m (default %(default)s; at most 1h without --force)",
    )
    p.add_argument("--force", action="store_true", help="allow --time over 1h")
    p.add_argument(
        "--users",
        type=int,
        default=10,
        help="users (default %(default)s); step: the final count, spike: the baseline",
    )
    p.add_argument(
        "--spawn-rate",
        type=float,
        default=5.0,
        help="users started per second (default %(default)s)",
    )
    p.add_argument(
        "--shape",
        choices=("steady", "step", "spike"),
        default="steady",
        help="load shape (default %(default)s): steady = --users all along; step "
        "= 4 equal steps up to --users; spike = --users, 4x as many for the "
        "middle fifth (40%%-60%%) of the run, then --users again",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory RUN (default var/load/<UTC timestamp>)",
    )
    p.add_argument(
        "--weights",
        default=None,
        help='user mix, e.g. "single=4,batch=1,'
        'status=2,watch=1" (the default); 0 leaves a class out',
    )
    p.add_argument(
        "--wait",
        default=None,
        help='pause of each user between tasks: "A,B" random A..B s (default "0.1,0.5"), '
        '"A" constant, "tput:N" N tasks/s',
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="messages per batch POST (default 50)"
    )
    p.add_argument(
        "--watch-batch",
        type=int,
        default=None,
        help="messages each watcher posts and follows per round (default 5)",
    )
    p.add_argument(
        "--to-tags",
        default=None,
        help="sink fault tags on every recipient, "
        'e.g. "451" (retries) or "slow250ms" (see engine sink --help)',
    )
    p.add_argument(
        "--tags", nargs="+", default=(), help="run only these task tags: single batch status watch"
    )
    p.add_argument("--exclude-tags", nargs="+", default=(), help="leave these task tags out")
    p.add_argument(
        "--processes",
        type=int,
        default=0,
        help="Locust worker processes forked on this machine (default: one process)",
    )
    p.add_argument("--quiet", action="store_true", help="no stats table every 2 s")
    p.add_argument("--scenario", default=None, help="meta.json scenario (default load-<shape>)")
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="engine replicas behind --host, for meta.json (default %(default)s)",
    )
    p.add_argument(
        "--lease-s",
        type=float,
        default=None,
        help="the engine's queue.lease_s, for meta.json (default: the engine's default)",
    )
    p.add_argument("--no-check", action="store_true", help="start without checking /healthz")
    p.add_argument("locust_args", nargs="*", help="after --: more Locust arguments")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seconds = parse_seconds(args.time)
    except ValueError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return EXIT_LOCUST
    if seconds > MAX_SECONDS and not args.force:
        print(f"load: --time {args.time} is over 1h; add --force to mean it", file=sys.stderr)
        return EXIT_LOCUST
    base = Path(os.environ.get("LOAD_CALLER_PWD") or Path.cwd())
    run_dir = args.out or ROOT / "var" / "load" / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run_dir = (base / run_dir).resolve()
    if not args.no_check and (why := _check_host(args.host, 5.0)) is not None:
        print(
            f"load: {args.host}/healthz does not answer ({why}); start the engine "
            "(./scripts/run) or pass --host",
            file=sys.stderr,
        )
        return EXIT_LOCUST
    settings = LoadSettings(
        host=args.host,
        run_dir=run_dir,
        seconds=seconds,
        users=args.users,
        spawn_rate=args.spawn_rate,
        shape=args.shape,
        weights=args.weights,
        wait=args.wait,
        batch_size=args.batch_size,
        watch_batch=args.watch_batch,
        to_tags=args.to_tags,
        tags=tuple(args.tags),
        exclude_tags=tuple(args.exclude_tags),
        processes=args.processes,
        print_stats=not args.quiet,
        extra_args=tuple(args.locust_args),
        api_key=api_key(args.key),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    update_meta(
        run_dir,
        scenario=args.scenario or f"load-{args.shape}",
        replicas=args.replicas,
        cores=os.cpu_count(),
        lease_s=args.lease_s if args.lease_s is not None else default_lease_s(),
        started_at=time.time(),
        ended_at=None,
        host=args.host,
    )
    print(
        f"load: {args.shape} {seconds:g} s, {args.users} users against {args.host} -> {run_dir}",
        file=sys.stderr,
    )
    run = start_load(settings, output=None)
    try:
        result = run.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached Locust too (one process group): let it write its reports, and
        # do not interrupt that with another signal.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("load: interrupted, waiting for Locust to write its reports", file=sys.stderr)
        result = run.wait(STOP_GRACE_S)
    update_meta(run_dir, ended_at=time.time())
    print(f"load: summary of {run_dir}")
    for line in render(result.summary, run.elapsed()):
        print(f"load: {line}")
    if result.returncode != 0:
        print(f"load: Locust exited with {result.returncode}", file=sys.stderr)
    elif not result.summary.stats_found:
        print("load: Locust wrote no locust_stats.csv", file=sys.stderr)
    elif result.summary.order_violations:
        print("load: FAILED: watchers saw events out of order", file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
