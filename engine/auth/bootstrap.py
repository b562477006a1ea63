"""The first admin key: made at the first start when no key exists (so the README's
first command works), written to ``auth.admin_key_file`` (mode 0600) and shown once;
and ``auth.admin_key``, an operator's key (a container secret), registered at start.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from engine.auth.principal import ALL_TENANTS, KeyRecord
from engine.auth.table import AccessTable
from engine.auth.tokens import key_hash, key_id, make_key
from engine.errors import ConfigError
from engine.models import DEFAULT_TENANT, ms_to_iso

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class AdminKey:
    """What start-up tells the operator: a key made now (shown once) and/or its file."""

    made: str | None  # the whole key, when this start made it
    file: str | None  # where it is kept for the CLI, when there is such a file


def _admin_record(kid: str, key: str, name: str) -> KeyRecord:
    return KeyRecord(
        kid, name, key_hash(key), ["admin"], DEFAULT_TENANT, [ALL_TENANTS],
        ms_to_iso(int(time.time() * 1000)),
    )  # fmt: skip


async def ensure_admin(table: AccessTable, *, admin_key: str, key_file: str) -> AdminKey:
    if admin_key:
        kid = key_id(admin_key)
        if kid is None:
            raise ConfigError(
                "auth.admin_key is not an API key (ek_<12 hex>_<43 characters>); make one "
                "with `engine keys create` or leave it empty"
            )
        record = _admin_record(kid, admin_key, "admin (auth.admin_key)")
        if await table.store.put_key(kid, _encode(record), only_new=True):
            await table.load()
    path = Path(key_file) if key_file else None
    if path is not None and await trio.Path(path).exists():
        existing = (await trio.Path(path).read_text()).strip()
        if await table.authenticate(existing) is not None:
            return AdminKey(None, str(path))
    if table.key_records():
        return AdminKey(None, None)
    kid, key = make_key()
    await table.store.put_key(kid, _encode(_admin_record(kid, key, "admin (first start)")))
    await table.load()
    if path is not None:
        await trio.to_thread.run_sync(_write_secret, path, key)
    return AdminKey(key, str(path) if path else None)


def _write_secret(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
