"""Heartbeat of this instance (one lease-renewal timer for all its jobs), and recovery:
promote due delayed jobs, return jobs of expired leases and dead instances to ready.

Imports the queue and leaves; never the API or senders (it is given ``holding``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import NoReturn

import trio

from engine.config import QueueSettings
from engine.errors import QueueError
from engine.metrics import Metrics, ReaperMetrics
from engine.queue import Queue

log = logging.getLogger(__name__)


class Reaper:
    def __init__(
        self,
        queue: Queue,
        holding: Callable[[], Iterable[str]],
        settings: QueueSettings,
        *,
        reap_interval_s: float = 0.5,
        metrics: ReaperMetrics | None = None,
    ) -> None:
        self.queue = queue
        self.holding = holding
        self.settings = settings
        self.reap_interval_s = reap_interval_s
        self._metrics = metrics if metrics is not None else Metrics().reaper

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        try:
            await self.renew_once()
        except QueueError as exc:  # Redis may come up later; keep going
            log.warning("reaper.renew.failed error=%s", exc)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._renew_loop)
            nursery.start_soon(self._reap_loop)
            task_status.started()
        raise AssertionError("unreachable")

    async def renew_once(self) -> None:
        await self.queue.renew(self.holding())

    async def reap_once(self) -> None:
        r = await self.queue.reap()
        self._metrics.reaped(
            requeued=r.requeued,
            dead=r.dead_lettered,
            promoted=r.promoted,
            instances=r.instances_removed,
        )
        if r.requeued or r.instances_removed:
            log.warning(
                "reaper.requeued jobs=%d dead_instances=%d", r.requeued, r.instances_removed
            )

    async def _renew_loop(self) -> NoReturn:
        while True:
            await trio.sleep(self.settings.heartbeat_s)
            try:
                await self.renew_once()
            except QueueError as exc:
                self._metrics.error()
                log.warning("reaper.renew.failed error=%s", exc)

    async def _reap_loop(self) -> NoReturn:
        while True:
            try:
                await self.reap_once()
            except QueueError as exc:
                self._metrics.error()
                log.warning("reaper.reap.failed error=%s", exc)
            await trio.sleep(self.reap_interval_s)
