"""Hot-path handlers in raw ASGI: POST /v1/messages[/batch], GET /v1/messages/{id}.

Raw ASGI rather than Quart routes because these run for every message: Quart's
request/response machinery costs ~20 % of a request on its own (measured; README).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

import msgspec
import trio

from engine.api.asgi import (
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    header,
    read_body,
    send_json,
    send_problem,
)
from engine.config import HttpSettings
from engine.errors import QueueError, QueueUnavailable, ValidationError
from engine.ids import is_id, new_id, new_ids
from engine.models import Accepted, BatchAccepted, BatchIn, JobView, MessageIn, ms_to_iso, normalize
from engine.queue import Queue
from engine.queue.jobs import EnqueueResult

D = TypeVar("D")

_decode_one = msgspec.json.Decoder(MessageIn).decode
_decode_batch = msgspec.json.Decoder(BatchIn).decode
_encode_msgpack = msgspec.msgpack.Encoder().encode

# msgspec says "... - at `$.messages[0].to`"; unknown fields "... field `x`".
_AT_RE: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_UNKNOWN_RE: Final = re.compile(r"unknown field `(?P<name>[^`]+)`")
_RETRY_AFTER: Final = [(b"retry-after", b"1")]
_REPLAYED: Final = (b"idempotent-replayed", b"true")


def error_field(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(field path, detail) of a msgspec validation error."""
    text = str(exc)
    path = ""
    m = _AT_RE.search(text)
    if m:
        path = m.group("path")
        text = text[: m.start()]
    unknown = _UNKNOWN_RE.search(text)
    if unknown:
        path = f"{path}.{unknown.group('name')}" if path else unknown.group("name")
    if text.startswith("Object missing required field"):
        name = text.rsplit("`", 2)[-2]
        path = f"{path}.{name}" if path else name
    return path or "$", text


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == b"application/json" or mime.endswith(b"+json")


async def _decode(decode: Callable[[bytes], D], body: bytes, send: Send) -> D | None:
    """Decode a JSON body; answer 400 (malformed) or 422 (naming the field) and return
    None when it does not fit."""
    try:
        return decode(body)
    except msgspec.ValidationError as exc:
        field, detail = error_field(exc)
        await send_problem(send, 422, "invalid-field", "Invalid field", detail, field)
    except msgspec.DecodeError as exc:
        await send_problem(send, 400, "malformed-json", "Malformed JSON", str(exc))
    return None


@dataclass(slots=True)
class Ingest:
    queue: Queue
    http: HttpSettings
    default_from: str

    async def _json_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        if not _is_json(header(scope, b"content-type")):
            await send_problem(
                send,
                415,
                "unsupported-media-type",
                "Unsupported Media Type",
                "send the body as JSON with Content-Type: application/json",
            )
            return None
        try:
            return await read_body(scope, receive, self.http.max_body_bytes)
        except BodyTooLarge:
            await send_problem(
                send,
                413,
                "body-too-large",
                "Request body too large",
                f"the body limit is {self.http.max_body_bytes} bytes (http.max_body_bytes)",
            )
            return None

    async def post_message(self, scope: Scope, receive: Receive, send: Send) -> None:
        idem = await self._idempotency_key(scope, send)
        if idem is None:
            return
        body = await self._json_body(scope, receive, send)
        if body is None:
            return
        incoming = await _decode(_decode_one, body, send)
        if incoming is None:
            return
        try:
            message = normalize(incoming, default_from=self.default_from)
        except ValidationError as exc:
            await send_problem(send, 422, "invalid-field", "Invalid field", exc.detail, exc.field)
            return
        result = await self._enqueue(send, [(new_id(), _encode_msgpack(message))], idem, body)
        if result is None:
            return
        job_id = result.ids[0]
        headers = [(b"location", f"/v1/messages/{job_id}".encode())]
        if result.outcome == "replayed":
            await send_json(send, 200, Accepted(job_id), [*headers, _REPLAYED])
        else:
            await send_json(send, 202, Accepted(job_id), headers)

    async def post_batch(self, scope: Scope, receive: Receive, send: Send) -> None:
        idem = await self._idempotency_key(scope, send)
        if idem is None:
            return
        body = await self._json_body(scope, receive, send)
        if body is None:
            return
        batch = await _decode(_decode_batch, body, send)
        if batch is None:
            return
        limit = self.http.max_batch_messages
        if not batch.messages or len(batch.messages) > limit:
            await send_problem(
                send,
                422,
                "invalid-field",
                "Invalid field",
                f"a batch holds 1 to {limit} messages",
                "messages",
            )
            return
        ids = new_ids(len(batch.messages))
        jobs: list[tuple[str, bytes]] = []
        i = 0
        try:
            for i, incoming in enumerate(batch.messages):
                message = normalize(incoming, default_from=self.default_from)
                jobs.append((ids[i], _encode_msgpack(message)))
        except ValidationError as exc:
            field = f"messages[{i}].{exc.field}"
            await send_problem(send, 422, "invalid-field", "Invalid field", exc.detail, field)
            return
        result = await self._enqueue(send, jobs, idem, b"batch:" + body)
        if result is None:
            return
        if result.outcome == "replayed":
            await send_json(send, 200, BatchAccepted(result.ids), [_REPLAYED])
        else:
            await send_json(send, 202, BatchAccepted(result.ids))

    async def _idempotency_key(self, scope: Scope, send: Send) -> str | None:
        """The request's Idempotency-Key ('' when absent); None after answering 400."""
        raw = header(scope, b"idempotency-key")
        if raw is None:
            return ""
        key = raw.decode("latin-1").strip()
        if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
            await send_problem(
                send, 400, "invalid-header", "Invalid Idempotency-Key",
                "the Idempotency-Key header takes 1 to 255 printable ASCII characters",
                "Idempotency-Key",
            )  # fmt: skip
            return None
        return key

    async def _enqueue(
        self, send: Send, jobs: list[tuple[str, bytes]], idem: str, body: bytes
    ) -> EnqueueResult | None:
        """Enqueue; on failure answer the problem and return None."""
        fingerprint = hashlib.blake2b(body, digest_size=16).hexdigest() if idem else ""
        result: EnqueueResult | None = None
        try:
            with trio.move_on_after(self.http.enqueue_timeout_s):
                result = await self.queue.enqueue(
                    jobs, idempotency_key=idem, fingerprint=fingerprint
                )
        except QueueUnavailable:
            await send_problem(
                send,
                503,
                "queue-unavailable",
                "Queue unavailable",
                "the message was NOT accepted; retry shortly",
                extra_headers=_RETRY_AFTER,
            )
            return None
        except QueueError as exc:
            await send_problem(
                send,
                503,
                "queue-error",
                "Queue error",
                f"the message was NOT accepted: {exc}",
                extra_headers=_RETRY_AFTER,
            )
            return None
        if result is None:
            await send_problem(
                send, 503, "queue-timeout", "Queue did not answer in time",
                f"Redis did not confirm within {self.http.enqueue_timeout_s}s: the message may "
                "or may not have been stored; retry with the same Idempotency-Key to be safe",
                extra_headers=_RETRY_AFTER,
            )  # fmt: skip
            return None
        if result.outcome == "conflict":
            await send_problem(
                send, 409, "idempotency-conflict", "Idempotency-Key reused",
                "this Idempotency-Key was used for a different request body in the last "
                "24 h; use a new key for a new request", "Idempotency-Key",
            )  # fmt: skip
            return None
        return result

    async def get_message(self, job_id: str, send: Send) -> None:
        if not is_id(job_id):
            await send_problem(send, 404, "not-found", "No such message", f"unknown id {job_id!r}")
            return
        try:
            rec = await self.queue.get(job_id)
        except QueueError as exc:
            await send_problem(
                send,
                503,
                "queue-unavailable",
                "Queue unavailable",
                str(exc),
                extra_headers=_RETRY_AFTER,
            )
            return
        if rec is None:
            await send_problem(send, 404, "not-found", "No such message", f"unknown id {job_id!r}")
            return
        next_attempt_at = None
        if rec.state == "retrying" and rec.next_attempt_at_ms:
            next_attempt_at = ms_to_iso(rec.next_attempt_at_ms)
        view = JobView(
            rec.id,
            rec.state,
            rec.attempts,
            ms_to_iso(rec.created_at_ms),
            ms_to_iso(rec.updated_at_ms),
            rec.last_error,
            next_attempt_at,
        )
        await send_json(send, 200, view)
