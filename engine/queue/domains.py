"""DKIM signing domains in Redis (``/v1/domains``): one hash of key records, and a
version counter every sender replica polls to notice a change. Records are opaque bytes
here (their format is ``engine.domainkeys.DomainRecord``); every change bumps the
version in the same transaction.
"""

from __future__ import annotations

from engine.keys import Keys
from engine.queue.redis import Redis, translate_errors


class DomainStore:
    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self._domains = keys.dkim_domains
        self._version = keys.dkim_version

    async def version(self) -> int:
        with translate_errors():
            raw = await self.client.get(self._version)
        return int(raw) if raw else 0

    async def snapshot(self) -> tuple[int, dict[str, bytes]]:
        """(version, domain -> record), read atomically."""
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                version = p.get(self._version)
                records = p.hgetall(self._domains)
            v = await version
            return int(v) if v else 0, {k.decode(): r for k, r in (await records).items()}

    async def get(self, domain: str) -> bytes | None:
        with translate_errors():
            return await self.client.hget(self._domains, domain)

    async def put(self, domain: str, record: bytes) -> bool:
        """Store a domain's record; True when the domain is new."""
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                added = p.hset(self._domains, {domain: record})
                p.incr(self._version)
            return bool(await added)

    async def delete(self, domain: str) -> bool:
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                deleted = p.hdel(self._domains, [domain])
                p.incr(self._version)
            return bool(await deleted)
