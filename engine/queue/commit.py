"""Group commit: many concurrent callers, one round-trip.

Callers ``submit`` an item and wait for its result; a flusher task sends everything
that accumulated while the previous flush was in flight as one call. No timer adds
latency: an idle committer flushes a lone item at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, NoReturn, TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CommitStatistics:
    flushes: int
    items: int
    pending: int


class GroupCommitter(Generic[T, R]):
    """Coalesces ``submit`` calls into ``flush(items) -> results`` calls (one result per
    item, in order) carrying at most ``max_weight`` (an item's weight is given at submit,
    e.g. its number of jobs; one item always fits on its own). If a flush raises, every
    submitter in it gets the exception.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[list[R]]], *, max_weight: int) -> None:
        self._flush = flush
        self._max_weight = max_weight
        self._pending: deque[tuple[T, int, _Waiter]] = deque()
        self._wakeup = trio.Event()
        self._flushes = 0
        self._items = 0
        self._running = False

    def statistics(self) -> CommitStatistics:
        return CommitStatistics(self._flushes, self._items, len(self._pending))

    async def submit(self, item: T, weight: int = 1) -> R:
        if not self._running:
            raise trio.ClosedResourceError("group committer is not running")
        waiter = _Waiter()
        self._pending.append((item, weight, waiter))
        self._wakeup.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        result: R = waiter.result
        return result

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        self._running = True
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                while self._pending:
                    await self._flush_some()
        finally:
            self._running = False
            for _, _, waiter in self._pending:
                waiter.error = trio.ClosedResourceError("group committer stopped")
                waiter.done.set()
            self._pending.clear()

    async def _flush_some(self) -> None:
        take: list[_Waiter] = []
        items: list[T] = []
        weight = 0
        while self._pending and (not items or weight + self._pending[0][1] <= self._max_weight):
            item, w, waiter = self._pending.popleft()
            items.append(item)
            take.append(waiter)
            weight += w
        try:
            results = await self._flush(items)
        except trio.Cancelled:
            # Shutting down mid-flush: the callers learn it failed (their work may or
            # may not have been written; the scripts are idempotent per id).
            for waiter in take:
                waiter.error = trio.ClosedResourceError("group committer stopped")
                waiter.done.set()
            raise
        except Exception as exc:
            for waiter in take:
                waiter.error = exc
                waiter.done.set()
        else:
            for waiter, result in zip(take, results, strict=True):
                waiter.result = result
                waiter.done.set()
        self._flushes += 1
        self._items += len(items)
