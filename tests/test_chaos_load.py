"""Chaos under load, end to end: replicas behind HAProxy, Locust, a fault, the report.

The kill -9 scenario runs in the default suite (about a minute); the other scenarios
are marked slow (``scripts/test -m slow``, or ``scripts/chaos`` for the long runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.chaos.runner import ChaosSettings, run
from loadtest.chaos.scenarios import SCENARIOS
from loadtest.haproxy import ensure_haproxy
from loadtest.report import build_report


def _haproxy_or_skip() -> None:
    try:
        ensure_haproxy()
    except Exception as exc:  # no haproxy and no way to install it here
        pytest.skip(f"haproxy unavailable: {exc}")


def _run(name: str, tmp_path: Path, seconds: float) -> tuple[int, Path]:
    _haproxy_or_skip()
    run_dir = tmp_path / name
    # Moderate load: single and batch senders, pollers and watchers through the balancer.
    code = run(
        ChaosSettings(
            SCENARIOS[name],
            run_dir,
            seconds=seconds,
            users=12,
            drain_s=90,
            weights="single=4,batch=2,status=1,watch=1",
        )
    )
    return code, run_dir


def test_kill9_under_load_loses_nothing(tmp_path: Path) -> None:
    code, run_dir = _run("kill9", tmp_path, seconds=40)
    report = build_report(run_dir)
    rec = report.reconciliation
    assert rec.accepted > 1000, "the load did not get going"
    assert rec.lost == 0, report.verdict
    assert rec.pending == 0 and rec.dead_lettered == 0, report.verdict
    assert report.duplicates.within, report.verdict
    (kill,) = report.faults
    assert kill.fault.kind == "kill9" and kill.fault.in_flight is not None
    # Both rates came back within the bound (lease + 5 s after the kill).
    assert kill.within_target, (kill.delivery, kill.ingest)
    assert report.watchers is not None and report.watchers.order_violations == 0
    assert code == 0
    for name in ("report.md", "throughput.png", "latency.png", "locust.html", "states.json"):
        assert (run_dir / name).stat().st_size > 0, name


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rolling", "redis-restart", "sink-fail", "redis-cut"])
def test_other_faults_under_load_lose_nothing(name: str, tmp_path: Path) -> None:
    code, run_dir = _run(name, tmp_path, seconds=SCENARIOS[name].min_seconds)
    report = build_report(run_dir)
    assert report.reconciliation.accepted > 1000
    assert report.reconciliation.lost == 0, report.verdict
    assert report.reconciliation.pending == 0, report.verdict
    assert code == 0, report.verdict
