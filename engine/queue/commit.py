"""Group commit: many concurrent callers, one round-trip.

Callers ``submit`` a list of items and wait; a flusher task sends everything that
accumulated while the previous flush was in flight as one call. No timer adds
latency: an idle committer flushes a lone item at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeVar

import trio

T = TypeVar("T")

Flush = Callable[[list[T]], Awaitable[None]]


@dataclass(slots=True)
class _Waiter:
    done: trio.Event
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class CommitStatistics:
    flushes: int
    items: int
    pending: int


class GroupCommitter(Generic[T]):
    """Coalesces ``submit`` calls into batched ``flush`` calls of at most ``max_items``.

    All items of one ``submit`` go into the same flush (so a batch that the flush
    writes atomically is all-or-nothing). If the flush raises, every submitter in
    that flush gets the exception.
    """

    def __init__(self, flush: Flush[T], *, max_items: int) -> None:
        self._flush = flush
        self._max_items = max_items
        self._pending: deque[tuple[list[T], _Waiter]] = deque()
        self._wakeup = trio.Event()
        self._flushes = 0
        self._items = 0
        self._running = False

    def statistics(self) -> CommitStatistics:
        return CommitStatistics(self._flushes, self._items, len(self._pending))

    async def submit(self, items: list[T]) -> None:
        if not self._running:
            raise RuntimeError("GroupCommitter.serve() is not running")
        waiter = _Waiter(trio.Event())
        self._pending.append((items, waiter))
        self._wakeup.set()
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

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
            for _, waiter in self._pending:
                waiter.error = trio.ClosedResourceError("group committer stopped")
                waiter.done.set()
            self._pending.clear()

    async def _flush_some(self) -> None:
        take: list[tuple[list[T], _Waiter]] = []
        items: list[T] = []
        while self._pending and (
            not items or len(items) + len(self._pending[0][0]) <= self._max_items
        ):
            entry = self._pending.popleft()
            take.append(entry)
            items.extend(entry[0])
        error: BaseException | None = None
        try:
            await self._flush(items)
        except trio.Cancelled:
            # Shutting down mid-flush: the callers learn it failed (their work may or
            # may not have been written; the scripts are idempotent per id).
            for _, waiter in take:
                waiter.error = trio.ClosedResourceError("group committer stopped")
                waiter.done.set()
            raise
        except Exception as exc:
            error = exc
        self._flushes += 1
        self._items += len(items)
        for _, waiter in take:
            waiter.error = error
            waiter.done.set()
