"""One-click unsubscribe (RFC 8058): the signed token that names who unsubscribes from
what, and the two headers that carry it. Pure: no I/O (the routes are
engine.api.unsubscribe; ingest adds the headers).

A token is ``<payload>.<mac>``, both base64url without padding: the payload is the JSON
array ``[tenant, list, address]``, the mac the first 16 bytes of HMAC-SHA256 under a key
derived from the deployment's secret. No record is kept per message: the link works for
as long as the secret stays the same, and cannot be forged to unsubscribe anyone else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Final
from urllib.parse import quote

import msgspec

from engine.errors import ValidationError

ALL: Final = "all"  # the list of a message sent with "unsubscribe": true
MAX_LIST_CHARS: Final = 64
_LIST: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MAC_BYTES: Final = 16
_decode = msgspec.json.Decoder(tuple[str, str, str]).decode
_encode = msgspec.json.Encoder().encode


def signing_key(secret: str) -> bytes:
    """This feature's key, derived from the deployment's secret (which also signs
    dashboard sessions: the derivation keeps the two apart)."""
    return hmac.new(secret.encode(), b"engine one-click unsubscribe v1", hashlib.sha256).digest()


def list_name(value: bool | str) -> str:
    """The list a message's ``unsubscribe`` names (``true``: all of the tenant's mail)."""
    if value is True:
        return ALL
    if isinstance(value, str) and 1 <= len(value) <= MAX_LIST_CHARS and _LIST.fullmatch(value):
        return value
    raise ValidationError(
        "unsubscribe", f"true, or a list name of 1 to {MAX_LIST_CHARS} letters, digits, "
        "'_', '.' or '-'",
    )  # fmt: skip


def list_scope(tenant: str, list_: str) -> str:
    """Whose suppression list an unsubscribe from ``list_`` goes on: the tenant's own
    (all of its mail) for ``all``, else ``<tenant>:list:<list>`` -- a list of its own that
    only messages sent with ``"unsubscribe": "<list>"`` are checked against (enqueue.lua;
    neither name can hold a colon)."""
    return tenant if list_ == ALL else f"{tenant}:list:{list_}"


def make_token(key: bytes, tenant: str, list_: str, address: str) -> str:
    payload = _encode((tenant, list_, address))
    mac = hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    return f"{_b64(payload)}.{_b64(mac)}"


def read_token(key: bytes, token: str) -> tuple[str, str, str] | None:
    """(tenant, list, address) of a token this key made; None for anything else."""
    payload_text, _, mac_text = token.partition(".")
    if not payload_text or len(token) > 2048:
        return None
    try:
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except ValueError:
        return None
    good = hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    if not hmac.compare_digest(mac, good):
        return None
    try:
        return _decode(payload)
    except msgspec.DecodeError:
        return None


def headers(base_url: str, token: str, mailto: str = "") -> dict[str, str]:
    """``List-Unsubscribe`` (the https link, and a mailto when configured) and
    ``List-Unsubscribe-Post`` (RFC 8058: a POST to the link unsubscribes)."""
    links = [f"<{base_url.rstrip('/')}/u/{token}>"]
    if mailto:
        links.append(f"<mailto:{mailto}?subject={quote('unsubscribe ' + token)}>")
    return {
        "List-Unsubscribe": ", ".join(links),
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64url") from exc
