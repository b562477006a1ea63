"""A tenant's templates in Redis: one hash per tenant, a template's record (all its kept
versions, as JSON) under its name, and a counter per name that numbers versions (two
replicas storing at once get distinct numbers; the later write is the current one).
Records are opaque bytes here: their format belongs to ``engine.templates``.
"""

from __future__ import annotations

from typing import Final

from engine.keys import Keys
from engine.queue.redis import Redis, translate_errors

_SEQ: Final = "#seq:"


class TemplateStore:
    def __init__(self, client: Redis, keys: Keys) -> None:
        self._client = client
        self._keys = keys

    async def get(self, tenant: str, name: str) -> bytes | None:
        with translate_errors():
            return await self._client.hget(self._keys.templates(tenant), name)

    async def all(self, tenant: str) -> dict[str, bytes]:
        with translate_errors():
            raw = await self._client.hgetall(self._keys.templates(tenant))
        return {k.decode(): v for k, v in raw.items() if not k.startswith(_SEQ.encode())}

    async def next_version(self, tenant: str, name: str) -> int:
        with translate_errors():
            return int(await self._client.hincrby(self._keys.templates(tenant), _SEQ + name, 1))

    async def put(self, tenant: str, name: str, record: bytes) -> None:
        with translate_errors():
            await self._client.hset(self._keys.templates(tenant), {name: record})

    async def delete(self, tenant: str, name: str) -> bool:
        with translate_errors():
            return bool(await self._client.hdel(self._keys.templates(tenant), [name, _SEQ + name]))
