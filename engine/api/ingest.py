"""The hot-path handlers: POST /v1/messages[/batch], GET and DELETE /v1/messages/{id};
the ingest's back-pressure answers (429 per client, 503 backlog, 503 draining).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from engine.api.exchange import (
    RETRY_AFTER_1,
    Fail,
    Reply,
    Request,
    invalid,
    json_reply,
    not_found,
    parse_json,
    refuse_repeated_keys,
)
from engine.api.guard import presented_key
from engine.api.history import HistoryRoutes, job_view_of, prior_result
from engine.api.history import behind as history_behind
from engine.api.preview import HTML_HEADERS, preview_of
from engine.api.templates import Templates
from engine.api.unsubscribe import Unsubscribe
from engine.auth import UNCHECKED, AccessTable, Principal, check_may_send
from engine.config import HttpSettings, IngestSettings
from engine.errors import QueueError, QueueUnavailable, ValidationError
from engine.history import History
from engine.ids import is_id, new_ids
from engine.metrics import IngestMetrics, Metrics
from engine.models import (
    DEFAULT_TENANT,
    Accepted,
    BatchAccepted,
    BatchIn,
    JobView,
    MessageIn,
    bare_address,
    check_batch_json,
    check_message_json,
    decode_batch_json,
    decode_message_json,
)
from engine.queue import DrainMeter, EnqueueResult, NewJob, Queue, job_view, new_job
from engine.unsubscribe import list_name

if TYPE_CHECKING:  # engine.api.attachments imports this module
    from engine.api.attachments import Attachments, RequestBlobs

_decode_one = msgspec.json.Decoder(MessageIn).decode
_decode_batch = msgspec.json.Decoder(BatchIn).decode
# Above this many bytes a message (a body, or one message of a batch) is first looked at
# with its values left as raw JSON (engine.models.check_message_json: 0.3-3 ms a MiB),
# so no list or object of millions of items is built before its 422. Below it, the
# most msgspec can be made to build before one is ~16k tiny items (~1 ms): small
# bodies are decoded as they always were.
PRECHECK_ABOVE_BYTES: Final = 64 * 1024

_YIELD_EVERY: Final = 100  # messages of a batch validated between turns of the loop
# A single message larger than this lets the loop run between its steps (decode, the
# duplicate-key check, building the job): 2 MiB of non-ASCII text costs ~5 + 10 + 9 ms.
YIELD_ABOVE_BYTES: Final = 256 * 1024
_RETRY_AFTER: Final = [RETRY_AFTER_1]
_REPLAYED: Final = (b"idempotent-replayed", b"true")


class AttachedFile(msgspec.Struct):
    """A file a message carries, as GET /v1/messages/{id} lists it (not its bytes)."""

    filename: str
    content_type: str
    size: int  # bytes, decoded
    inline: bool  # Content-Disposition: inline (next to the html), else attachment
    content_id: str | None  # what the html's <img src="cid:..."> names, if any


class MessageView(JobView):
    """Answer of GET /v1/messages/{id}: the job record and the files its message carries."""

    attachments: list[AttachedFile] = []


def _no_such(job_id: str) -> Fail:
    return not_found("No such message", f"unknown id {job_id!r}")


def parse_message(body: bytes) -> MessageIn:
    """POST /v1/messages's body decoded, a large one looked at first; 422 naming the
    field, 400 when malformed. Not yet the duplicate-key check (``refuse_repeated_keys``)."""
    if len(body) > PRECHECK_ABOVE_BYTES:
        _precheck(body)
    return parse_json(_decode_one, body)


def parse_batch(body: bytes, http: HttpSettings) -> tuple[list[MessageIn], int]:
    """POST /v1/messages/batch's body decoded, and its recipients counted; 422 naming the
    field, 400 when malformed. In two steps: its messages are counted before any is
    decoded (then the large ones looked at), so a batch over
    ``http.max_batch_messages`` costs a scan, not a million structs; then the whole body
    is decoded once more, so errors keep their place (``messages[3].to``). Not yet the
    duplicate-key check (``refuse_repeated_keys``)."""
    skeleton = parse_json(decode_batch_json, body)
    raws = skeleton.messages
    limit = http.max_batch_messages
    if not raws or len(raws) > limit:
        raise invalid("messages", f"a batch holds 1 to {limit} messages")
    try:
        check_batch_json(body, skeleton)
    except ValidationError as exc:
        raise invalid(exc.field, exc.detail) from None
    if max(map(len, raws)) > PRECHECK_ABOVE_BYTES:
        for i, raw in enumerate(raws):
            if len(raw) > PRECHECK_ABOVE_BYTES:
                _precheck(raw, f"messages[{i}].")
    messages = parse_json(_decode_batch, body).messages
    recipients = sum(_count(m.to) + _count(m.cc) + _count(m.bcc) for m in messages)
    if recipients > http.max_batch_recipients:
        raise invalid(
            "messages",
            f"a batch's messages have {recipients} recipients together, more than "
            f"{http.max_batch_recipients} (http.max_batch_recipients): split it",
        )
    return messages, recipients


def _precheck(raw: bytes, at: str = "") -> None:
    """Refuse a large message before it is decoded (engine.models.check_message_json)."""
    fields = parse_json(decode_message_json, raw, at)
    try:
        check_message_json(raw, fields, field_prefix=at)
    except ValidationError as exc:
        raise invalid(exc.field, exc.detail) from None


class TrustedProxies:
    """Addresses and CIDR ranges (``ingest.trusted_proxies``) whose X-Forwarded-For
    is believed: load balancers in front of the engine."""

    def __init__(self, entries: list[str]) -> None:
        self._networks = [ipaddress.ip_network(e.strip(), strict=False) for e in entries]

    def __contains__(self, address: str) -> bool:
        if not self._networks:
            return False
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        return any(ip in net for net in self._networks)


def client_address(req: Request, trusted: TrustedProxies) -> str:
    """The client's address: the peer's; behind trusted proxies, the right-most address of
    X-Forwarded-For (all its header lines, in order) that is not a trusted proxy."""
    client = req.scope.get("client")
    peer = str(client[0]) if client else "unknown"
    if peer not in trusted:
        return peer
    hops = [
        hop.strip()
        for line in req.header_values(b"x-forwarded-for")
        for hop in line.decode("latin-1").split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        peer = hop
        if hop not in trusted:
            break
    return peer


def identify(req: Request, trusted: TrustedProxies) -> tuple[str, str]:
    """(client id, default tenant) of a request when auth is off: the key it presents,
    hashed so no secret lands in Redis key names; else its address."""
    key = presented_key(req.scope)
    if key:
        name = "key-" + hashlib.blake2b(key.encode("latin-1"), digest_size=8).hexdigest()
        return name, name
    return "ip-" + client_address(req, trusted), DEFAULT_TENANT


@dataclass(slots=True)
class Ingest:
    queue: Queue
    http: HttpSettings
    default_from: str
    ingest: IngestSettings = dataclasses.field(default_factory=IngestSettings)
    # How fast the queue drains (all replicas), for Retry-After when full; None: unknown.
    drain: DrainMeter | None = None
    metrics: IngestMetrics = dataclasses.field(default_factory=lambda: Metrics().ingest)
    # Set while this replica shuts down: new messages get 503 (draining).
    stopping: trio.Event | None = None
    # Tenants' sender identities (auth on); None: auth off, no identity rule.
    access: AccessTable | None = None
    # Tenants' templates, for sends that name one; None: templates are not offered.
    templates: Templates | None = None
    # One-click unsubscribe links, for sends that ask for them; None: not offered.
    unsubscribe: Unsubscribe | None = None
    # Stores and checks the blobs of messages with attachments; None: not offered.
    attachments: Attachments | None = None
    # The message history (PostgreSQL): old records, old Idempotency-Keys, the lag that
    # makes ingest wait (history.on_lag); None: no history.
    history: History | None = None
    _trusted: TrustedProxies = dataclasses.field(default_factory=lambda: TrustedProxies([]))

    def __post_init__(self) -> None:
        self._trusted = TrustedProxies(self.ingest.trusted_proxies)

    async def send_message(self, req: Request) -> Reply:
        """POST /v1/messages."""
        self._open()
        idem = _idempotency_key(req)
        body = await req.json_body(self.http.max_body_bytes)
        large = len(body) > YIELD_ABOVE_BYTES
        incoming = parse_message(body)
        if large:  # each step of a large body costs up to ~10 ms: others run between them
            await trio.lowlevel.checkpoint()
        refuse_repeated_keys(body)
        if large:
            await trio.lowlevel.checkpoint()
        client, tenant = self._who(req)
        now_ms = self.queue.now_ms()
        blobs = await self._blobs([incoming], tenant)
        try:
            if incoming.template is not None:
                incoming = await self._rendered(req.principal, incoming, tenant)
            if incoming.unsubscribe not in (None, False):
                incoming = await self._unsubscribable(req.principal, incoming, tenant)
            if req.principal.sandbox and not incoming.sandbox:
                incoming = msgspec.structs.replace(incoming, sandbox=True)
            job = new_job(
                incoming, new_ids(1, now_ms)[0], default_from=self.default_from,
                now_ms=now_ms, default_tenant=tenant, blobs=blobs.of(incoming) if blobs else None,
            )  # fmt: skip
            self._may_send(req.principal, incoming, job.tenant)
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        if blobs is not None and self.attachments is not None:
            await self.attachments.hold(blobs, [(incoming, job)])
        cost = _count(incoming.to) + _count(incoming.cc) + _count(incoming.bcc)
        result = await self._enqueue([job], _scoped(idem, tenant), body, client, cost)
        job_id = result.ids[0]
        headers = [(b"location", f"/v1/messages/{job_id}".encode()), *self._limit_headers(result)]
        if result.outcome == "replayed":
            return json_reply(200, Accepted(job_id), [*headers, _REPLAYED])
        return json_reply(202, Accepted(job_id, "scheduled" if job.due_ms else "queued"), headers)

    async def send_batch(self, req: Request) -> Reply:
        """POST /v1/messages/batch."""
        self._open()
        idem = _idempotency_key(req)
        body = await req.json_body(self.http.max_body_bytes)
        messages, recipients = parse_batch(body, self.http)
        refuse_repeated_keys(body)
        client, tenant = self._who(req)
        now_ms = self.queue.now_ms()
        ids = new_ids(len(messages), now_ms)
        jobs: list[NewJob] = []
        blobs = await self._blobs(messages, tenant)
        attached: list[tuple[MessageIn, NewJob]] = []
        i = 0
        try:
            for i, given in enumerate(messages):
                if i and not i % _YIELD_EVERY:
                    # Validating a message costs 16-60 µs: a full batch would hold the
                    # loop 20-70 ms at once (scripts/bench_inputs). Other requests,
                    # senders and watchers run in between.
                    await trio.lowlevel.checkpoint()
                incoming = given
                if given.template is not None:
                    incoming = await self._rendered(req.principal, given, tenant)
                if incoming.unsubscribe not in (None, False):
                    incoming = await self._unsubscribable(req.principal, incoming, tenant)
                if req.principal.sandbox and not incoming.sandbox:
                    incoming = msgspec.structs.replace(incoming, sandbox=True)
                job = new_job(
                    incoming, ids[i], default_from=self.default_from, now_ms=now_ms,
                    default_tenant=tenant, blobs=blobs.of(incoming) if blobs else None,
                )  # fmt: skip
                self._may_send(req.principal, incoming, job.tenant)
                jobs.append(job)
                if incoming.attachments:
                    attached.append((incoming, job))
        except ValidationError as exc:
            raise invalid(f"messages[{i}].{exc.field}", exc.detail) from None
        if blobs is not None and self.attachments is not None:
            await self.attachments.hold(blobs, attached)
        result = await self._enqueue(
            jobs, _scoped(idem, tenant), b"batch:" + body, client, recipients
        )
        headers = self._limit_headers(result)
        if result.outcome == "replayed":
            return json_reply(200, BatchAccepted(result.ids), [*headers, _REPLAYED])
        return json_reply(202, BatchAccepted(result.ids), headers)

    async def _blobs(self, messages: list[MessageIn], tenant: str) -> RequestBlobs | None:
        """The blobs a request's messages may name (None when none has attachments, or
        attachments are not offered: then a message with some is refused)."""
        if self.attachments is None or not any(m.attachments for m in messages):
            return None
        return await self.attachments.blobs(messages, tenant)

    def _who(self, req: Request) -> tuple[str, str]:
        """(client id for the per-client limit, default tenant): the key's, when the
        request was authenticated; else the address's (auth off)."""
        p = req.principal
        if p.kid and p is not UNCHECKED:
            return "key-" + p.kid, p.tenant
        return identify(req, self._trusted)

    async def _rendered(self, p: Principal, incoming: MessageIn, tenant: str) -> MessageIn:
        """``incoming`` with the subject, text and html of the template it names,
        rendered with its variables (ValidationError naming what is wrong)."""
        if self.templates is None:
            raise ValidationError("template", "templates are not offered by this engine")
        if incoming.subject or incoming.text is not None or incoming.html is not None:
            raise ValidationError(
                "template", "a message names a template or gives subject, text and html: not both"
            )
        # The template of the tenant the message is for, when the key may act for it
        # (when not, the send is refused below, whatever the template).
        if incoming.tenant is not None and p.sees(incoming.tenant):
            tenant = incoming.tenant
        _, parts = await self.templates.render(
            tenant, incoming.template or "", incoming.template_version, incoming.variables
        )
        return msgspec.structs.replace(
            incoming, subject=parts.subject, text=parts.text, html=parts.html, template=None,
            variables={},
        )  # fmt: skip

    async def _unsubscribable(self, p: Principal, incoming: MessageIn, tenant: str) -> MessageIn:
        """``incoming`` with the List-Unsubscribe headers of its one recipient."""
        if self.unsubscribe is None:
            raise ValidationError("unsubscribe", "one-click unsubscribe is not offered here")
        list_ = list_name(incoming.unsubscribe or False)
        if any(name.lower().startswith("list-unsubscribe") for name in incoming.headers):
            raise ValidationError(
                "headers.List-Unsubscribe", "give unsubscribe or your own header: not both"
            )
        if incoming.tenant is not None and p.sees(incoming.tenant):
            tenant = incoming.tenant
        recipients = list(dict.fromkeys(
            bare_address(a) for field in (incoming.to, incoming.cc, incoming.bcc)
            for a in ([field] if isinstance(field, str) else field)
        ))  # fmt: skip
        added = await self.unsubscribe.message_headers(tenant, list_, recipients)
        # The list stays on the message: enqueue checks its recipients against it too.
        return msgspec.structs.replace(
            incoming, headers={**incoming.headers, **added}, unsubscribe=list_
        )

    def _may_send(self, p: Principal, incoming: MessageIn, tenant: str) -> None:
        if self.access is not None:
            identities = self.access.identities(tenant)
            check_may_send(p, tenant, incoming.from_, identities, self.default_from)

    def _open(self) -> None:
        """503 while this replica shuts down: another one takes the message."""
        if self.stopping is not None and self.stopping.is_set():
            self.metrics.rejected("draining")
            raise Fail(
                503, "draining", "Shutting down",
                "this instance is shutting down; retry on another", headers=_RETRY_AFTER,
            )  # fmt: skip
        if self.history is not None and self.history.writer.refusing():
            self.metrics.rejected("history-behind")
            s = self.history.writer.statistics()
            raise history_behind(s.lag_entries, s.lag_s)

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

    async def _enqueue(
        self, jobs: list[NewJob], idem: str, body: bytes, client: str, cost: int
    ) -> EnqueueResult:
        """Enqueue; Fail with the answer when nothing was stored. ``cost``: what the
        request takes from the client's rate -- its recipients, so a batch's work counts."""
        fingerprint = hashlib.blake2b(body, digest_size=16).hexdigest() if idem else ""
        if self.ingest.client_rate_per_s <= 0:
            client = ""  # not limited: skip the bucket
        result: EnqueueResult | None = None
        if idem and self.history is not None:  # a key Redis forgot may be in the history
            result = await prior_result(self.history, idem, fingerprint)
        try:
            with trio.move_on_after(self.http.enqueue_timeout_s):
                result = result or await self.queue.enqueue(
                    jobs, idempotency_key=idem, fingerprint=fingerprint, client=client,
                    cost=cost,
                )  # fmt: skip
        except QueueUnavailable:
            self.metrics.rejected("queue-unavailable")
            raise Fail(
                503, "queue-unavailable", "Queue unavailable",
                "the message was NOT accepted; retry shortly", headers=_RETRY_AFTER,
            ) from None  # fmt: skip
        except QueueError as exc:
            self.metrics.rejected("queue-error")
            raise Fail(
                503, "queue-error", "Queue error", f"the message was NOT accepted: {exc}",
                headers=_RETRY_AFTER,
            ) from None  # fmt: skip
        if result is None:
            self.metrics.rejected("queue-timeout")
            raise Fail(
                503, "queue-timeout", "Queue did not answer in time",
                f"Redis did not confirm within {self.http.enqueue_timeout_s}s: the message may "
                "or may not have been stored; retry with the same Idempotency-Key to be safe",
                headers=_RETRY_AFTER,
            )  # fmt: skip
        if result.outcome == "conflict":
            raise Fail(
                409, "idempotency-conflict", "Idempotency-Key reused",
                "this Idempotency-Key was used for a different request body in the last "
                "24 h; use a new key for a new request", "Idempotency-Key",
            )  # fmt: skip
        if result.outcome == "limited":
            self.metrics.rejected("rate-limited")
            raise self._too_many(result.value, cost)
        if result.outcome == "backlog":
            self.metrics.rejected("backlog-full")
            raise self._backlog_full(result.value, result.used_bytes, result.limit_bytes)
        if result.outcome == "stored":
            self.metrics.accepted(len(jobs))
        return result

    def _too_many(self, retry_ms: int, n: int) -> Fail:
        rate, burst = self.ingest.client_rate_per_s, self.ingest.client_burst_or_default()
        headers = [(b"ratelimit-limit", str(burst).encode()), (b"ratelimit-remaining", b"0")]
        if retry_ms < 0:  # can never pass: larger than the whole burst
            return Fail(
                429, "rate-limited", "Too many messages",
                f"{n} recipients at once exceed this client's burst of {burst} "
                "(ingest.client_burst); split the batch", "messages", headers=headers,
            )  # fmt: skip
        retry = str(max(1, math.ceil(retry_ms / 1000))).encode()
        return Fail(
            429, "rate-limited", "Too many messages",
            f"this client may submit {rate:g} messages/s (ingest.client_rate_per_s); "
            "nothing was stored: retry after Retry-After seconds",
            headers=[(b"retry-after", retry), *headers, (b"ratelimit-reset", retry)],
        )  # fmt: skip

    def _backlog_full(self, backlog: int, used_bytes: int = 0, limit_bytes: int = 0) -> Fail:
        if used_bytes:
            # Memory frees as kept records expire and waiting jobs go, at no rate we
            # measure: a fixed pause (the budget is re-read every 0.25 s).
            return Fail(
                503, "backlog-full", "Backlog full",
                f"Redis holds {used_bytes} bytes, over ingest's budget of {limit_bytes} "
                f"(ingest.max_memory_ratio = {self.ingest.max_memory_ratio:g} of its "
                "maxmemory; records of sent messages count while kept); nothing was "
                "stored: retry after Retry-After seconds",
                headers=[(b"retry-after", b"30")],
            )  # fmt: skip
        high = self.ingest.max_backlog
        rate = self.drain.rate() if self.drain is not None else 0.0
        retry = backlog_retry_after_s(backlog, high, rate)
        return Fail(
            503, "backlog-full", "Backlog full",
            f"{backlog} messages are waiting (ingest.max_backlog = {high}); nothing was "
            "stored: retry after Retry-After seconds",
            headers=[(b"retry-after", str(retry).encode())],
        )  # fmt: skip

    async def get_message(self, req: Request) -> Reply:
        """GET /v1/messages/{id} (another tenant's message does not exist for this key)."""
        job_id = req.params["id"]
        rec = await self.queue.get(job_id) if is_id(job_id) else None
        if rec is None and self.history is not None:  # Redis has let it go: the history
            kept = await HistoryRoutes(self.history).lookup(req, job_id, events=False)
            if kept is not None:
                return json_reply(200, job_view_of(kept), [(b"x-engine-source", b"history")])
        if rec is None or not req.principal.sees(rec.tenant):
            raise _no_such(job_id)
        if req.query("include") != "attachments":  # the hot status poll: the record only
            return json_reply(200, job_view(rec))
        # The stored message is read (a round trip more, its bytes decoded) only when asked.
        message = await self.queue.message(job_id)
        files = [
            AttachedFile(a.filename, a.content_type, a.size, a.inline, a.content_id)
            for a in (message.attachments if message is not None else ())
        ]
        view = msgspec.structs.asdict(job_view(rec))
        return json_reply(200, MessageView(**view, attachments=files))

    async def message_raw(self, req: Request) -> Reply:
        """GET /v1/messages/{id}/raw: a sandboxed message's wire form, as it would have
        gone to the server (404 for a message that was sent, or not yet composed)."""
        job_id = req.params["id"]
        rec = await self.queue.get(job_id) if is_id(job_id) else None
        if rec is None or not req.principal.sees(rec.tenant):
            raise _no_such(job_id)
        data = await self.queue.raw(job_id)
        if data is None:
            raise not_found(
                "No wire form kept",
                f"{job_id!r} is not a sandboxed message that was composed (state {rec.state})",
            )
        return Reply(200, data, b"message/rfc822", [(b"content-disposition", b"inline")])

    async def message_html(self, req: Request) -> Reply:
        """A sandboxed message's html, for the dashboard's preview frame (strict CSP)."""
        job_id = req.params["id"]
        rec = await self.queue.get(job_id) if is_id(job_id) else None
        data = await self.queue.raw(job_id) if rec and req.principal.sees(rec.tenant) else None
        html = preview_of(data).html if data is not None else None
        if html is None:
            raise not_found("No html", f"{job_id!r} is not a composed sandboxed html message")
        return Reply(200, html.encode(), b"text/html; charset=utf-8", list(HTML_HEADERS))

    async def message_preview(self, req: Request) -> Reply:
        """GET /v1/messages/{id}/preview: a sandboxed message read back (headers, text,
        html, attachments) -- what the dashboard shows."""
        job_id = req.params["id"]
        rec = await self.queue.get(job_id) if is_id(job_id) else None
        data = await self.queue.raw(job_id) if rec and req.principal.sees(rec.tenant) else None
        if rec is None or data is None:
            raise not_found("No wire form kept", f"{job_id!r} is not a composed sandboxed message")
        return json_reply(200, preview_of(data))

    async def cancel_message(self, req: Request) -> Reply:
        """DELETE /v1/messages/{id}: 200 cancelled; 409 once processing or finished."""
        job_id = req.params["id"]
        if not is_id(job_id):
            raise _no_such(job_id)
        if req.principal.tenants is not None:  # restricted: first, whose is it?
            rec = await self.queue.get(job_id)
            if rec is None or not req.principal.sees(rec.tenant):
                raise _no_such(job_id)
        outcome, state = await self.queue.cancel(job_id)
        if outcome == "unknown":
            raise _no_such(job_id)
        if outcome == "too_late":
            raise Fail(
                409, "not-cancellable", "Too late to cancel",
                f"the message is {state}; only queued, scheduled or retrying messages can be "
                "cancelled",
            )  # fmt: skip
        return json_reply(200, Accepted(job_id, "cancelled"))


def _count(recipients: str | list[str]) -> int:
    return 1 if isinstance(recipients, str) else len(recipients)


def _scoped(idem: str, tenant: str) -> str:
    """Idempotency keys are per tenant: two tenants' "signup-42" are two requests."""
    return f"{tenant}/{idem}" if idem else ""


def _idempotency_key(req: Request) -> str:
    """The request's Idempotency-Key ('' when absent); 400 when it is not one."""
    raw = req.header(b"idempotency-key")
    if raw is None:
        return ""
    key = raw.decode("latin-1").strip()
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise Fail(
            400, "invalid-header", "Invalid Idempotency-Key",
            "the Idempotency-Key header takes 1 to 255 printable ASCII characters",
            "Idempotency-Key",
        )  # fmt: skip
    return key


def backlog_retry_after_s(backlog: int, high_water: int, drain_per_s: float) -> int:
    """Seconds until the backlog should be back under 90 % of its high-water mark at the
    measured drain rate (1 to 300; 60 when nothing drains)."""
    if drain_per_s <= 0:
        return 60
    excess = backlog - 0.9 * high_water
    return max(1, min(300, math.ceil(excess / drain_per_s)))
