"""The distributed token buckets' Redis side: publishing the configured limits,
AIMD slow-downs, and the buckets' state for ``GET /v1/limits``.

The buckets themselves are taken inside the claim script (one Lua call per claim);
this module owns what happens around it; the arithmetic both share is
``engine.policy.recovered_rate``. Imports the leaves, policy and the queue's Redis adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.config import RateLimitSettings
from engine.keys import Keys
from engine.policy import recovered_rate
from engine.queue.redis import Redis, Scripts, translate_errors


@dataclass(frozen=True, slots=True)
class BucketState:
    name: str  # "global", "domain:<domain>", "tenant:<tenant>"
    limit_per_s: float  # configured
    rate_per_s: float  # in force now (below the limit after a slow-down)
    reserved_s: float  # how far ahead its slots are taken (0: it has tokens now)
    deferred_s: float  # how far ahead jobs waiting for it have been spread


class RateLimits:
    """One shard's rate limits, as one replica sees them."""

    def __init__(
        self,
        client: Redis,
        keys: Keys,
        settings: RateLimitSettings,
        transport_rates: Mapping[str, float] | None = None,
    ) -> None:
        self.client = client
        self.keys = keys
        self.settings = settings
        # Messages per second per transport (routing.rates), all replicas together.
        self.transport_rates = {n: r for n, r in (transport_rates or {}).items() if r > 0}
        self._scripts = Scripts(client)

    def table(self) -> dict[str, str]:
        """Bucket name -> "rate burst", as the scripts read it: the configured limits and
        each transport's bucket (``transport:<name>``)."""
        table = self.settings.table()
        for name, rate in self.transport_rates.items():
            table[f"transport:{name}"] = f"{rate:g} {max(1.0, rate * self.settings.burst_s):g}"
        return table

    async def transport_slots(self, name: str, n: int) -> list[float]:
        """Reserve ``n`` send slots in transport ``name``'s shared bucket: the seconds to
        wait before each, in order ([] when that transport has no rate)."""
        if name not in self.transport_rates or n <= 0:
            return []
        args: list[str | int | float] = [
            self.keys.prefix, f"transport:{name}", n, self.settings.recovery_per_s,
        ]  # fmt: skip
        with translate_errors():
            out: Any = await self._scripts["transport_slots"](keys=[self.keys.limits], args=args)
        return [int(ms) / 1000 for ms in out]

    async def publish(self) -> None:
        """Write this replica's limits to Redis (replicas are expected to share them;
        the last one started wins). Atomic: claims never see half a table."""
        table = self.table()
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                p.delete([self.keys.limits])
                if table:
                    p.hset(self.keys.limits, dict(table))

    async def slowdown(self, names: Sequence[str]) -> dict[str, float]:
        """A server asked us to slow down for ``names`` ("domain:x.org"): halve their
        rates (once per cooldown). Returns the new rate of each bucket that has a limit."""
        if not names:
            return {}
        s = self.settings
        args: list[str | int | float] = [
            self.keys.prefix, int(s.slowdown_cooldown_s * 1000), s.slowdown_floor,
            s.recovery_per_s, *names,
        ]  # fmt: skip
        with translate_errors():
            out: Any = await self._scripts["slowdown"](keys=[self.keys.limits], args=args)
        return {out[i].decode(): float(out[i + 1]) for i in range(0, len(out), 2)}

    async def state(self) -> list[BucketState]:
        """Every configured bucket and every bucket with live state, by name."""
        with translate_errors():
            table = {
                k.decode(): v.decode()
                for k, v in (await self.client.hgetall(self.keys.limits)).items()
            }
            names = set(table) - {"domain:*", "tenant:*"}
            prefix = self.keys.bucket("")
            async for key in self.client.scan_iter(match=prefix + "*", count=1000):
                names.add(key.decode()[len(prefix) :])
            names.discard("")
            names = {n for n in names if not n.startswith("client:")}
            ordered = sorted(names)
            rows = await self.client.mget([self.keys.bucket(n) for n in ordered]) if ordered else []
            # The buckets run on the server's clock. (Not client.time(): coredis 6
            # divides its microseconds by 1000 again.)
            reply: Any = await self.client.eval("return redis.call('TIME')")
        now_ms = int(reply[0]) * 1000 + int(reply[1]) / 1000
        out: list[BucketState] = []
        for name, row in zip(ordered, rows, strict=True):
            conf = table.get(name) or table.get(name.split(":", 1)[0] + ":*")
            if conf is None:
                continue  # state left over from a limit that is no longer configured
            limit = float(conf.split(" ", 1)[0])
            # "tat vtat rate rt cut" as claim.lua writes it; rate '-' = at its limit.
            fields = row.decode().split() if row is not None else ["0", "0", "-", "0", "0"]
            tat, vtat, rt = float(fields[0]), float(fields[1]), float(fields[3])
            rate = None if fields[2] == "-" else float(fields[2])
            out.append(
                BucketState(
                    name,
                    limit,
                    recovered_rate(rate, rt, limit, now_ms, self.settings.recovery_per_s),
                    max(0.0, (tat - now_ms) / 1000),
                    max(0.0, (vtat - now_ms) / 1000),
                )
            )
        return out
