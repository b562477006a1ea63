"""Wire and stored shapes (msgspec Structs) and the pure validation between them.

A request body decodes into ``MessageIn``; ``normalize`` checks it field by field and
returns the ``Message`` that is stored (msgpack) in the job record. Imports only leaves.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from datetime import UTC, datetime
from typing import Final, Literal

import idna
import msgspec

from engine.errors import ValidationError

MAX_RECIPIENTS: Final = 100
MAX_SUBJECT_CHARS: Final = 998
MAX_TAGS: Final = 20
MAX_ATTEMPTS: Final = 50
# Longest a message may ask to be retried for (30 days).
MAX_RETRY_FOR_S: Final = 30 * 24 * 3600
# Furthest ahead a send_at / delay_s may schedule a message (one year).
MAX_DELAY_S: Final = 366 * 24 * 3600
# Priority lanes, most urgent first; ``priority`` 1-10 maps onto them (10 most urgent).
LANES: Final = ("high", "normal", "low")
DEFAULT_TENANT: Final = "default"
# Tenant names become part of Redis key names: keep them short and plain.
_TENANT_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

# Header names the engine writes itself; user headers may not replace them.
RESERVED_HEADERS: Final = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "x-engine-job-id",
        "sender",
        "return-path",
    }
)

JobState = Literal["queued", "processing", "sent", "retrying", "failed", "scheduled", "cancelled"]


# gc=False: these never form reference cycles, and skipping GC tracking matters when
# a batch decodes a thousand of them at once (profiled).
class MessageIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Body of POST /v1/messages (one item of a batch)."""

    to: str | list[str]
    from_: str | None = msgspec.field(default=None, name="from")
    cc: str | list[str] = []
    bcc: str | list[str] = []
    subject: str = ""
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] = {}
    reply_to: str | list[str] | None = None
    tags: list[str] = []
    # Delivery attempts before the message is dead-lettered (default queue.max_attempts).
    max_attempts: int | None = None
    # Seconds a temporarily failing message is retried after its first attempt before
    # it is dead-lettered (default queue.retry_for_s).
    retry_for_s: float | None = None
    # "high" | "normal" | "low", or 1-10 (8-10 high, 4-7 normal, 1-3 low).
    priority: str | int | None = None
    # Send no earlier than this RFC 3339 time, or this many seconds from now (not both).
    send_at: str | None = None
    delay_s: float | None = None
    # Whose mail this is, for per-tenant rate limits and fair claiming; default: the
    # request's API key, else "default".
    tenant: str | None = None


class BatchIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """Body of POST /v1/messages/batch."""

    messages: list[MessageIn]


class Message(msgspec.Struct, array_like=True, gc=False):
    """A validated message as stored in the job record (msgpack, array-like = compact)."""

    sender: str
    to: list[str]
    cc: list[str]
    bcc: list[str]
    subject: str
    text: str | None
    html: str | None
    headers: list[tuple[str, str]]
    reply_to: list[str]
    tags: list[str]
    max_attempts: int | None = None
    retry_for_s: float | None = None

    def envelope_recipients(self) -> list[str]:
        """Bare addresses for RCPT TO, in order, without duplicates."""
        seen: dict[str, None] = {}
        for addr in (*self.to, *self.cc, *self.bcc):
            seen.setdefault(bare_address(addr), None)
        return list(seen)


class Accepted(msgspec.Struct):
    id: str
    state: JobState = "queued"


class BatchAccepted(msgspec.Struct):
    ids: list[str]


class JobView(msgspec.Struct):
    """Answer of GET /v1/messages/{id}."""

    id: str
    state: str
    attempts: int
    created_at: str
    updated_at: str
    last_error: str | None
    next_attempt_at: str | None = None  # set while retrying or scheduled
    priority: str = "normal"  # the lane
    tenant: str = DEFAULT_TENANT


# Every event type (= the job state it leaves the job in; "deleted": dropped from the
# dead-letter queue for good).
EVENT_TYPES: Final = frozenset(
    {"queued", "scheduled", "processing", "sent", "retrying", "failed", "cancelled", "deleted"}
)


# Close codes of the events websocket (WS /v1/events), for the hub and its clients.
CLOSE_GOING_AWAY: Final = 1001  # the server is shutting down: resume elsewhere with since=
CLOSE_POLICY: Final = 1008  # refused before the handshake could carry an HTTP answer
CLOSE_UNAVAILABLE: Final = 1011  # the event stream cannot be read
CLOSE_TOO_SLOW: Final = 4008  # more than events.subscriber_buffer events waited for it


class Event(msgspec.Struct, omit_defaults=True, gc=False):
    """One lifecycle event of a job (WS /v1/events, GET /v1/messages/{id}/events).

    ``event_id`` orders events and resumes a feed (``?since=``): the Redis stream entry
    id (``1718000000000-0``), or ``<entry id>.<n>`` for the n-th job of an enqueue entry
    that announced many. ``at``: ms since the epoch; ``attempt``: 1 for the first try.
    ``tenant`` is left out of the JSON when it is ``default``, ``tags`` when empty: the
    feed goes to every subscriber, so its bytes are the fan-out's main cost.
    """

    event_id: str
    type: str
    id: str
    at: int
    attempt: int
    state: str
    tenant: str = DEFAULT_TENANT
    error: str | None = None
    tags: list[str] = []


class Routing(msgspec.Struct, frozen=True, gc=False):
    """Where a validated message waits: its lane, tenant and due time (0 = now)."""

    lane: str = "normal"
    tenant: str = DEFAULT_TENANT
    due_ms: int = 0


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str = ""
    field: str | None = None


# -- validation -------------------------------------------------------------------------

# RFC 5321 4.5.3.1: octets (UTF-8 octets for RFC 6531 addresses).
MAX_ADDRESS_OCTETS: Final = 254
MAX_LOCAL_PART_OCTETS: Final = 64
# A whole "Display Name <address>" field; checked before any regex sees it.
MAX_ADDRESS_FIELD_CHARS: Final = 998

_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_LOCAL = rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}\.)*{_LABEL}"
_ADDR_RE: Final = re.compile(rf"^{_LOCAL}@{_DOMAIN}$")
# RFC 6531 3.3: atext also takes UTF8-non-ascii; _intl_local_problem narrows which.
_UATEXT = "\u0080-\U0010ffff" + _ATEXT  # _ATEXT ends in a literal "-"
_ULOCAL_RE: Final = re.compile(rf"^[{_UATEXT}]+(?:\.[{_UATEXT}]+)*$")
_DOMAIN_RE: Final = re.compile(rf"^{_DOMAIN}$")
# Not in a local part: controls, format characters (bidi overrides, zero-width joiners:
# spoofing), surrogates, private use, unassigned code points, and every kind of space.
_BAD_LOCAL_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"})
_NAMED_RE: Final = re.compile(r"^\s*(?P<name>[^<>\r\n]*?)\s*<(?P<addr>[^<>\s]+)>\s*$")
_HEADER_NAME_RE: Final = re.compile(r"^[!-9;-~]+$")


def split_address(addr: str) -> tuple[str, str]:
    """``"Ann <ann@x.org>"`` -> ``("Ann", "ann@x.org")``; anything else -> ``("", addr)``."""
    if addr.endswith(">"):
        m = _NAMED_RE.match(addr)
        if m:
            return m.group("name"), m.group("addr")
    return "", addr


def bare_address(addr: str) -> str:
    """``"Ann <ann@x.org>"`` -> ``"ann@x.org"``; a bare address is returned as is."""
    return split_address(addr)[1]


def _no_newlines(field: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValidationError(field, "must not contain CR or LF")


def check_address(field: str, addr: str) -> str:
    """Validate one address (bare or ``Name <addr>``) and return it trimmed.

    Internationalised addresses are accepted (RFC 6531: UTF-8 local parts; IDNA 2008
    domains, whose U-labels come back in canonical lower-case form, A-labels as given).
    """
    if not isinstance(addr, str) or not addr.strip():
        raise ValidationError(field, "must be a non-empty email address")
    if len(addr) > MAX_ADDRESS_FIELD_CHARS:
        raise ValidationError(field, f"at most {MAX_ADDRESS_FIELD_CHARS} characters")
    _no_newlines(field, addr)
    addr = addr.strip()
    bare = addr
    m = None
    if addr.endswith(">"):
        m = _NAMED_RE.match(addr)
        if not m:
            raise ValidationError(field, f"{addr!r} is not a valid email address")
        bare = m.group("addr")
        if '"' in m.group("name"):
            raise ValidationError(field, "display names may not contain double quotes")
    local, at, domain = bare.rpartition("@")
    if (
        len(bare) > MAX_ADDRESS_OCTETS
        or len(local) > MAX_LOCAL_PART_OCTETS
        or not at
        or not (_ADDR_RE.match(bare) if bare.isascii() else _ULOCAL_RE.match(local))
    ):
        raise ValidationError(field, f"{bare!r} is not a valid email address")
    if bare.isascii():
        if "xn--" in domain.lower():
            _check_a_labels(field, bare, domain)
        return addr
    problem = "" if local.isascii() else _intl_local_problem(local)
    if problem:
        raise ValidationError(field, f"{bare!r} is not a valid email address: {problem}")
    if domain.isascii():
        a_domain = domain
        if not _DOMAIN_RE.match(domain):
            raise ValidationError(field, f"{bare!r} is not a valid email address")
        if "xn--" in domain.lower():
            _check_a_labels(field, bare, domain)
    else:
        try:
            a_domain = ascii_domain(domain)
            domain = str(idna.decode(a_domain))  # canonical U-labels: lower case, NFC
        except UnicodeError as exc:
            raise ValidationError(
                field, f"{bare!r} is not a valid email address: bad IDNA 2008 domain ({exc})"
            ) from None
        if not _DOMAIN_RE.match(a_domain):  # e.g. a trailing dot, which IDNA allows
            raise ValidationError(field, f"{bare!r} is not a valid email address")
    canonical = f"{local}@{domain}"
    if len(canonical.encode("utf-8")) > MAX_ADDRESS_OCTETS or (
        local.isascii() and len(local) + 1 + len(a_domain) > MAX_ADDRESS_OCTETS
    ):
        raise ValidationError(field, f"{bare!r} is longer than {MAX_ADDRESS_OCTETS} octets")
    if m is None:
        return canonical
    return addr[: m.start("addr")] + canonical + addr[m.end("addr") :]


def _check_a_labels(field: str, bare: str, domain: str) -> None:
    """An ``xn--`` label must be a valid A-label (Punycode of a valid U-label)."""
    try:
        idna.decode(domain)
    except UnicodeError as exc:
        raise ValidationError(
            field, f"{bare!r} is not a valid email address: bad IDNA 2008 domain ({exc})"
        ) from None


def _intl_local_problem(local: str) -> str:
    """Why a non-ASCII local part (already matched by _ULOCAL_RE) is unacceptable, or ""."""
    for ch in local:
        if ch >= "\x80" and unicodedata.category(ch) in _BAD_LOCAL_CATEGORIES:
            return f"U+{ord(ch):04X} may not appear in a local part"
    if len(local.encode("utf-8")) > MAX_LOCAL_PART_OCTETS:
        return f"the local part is longer than {MAX_LOCAL_PART_OCTETS} octets"
    if not unicodedata.is_normalized("NFC", local):
        return "the local part is not in Unicode normalization form NFC (RFC 6532 3.1)"
    return ""


@functools.lru_cache(maxsize=1024)
def ascii_domain(domain: str) -> str:
    """A domain in ASCII: ``münchen.de`` -> ``xn--mnchen-3ya.de`` (IDNA 2008 A-labels,
    after the UTS 46 mapping, which folds case); an ASCII domain as it is.

    Raises UnicodeError (``idna.IDNAError``) when ``domain`` is not a valid IDN.
    """
    if domain.isascii():
        return domain
    return idna.encode(domain, uts46=True).decode("ascii")


def _address_list(field: str, value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [check_address(field, value)]
    return [check_address(f"{field}[{i}]", a) for i, a in enumerate(value)]


def normalize(msg: MessageIn, *, default_from: str, field_prefix: str = "") -> Message:
    """Validate a decoded request and return the stored form.

    Raises ValidationError whose ``field`` is prefixed with ``field_prefix``
    (``messages[3].`` inside a batch).
    """
    try:
        return _normalize(msg, default_from)
    except ValidationError as exc:
        if field_prefix:
            raise ValidationError(field_prefix + exc.field, exc.detail) from None
        raise


def _normalize(msg: MessageIn, default_from: str) -> Message:
    sender = check_address("from", msg.from_) if msg.from_ is not None else default_from
    to = _address_list("to", msg.to)
    cc = _address_list("cc", msg.cc)
    bcc = _address_list("bcc", msg.bcc)
    if not to:
        raise ValidationError("to", "at least one recipient is required")
    if len(to) + len(cc) + len(bcc) > MAX_RECIPIENTS:
        raise ValidationError("to", f"at most {MAX_RECIPIENTS} recipients (to+cc+bcc)")
    _no_newlines("subject", msg.subject)
    if len(msg.subject) > MAX_SUBJECT_CHARS:
        raise ValidationError("subject", f"at most {MAX_SUBJECT_CHARS} characters")
    if msg.text is None and msg.html is None:
        raise ValidationError("text", "a message needs a text or an html body")
    headers: list[tuple[str, str]] = []
    for name, value in msg.headers.items():
        where = f"headers.{name}"
        if not _HEADER_NAME_RE.match(name):
            raise ValidationError(where, "header names are printable ASCII without ':'")
        if name.lower() in RESERVED_HEADERS:
            raise ValidationError(where, "this header is set by the engine; use the field")
        _no_newlines(where, value)
        headers.append((name, value))
    reply_to = _address_list("reply_to", msg.reply_to)
    if len(msg.tags) > MAX_TAGS:
        raise ValidationError("tags", f"at most {MAX_TAGS} tags")
    for i, tag in enumerate(msg.tags):
        if not tag or len(tag) > 64:
            raise ValidationError(f"tags[{i}]", "tags are 1 to 64 characters")
        _no_newlines(f"tags[{i}]", tag)
    if msg.max_attempts is not None and not 1 <= msg.max_attempts <= MAX_ATTEMPTS:
        raise ValidationError("max_attempts", f"must be 1 to {MAX_ATTEMPTS}")
    if msg.retry_for_s is not None and not 0 < msg.retry_for_s <= MAX_RETRY_FOR_S:
        raise ValidationError("retry_for_s", f"must be more than 0 and at most {MAX_RETRY_FOR_S}")
    return Message(
        sender, to, cc, bcc, msg.subject, msg.text, msg.html, headers, reply_to,
        list(msg.tags), msg.max_attempts, msg.retry_for_s,
    )  # fmt: skip


def lane_of(priority: str | int | None) -> str:
    """``priority`` (a lane name or 1-10, 10 most urgent) -> lane; raises ValidationError."""
    if priority is None:
        return "normal"
    if isinstance(priority, str):
        if priority in LANES:
            return priority
        raise ValidationError("priority", "must be high, normal, low or 1 to 10")
    if isinstance(priority, bool) or not 1 <= priority <= 10:
        raise ValidationError("priority", "must be high, normal, low or 1 to 10")
    return "high" if priority >= 8 else "normal" if priority >= 4 else "low"


def check_tenant(field: str, tenant: str) -> str:
    if not _TENANT_RE.match(tenant):
        raise ValidationError(field, "1 to 64 characters from A-Z a-z 0-9 . _ -")
    return tenant


def route(
    msg: MessageIn, *, now_ms: int, default_tenant: str = DEFAULT_TENANT, field_prefix: str = ""
) -> Routing:
    """Validate the flow-control fields (priority, tenant, send_at, delay_s) of a request.

    A ``send_at`` in the past means now. Raises ValidationError with ``field_prefix``.
    """
    try:
        return _route(msg, now_ms, default_tenant)
    except ValidationError as exc:
        if field_prefix:
            raise ValidationError(field_prefix + exc.field, exc.detail) from None
        raise


def _route(msg: MessageIn, now_ms: int, default_tenant: str) -> Routing:
    lane = lane_of(msg.priority)
    tenant = check_tenant("tenant", msg.tenant) if msg.tenant is not None else default_tenant
    due_ms = 0
    if msg.send_at is not None and msg.delay_s is not None:
        raise ValidationError("send_at", "give send_at or delay_s, not both")
    if msg.send_at is not None:
        due_ms = parse_rfc3339_ms("send_at", msg.send_at)
    elif msg.delay_s is not None:
        if not 0 <= msg.delay_s <= MAX_DELAY_S:
            raise ValidationError("delay_s", f"must be 0 to {MAX_DELAY_S} seconds")
        due_ms = now_ms + int(msg.delay_s * 1000)
    if due_ms > now_ms + MAX_DELAY_S * 1000:
        raise ValidationError("send_at" if msg.send_at else "delay_s", "at most a year ahead")
    if due_ms <= now_ms:
        due_ms = 0
    return Routing(lane, tenant, due_ms)


def parse_rfc3339_ms(field: str, text: str) -> int:
    """RFC 3339 date-time with an offset (``2026-11-22T10:00:00Z``) -> epoch ms."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(field, "must be an RFC 3339 time like 2026-11-22T10:00:00Z") from None
    if dt.tzinfo is None or "T" not in text.upper():
        raise ValidationError(field, "needs a date, a time and an offset (Z or +01:00)")
    return int(dt.timestamp() * 1000)


def recipient_domains(message: Message) -> str:
    """Distinct lower-cased recipient domains, comma-separated (rate-limit buckets)."""
    seen: dict[str, None] = {}
    for addr in message.envelope_recipients():
        seen.setdefault(addr.rpartition("@")[2].lower(), None)
    return ",".join(seen)


def ms_to_iso(ms: int) -> str:
    """Milliseconds since the epoch -> RFC 3339 UTC with milliseconds."""
    dt = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
