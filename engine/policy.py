"""Pure decisions: token-bucket arithmetic, retry backoff, failure classification.

Everything here is a function of its inputs and ``now``; no I/O, no clocks read.
Imports only leaves.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from engine.config import RouteRule

Outcome = Literal["retry", "dead"]


@dataclass(frozen=True, slots=True)
class TokenBucket:
    """A process-local bucket: tokens available at time ``at`` (seconds, any origin)."""

    tokens: float
    at: float


def bucket_take(
    state: TokenBucket, *, now: float, rate_per_s: float, burst: float, n: float = 1.0
) -> tuple[TokenBucket, float]:
    """Take ``n`` tokens; return the new state and how long to wait before proceeding.

    The tokens are reserved at once (the balance may go negative), so concurrent
    takers queue up fairly behind each other instead of all waking at the same moment.
    ``rate_per_s <= 0`` means unlimited: never wait.
    """
    if rate_per_s <= 0:
        return state, 0.0
    tokens = min(burst, state.tokens + (now - state.at) * rate_per_s) - n
    wait = 0.0 if tokens >= 0 else -tokens / rate_per_s
    return TokenBucket(tokens, now), wait


def recovered_rate(
    rate: float | None, rate_at_ms: float | None, limit: float, now_ms: float, recovery: float
) -> float:
    """The rate in force at ``now_ms``: the stored (slowed) rate plus additive recovery
    since it was stored, capped at the limit. claim.lua does the same arithmetic in Lua
    (atomically with the take); tests/test_flow.py holds the two to the same numbers."""
    if rate is None or rate >= limit:
        return limit
    elapsed = max(0.0, now_ms - (rate_at_ms if rate_at_ms is not None else now_ms))
    return min(limit, rate + limit * recovery * elapsed / 1000)


def lane_pattern(weights: dict[str, int]) -> str:
    """Claim-slot pattern for lane weights, one letter per slot (h, n, l), spread out by
    smooth weighted round-robin: {high: 6, normal: 3, low: 1} -> 'hnhhlhnhhn'-like, so a
    lane's turns are evenly spaced rather than bunched."""
    lanes = [("h", weights["high"]), ("n", weights["normal"]), ("l", weights["low"])]
    total = sum(w for _, w in lanes)
    current = dict.fromkeys((c for c, _ in lanes), 0)
    out: list[str] = []
    for _ in range(total):
        for c, w in lanes:
            current[c] += w
        best = max(lanes, key=lambda lane: current[lane[0]])[0]
        current[best] -= total
        out.append(best)
    return "".join(out)


def backoff_s(
    attempt: int, *, base_s: float, max_s: float, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, full jitter
    on the upper half so retries of a burst spread out but never come back at once."""
    ceiling: float = min(max_s, base_s * 2.0 ** max(0, attempt - 1))
    r: float = (rng or random).random()
    return ceiling / 2 + r * ceiling / 2


def classify_smtp(code: int | None) -> Outcome:
    """SMTP reply code (None: no reply, e.g. the connection broke) -> retry or dead."""
    if code is None or 400 <= code < 500:
        return "retry"
    return "dead"


def after_failure(
    outcome: Outcome,
    *,
    attempts: int,
    max_attempts: int,
    tried_for_s: float = 0.0,
    retry_for_s: float = 0.0,
) -> Outcome:
    """A temporary failure becomes final once the job has been retried for
    ``retry_for_s`` since its first attempt, or has used ``max_attempts`` (0 = either
    limit off)."""
    if outcome != "retry":
        return outcome
    if max_attempts and attempts >= max_attempts:
        return "dead"
    if retry_for_s and tried_for_s >= retry_for_s:
        return "dead"
    return outcome


def breaker_wait_s(trips: int, *, first_s: float, max_s: float) -> float:
    """Seconds an open transport breaker waits before its next probe, after ``trips``
    failures in a row (1 = it just opened): doubling from ``first_s``, capped at ``max_s``."""
    return float(min(max_s, first_s * 2.0 ** max(0, trips - 1)))


def route_order(
    default: Sequence[str],
    rules: Sequence[RouteRule],
    *,
    tenant: str,
    tags: Sequence[str],
    domains: Iterable[str],
) -> Sequence[str]:
    """The transports a message may take, in order: the first rule that matches it
    (tenant, one of its tags, one of its recipients' domains; an empty condition
    matches anything), else ``default``."""
    domain_set: set[str] | None = None
    for rule in rules:
        if rule.tenant and rule.tenant != tenant:
            continue
        if rule.tag and rule.tag not in tags:
            continue
        if rule.domain:
            if domain_set is None:
                domain_set = {d.lower() for d in domains}
            if rule.domain.lower() not in domain_set:
                continue
        return rule.order
    return default
