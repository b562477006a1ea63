"""Benchmark batch ingest with a template against plain messages (issue 15's target: a
1,000-message batch from one template must not halve batch ingest throughput).

    .venv/bin/python -m scripts.bench_templates [--rounds 3] [--seconds 8]

Alternating rounds on one Redis: an engine (role api: no senders) takes batches of
``--batch`` messages by wrk -c4 for ``--seconds``; arm (a) plain messages (subject, text,
html given), arm (b) the same messages named by a template with per-message variables
(rendered at ingest). Reported: messages/s of each arm, every round, and the ratio of
the medians (target ≥ 0.5).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import httpx

from engine.embedded import RedisServer
from fixtures.auth import AUTH
from scripts.bench import flush, run_wrk, start_engine
from scripts.benchlib import say

TEMPLATE = {
    "name": "receipt",
    "subject": "Your receipt {{ order }}",
    "text": "Hello {{ name }},\n\nthank you for order {{ order }} ({{ total }}).\n",
    "html": "<p>Hello {{ name }},</p><p>thank you for order <b>{{ order }}</b> ({{ total }}).</p>",
}


def plain(i: int) -> dict[str, object]:
    return {
        "to": f"c{i}@example.com",
        "subject": f"Your receipt A-{i}",
        "text": f"Hello Customer {i},\n\nthank you for order A-{i} (12.50 EUR).\n",
        "html": f"<p>Hello Customer {i},</p><p>thank you for order <b>A-{i}</b> (12.50 EUR).</p>",
    }


def templated(i: int) -> dict[str, object]:
    return {
        "to": f"c{i}@example.com",
        "template": "receipt",
        "variables": {"name": f"Customer {i}", "order": f"A-{i}", "total": "12.50 EUR"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each arm (3)")
    parser.add_argument("--seconds", type=float, default=8, help="wrk seconds a round (8)")
    parser.add_argument("--batch", type=int, default=1000, help="messages a POST (1000)")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"plain": [], "template": []}
    with tempfile.TemporaryDirectory(prefix="bench-templates-") as tmpdir:
        tmp = Path(tmpdir)
        with RedisServer(tmp / "redis") as redis:
            for n in range(args.rounds):
                for arm in ("plain", "template"):
                    flush(redis)
                    engine = start_engine(redis.url, "smtp://127.0.0.1:9", "api", 1, tmp)
                    try:
                        if arm == "template":
                            made = httpx.post(engine.base + "/v1/templates", json=TEMPLATE,
                                              headers=AUTH, timeout=10)  # fmt: skip
                            made.raise_for_status()
                        make = templated if arm == "template" else plain
                        body = json.dumps({"messages": [make(i) for i in range(args.batch)]})
                        say(f"round {n + 1}/{args.rounds}: {arm}, {len(body) // 1024} KiB a POST")
                        res = run_wrk(
                            engine.base + "/v1/messages/batch", body.encode(), args.seconds,
                            4, tmp, engine.proc.pid,
                        )  # fmt: skip
                    finally:
                        engine.stop()
                    if res.non_2xx:
                        raise SystemExit(f"{arm}: {res.non_2xx} answers were not 2xx")
                    rate = res.requests_per_s * args.batch
                    rates[arm].append(rate)
                    say(f"    {rate:,.0f} messages/s, engine CPU "
                        f"{res.cpu_us_per_request / args.batch:.1f} µs a message")  # fmt: skip
    plain_rate, template_rate = (
        statistics.median(rates["plain"]),
        statistics.median(rates["template"]),
    )
    runs = " / ".join(
        f"{p:,.0f} vs {t:,.0f}" for p, t in zip(rates["plain"], rates["template"], strict=True)
    )
    print("\n| measurement | plain | template | ratio | target |\n|---|---:|---:|---|---|")
    print(f"| batch ingest, {args.batch} a POST (msgs/s, median; rounds {runs}) | "
          f"{plain_rate:,.0f} | {template_rate:,.0f} | {template_rate / plain_rate:.2f} × | ≥ 0.5 × |")  # fmt: skip


if __name__ == "__main__":
    main()
