"""Every Redis key name the engine uses. Nothing else may spell a key.

All keys of one queue shard share the hash tag ``{<queue>:<shard>}`` so they live
in one Redis Cluster slot and multi-key Lua scripts stay legal there.
Imports only ``engine.models`` (lane and tenant names are parts of key names).
"""

from __future__ import annotations

from engine.models import DEFAULT_TENANT


class Keys:
    """Key names of one queue shard."""

    __slots__ = ("prefix", "queue", "shard")

    def __init__(self, queue: str = "mail", shard: int = 0) -> None:
        self.queue = queue
        self.shard = shard
        self.prefix = f"{{{queue}:{shard}}}:"

    @property
    def job_prefix(self) -> str:
        """Prefix that Lua scripts append a job id to (they build job keys in-slot)."""
        return self.prefix + "job:"

    def job(self, job_id: str) -> str:
        return self.prefix + "job:" + job_id

    # ready, ring and idem keys are built in-slot by the Lua scripts from ``prefix``;
    # they are spelled here too so tests and tools name them (tests/test_surface.py
    # holds the two spellings together).
    def ready(self, lane: str = "normal", tenant: str = DEFAULT_TENANT) -> str:
        """Jobs of one tenant waiting in one lane."""
        return self.prefix + "ready:" + lane + ":" + tenant

    def ring(self, lane: str) -> str:
        """Round-robin ring of the tenants with jobs in ``lane`` (claim rotates it)."""
        return self.prefix + "ring:" + lane

    @property
    def wake(self) -> str:
        """Doorbell list idle senders BLPOP on; pushes to a ready list ring it."""
        return self.prefix + "wake"

    @property
    def cursor(self) -> str:
        """Counter of claim slots handed out: position in the weighted lane pattern."""
        return self.prefix + "cursor"

    @property
    def limits(self) -> str:
        """Hash of configured rate limits (bucket name -> "rate burst")."""
        return self.prefix + "limits"

    def bucket(self, name: str) -> str:
        """State of one distributed token bucket (GCRA), e.g. ``domain:gmail.com``."""
        return self.prefix + "bucket:" + name

    def breaker(self, transport: str) -> str:
        """Hash of an open circuit breaker of a transport (absent while closed)."""
        return self.prefix + "breaker:" + transport

    @property
    def schedules(self) -> str:
        """Hash of recurring schedules: name -> msgpack definition."""
        return self.prefix + "schedules"

    @property
    def schedules_due(self) -> str:
        """Zset of recurring schedules: name -> next tick (ms)."""
        return self.prefix + "schedules:due"

    def processing(self, instance: str) -> str:
        return self.prefix + "processing:" + instance

    @property
    def leases(self) -> str:
        return self.prefix + "leases"

    @property
    def instances(self) -> str:
        return self.prefix + "instances"

    @property
    def delayed(self) -> str:
        return self.prefix + "delayed"

    @property
    def dead(self) -> str:
        return self.prefix + "dead"

    def idem(self, key: str) -> str:
        return self.prefix + "idem:" + key

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def stats(self) -> str:
        """Hash of monotonically increasing counters (enqueued, sent, failed...)."""
        return self.prefix + "stats"

    # -- access (API keys, tenants): read by every replica, changed by admins ---------

    @property
    def api_keys(self) -> str:
        """Hash kid -> API key record (JSON: its sha256, scopes, tenant; never the key)."""
        return self.prefix + "auth:keys"

    @property
    def tenants(self) -> str:
        """Hash tenant -> tenant record (JSON: the sender identities it may use)."""
        return self.prefix + "auth:tenants"

    @property
    def auth_version(self) -> str:
        """Counter bumped by every change of keys or tenants: replicas poll it."""
        return self.prefix + "auth:version"

    @property
    def auth_secret(self) -> str:
        """The deployment's secret that signs dashboard session cookies."""
        return self.prefix + "auth:secret"

    # -- suppression lists: per tenant; enqueue.lua and fail.lua build them in-slot -----

    def suppressed(self, tenant: str = DEFAULT_TENANT) -> str:
        """Set of a tenant's suppressed addresses (bare, ASCII letters lower-cased):
        enqueue drops them from a message's recipients (SMISMEMBER)."""
        return self.prefix + "suppressed:" + tenant

    def suppression_info(self, tenant: str = DEFAULT_TENANT) -> str:
        """Hash of the same addresses -> JSON {reason, source, bounce, at}."""
        return self.prefix + "suppressed:" + tenant + ":info"

    def raw(self, job_id: str) -> str:
        """The wire form of a sandboxed message, kept instead of sent (bytes, with the
        record's TTL)."""
        return self.prefix + "raw:" + job_id

    # -- templates: per tenant ----------------------------------------------------------

    def templates(self, tenant: str = DEFAULT_TENANT) -> str:
        """Hash of a tenant's templates: name -> JSON (engine.templates.Template, its
        kept versions), and ``#seq:<name>`` -> the last version number given."""
        return self.prefix + "templates:" + tenant

    # -- attachments: bodies stored once by content -------------------------------------

    def blob(self, sha256_hex: str) -> str:
        """String: an attachment's bytes, named by their SHA-256 (hex); written once, its
        expiry raised to cover every job that names it (engine.queue.blobs)."""
        return self.prefix + "blob:" + sha256_hex

    def blob_upload(self, token: str) -> str:
        """String: an upload's bytes so far, appended a piece at a time (never one large
        command: the loop would wait for it); renamed to its blob once all are in."""
        return self.prefix + "upload:" + token

    def blob_ref(self, tenant: str, sha256_hex: str) -> str:
        """String "1": ``tenant`` gave these bytes (uploaded or inline), so its messages
        may name the blob by id; it lasts as long as the blob holds for that tenant."""
        return self.prefix + "blobref:" + tenant + ":" + sha256_hex

    # -- webhooks: endpoints, and the deliveries owed to them ---------------------------

    @property
    def webhooks(self) -> str:
        """Hash endpoint id -> endpoint record (JSON: url, filters, secret, state)."""
        return self.prefix + "webhooks"

    @property
    def webhook_due(self) -> str:
        """Sorted set of deliveries owed, ``<endpoint>|<event id>``, by when to try next
        (a claimed one is pushed a lease ahead: a crashed dispatcher's comes back)."""
        return self.prefix + "webhook:due"

    def webhook_delivery(self, delivery: str) -> str:
        """Hash of one delivery owed: the event's JSON, attempts, first try."""
        return self.prefix + "webhook:d:" + delivery

    def webhook_attempts(self, endpoint: str) -> str:
        """List of an endpoint's latest delivery attempts (newest first, capped)."""
        return self.prefix + "webhook:attempts:" + endpoint

    # -- DKIM: signing domains' keys (/v1/domains), read by every sender replica ---------

    @property
    def dkim_domains(self) -> str:
        """Hash domain -> its key record (JSON: selector, algorithm, the PEM private key)."""
        return self.prefix + "dkim:domains"

    @property
    def dkim_version(self) -> str:
        """Counter bumped by every change of the domains: replicas poll it."""
        return self.prefix + "dkim:version"

    # -- provider events (POST /v1/providers/{name}/events): provider_events.lua -------

    def provider_event(self, provider: str, event_id: str) -> str:
        """String "1": the provider's event was recorded (a retry of it is dropped); it
        lasts as long as the job's record (provider_events.dedupe_s for a kept one)."""
        return self.prefix + "pevent:" + provider + ":" + event_id

    def provider_nonce(self, provider: str, nonce: str) -> str:
        """String "1": a signed delivery's one-time token was used (Mailgun's replay
        protection), for twice provider_events.tolerance_s."""
        return self.prefix + "pnonce:" + provider + ":" + nonce
