"""How fast the queue drains (all replicas): the finished-jobs counter sampled over a
sliding window, for the Retry-After of a full backlog."""

from __future__ import annotations

import logging
from collections import deque
from typing import NoReturn

import trio

from engine.errors import QueueError
from engine.queue.jobs import Queue

log = logging.getLogger(__name__)


class DrainMeter:
    """``rate()`` is jobs finished (sent or failed) per second over the last ``window_s``."""

    def __init__(self, queue: Queue, *, interval_s: float = 1.0, window_s: float = 10.0) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self._samples: deque[tuple[float, int]] = deque(maxlen=max(2, int(window_s / interval_s)))

    def rate(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0

    async def sample(self) -> None:
        counts = await self.queue.counts()
        self._samples.append((trio.current_time(), counts.sent_total + counts.failed_total))

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        task_status.started()
        while True:
            try:
                await self.sample()
            except QueueError as exc:
                log.debug("drain.sample.failed error=%s", exc)
            await trio.sleep(self.interval_s)
