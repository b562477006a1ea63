"""Benchmark flow control (issue 4): rate accuracy, claim cost, high-priority wait.

Scenarios (each in this one run on this machine; --scenario picks one):
  rate      One Redis, one sink, two `engine serve` replicas (role all, same Redis, same
            limits: global 400/s, a.test 50/s, b.test 120/s, other domains only under the
            global limit). A backlog lasting ~60 s for every domain is posted through
            POST /v1/messages/batch; the sink's per-message log then gives the delivered
            rate per domain and in all over a window (default 30 s) that starts after a
            warm-up (default 3 s) counted from the end of the preload. Target: the global
            rate within +-5 % of its limit. The global limit binds here (a, b and c want
            more than 400/s together) and is shared in queue order, so each domain gets
            its share of the backlog: at most its own limit (reported, not the target).
            Then a control run (--no-rate-control skips it): the same domain limits, no
            global limit and no c.test, so the domain limits bind: target +-5 % each.
  cost      End to end (as scripts/bench.py: N messages posted in batches to one replica
            whose senders run; rate = N / (last message received by the sink - first
            POST)), alternating rounds of (a) plain: default priority, one tenant, no
            limits and (b) flow on: priorities high/normal/low mixed, 20 tenants
            round-robin, limits configured but far from binding (1e6/s). Fresh Redis,
            sink and engine per round. Target: median(b) / median(a) >= 0.9.
  priority  One replica, no limits. A backlog of low-priority messages (default 40,000)
            is posted in batches, then high-priority messages are POSTed one by one every
            100 ms while it drains; each one's wait is the time from its 202 to its arrival
            at the sink (matched by X-Engine-Job-Id in the sink's log). Target: p99 <= 1 s
            (nearest rank: with 50 messages p99 is the max). Also reported: low messages
            not yet delivered when the last high one arrived (there was a backlog).

Progress goes to stderr; the markdown table to stdout; --json FILE writes everything.
Redis (AOF everysec), engines, sink and this client share the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from engine.embedded import ChildError, RedisServer, SinkProcess
from fixtures.auth import AUTH
from fixtures.engine import EngineProcess
from scripts.benchlib import (
    TAG,
    ScenarioFailed,
    cpu_seconds,
    interrupt,
    publish,
    say,
    stop_engine,
    wait_until,
    workdir,
    yes,
)

TEXT = "Hello from the benchmark. " * 10  # the body scripts/bench.py sends
SCENARIOS = ("rate", "cost", "priority")


# -- processes ------------------------------------------------------------------------


def start_redis(stack: contextlib.ExitStack, data_dir: Path) -> RedisServer:
    return stack.enter_context(RedisServer(data_dir))


def start_sink(stack: contextlib.ExitStack, workdir: Path) -> SinkProcess:
    return stack.enter_context(SinkProcess(workdir=workdir, log=True))


def start_engine(
    stack: contextlib.ExitStack,
    redis_url: str,
    smtp_url: str,
    workdir: Path,
    senders: int,
    env: dict[str, str] | None = None,
) -> EngineProcess:
    """`engine serve` (role all) with ``env`` settings; stopped when ``stack`` closes."""
    engine = EngineProcess(
        redis_url, smtp_url, workdir, "--role", "all", "--senders", str(senders),
        "--log-level", "warning", env=env, wait_ready=False,
    )  # fmt: skip
    stack.callback(stop_engine, engine)
    try:
        engine.wait_ready(timeout=30)
    except ChildError as exc:
        raise ScenarioFailed(str(exc)[-3000:]) from None
    return engine


def check_alive(*engines: EngineProcess) -> None:
    for engine in engines:
        if engine.proc.poll() is not None:
            raise ScenarioFailed(
                f"engine on :{engine.port} exited with {engine.proc.returncode}:\n"
                + engine.output()[-3000:]
            )


class LogTail:
    """Reads the sink's JSON-lines log incrementally (complete lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        return [json.loads(line) for line in lines if line]


def domain_of(entry: dict[str, Any]) -> str:
    rcpts = entry.get("rcpt_tos") or ["?@?"]
    return str(rcpts[0]).rpartition("@")[2].lower()


# -- HTTP -----------------------------------------------------------------------------


def client(base: str) -> httpx.Client:
    headers = {"content-type": "application/json", **AUTH}
    return httpx.Client(base_url=base, timeout=30, headers=headers)


def post_batch(c: httpx.Client, body: bytes) -> list[str]:
    r = c.post("/v1/messages/batch", content=body)
    if r.status_code != 202:
        raise ScenarioFailed(f"POST /v1/messages/batch answered {r.status_code}: {r.text[:500]}")
    ids: list[str] = r.json()["ids"]
    return ids


def message(to: str, **extra: Any) -> dict[str, Any]:
    return {"to": to, "subject": "Benchmark", "text": TEXT, **extra}


def batch_body(messages: list[dict[str, Any]]) -> bytes:
    return json.dumps({"messages": messages}).encode()


def sleep_until(t_wall: float, progress: Callable[[], str] | None = None) -> None:
    last = time.monotonic()
    while (left := t_wall - time.time()) > 0:
        time.sleep(min(left, 0.25))
        if progress is not None and time.monotonic() - last >= 5:
            say("    " + progress())
            last = time.monotonic()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of an ascending list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- 1. rate accuracy -----------------------------------------------------------------

RATE_GLOBAL = 400.0
RATE_DOMAINS = {"a.test": 50.0, "b.test": 120.0}
RATE_OTHER = "c.test"  # no limit of its own: it gets what the global limit leaves


def rate_run(
    args: argparse.Namespace, tmp: Path, tag: str, global_per_s: float, counts: dict[str, int]
) -> dict[str, Any]:
    """Preload ``counts`` (domain -> messages) into two replicas limited to RATE_DOMAINS
    and ``global_per_s`` (0 = none); measure the sink's rates over the window."""
    expected = {d: RATE_DOMAINS[d] for d in counts if d in RATE_DOMAINS}
    if global_per_s and RATE_OTHER in counts:
        expected[RATE_OTHER] = global_per_s - sum(RATE_DOMAINS.values())
    env = {
        "ENGINE_LIMITS__GLOBAL_PER_S": f"{global_per_s:g}",
        "ENGINE_LIMITS__DOMAINS": json.dumps(RATE_DOMAINS),
        "ENGINE_LIMITS__DOMAIN_DEFAULT_PER_S": "0",
    }
    domains = [d for d, n in counts.items() for _ in range(n)]
    random.Random(4).shuffle(domains)  # every batch mixes the domains
    msgs = [message(f"u{i}@{d}") for i, d in enumerate(domains)]
    bodies = [batch_body(msgs[i : i + args.batch]) for i in range(0, len(msgs), args.batch)]

    with contextlib.ExitStack() as stack:
        redis = start_redis(stack, tmp / f"{tag}-redis")
        sink = start_sink(stack, tmp / f"{tag}-sink")
        engines = [
            start_engine(
                stack, redis.url, sink.url, tmp / f"{tag}-engine{k}", args.senders,
                {**env, "ENGINE_SENDER__MESSAGE_ID_DOMAIN": f"replica{k}.bench"},
            )
            for k in (1, 2)
        ]  # fmt: skip
        say(
            f"{tag}: 2 replicas (:{engines[0].port}, :{engines[1].port}), {args.senders} senders "
            f"each; limits global {f'{global_per_s:g}/s' if global_per_s else 'none'}, "
            + ", ".join(f"{d} {r:g}/s" for d, r in RATE_DOMAINS.items())
        )
        say(
            f"{tag}: preloading {len(msgs):,} messages ("
            + ", ".join(f"{d} {n:,}" for d, n in counts.items())
            + f") in {len(bodies)} batches, alternating replicas"
        )
        t_first = time.time()
        clients = [stack.enter_context(client(e.base)) for e in engines]
        for i, body in enumerate(bodies):
            post_batch(clients[i % 2], body)
        t_loaded = time.time()
        w0 = t_loaded + args.warmup
        w1 = w0 + args.window
        say(
            f"{tag}: preload took {t_loaded - t_first:.1f} s; window {args.window:g} s after "
            f"{args.warmup:g} s of warm-up"
        )
        tail = LogTail(sink.log_file)
        seen: list[dict[str, Any]] = []

        def progress() -> str:
            check_alive(*engines)
            seen.extend(tail.read())
            now = time.time() - 0.3  # the sink's log lags by up to 0.2 s
            recent = [e for e in seen if now - 5 <= e["at"] < now]
            by = Counter(domain_of(e) for e in recent)
            rates = ", ".join(f"{d} {by.get(d, 0) / 5:.0f}" for d in counts)
            return f"delivered {len(seen):,}; last ~5 s: {rates} msgs/s"

        sleep_until(w1 + 0.5, progress)
        check_alive(*engines)
        limits = httpx.get(engines[0].base + "/v1/limits", headers=AUTH, timeout=10).json()
        time.sleep(0.3)  # the sink flushes its log every 0.2 s
        seen.extend(tail.read())

    window = [e for e in seen if w0 <= e["at"] < w1]
    by_domain = Counter(domain_of(e) for e in window)
    by_replica = Counter(
        str(e.get("message_id") or "").rpartition("@")[2].rstrip(">") for e in window
    )
    before_end = Counter(domain_of(e) for e in seen if e["at"] < w1)
    per_second = {
        d: [
            sum(1 for e in window if domain_of(e) == d and w0 + s <= e["at"] < w0 + s + 1)
            for s in range(int(args.window))
        ]
        for d in counts
    }
    total = sum(counts.values())
    rows: dict[str, Any] = {}
    targets = [(d, r, by_domain.get(d, 0)) for d, r in expected.items()]
    if global_per_s:
        targets.append(("global", global_per_s, len(window)))
    for name, configured, got in targets:
        measured = got / args.window
        if name == "global":
            left = total - sum(before_end.values())
        else:
            left = counts[name] - before_end.get(name, 0)
        rows[name] = {
            "configured_per_s": configured,
            "measured_per_s": measured,
            "error_pct": (measured - configured) / configured * 100,
            "delivered_in_window": got,
            "left_at_window_end": left,
            # What the domain would get if the global limit were shared in proportion
            # to the backlog's mix (one clue when a domain misses its own limit).
            "backlog_share_of_global_per_s": (
                global_per_s * counts[name] / total if global_per_s and name != "global" else None
            ),
        }
        if left <= 0:
            say(f"WARNING {tag}: {name} ran out of backlog before the window ended")
    for name, row in rows.items():
        share = row["backlog_share_of_global_per_s"]
        say(
            f"    {name:8} configured {row['configured_per_s']:6g}/s  measured "
            f"{row['measured_per_s']:7.1f}/s  ({row['error_pct']:+.1f} %)  "
            f"left at window end {row['left_at_window_end']:,}"
            + (f"  (backlog share of global: {share:.1f}/s)" if share is not None else "")
        )
    say(f"    deliveries by replica in the window: {dict(by_replica)}")
    return {
        "global_per_s": global_per_s,
        "domain_limits": RATE_DOMAINS,
        "preloaded": counts,
        "preload_s": t_loaded - t_first,
        "warmup_s": args.warmup,
        "window_s": args.window,
        "domains": rows,
        "by_replica": dict(by_replica),
        "per_second": per_second,
        "limits": limits,
    }


def scenario_rate(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    # Enough backlog for every domain to last the whole measurement and then some; c.test
    # gets more than its expected share so it cannot run dry even if the global cap leaked.
    counts = {d: int(args.rate_backlog_s * r) for d, r in RATE_DOMAINS.items()}
    c_rate = RATE_GLOBAL - sum(RATE_DOMAINS.values())
    counts[RATE_OTHER] = int(args.rate_backlog_s * c_rate * 1.3)
    result = rate_run(args, tmp, "rate", RATE_GLOBAL, counts)
    if args.rate_control:
        # The same domain limits with no global limit and no c.test: the domain buckets
        # alone, across the two replicas.
        del counts[RATE_OTHER]
        result["control_no_global"] = rate_run(args, tmp, "rate-control", 0.0, counts)
    return result


# -- 2. claim cost --------------------------------------------------------------------

COST_LIMITS = {
    "ENGINE_LIMITS__GLOBAL_PER_S": "1000000",
    "ENGINE_LIMITS__DOMAIN_DEFAULT_PER_S": "1000000",
    "ENGINE_LIMITS__TENANT_DEFAULT_PER_S": "1000000",
}


def cost_round(args: argparse.Namespace, tmp: Path, flow: bool, n_round: int) -> dict[str, Any]:
    lanes = ("high", "normal", "low")
    if flow:
        msgs = [
            message("bench@example.com", priority=lanes[i % 3], tenant=f"t{i % 20:02d}")
            for i in range(args.batch)
        ]
    else:
        msgs = [message("bench@example.com") for _ in range(args.batch)]
    body = batch_body(msgs)  # one body, as scripts/bench.py posts
    n = args.cost_messages
    tag = f"cost{n_round}-{'flow' if flow else 'plain'}"
    with contextlib.ExitStack() as stack:
        redis = start_redis(stack, tmp / f"{tag}-redis")
        sink = start_sink(stack, tmp / f"{tag}-sink")
        engine = start_engine(
            stack, redis.url, sink.url, tmp / f"{tag}-engine", args.senders,
            COST_LIMITS if flow else None,
        )  # fmt: skip
        c = stack.enter_context(client(engine.base))
        cpu0 = cpu_seconds(engine.proc.pid)
        t0 = time.time()
        posted = 0
        while posted < n:
            posted += len(post_batch(c, body))
        t_posted = time.time() - t0

        def got() -> int:
            return int(sink.stats().get("received", 0))

        def done() -> bool:
            check_alive(engine)
            return got() >= posted

        wait_until(
            f"{tag}: delivery",
            done,
            timeout=max(60.0, n / 300),
            progress=lambda: f"delivered {got():,}/{posted:,}",
        )
        entries = sink.wait_received(posted, timeout=5)
        stats = sink.stats()
        engine_cpu = cpu_seconds(engine.proc.pid) - cpu0
    last = max(e["at"] for e in entries)
    rate = posted / (last - t0)
    return {
        "flow": flow,
        "posted": posted,
        "elapsed_s": last - t0,
        "posted_after_s": t_posted,
        "msgs_per_s": rate,
        "duplicates": stats.get("duplicates"),
        # The engine process is the bottleneck here (one Python thread at ~100 %).
        "engine_cpu_us_per_msg": 1e6 * engine_cpu / posted,
    }


def scenario_cost(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    say(
        f"cost: {args.cost_rounds}+{args.cost_rounds} alternating rounds, {args.cost_messages:,} "
        f"messages each in batches of {args.batch}, one replica with {args.senders} senders"
    )
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "flow": []}
    for i in range(args.cost_rounds):
        for flow in (False, True):
            name = "flow" if flow else "plain"
            say(f"cost {i + 1}/{args.cost_rounds}: {name}")
            run = cost_round(args, tmp, flow, i + 1)
            runs[name].append(run)
            say(
                f"    {run['msgs_per_s']:,.0f} msgs/s end to end ({run['posted']:,} in "
                f"{run['elapsed_s']:.1f} s; all posted after {run['posted_after_s']:.1f} s)  "
                f"duplicates {run['duplicates']}  engine CPU {run['engine_cpu_us_per_msg']:.0f} µs/msg"
            )
    plain = statistics.median(r["msgs_per_s"] for r in runs["plain"])
    flow_rate = statistics.median(r["msgs_per_s"] for r in runs["flow"])
    paired = [
        f["msgs_per_s"] / p["msgs_per_s"] for p, f in zip(runs["plain"], runs["flow"], strict=True)
    ]
    say(
        f"    median plain {plain:,.0f}  flow on {flow_rate:,.0f}  ratio {flow_rate / plain:.3f}"
        f"  (round by round: {', '.join(f'{x:.2f}' for x in paired)})"
    )
    return {
        "paired_ratios": paired,
        "paired_ratio_median": statistics.median(paired),
        "messages": args.cost_messages,
        "plain_median_msgs_per_s": plain,
        "flow_median_msgs_per_s": flow_rate,
        "ratio": flow_rate / plain,
        "runs": runs,
    }


# -- 3. high-priority wait ------------------------------------------------------------


def scenario_priority(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    n_low, n_high = args.priority_low, args.priority_high
    low = [message(f"low{i}@example.com", priority="low") for i in range(n_low)]
    bodies = [batch_body(low[i : i + args.batch]) for i in range(0, n_low, args.batch)]
    with contextlib.ExitStack() as stack:
        redis = start_redis(stack, tmp / "prio-redis")
        sink = start_sink(stack, tmp / "prio-sink")
        engine = start_engine(stack, redis.url, sink.url, tmp / "prio-engine", args.senders)
        c = stack.enter_context(client(engine.base))
        say(f"priority: preloading {n_low:,} low-priority messages in {len(bodies)} batches")
        t_first = time.time()
        low_ids: set[str] = set()
        for body in bodies:
            low_ids.update(post_batch(c, body))
        t_loaded = time.time()
        say(
            f"priority: preload took {t_loaded - t_first:.1f} s; now {n_high} high-priority "
            f"messages, one every {args.priority_interval * 1000:.0f} ms"
        )
        sent: dict[str, tuple[float, float]] = {}  # job id -> (POST start, 202)
        start = time.monotonic()
        for i in range(n_high):
            time.sleep(max(0.0, start + i * args.priority_interval - time.monotonic()))
            t_post = time.time()
            r = c.post("/v1/messages", json=message(f"high{i}@example.com", priority="high"))
            t_202 = time.time()
            if r.status_code != 202:
                raise ScenarioFailed(f"POST /v1/messages answered {r.status_code}: {r.text[:500]}")
            sent[r.json()["id"]] = (t_post, t_202)
        tail = LogTail(sink.log_file)
        arrived: dict[str, float] = {}
        entries: list[dict[str, Any]] = []

        def done() -> bool:
            check_alive(engine)
            for e in tail.read():
                entries.append(e)
                if e.get("job_id") in sent:
                    arrived[e["job_id"]] = e["at"]
            return len(arrived) >= len(sent)

        wait_until(
            "priority: high messages' arrival",
            done,
            timeout=30,
            progress=lambda: f"high arrived {len(arrived)}/{len(sent)}",
        )
        low_left_now = n_low - sum(1 for e in entries if e.get("job_id") in low_ids)
    waits = sorted(arrived[j] - t_202 for j, (_, t_202) in sent.items())
    rtts = sorted(t_202 - t_post for t_post, t_202 in sent.values())
    last_high = max(arrived.values())
    low_before = sum(1 for e in entries if e.get("job_id") in low_ids and e["at"] <= last_high)
    result = {
        "low_preloaded": n_low,
        "high_sent": n_high,
        "interval_s": args.priority_interval,
        "preload_s": t_loaded - t_first,
        "wait_p50_s": percentile(waits, 50),
        "wait_p99_s": percentile(waits, 99),
        "wait_max_s": waits[-1],
        "wait_min_s": waits[0],
        "post_rtt_p50_s": percentile(rtts, 50),
        "post_rtt_max_s": rtts[-1],
        "low_undelivered_at_last_high": n_low - low_before,
        "low_undelivered_at_end": low_left_now,
        "waits_s": waits,
    }
    say(
        f"    wait p50 {result['wait_p50_s'] * 1000:.0f} ms  p99 {result['wait_p99_s'] * 1000:.0f} ms"
        f"  max {result['wait_max_s'] * 1000:.0f} ms; low not yet delivered when the last high "
        f"arrived: {result['low_undelivered_at_last_high']:,}/{n_low:,}"
    )
    if result["low_undelivered_at_last_high"] <= 0:
        say("WARNING priority: the low backlog had drained before the last high message arrived")
    return result


# -- report ---------------------------------------------------------------------------


def table(results: dict[str, Any]) -> list[str]:
    out = [
        "| measurement | configured | measured | error / ratio | target | met |",
        "|---|---:|---:|---:|---|---|",
    ]
    rate = results.get("rate")
    if isinstance(rate, dict) and "domains" in rate:
        rate_runs = [(rate, "")]
        if "control_no_global" in rate:
            rate_runs.append((rate["control_no_global"], ", control: no global limit"))
        for run, note in rate_runs:
            w = f"{run['window_s']:g} s window, 2 replicas{note}"
            global_binds = not note and "global" in run["domains"]
            for name, row in run["domains"].items():
                err = row["error_pct"]
                target, met = "±5 %", abs(err) <= 5
                if name == "global":
                    label = "Global rate, all domains"
                elif global_binds:
                    # The global limit is the binding one: it is shared in queue order,
                    # so a domain gets its share of the backlog, never above its limit.
                    label = f"Rate {name} (global binds: its queue share)"
                    target, met = "≤ its limit", err <= 5
                    if name == RATE_OTHER:  # no limit of its own: what the others leave
                        label = f"Rate {name} (no own limit; global binds: its queue share)"
                        target, met = "—", True
                else:
                    label = f"Rate {name}"
                out.append(
                    f"| {label} (msgs/s, {w}) | {row['configured_per_s']:g} | "
                    f"{row['measured_per_s']:.1f} | {err:+.1f} % | {target} | {yes(met)} |"
                )
    cost = results.get("cost")
    if isinstance(cost, dict) and "ratio" in cost:
        n = len(cost["runs"]["plain"])
        runs = {k: ", ".join(f"{r['msgs_per_s']:,.0f}" for r in v) for k, v in cost["runs"].items()}
        out.append(
            f"| End to end, plain, {cost['messages']:,} msgs (msgs/s, median of {n}) | | "
            f"{cost['plain_median_msgs_per_s']:,.0f} | runs {runs['plain']} | | |"
        )
        out.append(
            f"| End to end, flow on: 3 lanes, 20 tenants, limits (msgs/s, median of {n}) | | "
            f"{cost['flow_median_msgs_per_s']:,.0f} | {cost['ratio']:.2f} × plain "
            f"(runs {runs['flow']}; paired ratios' median {cost['paired_ratio_median']:.2f}) "
            f"| ≥ 0.90 × plain | {yes(cost['ratio'] >= 0.9)} |"
        )
    prio = results.get("priority")
    if isinstance(prio, dict) and "wait_p99_s" in prio:
        label = f"High-priority wait, 202 → sink ({prio['high_sent']} msgs behind {prio['low_preloaded']:,} low)"
        out.append(f"| {label}: p50 | | {prio['wait_p50_s'] * 1000:.0f} ms | | | |")
        out.append(
            f"| {label}: p99 | | {prio['wait_p99_s'] * 1000:.0f} ms | | ≤ 1 s | "
            f"{yes(prio['wait_p99_s'] <= 1.0)} |"
        )
        out.append(f"| {label}: max | | {prio['wait_max_s'] * 1000:.0f} ms | | | |")
        left = prio["low_undelivered_at_last_high"]
        out.append(
            f"| Low messages not yet delivered when the last high one arrived | "
            f"{prio['low_preloaded']:,} posted | {left:,} | | > 0 | {yes(left > 0)} |"
        )
    for name in SCENARIOS:
        r = results.get(name)
        if isinstance(r, dict) and "error" in r:
            first = r["error"].splitlines()[0][:150].replace("|", "/") if r["error"] else ""
            out.append(f"| {name}: FAILED ({first}) | | | | | **NO** |")
    return out


def main() -> int:
    TAG[0] = "bench_flow"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario", choices=[*SCENARIOS, "all"], default="all", help="run one (default all)"
    )
    parser.add_argument("--senders", type=int, default=16, help="sender tasks per replica (16)")
    parser.add_argument("--batch", type=int, default=1000, help="messages per batch POST (1000)")
    parser.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="rate: seconds after the preload before the window (3)",
    )
    parser.add_argument("--window", type=float, default=30.0, help="rate: seconds measured (30)")
    parser.add_argument(
        "--rate-backlog-s", type=float, default=60.0,
        help="rate: seconds' worth of backlog preloaded per domain (60)",
    )  # fmt: skip
    parser.add_argument(
        "--no-rate-control", dest="rate_control", action="store_false",
        help="rate: skip the control run (same domain limits, no global limit, no c.test)",
    )  # fmt: skip
    parser.add_argument(
        "--cost-messages", type=int, default=20_000, help="cost: messages per round (20000)"
    )
    parser.add_argument(
        "--cost-rounds", type=int, default=3, help="cost: rounds of each kind, alternating (3)"
    )
    parser.add_argument(
        "--priority-low", type=int, default=40_000,
        help="priority: low messages preloaded (40000: at the ~4.7k msgs/s this machine "
        "reaches at best, 20000 can drain before the last high message is sent)",
    )  # fmt: skip
    parser.add_argument(
        "--priority-high", type=int, default=50, help="priority: high messages sent (50)"
    )
    parser.add_argument(
        "--priority-interval", type=float, default=0.1,
        help="priority: seconds between high messages (0.1)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON here")
    parser.add_argument(
        "--keep", metavar="DIR", help="keep the work dirs (sink logs, engine logs) in DIR"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupt)

    chosen = SCENARIOS if args.scenario == "all" else (args.scenario,)
    say(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; scenarios {chosen}")
    runners = {"rate": scenario_rate, "cost": scenario_cost, "priority": scenario_priority}
    results: dict[str, Any] = {}
    started = time.monotonic()
    try:
        with workdir(args.keep, "bench-flow-") as tmp:
            for name in chosen:
                t = time.monotonic()
                try:
                    results[name] = runners[name](args, tmp)
                except ScenarioFailed as exc:
                    say(f"{name}: FAILED: {exc}")
                    results[name] = {"error": str(exc)}
                results[name]["duration_s"] = time.monotonic() - t
                say(f"{name}: took {time.monotonic() - t:.0f} s")
    except KeyboardInterrupt:
        say("interrupted: processes stopped")
        return 130
    publish(table(results), results, args.json, args, started)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
