"""Reconciliation of a finished run: parse the run directory's texts, compute every number.

Pure functions (text in, frozen records out); no file I/O, no matplotlib, nothing from the
engine, so the chaos code and the tests can call them on anything. See loadtest/RUNDIR.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Final states (states.json) that mean "the engine still owns it": not lost, not done.
PENDING_STATES = frozenset({"queued", "scheduled", "processing", "retrying"})
# Fault kinds whose ``in_flight`` jobs may legitimately be delivered twice (no ack sent).
DUPLICATING_KINDS = frozenset({"kill9"})
# Fault kinds held to "back to full throughput within lease_s + 5 s".
KILL_KINDS = frozenset({"kill9", "sigterm"})
# Slack added to lease_s for the recovery target (seconds).
RECOVERY_SLACK_S = 5.0
# Transport outages: no attempt may be spent on them (nothing dead-lettered), and delivery
# must resume within the breaker's longest probe interval + this slack (seconds) of the
# server's return.
OUTAGE_KINDS = frozenset({"smtp-outage"})
OUTAGE_SLACK_S = 2.0
# Seconds before a fault whose delivered/s median is the baseline.
BASELINE_WINDOW_S = 15
# Rolling-mean width (seconds) and the fraction of baseline that counts as recovered.
ROLLING_WINDOW_S = 3
RECOVERED_FRACTION = 0.9
# An unterminated last accepted line is kept only if its timestamp is no earlier than
# this before the run started: cutting digits off a Unix time shrinks it by 10x or more.
TRUNCATION_GUARD_S = 3600.0


class InputError(ValueError):
    """An input the report cannot be built from (maps to exit status 2)."""


# -- parsed inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    """The fields of meta.json the report uses."""

    scenario: str
    started_at: float
    ended_at: float | None = None
    lease_s: float | None = None
    breaker_probe_max_s: float | None = None
    replicas: int | None = None
    cores: int | None = None
    host: str | None = None


@dataclass(frozen=True)
class Fault:
    """One entry of faults.json (times are Unix seconds)."""

    name: str
    kind: str
    target: str
    at: float
    until: float | None = None
    in_flight: int | None = None

    @property
    def end(self) -> float:
        """When the fault stopped acting: ``until``, or ``at`` for instant faults."""
        return self.until if self.until is not None and self.until >= self.at else self.at


@dataclass(frozen=True)
class AcceptedLog:
    """The union of accepted/*.csv."""

    # id -> earliest accepted_at (Unix seconds).
    accepted_at: dict[str, float]
    # Ids answered 202 more than once (within or across files), with how many times.
    repeated: dict[str, int] = field(default_factory=dict)
    # Unterminated last lines that could not be trusted (dropped).
    truncated_lines: int = 0
    # Terminated lines that did not parse (dropped).
    malformed_lines: int = 0


@dataclass(frozen=True)
class Delivery:
    """One sink.jsonl line."""

    at: float
    job_id: str | None


@dataclass(frozen=True)
class SinkLog:
    deliveries: tuple[Delivery, ...]
    truncated_lines: int = 0
    malformed_lines: int = 0


@dataclass(frozen=True)
class HistoryRow:
    """One ``Aggregated`` row of locust_stats_history.csv (None where Locust wrote N/A)."""

    timestamp: float
    requests_per_s: float | None
    failures_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class IngestStats:
    """The ``Aggregated`` row of locust_stats.csv."""

    requests: int | None
    failures: int | None
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Watchers:
    watchers: int | None
    followed: int | None
    events: int | None
    order_violations: int
    examples: tuple[str, ...]
    p50_ms: float | None
    p99_ms: float | None


# -- parsing --------------------------------------------------------------------------------


def _lines(text: str) -> tuple[list[str], str | None]:
    """Complete lines, and the unterminated tail (None when the text ends with a newline)."""
    parts = text.split("\n")
    tail = parts.pop()
    return [p.rstrip("\r") for p in parts], (tail.rstrip("\r") or None)


def _float(value: Any) -> float | None:
    """A finite float, or None (for "N/A", "", null, garbage)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _json_object(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc}") from None


def parse_meta(text: str) -> Meta:
    raw = _json_object(text, "meta.json")
    if not isinstance(raw, dict):
        raise InputError("meta.json must be a JSON object")
    started_at = _float(raw.get("started_at"))
    if started_at is None:
        raise InputError("meta.json has no numeric started_at")
    return Meta(
        scenario=str(raw.get("scenario") or "unknown"),
        started_at=started_at,
        ended_at=_float(raw.get("ended_at")),
        lease_s=_float(raw.get("lease_s")),
        breaker_probe_max_s=_float(raw.get("breaker_probe_max_s")),
        replicas=_int(raw.get("replicas")),
        cores=_int(raw.get("cores")),
        host=str(raw["host"]) if raw.get("host") is not None else None,
    )


def _accepted_line(line: str) -> tuple[str, float] | None:
    parts = line.split(",")
    if len(parts) != 2:
        return None
    job_id, at = parts[0].strip(), _float(parts[1].strip())
    if not job_id or at is None:
        return None
    return job_id, at


def parse_accepted(texts: Iterable[str], *, started_at: float) -> AcceptedLog:
    """Union of accepted/*.csv texts (one per Locust process)."""
    accepted_at: dict[str, float] = {}
    seen: Counter[str] = Counter()
    truncated = malformed = 0
    for text in texts:
        lines, tail = _lines(text)
        rows: list[tuple[str, float]] = []
        for line in lines:
            if not line.strip() or line.strip() == "id,accepted_at":
                continue
            row = _accepted_line(line)
            if row is None:
                malformed += 1
            else:
                rows.append(row)
        if tail is not None:
            # A killed writer may leave half a line. The id comes first, so a line with
            # its comma has a whole id; only the timestamp can be short, which the guard
            # catches ("1732300000.25" cut to "17323" is years before the run).
            row = _accepted_line(tail)
            if row is not None and row[1] >= started_at - TRUNCATION_GUARD_S:
                rows.append(row)
            else:
                truncated += 1
        for job_id, at in rows:
            seen[job_id] += 1
            if job_id not in accepted_at or at < accepted_at[job_id]:
                accepted_at[job_id] = at
    repeated = {job_id: n for job_id, n in seen.items() if n > 1}
    return AcceptedLog(accepted_at, repeated, truncated, malformed)


def _delivery(line: str) -> Delivery | None:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(raw, dict):
        return None
    at = _float(raw.get("at"))
    if at is None:
        return None
    job_id = raw.get("job_id")
    return Delivery(at, job_id if isinstance(job_id, str) and job_id else None)


def parse_sink(text: str) -> SinkLog:
    """sink.jsonl: one delivery a line; a cut-off last line is counted, not fatal."""
    lines, tail = _lines(text)
    deliveries: list[Delivery] = []
    malformed = truncated = 0
    for line in lines:
        if not line.strip():
            continue
        delivery = _delivery(line)
        if delivery is None:
            malformed += 1
        else:
            deliveries.append(delivery)
    if tail is not None and tail.strip():
        delivery = _delivery(tail)  # a whole object that only lacks its newline is fine
        if delivery is None:
            truncated += 1
        else:
            deliveries.append(delivery)
    return SinkLog(tuple(deliveries), truncated, malformed)


def parse_states(text: str) -> dict[str, str]:
    raw = _json_object(text, "states.json")
    if not isinstance(raw, dict):
        raise InputError("states.json must be a JSON object of id -> state")
    return {str(k): str(v) for k, v in raw.items()}


def parse_faults(text: str) -> list[Fault]:
    raw = _json_object(text, "faults.json")
    if not isinstance(raw, list):
        raise InputError("faults.json must be a JSON list")
    faults: list[Fault] = []
    for i, item in enumerate(raw):
        at = _float(item.get("at")) if isinstance(item, dict) else None
        if not isinstance(item, dict) or at is None:
            raise InputError(f"faults.json entry {i} has no numeric 'at'")
        faults.append(
            Fault(
                name=str(item.get("name") or f"fault-{i + 1}"),
                kind=str(item.get("kind") or "unknown"),
                target=str(item.get("target") or ""),
                at=at,
                until=_float(item.get("until")),
                in_flight=_int(item.get("in_flight")),
            )
        )
    return sorted(faults, key=lambda f: f.at)


def _csv_rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    # A cut-off last row has missing cells (None); callers drop rows missing what they need.
    return [{k: v for k, v in row.items() if k is not None and v is not None} for row in reader]


def parse_history(text: str) -> list[HistoryRow]:
    """The ``Aggregated`` rows of locust_stats_history.csv."""
    rows: list[HistoryRow] = []
    for row in _csv_rows(text):
        timestamp = _float(row.get("Timestamp"))
        if row.get("Name") != "Aggregated" or timestamp is None:
            continue
        rows.append(
            HistoryRow(
                timestamp=timestamp,
                requests_per_s=_float(row.get("Requests/s")),
                failures_per_s=_float(row.get("Failures/s")),
                p50_ms=_float(row.get("50%")),
                p99_ms=_float(row.get("99%")),
            )
        )
    return rows


def parse_locust_stats(text: str) -> IngestStats | None:
    """The ``Aggregated`` row of locust_stats.csv, or None when there is none."""
    for row in _csv_rows(text):
        if row.get("Name") == "Aggregated":
            return IngestStats(
                requests=_int(row.get("Request Count")),
                failures=_int(row.get("Failure Count")),
                p50_ms=_float(row.get("50%")),
                p99_ms=_float(row.get("99%")),
            )
    return None


def parse_watchers(text: str) -> Watchers:
    raw = _json_object(text, "watchers.json")
    if not isinstance(raw, dict):
        raise InputError("watchers.json must be a JSON object")
    latency = raw.get("latency_ms")
    latency = latency if isinstance(latency, dict) else {}
    examples = raw.get("examples")
    examples = examples if isinstance(examples, list) else []
    return Watchers(
        watchers=_int(raw.get("watchers")),
        followed=_int(raw.get("followed")),
        events=_int(raw.get("events")),
        order_violations=_int(raw.get("order_violations")) or 0,
        examples=tuple(str(e) for e in examples),
        p50_ms=_float(latency.get("p50")),
        p99_ms=_float(latency.get("p99")),
    )


# -- reconciliation -----------------------------------------------------------------------


@dataclass(frozen=True)
class Reconciliation:
    """Every accepted id in exactly one class (delivered_once ... lost)."""

    accepted: int
    delivered_once: int
    duplicated: int  # ids delivered more than once
    extra_deliveries: int  # deliveries beyond the first, summed over duplicated ids
    dead_lettered: int  # state failed, never delivered
    pending: int  # never delivered, engine still holds it (queued/scheduled/...)
    cancelled: int
    lost: int
    # Lost ids in 202 order, and why: their state ("missing", "sent", or anything unknown).
    lost_ids: tuple[str, ...]
    lost_by_state: dict[str, int]
    pending_by_state: dict[str, int]
    # Deliveries of ids no 202 was seen for (the 202 died with a replica: not an error).
    unaccepted_ids: int
    unaccepted_deliveries: int
    # Deliveries whose message carried no job id header.
    deliveries_without_id: int
    # Delivered ids whose final state is not "sent" (informational: e.g. a failed retry
    # after a delivery whose ack was lost).
    delivered_state_mismatch: int
    # Ids in states.json with no 202 seen.
    states_not_accepted: int

    @property
    def delivered(self) -> int:
        """Accepted ids delivered at least once."""
        return self.delivered_once + self.duplicated


def delivery_counts(deliveries: Iterable[Delivery]) -> Counter[str]:
    return Counter(d.job_id for d in deliveries if d.job_id is not None)


def reconcile(
    accepted_at: Mapping[str, float],
    counts: Mapping[str, int],
    states: Mapping[str, str],
    *,
    deliveries_without_id: int = 0,
) -> Reconciliation:
    once = duplicated = extra = dead = pending = cancelled = mismatch = 0
    lost: list[str] = []
    lost_by_state: Counter[str] = Counter()
    pending_by_state: Counter[str] = Counter()
    for job_id in accepted_at:
        n = counts.get(job_id, 0)
        state = states.get(job_id, "missing")
        if n >= 1:
            if n == 1:
                once += 1
            else:
                duplicated += 1
                extra += n - 1
            if state != "sent":
                mismatch += 1
        elif state == "failed":
            dead += 1
        elif state in PENDING_STATES:
            pending += 1
            pending_by_state[state] += 1
        elif state == "cancelled":
            cancelled += 1
        else:
            lost.append(job_id)
            lost_by_state[state] += 1
    lost.sort(key=lambda i: (accepted_at[i], i))
    unaccepted = {i: n for i, n in counts.items() if i not in accepted_at and n > 0}
    return Reconciliation(
        accepted=len(accepted_at),
        delivered_once=once,
        duplicated=duplicated,
        extra_deliveries=extra,
        dead_lettered=dead,
        pending=pending,
        cancelled=cancelled,
        lost=len(lost),
        lost_ids=tuple(lost),
        lost_by_state=dict(lost_by_state.most_common()),
        pending_by_state=dict(pending_by_state.most_common()),
        unaccepted_ids=len(unaccepted),
        unaccepted_deliveries=sum(unaccepted.values()),
        deliveries_without_id=deliveries_without_id,
        delivered_state_mismatch=mismatch,
        states_not_accepted=sum(1 for i in states if i not in accepted_at),
    )


@dataclass(frozen=True)
class DuplicateBudget:
    """Extra deliveries against the jobs killed replicas held (kill9 ``in_flight``)."""

    extra_deliveries: int
    budget: int  # sum of the known in_flight values
    unknown_kills: int  # kill faults with in_flight null
    within: bool | None  # None: over the known budget but some in_flight is unknown


def duplicate_budget(extra_deliveries: int, faults: Sequence[Fault]) -> DuplicateBudget:
    kills = [f for f in faults if f.kind in DUPLICATING_KINDS]
    budget = sum(f.in_flight for f in kills if f.in_flight is not None)
    unknown = sum(1 for f in kills if f.in_flight is None)
    within: bool | None = extra_deliveries <= budget
    if not within and unknown:
        within = None
    return DuplicateBudget(extra_deliveries, budget, unknown, within)


# -- statistics and time series -----------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def first_deliveries(deliveries: Iterable[Delivery]) -> dict[str, float]:
    """job_id -> time of its first delivery."""
    first: dict[str, float] = {}
    for d in deliveries:
        if d.job_id is not None and (d.job_id not in first or d.at < first[d.job_id]):
            first[d.job_id] = d.at
    return first


def e2e_latencies_ms(
    accepted_at: Mapping[str, float], first_delivery: Mapping[str, float]
) -> dict[str, float]:
    """Accepted id -> first delivery minus 202 (ms). Can be slightly negative: the sink may
    see the message before the client sees its 202."""
    return {
        i: (first_delivery[i] - at) * 1000.0 for i, at in accepted_at.items() if i in first_delivery
    }


@dataclass(frozen=True)
class Series:
    """Per-second series; index s covers [started_at + s, started_at + s + 1)."""

    started_at: float
    accepted: tuple[int, ...]
    delivered: tuple[int, ...]  # every sink line, duplicates and unaccepted ids included
    e2e_p50_ms: tuple[float | None, ...]  # by second of (first) delivery
    e2e_p99_ms: tuple[float | None, ...]
    requests_per_s: tuple[float | None, ...]  # Locust, None without history
    failures_per_s: tuple[float | None, ...]
    ingest_p50_ms: tuple[float | None, ...]
    ingest_p99_ms: tuple[float | None, ...]
    has_history: bool

    def __len__(self) -> int:
        return len(self.accepted)

    @property
    def loaded(self) -> tuple[bool, ...]:
        """Seconds with load: something was accepted, or Locust was sending."""
        return tuple(
            a > 0 or (r is not None and r > 0)
            for a, r in zip(self.accepted, self.requests_per_s, strict=True)
        )


def build_series(
    meta: Meta,
    accepted_at: Mapping[str, float],
    deliveries: Sequence[Delivery],
    history: Sequence[HistoryRow] = (),
) -> Series:
    t0 = meta.started_at
    first = first_deliveries(deliveries)
    latest = [meta.ended_at or t0, *accepted_at.values(), *(d.at for d in deliveries)]
    latest += [h.timestamp for h in history]
    n = math.floor(max(latest) - t0) + 1 if max(latest) >= t0 else 1

    def bucket(at: float) -> int | None:
        s = math.floor(at - t0)
        return s if 0 <= s < n else None

    accepted = [0] * n
    for at in accepted_at.values():
        if (s := bucket(at)) is not None:
            accepted[s] += 1
    delivered = [0] * n
    for d in deliveries:
        if (s := bucket(d.at)) is not None:
            delivered[s] += 1
    latencies: list[list[float]] = [[] for _ in range(n)]
    for job_id, ms in e2e_latencies_ms(accepted_at, first).items():
        if (s := bucket(first[job_id])) is not None:
            latencies[s].append(ms)
    rows: dict[int, HistoryRow] = {}
    for h in sorted(history, key=lambda h: h.timestamp):
        if (s := bucket(h.timestamp)) is not None:
            rows[s] = h  # several rows in one second: the last one wins

    def column(name: str) -> tuple[float | None, ...]:
        return tuple(getattr(rows[s], name) if s in rows else None for s in range(n))

    return Series(
        started_at=t0,
        accepted=tuple(accepted),
        delivered=tuple(delivered),
        e2e_p50_ms=tuple(percentile(v, 50) for v in latencies),
        e2e_p99_ms=tuple(percentile(v, 99) for v in latencies),
        requests_per_s=column("requests_per_s"),
        failures_per_s=column("failures_per_s"),
        ingest_p50_ms=column("p50_ms"),
        ingest_p99_ms=column("p99_ms"),
        has_history=bool(rows),
    )


# -- recovery -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """How long a rate took to come back after a fault (None: could not tell / never)."""

    baseline: float | None  # median rate over the loaded seconds before the fault
    recovered_s: int | None  # series index of the first recovered second
    recovery_s: float | None  # recovered second minus the fault's start

    @property
    def status(self) -> str:
        if self.baseline is None or self.baseline <= 0:
            return "no baseline"
        if self.recovery_s is None:
            return "not recovered"
        return "recovered"


def recovery(
    rate: Sequence[float],
    loaded: Sequence[bool],
    at_s: float,
    end_s: float,
    *,
    baseline_window_s: int = BASELINE_WINDOW_S,
    rolling_s: int = ROLLING_WINDOW_S,
    fraction: float = RECOVERED_FRACTION,
) -> Recovery:
    """Recovery of ``rate`` after a fault that started at ``at_s`` and ended at ``end_s``
    (seconds since the run started).

    baseline: median over the whole, loaded seconds in the ``baseline_window_s`` before
    ``at_s``; recovered: first whole second at or after ``end_s`` that is itself at least
    ``fraction`` x baseline and from which the mean of the next ``rolling_s`` seconds is too.
    """
    before = math.floor(at_s)  # seconds [before - window, before) end before the fault
    first = max(0, before - baseline_window_s)
    window = [rate[s] for s in range(first, min(before, len(rate))) if loaded[s]]
    if not window:
        return Recovery(None, None, None)
    baseline = float(statistics.median(window))
    if baseline <= 0:
        return Recovery(baseline, None, None)
    floor = fraction * baseline
    for s in range(max(0, math.ceil(end_s)), len(rate) - rolling_s + 1):
        # The second itself must be back too: otherwise a dead second followed by the
        # backlog's burst would count as recovered a second early.
        if rate[s] >= floor and sum(rate[s : s + rolling_s]) / rolling_s >= floor:
            return Recovery(baseline, s, s - at_s)
    return Recovery(baseline, None, None)


@dataclass(frozen=True)
class FaultResult:
    fault: Fault
    at_s: float  # since the run started
    duration_s: float | None  # None for instant faults (until null)
    delivery: Recovery
    ingest: Recovery
    # kills: lease_s + 5 (back to full throughput, from the fault's start); outages:
    # probe max + 2 (first delivery, from the fault's end); else None
    target_s: float | None
    within_target: bool | None  # None: no target, or no baseline
    resumed_s: float | None = None  # outages: first delivery after the end, from the end


def resumed_after(delivered: Sequence[float], end_s: float) -> float | None:
    """Seconds from ``end_s`` to the end of the first whole second after it with a
    delivery (an upper bound at one-second resolution); None if none came."""
    for s in range(max(0, math.floor(end_s)), len(delivered)):
        if delivered[s] > 0:
            return max(0.0, s + 1 - end_s)
    return None


def fault_results(
    series: Series,
    faults: Sequence[Fault],
    lease_s: float | None,
    probe_max_s: float | None = None,
) -> list[FaultResult]:
    loaded = series.loaded
    delivered = [float(x) for x in series.delivered]
    accepted = [float(x) for x in series.accepted]
    results: list[FaultResult] = []
    for f in faults:
        at_s, end_s = f.at - series.started_at, f.end - series.started_at
        delivery = recovery(delivered, loaded, at_s, end_s)
        ingest = recovery(accepted, loaded, at_s, end_s)
        target = (
            lease_s + RECOVERY_SLACK_S if f.kind in KILL_KINDS and lease_s is not None else None
        )
        within: bool | None = None
        if target is not None and delivery.status != "no baseline":
            within = delivery.recovery_s is not None and delivery.recovery_s <= target
        resumed = None
        if f.kind in OUTAGE_KINDS and probe_max_s is not None:
            target = probe_max_s + OUTAGE_SLACK_S
            resumed = resumed_after(delivered, end_s)
            within = resumed is not None and resumed <= target
        duration = f.until - f.at if f.until is not None else None
        results.append(FaultResult(f, at_s, duration, delivery, ingest, target, within, resumed))
    return results


# -- overall ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    duration_s: float | None  # meta ended_at - started_at
    loaded_s: int  # first to last second with load, inclusive
    loaded_from_s: int | None
    in_per_s: float | None  # accepted per second over the loaded period
    out_per_s: float | None  # sink deliveries per second over the same period
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    e2e_max_ms: float | None
    ingest: IngestStats | None


def summarize(
    meta: Meta, series: Series, latencies_ms: Iterable[float], ingest: IngestStats | None
) -> Summary:
    loaded = [s for s, busy in enumerate(series.loaded) if busy]
    lat = list(latencies_ms)
    duration = meta.ended_at - meta.started_at if meta.ended_at is not None else None
    if loaded:
        lo, hi = loaded[0], loaded[-1]
        span = hi - lo + 1
        in_per_s: float | None = sum(series.accepted[lo : hi + 1]) / span
        out_per_s: float | None = sum(series.delivered[lo : hi + 1]) / span
    else:
        lo, span, in_per_s, out_per_s = 0, 0, None, None
    return Summary(
        duration_s=duration,
        loaded_s=span,
        loaded_from_s=lo if loaded else None,
        in_per_s=in_per_s,
        out_per_s=out_per_s,
        e2e_p50_ms=percentile(lat, 50),
        e2e_p99_ms=percentile(lat, 99),
        e2e_max_ms=max(lat) if lat else None,
        ingest=ingest,
    )


# -- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunData:
    """Everything read from a run directory, parsed; optional files are None when absent."""

    meta: Meta
    accepted: AcceptedLog
    sink: SinkLog
    states: dict[str, str]
    faults: list[Fault] = field(default_factory=list)
    history: list[HistoryRow] | None = None
    locust_stats: IngestStats | None = None
    watchers: Watchers | None = None


@dataclass(frozen=True)
class Report:
    """The numbers of one run's reconciliation; ``exit_code`` is the CLI's exit status."""

    meta: Meta
    reconciliation: Reconciliation
    duplicates: DuplicateBudget
    faults: tuple[FaultResult, ...]
    summary: Summary
    series: Series
    watchers: Watchers | None
    # Why the run fails (lost ids, order violations); empty when it passes.
    failures: tuple[str, ...]
    # Worth a look but not a failure (over the duplicate budget, missed recovery target...).
    warnings: tuple[str, ...]
    # What was dropped or missing from the inputs.
    input_notes: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @property
    def verdict(self) -> str:
        r = self.reconciliation
        head = f"{'PASS' if self.passed else 'FAIL'}: {r.accepted} accepted, {r.lost} lost"
        if self.failures:
            head += " (" + "; ".join(self.failures) + ")"
        if self.warnings:
            head += "; warnings: " + "; ".join(self.warnings)
        return head


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def assemble(data: RunData) -> Report:
    """The whole report from parsed inputs."""
    meta = data.meta
    counts = delivery_counts(data.sink.deliveries)
    no_id = sum(1 for d in data.sink.deliveries if d.job_id is None)
    rec = reconcile(data.accepted.accepted_at, counts, data.states, deliveries_without_id=no_id)
    budget = duplicate_budget(rec.extra_deliveries, data.faults)
    series = build_series(meta, data.accepted.accepted_at, data.sink.deliveries, data.history or ())
    results = fault_results(series, data.faults, meta.lease_s, meta.breaker_probe_max_s)
    latencies = e2e_latencies_ms(data.accepted.accepted_at, first_deliveries(data.sink.deliveries))
    summary = summarize(meta, series, latencies.values(), data.locust_stats)

    failures: list[str] = []
    if rec.lost:
        failures.append(f"{_plural(rec.lost, 'accepted message')} lost")
    if rec.dead_lettered and any(f.kind in OUTAGE_KINDS for f in data.faults):
        failures.append(
            f"{_plural(rec.dead_lettered, 'message')} dead-lettered through a transport outage"
        )
    if data.watchers is not None and data.watchers.order_violations:
        failures.append(f"{_plural(data.watchers.order_violations, 'watcher order violation')}")

    warnings: list[str] = []
    if rec.accepted == 0:
        warnings.append("nothing was accepted, so nothing could be lost")
    if budget.within is False:
        warnings.append(
            f"{rec.extra_deliveries} duplicate deliveries exceed the {budget.budget} jobs "
            "in flight at kills"
        )
    elif budget.within is None:
        warnings.append(
            f"{rec.extra_deliveries} duplicate deliveries; in-flight unknown for "
            f"{_plural(budget.unknown_kills, 'kill')}"
        )
    if rec.pending:
        warnings.append(f"{rec.pending} still pending at the end")
    for fr in results:
        if fr.within_target is False:
            what = (
                f"breaker probe max + {OUTAGE_SLACK_S:g} s"
                if fr.fault.kind in OUTAGE_KINDS
                else f"lease_s + {RECOVERY_SLACK_S:g} s"
            )
            warnings.append(f"{fr.fault.name} missed the {what} target")
    if data.accepted.repeated:
        warnings.append(f"{_plural(len(data.accepted.repeated), 'id')} answered 202 more than once")

    notes: list[str] = []
    if data.accepted.truncated_lines:
        notes.append(
            f"accepted/*.csv: {_plural(data.accepted.truncated_lines, 'cut-off last line')} dropped"
        )
    if data.accepted.malformed_lines:
        notes.append(
            f"accepted/*.csv: {_plural(data.accepted.malformed_lines, 'malformed line')} dropped"
        )
    if data.sink.truncated_lines:
        notes.append(
            f"sink.jsonl: {_plural(data.sink.truncated_lines, 'cut-off last line')} dropped"
        )
    if data.sink.malformed_lines:
        notes.append(f"sink.jsonl: {_plural(data.sink.malformed_lines, 'malformed line')} dropped")
    if no_id:
        notes.append(f"sink.jsonl: {_plural(no_id, 'delivery')} without a job id (not counted)")
    if rec.states_not_accepted:
        notes.append(
            f"states.json: {_plural(rec.states_not_accepted, 'id')} with no 202 seen (ignored)"
        )
    if data.history is None:
        notes.append("locust_stats_history.csv missing: no ingest series")
    elif not series.has_history:
        notes.append("locust_stats_history.csv has no Aggregated rows in the run window")
    if data.locust_stats is None:
        notes.append("locust_stats.csv missing or without an Aggregated row")
    if meta.ended_at is None:
        notes.append("meta.json has no ended_at: run duration unknown")
    if meta.lease_s is None and any(f.kind in KILL_KINDS for f in data.faults):
        notes.append("meta.json has no lease_s: recovery target not checked")
    return Report(
        meta=meta,
        reconciliation=rec,
        duplicates=budget,
        faults=tuple(results),
        summary=summary,
        series=series,
        watchers=data.watchers,
        failures=tuple(failures),
        warnings=tuple(warnings),
        input_notes=tuple(notes),
    )
