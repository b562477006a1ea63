"""A process-local token bucket for Trio tasks (arithmetic in engine.policy)."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from engine.policy import TokenBucket, bucket_take


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    rate_per_s: float
    burst: float
    tokens: float
    waits: int


class RateLimiter:
    """``await limiter.acquire()`` before each send; ``rate_per_s <= 0`` never waits."""

    def __init__(self, rate_per_s: float, burst: float = 0) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst if burst > 0 else max(1.0, rate_per_s)
        self._state = TokenBucket(self.burst, trio.current_time() if _in_trio() else 0.0)
        self._waits = 0

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(self.rate_per_s, self.burst, self._state.tokens, self._waits)

    async def acquire(self, n: float = 1.0) -> None:
        if self.rate_per_s <= 0:
            return
        self._state, wait = bucket_take(
            self._state, now=trio.current_time(), rate_per_s=self.rate_per_s, burst=self.burst, n=n
        )
        if wait > 0:
            self._waits += 1
            await trio.sleep(wait)


def _in_trio() -> bool:
    try:
        trio.current_time()
    except RuntimeError:
        return False
    return True
