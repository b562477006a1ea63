"""Webhooks under chaos: a receiver process next to the cluster (fixtures/receiver.py),
an endpoint wanting every message's `sent` event, a fault that takes the receiver down,
and the reconciliation: every message the sink received must have reached the receiver
as a `sent` event at least once (by message id; repeats counted). Writes
RUN/webhooks.json and a section appended to RUN/report.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from engine.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
# The receiver listens on 127.0.0.1: the replicas must be allowed to call it (SSRF rules).
ENGINE_ENV = {"ENGINE_WEBHOOKS__ALLOW": '["127.0.0.1/32"]', "ENGINE_WEBHOOKS__LEASE_S": "10"}


@dataclass
class Receiver:
    run_dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.run_dir / "webhooks.jsonl"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fixtures.receiver", "--port", str(self.port),
             "--log", str(self.log)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def subscribe(self, base: str, headers: dict[str, str]) -> str:
        """The endpoint (through the balancer); its id."""
        body = {"url": self.url, "events": ["sent"], "batch_max": 100}
        r = httpx.post(f"{base}/v1/webhooks", json=body, headers=headers, timeout=10)
        r.raise_for_status()
        time.sleep(1.5)  # every dispatcher re-reads its endpoints within a second
        return str(r.json()["id"])

    def received(self) -> list[str]:
        """Message ids of the `sent` events received, repeats included."""
        out: list[str] = []
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return out
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("type") == "sent" and doc.get("msg"):
                out.append(doc["msg"])
        return out


def reconcile(receiver: Receiver, delivered: set[str], wait_s: float) -> dict[str, Any]:
    """Wait up to ``wait_s`` until every message the sink received has reached the
    receiver as a `sent` event; the counts (repeats: more than one `sent` event for a
    message -- a resent webhook, or a message delivered twice)."""
    deadline = time.time() + wait_s
    while True:
        got = receiver.received()
        missing = delivered - set(got)
        if not missing or time.time() >= deadline:
            break
        time.sleep(1.0)
    return {
        "delivered_messages": len(delivered),
        "sent_events_received": len(got),
        "distinct": len(set(got) & delivered),
        "missing": len(missing),
        "repeats": len(got) - len(set(got)),
        "missing_examples": sorted(missing)[:20],
    }


def markdown(result: dict[str, Any]) -> str:
    ok = result["missing"] == 0
    return "\n".join([
        "", "## Webhooks", "",
        "One endpoint wanting every `sent` event (batches of up to 100), its receiver a",
        "separate process; reconciled by message id against what the sink received.", "",
        "| messages delivered | `sent` events received | distinct | missing | repeats "
        "| every delivery told |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {result['delivered_messages']:,} | {result['sent_events_received']:,} | "
        f"{result['distinct']:,} | {result['missing']:,} | {result['repeats']:,} | "
        f"{'yes' if ok else '**no**'} |",
        "",
    ])  # fmt: skip
