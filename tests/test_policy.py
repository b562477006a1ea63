"""Pure decisions: token bucket arithmetic, backoff, classification."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from engine.policy import (
    TokenBucket,
    after_failure,
    backoff_s,
    breaker_wait_s,
    bucket_take,
    classify_smtp,
)
from engine.sender.ratelimit import RateLimiter


def test_bucket_allows_burst_then_paces() -> None:
    state = TokenBucket(tokens=3, at=0.0)
    waits = []
    for _ in range(5):
        state, wait = bucket_take(state, now=0.0, rate_per_s=10, burst=3)
        waits.append(round(wait, 6))
    assert waits == [0, 0, 0, 0.1, 0.2]


def test_bucket_refills_up_to_burst() -> None:
    state = TokenBucket(tokens=0, at=0.0)
    state, wait = bucket_take(state, now=100.0, rate_per_s=10, burst=5)
    assert wait == 0 and state.tokens == 4


def test_unlimited_never_waits() -> None:
    state = TokenBucket(0, 0)
    assert bucket_take(state, now=0, rate_per_s=0, burst=1)[1] == 0


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(1)
    delays = [backoff_s(a, base_s=2, max_s=60, rng=rng) for a in range(1, 10)]
    assert 1 <= delays[0] <= 2
    assert 4 <= delays[2] <= 8
    assert all(30 <= d <= 60 for d in delays[6:])


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(None, "retry"), (421, "retry"), (451, "retry"), (550, "dead"), (554, "dead")],
)
def test_classify(code: int | None, outcome: str) -> None:
    assert classify_smtp(code) == outcome


def test_exhausted_attempts_go_dead() -> None:
    assert after_failure("retry", attempts=4, max_attempts=5) == "retry"
    assert after_failure("retry", attempts=5, max_attempts=5) == "dead"
    assert after_failure("dead", attempts=1, max_attempts=5) == "dead"


async def test_rate_limiter_paces_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(rate_per_s=100, burst=10)
    start = trio.current_time()
    for _ in range(110):
        await limiter.acquire()
    elapsed = trio.current_time() - start
    # 10 go at once (burst), the other 100 at 100/s.
    assert 0.99 <= elapsed <= 1.01


def test_retry_budget_in_time_and_attempts() -> None:
    assert (
        after_failure("retry", attempts=40, max_attempts=0, tried_for_s=10, retry_for_s=60)
        == "retry"
    )
    assert (
        after_failure("retry", attempts=2, max_attempts=0, tried_for_s=61, retry_for_s=60) == "dead"
    )
    assert (
        after_failure("retry", attempts=3, max_attempts=3, tried_for_s=1, retry_for_s=60) == "dead"
    )
    assert after_failure("dead", attempts=1, max_attempts=0) == "dead"
    assert after_failure("retry", attempts=99, max_attempts=0) == "retry"  # both limits off


def test_breaker_waits_double_up_to_the_cap() -> None:
    waits = [breaker_wait_s(n, first_s=1.0, max_s=15.0) for n in range(1, 7)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 15.0, 15.0]
