"""The attachments a claimed batch needs, ready for ``compose``: read from Redis with one
MGET for the batch, base64-encoded once, and kept in a per-process LRU bounded in bytes,
so an attachment many messages share is read and encoded once."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

import msgspec
import trio

from engine.bounce import Bounce
from engine.errors import EngineError, PermanentFailure, TemporaryFailure, TransportError
from engine.queue import BlobStore, ClaimedJob, decode_message
from engine.transport import MissingAttachment, attachment_body

log = logging.getLogger(__name__)

# Above this many bytes an attachment is encoded in a worker thread: b64_encode lets the
# GIL go between its 76-character lines, so the loop keeps running (~5 ms a MiB).
ENCODE_THREAD_ABOVE_BYTES: Final = 256 * 1024
MISSING: Final = Bounce("attachment-missing", "dead-letter")


@dataclass(frozen=True, slots=True)
class AttachmentStatistics:
    cached: int  # attachments held encoded
    cached_bytes: int
    hits: int  # wanted and found in the cache
    fetched: int  # read from Redis
    missing: int  # wanted and not in Redis


@dataclass(slots=True)
class Attached:
    """The part bodies (``attachment_body``) a batch's messages name, by SHA-256."""

    bodies: dict[bytes, bytes] = field(default_factory=dict)
    # Why Redis could not be read ("": it was): the attachments are not known missing.
    unavailable: str = ""

    def failure(self, exc: MissingAttachment) -> tuple[TransportError, Bounce | None]:
        """What a message whose attachment is not here failed with: for good when its
        blob is gone (class attachment-missing), to be retried when Redis was not read."""
        if self.unavailable:
            return TemporaryFailure(f"attachments not read: {self.unavailable}"), None
        return PermanentFailure(str(exc)), MISSING


class AttachmentCache:
    """Encoded attachments by SHA-256, least recently used out past ``max_bytes``."""

    def __init__(self, store: BlobStore, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = self._fetched = self._missing = 0

    def statistics(self) -> AttachmentStatistics:
        return AttachmentStatistics(
            len(self._lru), self._bytes, self._hits, self._fetched, self._missing
        )

    async def for_jobs(self, jobs: Iterable[ClaimedJob]) -> Attached:
        """The attachments of ``jobs``' messages (an undecodable one is skipped: the
        sender fails it on its own)."""
        wanted: dict[bytes, int] = {}
        for job in jobs:
            try:
                message = decode_message(job.payload)
            except (msgspec.DecodeError, ValueError):
                continue
            for ref in message.attachments:
                wanted[ref.sha256] = ref.size
        return await self.get(wanted) if wanted else Attached()

    async def get(self, wanted: Mapping[bytes, int]) -> Attached:
        """The part bodies of ``wanted`` (SHA-256 -> size) found, from the cache or Redis."""
        out = Attached()
        absent: list[bytes] = []
        for sha in wanted:
            body = self._lru.get(sha)
            if body is None:
                absent.append(sha)
                continue
            self._lru.move_to_end(sha)
            out.bodies[sha] = body
            self._hits += 1
        if not absent:
            return out
        try:
            raws = await self.store.fetch([s.hex() for s in absent], [wanted[s] for s in absent])
        except EngineError as exc:
            log.warning("sender.attachments.unavailable blobs=%d error=%s", len(absent), exc)
            out.unavailable = str(exc)
            return out
        for sha, raw in zip(absent, raws, strict=True):
            body = None
            if raw is not None and len(raw) > ENCODE_THREAD_ABOVE_BYTES:
                body = await trio.to_thread.run_sync(_checked_body, sha, raw)
            elif raw is not None:
                body = _checked_body(sha, raw)
            if body is None:
                self._missing += 1
                log.warning("sender.attachments.missing sha256=%s", sha.hex())
                continue
            self._fetched += 1
            out.bodies[sha] = body
            self._keep(sha, body)
        return out

    def _keep(self, sha: bytes, body: bytes) -> None:
        if len(body) > self.max_bytes or sha in self._lru:
            return
        self._lru[sha] = body
        self._bytes += len(body)
        while self._bytes > self.max_bytes:
            _, old = self._lru.popitem(last=False)
            self._bytes -= len(old)


def _checked_body(sha: bytes, raw: bytes) -> bytes | None:
    """``raw``'s part body when it is the blob ``sha`` names (None: it is not)."""
    if hashlib.sha256(raw).digest() != sha:
        return None
    return attachment_body(raw)
