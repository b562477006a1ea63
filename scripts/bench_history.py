"""Benchmark the message history (issue 17): its cost end to end, and its search.

  1. End to end, history off vs on, alternating rounds: N messages posted in batches to
     one engine (role all, 16 senders) delivering to the sink; msgs/s = N / (the sink
     has all - first POST). With history on (a durable PostgreSQL: fsync on), the
     writer's lag per event (its written_at - its at, measured in PostgreSQL) p50/p99/max.
  2. Search by recipient over --search-messages messages (default 10 million) made with
     COPY into the history's own tables (30 daily partitions): a typical address (~5
     messages), a busy one (100,000), and a tenant's newest page; median of repeated
     queries, and the EXPLAIN ANALYZE plan of each.

    python -m scripts.bench_history [--messages 40000 --rounds 2] [--search-messages N]
Everything shares this machine's cores: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

from engine.embedded import RedisServer, SinkProcess
from engine.history import migrate
from engine.pgserver import PostgresServer
from fixtures.auth import AUTH
from fixtures.postgres import create_database
from scripts.bench import MESSAGE, flush, start_engine
from scripts.benchlib import say, stop_engine, wait_until

_DAY_MS = 86_400_000


def e2e_round(
    args: argparse.Namespace, redis: RedisServer, tmp: Path, dsn: str | None
) -> dict[str, Any]:
    flush(redis)
    n = args.messages
    env = {"ENGINE_HISTORY_DSN": dsn} if dsn else {}
    with SinkProcess(workdir=tmp / f"sink-{time.monotonic_ns()}", log=False) as sink:
        engine = start_engine(redis.url, sink.url, "all", args.senders, tmp, extra_env=env)
        try:
            body = json.dumps({"messages": [MESSAGE] * args.batch}).encode()
            t0 = time.monotonic()
            posted = 0
            with httpx.Client(
                base_url=engine.base, timeout=30,
                headers={"content-type": "application/json", **AUTH},
            ) as c:  # fmt: skip
                while posted < n:
                    r = c.post("/v1/messages/batch", content=body)
                    r.raise_for_status()
                    posted += args.batch
            wait_until("delivery", lambda: int(sink.stats().get("received", 0)) >= posted,
                       timeout=max(120.0, posted / 50))  # fmt: skip
            elapsed = time.monotonic() - t0
            out: dict[str, Any] = {"history": bool(dsn), "rate": posted / elapsed,
                                   "elapsed_s": elapsed}  # fmt: skip
            if dsn:
                want = 3 * posted  # queued, processing, sent

                def written() -> int:
                    with psycopg.connect(dsn) as conn:
                        got = conn.execute("SELECT count(*) FROM history_events").fetchone()
                    return int(got[0]) if got else 0

                wait_until("history written", lambda: written() >= want, timeout=300)
                out["caught_up_after_s"] = time.monotonic() - t0 - elapsed
                with psycopg.connect(dsn) as conn:
                    row = conn.execute(
                        "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY d),"
                        " max(d), count(*) FROM (SELECT extract(epoch FROM written_at - at) d"
                        " FROM history_events) x"
                    ).fetchone()
                    assert row is not None
                    (p50, p99), worst, events = row
                    msgs = conn.execute("SELECT count(*) FROM history_messages").fetchone()
                out.update(lag_p50_s=p50, lag_p99_s=p99, lag_max_s=float(worst), events=events,
                           messages=msgs[0] if msgs else 0)  # fmt: skip
        finally:
            stop_engine(engine)
    say("    " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in out.items()))  # fmt: skip
    return out


def phase_e2e(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with RedisServer(tmp / "redis") as redis, PostgresServer() as pg:
        for rnd in range(args.rounds):
            for on in (False, True) if rnd % 2 == 0 else (True, False):
                say(f"end to end, round {rnd + 1}, history {'on' if on else 'off'}: "
                    f"{args.messages:,} messages")  # fmt: skip
                dsn = create_database(pg, f"e2e{rnd}") if on else None
                results.append(e2e_round(args, redis, tmp, dsn))
    return results


# -- search over millions -------------------------------------------------------------------


def _uuid(ms: int, rand: int) -> str:
    h = ms.to_bytes(6, "big").hex() + rand.to_bytes(10, "big").hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def generate(
    conn: psycopg.Connection[Any], total: int, days: int, seed: int = 17
) -> dict[str, Any]:
    """``total`` messages over the last ``days`` days, COPY-ed into the history's tables:
    recipients drawn from total/5 addresses (a typical one has ~5 messages), plus one
    busy address that gets 1 % of them (its 100,000 in 10 million); 3 tenants; a tag on a
    third. Returns what the queries look up."""
    rng = random.Random(seed)
    now_ms = int(time.time() * 1000)
    first_day = dt.date.today() - dt.timedelta(days=days - 1)
    with conn.transaction():
        for d in range(days + 1):
            conn.execute("SELECT history_ensure_day(%s)", [first_day + dt.timedelta(days=d)])
    start_ms = int(dt.datetime.combine(first_day, dt.time(), dt.UTC).timestamp() * 1000)
    span = now_ms - start_ms
    addresses = max(1, total // 5)
    busy = "busy@example.com"
    typical = None
    chunk = 200_000
    made = 0
    t0 = time.monotonic()
    while made < total:
        n = min(chunk, total - made)
        # Time-ordered, as the engine makes them.
        times = sorted(start_ms + int(span * (made + i) / total) for i in range(n))
        msgs, terms = io.StringIO(), io.StringIO()
        for ms in times:
            mid = _uuid(ms, rng.getrandbits(80))
            at = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat()
            to = busy if rng.random() < 0.01 else f"user{rng.randrange(addresses)}@example.com"
            if typical is None and to != busy:
                typical = to
            tenant = ("default", "acme", "globex")[rng.randrange(3)]
            tag = "welcome" if rng.random() < 0.33 else ""
            msgs.write(
                f"{mid}\t{at}\t{tenant}\tapp@example.com\t{{{to}}}\tHello\t"
                f"{{{tag}}}\tsent\t1\t{at}\t{at}\t{ms}\t0\n"
            )
            terms.write(f"to:{to}\t{mid}\t{at}\t{tenant}\n")
            terms.write(f"from:app@example.com\t{mid}\t{at}\t{tenant}\n")
            if tag:
                terms.write(f"tag:{tag}\t{mid}\t{at}\t{tenant}\n")
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(
                "COPY history_messages (id, created_at, tenant, sender, recipients, subject,"
                " tags, state, attempts, updated_at, sent_at, ev_ms, ev_seq) FROM STDIN"
            ) as copy:
                copy.write(msgs.getvalue())
            with cur.copy(
                "COPY history_terms (term, message_id, created_at, tenant) FROM STDIN"
            ) as copy:
                copy.write(terms.getvalue())
        made += n
        if made % 1_000_000 < chunk:
            say(f"    generated {made:,} messages ({time.monotonic() - t0:.0f} s)")
    conn.execute("ANALYZE history_messages")
    conn.execute("ANALYZE history_terms")
    return {"typical": typical, "busy": busy, "seconds": time.monotonic() - t0}


def timed(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any], runs: int) -> float:
    took = []
    for _ in range(runs):
        t = time.perf_counter()
        conn.execute(sql, params).fetchall()
        took.append((time.perf_counter() - t) * 1000)
    return statistics.median(took)


def phase_search(args: argparse.Namespace) -> dict[str, Any]:
    from engine.history import Search, compile_search

    settings = (("shared_buffers", "1GB"), ("max_wal_size", "8GB"))
    with PostgresServer(settings=settings) as pg, psycopg.connect(pg.dsn, autocommit=True) as conn:
        migrate(conn)
        say(f"search: generating {args.search_messages:,} messages with COPY")
        info = generate(conn, args.search_messages, args.days)
        size = conn.execute(
            "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c"
            " JOIN pg_inherits i ON i.inhrelid = c.oid"
        ).fetchone()
        out: dict[str, Any] = {"generate_s": info["seconds"], "size": size[0] if size else ""}
        cases = {
            "typical address": Search(to=info["typical"]),
            "busy address (1 % of all)": Search(to=info["busy"]),
            "busy address, one tenant": Search(to=info["busy"], tenants=("acme",)),
            "a tenant's newest": Search(tenants=("globex",)),
            "tag, one tenant, state": Search(tag="welcome", tenants=("acme",), state="sent"),
        }
        for name, s in cases.items():
            sql, params = compile_search(s)
            # What HistoryStore.search sets in its transaction (session-wide here).
            on = "history_terms" in sql
            conn.execute(f"SET enable_sort = {'off' if on else 'on'}")
            conn.execute(f"SET enable_bitmapscan = {'off' if on else 'on'}")
            timed(conn, sql, params, 2)  # warm
            ms = timed(conn, sql, params, args.search_runs)
            plan = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params).fetchall()
            out[name] = {"median_ms": ms, "plan": "\n".join(r[0] for r in plan)}
            say(f"    {name}: median {ms:.2f} ms over {args.search_runs} runs")
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--messages", type=int, default=40_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--senders", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--search-messages", type=int, default=10_000_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--search-runs", type=int, default=20)
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--json", type=Path, help="write every number here too")
    args = p.parse_args()
    report: dict[str, Any] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        if not args.skip_e2e:
            runs = phase_e2e(args, Path(tmp))
            off = [r["rate"] for r in runs if not r["history"]]
            on = [r["rate"] for r in runs if r["history"]]
            report["e2e"] = runs
            report["ratio_median"] = statistics.median(on) / statistics.median(off)
            print(f"end to end: off {[round(x) for x in off]} msgs/s, on {[round(x) for x in on]}"
                  f" msgs/s: ratio {report['ratio_median']:.2f} (target >= 0.90)")  # fmt: skip
            for r in runs:
                if r["history"]:
                    print(f"  writer lag p50 {r['lag_p50_s']:.3f} s, p99 {r['lag_p99_s']:.3f} s,"
                          f" max {r['lag_max_s']:.3f} s (target p99 <= 2 s); events {r['events']:,}")  # fmt: skip
    if not args.skip_search:
        report["search"] = phase_search(args)
        for name, v in report["search"].items():
            if isinstance(v, dict):
                print(f"search, {name}: median {v['median_ms']:.2f} ms (target <= 100 ms)")
                print("  " + v["plan"].replace("\n", "\n  "))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
