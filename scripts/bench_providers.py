"""Benchmark a provider's HTTP API as the transport (issue 16): end to end through the
Resend emulator against the SMTP sink, at the same concurrency.

    .venv/bin/python -m scripts.bench_providers [--rounds 3] [--messages 10000]

Alternating rounds, a fresh Redis and engine each (role all, 16 senders): (a) the engine
sends to the SMTP sink (counting only); (b) it routes everything to the Resend emulator
(``python -m fixtures.providers --provider resend --no-keep``: the documented API,
counting only) over HTTP/1.1 keep-alive. N messages are posted in batches; a round ends
when the sink, or the emulator, has them all. Reported: messages per second from the
first POST to the last delivered, and engine CPU per message (/proc), each arm's median;
target (b)/(a) throughput ≥ 0.8. Everything shares this machine's two cores (the engine,
Redis, the sink or the emulator, and this client).
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
KEY = "re_bench_key"
TEXT = "Hello from the provider benchmark. " * 8


def _emulator(port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fixtures.providers", "--provider", "resend", "--port", str(port),
         "--key", KEY, "--no-keep"],
        cwd=ROOT, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if "ready" not in line:
        proc.kill()
        raise RuntimeError(f"the Resend emulator did not start: {line!r}")
    return proc


def run_round(args: argparse.Namespace, tmp: Path, provider: bool, n_round: int) -> dict[str, Any]:
    tag = f"r{n_round}-{'resend' if provider else 'smtp'}"
    body = json.dumps({"messages": [{"from": "app@example.com", "to": "b@example.com",
                                     "subject": "B", "text": TEXT}] * args.batch}).encode()  # fmt: skip
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / f"{tag}-redis"))
        sink = stack.enter_context(SinkProcess(workdir=tmp / f"{tag}-sink", log=False))
        env: dict[str, str] = {}
        emulator_url = ""
        if provider:
            port = free_port()
            emu = _emulator(port)
            stack.callback(emu.kill)
            emulator_url = f"http://127.0.0.1:{port}"
            env = {
                "ENGINE_ROUTING__TRANSPORTS": json.dumps(
                    {"resend": f"resend://{KEY}@?api_base={emulator_url}"}
                ),
                "ENGINE_ROUTING__ORDER": '["resend"]',
            }
        engine = EngineProcess(
            redis.url, sink.url, tmp / f"{tag}-engine", "--role", "all", "--senders",
            str(args.senders), "--log-level", "warning", env=env,
        )  # fmt: skip
        stack.callback(stop_engine, engine)
        c = stack.enter_context(httpx.Client(base_url=engine.base, timeout=30, headers=AUTH))

        def delivered() -> int:
            if provider:
                stats = httpx.get(f"{emulator_url}/_emulator/stats", timeout=5).json()
                return int(stats.get("accepted", 0))
            return int(sink.stats().get("received", 0))

        n = args.messages
        cpu0 = cpu_seconds(engine.proc.pid)
        t0 = time.time()
        posted = 0
        while posted < n:
            r = c.post("/v1/messages/batch", content=body,
                       headers={"content-type": "application/json"})  # fmt: skip
            r.raise_for_status()
            posted += len(r.json()["ids"])
        wait_until(f"{tag}: delivery", lambda: delivered() >= posted, timeout=max(60.0, n / 100),
                   progress=lambda: f"delivered {delivered():,}/{posted:,}")  # fmt: skip
        elapsed = time.time() - t0
        cpu = cpu_seconds(engine.proc.pid) - cpu0
        out = {
            "provider": provider, "posted": posted, "delivered": delivered(),
            "elapsed_s": elapsed, "msgs_per_s": posted / elapsed,
            "engine_cpu_us_per_msg": 1e6 * cpu / posted,
        }  # fmt: skip
        say(f"    {tag}: {out['msgs_per_s']:,.0f} msgs/s, engine CPU "
            f"{out['engine_cpu_us_per_msg']:.0f} µs/msg")  # fmt: skip
        return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each arm (3)")
    parser.add_argument("--messages", type=int, default=10_000, help="per round (10000)")
    parser.add_argument("--batch", type=int, default=500, help="messages per POST (500)")
    parser.add_argument("--senders", type=int, default=16, help="sender tasks (16)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--keep", metavar="DIR", help="keep the work dirs in DIR")
    args = parser.parse_args()
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {"smtp": [], "resend": []}
    with workdir(args.keep, "bench-providers-") as tmp:
        for i in range(args.rounds):
            for provider in (False, True):
                arm = "resend" if provider else "smtp"
                say(f"round {i + 1}/{args.rounds}: {arm}")
                runs[arm].append(run_round(args, tmp, provider, i + 1))
    smtp = statistics.median(r["msgs_per_s"] for r in runs["smtp"])
    resend = statistics.median(r["msgs_per_s"] for r in runs["resend"])
    cpu = [statistics.median(r["engine_cpu_us_per_msg"] for r in runs[a]) for a in runs]
    rows = [
        ("End to end, SMTP sink / Resend emulator (msgs/s, median)",
         f"{smtp:,.0f} / {resend:,.0f}", f"{resend / smtp:.2f} ×", "≥ 0.8 ×", resend / smtp >= 0.8),
        ("Every round, msgs/s", "; ".join(
            f"{a}: " + ", ".join(f"{r['msgs_per_s']:,.0f}" for r in runs[a]) for a in runs),
         "", "", True),
        ("Engine CPU per message, SMTP / Resend (µs, median)", f"{cpu[0]:.0f} / {cpu[1]:.0f}",
         f"{cpu[1] / cpu[0]:.2f} ×", "", True),
    ]  # fmt: skip
    publish(target_table(rows), {"runs": runs}, args.json, args, started)


if __name__ == "__main__":
    main()
