"""Attachment blobs in Redis: ``<shard>blob:<sha256>`` strings, written once, their expiry
raised (never lowered) to cover the longest-kept job that names them.

Imports the leaves and the queue's Redis adapter; decides nothing about messages.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Final

from engine.attachments import HEAD_BYTES, BlobInfo
from engine.config import QueueSettings
from engine.errors import QueueError
from engine.keys import Keys
from engine.queue.redis import Redis, Scripts, translate_errors

# Most bytes one MGET asks for: a batch that names more is read in several.
FETCH_BYTES: Final = 32 * 1024 * 1024
# Larger values go to Redis and come back a piece of this many bytes at a time: coredis
# holds the loop ~3 ms for a 128 KiB command, ~20 ms for a 10 MiB one (measured).
PIECE_BYTES: Final = 128 * 1024
# Seconds an upload's partial key lives when it is never committed (client gone).
UPLOAD_TTL_S: Final = 3600


class BlobStore:
    """The blobs of one queue shard."""

    def __init__(self, client: Redis, keys: Keys, queue: QueueSettings | None = None) -> None:
        self.client = client
        self.keys = keys
        self.queue = queue or QueueSettings()
        self._scripts = Scripts(client)

    def keep_s(
        self,
        *,
        now_ms: int,
        due_ms: int = 0,
        expires_ms: int = 0,
        lane: str = "normal",
        retry_for_s: float | None = None,
    ) -> int:
        """Seconds from now a blob must last for a job that names it (0 = for ever): until
        the job's deadline (its own or its lane's), else until its retries may end, then
        as long as its record is kept (the longer of queue.keep_sent_s and keep_failed_s:
        a dead letter retried by hand needs its attachments). A job kept for ever keeps
        them for ever."""
        q = self.queue
        if not q.keep_sent_s or not q.keep_failed_s:
            return 0
        start_ms = max(now_ms, due_ms)
        lane_ttl_s = q.lane_ttl_s.get(lane, 0.0)
        if expires_ms <= 0 and lane_ttl_s > 0:
            expires_ms = start_ms + int(lane_ttl_s * 1000)
        if expires_ms > 0:
            end_ms = expires_ms
        else:
            retry_s = retry_for_s or q.retry_for_s
            if not retry_s:
                return 0  # retried without end
            end_ms = start_ms + int(retry_s * 1000)
        return math.ceil(max(0, end_ms - now_ms) / 1000) + max(q.keep_sent_s, q.keep_failed_s)

    async def look(self, wanted: Collection[tuple[str, str]]) -> dict[tuple[str, str], BlobInfo]:
        """Size and first bytes of each blob of ``wanted`` (tenant, id) that exists and
        that tenant gave (uploaded or sent inline): others' blobs are not seen. One
        round trip."""
        if not wanted:
            return {}
        ordered = list(wanted)
        k = self.keys
        with translate_errors():
            async with self.client.pipeline(transaction=False) as p:
                replies = [
                    (
                        p.exists([k.blob_ref(tenant, blob_id)]),
                        p.strlen(k.blob(blob_id)),
                        p.getrange(k.blob(blob_id), 0, HEAD_BYTES - 1),
                    )
                    for tenant, blob_id in ordered
                ]
            found: dict[tuple[str, str], BlobInfo] = {}
            for pair, (granted, size, head) in zip(ordered, replies, strict=True):
                n = await size
                if await granted and n:
                    found[pair] = BlobInfo(n, bytes(await head))
        return found

    async def hold(
        self, blobs: Iterable[tuple[str, str, bytes]], keep_s: int
    ) -> list[tuple[str, str]]:
        """Make each blob of ``blobs`` (tenant, id, its bytes or b"" when it is stored
        already) last at least ``keep_s`` seconds from now (0: for ever) -- and the
        tenant's right to name it -- writing the bytes first when it is new. Returns the
        (tenant, id) given no bytes whose blob does not exist (nothing to hold)."""
        ordered = list({(t, i): b for t, i, b in blobs}.items())
        if not ordered:
            return []
        k = self.keys
        keys: list[str] = []
        args: list[str | int | bytes] = [keep_s]
        for (tenant, blob_id), content in ordered:
            keys += [k.blob(blob_id), k.blob_ref(tenant, blob_id)]
            args += [content, b"1"]
        with translate_errors():
            out: Any = await self._scripts["blob_hold"](keys=keys, args=args)
        return [ordered[(int(n) - 1) // 2][0] for n in out]

    async def fetch(self, ids: Sequence[str], sizes: Sequence[int]) -> list[bytes | None]:
        """The bytes of each blob of ``ids`` (None where it does not exist), whose
        ``sizes`` are known: the small ones with one MGET (one per FETCH_BYTES), each
        large one a PIECE_BYTES range at a time (one large reply would hold the loop)."""
        out: dict[int, bytes | None] = {}
        small = [n for n, size in enumerate(sizes) if size <= PIECE_BYTES]
        start = 0
        while start < len(small):
            end, total = start, 0
            while end < len(small) and (end == start or total + sizes[small[end]] <= FETCH_BYTES):
                total += sizes[small[end]]
                end += 1
            group = small[start:end]
            with translate_errors():
                got = await self.client.mget([self.keys.blob(ids[n]) for n in group])
            out.update(
                (n, None if b is None else bytes(b)) for n, b in zip(group, got, strict=True)
            )
            start = end
        for n, size in enumerate(sizes):
            if size > PIECE_BYTES:
                out[n] = await self._read(self.keys.blob(ids[n]), size)
        return [out[n] for n in range(len(ids))]

    async def _read(self, key: str, size: int) -> bytes | None:
        pieces: list[bytes] = []
        with translate_errors():
            for start in range(0, size, PIECE_BYTES):
                piece = await self.client.getrange(key, start, start + PIECE_BYTES - 1)
                if not piece:
                    return None
                pieces.append(bytes(piece))
        return b"".join(pieces)

    # -- uploads: streamed in, a piece at a time ---------------------------------------

    async def append(self, token: str, piece: bytes, *, first: bool) -> None:
        """Add ``piece`` to the upload ``token`` (its first: the key starts, expiring in
        UPLOAD_TTL_S unless committed)."""
        key = self.keys.blob_upload(token)
        with translate_errors():
            if first:
                await self.client.set(key, piece, ex=UPLOAD_TTL_S)
            else:
                await self.client.append(key, piece)

    async def commit(self, token: str, tenant: str, blob_id: str, size: int, keep_s: int) -> bool:
        """The upload ``token`` (``size`` bytes, SHA-256 ``blob_id``) becomes its blob,
        which ``tenant`` may name; both last at least ``keep_s`` (0: for ever). True
        when the blob is new. QueueError when the upload is not all there."""
        k = self.keys
        keys = [k.blob_upload(token), k.blob(blob_id), k.blob_ref(tenant, blob_id)]
        with translate_errors():
            out: Any = await self._scripts["blob_commit"](keys=keys, args=[keep_s, size])
        if int(out) < 0:
            raise QueueError(f"upload {token}: the bytes stored are not the upload's")
        return int(out) == 1

    async def discard(self, token: str) -> None:
        """Drop an upload that will not be committed."""
        with translate_errors():
            await self.client.delete([self.keys.blob_upload(token)])

    async def ttl_s(self, blob_id: str) -> int:
        """The blob's TTL: seconds, -1 kept for ever, -2 none such (tests, tools)."""
        with translate_errors():
            return int(await self.client.ttl(self.keys.blob(blob_id)))
