"""Attachments at the API: ``POST /v1/attachments`` (the raw bytes, hashed as they stream
in) and what ingest needs for messages that carry attachments -- the uploaded blobs they
name, looked up for their tenant, and every blob held (stored once, its expiry raised to
cover the jobs) right before those jobs are enqueued.

A tenant may name an uploaded blob only if it gave those bytes itself (uploaded or sent
inline): ids are content hashes, and another tenant's are not for it to send.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import msgspec
import trio

from engine.api.exchange import Fail, Reply, Request, invalid, json_reply, requested_tenant
from engine.api.ingest import TrustedProxies, identify
from engine.attachments import (
    GENERIC_TYPE,
    HEAD_BYTES,
    AttachmentLimits,
    BlobIndex,
    BlobInfo,
    clean_filename,
    content_type_for,
    is_blob_id,
)
from engine.auth import UNCHECKED
from engine.config import AttachmentSettings, IngestSettings
from engine.errors import QueueError, ValidationError
from engine.models import MessageIn, check_tenant
from engine.queue import BlobStore, NewJob, Queue

UPLOAD_PATH: Final = "/v1/attachments"
# An upload goes to Redis (and through SHA-256) a piece of this many bytes at a time: one
# 128 KiB APPEND holds the loop ~1-3 ms, one 10 MiB SET ~20 ms (coredis, measured).
UPLOAD_PIECE_BYTES: Final = 128 * 1024
_RETRY_AFTER_30: Final = [(b"retry-after", b"30")]


class AttachmentView(msgspec.Struct, omit_defaults=True):
    """Answer of POST /v1/attachments: name it in a message as ``attachment_id``."""

    id: str  # SHA-256 of the bytes, hex
    size: int  # bytes
    content_type: str  # as given (checked against the bytes), else what they are
    filename: str | None = None  # ?filename=, without directories
    expires_in_s: int = 0  # while no message names it; a message keeps it longer


@dataclass(slots=True)
class RequestBlobs:
    """The blobs of one send request, one ``BlobIndex`` per tenant its messages are for."""

    limits: AttachmentLimits
    default_tenant: str
    uploaded: dict[tuple[str, str], BlobInfo] = field(default_factory=dict)
    by_tenant: dict[str, BlobIndex] = field(default_factory=dict)

    def of(self, incoming: MessageIn) -> BlobIndex:
        """What ``incoming``'s tenant may use and gives."""
        tenant = incoming.tenant if incoming.tenant is not None else self.default_tenant
        index = self.by_tenant.get(tenant)
        if index is None:
            uploaded = {i: info for (t, i), info in self.uploaded.items() if t == tenant}
            index = self.by_tenant[tenant] = BlobIndex(uploaded, self.limits)
        return index


class Attachments:
    """POST /v1/attachments, and the blob steps of ingest (``blobs``, ``hold``)."""

    def __init__(
        self, queue: Queue, settings: AttachmentSettings, ingest: IngestSettings | None = None
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.store = BlobStore(queue.client, queue.keys, queue.settings)
        self.limits = AttachmentLimits(settings.max_bytes, settings.max_message_bytes)
        self._trusted = TrustedProxies((ingest or IngestSettings()).trusted_proxies)

    # -- ingest --------------------------------------------------------------------------

    async def blobs(self, messages: Sequence[MessageIn], default_tenant: str) -> RequestBlobs:
        """The uploaded blobs ``messages`` name, looked up for each one's tenant (one
        round trip; none when they name none)."""
        out = RequestBlobs(self.limits, default_tenant)
        wanted: set[tuple[str, str]] = set()
        for m in messages:
            tenant = m.tenant if m.tenant is not None else default_tenant
            for a in m.attachments:
                blob_id = (a.attachment_id or "").lower()
                if is_blob_id(blob_id) and _plain_tenant(tenant):
                    wanted.add((tenant, blob_id))
        if wanted:
            out.uploaded = await self.store.look(wanted)
        return out

    async def hold(self, blobs: RequestBlobs, jobs: Sequence[tuple[MessageIn, NewJob]]) -> None:
        """Store the request's inline blobs (once each) and make every blob it names
        last as long as the longest-kept of its jobs (EXPIRE GT, in one script, right
        before the enqueue). 422 when an uploaded one vanished since it was looked up;
        503 while Redis is over ingest's memory budget (nothing is written)."""
        held = [
            (tenant, blob_id, index.inline.get(blob_id, b""))
            for tenant, index in blobs.by_tenant.items()
            for blob_id in index.used
        ]
        if not held:
            return
        self._room()
        now_ms = self.queue.now_ms()
        keeps: dict[tuple[int, int, str, float | None], int] = {}  # a batch: a few shapes
        for incoming, job in jobs:
            shape = (job.due_ms, job.expires_ms, job.lane, incoming.retry_for_s)
            if incoming.attachments and shape not in keeps:
                keeps[shape] = self.store.keep_s(
                    now_ms=now_ms, due_ms=job.due_ms, expires_ms=job.expires_ms, lane=job.lane,
                    retry_for_s=incoming.retry_for_s,
                )  # fmt: skip
        found = keeps.values()
        keep_s = 0 if 0 in found else max(found, default=self.settings.unreferenced_ttl_s)
        gone = await self.store.hold(held, keep_s)
        if gone:
            raise invalid(
                "attachments",
                f"the uploaded attachment {gone[0][1]} expired just now: upload it again",
            )

    # -- POST /v1/attachments ------------------------------------------------------------

    async def upload(self, req: Request) -> Reply:
        """POST /v1/attachments?filename=: the raw bytes, any content type. They go to
        Redis as they come, a piece at a time, hashed on the way (no piece holds the
        loop more than a few ms; the whole upload is never held in this process)."""
        tenant = self._tenant(req)
        filename = req.query("filename")
        if filename is not None:
            try:
                filename = clean_filename("filename", filename)
            except ValidationError as exc:
                raise invalid(exc.field, exc.detail, "Invalid query parameter") from None
        declared = _declared_type(req.header(b"content-type"))
        limit = self.settings.max_bytes
        length = req.header(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        self._room()
        token = secrets.token_hex(16)
        digest = hashlib.sha256()
        pending = bytearray()  # received, not yet in Redis: pieces go whole (or last)
        head = b""
        size = stored = 0
        committed = False
        try:
            more = True
            while more:
                message = await req.receive()
                if message["type"] == "http.disconnect":
                    raise Fail(400, "incomplete-body", "Incomplete body", "the client left")
                chunk: bytes = message.get("body", b"")
                more = message.get("more_body", False)
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                if len(head) < HEAD_BYTES:
                    head += chunk[: HEAD_BYTES - len(head)]
                pending += chunk
                while len(pending) >= UPLOAD_PIECE_BYTES or (pending and not more):
                    piece = bytes(pending[:UPLOAD_PIECE_BYTES])
                    del pending[:UPLOAD_PIECE_BYTES]
                    digest.update(piece)
                    await self.store.append(token, piece, first=not stored)
                    stored += len(piece)
            if not size:
                raise invalid("$", "an attachment needs at least one byte", "Empty body")
            try:
                content_type = content_type_for("content_type", declared, head, filename or "")
            except ValidationError as exc:
                raise invalid(exc.field, f"Content-Type: {exc.detail}") from None
            keep_s = self.settings.unreferenced_ttl_s
            blob_id = digest.hexdigest()
            await self.store.commit(token, tenant, blob_id, size, keep_s)
            committed = True
        finally:
            if stored and not committed:
                shielded = trio.CancelScope(shield=True)
                with shielded, trio.move_on_after(2), contextlib.suppress(QueueError):
                    await self.store.discard(token)  # else it expires by itself
        view = AttachmentView(blob_id, size, content_type, filename, keep_s)
        return json_reply(201, view)

    def _room(self) -> None:
        """503 while Redis is over ingest's memory budget: nothing is written then."""
        if self.queue.memory.statistics().full:
            raise Fail(
                503, "backlog-full", "Backlog full",
                "Redis is over ingest's memory budget (ingest.max_memory_ratio); nothing was "
                "stored: retry after Retry-After seconds", headers=_RETRY_AFTER_30,
            )  # fmt: skip

    def _tenant(self, req: Request) -> str:
        """Whose upload: ``?tenant=`` (one the key acts for), else the key's tenant (with
        auth off, the tenant ingest gives the same client's messages)."""
        p = req.principal
        given = requested_tenant(req)
        if given is not None:
            return given
        if p.kid and p is not UNCHECKED:
            return p.tenant
        return identify(req, self._trusted)[1]


def _plain_tenant(tenant: str) -> bool:
    try:
        check_tenant("tenant", tenant)
    except ValidationError:
        return False
    return True


def _declared_type(header: bytes | None) -> str | None:
    """The upload's Content-Type without parameters; None when it says nothing (absent,
    or application/octet-stream: any bytes)."""
    if header is None:
        return None
    mime = header.split(b";", 1)[0].strip().decode("latin-1").lower()
    return None if not mime or mime == GENERIC_TYPE else mime


def _too_large(limit: int) -> Fail:
    return Fail(
        413, "body-too-large", "Request body too large",
        f"the body limit is {limit} bytes (attachments.max_bytes)",
    )  # fmt: skip
