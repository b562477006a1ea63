"""What one Locust process writes into RUN/ (loadtest/RUNDIR.md): accepted ids and watcher tallies.

``RUN/accepted/<pid>.csv`` gets one ``id,accepted_at`` line per id answered 202, flushed
at least every second and at quit; each watcher process writes ``RUN/watchers/<pid>.json``
and merges every such part into ``RUN/watchers.json`` (``merge_watchers``, also run by
``loadtest.load`` once Locust has exited, so forked ``--processes`` workers add up).
RUN/ comes from the environment variable ``LOAD_RUN_DIR`` (unset: nothing is written).

Plain Python: importing this module imports neither Locust nor gevent (``install`` does,
inside the Locust process), so the pytest process and ``loadtest.load`` may use it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

log = logging.getLogger(__name__)

RUN_DIR_ENV: Final = "LOAD_RUN_DIR"
FLUSH_EVERY_S: Final = 0.5  # the contract says at least once a second
RECENT_IDS: Final = 2000  # ids StatusPoller picks from
LATENCY_SAMPLES: Final = 50_000  # per process, a uniform reservoir
MAX_EXAMPLES: Final = 20


def run_dir_from_env() -> Path | None:
    value = os.environ.get(RUN_DIR_ENV, "")
    return Path(value) if value else None


class AcceptedRecorder:
    """Buffers accepted ids and appends them to ``RUN/accepted/<pid>.csv``.

    The file is opened on the first flush that has something to write, under the pid of
    that moment (a Locust ``--processes`` worker is forked after import). ``recent``
    keeps the last ids for the status pollers.
    """

    def __init__(self, run_dir: Path | None) -> None:
        self.run_dir = run_dir
        self.recent: deque[str] = deque(maxlen=RECENT_IDS)
        self.count = 0
        self._pending: list[str] = []
        self._file: IO[str] | None = None
        self._pid = 0

    @property
    def path(self) -> Path | None:
        if self.run_dir is None:
            return None
        return self.run_dir / "accepted" / f"{os.getpid()}.csv"

    def record(self, ids: Iterable[str], accepted_at: float) -> None:
        stamp = f"{accepted_at:.6f}"
        for job_id in ids:
            self._pending.append(f"{job_id},{stamp}\n")
            self.recent.append(job_id)
            self.count += 1

    def pick_recent(self) -> str | None:
        return random.choice(self.recent) if self.recent else None

    def flush(self) -> None:
        if not self._pending or self.run_dir is None:
            return
        if self._file is None or self._pid != os.getpid():
            path = self.path
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="ascii")
            self._pid = os.getpid()
        lines, self._pending = self._pending, []
        self._file.write("".join(lines))
        self._file.flush()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class WatcherTally:
    """The watchers of one process, added up (greenlets share it; no locking needed)."""

    watchers: int = 0  # Watcher users started
    followed: int = 0  # messages posted and then followed
    finished: int = 0  # followed to sent or failed
    unfinished: int = 0  # gave up (timeout) or the run ended first: not a violation
    events: int = 0  # events received for followed messages
    order_violations: int = 0
    reconnects: int = 0  # connections after the first of a round (drops, close codes)
    connect_failures: int = 0
    close_codes: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)  # sent / failed
    examples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    _seen_latencies: int = 0

    def violation(self, text: str) -> None:
        self.order_violations += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text)

    def latency(self, ms: float) -> None:
        """Keep a uniform sample (reservoir) of at most LATENCY_SAMPLES latencies."""
        self._seen_latencies += 1
        if len(self.latencies_ms) < LATENCY_SAMPLES:
            self.latencies_ms.append(ms)
            return
        slot = random.randrange(self._seen_latencies)
        if slot < LATENCY_SAMPLES:
            self.latencies_ms[slot] = ms

    def part(self) -> dict[str, Any]:
        """This process's share, as written to ``RUN/watchers/<pid>.json``."""
        return {
            "pid": os.getpid(),
            "watchers": self.watchers,
            "followed": self.followed,
            "finished": self.finished,
            "unfinished": self.unfinished,
            "events": self.events,
            "order_violations": self.order_violations,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "close_codes": dict(self.close_codes),
            "outcomes": dict(self.outcomes),
            "examples": list(self.examples),
            "latency_samples_ms": [round(v, 3) for v in self.latencies_ms],
            "latency_seen": self._seen_latencies,
        }


# -- what a watcher checks ------------------------------------------------------------

# Lifecycle: what may follow each state in one message's events (README "States", and
# the Lua scripts: a lease that expires or a replica that shuts down puts a processing
# job back to queued; a rate limit defers a queued one to scheduled; the backoff of a
# retrying one ends in queued).
NEXT: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({"queued"}),
    "queued": frozenset({"processing", "scheduled", "cancelled"}),
    "scheduled": frozenset({"queued", "cancelled"}),
    "processing": frozenset({"sent", "retrying", "failed", "queued"}),
    "retrying": frozenset({"queued", "cancelled"}),
}
FINAL: Final = frozenset({"sent", "failed", "cancelled"})
_EVENT_ID_RE: Final = re.compile(r"^(\d+)-(\d+)(?:\.(\d+))?$")


def event_key(event_id: str) -> tuple[int, int, int]:
    """Sort key of an event id (``ms-seq`` or ``ms-seq.n``), as engine.queue.events has it:
    a bare entry id sorts after the numbered events of its entry. Raises ValueError."""
    m = _EVENT_ID_RE.match(event_id)
    if m is None:
        raise ValueError(f"not an event id: {event_id!r}")
    index = int(m.group(3)) if m.group(3) is not None else 1 << 30
    return int(m.group(1)), int(m.group(2)), index


@dataclass
class _Track:
    state: str | None = None  # the last event's type
    key: tuple[int, int, int] | None = None
    event_id: str = ""


@dataclass(frozen=True)
class Seen:
    ours: bool  # an event of a message still followed
    final: str | None  # sent / failed / cancelled: the message is done
    violations: list[str]


class Followed:
    """The messages of one watcher round, each checked event by event: lifecycle order
    (``NEXT``), strictly increasing event ids, nothing after the final event."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.open: dict[str, _Track] = {job_id: _Track() for job_id in ids}
        self.done: set[str] = set()

    def see(self, event: Mapping[str, Any]) -> Seen:
        job_id = str(event.get("id"))
        kind = str(event.get("type"))
        event_id = str(event.get("event_id"))
        track = self.open.get(job_id)
        if track is None:
            if job_id in self.done:
                return Seen(False, None, [f"{job_id}: {kind} ({event_id}) after its final event"])
            return Seen(False, None, [])  # not followed (the id filter keeps these out)
        problems: list[str] = []
        try:
            key: tuple[int, int, int] | None = event_key(event_id)
        except ValueError:
            problems.append(f"{job_id}: malformed event_id {event_id!r}")
            key = track.key
        if key is not None and track.key is not None and key <= track.key:
            problems.append(f"{job_id}: event_id {event_id} not after {track.event_id}")
        if kind not in NEXT.get(track.state, frozenset()):
            problems.append(f"{job_id}: {track.state or 'start'} -> {kind} ({event_id})")
        track.state, track.key, track.event_id = kind, key, event_id
        if kind in FINAL:
            del self.open[job_id]
            self.done.add(job_id)
            return Seen(True, kind, problems)
        return Seen(True, None, problems)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def write_part(run_dir: Path, tally: WatcherTally) -> None:
    write_json(run_dir / "watchers" / f"{os.getpid()}.json", tally.part())


_COUNTS: Final = (
    "watchers",
    "followed",
    "finished",
    "unfinished",
    "events",
    "order_violations",
    "reconnects",
    "connect_failures",
)


def merge_watchers(run_dir: Path) -> dict[str, Any]:
    """Add up ``RUN/watchers/*.json`` into ``RUN/watchers.json`` (zeros when there is no
    part) and return it. Latency percentiles come from the pooled samples (each part's
    sample weighted alike: exact while a process saw at most LATENCY_SAMPLES events)."""
    total: dict[str, Any] = dict.fromkeys(_COUNTS, 0)
    close_codes: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    examples: list[str] = []
    samples: list[float] = []
    for part_file in sorted((run_dir / "watchers").glob("*.json")):
        try:
            part = json.loads(part_file.read_text())
        except (OSError, ValueError) as exc:
            log.warning("load.watchers.bad_part path=%s error=%s", part_file, exc)
            continue
        for key in _COUNTS:
            total[key] += int(part.get(key, 0))
        close_codes.update(part.get("close_codes", {}))
        outcomes.update(part.get("outcomes", {}))
        examples += part.get("examples", [])
        samples += part.get("latency_samples_ms", [])
    merged: dict[str, Any] = {
        **total,
        "examples": examples[:MAX_EXAMPLES],
        "latency_ms": {
            "p50": round(percentile(samples, 50), 3),
            "p99": round(percentile(samples, 99), 3),
            "max": round(max(samples, default=0.0), 3),
        },
        "close_codes": dict(close_codes),
        "outcomes": dict(outcomes),
    }
    write_json(run_dir / "watchers.json", merged)
    return merged


def read_accepted(run_dir: Path) -> dict[str, float]:
    """Every id of ``RUN/accepted/*.csv`` with its accepted_at (a partial last line, from
    a process killed mid-write, is skipped)."""
    out: dict[str, float] = {}
    for csv_file in sorted((run_dir / "accepted").glob("*.csv")):
        for line in csv_file.read_text(encoding="ascii").split("\n"):
            job_id, sep, at = line.partition(",")
            if not sep:
                continue
            try:
                out[job_id] = float(at)
            except ValueError:
                continue
    return out


# -- one recorder and one tally per Locust process ------------------------------------

RECORDER = AcceptedRecorder(run_dir_from_env())
TALLY = WatcherTally()


def _finish(*, final: bool) -> None:
    if final:
        RECORDER.close()
    else:
        RECORDER.flush()
    run_dir = RECORDER.run_dir
    if run_dir is None:
        return
    if TALLY.watchers:
        write_part(run_dir, TALLY)
    merge_watchers(run_dir)


def install(events: Any) -> None:
    """Wire the recorder to Locust's ``events``: a flusher greenlet from ``init``; flush
    and write the watcher files at ``test_stop`` and ``quitting``."""
    import gevent

    def flusher() -> None:
        while True:
            gevent.sleep(FLUSH_EVERY_S)
            try:
                RECORDER.flush()
            except OSError as exc:  # a full disk must not kill the load
                log.warning("load.accepted.flush_failed error=%s", exc)

    def on_init(**_: Any) -> None:
        if RECORDER.run_dir is None:
            log.warning(
                "load.recorder.off: %s is not set, accepted ids are not written", RUN_DIR_ENV
            )
        gevent.spawn(flusher)

    events.init.add_listener(on_init)
    events.test_stop.add_listener(lambda **_: _finish(final=False))
    events.quitting.add_listener(lambda **_: _finish(final=True))
