"""A tenant's suppression list: the addresses its mail is never sent to. A set that the
enqueue script tests recipients against (SMISMEMBER) and a hash of why each address is
there; hard bounces add to both inside fail.lua, the API through this store.
Imports the leaves; never the API.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from engine.keys import Keys
from engine.models import bare_address
from engine.queue.redis import Redis, translate_errors

# Addresses written per transaction (an import of 100k addresses is 100 of them).
_CHUNK: Final = 1000
# HSCAN calls one page makes at most (a sparse table can answer empty pages).
_MAX_SCANS: Final = 20
_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def address_key(address: str) -> str:
    """The spelling an address is suppressed under: bare, ASCII letters lower-cased.

    Exactly what Lua's ``string.lower`` makes of it in enqueue.lua and fail.lua (it
    leaves non-ASCII letters alone), so that both sides agree on every address.
    """
    return bare_address(address.strip()).translate(_ASCII_LOWER)


class _Stored(msgspec.Struct, frozen=True):
    """The hash's JSON value (fail.lua writes the same shape with cjson)."""

    reason: str = ""
    source: str | None = None  # the message whose hard bounce added it
    bounce: str | None = None  # that bounce's class (engine.bounce)
    at: int = 0  # when it was added (ms)


@dataclass(frozen=True, slots=True)
class Suppression:
    address: str
    reason: str
    source: str | None
    bounce: str | None
    at_ms: int


@dataclass(frozen=True, slots=True)
class SuppressionPage:
    total: int  # addresses on the tenant's list
    items: list[Suppression]  # sorted by address within the page
    next_cursor: int  # 0: that was the last page


_decode = msgspec.json.Decoder(_Stored).decode
_encode = msgspec.json.Encoder().encode


def _entry(address: bytes, raw: bytes) -> Suppression:
    try:
        s = _decode(raw)
    except msgspec.DecodeError:  # never written so; still list the address
        s = _Stored()
    return Suppression(address.decode(), s.reason, s.source, s.bounce, s.at)


class SuppressionStore:
    """The suppression lists of one queue shard."""

    def __init__(
        self, client: Redis, keys: Keys, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._client = client
        self._keys = keys
        self._clock = clock

    async def add(self, tenant: str, reasons: Mapping[str, str]) -> int:
        """Suppress the addresses of ``reasons`` (address key -> reason; see
        ``address_key``); returns how many were not suppressed yet. An address already
        on the list keeps its first entry."""
        k, added = self._keys, 0
        now = int(self._clock() * 1000)
        items = list(reasons.items())
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            with translate_errors():
                async with self._client.pipeline(transaction=True) as p:
                    new = p.sadd(k.suppressed(tenant), [a for a, _ in chunk])
                    for address, reason in chunk:
                        p.hsetnx(
                            k.suppression_info(tenant), address, _encode(_Stored(reason, at=now))
                        )
                added += int(await new)
        return added

    async def remove(self, tenant: str, address: str) -> bool:
        """Take ``address`` (an address key) off the list; False when it was not on it."""
        k = self._keys
        with translate_errors():
            async with self._client.pipeline(transaction=True) as p:
                removed = p.srem(k.suppressed(tenant), [address])
                p.hdel(k.suppression_info(tenant), [address])
            return int(await removed) > 0

    async def get(self, tenant: str, address: str) -> Suppression | None:
        with translate_errors():
            if not await self._client.sismember(self._keys.suppressed(tenant), address):
                return None
            raw = await self._client.hget(self._keys.suppression_info(tenant), address)
        return _entry(address.encode(), raw or b"{}")

    async def page(self, tenant: str, cursor: int, limit: int) -> SuppressionPage:
        """About ``limit`` entries from ``cursor`` (0: the start), in no particular order
        across pages (HSCAN: an address on the list throughout is listed at least once)."""
        info = self._keys.suppression_info(tenant)
        found: dict[bytes, bytes] = {}
        with translate_errors():
            total = await self._client.scard(self._keys.suppressed(tenant))
            for _ in range(_MAX_SCANS):
                cursor, batch = await self._client.hscan(info, cursor, count=limit)
                found.update(batch)
                if cursor == 0 or len(found) >= limit:
                    break
        items = sorted((_entry(a, v) for a, v in found.items()), key=lambda s: s.address)
        return SuppressionPage(total, items, int(cursor))

    async def count(self, tenant: str) -> int:
        with translate_errors():
            n: Any = await self._client.scard(self._keys.suppressed(tenant))
        return int(n)
