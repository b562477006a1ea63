"""API key and session-cookie formats: making, parsing, hashing, signing. Pure functions.

An API key is ``ek_<kid>_<secret>``: ``kid`` (12 hex digits) names the key in lists and
revocations and finds its record without a scan; ``secret`` is 32 bytes of the OS's
randomness (256 bits) in URL-safe base64. Only ``sha256(key)`` is stored. A session
cookie is ``<kid>.<expiry s>.<HMAC-SHA256 of both under the deployment's secret>``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Final

KEY_PREFIX: Final = "ek_"
_KEY_RE: Final = re.compile(r"^ek_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
MAX_KEY_CHARS: Final = 64  # longer credentials are not keys: refused before any work


def make_key() -> tuple[str, str]:
    """A new key: (kid, the whole key). The key is shown once, then only its hash."""
    kid = secrets.token_hex(6)
    return kid, f"{KEY_PREFIX}{kid}_{secrets.token_urlsafe(32)}"


def key_id(key: str) -> str | None:
    """The kid of a well-formed key; None for anything else."""
    if len(key) > MAX_KEY_CHARS:
        return None
    m = _KEY_RE.match(key)
    return m.group(1) if m else None


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def hash_matches(key: str, stored: str) -> bool:
    return hmac.compare_digest(key_hash(key), stored)


def new_secret() -> str:
    """A deployment's session-signing secret."""
    return secrets.token_hex(32)


def sign_session(kid: str, expires_s: int, secret: str) -> str:
    payload = f"{kid}.{expires_s}"
    return f"{payload}.{_mac(payload, secret)}"


def session_kid(cookie: str, secret: str, now_s: float) -> str | None:
    """The kid of a cookie signed with ``secret`` and not expired; None otherwise."""
    if len(cookie) > 128:
        return None
    parts = cookie.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    kid, expires, mac = parts
    if not hmac.compare_digest(mac, _mac(f"{kid}.{expires}", secret)):
        return None
    return kid if int(expires) > now_s else None


def _mac(payload: str, secret: str) -> str:
    digest = hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
