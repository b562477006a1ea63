"""Provider events into Redis: what an email provider reported of the jobs it took, one
script call per signed delivery (``lua/provider_events.lua``): stream entries the hub
and the webhook dispatcher carry as they are, the job record marked, hard bounces and
complaints suppressed, each event id remembered so that a provider's retry is dropped.

Imports the leaves and the queue's Redis adapter; decides nothing (engine.provider_events
maps and classifies; this stores).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import ProviderEventSettings, QueueSettings
from engine.keys import Keys
from engine.models import ProviderEvent
from engine.queue.redis import Redis, Scripts, translate_errors


@dataclass(frozen=True, slots=True)
class Recorded:
    """What one delivery came to."""

    stored: int = 0  # events appended (and their jobs' records marked)
    duplicates: int = 0  # seen before: a provider's retry, dropped
    unmatched: int = 0  # no job of ours (no job id, or its record is gone): not stored
    suppressed: int = 0  # recipients newly on their tenant's suppression list
    replayed: bool = False  # its one-time token was used before: nothing written


class ProviderEventStore:
    """The provider events of one queue shard."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        *,
        queue: QueueSettings | None = None,
        settings: ProviderEventSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._keys = keys
        self._queue = queue or QueueSettings()
        self._settings = settings or ProviderEventSettings()
        self._clock = clock
        self._scripts = Scripts(client)

    async def record(
        self, provider: str, events: Sequence[ProviderEvent], *, nonce: str = ""
    ) -> Recorded:
        """Store ``events`` (all of ``provider``'s one delivery) in one script call.

        ``nonce``: the delivery's one-time token, if its scheme has one (Mailgun's): a
        second delivery with it is a replay and writes nothing.
        """
        if not events and not nonce:
            return Recorded()
        k = self._keys
        keys = [k.events, k.stats]
        if nonce:
            keys.append(k.provider_nonce(provider, nonce))
        args: list[Any] = [
            k.prefix,
            int(self._clock() * 1000),
            self._queue.events_maxlen,
            provider,
            self._settings.dedupe_s * 1000,
            # Twice the clock tolerance: the token's timestamp is checked to within it.
            max(1, int(self._settings.tolerance_s * 2000)),
        ]
        for e in events:
            args += [e.event_id, e.job_id, e.type, e.recipient, e.at_ms, e.detail,
                     e.bounce or "", e.message_id, e.suppress_reason]  # fmt: skip
        with translate_errors():
            out: Any = await self._scripts["provider_events"](keys=keys, args=args)
        stored, duplicates, unmatched, suppressed = (int(n) for n in out)
        if stored < 0:
            return Recorded(replayed=True)
        return Recorded(stored, duplicates, unmatched, suppressed)
