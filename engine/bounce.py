"""Bounce classes: what a refusing SMTP reply means and what the engine does about it.

Pure (no I/O, no clocks); imports only the leaves. ``classify`` reads the RFC 3463
enhanced status code first, then well-known provider texts, then the basic code:

    class               what it means                         4xx            5xx
    invalid-recipient   no such mailbox, disabled, moved      retry          suppress
    mailbox-full        over quota                            retry          dead-letter
    message-too-large   over the server's size limit          dead-letter    dead-letter
    content-rejected    spam, virus, malformed content        retry          dead-letter
    policy-block        blocklist, reputation, SPF/DKIM/DMARC retry          dead-letter
    rate-limited        too fast, too many connections        slow-down      slow-down
    temporary           server problem, greylisting           retry          (unknown)
    dns-routing         no such domain, no route, no relay    retry          dead-letter
    tls-auth            TLS or authentication required        retry          dead-letter
    uncertain           sent, connection lost before reply    queue.on_uncertain
    unknown             nothing recognised                    retry          dead-letter
    attachment-missing  (no reply) an attachment's blob is gone  dead-letter

``suppress`` is a dead letter whose address should not be mailed again (the tenant's
suppression list reads ``Bounce.suppress``); ``slow-down`` retries and halves the
domain's shared rate. A 5xx of the temporary kind is "unknown": the server said it is
permanent. ``unknown`` is the engine's rule before classes: 4xx retry, 5xx dead-letter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias, get_args

from engine.errors import DeliveryUncertain, PermanentFailure, TransportError

BounceClass: TypeAlias = Literal[
    "invalid-recipient",
    "mailbox-full",
    "message-too-large",
    "content-rejected",
    "policy-block",
    "rate-limited",
    "temporary",
    "dns-routing",
    "tls-auth",
    "uncertain",
    "unknown",
    "attachment-missing",
]
Decision: TypeAlias = Literal["retry", "dead-letter", "suppress", "slow-down"]
# queue.on_uncertain: what a delivery that may or may not have happened becomes.
UncertainDecision: TypeAlias = Literal["retry", "dead-letter"]

CLASSES: Final[tuple[BounceClass, ...]] = get_args(BounceClass)
# Only this much of a reply's text is read: a hostile server cannot make us work more.
MAX_TEXT_CHARS: Final = 2048


@dataclass(frozen=True, slots=True)
class Bounce:
    cls: BounceClass
    decision: Decision

    @property
    def final(self) -> bool:
        """The job is dead-lettered (no retry can help)."""
        return self.decision in ("dead-letter", "suppress")

    @property
    def suppress(self) -> bool:
        """Dead-letter, and the recipient goes on the tenant's suppression list."""
        return self.decision == "suppress"


# (class, decision on a 4xx, decision on a 5xx)
_DECISIONS: Final[dict[BounceClass, tuple[Decision, Decision]]] = {
    "invalid-recipient": ("retry", "suppress"),
    "mailbox-full": ("retry", "dead-letter"),
    # The same bytes will be too large next time too.
    "message-too-large": ("dead-letter", "dead-letter"),
    "content-rejected": ("retry", "dead-letter"),
    "policy-block": ("retry", "dead-letter"),
    # A 5xx quota ("daily sending limit exceeded") passes too: retry within the budget.
    "rate-limited": ("slow-down", "slow-down"),
    "temporary": ("retry", "dead-letter"),
    "dns-routing": ("retry", "dead-letter"),
    "tls-auth": ("retry", "dead-letter"),
    "uncertain": ("retry", "dead-letter"),
    "unknown": ("retry", "dead-letter"),
    # Not a reply: the message names an attachment no longer stored (engine.sender).
    "attachment-missing": ("dead-letter", "dead-letter"),
}

# Enhanced status codes (subject, detail) whose meaning is unambiguous: they decide.
_STRONG: Final[dict[tuple[int, int], BounceClass]] = {
    (1, 1): "invalid-recipient",  # bad destination mailbox address
    (1, 2): "dns-routing",  # bad destination system address (no such domain)
    (1, 3): "invalid-recipient",  # bad mailbox address syntax
    (1, 6): "invalid-recipient",  # mailbox has moved, no forwarding address
    (2, 2): "mailbox-full",
    (2, 3): "message-too-large",  # message length exceeds administrative limit
    (3, 1): "temporary",  # mail system full
    (3, 4): "message-too-large",
    (3, 5): "temporary",  # system incorrectly configured
    (4, 3): "dns-routing",  # directory server (DNS) failure
    (4, 4): "dns-routing",  # unable to route
    (4, 6): "dns-routing",  # routing loop
    (4, 7): "temporary",  # delivery time expired
    (5, 3): "rate-limited",  # too many recipients
    (7, 13): "invalid-recipient",  # user account disabled
    (7, 17): "invalid-recipient",  # mailbox owner has changed
    (7, 18): "invalid-recipient",  # domain owner has changed
    (7, 23): "policy-block",  # SPF validation failed
    (7, 24): "policy-block",  # SPF validation error
    (7, 25): "policy-block",  # reverse DNS validation failed
    (7, 26): "policy-block",  # multiple authentication checks failed (DMARC)
    (7, 27): "policy-block",  # sender address has null MX
}
# Codes providers use loosely (Microsoft's 5.1.10 and 5.4.1 mean "recipient not found",
# Yahoo's 5.7.9 "policy", Gmail's 4.2.1 "rate"): the text decides, else this class.
_WEAK: Final[dict[tuple[int, int], BounceClass]] = {
    (1, 7): "policy-block",  # bad sender's mailbox address syntax
    (1, 8): "policy-block",  # bad sender's system address
    (1, 10): "dns-routing",  # recipient address has null MX
    (2, 1): "invalid-recipient",  # mailbox disabled
    (4, 5): "rate-limited",  # mail system congestion
    (7, 4): "tls-auth",  # security features not supported
    (7, 5): "tls-auth",  # cryptographic failure
    (7, 8): "tls-auth",  # authentication credentials invalid
    (7, 9): "tls-auth",  # authentication mechanism too weak
    (7, 10): "tls-auth",  # encryption needed
    (7, 11): "tls-auth",  # encryption required for requested authentication mechanism
    (7, 12): "tls-auth",  # a password transition is needed
    (7, 14): "tls-auth",  # trust relationship required
}
# The rest of a subject, when neither table names the detail.
_SUBJECT: Final[dict[int, BounceClass]] = {
    0: "unknown",
    1: "invalid-recipient",  # addressing
    2: "invalid-recipient",  # mailbox
    3: "temporary",  # mail system
    4: "temporary",  # network and routing
    5: "unknown",  # mail delivery protocol
    6: "content-rejected",  # message content or media
    7: "policy-block",  # security or policy
}

# Well-known texts, lower case; the first pair in this order whose text occurs wins.
# Plain substring tests: linear in the text, whatever a server sends.
_TEXTS: Final[tuple[tuple[BounceClass, tuple[str, ...]], ...]] = (
    ("temporary", ("greylist", "graylist", "greylisting")),
    (
        "policy-block",
        (
            "spamhaus", "spamcop", "barracuda", "blocked using", "block list", "blocklist",
            "blacklist", "dnsbl", "listed at", "listed on", "is listed",
            "reputation", "banned", "dmarc", "spf", "dkim", "unauthenticated",
            "ptr record", "reverse dns", "sending guidelines", "policy reason",
            "local policy", "security polic", "policy restriction",
            "sender address rejected", "traffic not accepted", "not allowed to send",
            "permissions to send",
        ),
    ),
    (
        "rate-limited",
        (
            "rate limit", "rate-limit", "ratelimit", "unusual rate", "at a rate",
            "sending limit", "sending quota", "too many connections", "too many messages",
            "too many sessions", "too many recipients", "too many concurrent",
            "concurrent server connections", "unexpected volume", "slow down",
            "throttl", "try again later, closing connection",
        ),
    ),
    (
        "mailbox-full",
        (
            "over quota", "overquota", "quota exceeded", "quotaexceeded", "mailbox full",
            "mailbox is full", "mailbox quota", "exceeded storage allocation",
        ),
    ),
    (
        "message-too-large",
        (
            "too big", "too large", "size limit", "size exceeds", "message size",
            "maximum message size",
            "bytes; the server takes",  # engine.transport.smtp's SIZE pre-check
        ),
    ),
    (
        "content-rejected",
        (
            "spam", "unsolicited", "virus", "malware", "phish", "content", "malformed",
            "suspicious", "bulk mail", "security issue",
        ),
    ),
    (
        "dns-routing",
        (
            "domain not found", "host not found", "host unknown", "name service error",
            "no mx", "mx record", "dns", "no such domain", "domain does not exist",
            "unrouteable", "unroutable", "relay access denied", "relaying denied",
            "not permitted to relay", "no route",
        ),
    ),
    (
        "invalid-recipient",
        (
            "user unknown", "unknown user", "no such user", "no such recipient",
            "user not found", "user doesn't exist", "user does not exist",
            "does not exist", "doesn't exist", "doesn't have a", "no mailbox",
            "mailbox unavailable", "mailbox is unavailable", "mailbox not found",
            "invalid mailbox", "invalid recipient", "recipient not found",
            "recipientnotfound", "unknown recipient", "recipient unknown",
            "recipient address rejected", "address rejected", "account is disabled",
            "account has been disabled", "is disabled", "no longer", "inactive",
            "not a valid mailbox", "mailbox disabled",
        ),
    ),
    (
        "tls-auth",
        (
            "starttls", "tls required", "requires tls", "encryption required",
            "authentication required", "must authenticate", "username and password",
            "authentication failed",
        ),
    ),
    (
        "temporary",
        (
            "temporar", "try again", "server busy", "system busy", "timeout", "timed out",
            "insufficient system", "resources", "system problem", "service unavailable",
        ),
    ),
)  # fmt: skip
# An enhanced status code: class.subject.detail, not part of a longer dotted number
# (an IP address or a version); bounded repetition, so no backtracking blow-up.
_ENHANCED: Final = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")


def enhanced_status(text: str) -> tuple[int, int, int] | None:
    """The first RFC 3463 enhanced status code in ``text`` (within MAX_TEXT_CHARS)."""
    m = _ENHANCED.search(text, 0, MAX_TEXT_CHARS)
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3)))


def classify(code: int, enhanced: str | None, text: str) -> Bounce:
    """The class of a refusing reply and the decision it drives.

    ``code`` is the basic reply code (550); ``enhanced`` its enhanced status code
    ("5.1.1"), or None to look for one at the start of ``text``; ``text`` the reply's
    text (an error message that quotes the reply will do: addresses are ignored).
    """
    permanent = code >= 500
    status = _parse(enhanced) if enhanced else None
    head = text[:MAX_TEXT_CHARS]
    if status is None:
        status = enhanced_status(head)
    cls = _by_status(status, head) if status is not None else None
    if cls is None:
        cls = _by_text(head) or _by_code(code)
    if cls == "temporary" and permanent:
        cls = "unknown"
    return Bounce(cls, _decide(cls, permanent))


def without_reply(text: str, *, permanent: bool) -> Bounce:
    """A failure with no reply to read: the connection broke or timed out before the
    content went out, or the transport refused the mail itself (its SIZE limit)."""
    cls = _by_text(text[:MAX_TEXT_CHARS]) or ("unknown" if permanent else "temporary")
    if cls == "temporary" and permanent:
        cls = "unknown"
    return Bounce(cls, _decide(cls, permanent))


def uncertain(on_uncertain: UncertainDecision) -> Bounce:
    """The whole message went out and no final reply came: it may have been delivered."""
    return Bounce("uncertain", on_uncertain)


# Providers' own words for a recipient they will not mail (checked before the SMTP texts:
# Postmark's explanation of "inactive" mentions spam complaints).
_PROVIDER_TEXTS: Final[tuple[tuple[str, BounceClass], ...]] = (
    ("marked as inactive", "invalid-recipient"),  # Postmark ErrorCode 406
    ("on the suppression list", "invalid-recipient"),  # SES account-level suppression
    ("on your suppression list", "invalid-recipient"),
)


def classify_http(status: int, text: str, *, permanent: bool) -> Bounce:
    """A provider API's refusal: its HTTP status and message. The transport already
    decided temporary (429, 5xx, no answer) or permanent (other 4xx); the class says why."""
    if status == 429:
        return Bounce("rate-limited", "slow-down")
    if status in (401, 403):  # our key: the operator's to fix, not the message's
        return Bounce("tls-auth", _decide("tls-auth", permanent=True))
    if status == 413:
        return Bounce("message-too-large", "dead-letter")
    low = text[:MAX_TEXT_CHARS].lower()
    cls: BounceClass | None = next((c for needle, c in _PROVIDER_TEXTS if needle in low), None)
    cls = cls or _by_text(low) or ("unknown" if permanent else "temporary")
    if cls == "rate-limited":
        return Bounce(cls, "slow-down")
    return Bounce(cls, _decide(cls, permanent))


def bounce_of(exc: TransportError, *, on_uncertain: UncertainDecision) -> Bounce:
    """The bounce of a failed delivery attempt, as the sender gets it from a transport."""
    if isinstance(exc, DeliveryUncertain):
        return uncertain(on_uncertain)
    if exc.http_status is not None:
        return classify_http(exc.http_status, str(exc), permanent=isinstance(exc, PermanentFailure))
    if exc.code is not None:
        return classify(exc.code, None, str(exc))
    return without_reply(str(exc), permanent=isinstance(exc, PermanentFailure))


def _decide(cls: BounceClass, permanent: bool) -> Decision:
    temporary, final = _DECISIONS[cls]
    return final if permanent else temporary


def _parse(enhanced: str) -> tuple[int, int, int] | None:
    m = _ENHANCED.fullmatch(enhanced.strip())
    return None if m is None else (int(m.group(1)), int(m.group(2)), int(m.group(3)))


def _by_status(status: tuple[int, int, int], text: str) -> BounceClass:
    _, subject, detail = status
    strong = _STRONG.get((subject, detail))
    if strong is not None:
        return strong
    return _by_text(text) or _WEAK.get((subject, detail)) or _SUBJECT.get(subject, "unknown")


def _by_text(text: str) -> BounceClass | None:
    # Addresses are the recipient's words, not the server's: "spam@x" says nothing.
    low = " ".join(w for w in text.lower().split() if "@" not in w)
    for cls, needles in _TEXTS:
        if any(n in low for n in needles):
            return cls
    return None


def _by_code(code: int) -> BounceClass:
    if code in (551, 553):  # user not local; mailbox name not allowed
        return "invalid-recipient"
    if code in (530, 535, 538):  # authentication required / failed; encryption required
        return "tls-auth"
    if 400 <= code < 500:
        return "temporary"
    return "unknown"
