"""``GET /v1/limits``: the distributed rate limits and their live state (AIMD included)."""

from __future__ import annotations

import msgspec
from quart import Response
from quart_trio import QuartTrio

from engine.api.responses import json_response
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


def register_limit_routes(app: QuartTrio, limits: RateLimits) -> None:
    @app.get("/v1/limits")
    async def list_limits() -> Response:
        buckets = [
            BucketView(
                b.name, b.limit_per_s, round(b.rate_per_s, 3), b.rate_per_s < b.limit_per_s,
                round(b.reserved_s, 3), round(b.deferred_s, 3),
            )
            for b in await limits.state()
        ]  # fmt: skip
        body = {"configured": limits.settings.configured(), "buckets": buckets}
        return json_response(200, body)
