"""An in-memory Transport for tests of sender logic: records mail, fails and delays on cue.

Imports only the leaves and ``transport.base``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import trio

from engine.errors import TransportError, TransportUnavailable
from engine.transport.base import OutgoingMail, SendOutcome, SendResult

FailRule = Callable[[OutgoingMail], TransportError | None]


@dataclass(frozen=True, slots=True)
class MemoryTransportStatistics:
    sends: int  # messages accepted
    failures: int  # attempts refused by the script or ``fail``
    in_flight: int  # attempts currently running (e.g. inside the delay)
    closed: bool


class MemoryTransport:
    """Accepts everything unless told otherwise.

    Outcomes are decided in this order: the next scripted outcome (``script``), else
    ``fail(mail)``, else success. ``delay_s`` is slept before deciding, so cancellation
    mid-send can be tested. Accepted mail lands in ``sent``; every attempt in ``attempts``.
    """

    def __init__(self, *, fail: FailRule | None = None, delay_s: float = 0.0) -> None:
        self.fail = fail
        self.delay_s = delay_s
        self.sent: list[OutgoingMail] = []
        self.attempts: list[OutgoingMail] = []
        self._script: deque[TransportError | SendResult] = deque()
        self._failures = 0
        self._in_flight = 0
        self._closed = False
        self._waiters: list[tuple[int, trio.Event]] = []

    def script(self, *outcomes: TransportError | SendResult) -> None:
        """Queue outcomes for the next attempts, in order."""
        self._script.extend(outcomes)

    def statistics(self) -> MemoryTransportStatistics:
        return MemoryTransportStatistics(
            len(self.sent), self._failures, self._in_flight, self._closed
        )

    async def wait_sent(self, count: int) -> None:
        """Return once at least ``count`` messages have been accepted."""
        if len(self.sent) >= count:
            return
        event = trio.Event()
        self._waiters.append((count, event))
        await event.wait()

    async def send_many(self, mails: Sequence[OutgoingMail]) -> AsyncGenerator[SendOutcome, None]:
        """``Transport.send_many``: each mail decided in turn (see the class), yielded at once.

        Stopping early leaves the rest unattempted. A mail refused with a scripted
        TemporaryFailure does not fail the ones after it (there is no connection to lose);
        a TransportUnavailable does, as over SMTP: every later mail gets it, unattempted.
        """
        for i, mail in enumerate(mails):
            outcome = await self._attempt(mail)
            yield mail, outcome
            if isinstance(outcome, TransportUnavailable):
                for rest in mails[i + 1 :]:
                    yield rest, TransportUnavailable(f"not tried: {outcome}", code=outcome.code)
                return

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """``Transport.serve``: nothing to keep up."""
        task_status.started()
        await trio.sleep_forever()

    async def _attempt(self, mail: OutgoingMail) -> SendResult | TransportError:
        if self._closed:
            return TransportUnavailable("the memory transport is closed")
        self._in_flight += 1
        try:
            if self.delay_s > 0:
                await trio.sleep(self.delay_s)
            else:
                await trio.lowlevel.checkpoint()
            self.attempts.append(mail)
            outcome = self._script.popleft() if self._script else None
            if outcome is None and self.fail is not None:
                outcome = self.fail(mail)
            if isinstance(outcome, TransportError):
                self._failures += 1
                return outcome
            self.sent.append(mail)
            self._wake()
            return outcome or SendResult(250, f"2.0.0 Ok: queued as {mail.job_id}")
        finally:
            self._in_flight -= 1

    def _wake(self) -> None:
        ready = [event for count, event in self._waiters if len(self.sent) >= count]
        self._waiters = [(c, e) for c, e in self._waiters if len(self.sent) < c]
        for event in ready:
            event.set()

    async def aclose(self) -> None:
        self._closed = True
