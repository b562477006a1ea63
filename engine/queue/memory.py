"""Redis's memory against its maxmemory, sampled: the byte budget of ingest.

One INFO memory every ``interval_s`` (not per request: it costs Redis ~12 us, a third
of a one-message enqueue); enqueue refuses new work while the last sample is over
``ingest.max_memory_ratio`` of maxmemory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import trio

from engine.errors import QueueError
from engine.queue.redis import Redis, translate_errors

log = logging.getLogger(__name__)

# Ingest may overshoot its budget by what it accepts in one interval: at 10k messages/s
# of 2 KB that is 5 MB, against the 100 MB of headroom a 1 GiB Redis keeps at 0.9.
SAMPLE_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class MemoryStatistics:
    used_bytes: int  # INFO memory used_memory (0 before the first sample)
    max_bytes: int  # Redis's maxmemory (0: none)
    policy: str  # maxmemory_policy ("" before the first sample)
    limit_bytes: int  # ingest refuses from here (0: no check)
    samples: int  # INFO memory reads that succeeded

    @property
    def full(self) -> bool:
        return 0 < self.limit_bytes <= self.used_bytes


def limit_bytes(max_bytes: int, ratio: float) -> int:
    """Where ingest stops: ``ratio`` of Redis's maxmemory; 0 (no check) without either."""
    return int(max_bytes * ratio) if max_bytes > 0 and ratio > 0 else 0


def parse_info_memory(info: Mapping[str, object]) -> tuple[int, int, str]:
    """(used_memory, maxmemory, maxmemory_policy) of an INFO memory answer."""
    policy = info.get("maxmemory_policy", "")
    if isinstance(policy, bytes):
        policy = policy.decode()
    return int(str(info["used_memory"])), int(str(info.get("maxmemory", 0))), str(policy)


class MemoryGauge:
    """``full()`` says whether the last sample was over budget. ``serve`` samples."""

    def __init__(self, client: Redis, *, ratio: float, interval_s: float = SAMPLE_INTERVAL_S):
        self.client = client
        self.ratio = ratio
        self.interval_s = interval_s
        self._stats = MemoryStatistics(0, 0, "", 0, 0)
        self._warned: set[str] = set()

    def statistics(self) -> MemoryStatistics:
        return self._stats

    def full(self) -> bool:
        return self._stats.full

    async def sample(self) -> MemoryStatistics:
        """Read INFO memory once; log when the budget is crossed either way."""
        with translate_errors():
            info = await self.client.info("memory")
        used, max_bytes, policy = parse_info_memory(info)
        was = self._stats
        now = MemoryStatistics(
            used, max_bytes, policy, limit_bytes(max_bytes, self.ratio), was.samples + 1
        )
        self._stats = now
        self._warn_once(now)
        if now.full and not was.full:
            log.warning(
                "queue.memory.full used=%d limit=%d maxmemory=%d: ingest answers 503 "
                "(kept records count: queue.keep_sent_s; or raise redis.maxmemory_bytes)",
                now.used_bytes, now.limit_bytes, now.max_bytes,
            )  # fmt: skip
        elif was.full and not now.full:
            log.info("queue.memory.ok used=%d limit=%d", now.used_bytes, now.limit_bytes)
        return now

    def _warn_once(self, stats: MemoryStatistics) -> None:
        if stats.max_bytes == 0 and "unbounded" not in self._warned:
            self._warned.add("unbounded")
            log.warning(
                "queue.memory.unbounded Redis has no maxmemory: ingest cannot keep it within "
                "a byte budget (ingest.max_memory_ratio); set maxmemory and "
                "maxmemory-policy noeviction on it"
            )
        if stats.policy not in ("", "noeviction") and "policy" not in self._warned:
            self._warned.add("policy")
            log.warning(
                "queue.memory.evicting Redis's maxmemory-policy is %s: it may evict job "
                "records (lost messages) when full; set maxmemory-policy noeviction",
                stats.policy,
            )

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Sample every ``interval_s``; a failed read keeps the last sample (an enqueue
        then fails on its own). Ready at once: a Redis still starting must not hold up
        the engine's start."""
        task_status.started()
        if self.ratio <= 0:
            await trio.sleep_forever()
        while True:
            try:
                await self.sample()
            except QueueError as exc:
                log.debug("queue.memory.sample.failed error=%s", exc)
            await trio.sleep(self.interval_s)
