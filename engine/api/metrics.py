"""GET /metrics in Prometheus text format (the router times the ingest routes).

The metric objects live in ``engine.metrics``; this module only renders them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from engine.api.exchange import Reply, Request
from engine.errors import QueueError
from engine.metrics import CONTENT_TYPE, Metrics
from engine.queue import Queue

log = logging.getLogger(__name__)

# A scrape waits this long for the queue's depth, then answers without it.
QUEUE_READ_TIMEOUT_S: Final = 1.0
_CONTENT_TYPE: Final = CONTENT_TYPE.encode()


def metrics_route(queue: Queue, metrics: Metrics) -> Callable[[Request], Awaitable[Reply]]:
    async def exposition(_: Request) -> Reply:
        """The exposition, with the queue's depth read now (one pipelined round trip)."""
        counts = None
        with trio.move_on_after(QUEUE_READ_TIMEOUT_S):
            try:
                counts = await queue.counts()
            except QueueError as exc:  # engine_queue_up 0 says it; the rest still counts
                log.debug("api.metrics.queue_unavailable error=%s", exc)
        return Reply(200, metrics.render(counts), _CONTENT_TYPE)

    return exposition
