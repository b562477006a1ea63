"""Soak run: does Redis memory stay flat under an endless stream of sent mail?

Starts Redis (AOF on), the sink and one engine with short retention (sent records kept
--keep-s seconds, event stream trimmed to --events entries), then posts batches at a
steady --rate for --seconds while sampling Redis every second: used memory, job
records, stream length. Prints progress lines, then a table of memory over time and
the bytes per live job record. Exits 1 if memory in the last quarter of the run grew
by more than 10 % over the quarter before it (after retention had kicked in).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from engine.embedded import RedisServer, SinkProcess
from engine.keys import Keys
from engine.queue import open_redis
from fixtures.auth import AUTH
from fixtures.engine import EngineProcess

MESSAGE = {"to": "soak@example.com", "subject": "Soak", "text": "Hello from the soak run. " * 10}


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


async def sample(url: str) -> dict[str, int]:
    k = Keys()
    async with open_redis(url) as r:
        info = await r.info("memory")
        jobs = 0
        async for _ in r.scan_iter(match=k.job("*"), count=1000):
            jobs += 1
        return {
            "used_memory": int(info["used_memory"]),
            "jobs": jobs,
            "events": int(await r.xlen(k.events)),
            "ready": int(await r.llen(k.ready())),
        }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seconds", type=float, default=60, help="length of the run (default 60)")
    p.add_argument(
        "--rate", type=int, default=1000, help="messages posted per second (default 1000)"
    )
    p.add_argument(
        "--keep-s", type=int, default=10, help="seconds a sent record is kept (default 10)"
    )
    p.add_argument("--events", type=int, default=10_000, help="event stream length (default 10000)")
    args = p.parse_args()

    batch = max(1, args.rate // 10)
    body = json.dumps({"messages": [MESSAGE] * batch})
    samples: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="soak-") as tmp,
        RedisServer(Path(tmp) / "redis") as redis,
    ):
        base_mem = trio.run(sample, redis.url)["used_memory"]
        with SinkProcess(workdir=Path(tmp) / "sink", log=False) as sink:
            env = {
                "ENGINE_QUEUE__KEEP_SENT_S": str(args.keep_s),
                "ENGINE_QUEUE__EVENTS_MAXLEN": str(args.events),
                # Must be shorter than keep_sent_s (the engine refuses to start otherwise).
                "ENGINE_SCHEDULER__MISFIRE_GRACE_S": str(args.keep_s / 2),
            }
            engine = EngineProcess(
                redis.url, sink.url, Path(tmp), "--log-level", "warning", env=env
            )
            try:
                say(f"posting {args.rate} msgs/s for {args.seconds:.0f}s; sent records kept {args.keep_s}s; "
                    f"stream trimmed to ~{args.events} entries")  # fmt: skip
                t0 = time.monotonic()
                posted = 0
                next_sample = t0
                with httpx.Client(
                    base_url=engine.base,
                    timeout=30,
                    headers={"content-type": "application/json", **AUTH},
                ) as c:
                    while (now := time.monotonic()) - t0 < args.seconds:
                        due = int((now - t0) * args.rate)
                        while posted < due:
                            c.post("/v1/messages/batch", content=body).raise_for_status()
                            posted += batch
                        if now >= next_sample:
                            s = trio.run(sample, redis.url)
                            s.update(
                                t=round(now - t0, 1),
                                posted=posted,
                                delivered=int(sink.stats().get("received", 0)),
                            )
                            samples.append(s)
                            if len(samples) % 5 == 1:
                                say(f"t={s['t']:>5}s posted={posted:>7} delivered={s['delivered']:>7} "
                                    f"jobs={s['jobs']:>6} redis={s['used_memory'] / 2**20:7.1f} MiB")  # fmt: skip
                            next_sample += 1.0
                        time.sleep(0.01)
            finally:
                engine.stop()
    n = len(samples)
    q3, q4 = samples[n // 2 : 3 * n // 4], samples[3 * n // 4 :]
    mem3 = sum(s["used_memory"] for s in q3) / max(1, len(q3))
    mem4 = sum(s["used_memory"] for s in q4) / max(1, len(q4))
    live = [s for s in samples[n // 2 :] if s["jobs"]]
    per_job = sum((s["used_memory"] - base_mem) / s["jobs"] for s in live) / max(1, len(live))
    print("\n| t (s) | posted | delivered | job records | stream entries | Redis used memory |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in samples[:: max(1, n // 12)]:
        print(f"| {s['t']} | {s['posted']:,} | {s['delivered']:,} | {s['jobs']:,} | {s['events']:,} | "
              f"{s['used_memory'] / 2**20:.1f} MiB |")  # fmt: skip
    print(f"\nbytes per live job record (incl. its share of stream and lists): {per_job:,.0f}")
    growth = (mem4 - mem3) / mem3 if mem3 else 0.0
    print(
        f"memory, 3rd vs 4th quarter of the run: {mem3 / 2**20:.1f} -> {mem4 / 2**20:.1f} MiB ({growth:+.1%})"
    )
    if growth > 0.10:
        say("FAIL: Redis memory kept growing")
        raise SystemExit(1)
    say("memory flat: OK")


if __name__ == "__main__":
    main()
