"""Schema migrations: the versioned ``migrations/NNNN_name.sql`` files, applied in order,
each in its own transaction, recorded in ``history_migrations``.

Safe to run on every start and from several replicas at once: a session-level advisory
lock lets one apply while the others wait, then find nothing left to do. Synchronous
(a connection in hand): ``engine db migrate`` runs it directly, the writer in a thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from psycopg import Connection

_NAME_RE: Final = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# pg_advisory_lock key of the migrations (any constant no other code uses).
_LOCK_KEY: Final = 0x656E67696E65_01  # "engine" + 1


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """Every migration file shipped with the package, by version."""
    base = resources.files("engine.history") / "migrations"
    found: list[Migration] = []
    for entry in base.iterdir():
        m = _NAME_RE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text()))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version: {versions}")
    return found


def migrate(conn: Connection[Any]) -> list[Migration]:
    """Apply what ``conn``'s database lacks; the migrations applied now (oldest first).

    ``conn`` must be in autocommit mode or idle: each migration commits on its own."""
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", [_LOCK_KEY])
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS history_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in conn.execute("SELECT version FROM history_migrations")}
        applied: list[Migration] = []
        for mig in migrations():
            if mig.version in done:
                continue
            with conn.transaction():
                conn.execute(mig.sql.encode())
                conn.execute(
                    "INSERT INTO history_migrations (version, name) VALUES (%s, %s)",
                    [mig.version, mig.name],
                )
            applied.append(mig)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", [_LOCK_KEY])


def applied_versions(conn: Connection[Any]) -> list[int]:
    """Versions recorded as applied ([] on a database never migrated)."""
    exists = conn.execute("SELECT to_regclass('history_migrations')").fetchone()
    if not exists or exists[0] is None:
        return []
    return [row[0] for row in conn.execute("SELECT version FROM history_migrations ORDER BY 1")]
