"""Benchmark attachments (issue 15): end-to-end throughput and Redis bytes per message.

    .venv/bin/python -m scripts.bench_attachments [--rounds 2] [--messages 5000]

Alternating rounds, fresh Redis, sink and engine each (role all, 16 senders, the sink
counting only): (a) plain messages; (b) the same messages, each with one 100 KiB
attachment shared by all -- uploaded once (POST /v1/attachments), named by its id. N
messages are posted in batches; a round ends when the sink has them all. Reported:
throughput (b) / (a) -- target ≥ 0.7 -- and engine CPU per message.

Then Redis bytes per queued message: a fresh Redis and an engine with role api (no
senders: the jobs stay queued), INFO memory used_memory before and after enqueueing N
messages; in (b) the upload happens before the first reading, and its blob's bytes are
reported beside (and also spread over the N). Target: (b) ≤ twice (a).
Everything shares this machine's cores (the engine, Redis, the sink, this client).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from engine.embedded import RedisServer, SinkProcess
from engine.queue import open_redis
from fixtures.auth import AUTH
from fixtures.engine import EngineProcess
from scripts.benchlib import (
    TAG,
    cpu_seconds,
    publish,
    say,
    stop_engine,
    target_table,
    wait_until,
    workdir,
)

TEXT = "Hello from the attachment benchmark. Your documents are attached. " * 4
ATTACHMENT_BYTES = 100 * 1024


def used_memory(url: str) -> int:
    async def read() -> int:
        async with open_redis(url) as r:
            return int((await r.info("memory"))["used_memory"])

    return trio.run(read)


def batch_body(n: int, attachment: str | None) -> bytes:
    msg: dict[str, Any] = {"to": "b@example.com", "subject": "Your documents", "text": TEXT}
    if attachment is not None:
        msg["attachments"] = [{"filename": "terms.bin", "attachment_id": attachment}]
    return json.dumps({"messages": [msg] * n}).encode()


def upload(c: httpx.Client) -> str:
    r = c.post(
        "/v1/attachments",
        content=os.urandom(ATTACHMENT_BYTES),
        params={"filename": "terms.bin"},
        headers={"content-type": "application/octet-stream"},
    )
    r.raise_for_status()
    return str(r.json()["id"])


def post_all(c: httpx.Client, n: int, batch: int, attachment: str | None) -> int:
    body = batch_body(batch, attachment)
    posted = 0
    while posted < n:
        r = c.post("/v1/messages/batch", content=body, headers={"content-type": "application/json"})
        r.raise_for_status()
        posted += len(r.json()["ids"])
    return posted


def throughput_round(args: argparse.Namespace, tmp: Path, attached: bool, i: int) -> dict[str, Any]:
    tag = f"r{i}-{'attach' if attached else 'plain'}"
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / f"{tag}-redis"))
        sink = stack.enter_context(SinkProcess(workdir=tmp / f"{tag}-sink", log=False))
        engine = EngineProcess(
            redis.url, sink.url, tmp / f"{tag}-engine", "--role", "all", "--senders", "16",
            "--log-level", "warning",
        )  # fmt: skip
        stack.callback(stop_engine, engine)
        c = stack.enter_context(httpx.Client(base_url=engine.base, timeout=60, headers=AUTH))
        attachment = upload(c) if attached else None
        cpu0 = cpu_seconds(engine.proc.pid)
        t0 = time.monotonic()
        posted = post_all(c, args.messages, args.batch, attachment)
        posted_s = time.monotonic() - t0

        def received() -> int:
            return int(sink.stats().get("received", 0))

        wait_until(
            f"{tag}: delivery", lambda: received() >= posted, timeout=max(120.0, posted / 50),
            progress=lambda: f"{tag}: delivered {received():,}/{posted:,}",
        )  # fmt: skip
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(engine.proc.pid) - cpu0
        out = {
            "attached": attached, "posted": posted, "post_s": posted_s, "elapsed_s": elapsed,
            "msgs_per_s": posted / elapsed, "engine_cpu_us_per_msg": 1e6 * cpu / posted,
        }  # fmt: skip
        say(
            f"    {tag}: {out['msgs_per_s']:,.0f} msg/s end to end ({posted:,} in "
            f"{elapsed:.1f} s; posted in {posted_s:.1f} s), engine CPU "
            f"{out['engine_cpu_us_per_msg']:.0f} µs/msg"
        )
        return out


def memory_round(args: argparse.Namespace, tmp: Path, attached: bool, i: int) -> dict[str, Any]:
    tag = f"m{i}-{'attach' if attached else 'plain'}"
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / f"{tag}-redis"))
        engine = EngineProcess(
            redis.url, "smtp://127.0.0.1:9", tmp / f"{tag}-engine", "--role", "api",
            "--log-level", "warning",
        )  # fmt: skip
        stack.callback(stop_engine, engine)
        c = stack.enter_context(httpx.Client(base_url=engine.base, timeout=60, headers=AUTH))
        before_upload = used_memory(redis.url)
        attachment = upload(c) if attached else None
        time.sleep(0.5)
        before = used_memory(redis.url)
        posted = post_all(c, args.memory_messages, args.batch, attachment)
        time.sleep(0.5)
        after = used_memory(redis.url)
        out = {
            "attached": attached, "posted": posted, "bytes_per_msg": (after - before) / posted,
            "blob_bytes": before - before_upload,
            "bytes_per_msg_with_blob": (after - before_upload) / posted,
        }  # fmt: skip
        say(
            f"    {tag}: {out['bytes_per_msg']:.0f} B/queued message"
            + (f" (+ the blob: {out['blob_bytes']:,} B once)" if attached else "")
        )
        return out


def main() -> None:
    TAG[0] = "bench-attachments"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each arm (2)")
    parser.add_argument("--messages", type=int, default=5000, help="per throughput round")
    parser.add_argument("--memory-messages", type=int, default=20_000, help="per memory round")
    parser.add_argument("--batch", type=int, default=500, help="messages per POST (500)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--keep", metavar="DIR", help="keep the work dirs in DIR")
    args = parser.parse_args()
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "attach": [], "mem_plain": [],
                                             "mem_attach": []}  # fmt: skip
    with workdir(args.keep, "bench-attachments-") as tmp:
        for i in range(1, args.rounds + 1):
            for attached in (False, True):
                arm = "attach" if attached else "plain"
                say(f"round {i}/{args.rounds}: {arm}, throughput")
                runs[arm].append(throughput_round(args, tmp, attached, i))
        for i in range(1, args.rounds + 1):
            for attached in (False, True):
                arm = "attach" if attached else "plain"
                say(f"round {i}/{args.rounds}: {arm}, Redis bytes")
                runs[f"mem_{arm}"].append(memory_round(args, tmp, attached, i))
    plain = statistics.median(r["msgs_per_s"] for r in runs["plain"])
    attach = statistics.median(r["msgs_per_s"] for r in runs["attach"])
    cpu_plain = statistics.median(r["engine_cpu_us_per_msg"] for r in runs["plain"])
    cpu_attach = statistics.median(r["engine_cpu_us_per_msg"] for r in runs["attach"])
    mem_plain = statistics.median(r["bytes_per_msg"] for r in runs["mem_plain"])
    mem_attach = statistics.median(r["bytes_per_msg"] for r in runs["mem_attach"])
    mem_blob = statistics.median(r["bytes_per_msg_with_blob"] for r in runs["mem_attach"])
    ratio, mem_ratio = attach / plain, mem_attach / mem_plain
    every = (
        " / ".join(f"{r['msgs_per_s']:,.0f}" for r in runs["plain"])
        + " vs "
        + " / ".join(f"{r['msgs_per_s']:,.0f}" for r in runs["attach"])
    )
    rows = [
        ("End-to-end throughput, plain / with a shared 100 KiB attachment (msg/s, median)",
         f"{plain:,.0f} / {attach:,.0f}", f"{ratio:.2f} × (every round: {every})", "≥ 0.7 ×",
         ratio >= 0.7),
        ("Engine CPU per message, plain / attachment (µs, median)",
         f"{cpu_plain:.0f} / {cpu_attach:.0f}", f"{cpu_attach / cpu_plain:.2f} ×", "", True),
        ("Redis bytes per queued message, plain / attachment (median)",
         f"{mem_plain:.0f} / {mem_attach:.0f}",
         f"{mem_ratio:.2f} ×; with the blob spread over {args.memory_messages:,}: "
         f"{mem_blob:.0f} B ({mem_blob / mem_plain:.2f} ×)", "≤ 2 ×", mem_ratio <= 2),
    ]  # fmt: skip
    publish(target_table(rows), {"runs": runs}, args.json, args, started)


if __name__ == "__main__":
    main()
