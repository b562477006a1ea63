"""Webhook state in Redis: endpoint records, the event stream's consumer group that
feeds them, and the deliveries owed (a sorted set by when to try next, one hash each).

An event reaches an endpoint at least once: a dispatcher turns stream entries into
deliveries and acknowledges the entries in one transaction (re-doing it after a crash
adds nothing: members and records are added only when absent); a claimed delivery is
leased, not removed, until it succeeds or is given up. Records are opaque bytes here
(their format belongs to ``engine.webhooks``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from coredis.tokens import PureToken

from engine.keys import Keys
from engine.queue.groups import Entry, StreamGroup
from engine.queue.redis import Redis, Scripts, translate_errors
from engine.queue.resp import RespConnection

GROUP: Final = "webhooks"
_NX: Final = PureToken.NX
_XX: Final = PureToken.XX
_ATTEMPTS_KEPT: Final = 100
_OWE_CHUNK: Final = 2000


@dataclass(frozen=True, slots=True)
class Owed:
    """One delivery in hand: ``member`` is ``<endpoint id>|<event id>``."""

    member: str
    event: bytes  # the event's JSON as it will be posted
    attempts: int  # made before this one
    first_ms: int  # when it was first owed

    @property
    def endpoint(self) -> str:
        return self.member.partition("|")[0]

    @property
    def event_id(self) -> str:
        return self.member.partition("|")[2]


class WebhookStore:
    """Endpoints, the stream's "webhooks" consumer group and the deliveries owed. The
    group is read over ``reader``, a lean connection (``engine.queue.groups``); it opens
    a socket only when the dispatcher first reads (an api-only replica never does)."""

    def __init__(self, client: Redis, keys: Keys, reader: RespConnection) -> None:
        self.client = client
        self.keys = keys
        self.group = StreamGroup(keys.events, GROUP, reader)
        self._scripts = Scripts(client)

    async def aclose(self) -> None:
        await self.group.aclose()

    # -- endpoints ---------------------------------------------------------------------

    async def endpoints(self) -> dict[str, bytes]:
        with translate_errors():
            raw = await self.client.hgetall(self.keys.webhooks)
        return {k.decode(): v for k, v in raw.items()}

    async def endpoint(self, endpoint_id: str) -> bytes | None:
        with translate_errors():
            return await self.client.hget(self.keys.webhooks, endpoint_id)

    async def put_endpoint(self, endpoint_id: str, record: bytes) -> None:
        with translate_errors():
            await self.client.hset(self.keys.webhooks, {endpoint_id: record})

    async def delete_endpoint(self, endpoint_id: str) -> bool:
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                gone = p.hdel(self.keys.webhooks, [endpoint_id])
                p.delete([self.keys.webhook_attempts(endpoint_id)])
            return bool(await gone)

    async def record_attempt(self, endpoint_id: str, attempt: bytes) -> None:
        key = self.keys.webhook_attempts(endpoint_id)
        with translate_errors():
            async with self.client.pipeline(transaction=False) as p:
                p.lpush(key, [attempt])
                p.ltrim(key, 0, _ATTEMPTS_KEPT - 1)

    async def attempts(self, endpoint_id: str, limit: int) -> list[bytes]:
        with translate_errors():
            return list(
                await self.client.lrange(self.keys.webhook_attempts(endpoint_id), 0, limit - 1)
            )

    # -- the stream's consumer group -----------------------------------------------------

    async def ensure_group(self) -> None:
        """The group starts at the stream's end: endpoints get events from now on."""
        await self.group.create("$")

    async def read(self, consumer: str, *, count: int, block_ms: int) -> list[Entry]:
        """New entries for this consumer (they stay pending until ``fan_out`` acks them)."""
        return await self.group.read(consumer, count=count, block_ms=block_ms)

    async def idle(self) -> bool:
        """With no endpoint at all, skip the group to the stream's end (True); else False."""
        moved = await self.group.run(
            self._scripts["webhook_idle"], [self.keys.webhooks, self.keys.events], [GROUP]
        )
        return bool(moved)

    async def lag(self) -> tuple[int | None, int]:
        """(entries of the stream the group has not read yet -- None when Redis cannot
        tell --, entries read and not yet acknowledged)."""
        with translate_errors():
            groups: Any = await self.client.xinfo_groups(self.keys.events)
        for g in groups or ():
            if g.get(b"name") == GROUP.encode():
                lag = g.get(b"lag")
                return (None if lag is None else int(lag)), int(g.get(b"pending") or 0)
        return None, 0

    async def reclaim(self, consumer: str, *, idle_ms: int, count: int) -> list[Entry]:
        """Entries a dead dispatcher read and never acknowledged (idle ``idle_ms``)."""
        return await self.group.reclaim(consumer, idle_ms=idle_ms, count=count)

    async def fan_out(
        self,
        deliveries: Sequence[tuple[str, bytes]],
        entry_ids: Sequence[str],
        now_ms: int,
        attempts: Mapping[str, Sequence[bytes]] | None = None,
    ) -> int:
        """Owe each ``(member, event JSON)`` (unless already owed), record ``attempts``
        (endpoint id -> attempts, oldest first) and acknowledge the entries they came
        from, in one script; the number newly owed."""
        owed = 0
        # Chunks keep each script call's argument list bounded; the entries are
        # acknowledged with the last one (a crash before it redoes all: nothing doubles).
        chunks = [deliveries[i : i + _OWE_CHUNK] for i in range(0, len(deliveries), _OWE_CHUNK)]
        chunks = chunks or [[]]
        for n, chunk in enumerate(chunks):
            last = n == len(chunks) - 1
            acks = entry_ids if last else []
            lists = (attempts or {}) if last else {}
            if not chunk and not acks and not lists:
                continue
            args: list[str | bytes | int] = [
                self.keys.webhook_delivery(""), now_ms, GROUP, len(acks), len(lists),
                _ATTEMPTS_KEPT, *acks,
            ]  # fmt: skip
            for endpoint_id, made in lists.items():
                args += [self.keys.webhook_attempts(endpoint_id), len(made), *made]
            for member, event in chunk:
                args += [member, event]
            out = await self.group.run(
                self._scripts["webhook_owe"], [self.keys.webhook_due, self.keys.events], args
            )
            owed += int(out)
        return owed

    # -- deliveries owed -----------------------------------------------------------------

    async def claim(self, now_ms: int, *, lease_ms: int, count: int) -> list[Owed]:
        with translate_errors():
            flat: Any = await self._scripts["webhook_claim"](
                keys=[self.keys.webhook_due],
                args=[now_ms, lease_ms, count, self.keys.webhook_delivery("")],
            )
        return [
            Owed(flat[i].decode(), flat[i + 1], int(flat[i + 2]), int(flat[i + 3]))
            for i in range(0, len(flat), 4)
        ]

    async def retry(self, member: str, due_ms: int) -> None:
        """Try again at ``due_ms`` (one more attempt counted)."""
        await self.finish(endpoint_id="", attempt=None, retry=[member], due_ms=due_ms)

    async def finish(
        self,
        *,
        endpoint_id: str,
        attempt: bytes | None,
        settle: Sequence[str] = (),
        retry: Sequence[str] = (),
        due_ms: int = 0,
    ) -> None:
        """After one request: the deliveries it settled, those to try again at ``due_ms``
        (one more attempt counted each), and the attempt to record -- one round trip."""
        k = self.keys
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                if settle:
                    p.zrem(k.webhook_due, list(settle))
                    p.delete([k.webhook_delivery(m) for m in settle])
                for member in retry:
                    p.hincrby(k.webhook_delivery(member), "attempts", 1)
                if retry:
                    p.zadd(k.webhook_due, dict.fromkeys(retry, due_ms), condition=_XX)
                if attempt is not None:
                    key = k.webhook_attempts(endpoint_id)
                    p.lpush(key, [attempt])
                    p.ltrim(key, 0, _ATTEMPTS_KEPT - 1)

    async def postpone(self, members: Sequence[str], due_ms: int) -> None:
        """Not tried (its endpoint is paused): due again at ``due_ms``, no attempt counted."""
        if not members:
            return
        with translate_errors():
            await self.client.zadd(
                self.keys.webhook_due, dict.fromkeys(members, due_ms), condition=_XX
            )

    async def settle(self, members: Sequence[str]) -> None:
        """Delivered, or given up: no longer owed."""
        if not members:
            return
        with translate_errors():
            async with self.client.pipeline(transaction=True) as p:
                p.zrem(self.keys.webhook_due, list(members))
                p.delete([self.keys.webhook_delivery(m) for m in members])

    async def owed(self) -> int:
        with translate_errors():
            return int(await self.client.zcard(self.keys.webhook_due))
