"""GET /metrics in Prometheus text format, and the timing of the raw-ASGI ingest routes.

The metric objects live in ``engine.metrics``; this module only feeds and renders them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Final

import trio

from engine.api.asgi import Message, Receive, Scope, Send, send_bytes
from engine.errors import QueueError
from engine.metrics import CONTENT_TYPE, IngestMetrics, Metrics
from engine.queue import Queue

log = logging.getLogger(__name__)

# A scrape waits this long for the queue's depth, then answers without it.
QUEUE_READ_TIMEOUT_S: Final = 1.0
_CONTENT_TYPE: Final = CONTENT_TYPE.encode()

Route = Callable[[str, Scope, Receive, Send], Awaitable[None]]


class _StatusSend:
    """``send``, remembering the response's status on the way."""

    __slots__ = ("send", "status")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        await self.send(message)


async def timed(
    metrics: IngestMetrics, route: str, handler: Route, scope: Scope, receive: Receive, send: Send
) -> None:
    """Run ``handler`` for ``route`` and observe its latency by route, method and status.

    A request cancelled before it answered (client gone, shutdown) is not observed.
    """
    recorder = _StatusSend(send)
    start = perf_counter()
    try:
        await handler(route, scope, receive, recorder)
    except Exception:
        # The server answers 500 when nothing was sent yet.
        metrics.observe(route, scope["method"], recorder.status or 500, perf_counter() - start)
        raise
    if recorder.status:
        metrics.observe(route, scope["method"], recorder.status, perf_counter() - start)


async def send_metrics(queue: Queue, metrics: Metrics, send: Send) -> None:
    """The exposition, with the queue's depth read now (one pipelined round trip)."""
    counts = None
    with trio.move_on_after(QUEUE_READ_TIMEOUT_S):
        try:
            counts = await queue.counts()
        except QueueError as exc:  # engine_queue_up 0 says it; the rest still counts
            log.debug("api.metrics.queue_unavailable error=%s", exc)
    await send_bytes(send, 200, metrics.render(counts), _CONTENT_TYPE)
