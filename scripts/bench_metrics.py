"""Micro-benchmark: what the metrics add to one ingest request and to one send.

    .venv/bin/python -m scripts.bench_metrics

Ingest: the router dispatching POST /v1/messages (timed: two clock reads, one observe)
against the same handler on an untimed route; plus the accepted-messages increment. Sender: the bookkeeping ``SenderPool._ack`` adds per message (clock read,
enqueue time from the id, one increment and one observe). Also one /metrics render.
"""

from __future__ import annotations

import time
import timeit
from dataclasses import dataclass
from typing import Any

import trio

from engine.api.exchange import Reply, Request
from engine.api.router import Router
from engine.api.routes import Route
from engine.ids import id_time_ms, new_id
from engine.metrics import Metrics

N = 200_000


@dataclass
class Counts:  # what Queue.counts() returns, for the render
    ready: int = 10
    ready_by_lane: dict[str, int] | None = None
    processing: int = 3
    delayed: int = 2
    dead: int = 1
    instances: int = 2
    enqueued_total: int = 1000
    sent_total: int = 990
    failed_total: int = 5


async def _ingest() -> tuple[float, float]:
    m = Metrics()
    reply = Reply(202, b"{}")

    async def handler(_: Request) -> Reply:
        return reply

    routes = [
        Route("timed", "POST", "/v1/messages", "", "send", {}),
        Route("plain", "POST", "/plain", "", "send", {}),
    ]
    router = Router(routes, {"timed": handler, "plain": handler}, m.ingest)
    timed: dict[str, Any] = {"type": "http", "method": "POST", "path": "/v1/messages"}
    plain: dict[str, Any] = {"type": "http", "method": "POST", "path": "/plain"}

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {}

    best_plain = best_timed = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(N):
            await router(plain, receive, send)
        best_plain = min(best_plain, (time.perf_counter() - t0) / N)
        t0 = time.perf_counter()
        for _ in range(N):
            await router(timed, receive, send)
            m.ingest.accepted(1)
        best_timed = min(best_timed, (time.perf_counter() - t0) / N)
    return best_plain, best_timed


def _send_once(m: Metrics, job_id: str) -> None:
    # What SenderPool._ack adds around the ack itself.
    delivered_ms = int(time.time() * 1000)
    made_ms = id_time_ms(job_id)
    m.sender.sent(1, (delivered_ms - made_ms) / 1000 if made_ms else None)


def main() -> None:
    plain, with_metrics = trio.run(_ingest)
    print(f"routed request, untimed:      {plain * 1e9:7.0f} ns")
    print(f"routed ingest, timed+counted: {with_metrics * 1e9:7.0f} ns")
    print(f"  -> overhead per request:    {(with_metrics - plain) * 1e9:7.0f} ns")
    m = Metrics()
    job_id = new_id()
    per_send = min(timeit.repeat(lambda: _send_once(m, job_id), number=N, repeat=5)) / N
    noop = min(timeit.repeat(lambda: None, number=N, repeat=5)) / N
    print(f"sender, per message:          {(per_send - noop) * 1e9:7.0f} ns")
    per_retry = min(timeit.repeat(m.sender.retried, number=N, repeat=5)) / N
    print(f"sender, per retry/dead:       {per_retry * 1e9:7.0f} ns")
    counts = Counts(ready_by_lane={"high": 1, "normal": 8, "low": 1})
    render = min(timeit.repeat(lambda: m.render(counts), number=200, repeat=5)) / 200
    print(f"/metrics render:              {render * 1e6:7.0f} µs ({len(m.render(counts))} bytes)")


if __name__ == "__main__":
    main()
