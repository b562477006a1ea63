"""Who is calling, and what they may do: key and tenant records, the ``Principal`` a
request acts as, scopes, and the sender-identity rule. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from engine.errors import ValidationError
from engine.models import ascii_domain, bare_address

# What a key can be allowed to do. "admin" implies every other scope.
SCOPES: Final = (
    "send", "read", "events", "dead-letters", "schedules", "webhooks", "suppressions",
    "templates", "admin",
)  # fmt: skip
# A route everyone may call (health, the page, the spec) declares this instead.
PUBLIC: Final = "public"
ALL_TENANTS: Final = "*"


class KeyRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An API key as stored: never the key itself, only its sha256."""

    kid: str
    name: str
    sha256: str
    scopes: list[str]
    tenant: str  # whose mail it sends by default, and whose it sees
    # Further tenants it may act for (the message's `tenant` field); ["*"]: all.
    tenants: list[str] = []
    created_at: str = ""
    # Sandbox: every message it sends goes through the queue but not to a server
    # (its wire form is kept: GET /v1/messages/{id}/raw).
    sandbox: bool = False


class TenantRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A tenant's sender identities: domains (``example.com``), addresses
    (``noreply@example.org``) or ``*`` (any). A tenant without a record may send only
    from the engine's own default From address."""

    name: str
    identities: list[str] = []


@dataclass(frozen=True, slots=True)
class Principal:
    kid: str
    name: str
    tenant: str
    scopes: frozenset[str]
    tenants: frozenset[str] | None  # every tenant it may act for (own included); None: all
    sandbox: bool = False  # its messages are kept, not sent

    def allows(self, scope: str) -> bool:
        return scope == PUBLIC or "admin" in self.scopes or scope in self.scopes

    def sees(self, tenant: str) -> bool:
        return self.tenants is None or tenant in self.tenants

    @property
    def multi_tenant(self) -> bool:
        return self.tenants is None or len(self.tenants) > 1


def principal_of(record: KeyRecord) -> Principal:
    tenants = None if ALL_TENANTS in record.tenants else frozenset([record.tenant, *record.tenants])
    return Principal(
        record.kid, record.name, record.tenant, frozenset(record.scopes), tenants, record.sandbox
    )


# Everything, for every tenant: what a request acts as when auth.enabled is false.
UNCHECKED: Final = Principal("-", "auth disabled", "default", frozenset(SCOPES), None)


def check_may_send(
    p: Principal, tenant: str, from_field: str | None, identities: list[str], default_from: str
) -> None:
    """A message for ``tenant`` From ``from_field`` (None: the engine's default) may be
    sent with ``p``'s key: it acts for the tenant, the tenant has the identity.
    ValidationError names the field (``tenant`` or ``from``) otherwise."""
    if not p.sees(tenant):
        raise ValidationError("tenant", f"this API key does not act for tenant {tenant!r}")
    if from_field is None:
        return
    sender = bare_address(from_field.strip())
    if not identity_allowed(sender, identities, default_from):
        raise ValidationError(
            "from",
            f"tenant {tenant!r} may not send as {sender!r}: add the domain or address to its "
            f"identities (PUT /v1/tenants/{tenant}, or `engine tenants set {tenant} --from ...`)",
        )


def identity_allowed(address: str, identities: list[str], default_from: str) -> bool:
    """May mail go out From ``address`` for a tenant with these ``identities``?

    An identity is ``*``, an address (exact, case-insensitive) or a domain (the
    address's domain exactly: subdomains are identities of their own). The engine's
    own default From address is always allowed.
    """
    addr = _comparable(address)
    if addr == _comparable(bare_address(default_from.strip())):
        return True
    domain = addr.rpartition("@")[2]
    for identity in identities:
        want = identity.strip().lower()
        if want == ALL_TENANTS:
            return True
        want = _comparable(want) if "@" in want else _ascii(want)
        if want in (addr, domain):
            return True
    return False


def _ascii(domain: str) -> str:
    """A domain in one spelling: IDNA A-labels (bücher.example = xn--bcher-kva.example)."""
    try:
        return ascii_domain(domain.strip().lower())
    except UnicodeError:
        return domain.strip().lower()


def _comparable(address: str) -> str:
    local, _, domain = address.strip().rpartition("@")
    return f"{local.lower()}@{_ascii(domain)}"
