"""Benchmark webhook dispatch (issue 14): its CPU cost per message and its latency.

    .venv/bin/python -m scripts.bench_webhooks [--rounds 2] [--messages 10000]

Alternating rounds, fresh Redis, sink and engine each (role all, 16 senders): (a) no
webhook endpoint; (b) one endpoint wanting every event, served by a receiver process
(fixtures/receiver.py: answers 200, logs each request's webhook-id, the event's `at`
and when it arrived). N messages are posted in batches; a round ends when the sink has
them all and (b) the receiver has every event. Reported: engine CPU per message (user +
system, /proc) in (b) over (a) -- target ≤ 1.10 -- and event `at` → received at the
receiver, p50/p99/max -- target p99 ≤ 1 s. Everything shares this machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from engine.embedded import RedisServer, SinkProcess, free_port
from fixtures.auth import AUTH
from fixtures.engine import EngineProcess
from scripts.benchlib import (
    cpu_seconds,
    publish,
    say,
    stop_engine,
    target_table,
    wait_until,
    workdir,
)

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello from the webhook benchmark. " * 8


def run_round(args: argparse.Namespace, tmp: Path, hooked: bool, n_round: int) -> dict[str, Any]:
    tag = f"r{n_round}-{'hook' if hooked else 'none'}"
    body = json.dumps({"messages": [{"to": "b@example.com", "subject": "B", "text": TEXT}]
                       * args.batch}).encode()  # fmt: skip
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / f"{tag}-redis"))
        sink = stack.enter_context(SinkProcess(workdir=tmp / f"{tag}-sink", log=False))
        # The receiver is on 127.0.0.1, which webhooks refuse unless allowed (SSRF rules).
        engine = EngineProcess(
            redis.url, sink.url, tmp / f"{tag}-engine", "--role", "all", "--senders", "16",
            "--log-level", "warning", env={"ENGINE_WEBHOOKS__ALLOW": '["127.0.0.1/32"]'},
        )  # fmt: skip
        stack.callback(stop_engine, engine)
        log = tmp / f"{tag}-receiver.jsonl"
        c = stack.enter_context(httpx.Client(base_url=engine.base, timeout=30, headers=AUTH))
        if hooked:
            port = free_port()
            receiver = subprocess.Popen(
                [sys.executable, "-m", "fixtures.receiver", "--port", str(port), "--log", str(log)],
                cwd=ROOT,
            )
            stack.callback(receiver.kill)
            time.sleep(0.5)
            hook = {"url": f"http://127.0.0.1:{port}/hook", "batch_max": args.batch_max}
            r = c.post("/v1/webhooks", json=hook)
            assert r.status_code == 201, r.text
            time.sleep(1.2)  # the dispatcher's endpoint cache
        n = args.messages
        cpu0 = cpu_seconds(engine.proc.pid)
        t0 = time.time()
        posted = 0
        while posted < n:
            r = c.post("/v1/messages/batch", content=body,
                       headers={"content-type": "application/json"})  # fmt: skip
            r.raise_for_status()
            posted += len(r.json()["ids"])

        def delivered() -> bool:
            return int(sink.stats().get("received", 0)) >= posted

        wait_until(f"{tag}: delivery", delivered, timeout=max(60.0, n / 200))
        expect = 3 * posted  # queued, processing, sent

        def lines() -> list[dict[str, Any]]:
            return [json.loads(x) for x in log.read_text().splitlines() if x] if hooked else []

        if hooked:
            wait_until(f"{tag}: webhooks", lambda: len({x["id"] for x in lines()}) >= expect,
                       timeout=max(120.0, n / 50),
                       progress=lambda: f"received {len(lines()):,}/{expect:,}")  # fmt: skip
        cpu = cpu_seconds(engine.proc.pid) - cpu0
        got = lines()
        lat = sorted(x["received"] - x["at"] for x in got)
        out: dict[str, Any] = {
            "hooked": hooked, "posted": posted, "elapsed_s": time.time() - t0,
            "engine_cpu_us_per_msg": 1e6 * cpu / posted,
            "events_received": len(got), "distinct_events": len({x["id"] for x in got}),
        }  # fmt: skip
        if lat:
            out |= {"p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)],
                    "max_ms": lat[-1]}  # fmt: skip
        say(
            f"    {tag}: engine CPU {out['engine_cpu_us_per_msg']:.0f} µs/msg"
            + (f", webhook latency p50 {out['p50_ms']} / p99 {out['p99_ms']} ms" if lat else "")
        )
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each arm (2)")
    parser.add_argument("--messages", type=int, default=10_000, help="per round (10000)")
    parser.add_argument("--batch", type=int, default=500, help="messages per POST (500)")
    parser.add_argument(
        "--batch-max", type=int, default=1,
        help="the endpoint's batch_max: events per request (1: one each, the default)",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--keep", metavar="DIR", help="keep the work dirs in DIR")
    args = parser.parse_args()
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "hook": []}
    with workdir(args.keep, "bench-webhooks-") as tmp:
        for i in range(args.rounds):
            for hooked in (False, True):
                say(f"round {i + 1}/{args.rounds}: {'one endpoint' if hooked else 'no endpoint'}")
                runs["hook" if hooked else "none"].append(run_round(args, tmp, hooked, i + 1))
    none = statistics.median(r["engine_cpu_us_per_msg"] for r in runs["none"])
    hook = statistics.median(r["engine_cpu_us_per_msg"] for r in runs["hook"])
    p99 = max(r["p99_ms"] for r in runs["hook"])
    rows = [
        ("Engine CPU per message, no endpoint / one endpoint (µs, median)",
         f"{none:.0f} / {hook:.0f}", f"{hook / none:.2f} ×", "≤ 1.10 ×", hook / none <= 1.10),
        ("Event → webhook received, p50 / p99 / max (ms, worst round)",
         " / ".join(str(max(r[k] for r in runs["hook"])) for k in ("p50_ms", "p99_ms", "max_ms")),
         "", "p99 ≤ 1,000 ms", p99 <= 1000),
        ("Every event delivered (distinct webhook-ids / events)",
         ", ".join(f"{r['distinct_events']:,}/{3 * r['posted']:,}" for r in runs["hook"]),
         ", ".join(f"{r['events_received']:,} received (with repeats)" for r in runs["hook"]), "all",
         all(r["distinct_events"] >= 3 * r["posted"] for r in runs["hook"])),
    ]  # fmt: skip
    publish(target_table(rows), {"runs": runs}, args.json, args, started)


if __name__ == "__main__":
    main()
