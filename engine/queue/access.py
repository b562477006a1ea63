"""API keys and tenant records in Redis: stored, listed, revoked; a version counter
that every replica polls to notice changes. Records are opaque bytes here (their format
belongs to ``engine.auth``); every change bumps the version in the same transaction.
"""

from __future__ import annotations

from coredis.tokens import PureToken

from engine.keys import Keys
from engine.queue.redis import Redis, translate_errors


class AccessStore:
    def __init__(self, client: Redis, keys: Keys) -> None:
        self.client = client
        self._keys = keys.api_keys
        self._tenants = keys.tenants
        self._version = keys.auth_version
        self._secret = keys.auth_secret

    async def version(self) -> int:
        with translate_errors():
            raw = await self.client.get(self._version)
        return int(raw) if raw else 0

    async def snapshot(self) -> tuple[int, dict[str, bytes], dict[str, bytes]]:
        """(version, kid -> key record, tenant -> tenant record), read atomically."""
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                version = p.get(self._version)
                keys = p.hgetall(self._keys)
                tenants = p.hgetall(self._tenants)
            v = await version
            return (
                int(v) if v else 0,
                {k.decode(): r for k, r in (await keys).items()},
                {k.decode(): r for k, r in (await tenants).items()},
            )

    async def key(self, kid: str) -> bytes | None:
        with translate_errors():
            return await self.client.hget(self._keys, kid)

    async def put_key(self, kid: str, record: bytes, *, only_new: bool = False) -> bool:
        """Store a key record (``only_new``: unless that kid exists); False if it did."""
        with translate_errors():
            if only_new:
                if not await self.client.hsetnx(self._keys, kid, record):
                    return False
                await self.client.incr(self._version)
                return True
            async with self.client.pipeline(transaction=True) as p:
                p.hset(self._keys, {kid: record})
                p.incr(self._version)
        return True

    async def delete_key(self, kid: str) -> bool:
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                deleted = p.hdel(self._keys, [kid])
                p.incr(self._version)
            return bool(await deleted)

    async def put_tenant(self, name: str, record: bytes) -> bool:
        """Store a tenant record; True when it is new."""
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                added = p.hset(self._tenants, {name: record})
                p.incr(self._version)
            return bool(await added)

    async def delete_tenant(self, name: str) -> bool:
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                deleted = p.hdel(self._tenants, [name])
                p.incr(self._version)
            return bool(await deleted)

    async def secret(self, candidate: str) -> str:
        """The deployment's session secret: ``candidate`` unless one was set before."""
        with translate_errors():
            await self.client.set(self._secret, candidate, condition=PureToken.NX)
            raw = await self.client.get(self._secret)
        return raw.decode() if raw else candidate
