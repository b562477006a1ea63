"""``python -m loadtest.report RUN_DIR``: reconcile a finished run and write its report.

The I/O edge: reads the run directory (loadtest/RUNDIR.md), hands the texts to
``loadtest.reconcile`` for every number, renders report.md, and asks ``loadtest.plots`` for
the PNGs. Imports nothing from the engine. Exit status: 0 ok, 1 lost messages or watcher
order violations, 2 unusable input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from loadtest.reconcile import (
    BASELINE_WINDOW_S,
    OUTAGE_SLACK_S,
    RECOVERED_FRACTION,
    RECOVERY_SLACK_S,
    ROLLING_WINDOW_S,
    FaultResult,
    InputError,
    Recovery,
    Report,
    RunData,
    SinkLog,
    assemble,
    parse_accepted,
    parse_faults,
    parse_history,
    parse_locust_stats,
    parse_meta,
    parse_sink,
    parse_states,
    parse_watchers,
)

__all__ = ["InputError", "Report", "build_report", "main", "render_markdown", "write_report"]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2
# How many lost ids report.md lists.
LOST_IDS_LISTED = 20


# -- reading ------------------------------------------------------------------------------


def _read(path: Path) -> str:
    # errors="replace": a writer killed mid-character must not make the file unreadable.
    return path.read_text(encoding="utf-8", errors="replace")


def _optional(path: Path) -> str | None:
    return _read(path) if path.is_file() else None


def _required(path: Path, why: str) -> str:
    if not path.is_file():
        raise InputError(f"{path} is missing: {why}")
    return _read(path)


def load_run(run_dir: Path) -> RunData:
    """Read and parse a run directory; raises InputError when it cannot be reconciled."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a directory")
    meta = parse_meta(_required(run_dir / "meta.json", "the run's start time is unknown"))
    states = parse_states(
        _required(
            run_dir / "states.json",
            "no final states, so nothing to reconcile (chaos runs write it after draining)",
        )
    )
    accepted_dir = run_dir / "accepted"
    if not accepted_dir.is_dir():
        raise InputError(f"{accepted_dir} is missing: no record of which messages got a 202")
    accepted = parse_accepted(
        (_read(p) for p in sorted(accepted_dir.glob("*.csv"))), started_at=meta.started_at
    )
    sink = parse_sink(
        _required(run_dir / "sink.jsonl", "no record of deliveries (run the sink with --log)")
    )
    # Mail a provider (emulator) took is delivered too: chaos scenario provider-outage.
    routed = _optional(run_dir / "provider-emails.jsonl")
    if routed is not None:
        more = parse_sink(routed)
        sink = SinkLog(
            sink.deliveries + more.deliveries,
            sink.truncated_lines + more.truncated_lines,
            sink.malformed_lines + more.malformed_lines,
        )
    faults_text = _optional(run_dir / "faults.json")
    history_text = _optional(run_dir / "locust_stats_history.csv")
    stats_text = _optional(run_dir / "locust_stats.csv")
    watchers_text = _optional(run_dir / "watchers.json")
    return RunData(
        meta=meta,
        accepted=accepted,
        sink=sink,
        states=states,
        faults=parse_faults(faults_text) if faults_text is not None else [],
        history=parse_history(history_text) if history_text is not None else None,
        locust_stats=parse_locust_stats(stats_text) if stats_text is not None else None,
        watchers=parse_watchers(watchers_text) if watchers_text is not None else None,
    )


def build_report(run_dir: Path | str) -> Report:
    """The report's numbers; writes nothing. Raises InputError on unusable input."""
    return assemble(load_run(Path(run_dir)))


def write_report(run_dir: Path | str) -> Report:
    """Build the report and write report.md, throughput.png and latency.png into run_dir."""
    from loadtest.plots import write_plots  # matplotlib only when drawing

    run_dir = Path(run_dir)
    report = build_report(run_dir)
    write_plots(report, run_dir)
    (run_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    log.info("report.written run_dir=%s exit_code=%d", run_dir, report.exit_code)
    return report


# -- rendering ------------------------------------------------------------------------------

NA = "n/a"


def _num(x: float | None, digits: int = 1) -> str:
    return NA if x is None else f"{x:,.{digits}f}"


def _ms(x: float | None) -> str:
    if x is None:
        return NA
    return f"{x:,.0f} ms" if abs(x) >= 100 else f"{x:.1f} ms"


def _s(x: float | None) -> str:
    return NA if x is None else f"{x:.1f} s"


def _yes_no(x: bool | None) -> str:
    return NA if x is None else ("yes" if x else "**no**")


def _by_state(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in counts.items())


def _recovery(r: Recovery) -> str:
    if r.status == "no baseline":
        return f"{NA} (no load before)"
    if r.recovery_s is None:
        return "not recovered within the run"
    return f"{r.recovery_s:.1f} s"


def _date(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _fault_row(fr: FaultResult) -> str:
    f = fr.fault
    in_flight = str(f.in_flight) if f.in_flight is not None else NA
    duration = _s(fr.duration_s) if fr.duration_s is not None else "instant"
    target = NA if fr.target_s is None else f"{_yes_no(fr.within_target)} (≤ {fr.target_s:g} s)"
    if fr.resumed_s is not None:
        target += f"; resumed {fr.resumed_s:.0f} s after its end"
    return (
        f"| {f.name} | {f.kind} | {f.target or NA} | +{fr.at_s:.1f} s | {duration} | {in_flight} "
        f"| {_recovery(fr.delivery)} | {_recovery(fr.ingest)} | {target} |"
    )


def render_markdown(report: Report) -> str:
    """report.md for ``report`` (plots are linked as throughput.png and latency.png)."""
    m, r, d, s = report.meta, report.reconciliation, report.duplicates, report.summary
    out: list[str] = []
    add = out.append
    add(f"# Run report: {m.scenario}, {_date(m.started_at)}")
    add("")
    add(f"**Verdict: {'PASS' if report.passed else 'FAIL'}**"
        + (f": {'; '.join(report.failures)}." if report.failures else
           f": every one of {r.accepted:,} accepted messages is accounted for."))  # fmt: skip
    if report.warnings:
        add("")
        add("Warnings: " + "; ".join(report.warnings) + ".")
    add("")
    facts = [
        f"replicas {m.replicas if m.replicas is not None else NA}",
        f"cores {m.cores if m.cores is not None else NA}",
        f"lease {_s(m.lease_s)}",
        f"duration {_s(s.duration_s)}",
    ]
    if m.host:
        facts.append(f"host `{m.host}`")
    add("Run: " + " · ".join(facts))
    add("")

    add("## Reconciliation")
    add("")
    add("Each accepted id lands in exactly one class from *delivered once* to *lost*.")
    add("")
    add("| class | ids | note |")
    add("| --- | ---: | --- |")
    add(f"| accepted (202 seen) | {r.accepted:,} | union of accepted/*.csv |")
    add(f"| delivered once | {r.delivered_once:,} | |")
    budget = f"{d.budget:,}" + (f" + {d.unknown_kills} unknown" if d.unknown_kills else "")
    add(
        f"| duplicated | {r.duplicated:,} | +{r.extra_deliveries:,} extra deliveries; "
        f"in flight at kills: {budget}; duplicates ≤ in-flight at kills: {_yes_no(d.within)} |"
    )
    add(f"| dead-lettered | {r.dead_lettered:,} | state failed, never delivered |")
    add(f"| still pending | {r.pending:,} | {_by_state(r.pending_by_state) or ''} |")
    add(f"| cancelled | {r.cancelled:,} | not lost: cancelled on purpose or by the test |")
    add(f"| **lost** | **{r.lost:,}** | {_by_state(r.lost_by_state) or 'none'} |")
    add(
        f"| delivered but 202 not seen | {r.unaccepted_ids:,} | {r.unaccepted_deliveries:,} "
        "deliveries; the 202 died with its replica, not an error |"
    )
    if r.delivered_state_mismatch:
        add("")
        add(f"{r.delivered_state_mismatch:,} delivered ids end in a state other than `sent` "
            "(e.g. a retry that failed after a delivery whose ack was lost).")  # fmt: skip
    if report.input_notes:
        add("")
        add("Input notes: " + "; ".join(report.input_notes) + ".")
    add("")

    add("## Faults")
    add("")
    if report.faults:
        add(f"Recovery: the first whole second after the fault ends whose rate, and the mean "
            f"rate of the {ROLLING_WINDOW_S} seconds from it, are ≥ {RECOVERED_FRACTION:.0%} "
            f"of the median over the loaded seconds among the {BASELINE_WINDOW_S} before the "
            "fault; minus the fault's start.")  # fmt: skip
        add("")
        add(
            "| fault | kind | target | at | duration | in-flight | delivery recovery "
            f"| ingest recovery | target met? (kills: lease + {RECOVERY_SLACK_S:g} s; "
            f"outages: resumed within probe max + {OUTAGE_SLACK_S:g} s) |"
        )
        add("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for fr in report.faults:
            add(_fault_row(fr))
    else:
        add("No faults recorded (no faults.json, or an empty one).")
    add("")

    add("## Throughput and latency")
    add("")
    add("| measure | value |")
    add("| --- | ---: |")
    add(f"| run duration | {_s(s.duration_s)} |")
    loaded = f"{s.loaded_s} s (from +{s.loaded_from_s} s)" if s.loaded_from_s is not None else NA
    add(f"| loaded period | {loaded} |")
    add(f"| msgs/s in (accepted, mean over the loaded period) | {_num(s.in_per_s)} |")
    add(f"| msgs/s out (delivered, mean over the loaded period) | {_num(s.out_per_s)} |")
    add(
        f"| end-to-end latency p50 / p99 / max (202 to sink) | {_ms(s.e2e_p50_ms)} / "
        f"{_ms(s.e2e_p99_ms)} / {_ms(s.e2e_max_ms)} |"
    )
    ingest = s.ingest
    add(
        "| ingest latency p50 / p99 (Locust, all requests) | "
        + (f"{_ms(ingest.p50_ms)} / {_ms(ingest.p99_ms)} |" if ingest else f"{NA} |")
    )
    if ingest:
        requests = f"{ingest.requests:,}" if ingest.requests is not None else NA
        failures = f"{ingest.failures:,}" if ingest.failures is not None else NA
        add(f"| HTTP requests / failures (Locust) | {requests} / {failures} |")
    w = report.watchers
    if w is None:
        add(f"| watchers (websocket order) | {NA} (no watchers.json) |")
    else:
        add(
            f"| watchers: followed / events / order violations | "
            f"{w.followed if w.followed is not None else NA} / "
            f"{w.events if w.events is not None else NA} / {w.order_violations} |"
        )
        add(f"| watcher event latency p50 / p99 | {_ms(w.p50_ms)} / {_ms(w.p99_ms)} |")
    if w is not None and w.examples:
        add("")
        add("Order violation examples:")
        add("")
        out.extend(f"- `{e}`" for e in w.examples[:10])
    add("")
    add("![Throughput: accepted/s and delivered/s over time](throughput.png)")
    add("")
    add("![Latency: ingest and end-to-end p99 over time](latency.png)")
    add("")

    add("## Lost ids")
    add("")
    if r.lost_ids:
        shown = r.lost_ids[:LOST_IDS_LISTED]
        add(f"First {len(shown)} of {r.lost:,}, in 202 order:")
        add("")
        out.extend(f"- `{i}`" for i in shown)
    else:
        add("None.")
    add("")

    add("## How to read this")
    add("")
    add(
        "*Accepted* ids are the ones a Locust user saw answered 202; the engine promised to "
        "deliver each of them. Each is matched against the sink's log (deliveries by job id) "
        "and its final state in Redis after draining. *Lost* means accepted, never delivered, "
        "not dead-lettered, not cancelled and not still queued: no record, or marked sent "
        "without the sink seeing it. Any lost id fails the run. *Duplicated* ids were "
        "delivered more than once, which at-least-once delivery allows when a replica is "
        "killed between the SMTP send and the ack, so their extra deliveries are compared "
        "with the jobs the killed replicas held. *Delivered but 202 not seen* are messages "
        "whose 202 never reached the client (its replica died answering); they were "
        "delivered, so nothing is missing. In the plots, dashed vertical lines mark when each "
        "fault started and shaded spans how long it lasted; recovery is measured from the "
        "start, so it is never shorter than the fault itself. Warnings do not fail the run "
        'but deserve a look. "n/a" means the input for that number was missing.'
    )
    add("")
    return "\n".join(out)


# -- CLI ----------------------------------------------------------------------------------


def _summary_lines(report: Report, run_dir: Path) -> list[str]:
    r, d = report.reconciliation, report.duplicates
    lines = [
        report.verdict,
        f"  delivered once {r.delivered_once} · duplicated {r.duplicated} "
        f"(+{r.extra_deliveries}; ≤ in-flight at kills: {_yes_no(d.within).strip('*')}) · "
        f"dead-lettered {r.dead_lettered} · pending {r.pending} · cancelled {r.cancelled} · "
        f"202 not seen {r.unaccepted_ids}",
    ]
    for fr in report.faults:
        target = "" if fr.target_s is None else (
            f", target {fr.target_s:g} s: {_yes_no(fr.within_target).strip('*')}"
        )  # fmt: skip
        lines.append(
            f"  {fr.fault.name}: delivery {_recovery(fr.delivery)}{target}; "
            f"ingest {_recovery(fr.ingest)}"
        )
    lines.append(f"  report: {run_dir / 'report.md'}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.report",
        description="Reconcile a finished load/chaos run directory (see loadtest/RUNDIR.md): "
        "write RUN_DIR/report.md, throughput.png and latency.png and print a short verdict.",
        epilog="exit status: 0 ok; 1 accepted messages lost or watcher order violations; "
        "2 unusable input (e.g. no states.json)",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="the run directory")
    parser.add_argument("--quiet", action="store_true", help="print nothing unless it fails")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = write_report(args.run_dir)
    except InputError as exc:
        print(f"report: cannot reconcile {args.run_dir}: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except OSError as exc:  # unreadable input or unwritable run dir: not "messages lost"
        print(f"report: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    if not args.quiet or not report.passed:
        print("\n".join(_summary_lines(report, args.run_dir)))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
