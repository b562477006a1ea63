"""A transport's circuit breaker, shared by every replica through Redis.

One hash per transport (``breaker:<name>``: opened_at, trips, probe_at, reason) exists
only while the breaker is open, and one short-lived lock names the sender probing it.
Every change touches one key, so no script is needed. The decisions (how long to wait
before the next probe) are ``engine.policy.breaker_wait_s``; this module only stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from coredis.tokens import PureToken

from engine.keys import Keys
from engine.policy import breaker_wait_s
from engine.queue.redis import Redis, translate_errors


@dataclass(frozen=True, slots=True)
class BreakerState:
    """An open breaker (a closed one has no state)."""

    name: str  # the transport, e.g. "smtp"
    opened_at_ms: int
    trips: int  # failures in a row: the opening one, then each failed probe
    probe_at_ms: int  # when a sender may test the transport again
    reason: str  # the failure that opened it (or the last failed probe's)


class Breaker:
    """The breaker of one transport (``name``) on one queue shard."""

    def __init__(
        self, client: Redis, keys: Keys, name: str, *, first_wait_s: float, max_wait_s: float
    ) -> None:
        self.client = client
        self.name = name
        self._key = keys.breaker(name)
        self._probe_key = keys.breaker(name) + ":probe"
        self._first_s = first_wait_s
        self._max_s = max_wait_s

    async def state(self) -> BreakerState | None:
        """The breaker's state; None while it is closed."""
        with translate_errors():
            raw = await self.client.hgetall(self._key)
        if not raw:
            return None
        f = {k.decode(): v.decode() for k, v in raw.items()}
        opened = int(f.get("opened_at", 0))
        # A breaker caught between its two writes (see trip) probes after the first wait.
        probe_at = int(f.get("probe_at", opened + int(self._first_s * 1000)))
        return BreakerState(
            self.name, opened, int(f.get("trips", 1)), probe_at, f.get("reason", "")
        )

    async def trip(self, reason: str, *, now_ms: int, probe_failed: bool = False) -> bool:
        """Record a failure of the transport; True when this call opened the breaker.

        A failure while it is already open changes nothing (many senders see one outage)
        unless it is the probe's: then the next probe waits longer.
        """
        k = self._key
        with translate_errors():
            if probe_failed:
                trips = int(await self.client.hincrby(k, "trips", 1))
            elif await self.client.hsetnx(k, "opened_at", now_ms):
                trips = 1
            else:
                return False
            wait_s = breaker_wait_s(trips, first_s=self._first_s, max_s=self._max_s)
            await self.client.hset(
                k, {"trips": trips, "probe_at": now_ms + int(wait_s * 1000), "reason": reason}
            )
            if probe_failed:
                await self.client.delete([self._probe_key])
        return trips == 1

    async def take_probe(self, instance: str, *, lease_s: float) -> bool:
        """Become the one sender (of all replicas) that tests the transport now."""
        with translate_errors():
            got = await self.client.set(
                self._probe_key, instance, condition=PureToken.NX, px=int(lease_s * 1000)
            )
        return bool(got)

    async def give_up_probe(self) -> None:
        """The probe found nothing to send: let the next turn probe again."""
        with translate_errors():
            await self.client.delete([self._probe_key])

    async def close(self) -> None:
        """The transport works again."""
        with translate_errors():
            await self.client.delete([self._key, self._probe_key])
