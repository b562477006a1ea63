"""The sender tasks and what they share: in-flight set (for lease renewal), rate limiter,
counters, and the stop signal used by graceful shutdown."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Final

import msgspec
import trio

from engine.bounce import Bounce, bounce_of, classify
from engine.config import QueueSettings, RoutingSettings, SenderSettings
from engine.errors import (
    EngineError,
    PermanentFailure,
    QueueUnavailable,
    TemporaryFailure,
    TransportError,
    TransportUnavailable,
)
from engine.ids import id_time_ms
from engine.metrics import Metrics, SenderMetrics
from engine.models import Message
from engine.policy import Outcome, after_failure, backoff_s, classify_smtp
from engine.queue import (
    BlobStore,
    Breaker,
    ClaimedJob,
    Failure,
    Queue,
    RateLimits,
    decode_message,
)
from engine.sender.blobs import AttachmentCache
from engine.sender.gate import TransportGate
from engine.sender.ratelimit import RateLimiter
from engine.sender.routing import Route, Router
from engine.sender.signing import Signer
from engine.transport import MissingAttachment, OutgoingMail, SendResult, Transport, compose

log = logging.getLogger(__name__)

# Composing costs up to ~10 ms a MiB of body (quoted-printable, line checks), all of it
# on the loop when inline. Above this many stored bytes a message is composed in a
# worker thread, which gives the GIL back every 5 ms (sys.getswitchinterval) -- but not
# inside one C call: binascii.b2a_qp of a whole body takes up to ~9 ms a MiB, so the
# loop may still wait that long. Below, the ~50 us hop would cost more than it saves.
COMPOSE_THREAD_ABOVE_BYTES: Final = 256 * 1024

# Replies that mean "you are sending too fast": they slow the domain's bucket down, as
# does every reply of the rate-limited class (engine.bounce: decision "slow-down").
SLOW_DOWN_CODES = frozenset({421, 451})


@dataclass(frozen=True, slots=True)
class Budget:
    """How long a temporarily failing job may keep trying (0 = that limit is off)."""

    max_attempts: int
    retry_for_s: float


@dataclass(frozen=True, slots=True)
class SenderStatistics:
    senders: int
    running: int
    in_flight: int
    sent: int
    retried: int
    failed: int
    released: int


def composes_in_thread(size: int) -> bool:
    """Whether a message whose stored form takes ``size`` bytes is composed in a worker
    thread (COMPOSE_THREAD_ABOVE_BYTES)."""
    return size > COMPOSE_THREAD_ABOVE_BYTES


async def compose_mail(
    job_id: str,
    message: Message,
    *,
    message_id_domain: str,
    now: float,
    size: int,
    attachments: Mapping[bytes, bytes] | None = None,
) -> OutgoingMail:
    """``compose(...)``: inline, or in a worker thread when the message is large (its
    stored form, ``size`` bytes, is mostly its text, html and headers).

    compose is thread-safe: pure (its caches are functools.lru_cache, safe across
    threads), it writes only what it builds, and ``message`` is this job's own. The
    thread is not abandoned on cancellation: it is done within tens of milliseconds.
    """
    if not composes_in_thread(size):
        return compose(
            job_id, message, message_id_domain=message_id_domain, now=now, attachments=attachments
        )
    return await trio.to_thread.run_sync(
        functools.partial(
            compose,
            job_id,
            message,
            message_id_domain=message_id_domain,
            now=now,
            attachments=attachments,
        )
    )


def _against_transport(failure: TransportError) -> bool:
    """Whether a message's temporary failure says the transport is in trouble (no answer
    in time, a lost connection, a provider's 5xx, an SMTP 421) rather than this message
    (greylisting, a full mailbox: 45x) or our pace (429: slowed down, not failed over)."""
    if not isinstance(failure, TemporaryFailure) or isinstance(failure, TransportUnavailable):
        return False
    if failure.http_status is not None:
        return failure.http_status >= 500
    return failure.code is None or failure.code == 421


class SenderPool:
    """N sender tasks over one queue and its transports (one, or a ``Router``'s)."""

    def __init__(
        self,
        queue: Queue,
        transport: Transport | None,
        settings: SenderSettings,
        queue_settings: QueueSettings,
        rate_limits: RateLimits | None = None,
        metrics: SenderMetrics | None = None,
        breaker: Breaker | None = None,
        attachments: AttachmentCache | None = None,
        signer: Signer | None = None,
        router: Router | None = None,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.queue_settings = queue_settings
        self.rate_limits = (
            rate_limits
            if rate_limits is not None
            and (rate_limits.settings.configured() or rate_limits.transport_rates)
            else None
        )
        self._slowed: dict[str, float] = {}  # bucket -> when we last asked Redis to halve it
        self.limiter = RateLimiter(settings.rate_per_s, settings.burst)
        self._holding: set[str] = set()
        self._stopping = trio.Event()
        self._claim_scopes: set[trio.CancelScope] = set()
        self._redis_down = False
        self._running = 0
        self._sent = self._retried = self._failed = self._released = 0
        self._metrics = metrics if metrics is not None else Metrics().sender
        if router is None:  # one transport, "smtp"
            if transport is None:
                raise ValueError("a sender pool needs a transport or a router")
            breaker = breaker or Breaker(
                queue.client, queue.keys, "smtp",
                first_wait_s=settings.breaker_probe_s, max_wait_s=settings.breaker_probe_max_s,
            )  # fmt: skip
            gate = TransportGate(breaker, queue, self._metrics)
            router = Router({"smtp": Route("smtp", transport, gate)}, RoutingSettings(), queue)
        self.router = router
        # DKIM: signs each composed mail whose From domain has a key (None: none do).
        self.signer = signer
        # The attachments of claimed messages, read and encoded once for many.
        self.attachments = attachments or AttachmentCache(
            BlobStore(queue.client, queue.keys, queue_settings)
        )

    # -- shared state ------------------------------------------------------------------

    def holding(self) -> list[str]:
        """Ids claimed by this process and not yet acked or failed (for lease renewal)."""
        return list(self._holding)

    def stop_claiming(self) -> None:
        """Graceful shutdown: finish the message in hand, hand the rest back, exit."""
        self._stopping.set()
        for scope in self._claim_scopes:
            scope.cancel()

    def statistics(self) -> SenderStatistics:
        return SenderStatistics(
            self.settings.senders,
            self._running,
            len(self._holding),
            self._sent,
            self._retried,
            self._failed,
            self._released,
        )

    # -- tasks -------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the sender tasks; returns after ``stop_claiming`` once all have finished."""
        async with trio.open_nursery() as nursery:
            for n in range(self.settings.senders):
                nursery.start_soon(self._sender, n, name=f"sender-{n}")
            task_status.started()

    async def _sender(self, n: int) -> None:
        self._running += 1
        try:
            failures = 0
            while not self._stopping.is_set():
                turn = await self.router.turn(self._stopping)
                if turn is None:
                    break
                _, probing = turn
                try:
                    jobs = await self._claim(1 if probing else self.settings.claim_batch)
                except QueueUnavailable as exc:
                    if probing is not None:
                        await probing.gate.no_probe()
                    failures += 1
                    delay = min(5.0, 0.1 * 2**failures)
                    if not self._redis_down:  # one line per outage, not one per sender
                        self._redis_down = True
                        log.warning("sender.claim.failed senders back off: %s", exc)
                    log.debug("sender.claim.failed sender=%d retry_in=%.1fs", n, delay)
                    with trio.move_on_after(delay):
                        await self._stopping.wait()
                    continue
                if self._redis_down:
                    self._redis_down = False
                    log.warning("sender.claim.recovered senders claim again")
                failures = 0
                if probing is not None and not jobs:
                    await probing.gate.no_probe()
                    continue
                await self._work(jobs, probe=probing)
        finally:
            self._running -= 1

    async def _claim(self, n: int) -> list[ClaimedJob]:
        # Block on the doorbell only up to claim_block_s, and stop blocking as soon as we
        # are told to stop (the doorbell holds no jobs: a cut-short wait loses nothing).
        with trio.CancelScope() as scope:
            self._claim_scopes.add(scope)
            try:
                return await self.queue.claim(n, block_s=self.settings.claim_block_s)
            except QueueUnavailable:
                if self._stopping.is_set():
                    return []  # coredis reports a connect cancelled by us as a failure
                raise
            finally:
                self._claim_scopes.discard(scope)
        return []

    async def _work(self, jobs: list[ClaimedJob], *, probe: Route | None = None) -> None:
        """Deliver claimed jobs, each through the first usable transport of its order;
        the jobs of one transport go over one connection (SMTP: pipelined), in claim order.

        Failure records (and acks, with overlap_acks) go to their own tasks so the
        connection does not wait for Redis; _work returns once all are recorded.
        ``probe``: the transport whose breaker is open, to be tested with this one job.
        """
        self._holding.update(j.id for j in jobs)
        mails: list[OutgoingMail] = []
        by_id: dict[str, tuple[ClaimedJob, Budget]] = {}
        orders: dict[str, Sequence[str]] = {}
        # Rate-limited jobs go in slot order: a job waiting for its token must not hold
        # up one behind it in the pipeline that may go now.
        jobs = sorted(jobs, key=lambda j: j.wait_s)
        claimed_at = trio.current_time()
        attached = await self.attachments.for_jobs(jobs)  # one MGET for the batch's blobs
        async with trio.open_nursery() as records:
            sandboxed: set[str] = set()
            for job in jobs:
                try:
                    message = decode_message(job.payload)
                    mail = await compose_mail(
                        job.id,
                        message,
                        message_id_domain=self.settings.message_id_domain,
                        now=time.time(),
                        size=len(job.payload),
                        attachments=attached.bodies,
                    )
                except MissingAttachment as exc:
                    missing, bounce = attached.failure(exc)
                    q = self.queue_settings
                    budget = Budget(1, 0) if bounce else Budget(
                        message.max_attempts or q.max_attempts,
                        message.retry_for_s or q.retry_for_s,
                    )  # fmt: skip
                    records.start_soon(self._record_failure, job, missing, budget, bounce)
                    continue
                except (msgspec.DecodeError, ValueError) as exc:
                    failure = PermanentFailure(f"undecodable job: {exc}")
                    records.start_soon(self._record_failure, job, failure, Budget(1, 0))
                    continue
                if job.recipients is not None:
                    # A retry after a partial delivery: only those still owed it.
                    mail = dataclasses.replace(mail, recipients=job.recipients)
                mails.append(mail)
                if message.sandbox:
                    sandboxed.add(job.id)
                q = self.queue_settings
                budget = Budget(
                    message.max_attempts or q.max_attempts, message.retry_for_s or q.retry_for_s
                )
                by_id[job.id] = (job, budget)
                orders[job.id] = self.router.order_of(message, job.tenant)
            if self.signer is not None:
                mails = await self.signer.sign_many(mails)
            if sandboxed:
                mails = await self._keep_sandboxed(mails, sandboxed, by_id)
            groups, stranded, probes = await self._route(mails, orders, probe)
            if stranded:  # every transport of their order is down: back, no attempt
                await self._release([by_id[m.job_id][0] for m in stranded])
            for route, group in groups:
                down, failing = await self._deliver(group, by_id, records, claimed_at, route)
                if route.name not in probes:
                    if down is not None:
                        await route.gate.failed(down, probe=False)
                elif down is not None or failing is not None:
                    await route.gate.failed(down or failing or "", probe=True)
                else:
                    await route.gate.recovered()
        for route in (self.router.routes[n] for n in probes):
            if all(r is not route for r, _ in groups):
                await route.gate.no_probe()

    async def _route(
        self, mails: list[OutgoingMail], orders: Mapping[str, Sequence[str]], probe: Route | None
    ) -> tuple[list[tuple[Route, list[OutgoingMail]]], list[OutgoingMail], set[str]]:
        """Mails by the transport each takes, in claim order within each: the first of
        its order whose breaker is closed -- or one that is open and due a test, which
        this one mail makes (a probe: the mail would have gone to a later one anyway);
        the mails none of whose transports is usable; and the transports probed."""
        probes = {probe.name} if probe is not None else set()
        groups: dict[str, tuple[Route, list[OutgoingMail]]] = {}
        stranded: list[OutgoingMail] = []
        for mail in mails:
            chosen: Route | None = None
            for name in orders[mail.job_id]:
                route = self.router.routes.get(name)
                if route is None:
                    continue
                if name in probes:
                    if name in groups:
                        continue  # a probe is one mail; the others go on down the order
                elif route.gate.is_open():
                    if not await self.router.probe_due(route):
                        continue
                    probes.add(name)
                chosen = route
                break
            if chosen is None:
                stranded.append(mail)
            else:
                groups.setdefault(chosen.name, (chosen, []))[1].append(mail)
        return list(groups.values()), stranded, probes

    async def _deliver(
        self,
        mails: list[OutgoingMail],
        by_id: dict[str, tuple[ClaimedJob, Budget]],
        records: trio.Nursery,
        claimed_at: float,
        route: Route,
    ) -> tuple[str | None, str | None]:
        """Send ``mails`` through ``route``: (the reason the transport is down when it was
        -- its jobs are handed back untouched --, the last failure that counts against the
        transport rather than the message), each None when there was none."""
        pending = deque(mails)  # pending[0] is on the wire once iteration has started
        down: list[ClaimedJob] = []
        reason: str | None = None
        failing: str | None = None

        # The transport's own shared bucket (routing.rates): a slot for each mail, in order.
        slots: dict[str, float] = {}
        if self.rate_limits is not None and route.name in self.rate_limits.transport_rates:
            now = trio.current_time()
            try:
                waits = await self.rate_limits.transport_slots(route.name, len(mails))
            except QueueUnavailable:
                waits = []  # Redis trouble shows in the claim; the local limiter still holds
            slots = {m.job_id: now + w for m, w in zip(mails, waits, strict=False)}

        async def pace() -> None:
            # The process-local limit, then the slots the shared buckets reserved.
            await self.limiter.acquire()
            job_id = pending[0].job_id
            at = max(claimed_at + by_id[job_id][0].wait_s, slots.get(job_id, 0.0))
            if at > trio.current_time():
                await trio.sleep_until(at)

        started = False
        try:
            if not pending or self._stopping.is_set():
                return None, None
            await pace()
            async with aclosing(route.transport.send_many(mails)) as outcomes:
                started = True
                async for mail, outcome in outcomes:
                    pending.popleft()
                    job, budget = by_id[mail.job_id]
                    if isinstance(outcome, TransportUnavailable):
                        # Not the message's failure: it goes back, no attempt counted.
                        down.append(job)
                        reason = reason or str(outcome)
                        continue
                    if isinstance(outcome, TransportError):
                        if _against_transport(outcome):
                            failing = str(outcome)
                            await self.router.failed_temporarily(route, failing)
                        bounce = self._bounce(outcome)
                        # A provider's 429 is about our account, not the recipients'
                        # domains: its Retry-After paces the retry instead.
                        if outcome.http_status is None and (
                            outcome.code in SLOW_DOWN_CODES or bounce.decision == "slow-down"
                        ):
                            records.start_soon(self._slow_down, mail.recipients)
                        elif outcome.http_status == 429:  # the provider's bucket halves
                            records.start_soon(self._slow_buckets, {f"transport:{route.name}"})
                        records.start_soon(self._record_failure, job, outcome, budget, bounce)
                    elif self.settings.overlap_acks:
                        self.router.succeeded(route)
                        records.start_soon(self._delivered, job, outcome, budget, route.name)
                    else:
                        self.router.succeeded(route)
                        # The next message's content waits until Redis has this
                        # ack: a crash duplicates at most one message per sender.
                        await self._delivered(job, outcome, budget, route.name)
                    if not pending or self._stopping.is_set():
                        break  # stop: the next message's content was not sent yet
                    # Pace here: the next content is written when iteration resumes.
                    await pace()
            started = False  # left normally: nothing of pending reached the server
        finally:
            if down:
                await self._release(down)
            if pending:
                # Cancelled mid-send: pending[0] may have reached the server, so it stays
                # leased (the reaper decides); the rest were never written.
                unsent = list(pending)[1:] if started else list(pending)
                if unsent:
                    await self._release([by_id[m.job_id][0] for m in unsent])
        return reason, failing

    async def _release(self, jobs: list[ClaimedJob]) -> None:
        ids = [j.id for j in jobs]
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                released = await self.queue.release(ids)
                self._released += released
                self._metrics.released(released)
            except EngineError as exc:
                # The leases will expire and the reaper will return them.
                log.warning("sender.release.failed jobs=%d error=%s", len(ids), exc)
        self._holding.difference_update(ids)

    async def _delivered(
        self, job: ClaimedJob, result: SendResult, budget: Budget, transport: str = ""
    ) -> None:
        """The server took the message; per-recipient refusals decide what is left."""
        temporary = [r for r in result.rejected if r.code < 500]
        note = "; ".join(f"{r.address}: {r.code} {r.text}" for r in result.rejected)
        slow = [
            r.address
            for r in temporary
            if r.code in SLOW_DOWN_CODES or classify(r.code, None, r.text).decision == "slow-down"
        ]
        if slow:
            await self._slow_down(slow)
        dead = _dead_addresses((r.address, r.code, r.text) for r in result.rejected)
        if dead:
            await self._suppress_refused(job, dead)
        if temporary:
            # Delivered to some; the temporarily refused are retried, and only they.
            failure = TemporaryFailure(f"delivered in part; refused {note}", code=temporary[0].code)
            retry = [r.address for r in temporary]
            await self._record_failure(job, failure, budget, recipients=retry)
            return
        await self._ack(
            job, f"delivered in part; refused {note}" if note else "", transport=transport,
            provider_id=result.provider_id,
        )  # fmt: skip

    async def _suppress_refused(self, job: ClaimedJob, dead: list[tuple[str, str, str]]) -> None:
        """Recipients refused as unknown while others took the message: suppressed like
        a hard bounce (a lost write only means the next send is refused again)."""
        try:
            await self.queue.suppress_refused(job.id, dead)
        except EngineError as exc:
            log.warning("sender.suppress.failed job=%s error=%s", job.id, exc)

    async def _slow_down(self, recipients: list[str]) -> None:
        """A 421/451: halve the shared rate of these recipients' domains (Redis applies
        it at most once per cooldown; we skip asking again within it)."""
        await self._slow_buckets({"domain:" + r.rpartition("@")[2].lower() for r in recipients})

    async def _slow_buckets(self, names: set[str]) -> None:
        """Halve these shared buckets' rates (AIMD; those without a limit are skipped)."""
        if self.rate_limits is None:
            return
        now = trio.current_time()
        cooldown = self.rate_limits.settings.slowdown_cooldown_s
        names = {n for n in names if now - self._slowed.get(n, -cooldown) >= cooldown}
        if not names:
            return
        for name in names:
            self._slowed[name] = now
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                rates = await self.rate_limits.slowdown(sorted(names))
            except EngineError as exc:
                log.warning("sender.slowdown.failed buckets=%s error=%s", sorted(names), exc)
                return
        self._metrics.slowed_down(len(rates))
        for name, rate in rates.items():
            log.warning("sender.slowdown bucket=%s rate_per_s=%.2f", name, rate)

    async def _keep_sandboxed(
        self,
        mails: list[OutgoingMail],
        sandboxed: set[str],
        by_id: dict[str, tuple[ClaimedJob, Budget]],
    ) -> list[OutgoingMail]:
        """Sandboxed mails are kept (their wire form, for GET /v1/messages/{id}/raw) and
        acknowledged as sent without a server; the others are returned to be sent."""
        rest = []
        for mail in mails:
            if mail.job_id not in sandboxed:
                rest.append(mail)
                continue
            job, _ = by_id.pop(mail.job_id)
            try:
                await self.queue.keep_raw(job.id, mail.data)
            except EngineError as exc:  # its lease brings it back
                log.warning("sender.sandbox.unkept job=%s error=%s", job.id, exc)
                continue
            await self._ack(job, "sandbox: kept, not sent to a server (GET /v1/messages/{id}/raw)")
        return rest

    async def _ack(
        self, job: ClaimedJob, note: str = "", *, transport: str = "", provider_id: str = ""
    ) -> None:
        # The message is with the server: the duplicate window is open until Redis has
        # the ack, so keep trying (shielded: shutdown must not widen the window).
        delivered_ms = self.queue.now_ms()  # the 250 came just now
        delay = 0.05
        with trio.CancelScope(shield=True):
            while True:
                try:
                    await self.queue.ack(job.id, note, transport=transport, provider_id=provider_id)
                    break
                except (QueueUnavailable, trio.ClosedResourceError) as exc:
                    if delay > 5:
                        log.error("sender.ack.gave_up job=%s error=%s", job.id, exc)
                        break
                    log.warning("sender.ack.failed job=%s error=%s", job.id, exc)
                    await trio.sleep(delay)
                    delay *= 2
        self._holding.discard(job.id)
        self._sent += 1
        made_ms = id_time_ms(job.id)  # enqueue time: no Redis read needed
        self._metrics.sent(job.attempt, (delivered_ms - made_ms) / 1000 if made_ms else None)

    def _bounce(self, exc: TransportError) -> Bounce:
        return bounce_of(exc, on_uncertain=self.queue_settings.on_uncertain)

    async def _record_failure(
        self,
        job: ClaimedJob,
        exc: TransportError,
        budget: Budget,
        bounce: Bounce | None = None,
        *,
        recipients: list[str] | None = None,
    ) -> None:
        due_ms = self.queue.now_ms()
        bounce = bounce or self._bounce(exc)
        self._metrics.bounced(bounce.cls)
        outcome: Outcome
        if bounce.cls == "unknown":
            # Nothing recognised: the rule before bounce classes (4xx retry, 5xx dead).
            outcome = "dead" if isinstance(exc, PermanentFailure) else classify_smtp(exc.code)
        else:
            outcome = "dead" if bounce.final else "retry"
        outcome = after_failure(
            outcome, attempts=job.attempt, max_attempts=budget.max_attempts,
            tried_for_s=(due_ms - (job.first_try_ms or due_ms)) / 1000,
            retry_for_s=budget.retry_for_s,
        )  # fmt: skip
        if outcome == "retry":
            q = self.queue_settings
            delay = backoff_s(job.attempt, base_s=q.backoff_base_s, max_s=q.backoff_max_s)
            if isinstance(exc, TemporaryFailure) and exc.retry_after_s:
                delay = max(delay, exc.retry_after_s)  # the server said when (Retry-After)
            due_ms += int(1000 * delay)
        error = str(exc)
        if exc.code is not None and str(exc.code) not in error:
            error = f"{exc.code} {error}"
        log.info(
            "sender.send.failed job=%s attempt=%d outcome=%s bounce=%s error=%s",
            job.id, job.attempt, outcome, bounce.cls, error,
        )  # fmt: skip
        dead = _dead_addresses(exc.refused) if outcome == "dead" else []
        failure = Failure(
            job.id, outcome, due_ms, error[:500], recipients, bounce.cls,
            suppress=bounce.suppress and outcome == "dead",
            dead_addresses=tuple(address for address, _, _ in dead),
        )  # fmt: skip
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            try:
                await self.queue.fail([failure])
            except EngineError as err:
                log.warning("sender.fail.unrecorded job=%s error=%s", job.id, err)
        self._holding.discard(job.id)
        if outcome == "retry":
            self._retried += 1
            self._metrics.retried()
        else:
            self._failed += 1
            self._metrics.dead()


def _dead_addresses(refused: Iterable[tuple[str, int, str]]) -> list[tuple[str, str, str]]:
    """(address, reason, class) of the recipients a server refused one by one with a
    reply whose class puts the address on the suppression list (a 5xx invalid-recipient)."""
    out: list[tuple[str, str, str]] = []
    for address, code, text in refused:
        if code >= 500 and (b := classify(code, None, text)).suppress:
            out.append((address, f"{code} {text}"[:500], b.cls))
    return out
