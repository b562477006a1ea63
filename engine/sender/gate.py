"""Whether this replica's senders may claim: the transport's circuit breaker as this
process sees it (read from Redis at most every ``refresh_s``, shared by all senders)."""

from __future__ import annotations

import contextlib
import logging

import trio

from engine.errors import QueueError
from engine.metrics import SenderMetrics
from engine.queue import Breaker, BreakerState, Queue

log = logging.getLogger(__name__)


class TransportGate:
    """One transport's breaker as this process sees it; ``engine.sender.routing`` decides
    from it whether to claim, fail over, or probe."""

    def __init__(
        self,
        breaker: Breaker,
        queue: Queue,
        metrics: SenderMetrics,
        *,
        refresh_s: float = 0.25,
        probe_lease_s: float = 60.0,
    ) -> None:
        self.breaker = breaker
        self.queue = queue
        self._metrics = metrics
        self._refresh_s = refresh_s
        self._probe_lease_s = probe_lease_s
        self._state: BreakerState | None = None
        self._read_at = -float("inf")
        self._lock = trio.Lock()
        self._down_logged = False
        metrics.transport(breaker.name, up=True)

    def is_open(self) -> bool:
        return self._state is not None

    @property
    def state(self) -> BreakerState | None:
        """The breaker's state as last read (``current`` re-reads it when due)."""
        return self._state

    async def current(self) -> BreakerState | None:
        """The breaker's state as last read (re-read at most every ``refresh_s``)."""
        async with self._lock:  # one Redis read per refresh for all senders
            if trio.current_time() - self._read_at >= self._refresh_s:
                # Redis trouble shows in the claim; keep the last known state.
                with contextlib.suppress(QueueError):
                    self._state = await self.breaker.state()
                self._read_at = trio.current_time()
                self._note()
        return self._state

    def _note(self) -> None:
        if self._state is not None and not self._down_logged:
            self._down_logged = True
            log.warning(
                "sender.transport.down transport=%s reason=%s: senders wait; probing at "
                "growing intervals", self.breaker.name, self._state.reason,
            )  # fmt: skip
        elif self._state is None and self._down_logged:
            self._down_logged = False
            log.warning("sender.transport.up transport=%s: senders claim again", self.breaker.name)
        self._metrics.transport(self.breaker.name, up=self._state is None)

    async def take_probe(self) -> bool:
        """Whether this sender (of all replicas) gets to test the open transport now."""
        try:
            return await self.breaker.take_probe(self.queue.instance, lease_s=self._probe_lease_s)
        except QueueError:
            return False

    async def failed(self, reason: str, *, probe: bool) -> None:
        """The transport failed (not a message): open the breaker, or, after a failed
        probe, push the next probe out."""
        try:
            opened = await self.breaker.trip(reason, now_ms=self.queue.now_ms(), probe_failed=probe)
        except QueueError as exc:
            log.warning("sender.breaker.unrecorded error=%s", exc)
            return
        self._metrics.transport(self.breaker.name, up=False, tripped=opened or probe)
        # Seen open here at once: the senders in the middle of routing fail over now.
        with contextlib.suppress(QueueError):
            self._state = await self.breaker.state()
        self._read_at = trio.current_time()
        self._note()

    async def recovered(self) -> None:
        """The probe went through: close the breaker for every replica."""
        try:
            await self.breaker.close()
        except QueueError as exc:
            log.warning("sender.breaker.unrecorded error=%s", exc)
            return
        self._read_at = -float("inf")

    async def no_probe(self) -> None:
        """A probe turn that found no job: another turn may probe."""
        with contextlib.suppress(QueueError):
            await self.breaker.give_up_probe()
