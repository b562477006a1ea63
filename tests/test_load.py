"""The Locust load suite (loadtest/) against real processes: a scripts/load run writes the
run directory of loadtest/RUNDIR.md, every id it recorded as accepted reaches the sink,
and the websocket watchers see every message's events in lifecycle order. Locust runs as
a subprocess: this process never imports locust or gevent."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from engine.embedded import RedisServer, SinkProcess
from fixtures.auth import TEST_ADMIN_KEY
from fixtures.engine import EngineProcess
from loadtest.load import (
    LoadResult,
    LoadSettings,
    Summary,
    failure_kind,
    main,
    parse_seconds,
    start_load,
)
from loadtest.recorder import Followed, merge_watchers, percentile, read_accepted, write_json

ROOT = Path(__file__).resolve().parent.parent
ID = re.compile(r"^[0-9a-f]{32}$")


def _flush(url: str) -> None:
    import trio

    from engine.queue import open_redis

    async def go() -> None:
        async with open_redis(url) as r:
            await r.flushall()

    trio.run(go)


@pytest.fixture
def stack(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[EngineProcess, SinkProcess]]:
    _flush(redis_server.url)
    with SinkProcess(workdir=tmp_path / "sink") as sink:
        engine = EngineProcess(redis_server.url, sink.url, tmp_path)
        try:
            yield engine, sink
        finally:
            if engine.proc.poll() is None:
                assert engine.stop() == 0, engine.output()


def _wait_delivered(sink: SinkProcess, ids: set[str], timeout: float) -> set[str]:
    """The ids of ``ids`` the sink has not logged after ``timeout`` (empty: all there)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = ids - {m["job_id"] for m in sink.received()}
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def test_load_run_writes_the_run_dir_and_every_accepted_id_is_delivered(
    stack: tuple[EngineProcess, SinkProcess], tmp_path: Path
) -> None:
    engine, sink = stack
    run_dir = tmp_path / "run"
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.load", "--host", engine.base, "--key", TEST_ADMIN_KEY,
         "--time", "8s",
         "--users", "4", "--spawn-rate", "4", "--weights", "single=1,batch=1,status=1,watch=1",
         "--batch-size", "10", "--quiet", "--out", str(run_dir)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    ended = time.time()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "load: accepted" in proc.stdout and "order violations 0" in proc.stdout, proc.stdout

    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv",
                 "locust_exceptions.csv", "locust.html", "meta.json", "watchers.json"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "meta.json").read_text())
    assert TEST_ADMIN_KEY not in (run_dir / "meta.json").read_text()
    assert meta["scenario"] == "load-steady" and meta["host"] == engine.base
    assert meta["cores"] >= 1 and meta["replicas"] == 1 and meta["lease_s"] > 0
    assert started <= meta["started_at"] < meta["ended_at"] <= ended
    assert meta["load"]["users"] == 4 and meta["load"]["shape"] == "steady"

    with (run_dir / "locust_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    for name in (
        "/v1/messages",
        "/v1/messages/batch",
        "/v1/messages/[id]",
        "/v1/messages/batch [watch]",
        "/v1/events [connect]",
        "/v1/events [event]",
    ):
        assert int(rows[name]["Request Count"]) > 0, name
    assert rows["Aggregated"]["Failure Count"] == "0", (run_dir / "locust_failures.csv").read_text()

    accepted = read_accepted(run_dir)
    assert len(accepted) >= 50
    assert all(ID.match(i) for i in accepted)
    assert all(started <= at <= ended for at in accepted.values())
    lines = sum(len(p.read_text().splitlines()) for p in (run_dir / "accepted").glob("*.csv"))
    assert lines == len(accepted), "an id was recorded twice"

    assert not _wait_delivered(sink, set(accepted), timeout=20)

    watchers = json.loads((run_dir / "watchers.json").read_text())
    assert watchers["watchers"] == 1
    assert watchers["order_violations"] == 0, watchers["examples"]
    assert watchers["events"] > 0 and watchers["followed"] > 0
    assert watchers["finished"] > 0 and watchers["latency_ms"]["p99"] > 0
    assert set(watchers) >= {"watchers", "followed", "events", "order_violations", "examples"}
    # pytest itself never ran Locust's monkeypatching
    assert "locust" not in sys.modules and "gevent" not in sys.modules


def test_background_run_stops_early_on_sigterm_and_keeps_its_reports(
    stack: tuple[EngineProcess, SinkProcess], tmp_path: Path
) -> None:
    engine, sink = stack
    run_dir = tmp_path / "run"
    run = start_load(
        LoadSettings(engine.base, run_dir, seconds=60, users=2, spawn_rate=2,
                     weights="single=1,watch=1", print_stats=False, api_key=TEST_ADMIN_KEY)
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while not read_accepted(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert read_accepted(run_dir), (run_dir / "locust.log").read_text()
        run.proc.send_signal(signal.SIGTERM)  # as a chaos harness or `timeout` would
        result = run.wait(timeout=20)
    finally:
        if run.running():
            run.proc.kill()
    assert result.returncode == 0, (run_dir / "locust.log").read_text()
    assert run.elapsed() < 30
    assert (run_dir / "locust.html").is_file() and result.summary.stats_found
    assert result.summary.accepted == len(read_accepted(run_dir)) > 0
    assert result.ok and result.summary.order_violations == 0
    assert json.loads((run_dir / "meta.json").read_text())["load"]["seconds"] == 60
    assert not _wait_delivered(sink, set(read_accepted(run_dir)), timeout=20)


def test_followed_checks_lifecycle_order() -> None:
    a, b = "01" * 16, "02" * 16

    def ev(job: str, kind: str, event_id: str) -> dict[str, object]:
        return {"id": job, "type": kind, "event_id": event_id, "at": 1}

    f = Followed([a, b])
    # enqueue entry numbered per job; lease expiry (processing -> queued) is legal
    for e in (ev(a, "queued", "5-0.0"), ev(b, "queued", "5-0.1"), ev(a, "processing", "6-0"),
              ev(a, "queued", "9-0"), ev(a, "processing", "10-0"), ev(a, "retrying", "11-0"),
              ev(a, "queued", "12-0"), ev(a, "processing", "13-0")):  # fmt: skip
        assert f.see(e).violations == [], e
    seen = f.see(ev(a, "sent", "14-0"))
    assert seen.final == "sent" and not seen.violations and a not in f.open
    assert f.see(ev(a, "sent", "15-0")).violations  # after its final event
    assert f.see(ev(b, "sent", "16-0")).violations  # queued -> sent skips processing
    g = Followed([a])
    assert g.see(ev(a, "processing", "1-0")).violations  # not queued first
    assert g.see(ev(a, "sent", "1-0")).violations  # event id not increasing
    assert not Followed([a]).see(ev(b, "queued", "1-0")).ours


def test_watcher_parts_merge(tmp_path: Path) -> None:
    part = {"watchers": 1, "followed": 2, "finished": 2, "events": 6, "order_violations": 1,
            "examples": ["x"], "latency_samples_ms": [1.0, 2.0, 3.0, 100.0]}  # fmt: skip
    write_json(tmp_path / "watchers" / "1.json", part)
    write_json(tmp_path / "watchers" / "2.json", {**part, "latency_samples_ms": [4.0]})
    merged = merge_watchers(tmp_path)
    assert merged["watchers"] == 2 and merged["events"] == 12 and merged["order_violations"] == 2
    assert merged["latency_ms"]["p50"] == 3.0 and merged["latency_ms"]["p99"] == 100.0
    assert json.loads((tmp_path / "watchers.json").read_text()) == merged
    assert percentile([], 50) == 0.0


def test_command_line_bounds_and_names() -> None:
    assert parse_seconds("90") == parse_seconds("1m30s") == 90
    assert parse_seconds("1h") == 3600
    with pytest.raises(ValueError):
        parse_seconds("soon")
    assert main(["--time", "2h", "--no-check"]) == 2  # refused without --force
    assert failure_kind("CatchResponseError('backpressure 429: over the limit')") == (
        "backpressure 429"
    )
    calm = Summary(10, 20, 0, 2.0, 5, 9, {}, {"order_violations": 0}, stats_found=True)
    assert LoadResult(0, Path("."), calm).exit_code == 0
    bad = replace(calm, watchers={"order_violations": 3})
    assert LoadResult(0, Path("."), bad).exit_code == 1 and not LoadResult(0, Path("."), bad).ok
    assert LoadResult(0, Path("."), replace(calm, stats_found=False)).exit_code == 2
    assert LoadResult(1, Path("."), calm).exit_code == 2


def test_shapes_end_at_the_run_time() -> None:
    # shapes.py imports locust (gevent monkeypatching): ask a subprocess
    code = """
from loadtest.shapes import ShapeSettings, plan
s = dict(seconds=10, users=4, spawn_rate=2)
print([plan(ShapeSettings(shape="steady", **s), t) for t in (0, 9.9, 10)])
print([plan(ShapeSettings(shape="step", **s), t)[0] for t in (0, 2.6, 5.1, 7.6)])
print([plan(ShapeSettings(shape="spike", **s), t)[0] for t in (0, 4, 5.9, 6)], plan(
    ShapeSettings(shape="spike", **s), 10))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "[(4, 2), (4, 2), None]",
        "[1, 2, 3, 4]",
        "[4, 16, 16, 4] None",
    ]
