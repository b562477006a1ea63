"""The run report (loadtest.report / loadtest.reconcile) on synthetic run directories."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pytest

from loadtest import report as report_module
from loadtest.reconcile import (
    Delivery,
    Fault,
    InputError,
    duplicate_budget,
    parse_accepted,
    parse_history,
    parse_sink,
    percentile,
    recovery,
)
from loadtest.report import build_report, write_report

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_732_300_000.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

HISTORY_HEADER = (
    '"Timestamp","User Count","Type","Name","Requests/s","Failures/s","50%","66%","75%",'
    '"80%","90%","95%","98%","99%","99.9%","99.99%","100%","Total Request Count",'
    '"Total Failure Count","Total Median Response Time","Total Average Response Time",'
    '"Total Min Response Time","Total Max Response Time","Total Average Content Size"'
)
STATS_HEADER = (
    '"Type","Name","Request Count","Failure Count","Median Response Time",'
    '"Average Response Time","Min Response Time","Max Response Time","Average Content Size",'
    '"Requests/s","Failures/s","50%","66%","75%","80%","90%","95%","98%","99%","99.9%",'
    '"99.99%","100%"'
)


def history_row(ts: float, rps: str, fps: str, p50: str, p99: str, name: str = "Aggregated") -> str:
    typ = "" if name == "Aggregated" else "POST"
    cells = [str(int(ts)), "10", typ, name, rps, fps, p50, p50, p50, p50, p50, p99, p99, p99]
    return ",".join([*cells, p99, p99, p99, "100", "0", p50, p50, "1", p99, "50"])


def make_run(
    root: Path,
    *,
    accepted: Sequence[Iterable[tuple[str, float]]] = (),
    deliveries: Iterable[tuple[float, str | None]] = (),
    states: Mapping[str, str] | None = None,
    faults: list[dict[str, object]] | None = None,
    meta: Mapping[str, object] | None = None,
    history: list[str] | None = None,
    stats: bool = True,
    watchers: Mapping[str, object] | None = None,
    ended_at: float = T0 + 60,
) -> Path:
    """A run directory; ``accepted`` is one iterable of (id, accepted_at) per Locust file.
    ``states`` defaults to "sent" for every accepted id."""
    root.mkdir(parents=True, exist_ok=True)
    files = [list(rows) for rows in accepted]
    (root / "meta.json").write_text(
        json.dumps(
            {
                "scenario": "kill-one-replica",
                "replicas": 3,
                "cores": 4,
                "lease_s": 10.0,
                "started_at": T0,
                "ended_at": ended_at,
                "host": "http://127.0.0.1:8025",
                "load": {"users": 10},
                **(meta or {}),
            }
        )
    )
    (root / "accepted").mkdir(exist_ok=True)
    for n, rows in enumerate(files):
        text = "".join(f"{i},{at:.6f}\n" for i, at in rows)
        (root / "accepted" / f"{1000 + n}.csv").write_text(text)
    (root / "sink.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "at": at,
                    "message_id": f"<{j}@x>",
                    "job_id": j,
                    "mail_from": "a@x",
                    "rcpt_tos": ["b@x"],
                    "size": 100,
                }
            )
            + "\n"
            for at, j in deliveries
        )
    )
    if states is None:
        states = {i: "sent" for rows in files for i, _ in rows}
    (root / "states.json").write_text(json.dumps(states))
    if faults is not None:
        (root / "faults.json").write_text(json.dumps(faults))
    if history is not None:
        (root / "locust_stats_history.csv").write_text("\n".join([HISTORY_HEADER, *history]) + "\n")
    if stats:
        row = '"","Aggregated",1000,2,12,15,1,200,50,16.7,0.03,12,13,14,15,20,30,40,85,150,200,200'
        (root / "locust_stats.csv").write_text(f"{STATS_HEADER}\n{row}\n")
    if watchers is not None:
        (root / "watchers.json").write_text(json.dumps(watchers))
    return root


def simple_run(root: Path, **kwargs: object) -> Path:
    """Three ids accepted in the first seconds, each delivered once 50 ms later."""
    ids = [("a1", T0 + 1.0), ("a2", T0 + 1.5), ("a3", T0 + 2.0)]
    defaults: dict[str, object] = {
        "accepted": [ids],
        "deliveries": [(at + 0.05, i) for i, at in ids],
    }
    defaults.update(kwargs)
    return make_run(root, **defaults)  # type: ignore[arg-type]


def steady(rate: int, seconds: Iterable[int], prefix: str) -> list[tuple[str, float]]:
    """``rate`` events in each of ``seconds`` (relative), evenly spread."""
    return [(f"{prefix}{s}-{k}", T0 + s + k / rate) for s in seconds for k in range(rate)]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    width, height = struct.unpack(">II", data[16:24])  # IHDR follows the signature
    return width, height


# -- reconciliation classes ---------------------------------------------------------------


def test_clean_run_passes(tmp_path: Path) -> None:
    report = write_report(simple_run(tmp_path / "run"))
    r = report.reconciliation
    assert (r.accepted, r.delivered_once, r.duplicated, r.lost, r.pending) == (3, 3, 0, 0, 0)
    assert report.passed and report.exit_code == 0
    assert report.verdict.startswith("PASS: 3 accepted, 0 lost")
    assert report.summary.e2e_p50_ms == pytest.approx(50.0, abs=0.01)
    assert report.summary.e2e_max_ms == pytest.approx(50.0, abs=0.01)
    assert report.summary.duration_s == 60.0
    md = (tmp_path / "run" / "report.md").read_text()
    assert md.startswith("# Run report: kill-one-replica, 2024-11-22")
    assert "**Verdict: PASS**" in md
    assert "| **lost** | **0** | none |" in md
    assert "![Throughput" in md and "(throughput.png)" in md and "(latency.png)" in md
    assert "## How to read this" in md


def test_lost_ids_fail_with_their_reason(tmp_path: Path) -> None:
    run = simple_run(
        tmp_path / "run",
        deliveries=[(T0 + 1.05, "a1")],
        states={"a1": "sent", "a2": "sent"},  # a2: sent, never seen by the sink; a3: no record
    )
    report = build_report(run)
    r = report.reconciliation
    assert r.lost == 2 and r.lost_ids == ("a2", "a3")
    assert r.lost_by_state == {"sent": 1, "missing": 1}
    assert report.exit_code == 1 and not report.passed
    assert report.verdict.startswith("FAIL: 3 accepted, 2 lost")


def test_report_lists_at_most_twenty_lost_ids_in_202_order(tmp_path: Path) -> None:
    ids = [(f"id{n:02d}", T0 + 1 + n / 10) for n in range(25)]
    write_report(make_run(tmp_path / "run", accepted=[ids], states={}))
    md = (tmp_path / "run" / "report.md").read_text()
    assert "First 20 of 25, in 202 order:" in md
    assert "- `id00`" in md and "- `id19`" in md and "`id20`" not in md
    assert "| **lost** | **25** | missing 25 |" in md


def test_pending_dead_lettered_cancelled_are_not_lost(tmp_path: Path) -> None:
    ids = [("p1", T0 + 1), ("p2", T0 + 1), ("d1", T0 + 1), ("c1", T0 + 1), ("ok", T0 + 1)]
    run = make_run(
        tmp_path / "run",
        accepted=[ids],
        deliveries=[(T0 + 2, "ok")],
        states={"p1": "retrying", "p2": "queued", "d1": "failed", "c1": "cancelled", "ok": "sent"},
    )
    report = build_report(run)
    r = report.reconciliation
    assert (r.pending, r.dead_lettered, r.cancelled, r.lost, r.delivered_once) == (2, 1, 1, 0, 1)
    assert r.pending_by_state == {"retrying": 1, "queued": 1}
    assert report.exit_code == 0
    assert "2 still pending at the end" in report.warnings


def test_delivery_without_202_is_reported_not_an_error(tmp_path: Path) -> None:
    run = simple_run(
        tmp_path / "run",
        deliveries=[
            (T0 + 1.1, "a1"),
            (T0 + 1.6, "a2"),
            (T0 + 2.1, "a3"),
            (T0 + 3, "ghost"),
            (T0 + 3.5, "ghost"),
            (T0 + 4, None),
        ],
    )
    report = write_report(run)
    r = report.reconciliation
    assert (r.unaccepted_ids, r.unaccepted_deliveries, r.deliveries_without_id) == (1, 2, 1)
    assert report.exit_code == 0
    md = (run / "report.md").read_text()
    assert "| delivered but 202 not seen | 1 | 2 deliveries;" in md


def test_delivered_id_with_failed_state_counts_as_delivered(tmp_path: Path) -> None:
    run = simple_run(tmp_path / "run", states={"a1": "failed", "a2": "sent", "a3": "sent"})
    r = build_report(run).reconciliation
    assert (r.delivered_once, r.dead_lettered, r.delivered_state_mismatch) == (3, 0, 1)


# -- duplicates and the in-flight budget ----------------------------------------------------


def kill(at: float, in_flight: int | None, kind: str = "kill9") -> dict[str, object]:
    return {
        "name": f"{kind}-r1",
        "kind": kind,
        "target": "replica-1",
        "at": at,
        "until": None,
        "in_flight": in_flight,
    }


def test_duplicates_within_the_in_flight_budget(tmp_path: Path) -> None:
    run = simple_run(
        tmp_path / "run",
        deliveries=[
            (T0 + 1.1, "a1"),
            (T0 + 12, "a1"),
            (T0 + 13, "a1"),
            (T0 + 1.6, "a2"),
            (T0 + 2.1, "a3"),
        ],
        faults=[kill(T0 + 5, 1), kill(T0 + 8, 1), kill(T0 + 9, 7, kind="sigterm")],
    )
    report = build_report(run)
    assert (report.reconciliation.duplicated, report.reconciliation.extra_deliveries) == (1, 2)
    assert (report.duplicates.budget, report.duplicates.within) == (2, True)  # sigterm not counted
    assert report.exit_code == 0 and not any("exceed" in w for w in report.warnings)


def test_duplicates_over_the_budget_warn_but_do_not_fail(tmp_path: Path) -> None:
    run = simple_run(
        tmp_path / "run",
        deliveries=[
            (T0 + 1.1, "a1"),
            (T0 + 12, "a1"),
            (T0 + 1.6, "a2"),
            (T0 + 12, "a2"),
            (T0 + 2.1, "a3"),
        ],
        faults=[kill(T0 + 5, 1)],
    )
    report = write_report(run)
    assert report.duplicates.within is False
    assert "2 duplicate deliveries exceed the 1 jobs in flight at kills" in report.warnings
    assert report.exit_code == 0
    assert "duplicates ≤ in-flight at kills: **no**" in (run / "report.md").read_text()


def test_duplicate_budget_with_unknown_in_flight() -> None:
    faults = [Fault("k", "kill9", "r1", T0, None, None), Fault("k2", "kill9", "r2", T0, None, 2)]
    assert duplicate_budget(2, faults).within is True
    assert duplicate_budget(3, faults).within is None
    assert duplicate_budget(0, []).within is True
    assert duplicate_budget(1, []).within is False


def test_an_id_answered_twice_is_reported(tmp_path: Path) -> None:
    run = simple_run(
        tmp_path / "run",
        accepted=[[("a1", T0 + 1), ("a2", T0 + 1.5)], [("a1", T0 + 0.5), ("a3", T0 + 2)]],
    )
    report = build_report(run)
    assert report.reconciliation.accepted == 3
    assert "1 id answered 202 more than once" in report.warnings


# -- robustness of the inputs ---------------------------------------------------------------


def test_truncated_last_lines_are_tolerated(tmp_path: Path) -> None:
    run = simple_run(tmp_path / "run")
    # Killed writers: a timestamp cut short, a whole line lacking only its newline, half an id.
    (run / "accepted" / "2001.csv").write_text(f"b1,{T0 + 3:.6f}\nb2,17323")
    (run / "accepted" / "2002.csv").write_text(f"c1,{T0 + 3:.6f}\nc2,{T0 + 4:.2f}")
    (run / "accepted" / "2003.csv").write_text(f"d1,{T0 + 3:.6f}\nd2-ha")
    with (run / "sink.jsonl").open("a") as sink:
        for j in ("b1", "c1", "c2", "d1"):
            sink.write(json.dumps({"at": T0 + 5, "job_id": j}) + "\n")
        sink.write('{"at": 1732300005.1, "job_id": "b2", "mess')
    states = {i: "sent" for i in ("a1", "a2", "a3", "b1", "c1", "c2", "d1")}
    (run / "states.json").write_text(json.dumps(states))
    report = write_report(run)
    r = report.reconciliation
    assert (r.accepted, r.lost, r.delivered_once) == (7, 0, 7)
    assert "accepted/*.csv: 2 cut-off last lines dropped" in report.input_notes
    assert "sink.jsonl: 1 cut-off last line dropped" in report.input_notes
    assert "Input notes:" in (run / "report.md").read_text()


def test_parsers_count_what_they_drop() -> None:
    log = parse_accepted(["x,1\nnot a line\nid,accepted_at\ny,2\n", "z,3"], started_at=0)
    assert log.accepted_at == {"x": 1.0, "y": 2.0, "z": 3.0}
    assert (log.malformed_lines, log.truncated_lines) == (1, 0)
    sink = parse_sink('{"at": 1, "job_id": "x"}\ngarbage\n\n{"at": 2}\n{"at": 3, "jo')
    assert sink.deliveries == (Delivery(1.0, "x"), Delivery(2.0, None))
    assert (sink.malformed_lines, sink.truncated_lines) == (1, 1)


def test_history_na_values_and_other_names() -> None:
    rows = parse_history(
        "\n".join(
            [
                HISTORY_HEADER,
                history_row(T0, "0.000000", "0.000000", "N/A", "N/A"),
                history_row(T0 + 1, "12.5", "0.5", "11", "90", name="/v1/messages"),
                history_row(T0 + 1, "12.5", "0.5", "11", "90"),
                '1732300002,10,"","Aggr',  # cut off mid-row
            ]
        )
    )
    assert [(r.timestamp, r.requests_per_s, r.p50_ms, r.p99_ms) for r in rows] == [
        (T0, 0.0, None, None),
        (T0 + 1, 12.5, 11.0, 90.0),
    ]


def test_missing_locust_files_give_na_not_a_crash(tmp_path: Path) -> None:
    run = simple_run(tmp_path / "run", stats=False, faults=[kill(T0 + 2, 0)])
    report = write_report(run)
    assert not report.series.has_history
    assert report.summary.ingest is None
    assert "locust_stats_history.csv missing: no ingest series" in report.input_notes
    md = (run / "report.md").read_text()
    assert "| ingest latency p50 / p99 (Locust, all requests) | n/a |" in md
    assert "| watchers (websocket order) | n/a (no watchers.json) |" in md
    assert png_size(run / "latency.png") == (1000, 400)


def test_missing_states_is_unusable(tmp_path: Path) -> None:
    run = simple_run(tmp_path / "run")
    (run / "states.json").unlink()
    with pytest.raises(InputError, match=r"states\.json is missing"):
        build_report(run)


def test_watcher_order_violations_fail(tmp_path: Path) -> None:
    run = simple_run(
        tmp_path / "run",
        watchers={
            "watchers": 5,
            "followed": 50,
            "events": 200,
            "order_violations": 2,
            "examples": ["x: sent before queued"],
            "latency_ms": {"p50": 3.0, "p99": 40.0},
        },
    )
    report = write_report(run)
    assert report.exit_code == 1 and report.failures == ("2 watcher order violations",)
    md = (run / "report.md").read_text()
    assert "| watchers: followed / events / order violations | 50 / 200 / 2 |" in md
    assert "- `x: sent before queued`" in md


# -- time series and recovery ---------------------------------------------------------------


def test_percentile_is_linear_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_recovery_on_a_hand_made_series() -> None:
    rate = [100.0] * 30 + [0.0] * 5 + [100.0] * 25  # a 5 s outage at t = 30
    loaded = [True] * 60
    instant = recovery(rate, loaded, 30.0, 30.0)  # a kill: until is null
    assert (instant.baseline, instant.recovered_s, instant.recovery_s) == (100.0, 35, 5.0)
    spanning = recovery(rate, loaded, 30.0, 35.0)  # a fault lasting the outage
    assert spanning.recovery_s == 5.0
    late = recovery([100.0] * 31 + [0.0] * 5 + [100.0] * 24, loaded, 30.5, 30.5)
    assert late.recovery_s == 5.5  # seconds are whole: recovered at 36, measured from 30.5


def test_recovery_needs_the_rolling_mean_back_at_ninety_percent() -> None:
    loaded = [True] * 60
    # One good second is not recovery; the mean of the next three must reach 90.
    blip = recovery([100.0] * 30 + [0, 0, 100, 0, 0, 0] + [95.0] * 24, loaded, 30, 30)
    assert blip.recovered_s == 36
    half = recovery([100.0] * 30 + [50.0] * 30, loaded, 30, 30)
    assert (half.recovery_s, half.status) == (None, "not recovered")
    # Baseline only from loaded seconds: idle seconds before do not drag the median down.
    idle = [False] * 20 + [True] * 40
    assert recovery([0.0] * 20 + [100.0] * 10 + [0.0] * 30, idle, 30, 30).baseline == 100.0
    assert recovery([100.0] * 10, [True] * 10, 0, 0).status == "no baseline"


def test_recovery_of_a_kill_end_to_end(tmp_path: Path) -> None:
    # 100 accepted/s for 60 s; deliveries stop for 5 s at t = 30 (a replica killed), then the
    # backlog drains at 150/s before steady 100/s again.
    accepted = steady(100, range(60), "m")
    first_part = [(at + 0.2, i) for i, at in accepted if at < T0 + 30 - 0.2]
    backlog = [i for i, at in accepted if at >= T0 + 29.8]
    late = [(T0 + 35 + k / 150, i) for k, i in enumerate(backlog)]
    run = make_run(
        tmp_path / "run",
        accepted=[accepted[::2], accepted[1::2]],  # two Locust processes
        deliveries=first_part + late,
        faults=[kill(T0 + 30.0, 3)],
        history=[history_row(T0 + s, "100", "0", "12", "80") for s in range(60)],
    )
    report = write_report(run)
    (fault,) = report.faults
    assert fault.delivery.baseline == 100.0
    assert fault.delivery.recovery_s == 5.0
    assert fault.ingest.recovery_s == 0.0
    assert (fault.target_s, fault.within_target) == (15.0, True)
    assert report.reconciliation.lost == 0
    assert report.summary.in_per_s == pytest.approx(100.0)
    assert report.series.ingest_p99_ms[10] == 80.0
    md = (run / "report.md").read_text()
    assert (
        "| kill9-r1 | kill9 | replica-1 | +30.0 s | instant | 3 | 5.0 s | 0.0 s | yes (≤ 15 s) |"
        in md
    )
    assert png_size(run / "throughput.png") == (1000, 400)
    assert png_size(run / "latency.png") == (1000, 400)


def test_fault_that_never_recovers(tmp_path: Path) -> None:
    accepted = steady(20, range(40), "m")
    run = make_run(
        tmp_path / "run",
        accepted=[accepted],
        deliveries=[(at + 0.1, i) for i, at in accepted if at < T0 + 20],
        states={i: "queued" for i, at in accepted if at >= T0 + 20}
        | {i: "sent" for i, at in accepted if at < T0 + 20},
        faults=[
            {
                "name": "sink-down",
                "kind": "sink-fail",
                "target": "sink",
                "at": T0 + 20,
                "until": T0 + 25,
                "in_flight": None,
            },
            kill(T0 + 22, 0),
        ],
    )
    report = write_report(run)
    sink_fault, kill_fault = report.faults
    assert sink_fault.delivery.status == "not recovered" and sink_fault.target_s is None
    assert kill_fault.within_target is False
    assert "kill9-r1 missed the lease_s + 5 s target" in report.warnings
    md = (run / "report.md").read_text()
    assert (
        "| sink-down | sink-fail | sink | +20.0 s | 5.0 s | n/a | not recovered within the run"
        in md
    )


# -- the CLI --------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.report", *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_end_to_end(tmp_path: Path) -> None:
    ok = simple_run(tmp_path / "ok", faults=[kill(T0 + 2, 1)])
    out = run_cli(str(ok))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("PASS: 3 accepted, 0 lost")
    assert f"report: {ok / 'report.md'}" in out.stdout
    for name in ("report.md", "throughput.png", "latency.png"):
        assert (ok / name).stat().st_size > 0
    assert run_cli(str(ok), "--quiet").stdout == ""

    lost = simple_run(tmp_path / "lost", states={"a1": "sent", "a2": "sent", "a3": "missing"})
    (lost / "sink.jsonl").write_text(json.dumps({"at": T0 + 2, "job_id": "a1"}) + "\n")
    out = run_cli(str(lost), "--quiet")
    assert out.returncode == 1
    assert out.stdout.startswith("FAIL: 3 accepted, 2 lost")

    (lost / "states.json").unlink()
    out = run_cli(str(lost))
    assert out.returncode == 2
    assert "states.json is missing" in out.stderr
    assert run_cli(str(tmp_path / "nowhere")).returncode == 2


def test_cli_help_and_public_surface() -> None:
    out = run_cli("--help")
    assert out.returncode == 0
    assert "usage: python -m loadtest.report" in out.stdout and "--quiet" in out.stdout
    assert {"build_report", "write_report", "Report", "InputError", "main"} <= set(
        report_module.__all__
    )


def test_outage_resume_is_measured_from_the_fault_end() -> None:
    from loadtest.reconcile import resumed_after

    delivered = [5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 3.0, 5.0]
    # The server came back at 3.4 s; the first delivery fell in second 6: at most 3.6 s.
    assert resumed_after(delivered, 3.4) == pytest.approx(3.6)
    assert resumed_after(delivered[:6], 3.4) is None
