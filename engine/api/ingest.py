"""Hot-path handlers in raw ASGI: POST /v1/messages[/batch], GET and DELETE
/v1/messages/{id}; the ingest's back-pressure answers (429 per client, 503 backlog).

Raw ASGI rather than Quart routes because these run for every message: Quart's
request/response machinery costs ~20 % of a request on its own (measured; README).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
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
from engine.config import HttpSettings, IngestSettings
from engine.errors import QueueError, QueueUnavailable, ValidationError
from engine.ids import is_id, new_ids
from engine.metrics import IngestMetrics, Metrics
from engine.models import DEFAULT_TENANT, Accepted, BatchAccepted, BatchIn, MessageIn
from engine.queue import DrainMeter, EnqueueResult, NewJob, Queue, job_view, new_job

D = TypeVar("D")

_decode_one = msgspec.json.Decoder(MessageIn).decode
_decode_batch = msgspec.json.Decoder(BatchIn).decode

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


def identify(scope: Scope, trusted_proxies: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(client id, default tenant) of a request: its API key (``Authorization: Bearer``
    or ``X-API-Key``), hashed so no secret lands in Redis key names; else its address --
    behind a trusted proxy, the right-most X-Forwarded-For address that is not one."""
    raw = header(scope, b"x-api-key")
    if raw is None:
        auth = header(scope, b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            raw = auth[7:].strip()
    if raw:
        name = "key-" + hashlib.blake2b(raw, digest_size=8).hexdigest()
        return name, name
    client = scope.get("client")
    peer = str(client[0]) if client else "unknown"
    if peer in trusted_proxies:
        forwarded = header(scope, b"x-forwarded-for")
        if forwarded:
            hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
            for hop in reversed(hops):
                peer = hop
                if hop not in trusted_proxies:
                    break
    return "ip-" + peer, DEFAULT_TENANT


@dataclass(slots=True)
class Ingest:
    queue: Queue
    http: HttpSettings
    default_from: str
    ingest: IngestSettings = dataclasses.field(default_factory=IngestSettings)
    # How fast the queue drains (all replicas), for Retry-After when full; None: unknown.
    drain: DrainMeter | None = None
    metrics: IngestMetrics = dataclasses.field(default_factory=lambda: Metrics().ingest)
    _trusted: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self._trusted = frozenset(self.ingest.trusted_proxies)

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
        client, tenant = identify(scope, self._trusted)
        now_ms = self.queue.now_ms()
        try:
            job = new_job(
                incoming, new_ids(1, now_ms)[0], default_from=self.default_from,
                now_ms=now_ms, default_tenant=tenant,
            )  # fmt: skip
        except ValidationError as exc:
            await send_problem(send, 422, "invalid-field", "Invalid field", exc.detail, exc.field)
            return
        result = await self._enqueue(send, [job], idem, body, client)
        if result is None:
            return
        job_id = result.ids[0]
        headers = [(b"location", f"/v1/messages/{job_id}".encode()), *self._limit_headers(result)]
        if result.outcome == "replayed":
            await send_json(send, 200, Accepted(job_id), [*headers, _REPLAYED])
        else:
            accepted = Accepted(job_id, "scheduled" if job.due_ms else "queued")
            await send_json(send, 202, accepted, headers)

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
        client, tenant = identify(scope, self._trusted)
        now_ms = self.queue.now_ms()
        ids = new_ids(len(batch.messages), now_ms)
        jobs: list[NewJob] = []
        i = 0
        try:
            for i, incoming in enumerate(batch.messages):
                job = new_job(
                    incoming, ids[i], default_from=self.default_from, now_ms=now_ms,
                    default_tenant=tenant,
                )  # fmt: skip
                jobs.append(job)
        except ValidationError as exc:
            field = f"messages[{i}].{exc.field}"
            await send_problem(send, 422, "invalid-field", "Invalid field", exc.detail, field)
            return
        result = await self._enqueue(send, jobs, idem, b"batch:" + body, client)
        if result is None:
            return
        headers = self._limit_headers(result)
        if result.outcome == "replayed":
            await send_json(send, 200, BatchAccepted(result.ids), [*headers, _REPLAYED])
        else:
            await send_json(send, 202, BatchAccepted(result.ids), headers)

    def _limit_headers(self, result: EnqueueResult) -> list[tuple[bytes, bytes]]:
        """RateLimit-* headers (IETF draft names) while per-client limits are on."""
        rate = self.ingest.client_rate_per_s
        if rate <= 0 or result.value < 0:
            return []
        burst = self.ingest.client_burst_or_default()
        reset = math.ceil((burst - result.value) / rate)
        return [
            (b"ratelimit-limit", str(burst).encode()),
            (b"ratelimit-remaining", str(result.value).encode()),
            (b"ratelimit-reset", str(reset).encode()),
        ]

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
        self, send: Send, jobs: list[NewJob], idem: str, body: bytes, client: str
    ) -> EnqueueResult | None:
        """Enqueue; on failure answer the problem and return None."""
        fingerprint = hashlib.blake2b(body, digest_size=16).hexdigest() if idem else ""
        if self.ingest.client_rate_per_s <= 0:
            client = ""  # not limited: skip the bucket
        result: EnqueueResult | None = None
        try:
            with trio.move_on_after(self.http.enqueue_timeout_s):
                result = await self.queue.enqueue(
                    jobs, idempotency_key=idem, fingerprint=fingerprint, client=client
                )
        except QueueUnavailable:
            self.metrics.rejected("queue-unavailable")
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
            self.metrics.rejected("queue-error")
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
            self.metrics.rejected("queue-timeout")
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
        if result.outcome == "limited":
            self.metrics.rejected("rate-limited")
            await self._too_many(send, result.value, len(jobs))
            return None
        if result.outcome == "backlog":
            self.metrics.rejected("backlog-full")
            await self._backlog_full(send, result.value)
            return None
        if result.outcome == "stored":
            self.metrics.accepted(len(jobs))
        return result

    async def _too_many(self, send: Send, retry_ms: int, n: int) -> None:
        rate, burst = self.ingest.client_rate_per_s, self.ingest.client_burst_or_default()
        headers = [(b"ratelimit-limit", str(burst).encode()), (b"ratelimit-remaining", b"0")]
        if retry_ms < 0:  # can never pass: larger than the whole burst
            await send_problem(
                send, 429, "rate-limited", "Too many messages",
                f"{n} messages at once exceed this client's burst of {burst} "
                "(ingest.client_burst); split the batch", "messages",
                extra_headers=headers,
            )  # fmt: skip
            return
        retry = str(max(1, math.ceil(retry_ms / 1000))).encode()
        await send_problem(
            send, 429, "rate-limited", "Too many messages",
            f"this client may submit {rate:g} messages/s (ingest.client_rate_per_s); "
            "nothing was stored: retry after Retry-After seconds",
            extra_headers=[(b"retry-after", retry), *headers, (b"ratelimit-reset", retry)],
        )  # fmt: skip

    async def _backlog_full(self, send: Send, backlog: int) -> None:
        high = self.ingest.max_backlog
        rate = self.drain.rate() if self.drain is not None else 0.0
        retry = backlog_retry_after_s(backlog, high, rate)
        await send_problem(
            send, 503, "backlog-full", "Backlog full",
            f"{backlog} messages are waiting (ingest.max_backlog = {high}); nothing was "
            "stored: retry after Retry-After seconds",
            extra_headers=[(b"retry-after", str(retry).encode())],
        )  # fmt: skip

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
        await send_json(send, 200, job_view(rec))

    async def cancel_message(self, job_id: str, send: Send) -> None:
        """DELETE /v1/messages/{id}: 200 cancelled; 409 once processing or finished."""
        if not is_id(job_id):
            await send_problem(send, 404, "not-found", "No such message", f"unknown id {job_id!r}")
            return
        try:
            outcome, state = await self.queue.cancel(job_id)
        except QueueError as exc:
            await send_problem(
                send, 503, "queue-unavailable", "Queue unavailable", str(exc),
                extra_headers=_RETRY_AFTER,
            )  # fmt: skip
            return
        if outcome == "unknown":
            await send_problem(send, 404, "not-found", "No such message", f"unknown id {job_id!r}")
        elif outcome == "too_late":
            await send_problem(
                send, 409, "not-cancellable", "Too late to cancel",
                f"the message is {state}; only queued, scheduled or retrying messages can be "
                "cancelled",
            )  # fmt: skip
        else:
            await send_json(send, 200, Accepted(job_id, "cancelled"))


def backlog_retry_after_s(backlog: int, high_water: int, drain_per_s: float) -> int:
    """Seconds until the backlog should be back under 90 % of its high-water mark at the
    measured drain rate (1 to 300; 60 when nothing drains)."""
    if drain_per_s <= 0:
        return 60
    excess = backlog - 0.9 * high_water
    return max(1, min(300, math.ceil(excess / drain_per_s)))
