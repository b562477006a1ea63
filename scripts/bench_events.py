"""Benchmark the live event feed (issue 5): websocket fan-out cost and event latency.

Alternating rounds, each with a fresh Redis (AOF everysec), a fresh logging sink and one
`engine serve` (role all): N messages (default 20,000) are posted to it in batches of
1000 through POST /v1/messages/batch, and the round's rate is N / (last message received
by the sink - first POST), as in scripts/bench_flow.py's cost scenario.

  0 subscribers    nobody watches (the hub does not even tail the event stream).
  S subscribers    (default 100) websocket clients on WS /v1/events of that one replica,
                   all in ONE separate process (this script with --subscribers-worker:
                   one Trio loop, trio-websocket), connected before the first POST.
                   Default: the full feed (no filter: queued, processing, sent, ... for
                   every message), as the issue means; --sent-only subscribes with
                   ?type=sent instead. The first --measure (10) subscribers decode every
                   event and record, per `sent` event, (wall time the websocket message
                   was read) - (the event's `at`, ms on the engine's clock: same machine,
                   same clock) in 0.1 ms bins; the others count `sent` events with a
                   substring scan (the subscriber process shares the cores with the
                   engine, and decoding 100 full feeds costs it ~250 µs per message).

Targets: median(S-subscriber rate) / median(0-subscriber rate) >= 0.9, and the event
latency (transition -> watcher receives) p99 <= 100 ms over all (subscriber, sent event)
pairs of the S-subscriber rounds. A subscriber closed with 4008 (fell behind) is counted
as dropped and not reconnected. `at` has 1 ms resolution, so latencies carry up to 1 ms
of rounding.

Progress goes to stderr; the markdown table to stdout; --json FILE writes everything.
Redis, the engine, the sink, the subscriber process and this client share the machine's
cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from engine.models import CLOSE_TOO_SLOW
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

ROOT = Path(__file__).resolve().parents[1]
TEXT = "Hello from the benchmark. " * 10  # the body scripts/bench.py sends


def percentile_hist(hist: dict[int, int], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of a histogram {0.1 ms bin: count}, in ms."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(p / 100 * total))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return b / 10
    return max(hist) / 10


def latency_summary(hist: dict[int, int]) -> dict[str, Any]:
    return {
        "pairs": sum(hist.values()),
        "min_ms": min(hist) / 10 if hist else None,
        "p50_ms": percentile_hist(hist, 50),
        "p90_ms": percentile_hist(hist, 90),
        "p99_ms": percentile_hist(hist, 99),
        "p999_ms": percentile_hist(hist, 99.9),
        "max_ms": max(hist) / 10 if hist else None,
    }


# -- the subscriber process ---------------------------------------------------------


def subscribers_worker(args: argparse.Namespace) -> int:
    """All subscribers in one Trio loop; writes its stats as JSON to args.out."""
    import msgspec
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    from fixtures.auth import TEST_ADMIN_KEY

    class Ev(msgspec.Struct):  # only what is needed: the other fields are skipped
        type: str
        at: int

    decode = msgspec.json.Decoder(list[Ev]).decode
    n, expect = args.subscribers, args.expect
    measured = min(n, args.measure) if args.measure > 0 else n
    url = args.url.replace("http://", "ws://", 1).rstrip("/") + "/v1/events"
    if args.sent_only:
        url += "?type=sent"
    hist: Counter[int] = Counter()
    n_events = [0] * n
    sent_per_sub = [0] * n
    messages_per_sub = [0] * n
    closed: dict[int, str] = {}
    errors: dict[int, str] = {}
    state = {"connected": 0, "first_event": 0.0, "last_event": 0.0}
    all_connected = trio.Event()
    auth = [(b"authorization", b"Bearer " + TEST_ADMIN_KEY.encode())]
    cpu0 = cpu_seconds(os.getpid())

    async def subscriber(i: int) -> None:
        try:
            async with open_websocket_url(
                url,
                max_message_size=16 * 1024 * 1024,
                receive_buffer_size=args.ws_recv_bytes,
                extra_headers=auth,
            ) as ws:
                state["connected"] += 1
                if state["connected"] == n:
                    all_connected.set()
                while sent_per_sub[i] < expect:
                    message = await ws.get_message()
                    now_ms = time.time() * 1000
                    messages_per_sub[i] += 1
                    if i >= measured:
                        # Counted, not decoded: this process's CPU competes with the
                        # engine's on the same cores (the tenant is never "sent").
                        text = message if isinstance(message, str) else message.decode()
                        n_events[i] += text.count('"event_id"')
                        sent_per_sub[i] += text.count('"type":"sent"')
                        continue
                    raw = message.encode() if isinstance(message, str) else message
                    events = decode(raw)
                    n_events[i] += len(events)
                    ats = [e.at for e in events if e.type == "sent"]
                    got = len(ats)
                    for at, count in Counter(ats).items():
                        hist[int((now_ms - at) * 10)] += count
                    sent_per_sub[i] += got
                    if not state["first_event"]:
                        state["first_event"] = now_ms / 1000
                    state["last_event"] = now_ms / 1000
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else 1006
            closed[i] = str(code)
        except Exception as exc:  # reported, never fatal for the other subscribers
            errors[i] = f"{type(exc).__name__}: {exc}"[:300]

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            nursery.cancel_scope.deadline = trio.current_time() + args.deadline
            async with trio.open_nursery() as subs:
                for i in range(n):
                    subs.start_soon(subscriber, i)
                with trio.move_on_after(30):
                    await all_connected.wait()
                await trio.Path(args.out + ".ready").write_text(str(state["connected"]))
            nursery.cancel_scope.cancel()

    trio.run(main)
    cpu = cpu_seconds(os.getpid()) - cpu0
    doc = {
        "subscribers": n,
        "connected": state["connected"],
        "expect_sent_per_subscriber": expect,
        "filter": "type=sent" if args.sent_only else "none (full feed)",
        "measured": measured,
        "complete": sum(1 for s in sent_per_sub if s >= expect),
        "sent_per_subscriber_min": min(sent_per_sub) if n else 0,
        "sent_per_subscriber_max": max(sent_per_sub) if n else 0,
        "ws_messages_total": sum(messages_per_sub),
        "events_total": sum(n_events),
        "dropped_4008": sum(1 for c in closed.values() if c == str(CLOSE_TOO_SLOW)),
        "closed": dict(Counter(closed.values())),
        "errors": list(errors.values())[:5],
        "error_count": len(errors),
        "first_event_at": state["first_event"],
        "last_event_at": state["last_event"],
        "cpu_s": cpu,
        "latency_hist_0p1ms": {str(k): v for k, v in sorted(hist.items())},
    }
    Path(args.out).write_text(json.dumps(doc))
    return 0


# -- the parent: rounds -------------------------------------------------------------


def stop_proc(proc: subprocess.Popen[bytes], name: str, timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop within {timeout:g} s after SIGTERM: killing it")
        proc.kill()
        proc.wait(10)


def run_round(args: argparse.Namespace, tmp: Path, subs: int, n_round: int) -> dict[str, Any]:
    import httpx

    from engine.embedded import ChildError, RedisServer, SinkProcess
    from fixtures.auth import AUTH
    from fixtures.engine import EngineProcess

    msgs = [{"to": "bench@example.com", "subject": "Benchmark", "text": TEXT}] * args.batch
    body = json.dumps({"messages": msgs}).encode()
    n = args.messages
    tag = f"r{n_round}-{subs}subs"
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(RedisServer(tmp / f"{tag}-redis"))
        sink = stack.enter_context(SinkProcess(workdir=tmp / f"{tag}-sink", log=True))
        engine = EngineProcess(
            redis.url, sink.url, tmp / f"{tag}-engine", "--role", "all",
            "--senders", str(args.senders), "--log-level", "warning", wait_ready=False,
        )  # fmt: skip
        stack.callback(stop_engine, engine)
        try:
            engine.wait_ready(timeout=30)
        except ChildError as exc:
            raise ScenarioFailed(str(exc)[-3000:]) from None

        def check_alive() -> None:
            if engine.proc.poll() is not None:
                raise ScenarioFailed(
                    f"engine exited with {engine.proc.returncode}:\n" + engine.output()[-3000:]
                )

        worker = None
        out = tmp / f"{tag}-subscribers.json"
        if subs:
            wlog = open(tmp / f"{tag}-subscribers.log", "wb")  # noqa: SIM115
            stack.callback(wlog.close)
            worker = subprocess.Popen(
                [sys.executable, "-m", "scripts.bench_events", "--subscribers-worker",
                 "--url", engine.base, "--subscribers", str(subs), "--expect", str(n),
                 "--out", str(out), "--deadline", str(args.worker_deadline),
                 "--ws-recv-bytes", str(args.ws_recv_bytes), "--measure", str(args.measure)]
                + (["--sent-only"] if args.sent_only else []),
                stdout=wlog, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
            stack.callback(stop_proc, worker, "subscriber process")
            ready = Path(str(out) + ".ready")

            def connected() -> bool:
                if worker.poll() is not None:
                    raise ScenarioFailed(
                        f"subscriber process exited with {worker.returncode}:\n"
                        + Path(wlog.name).read_text(errors="replace")[-3000:]
                    )
                return ready.exists()

            wait_until(f"{tag}: subscribers connecting", connected, timeout=40)
            if int(ready.read_text() or 0) != subs:
                raise ScenarioFailed(f"only {ready.read_text()} of {subs} subscribers connected")
            say(f"    {subs} subscribers connected (pid {worker.pid})")

        c = stack.enter_context(
            httpx.Client(
                base_url=engine.base,
                timeout=30,
                headers={"content-type": "application/json", **AUTH},
            )
        )
        cpu0 = cpu_seconds(engine.proc.pid)
        t0 = time.time()
        posted = 0
        while posted < n:
            r = c.post("/v1/messages/batch", content=body)
            if r.status_code != 202:
                raise ScenarioFailed(
                    f"POST /v1/messages/batch answered {r.status_code}: {r.text[:500]}"
                )
            posted += len(r.json()["ids"])
        t_posted = time.time() - t0

        def got() -> int:
            return int(sink.stats().get("received", 0))

        def done() -> bool:
            check_alive()
            return got() >= posted

        wait_until(
            f"{tag}: delivery", done, timeout=max(60.0, n / 300),
            progress=lambda: f"delivered {got():,}/{posted:,}",
        )  # fmt: skip
        entries = sink.wait_received(posted, timeout=5)
        stats = sink.stats()
        engine_cpu = cpu_seconds(engine.proc.pid) - cpu0
        t_delivered = time.time()
        last = max(e["at"] for e in entries)
        result: dict[str, Any] = {
            "subscribers": subs,
            "posted": posted,
            "elapsed_s": last - t0,
            "posted_after_s": t_posted,
            "msgs_per_s": posted / (last - t0),
            "duplicates": stats.get("duplicates"),
            "engine_cpu_us_per_msg": 1e6 * engine_cpu / posted,
        }
        if worker is not None:
            try:
                worker.wait(args.drain_timeout)
            except subprocess.TimeoutExpired:
                say(
                    f"    subscribers still missing events {args.drain_timeout:g} s after the "
                    "last delivery: stopping them"
                )
                stop_proc(worker, "subscriber process")
            if not out.exists():
                raise ScenarioFailed(
                    "the subscriber process wrote no stats:\n"
                    + Path(wlog.name).read_text(errors="replace")[-3000:]
                )
            w = json.loads(out.read_text())
            hist = {int(k): v for k, v in w.pop("latency_hist_0p1ms").items()}
            result["worker"] = w
            result["worker_cpu_us_per_msg"] = 1e6 * (w["cpu_s"]) / posted
            result["latency"] = latency_summary(hist)
            result["latency_hist_0p1ms"] = hist
            result["last_event_after_delivery_s"] = (
                w["last_event_at"] - t_delivered if w["last_event_at"] else None
            )
    return result


def run_rounds(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    arms = (0, args.subscribers)
    runs: dict[int, list[dict[str, Any]]] = {a: [] for a in arms}
    for i in range(args.rounds):
        for subs in arms:
            say(f"round {i + 1}/{args.rounds}: {subs} subscribers")
            run = run_round(args, tmp, subs, i + 1)
            runs[subs].append(run)
            line = (
                f"    {run['msgs_per_s']:,.0f} msgs/s end to end ({run['posted']:,} in "
                f"{run['elapsed_s']:.1f} s; all posted after {run['posted_after_s']:.1f} s)  "
                f"duplicates {run['duplicates']}  engine CPU {run['engine_cpu_us_per_msg']:.0f} µs/msg"
            )
            if subs:
                lat, w = run["latency"], run["worker"]
                line += (
                    f"\n    latency p50 {lat['p50_ms']} ms  p99 {lat['p99_ms']} ms  max "
                    f"{lat['max_ms']} ms over {lat['pairs']:,} pairs; complete "
                    f"{w['complete']}/{subs}; dropped (4008) {w['dropped_4008']}; sent events "
                    f"per subscriber {w['sent_per_subscriber_min']:,}..{w['sent_per_subscriber_max']:,}"
                    f"; {w['ws_messages_total']:,} ws messages; subscriber process CPU "
                    f"{run['worker_cpu_us_per_msg']:.0f} µs/msg"
                )
            say(line)
    base = statistics.median(r["msgs_per_s"] for r in runs[0])
    loaded = statistics.median(r["msgs_per_s"] for r in runs[args.subscribers])
    paired = [
        s["msgs_per_s"] / z["msgs_per_s"]
        for z, s in zip(runs[0], runs[args.subscribers], strict=True)
    ]
    pooled: Counter[int] = Counter()
    for r in runs[args.subscribers]:
        pooled.update(r["latency_hist_0p1ms"])
    for r in runs[args.subscribers]:
        r["latency_hist_0p1ms"] = {str(k): v for k, v in sorted(r["latency_hist_0p1ms"].items())}
    workers = [r["worker"] for r in runs[args.subscribers]]
    return {
        "messages": args.messages,
        "subscribers": args.subscribers,
        "filter": "type=sent" if args.sent_only else "none (full feed)",
        "median_0_msgs_per_s": base,
        "median_subs_msgs_per_s": loaded,
        "ratio": loaded / base,
        "paired_ratios": paired,
        "paired_ratio_median": statistics.median(paired),
        "engine_cpu_us_per_msg_0": statistics.median(r["engine_cpu_us_per_msg"] for r in runs[0]),
        "engine_cpu_us_per_msg_subs": statistics.median(
            r["engine_cpu_us_per_msg"] for r in runs[args.subscribers]
        ),
        "worker_cpu_us_per_msg": statistics.median(
            r["worker_cpu_us_per_msg"] for r in runs[args.subscribers]
        ),
        "latency": latency_summary(dict(pooled)),
        "dropped_4008": sum(w["dropped_4008"] for w in workers),
        "incomplete_subscribers": sum(w["subscribers"] - w["complete"] for w in workers),
        "sent_per_subscriber_min": min(w["sent_per_subscriber_min"] for w in workers),
        "runs": {"0": runs[0], str(args.subscribers): runs[args.subscribers]},
    }


def table(res: dict[str, Any]) -> list[str]:
    s, n = res["subscribers"], res["messages"]
    r0 = ", ".join(f"{r['msgs_per_s']:,.0f}" for r in res["runs"]["0"])
    rs = ", ".join(f"{r['msgs_per_s']:,.0f}" for r in res["runs"][str(s)])
    k = len(res["runs"]["0"])
    lat = res["latency"]
    feed = "full feed" if res["filter"].startswith("none") else "type=sent"
    per = ", ".join(f"{r['latency']['p99_ms']:.1f}" for r in res["runs"][str(s)])
    return [
        "| measurement | measured | detail | target | met |",
        "|---|---:|---|---|---|",
        f"| End to end, 0 subscribers, {n:,} msgs (msgs/s, median of {k}) | "
        f"{res['median_0_msgs_per_s']:,.0f} | runs {r0} | | |",
        f"| End to end, {s} websocket subscribers ({feed}), {n:,} msgs (msgs/s, median of {k}) | "
        f"{res['median_subs_msgs_per_s']:,.0f} | {res['ratio']:.2f} × 0 subscribers (runs {rs}; "
        f"paired ratios {', '.join(f'{x:.2f}' for x in res['paired_ratios'])}) | ≥ 0.90 × | "
        f"{yes(res['ratio'] >= 0.9)} |",
        f"| Engine CPU per message, 0 / {s} subscribers (µs, median) | "
        f"{res['engine_cpu_us_per_msg_0']:.0f} / {res['engine_cpu_us_per_msg_subs']:.0f} | "
        f"subscriber process: {res['worker_cpu_us_per_msg']:.0f} µs/msg | | |",
        f"| Event latency `at` → watcher receives, `sent` events, p50 ({lat['pairs']:,} "
        f"subscriber×event pairs) | {lat['p50_ms']:.1f} ms | | | |",
        f"| Event latency p99 | {lat['p99_ms']:.1f} ms | per round: {per} ms | ≤ 100 ms | "
        f"{yes(lat['p99_ms'] <= 100)} |",
        f"| Event latency max | {lat['max_ms']:.1f} ms | p99.9 {lat['p999_ms']:.1f} ms | | |",
        f"| Subscribers dropped (4008) / incomplete, all rounds | {res['dropped_4008']} / "
        f"{res['incomplete_subscribers']} | fewest `sent` events one subscriber got: "
        f"{res['sent_per_subscriber_min']:,} of {n:,} | 0 | "
        f"{yes(res['dropped_4008'] == 0 and res['incomplete_subscribers'] == 0)} |",
    ]


def main() -> int:
    TAG[0] = "bench_events"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each arm (3)")
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round (20000)")
    parser.add_argument("--subscribers", type=int, default=100, help="subscribers (100)")
    parser.add_argument(
        "--sent-only", action="store_true", help="subscribe with ?type=sent (default: full feed)"
    )
    parser.add_argument("--senders", type=int, default=16, help="sender tasks (16)")
    parser.add_argument("--batch", type=int, default=1000, help="messages per batch POST (1000)")
    parser.add_argument(
        "--drain-timeout", type=float, default=20.0,
        help="seconds the subscribers get after the last delivery to see every sent event (20)",
    )  # fmt: skip
    parser.add_argument(
        "--ws-recv-bytes", type=int, default=256 * 1024,
        help="subscribers' socket read size (trio-websocket's receive_buffer_size; its "
        "default 4096 costs the subscriber process ~3x the CPU on a full feed) (262144)",
    )  # fmt: skip
    parser.add_argument(
        "--measure", type=int, default=10,
        help="subscribers that decode every event and time the `sent` ones (10); the others "
        "count `sent` events with a substring scan, so the subscriber process, which shares "
        "the machine's cores with the engine, stays light. 0: all of them decode",
    )  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON here")
    parser.add_argument("--keep", metavar="DIR", help="keep the work dirs (logs) in DIR")
    # The subscriber process (started by this script).
    parser.add_argument("--subscribers-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=120.0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-deadline", type=float, default=120.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscribers_worker:
        return subscribers_worker(args)
    if args.subscribers < 1 or args.rounds < 1:
        parser.error("--subscribers and --rounds must be at least 1")
    signal.signal(signal.SIGTERM, interrupt)

    say(
        f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; {args.rounds}+"
        f"{args.rounds} alternating rounds (0 / {args.subscribers} subscribers, "
        f"{'type=sent' if args.sent_only else 'full feed'}), {args.messages:,} messages each "
        f"in batches of {args.batch}, one replica with {args.senders} senders"
    )
    started = time.monotonic()
    try:
        with workdir(args.keep, "bench-events-") as tmp:
            try:
                res = run_rounds(args, tmp)
            except ScenarioFailed as exc:
                say(f"FAILED: {exc}")
                print(f"\n| bench_events: FAILED ({str(exc).splitlines()[0][:150]}) | **NO** |\n")
                return 1
    except KeyboardInterrupt:
        say("interrupted: processes stopped")
        return 130
    publish(table(res), res, args.json, args, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
