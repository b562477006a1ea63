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
from typing import Any, Final, cast

import coredis.exceptions
from coredis.response.types import StreamEntry
from coredis.tokens import PureToken

from engine.errors import QueueError
from engine.keys import Keys
from engine.models import Event
from engine.queue.redis import Redis, Scripts, translate_errors
from engine.queue.resp import RespConnection
from engine.queue.wire import parse_entry, parse_flat_entry

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


# A stream entry read: its id and the events it holds.
Entry = tuple[str, list[Event]]


def _entries(entries: Sequence[StreamEntry]) -> list[Entry]:
    out = []
    for entry in entries:
        raw = entry.identifier
        entry_id = raw.decode() if isinstance(raw, bytes) else str(raw)
        fields = cast(Mapping[bytes, bytes], entry.field_values)
        out.append((entry_id, parse_entry(entry_id, fields)))
    return out


def _flat_entries(entries: Sequence[Any] | None) -> list[Entry]:
    """Entries as the lean connection gives them: ``[id, [field, value, ...]]`` each
    (fields None: an entry deleted while pending -- nothing to deliver, only to ack)."""
    out: list[Entry] = []
    for raw_id, flat in entries or ():
        entry_id = raw_id.decode()
        if not flat:
            out.append((entry_id, []))
            continue
        out.append((entry_id, parse_flat_entry(entry_id, flat)))
    return out


class WebhookStore:
    """``reader``: a lean connection (engine.queue.resp) for the dispatcher's hot path --
    the stream reads on it, the per-read scripts (idle, fan_out) on a twin of it, so a
    blocking read never holds a script up. Without one they go through coredis: ~10x the
    CPU per stream entry, ~4x per script call (measured, README)."""

    def __init__(self, client: Redis, keys: Keys, reader: RespConnection | None = None) -> None:
        self.client = client
        self.keys = keys
        self.reader = reader
        self._runner = reader.twin() if reader is not None else None
        self._scripts = Scripts(client)

    async def aclose(self) -> None:
        for conn in (self.reader, self._runner):
            if conn is not None:
                await conn.aclose()

    async def _run(self, name: str, keys: list[str], args: Sequence[str | bytes | int]) -> Any:
        """Run script ``name`` on the lean twin if there is one (EVALSHA, EVAL when Redis
        does not have it: that loads it too), else through coredis."""
        script = self._scripts[name]
        if self._runner is None:
            with translate_errors():
                return await script(keys=keys, args=args)
        try:
            return await self._runner.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except QueueError as exc:
            if "NOSCRIPT" not in str(exc):
                raise
        return await self._runner.call("EVAL", script.script, len(keys), *keys, *args)

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
        with translate_errors():
            try:
                await self.client.xgroup_create(self.keys.events, GROUP, "$", mkstream=True)
            except coredis.exceptions.RedisError as exc:
                # BUSYGROUP: another replica made it (coredis drops the code from the text)
                text = str(exc)
                if "BUSYGROUP" not in text and "already exists" not in text:
                    raise

    async def read(
        self, consumer: str, *, count: int, block_ms: int
    ) -> list[tuple[str, list[Event]]]:
        """New entries for this consumer (they stay pending until ``fan_out`` acks them)."""
        if self.reader is not None:
            flat: Any = await self.reader.call(
                "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, "BLOCK", block_ms,
                "STREAMS", self.keys.events, ">", block_s=block_ms / 1000,
            )  # fmt: skip
            return _flat_entries(flat[0][1]) if flat else []
        with translate_errors():
            reply = await self.client.xreadgroup(
                GROUP, consumer, {self.keys.events: ">"}, count=count, block=block_ms
            )
        if not reply:
            return []
        return _entries(next(iter(reply.values())))

    async def idle(self) -> bool:
        """With no endpoint at all, skip the group to the stream's end (True); else False."""
        moved = await self._run("webhook_idle", [self.keys.webhooks, self.keys.events], [GROUP])
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

    async def reclaim(
        self, consumer: str, *, idle_ms: int, count: int
    ) -> list[tuple[str, list[Event]]]:
        """Entries a dead dispatcher read and never acknowledged (idle ``idle_ms``)."""
        if self.reader is not None:
            flat: Any = await self.reader.call(
                "XAUTOCLAIM", self.keys.events, GROUP, consumer, idle_ms, "0-0", "COUNT", count
            )
            return _flat_entries(flat[1]) if flat and len(flat) > 1 else []
        with translate_errors():
            reply: Any = await self.client.xautoclaim(
                self.keys.events, GROUP, consumer, idle_ms, "0-0", count=count
            )
        return _entries(reply[1]) if reply and len(reply) > 1 else []

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
            out = await self._run("webhook_owe", [self.keys.webhook_due, self.keys.events], args)
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
