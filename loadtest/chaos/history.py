"""The message history under chaos: a PostgreSQL next to the cluster (Debian's, durable:
fsync on) that every replica writes its history to, faults that restart it and take it
away for 30 s under load, and the reconciliation: every accepted message and every event
the stream still holds is in PostgreSQL exactly once, in the state Redis says. Writes
RUN/history.json and a section appended to RUN/report.md.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import psycopg

from engine.pgserver import PostgresServer

# Stream retention to ride a 30 s outage at the chaos load without ingest refusing
# (history.on_lag): unwritten entries stay under half of it. Writers read often.
ENGINE_ENV = {"ENGINE_QUEUE__EVENTS_MAXLEN": "400000", "ENGINE_HISTORY__LINGER_S": "0.25"}


def start() -> PostgresServer:
    return PostgresServer().start()  # its own temporary dir, fsync on


class LagSampler:
    """The writers' lag every second, in a thread (the fault steps block the runner's)."""

    def __init__(self, replica_urls: list[str]) -> None:
        self.urls = replica_urls
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LagSampler:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            lag = lag_entries(self.urls)
            if lag is not None:
                self.peak = max(self.peak, lag)


def stream_events(redis_url: str, events_key: str) -> list[tuple[str, str]]:
    """(event id, message id) of every event the stream holds now."""
    from engine.embedded import redis_run
    from engine.queue import Redis, parse_entry

    async def go(r: Redis) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        start = "-"
        while True:
            entries = await r.xrange(events_key, start, "+", count=5000)
            for e in entries:
                raw = e.identifier
                entry_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                fields: Any = e.field_values
                out += [(ev.event_id, ev.id) for ev in parse_entry(entry_id, fields)]
            if len(entries) < 5000:
                return out
            raw = entries[-1].identifier
            start = "(" + (raw.decode() if isinstance(raw, bytes) else str(raw))

    return redis_run(redis_url, go, timeout_s=60.0)


def lag_entries(replica_urls: list[str]) -> int | None:
    """The writers' lag as the replicas' /readyz tells it (the largest; None: unknown)."""
    worst: int | None = None
    for url in replica_urls:
        try:
            h = httpx.get(url + "/readyz", timeout=2).json().get("history")
        except (httpx.HTTPError, ValueError):
            return None
        if h is None:
            return None
        worst = max(worst or 0, int(h["lag_entries"]))
    return worst


def gap_entries(replica_urls: list[str]) -> float:
    """engine_history_gap_entries summed over the replicas (entries trimmed unwritten)."""
    total = 0.0
    for url in replica_urls:
        try:
            text = httpx.get(url + "/metrics", timeout=2).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            if line.startswith("engine_history_gap_entries_total "):
                total += float(line.split()[1])
    return total


def reconcile(
    dsn: str,
    accepted: set[str],
    states: dict[str, str],
    stream_events: list[tuple[str, str]],
    replica_urls: list[str],
    wait_s: float,
) -> dict[str, Any]:
    """Wait up to ``wait_s`` for the writers to catch up, then compare. ``states``: each
    accepted id's state in Redis; ``stream_events``: (event id, message id) of every event
    the stream still holds."""
    deadline = time.time() + wait_s
    while time.time() < deadline and (lag_entries(replica_urls) or 0) > 0:
        time.sleep(1.0)
    time.sleep(2.0)  # a last linger
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id::text, state FROM history_messages").fetchall()
        events = conn.execute(
            "SELECT count(*), count(DISTINCT (message_id, event_id)) FROM history_events"
        ).fetchone()
        have_events = {
            (e, m.replace("-", ""))
            for e, m in conn.execute("SELECT event_id, message_id::text FROM history_events")
        }
    ids = [r[0].replace("-", "") for r in rows]
    kept = dict(zip(ids, (r[1] for r in rows), strict=True))
    missing = sorted(accepted - set(kept))
    stale = sorted(
        i for i in accepted if i in kept and states.get(i) not in (None, kept[i])
    )  # a state Redis has moved past
    stream_missing = [e for e in stream_events if e not in have_events]
    assert events is not None
    return {
        "accepted": len(accepted),
        "messages_in_postgres": len(kept),
        "duplicate_messages": len(ids) - len(set(ids)),
        "missing": len(missing),
        "missing_examples": missing[:20],
        "state_differs": len(stale),
        "state_examples": [(i, states.get(i), kept[i]) for i in stale[:10]],
        "events_in_postgres": events[0],
        "duplicate_events": events[0] - events[1],
        "stream_events": len(stream_events),
        "stream_events_missing": len(stream_missing),
        "gap_entries": gap_entries(replica_urls),
    }


def ok(result: dict[str, Any]) -> bool:
    return not (
        result["missing"] or result["duplicate_messages"] or result["duplicate_events"]
        or result["stream_events_missing"] or result["state_differs"] or result["gap_entries"]
    )  # fmt: skip


def markdown(result: dict[str, Any], peak_lag: int) -> str:
    return "\n".join([
        "", "## History (PostgreSQL)", "",
        "Every replica writes the event stream to one PostgreSQL (consumer group",
        "`history`); reconciled against the accepted ids, their states in Redis, and every",
        "event the stream still holds.", "",
        "| accepted | in PostgreSQL | missing | duplicate messages | events | duplicate "
        "events | stream events not in PostgreSQL | state differs | gap | peak lag "
        "(entries) | exactly once |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {result['accepted']:,} | {result['messages_in_postgres']:,} | "
        f"{result['missing']:,} | {result['duplicate_messages']:,} | "
        f"{result['events_in_postgres']:,} | {result['duplicate_events']:,} | "
        f"{result['stream_events_missing']:,} of {result['stream_events']:,} | "
        f"{result['state_differs']:,} | {result['gap_entries']:g} | {peak_lag:,} | "
        f"{'yes' if ok(result) else '**no**'} |",
        "",
    ])  # fmt: skip
