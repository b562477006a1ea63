"""``ProviderTransport``: the Transport protocol over a provider's HTTP API, one request
per mail over a shared ``Http1Pool``. Acts only: what a request is and what an answer
means are decided in ``base`` and the provider modules."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Final, NoReturn

import trio

from engine.errors import PermanentFailure, TransportError, TransportUnavailable
from engine.transport.base import OutgoingMail, SendOutcome, SendResult
from engine.transport.http1 import Http1Pool, Http1PoolStatistics, HttpFailure
from engine.transport.providers.base import (
    AUTH_STATUSES,
    Provider,
    failure_outcome,
    outcome_of,
)

log = logging.getLogger(__name__)

# A refused key refuses every mail: said loudly, but once in this many seconds.
AUTH_LOG_EVERY_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class ProviderTransportStatistics:
    accepted: int  # mails the API accepted (2xx)
    refused: int  # mails it answered with an error status
    unanswered: int  # requests without an answer (no connection, lost, timed out)
    pool: Http1PoolStatistics


class ProviderTransport:
    """The Transport over a provider's API. Safe to use from many tasks at once: each
    request takes a connection of the pool for itself.

    ``send_many`` sends its mails one at a time, each when the consumer asks for the
    next outcome (so a sender's pacing holds), and yields each answer as it comes.
    A request that gets no answer -- no connection, lost, timed out -- ends the call:
    the mails after it get TransportUnavailable, untried (the provider is down or not
    answering; waiting out a timeout per mail would only hold the sender).
    """

    def __init__(self, provider: Provider, pool: Http1Pool, *, request_timeout_s: float) -> None:
        self.provider = provider
        self._pool = pool
        self._timeout_s = request_timeout_s
        self._accepted = 0
        self._refused = 0
        self._unanswered = 0
        self._auth_logged_at = -AUTH_LOG_EVERY_S
        self._auth_unlogged = 0

    def statistics(self) -> ProviderTransportStatistics:
        return ProviderTransportStatistics(
            self._accepted, self._refused, self._unanswered, self._pool.statistics()
        )

    async def send_many(self, mails: Sequence[OutgoingMail]) -> AsyncGenerator[SendOutcome, None]:
        """``Transport.send_many`` (contract there), one request per mail, in order."""
        for i, mail in enumerate(mails):
            outcome, answered = await self._send(mail)
            yield mail, outcome
            if not answered:
                rest = mails[i + 1 :]
                if rest:
                    log.warning(
                        "transport.%s.unanswered job=%s untried=%d error=%s",
                        self.provider.name, mail.job_id, len(rest), outcome,
                    )  # fmt: skip
                for later in rest:
                    yield later, TransportUnavailable(f"not tried: {outcome}")
                return

    async def _send(self, mail: OutgoingMail) -> tuple[SendResult | TransportError, bool]:
        """The mail's outcome, and whether the API answered (a refusal before any
        request, e.g. a mail the provider cannot take, counts as answered)."""
        provider = self.provider
        request = provider.request(mail)
        if isinstance(request, PermanentFailure):
            self._refused += 1
            return request, True
        try:
            response = await self._pool.request(
                request.method, request.path, request.headers, request.body,
                timeout_s=self._timeout_s,
            )  # fmt: skip
        except HttpFailure as failure:
            self._unanswered += 1
            return failure_outcome(provider, failure), False
        outcome = outcome_of(provider, response)
        if isinstance(outcome, SendResult):
            self._accepted += 1
        else:
            self._refused += 1
            if response.status in AUTH_STATUSES:
                self._auth_refused(mail, outcome)
        return outcome, True

    def _auth_refused(self, mail: OutgoingMail, outcome: TransportError) -> None:
        now = trio.current_time()
        if now - self._auth_logged_at < AUTH_LOG_EVERY_S:
            self._auth_unlogged += 1
            return
        log.error(
            "transport.%s.auth_refused job=%s error=%s (the API refuses the key: every "
            "mail fails until it is fixed; %d more refusals not logged)",
            self.provider.name, mail.job_id, outcome, self._auth_unlogged,
        )  # fmt: skip
        self._auth_logged_at = now
        self._auth_unlogged = 0

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Close idle connections that expired or that the API closed (``Http1Pool``)."""
        await self._pool.serve(task_status=task_status)

    async def aclose(self) -> None:
        await self._pool.aclose()
