"""Benchmark the engine against ceilings measured in the same run.

Phases (each prints progress; a table comes at the end):
  1. HTTP ceilings: a bare ASGI hello on hypercorn-trio (before and after the ingest
     phases: the higher one counts) and on the built-in server (engine/http), single
     POSTs by wrk; the server process's CPU per request.
  2. Ingest: the engine (role all: senders running, delivering to a sink) under the same
     wrk load, on the built-in server and on hypercorn: req/s, p50, p99, CPU/request.
  3. Batch ingest: POST /v1/messages/batch with BATCH messages each: accepted msgs/s.
  4. Sink ceiling: the sink fed directly by one pipelined SMTP client.
  5. End to end, batches: N messages posted in batches to one engine (role all);
     delivered msgs/s = N / (last message received by the sink - first POST).
  6. End to end, single POSTs: wrk posts one message per request (--connections in
     flight) for --seconds; delivered msgs/s = 2xx answers / (last one received by the
     sink - start).
Everything runs on 127.0.0.1: Redis (AOF everysec, as the embedded default), engine,
sink and load generator share this machine's cores, so compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from engine.embedded import Child, RedisServer, SinkProcess, free_port
from fixtures.auth import AUTH
from fixtures.engine import EngineProcess
from scripts.benchlib import cpu_seconds, wait_until

ROOT = Path(__file__).resolve().parents[1]

MESSAGE = {
    "to": "bench@example.com",
    "subject": "Benchmark",
    "text": "Hello from the benchmark. " * 10,
}


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


@dataclass
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int
    cpu_us_per_request: float = 0.0  # of the server process (engine or hello app)


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * _UNIT[m.group(2)]


def run_wrk(
    url: str,
    body: bytes,
    seconds: float,
    connections: int,
    tmp: Path,
    pid: int | None = None,
    headers: dict[str, str] | None = AUTH,
) -> WrkResult:
    """wrk POSTing ``body``; with ``pid``, that process's CPU per request too."""
    body_file = tmp / f"body-{len(body)}.json"
    body_file.write_bytes(body)
    script = tmp / f"post-{len(body)}.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
        + f'local f = io.open("{body_file}", "rb"); wrk.body = f:read("*a"); f:close()\n'
    )
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    non = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    cpu_us = (cpu_seconds(pid) - cpu0) / total * 1e6 if pid and total else 0.0
    return WrkResult(rps, p50, p99, int(non.group(1)) if non else 0, total, cpu_us)


def start_engine(
    redis_url: str,
    smtp_url: str,
    role: str,
    senders: int,
    workdir: Path,
    src: Path = ROOT,
    server: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> EngineProcess:
    """`engine serve` from the source tree ``src`` (another checkout for --compare-ref);
    ``server`` sets http.server (None: the tree's default, which older trees lack)."""
    env = {"PYTHONPATH": str(src)}
    if server is not None:
        env["ENGINE_HTTP__SERVER"] = server
    env.update(extra_env or {})
    engine = EngineProcess(
        redis_url, smtp_url, workdir, "--role", role, "--senders", str(senders),
        "--log-level", "warning", env=env, wait_ready=False,
    )  # fmt: skip
    engine.wait_ready(timeout=30)
    return engine


def flush(redis: RedisServer) -> None:
    import trio

    from engine.queue import open_redis

    async def go() -> None:
        async with open_redis(redis.url) as r:
            await r.flushall()

    trio.run(go)


def phase_ceiling(args: argparse.Namespace, tmp: Path, server: str = "hypercorn") -> WrkResult:
    port = free_port()
    argv = [sys.executable, "-m", "fixtures.hello_app", "--bind", f"127.0.0.1:{port}",
            "--server", server]  # fmt: skip
    hello = Child("hello app", argv, tmp / "hello.log").spawn(ROOT)
    try:
        url = f"http://127.0.0.1:{port}/"
        hello.wait_until("answering", lambda: _answers(url), 30)
        say(f"HTTP ceiling: bare hello on {server}, wrk -c{args.connections} for {args.seconds}s")
        assert hello.popen is not None
        res = run_wrk(
            f"http://127.0.0.1:{port}/v1/messages",
            json.dumps(MESSAGE).encode(),
            args.seconds,
            args.connections,
            tmp,
            hello.popen.pid,
        )
    finally:
        hello.stop()
    say(
        f"    {res.requests_per_s:,.0f} req/s  p50 {res.p50_ms:.1f} ms  p99 {res.p99_ms:.1f} ms"
        f"  CPU {res.cpu_us_per_request:.0f} µs/request"
    )
    return res


def _answers(url: str) -> bool | None:
    try:
        return httpx.get(url, timeout=1).status_code < 300 or None
    except httpx.HTTPError:
        return None


def phase_ingest(args: argparse.Namespace, redis: RedisServer, tmp: Path, server: str) -> WrkResult:
    flush(redis)
    with SinkProcess(workdir=tmp / f"sink-ingest-{server}", log=False) as sink:
        engine = start_engine(redis.url, sink.url, "all", args.senders, tmp, server=server)
        base = engine.base
        try:
            say(
                f"single-message ingest: engine (role all, senders delivering) on {server}, "
                f"wrk -c{args.connections} for {args.seconds}s"
            )
            res = run_wrk(
                base + "/v1/messages",
                json.dumps(MESSAGE).encode(),
                args.seconds,
                args.connections,
                tmp,
                engine.proc.pid,
            )
            ready = httpx.get(base + "/readyz").status_code  # still healthy after the run
        finally:
            engine.stop()
    say(
        f"    {res.requests_per_s:,.0f} req/s  p50 {res.p50_ms:.1f} ms  p99 {res.p99_ms:.1f} ms"
        f"  non-2xx {res.non_2xx}  readyz {ready}  engine CPU {res.cpu_us_per_request:.0f} µs/request"
        " (senders included)"
    )
    return res


def phase_batch(args: argparse.Namespace, redis: RedisServer, tmp: Path) -> tuple[WrkResult, float]:
    flush(redis)
    engine = start_engine(redis.url, "smtp://127.0.0.1:9", "api", args.senders, tmp)
    body = json.dumps({"messages": [MESSAGE] * args.batch}).encode()
    try:
        say(
            f"batch ingest: {args.batch} messages per POST ({len(body) // 1024} KiB), wrk -c4 for {args.seconds}s"
        )
        res = run_wrk(engine.base + "/v1/messages/batch", body, args.seconds, 4, tmp)
    finally:
        engine.stop()
    rate = res.requests_per_s * args.batch
    say(
        f"    {rate:,.0f} messages/s ({res.requests_per_s:,.1f} batches/s)  p99 {res.p99_ms:.0f} ms  non-2xx {res.non_2xx}"
    )
    return res, rate


def phase_sink_ceiling(args: argparse.Namespace) -> float:
    say(f"sink ceiling: one pipelined SMTP client straight into the sink for {args.seconds}s")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.sink_ceiling",
            "--seconds",
            str(args.seconds),
            "--no-log",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    rate = float(json.loads(out.strip().splitlines()[-1])["sink_direct_msgs_per_s"])
    say(f"    {rate:,.0f} messages/s")
    return rate


def phase_e2e(
    args: argparse.Namespace, redis: RedisServer, tmp: Path, src: Path = ROOT
) -> tuple[float, dict[str, Any]]:
    flush(redis)
    n = args.messages
    with SinkProcess(workdir=tmp / "sink-e2e", log=False) as sink:
        engine = start_engine(redis.url, sink.url, "all", args.senders, tmp, src)
        base = engine.base
        try:
            say(
                f"end to end: {n:,} messages posted in batches of {args.batch}, delivered to the sink "
                f"by {args.senders} senders"
            )
            body = json.dumps({"messages": [MESSAGE] * args.batch}).encode()
            t0 = time.monotonic()
            posted = 0
            with httpx.Client(
                base_url=base, timeout=30, headers={"content-type": "application/json", **AUTH}
            ) as c:
                while posted < n:
                    r = c.post("/v1/messages/batch", content=body)
                    r.raise_for_status()
                    posted += args.batch
            t_posted = time.monotonic() - t0
            _wait_delivered(sink, posted, "end to end")
            elapsed = time.monotonic() - t0
        finally:
            engine.stop()
        final = sink.wait_stats(timeout=5)
    rate = posted / elapsed
    say(
        f"    {rate:,.0f} messages/s end to end ({posted:,} in {elapsed:.1f}s; all posted after {t_posted:.1f}s)"
        f"  duplicates {final.get('duplicates')}"
    )
    return rate, {"posted": posted, "elapsed_s": elapsed, "duplicates": final.get("duplicates")}


def _wait_delivered(sink: SinkProcess, posted: int, what: str) -> None:
    """Until the sink has received ``posted`` messages (progress every second)."""

    def got() -> int:
        return int(sink.stats().get("received", 0))

    wait_until(f"{what}: delivery", lambda: got() >= posted, timeout=max(120.0, posted / 50),
               progress=lambda: f"delivered {got():,}/{posted:,}")  # fmt: skip


def phase_e2e_single(args: argparse.Namespace, redis: RedisServer, tmp: Path) -> dict[str, Any]:
    flush(redis)
    with SinkProcess(workdir=tmp / "sink-e2e-single", log=False) as sink:
        engine = start_engine(redis.url, sink.url, "all", args.senders, tmp)
        try:
            say(
                f"end to end, single POSTs: wrk -c{args.connections} posts one message per "
                f"request for {args.seconds}s, {args.senders} senders deliver to the sink"
            )
            t0 = time.monotonic()
            res = run_wrk(
                engine.base + "/v1/messages",
                json.dumps(MESSAGE).encode(),
                args.seconds,
                args.connections,
                tmp,
                engine.proc.pid,
            )
            posted = res.requests - res.non_2xx
            _wait_delivered(sink, posted, "end to end (single POSTs)")
            elapsed = time.monotonic() - t0
        finally:
            engine.stop()
        final = sink.wait_stats(timeout=5)
    rate = posted / elapsed
    say(
        f"    {rate:,.0f} messages/s end to end ({posted:,} accepted at {res.requests_per_s:,.0f} "
        f"req/s, all delivered after {elapsed:.1f}s)  non-2xx {res.non_2xx}"
        f"  duplicates {final.get('duplicates')}"
    )
    return {"posted": posted, "elapsed_s": elapsed, "msgs_per_s": rate,
            "ingest_req_per_s": res.requests_per_s, "non_2xx": res.non_2xx,
            "duplicates": final.get("duplicates")}  # fmt: skip


def phase_auth_cost(args: argparse.Namespace, redis: RedisServer, tmp: Path) -> dict[str, Any]:
    """Single-message ingest (role api) with auth on (a key per request) and off,
    alternating rounds: the cost of checking the key on the hot path."""
    runs: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(args.auth_rounds):
        for arm in ("on", "off"):
            flush(redis)
            env = {} if arm == "on" else {"ENGINE_AUTH__ENABLED": "false"}
            engine = start_engine(
                redis.url, "smtp://127.0.0.1:9", "api", args.senders, tmp, extra_env=env
            )
            try:
                say(f"auth cost {i + 1}/{args.auth_rounds}: single-message ingest, auth {arm}")
                res = run_wrk(
                    engine.base + "/v1/messages", json.dumps(MESSAGE).encode(), args.seconds,
                    args.connections, tmp, engine.proc.pid,
                    headers=AUTH if arm == "on" else None,
                )  # fmt: skip
            finally:
                engine.stop()
            if res.non_2xx:
                raise SystemExit(f"auth {arm}: {res.non_2xx} answers were not 2xx")
            runs[arm].append(res.requests_per_s)
            cpu[arm].append(res.cpu_us_per_request)
            say(
                f"    {res.requests_per_s:,.0f} req/s, engine CPU {res.cpu_us_per_request:.0f} µs/req"
            )
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
    return {"on": on, "off": off, "ratio": on / off, "runs": runs,
            "cpu_us": {"on": cpu_on, "off": cpu_off, "runs": cpu},
            "cpu_ratio": cpu_off / cpu_on}  # fmt: skip


def auth_row(auth: dict[str, Any]) -> tuple[str, str, str, str, str]:
    on_off = zip(auth["runs"]["on"], auth["runs"]["off"], strict=True)
    cpu_on_off = zip(auth["cpu_us"]["runs"]["on"], auth["cpu_us"]["runs"]["off"], strict=True)
    return (
        "Single-message ingest (role api), auth on vs off (req/s, median; engine CPU µs/req)",
        f"{auth['on']:,.0f} vs {auth['off']:,.0f}; "
        f"{auth['cpu_us']['on']:.0f} vs {auth['cpu_us']['off']:.0f} µs",
        "runs: "
        + " / ".join(f"{a:,.0f} vs {b:,.0f}" for a, b in on_off)
        + "; CPU: "
        + " / ".join(f"{a:.0f} vs {b:.0f}" for a, b in cpu_on_off),
        f"{auth['ratio']:.2f} × auth off (req/s); {auth['cpu_ratio']:.2f} × (CPU per request)",
        "≥ 0.95",
    )


def only_auth(args: argparse.Namespace) -> None:
    """``--only auth``: the auth phase alone, printed as the full run's row."""
    say(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmpdir,
        RedisServer(Path(tmpdir) / "redis") as redis,
    ):
        auth = phase_auth_cost(args, redis, Path(tmpdir))
    print("\n| measurement | result | notes | ratio | target |\n|---|---:|---|---|---|")
    print(f"| {' | '.join(auth_row(auth))} |")


def phase_compare(
    args: argparse.Namespace, redis: RedisServer, tmp: Path, first: float
) -> dict[str, Any]:
    """End to end of this tree against an older commit, alternating, in this same run."""
    ref_dir = tmp / "ref-tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(ref_dir), args.compare_ref],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        current, ref = [first], []
        for i in range(args.compare_rounds):
            say(f"compare {i + 1}/{args.compare_rounds}: `{args.compare_ref}`")
            ref.append(phase_e2e(args, redis, tmp, ref_dir)[0])
            if i + 1 < args.compare_rounds:
                say(f"compare {i + 1}/{args.compare_rounds}: this tree")
                current.append(phase_e2e(args, redis, tmp)[0])
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_dir)],
                       check=False, capture_output=True)  # fmt: skip
    # Medians, not the best: one lucky round on a noisy 2-core machine must not decide.
    mid_current, mid_ref = statistics.median(current), statistics.median(ref)
    say(
        f"    this tree {[round(x) for x in current]}  {args.compare_ref} {[round(x) for x in ref]}"
    )
    return {"current": mid_current, "ref": mid_ref, "ratio": mid_current / mid_ref,
            "runs_current": current, "runs_ref": ref}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=10, help="duration of each wrk/sink phase (default 10)"
    )
    parser.add_argument(
        "--connections", type=int, default=64, help="wrk connections for single POSTs (default 64)"
    )
    parser.add_argument(
        "--batch", type=int, default=1000, help="messages per batch POST (default 1000)"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=30_000,
        help="messages in the end-to-end phase (default 30000)",
    )
    parser.add_argument("--senders", type=int, default=16, help="engine sender tasks (default 16)")
    parser.add_argument(
        "--compare-ref",
        metavar="GIT_REF",
        help="also run the end-to-end phase on this commit (a git worktree), alternating "
        "with this tree, and report the ratio (e.g. a release tag or an earlier issue's commit)",
    )
    parser.add_argument("--compare-rounds", type=int, default=3, help="alternations (default 3)")
    parser.add_argument(
        "--auth-rounds", type=int, default=2,
        help="rounds of ingest with auth on and off, alternating (default 2; 0 skips)",
    )  # fmt: skip
    parser.add_argument(
        "--only", choices=["auth"],
        help="run only this phase (auth: --auth-rounds of ingest with auth on and off)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default=str(ROOT / "bench-results"), help="directory for the JSON result"
    )
    args = parser.parse_args()
    if args.only == "auth":
        only_auth(args)
        return

    say(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmpdir,
        RedisServer(Path(tmpdir) / "redis") as redis,
    ):
        tmp = Path(tmpdir)
        first = phase_ceiling(args, tmp)
        builtin = phase_ceiling(args, tmp, "builtin")
        ingest = phase_ingest(args, redis, tmp, "builtin")
        ingest_hc = phase_ingest(args, redis, tmp, "hypercorn")
        # The ceiling again, after: the better of the two is the one we compare with,
        # so a machine that warmed up (or cooled down) mid-run cannot flatter the ratio.
        second = phase_ceiling(args, tmp)
        hello = max(first, second, key=lambda r: r.requests_per_s)
        batch, batch_rate = phase_batch(args, redis, tmp)
        sink_rate = phase_sink_ceiling(args)
        e2e_rate, e2e = phase_e2e(args, redis, tmp)
        single = phase_e2e_single(args, redis, tmp)
        auth = phase_auth_cost(args, redis, tmp) if args.auth_rounds else None
        compare: dict[str, Any] | None = None
        if args.compare_ref:
            compare = phase_compare(args, redis, tmp, e2e_rate)

    def lat(r: WrkResult) -> str:
        return f"p50 {r.p50_ms:.1f} / p99 {r.p99_ms:.1f} ms; CPU {r.cpu_us_per_request:.0f} µs/req"

    rows = [
        ("HTTP ceiling: bare hello on hypercorn-trio (req/s)", f"{hello.requests_per_s:,.0f}",
         lat(hello), "", ""),
        ("HTTP ceiling: bare hello on the built-in server (req/s)",
         f"{builtin.requests_per_s:,.0f}", lat(builtin),
         f"{builtin.requests_per_s / hello.requests_per_s:.1f} × hypercorn hello", ""),
        ("Single-message ingest, built-in server, senders running (req/s)",
         f"{ingest.requests_per_s:,.0f}", lat(ingest),
         f"{ingest.requests_per_s / hello.requests_per_s:.2f} × hypercorn hello; "
         f"{ingest.requests_per_s / builtin.requests_per_s:.2f} × built-in hello",
         "≥ 6 × hypercorn, ≥ 0.5 × built-in"),
        ("Single-message ingest, http.server = hypercorn (req/s)",
         f"{ingest_hc.requests_per_s:,.0f}", lat(ingest_hc),
         f"{ingest_hc.requests_per_s / hello.requests_per_s:.2f} × hypercorn hello", ""),
    ]  # fmt: skip
    rows += [
        (
            f"Batch ingest, {args.batch}/POST (msgs/s)",
            f"{batch_rate:,.0f}",
            f"p50 {batch.p50_ms:.0f} / p99 {batch.p99_ms:.0f} ms",
            "",
            "≥ 50,000",
        ),
        ("Sink ceiling: one pipelined client (msgs/s)", f"{sink_rate:,.0f}", "", "", ""),
        (
            f"End to end, {e2e['posted']:,} msgs (msgs/s)",
            f"{e2e_rate:,.0f}",
            f"dupes {e2e['duplicates']}",
            f"{e2e_rate / sink_rate:.2f} × sink ceiling",
            "≥ 0.70",
        ),
        (
            f"End to end, single POSTs, {single['posted']:,} msgs (msgs/s)",
            f"{single['msgs_per_s']:,.0f}",
            f"accepted at {single['ingest_req_per_s']:,.0f} req/s; dupes {single['duplicates']}",
            f"{single['msgs_per_s'] / sink_rate:.2f} × sink ceiling",
            "≥ 0.8",
        ),
    ]
    if auth is not None:
        rows.append(auth_row(auth))
    table = [
        "| measurement | result | latency / notes | ratio | target |",
        "|---|---:|---|---|---|",
    ]
    table += [f"| {' | '.join(r)} |" for r in rows]
    if compare is not None:
        table.append(
            f"| End to end, this tree vs `{args.compare_ref}` (msgs/s) | "
            f"{compare['current']:,.0f} vs {compare['ref']:,.0f} | median of alternating runs: "
            f"{', '.join(f'{x:,.0f}' for x in compare['runs_current'])} vs "
            f"{', '.join(f'{x:,.0f}' for x in compare['runs_ref'])} | "
            f"{compare['ratio']:.2f} × `{args.compare_ref}` | ≥ 0.97 |"
        )
    print("\n" + "\n".join(table) + "\n", flush=True)
    if ingest.non_2xx or ingest_hc.non_2xx or batch.non_2xx or single["non_2xx"]:
        say(
            f"WARNING: non-2xx answers: ingest {ingest.non_2xx} / {ingest_hc.non_2xx}, "
            f"batch {batch.non_2xx}, single end to end {single['non_2xx']}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cores": os.cpu_count(),
        "args": vars(args),
        "hello": vars(hello),
        "hello_builtin": vars(builtin),
        "ingest": vars(ingest),
        "ingest_hypercorn": vars(ingest_hc),
        "e2e_single": single,
        "auth_cost": auth,
        "batch": {**vars(batch), "msgs_per_s": batch_rate},
        "sink_ceiling_msgs_per_s": sink_rate,
        "compare": compare,
        "e2e": {**e2e, "msgs_per_s": e2e_rate},
        "table": table,
    }
    (out / "latest.json").write_text(json.dumps(result, indent=2))
    say(f"wrote {out / 'latest.json'}")


if __name__ == "__main__":
    main()
