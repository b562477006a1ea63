"""Who a request acts as, checked before any handler runs: the Host it names (DNS
rebinding), its credentials (an API key in ``Authorization: Bearer`` or ``X-API-Key``, or
the dashboard's session cookie), the scope its route needs, and -- for a cookie, which a
browser adds on its own -- that a state-changing request or websocket comes from our page.
"""

from __future__ import annotations

from typing import Final

from engine.api.asgi import Scope, header
from engine.api.exchange import Fail
from engine.auth import PUBLIC, UNCHECKED, AccessTable, Principal

SESSION_COOKIE: Final = "engine_session"
# Where a websocket route finds its principal in the ASGI scope (the router puts it).
PRINCIPAL: Final = "engine.principal"
_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
_REALM: Final = b'Bearer realm="engine"'


def allowed_hosts(configured: list[str], bind: str) -> frozenset[str] | None:
    """The Host names served (lower case, no port); None: any."""
    if configured:
        names = frozenset(h.strip().lower() for h in configured)
        return None if "*" in names else names
    host = bind.rpartition(":")[0].strip("[]").lower()
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        return _LOOPBACK_NAMES | {host}
    return None


def host_name(value: bytes) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[: text.find("]") + 1]
    return text.partition(":")[0]


def cookie_value(scope: Scope, name: str) -> str | None:
    raw = header(scope, b"cookie")
    if raw is None or len(raw) > 8192:
        return None
    for part in raw.decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class Guard:
    """Checks for one replica; ``table`` None means auth is off (everyone is admin)."""

    def __init__(self, table: AccessTable | None, hosts: frozenset[str] | None) -> None:
        self.table = table
        self.hosts = hosts

    def check_host(self, scope: Scope) -> None:
        if self.hosts is None:
            return
        raw = header(scope, b"host")
        if raw is None or host_name(raw) not in self.hosts:
            raise Fail(
                421, "host-not-allowed", "Host not allowed",
                "this server does not answer for that Host name (http.allowed_hosts)",
            )  # fmt: skip

    async def principal(self, scope: Scope, needs: str, *, probe: bool = False) -> Principal:
        """The principal allowed to call a route needing scope ``needs``; Fail 401/403.
        ``probe``: a health or metrics route, which load balancers call with their own
        Host names (and which tells a rebinding page nothing worth the check)."""
        if not probe:
            self.check_host(scope)
        if self.table is None or needs == PUBLIC:
            return UNCHECKED if self.table is None else _ANONYMOUS
        if scope.get("type") == "websocket" and header(scope, b"origin") is not None:
            check_origin(scope)  # a page of another site may not open our feed
        key = presented_key(scope)
        if key is not None:
            principal = await self.table.authenticate(key)
            if principal is None:
                raise _unauthorized("invalid_token", "this API key is not valid (revoked?)")
        else:
            cookie = cookie_value(scope, SESSION_COOKIE)
            principal = self.table.session(cookie) if cookie else None
            if principal is None:
                raise _unauthorized(
                    None,
                    "send an API key: Authorization: Bearer <key> (or X-API-Key: <key>); "
                    "the dashboard logs in with one",
                )
            if scope.get("type") == "websocket" or scope.get("method") not in _SAFE_METHODS:
                check_origin(scope)
        if not principal.allows(needs):
            raise Fail(
                403, "insufficient-scope", "Insufficient scope",
                f"this key may not do this: it needs the {needs!r} scope",
                headers=[(b"www-authenticate",
                          _REALM + f', error="insufficient_scope", scope="{needs}"'.encode())],
            )  # fmt: skip
        return principal


def check_origin(scope: Scope) -> None:
    """A browser's cross-site request (Origin not this Host) is refused: 403."""
    origin = header(scope, b"origin")
    host = header(scope, b"host")
    if origin is None or host is None:
        raise _cross_site()
    text = origin.decode("latin-1").strip().lower()
    if "://" not in text or text.split("://", 1)[1] != host.decode("latin-1").strip().lower():
        raise _cross_site()


def _cross_site() -> Fail:
    return Fail(
        403, "cross-site", "Cross-site request refused",
        "a request authenticated by the session cookie must come from the dashboard's own "
        "origin (Origin header equal to the Host)",
    )  # fmt: skip


def presented_key(scope: Scope) -> str | None:
    """The API key a request presents (X-API-Key, else Authorization: Bearer), if any."""
    raw = header(scope, b"x-api-key")
    if raw is None:
        auth = header(scope, b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            raw = auth[7:].strip()
    return raw.decode("latin-1") if raw else None


def _unauthorized(error: str | None, detail: str) -> Fail:
    challenge = _REALM + (f', error="{error}"'.encode() if error else b"")
    return Fail(401, "unauthorized", "Unauthorized", detail,
                headers=[(b"www-authenticate", challenge)])  # fmt: skip


# What a public route's handler sees when auth is on: no scopes, no tenants.
_ANONYMOUS: Final = Principal("", "anonymous", "", frozenset(), frozenset())
