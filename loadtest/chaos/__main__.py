"""``python -m loadtest.chaos`` (``scripts/chaos``): run chaos scenarios under load.

Each scenario gets its own run directory (OUT/<scenario>/) with the cluster's logs,
Locust's reports, faults.json, states.json, report.md and the plots. At the end a
table of all scenarios; the exit code is 1 if any scenario lost an accepted message
(or a watcher saw events out of order), 2 if one could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from loadtest.chaos.runner import ChaosSettings, run, say
from loadtest.chaos.scenarios import SCENARIOS
from loadtest.report import build_report

LONG = ("kill9-twice", "rolling", "redis-restart", "sink-fail", "sink-slow", "redis-cut")


def main(argv: list[str] | None = None) -> int:
    names = ", ".join(SCENARIOS)
    parser = argparse.ArgumentParser(
        prog="scripts/chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Scenarios: " + "; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values()),
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {names}, or 'all' (default: kill9 and the long ones: {', '.join(LONG)})",
    )
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument(
        "--seconds",
        type=float,
        default=60.0,
        help="load duration per scenario, at least the scenario's minimum (60)",
    )
    parser.add_argument("--users", type=int, default=20, help="Locust users (20)")
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas (2)")
    parser.add_argument("--senders", type=int, default=16, help="sender tasks per replica (16)")
    parser.add_argument(
        "--lease-s",
        type=float,
        default=None,
        help="queue.lease_s of the replicas (default: the engine's, 10 s)",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=120.0,
        help="seconds undelivered accepted messages get after the load (120)",
    )
    parser.add_argument(
        "--weights", help="Locust user weights, e.g. single=4,batch=1,status=2,watch=1"
    )
    parser.add_argument("--wait", help="Locust users' pause between tasks, e.g. 0.1,0.5")
    parser.add_argument(
        "--out", type=Path, default=None, help="parent directory of the run dirs (var/chaos/<time>)"
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="instead of scenarios: the baseline (no fault) with 1 replica, then with "
        "--replicas, alternating --rounds times; prints msgs/s in and out of each and the "
        "ratio of the medians (scale.md in --out)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="--scale: rounds per arm (2)")
    args = parser.parse_args(argv)
    if args.list:
        for s in SCENARIOS.values():
            print(f"{s.name:14} {s.summary} (at least {s.min_seconds:g} s of load)")
        return 0
    chosen = args.scenarios or ["kill9", *LONG]
    if chosen == ["all"]:
        chosen = list(SCENARIOS)
    unknown = [n for n in chosen if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: choose from {names}")
    out = args.out or Path("var/chaos") / time.strftime("%Y%m%d-%H%M%S")
    if args.scale:
        return scale(args, out)
    results: list[tuple[str, int, Path]] = []
    for name in chosen:
        run_dir = out / name
        code = run(
            ChaosSettings(
                SCENARIOS[name],
                run_dir,
                seconds=args.seconds,
                users=args.users,
                replicas=args.replicas,
                senders=args.senders,
                drain_s=args.drain_s,
                weights=args.weights,
                wait=args.wait,
                lease_s=args.lease_s,
            )
        )
        results.append((name, code, run_dir))
    say("summary:")
    for name, code, run_dir in results:
        word = {0: "PASS", 1: "FAIL (lost or out of order)"}.get(code, "could not run")
        print(f"  {name:14} {word:28} {run_dir / 'report.md'}")
    table = summary_table([(name, run_dir) for name, code, run_dir in results if code != 2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return max((c for _, c, _ in results), default=0)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _s(value: float | None) -> str:
    return "not recovered" if value is None else f"{value:.1f}"


def summary_table(runs: list[tuple[str, Path]]) -> list[str]:
    """One markdown row per scenario, from its report."""
    lines = [
        "| scenario | replicas | accepted | msgs/s in / out | e2e p50 / p99 ms "
        "| ingest p50 / p99 ms | lost | duplicates (in flight at kills) "
        "| recovery: delivery / ingest s |",
        "|---|---:|---:|---|---|---|---:|---|---|",
    ]
    for name, run_dir in runs:
        rep = build_report(run_dir)
        rec, summ, dup = rep.reconciliation, rep.summary, rep.duplicates
        ingest = summ.ingest
        recovery = "; ".join(
            f"{_s(f.delivery.recovery_s)} / {_s(f.ingest.recovery_s)}" for f in rep.faults
        )
        lines.append(
            f"| {name} | {rep.meta.replicas} | {rec.accepted:,} | {summ.in_per_s or 0:,.0f} / "
            f"{summ.out_per_s or 0:,.0f} | {_ms(summ.e2e_p50_ms)} / {_ms(summ.e2e_p99_ms)} | "
            f"{_ms(ingest.p50_ms if ingest else None)} / {_ms(ingest.p99_ms if ingest else None)}"
            f" | {rec.lost} | {dup.extra_deliveries} ({dup.budget}) | {recovery or '-'} |"
        )
    return lines


def scale(args: argparse.Namespace, out: Path) -> int:
    """Baseline runs with 1 and with N replicas, alternating; the ratio of the medians."""
    arms = (1, args.replicas)
    rates: dict[int, list[tuple[float, float, float]]] = {n: [] for n in arms}
    worst = 0
    for r in range(args.rounds):
        for n in arms:
            run_dir = out / f"scale-{n}r-{r + 1}"
            code = run(
                ChaosSettings(
                    SCENARIOS["baseline"],
                    run_dir,
                    seconds=args.seconds,
                    users=args.users,
                    replicas=n,
                    senders=args.senders,
                    drain_s=args.drain_s,
                    weights=args.weights,
                    wait=args.wait,
                    lease_s=args.lease_s,
                )
            )
            worst = max(worst, code)
            summary = build_report(run_dir).summary
            rates[n].append(
                (summary.in_per_s or 0.0, summary.out_per_s or 0.0, end_to_end_rate(run_dir))
            )
            say(
                f"scale: {n} replica(s), round {r + 1}: in {rates[n][-1][0]:,.0f} msgs/s, "
                f"out {rates[n][-1][1]:,.0f} msgs/s while loaded, {rates[n][-1][2]:,.0f} "
                f"msgs/s start to last delivery (exit {code})"
            )
    med = {n: statistics.median(o for _, o, _ in rates[n]) for n in arms}
    med_e2e = {n: statistics.median(e for _, _, e in rates[n]) for n in arms}
    lines = [
        f"# Replica scaling: baseline load, {args.users} Locust users, {args.seconds:g} s "
        f"per round, {os.cpu_count()} cores shared by Locust, HAProxy, Redis, the sink and "
        "the replicas",
        "",
        "In / out: msgs/s accepted and delivered while the load ran; end to end: all "
        "deliveries / (last delivery - load start), the drain included.",
        "",
        "| replicas | rounds: in / out / end to end (msgs/s) | median out | median end to end |",
        "|---:|---|---:|---:|",
    ]
    for n in arms:
        runs = ", ".join(f"{i:,.0f} / {o:,.0f} / {e:,.0f}" for i, o, e in rates[n])
        lines.append(f"| {n} | {runs} | {med[n]:,.0f} | {med_e2e[n]:,.0f} |")
    ratio = med[args.replicas] / med[1] if med[1] else float("nan")
    ratio_e2e = med_e2e[args.replicas] / med_e2e[1] if med_e2e[1] else float("nan")
    lines += [
        "",
        f"{args.replicas} replicas deliver {ratio:.2f} x one replica's msgs/s while loaded, "
        f"{ratio_e2e:.2f} x end to end.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return worst


def end_to_end_rate(run_dir: Path) -> float:
    """All deliveries / (last delivery - the load's start), msgs/s."""
    meta = json.loads((run_dir / "meta.json").read_text())
    count, last = 0, 0.0
    with (run_dir / "sink.jsonl").open() as f:
        for line in f:
            if line.endswith("\n"):
                count += 1
                last = max(last, float(json.loads(line)["at"]))
    span = last - float(meta["started_at"])
    return count / span if count and span > 0 else 0.0


if __name__ == "__main__":
    sys.exit(main())
