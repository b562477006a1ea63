"""Provider failover under chaos: a Resend emulator process (fixtures.providers) as the
engines' first transport and the sink as the second, its faults (an outage, accepted
requests left unanswered), and the reconciliation: every accepted message delivered at
the emulator (distinct idempotency keys, i.e. job ids) or the sink (job ids), duplicates
at Resend, duplicates across the two, and the failover time. Writes
RUN/providers.json, RUN/provider-emails.jsonl (one line per email the emulator stored, in
the sink log's shape, so the report counts mail there as delivered) and a section
appended to RUN/report.md. Imports nothing of the engine but its test helpers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from engine.embedded import free_port
from fixtures.auth import TEST_ADMIN_KEY
from loadtest.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
PROVIDER = "resend"
KEY = "re_test_key"
TRIP_AFTER_FAILURES = 5
# A request accepted and never answered is given up after this (the default is 30 s: an
# accept_then_hang would hold its sender that long).
REQUEST_TIMEOUT_S = 2.0
# Failover is due within this of the breaker opening (issue 16: "within the breaker's
# window + 1 s").
FAILOVER_SLACK_S = 1.0
_PAGE = 5000  # emails per GET /_emulator/emails


def engine_env(port: int) -> dict[str, str]:
    """Route every message to the emulator first, the sink ("smtp") second."""
    url = f"{PROVIDER}://{KEY}@?api_base=http://127.0.0.1:{port}"
    return {
        "ENGINE_ROUTING__TRANSPORTS": json.dumps({PROVIDER: url}),
        "ENGINE_ROUTING__ORDER": json.dumps([PROVIDER, "smtp"]),
        "ENGINE_ROUTING__TRIP_AFTER_FAILURES": str(TRIP_AFTER_FAILURES),
        "ENGINE_PROVIDERS__REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S),
        # The default, engine@localhost, is no address to Resend (a domain with no dot):
        # every mail would be refused 422 and dead-lettered.
        "ENGINE_SENDER__DEFAULT_FROM": "engine@example.com",
    }


@dataclass
class ProviderEmulator:
    """The emulator process and a reader of what it stored (incremental, by offset)."""

    run_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # (job id or None, stored at) per stored email, in the emulator's order.
    stored: list[tuple[str | None, float]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 15.0) -> None:
        log = (self.run_dir / "logs").resolve()
        log.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fixtures.providers", "--provider", PROVIDER,
             "--port", str(self.port), "--key", KEY],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=(log / "emulator.log").open("ab"),
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # "emulator resend ready URL"
        if "ready" not in line:
            raise RuntimeError(f"the {PROVIDER} emulator did not start: {line!r}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base}/_emulator/stats", timeout=1).raise_for_status()
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"the {PROVIDER} emulator is not answering on {self.base}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def faults(self, doc: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(f"{self.base}/_emulator/faults", json=doc, timeout=5)
        r.raise_for_status()
        return dict(r.json())

    def stats(self) -> dict[str, Any]:
        r = httpx.get(f"{self.base}/_emulator/stats", timeout=5)
        r.raise_for_status()
        return dict(r.json())

    def new_ids(self) -> list[str]:
        """Job ids of the emails stored since the last call (the Tally's extra source)."""
        out: list[str] = []
        while True:
            try:
                r = httpx.get(
                    f"{self.base}/_emulator/emails",
                    params={"offset": len(self.stored), "limit": _PAGE}, timeout=30,
                )  # fmt: skip
                r.raise_for_status()
            except httpx.HTTPError:
                return out  # the next poll reads on from here
            emails = r.json()["emails"]
            for e in emails:
                key = e.get("idempotency_key") or None
                self.stored.append((key, float(e["at"])))
                if key:
                    out.append(key)
            if len(emails) < _PAGE:
                return out

    def write_log(self, path: Path) -> None:
        """One line per stored email, the sink log's shape ({"at", "job_id"})."""
        with path.open("w", encoding="utf-8") as f:
            for job_id, at in self.stored:
                f.write(json.dumps({"at": at, "job_id": job_id, "provider": PROVIDER}) + "\n")


def _iso_s(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class BreakerWatch:
    """Polls GET /v1/transports on one replica: when the provider's breaker was first
    seen open (and its own ``down_since``), and first seen closed again after that."""

    def __init__(self, url: str, period_s: float = 0.1) -> None:
        self.url = url
        self.period_s = period_s
        self.opened_at: float | None = None  # the breaker's own down_since
        self.seen_open_at: float | None = None
        self.seen_closed_at: float | None = None
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> BreakerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
        with httpx.Client(timeout=2, headers=headers) as client:
            while not self._stop.wait(self.period_s):
                try:
                    views = client.get(f"{self.url}/v1/transports").json()["transports"]
                except (httpx.HTTPError, ValueError, KeyError):
                    continue  # the replica may be restarting
                view = next((v for v in views if v.get("name") == PROVIDER), None)
                if view is None:
                    continue
                now = time.time()
                if view.get("state") == "down" and self.seen_open_at is None:
                    self.seen_open_at = now
                    self.opened_at = _iso_s(view.get("down_since"))
                    self.reason = view.get("reason")
                elif view.get("state") == "up" and self.seen_open_at is not None:
                    self.seen_closed_at = now
                    return

    def wait_closed(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return self.seen_closed_at is not None


def _emulator(c: Cluster) -> ProviderEmulator:
    emulator = c.provider_emulator
    assert isinstance(emulator, ProviderEmulator), "a providers scenario starts an emulator"
    return emulator


def outage(seconds: float, status: int = 500) -> Callable[[Cluster], dict[str, Any]]:
    """The provider answers ``status`` to every request for ``seconds``, then is well
    again; the fault record also holds what GET /v1/transports showed of its breaker."""

    def run(c: Cluster) -> dict[str, Any]:
        emulator = _emulator(c)
        watch = BreakerWatch(c.replica_urls[0]).start()
        at = time.time()
        emulator.faults({"status": status, "count": 10_000_000})
        time.sleep(seconds)
        emulator.faults({"clear": True})
        until = time.time()
        watch.wait_closed(15.0)  # the breaker closes at its next probe (probe max)
        watch.stop()
        return {
            "name": f"{PROVIDER} answers {status} for {seconds:g} s", "kind": "provider-outage",
            "target": PROVIDER, "at": at, "until": until, "in_flight": None,
            "breaker": {"opened_at": watch.opened_at, "seen_open_at": watch.seen_open_at,
                        "seen_closed_at": watch.seen_closed_at, "reason": watch.reason},
        }  # fmt: skip

    return run


def accept_then_hang(requests: int) -> Callable[[Cluster], dict[str, Any]]:
    """The next ``requests`` emails are stored and never answered: the engine times out
    (uncertain) and retries under the same idempotency key. Waits first (up to 20 s)
    until the provider's breaker is closed, so the hang meets real traffic."""

    def run(c: Cluster) -> dict[str, Any]:
        emulator = _emulator(c)
        headers = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                views = httpx.get(
                    f"{c.replica_urls[0]}/v1/transports", headers=headers, timeout=2
                ).json()["transports"]  # fmt: skip
                if all(v.get("state") == "up" for v in views if v.get("name") == PROVIDER):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.2)
        before = emulator.stats()["hung"]
        at = time.time()
        emulator.faults({"accept_then_hang": requests})
        while time.time() < at + 10 and emulator.stats()["hung"] - before < requests:
            time.sleep(0.2)
        hung = emulator.stats()["hung"] - before
        time.sleep(REQUEST_TIMEOUT_S + 1)  # the timeouts themselves
        emulator.faults({"clear": True})
        return {
            "name": f"{PROVIDER} accepts {requests} requests and never answers",
            "kind": "provider-hang", "target": PROVIDER, "at": at, "until": time.time(),
            "in_flight": hung,
        }  # fmt: skip

    return run


def reconcile(
    emulator: ProviderEmulator,
    accepted: set[str],
    sink_log: Path,
    faults: Iterable[dict[str, Any]],
) -> dict[str, Any]:
    """The counts, from what the emulator stored (read to the end here) and the sink's
    log. Lost: accepted and at neither; duplicates at Resend: stored emails minus
    distinct keys (a retry under the same key must be replayed, not stored again)."""
    emulator.new_ids()
    keys = Counter(k for k, _ in emulator.stored if k)
    no_key = sum(1 for k, _ in emulator.stored if not k)
    sink: Counter[str] = Counter()
    sink_times: list[float] = []
    for line in sink_log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("job_id"):
            sink[doc["job_id"]] += 1
            sink_times.append(float(doc["at"]))
    at_resend, at_sink = set(keys) & accepted, set(sink) & accepted
    anywhere = at_resend | at_sink
    both = at_resend & at_sink
    result: dict[str, Any] = {
        "accepted": len(accepted),
        "stored_at_resend": len(emulator.stored),
        "distinct_keys_at_resend": len(keys),
        "resend_without_key": no_key,
        "duplicates_at_resend": sum(n - 1 for n in keys.values()),
        "delivered_at_resend": len(at_resend),
        "delivered_at_sink": len(at_sink),
        "sink_duplicates": sum(n - 1 for n in sink.values()),
        "delivered_anywhere": len(anywhere),
        "at_both": len(both),
        "lost": len(accepted - anywhere),
        "lost_examples": sorted(accepted - anywhere)[:20],
        "both_examples": sorted(both)[:20],
        "emulator": emulator.stats(),
    }
    outage = next((f for f in faults if f.get("kind") == "provider-outage"), None)
    if outage is not None:
        start, end = float(outage["at"]), float(outage["until"] or outage["at"])
        after = [t for t in sink_times if t >= start]
        first_sink = min(after) if after else None
        back = [t for _, t in emulator.stored if t >= end]
        breaker = outage.get("breaker") or {}
        opened = breaker.get("opened_at")
        result["failover"] = {
            "fault_at": start,
            "fault_until": end,
            "breaker_open_s": None if opened is None else opened - start,
            "first_sink_delivery_s": None if first_sink is None else first_sink - start,
            "breaker_closed_after_end_s": (
                None if breaker.get("seen_closed_at") is None
                else breaker["seen_closed_at"] - end
            ),
            "first_resend_after_end_s": min(back) - end if back else None,
            "reason": breaker.get("reason"),
        }  # fmt: skip
        fo = result["failover"]
        if fo["first_sink_delivery_s"] is not None and fo["breaker_open_s"] is not None:
            fo["within_target"] = (
                fo["first_sink_delivery_s"] <= fo["breaker_open_s"] + FAILOVER_SLACK_S
            )
    return result


def ok(result: dict[str, Any]) -> bool:
    return bool(result["lost"] == 0 and result["duplicates_at_resend"] == 0)


def verdict(result: dict[str, Any]) -> str:
    fo = result.get("failover") or {}
    return (
        f"providers: {'PASS' if ok(result) else 'FAIL'}: {result['accepted']:,} accepted, "
        f"{result['lost']:,} lost (at neither), {result['duplicates_at_resend']:,} duplicates "
        f"at {PROVIDER}; {result['delivered_at_resend']:,} at {PROVIDER}, "
        f"{result['delivered_at_sink']:,} at the sink, {result['at_both']:,} at both; "
        f"breaker open {_s(fo.get('breaker_open_s'))}, first sink delivery "
        f"{_s(fo.get('first_sink_delivery_s'))} after the outage began"
    )


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def markdown(result: dict[str, Any]) -> str:
    fo = result.get("failover") or {}
    within = fo.get("within_target")
    target = "n/a" if within is None else ("yes" if within else "**no**")
    return "\n".join([
        "", "## Providers", "",
        f"**{'PASS' if ok(result) else 'FAIL'}** (0 lost and 0 duplicates at {PROVIDER} "
        "needed). Routing order: the Resend emulator, then the sink (`smtp`); breaker "
        f"trips after {TRIP_AFTER_FAILURES} temporary failures in a row; provider request "
        f"timeout {REQUEST_TIMEOUT_S:g} s. The reconciliation above counts a message stored "
        "at the emulator (RUN/provider-emails.jsonl) as delivered, as one in the sink's log.",
        "",
        "| accepted | at Resend (distinct keys) | stored at Resend | duplicates at Resend "
        "| at the sink | duplicates at the sink | at both (cross-provider) | lost |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['accepted']:,} | {result['delivered_at_resend']:,} | "
        f"{result['stored_at_resend']:,} | {result['duplicates_at_resend']:,} | "
        f"{result['delivered_at_sink']:,} | {result['sink_duplicates']:,} | "
        f"{result['at_both']:,} | {result['lost']:,} |",
        "",
        "| failover | |",
        "|---|---:|",
        "| breaker opened (its `down_since` in GET /v1/transports), from the outage's start "
        f"| {_s(fo.get('breaker_open_s'))} |",
        f"| first delivery through the sink, from the outage's start "
        f"| {_s(fo.get('first_sink_delivery_s'))} |",
        f"| within the breaker opening + {FAILOVER_SLACK_S:g} s | {target} |",
        "| breaker seen closed again, from the outage's end "
        f"| {_s(fo.get('breaker_closed_after_end_s'))} |",
        "| first email at Resend, from the outage's end "
        f"| {_s(fo.get('first_resend_after_end_s'))} |",
        "",
        f"Emulator counts: {json.dumps(result['emulator'])}.",
        "",
    ])  # fmt: skip
