"""Helpers the flow and events benchmarks share: progress lines, waiting, stopping an
engine, CPU accounting, the work directory, and SIGTERM handling."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

# Progress lines are tagged with the running benchmark's name (set by its main()).
TAG = ["bench"]


def say(text: str) -> None:
    print(f"[{TAG[0]} {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class ScenarioFailed(Exception):
    """A scenario could not produce its numbers (a process died, a wait ran out)."""


def wait_until(
    what: str, done: Callable[[], bool], timeout: float, progress: Callable[[], str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while not done():
        now = time.monotonic()
        if now > deadline:
            raise ScenarioFailed(f"{what}: not done after {timeout:.0f} s")
        if progress is not None and now - last >= 2:
            say("    " + progress())
            last = now
        time.sleep(0.05)


def stop_engine(engine: Any) -> None:
    """SIGTERM an EngineProcess; kill it when it does not stop within 15 s."""
    try:
        engine.stop(timeout=15)
    except subprocess.TimeoutExpired:
        say(f"engine on :{engine.port} did not stop within 15 s after SIGTERM: killing it")
        engine.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def yes(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def target_table(rows: Sequence[tuple[str, str, str, str, bool]]) -> list[str]:
    """Markdown lines of (measurement, measured, detail, target, met) rows."""
    table = ["| measurement | measured | detail | target | met |", "|---|---:|---|---|---|"]
    return table + [f"| {a} | {b} | {c} | {d} | {yes(e)} |" for a, b, c, d, e in rows]


def interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: unwind like Ctrl-C so every process is cleaned up."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def workdir(keep: str | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created) when given, else a temporary directory removed afterwards."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)


def publish(
    lines: list[str], results: dict[str, Any], json_path: str | None, args: Any, started: float
) -> None:
    """The end of a benchmark: its markdown table on stdout, the time taken on stderr,
    and with ``json_path`` everything (args, results, table) as JSON."""
    print("\n" + "\n".join(lines) + "\n", flush=True)
    say(f"total {time.monotonic() - started:.0f} s")
    if json_path:
        doc = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cores": os.cpu_count(),
            "args": vars(args),
            **results,
            "table": lines,
        }
        Path(json_path).write_text(json.dumps(doc, indent=2))
        say(f"wrote {json_path}")
