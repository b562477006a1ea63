"""``python -m loadtest.chaos`` (``scripts/chaos``): run chaos scenarios under load.

Each scenario gets its own run directory (OUT/<scenario>/) with the cluster's logs,
Locust's reports, faults.json, states.json, report.md and the plots. At the end a
table of all scenarios; the exit code is 1 if any scenario lost an accepted message
(or a watcher saw events out of order), 2 if one could not run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loadtest.chaos.runner import ChaosSettings, run, say
from loadtest.chaos.scenarios import SCENARIOS

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
    return max((c for _, c, _ in results), default=0)


if __name__ == "__main__":
    sys.exit(main())
