"""``GET /v1/limits``: the distributed rate limits and their live state (AIMD included)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from engine.api.exchange import Reply, Request, json_reply
from engine.queue import RateLimits


class BucketView(msgspec.Struct):
    name: str
    limit_per_s: float
    # Below the limit for a while after a 421/451 (halved, then recovering additively).
    rate_per_s: float
    slowed: bool
    # Seconds of sends already reserved ahead (0: tokens available now).
    reserved_s: float
    # Seconds ahead that jobs waiting for this bucket have been spread.
    deferred_s: float


class LimitsView(msgspec.Struct):
    configured: bool
    buckets: list[BucketView]


def limits_route(limits: RateLimits) -> Callable[[Request], Awaitable[Reply]]:
    async def list_limits(_: Request) -> Reply:
        buckets = [
            BucketView(
                b.name, b.limit_per_s, round(b.rate_per_s, 3), b.rate_per_s < b.limit_per_s,
                round(b.reserved_s, 3), round(b.deferred_s, 3),
            )
            for b in await limits.state()
        ]  # fmt: skip
        return json_reply(200, LimitsView(limits.settings.configured(), buckets))

    return list_limits
