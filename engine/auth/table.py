"""This replica's copy of the API keys and tenants, kept fresh from Redis.

Checking a key costs no Redis round trip in the common case: the table is loaded at
start and reloaded when the shared version counter moves (polled every
``auth.refresh_s``), so a revocation reaches every replica within about that long. A key
made on another replica since the last reload is read once (misses are remembered for
``refresh_s``, so a flood of made-up keys costs at most one read per kid per interval).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Final, NoReturn

import msgspec
import trio

from engine.auth.principal import ALL_TENANTS, KeyRecord, Principal, TenantRecord, principal_of
from engine.auth.tokens import hash_matches, key_id, new_secret, session_kid
from engine.errors import QueueError
from engine.queue import AccessStore

log = logging.getLogger(__name__)

_decode_key = msgspec.json.Decoder(KeyRecord).decode
_decode_tenant = msgspec.json.Decoder(TenantRecord).decode
_MAX_MISSES: Final = 10_000
_MAX_VERIFIED: Final = 10_000


class AccessTable:
    def __init__(
        self,
        store: AccessStore,
        *,
        refresh_s: float = 1.0,
        identities: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.store = store
        self.refresh_s = refresh_s
        # From the settings (auth.identities): "*" applies to every tenant.
        self._configured = {t: list(ids) for t, ids in (identities or {}).items()}
        self.version = -1
        self.secret = ""
        self._keys: dict[str, tuple[KeyRecord, Principal]] = {}
        self._tenants: dict[str, TenantRecord] = {}
        self._misses: dict[str, float] = {}  # kid -> monotonic time to forget the miss
        # Keys already checked against their hash (cleared at every reload, so a revoked
        # key goes with the table): the common request costs one dict lookup.
        self._verified: dict[str, Principal] = {}

    async def load(self) -> None:
        """Read everything (at start, and when the version moved)."""
        version, keys, tenants = await self.store.snapshot()
        if not self.secret:
            self.secret = await self.store.secret(new_secret())
        table: dict[str, tuple[KeyRecord, Principal]] = {}
        for kid, raw in keys.items():
            try:
                record = _decode_key(raw)
            except msgspec.DecodeError as exc:  # one bad record must not lock everyone out
                log.error("auth.key.unreadable kid=%s error=%s", kid, exc)
                continue
            table[kid] = (record, principal_of(record))
        self._keys = table
        self._tenants = {}
        for name, raw in tenants.items():
            try:
                self._tenants[name] = _decode_tenant(raw)
            except msgspec.DecodeError as exc:
                log.error("auth.tenant.unreadable tenant=%s error=%s", name, exc)
        self._misses.clear()
        self._verified = {}
        self.version = version

    async def serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Reload whenever the shared version moves; a Redis outage keeps the last copy."""
        await self.load()
        task_status.started()
        while True:
            await trio.sleep(self.refresh_s)
            try:
                if await self.store.version() != self.version:
                    await self.load()
            except QueueError as exc:
                log.warning("auth.refresh.failed error=%s", exc)

    async def authenticate(self, key: str) -> Principal | None:
        """The principal of a valid key; None for anything else."""
        known = self._verified.get(key)
        if known is not None:
            return known
        kid = key_id(key)
        if kid is None:
            return None
        entry = self._keys.get(kid)
        if entry is None:
            entry = await self._fetch(kid)
            if entry is None:
                return None
        record, principal = entry
        if not hash_matches(key, record.sha256):
            return None
        if len(self._verified) < _MAX_VERIFIED:
            self._verified[key] = principal
        return principal

    async def _fetch(self, kid: str) -> tuple[KeyRecord, Principal] | None:
        now = time.monotonic()
        if self._misses.get(kid, 0.0) > now:
            return None
        raw = await self.store.key(kid)
        if raw is None:
            if len(self._misses) >= _MAX_MISSES:
                self._misses.clear()
            self._misses[kid] = now + self.refresh_s
            return None
        record = _decode_key(raw)
        entry = self._keys[kid] = (record, principal_of(record))
        return entry

    def session(self, cookie: str) -> Principal | None:
        """The principal of a valid, unexpired session cookie whose key still exists."""
        kid = session_kid(cookie, self.secret, time.time()) if self.secret else None
        entry = self._keys.get(kid) if kid else None
        return entry[1] if entry else None

    def identities(self, tenant: str) -> list[str]:
        """The From identities ``tenant`` may use (settings and API together)."""
        record = self._tenants.get(tenant)
        return [
            *(record.identities if record else ()),
            *self._configured.get(tenant, ()),
            *self._configured.get(ALL_TENANTS, ()),
        ]

    def key_records(self) -> list[KeyRecord]:
        return [record for record, _ in self._keys.values()]

    def tenant_records(self) -> list[TenantRecord]:
        return list(self._tenants.values())
