"""The history's SQL, run on a connection in hand (engine.history.db runs these in
worker threads): write a batch, manage partitions, look messages up and search them.

Every write is idempotent: events by id (ON CONFLICT DO NOTHING), search terms and
bodies by message, and a message's row merged by stream position (rows.py), so a
batch written twice, or two writers' batches in either order, end the same.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Final

from engine.history.rows import Batch

if TYPE_CHECKING:
    from psycopg import Connection

# Where a batch is COPY-ed first: per connection, emptied at each commit.
_STAGING: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS history_in_events (m text, c bigint, e text, a bigint,"
    " t text, s text, n int, tn text, er text, b text, r text) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS history_in_messages (i text, c bigint, tn text, sn text,"
    " rc text, sj text, tg text, md text, st text, at int, u bigint, sa bigint, le text,"
    " bo text, ps text, pm text, ik text, ifp text, ip int, inn int, em bigint, es bigint)"
    " ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS history_in_terms (t text, m text, c bigint, tn text)"
    " ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS history_in_bodies (m text, c bigint, t text, h text)"
    " ON COMMIT DELETE ROWS",
)

_EPOCH: Final = "timestamptz 'epoch'"

# Ordered by key: concurrent writers lock rows in one order (no deadlock between them).
_INSERT_EVENTS: Final = f"""
INSERT INTO history_events (message_id, created_at, event_id, at, type, state, attempt,
                            tenant, error, bounce, recipients)
SELECT m::uuid, {_EPOCH} + c * interval '1 ms', e, {_EPOCH} + a * interval '1 ms', t, s, n,
       tn, er, b, string_to_array(r, ',')
FROM history_in_events ORDER BY m, e
ON CONFLICT DO NOTHING
"""

# The row already there and the batch's are merged: the later event (by stream position)
# sets state, error and class; what only an announce's record gives is kept once set.
_UPSERT_MESSAGES: Final = f"""
INSERT INTO history_messages AS h (id, created_at, tenant, sender, recipients, subject, tags,
    metadata, state, attempts, updated_at, sent_at, last_error, bounce, provider_state,
    provider_message_id, idem_key, idem_fp, idem_pos, idem_n, ev_ms, ev_seq)
SELECT i::uuid, {_EPOCH} + c * interval '1 ms', tn, sn, string_to_array(rc, ','), sj,
       string_to_array(tg, E'\\n'), md::jsonb, st, at, {_EPOCH} + u * interval '1 ms',
       {_EPOCH} + sa * interval '1 ms', le, bo, ps, pm, ik, ifp, ip, inn, em, es
FROM history_in_messages ORDER BY i
ON CONFLICT (id, created_at) DO UPDATE SET
    state = CASE WHEN (excluded.ev_ms, excluded.ev_seq) > (h.ev_ms, h.ev_seq)
                 THEN excluded.state ELSE h.state END,
    last_error = CASE WHEN (excluded.ev_ms, excluded.ev_seq) > (h.ev_ms, h.ev_seq)
                      THEN coalesce(excluded.last_error, h.last_error)
                      ELSE coalesce(h.last_error, excluded.last_error) END,
    bounce = CASE WHEN (excluded.ev_ms, excluded.ev_seq) > (h.ev_ms, h.ev_seq)
                  THEN coalesce(excluded.bounce, h.bounce)
                  ELSE coalesce(h.bounce, excluded.bounce) END,
    provider_state = CASE WHEN (excluded.ev_ms, excluded.ev_seq) > (h.ev_ms, h.ev_seq)
                          THEN coalesce(excluded.provider_state, h.provider_state)
                          ELSE coalesce(h.provider_state, excluded.provider_state) END,
    ev_ms = greatest(h.ev_ms, excluded.ev_ms),
    ev_seq = CASE WHEN (excluded.ev_ms, excluded.ev_seq) > (h.ev_ms, h.ev_seq)
                  THEN excluded.ev_seq ELSE h.ev_seq END,
    attempts = greatest(h.attempts, excluded.attempts),
    updated_at = greatest(h.updated_at, excluded.updated_at),
    sent_at = coalesce(h.sent_at, excluded.sent_at),
    sender = coalesce(h.sender, excluded.sender),
    recipients = coalesce(h.recipients, excluded.recipients),
    subject = coalesce(h.subject, excluded.subject),
    metadata = coalesce(h.metadata, excluded.metadata),
    tags = CASE WHEN h.tags = '{{}}' THEN excluded.tags ELSE h.tags END,
    provider_message_id = coalesce(excluded.provider_message_id, h.provider_message_id),
    idem_key = coalesce(h.idem_key, excluded.idem_key),
    idem_fp = coalesce(h.idem_fp, excluded.idem_fp),
    idem_pos = coalesce(h.idem_pos, excluded.idem_pos),
    idem_n = coalesce(h.idem_n, excluded.idem_n)
"""

_INSERT_TERMS: Final = f"""
INSERT INTO history_terms (term, message_id, created_at, tenant)
SELECT t, m::uuid, {_EPOCH} + c * interval '1 ms', tn FROM history_in_terms ORDER BY t, m
ON CONFLICT DO NOTHING
"""

_INSERT_BODIES: Final = f"""
INSERT INTO history_bodies (message_id, created_at, text_body, html_body)
SELECT m::uuid, {_EPOCH} + c * interval '1 ms', t, h FROM history_in_bodies
ON CONFLICT DO NOTHING
"""


def _copy(conn: Connection[Any], table: str, text: str) -> None:
    with conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as copy:
        copy.write(text)


def write_batch(conn: Connection[Any], batch: Batch, new_days: list[dt.date]) -> int:
    """One transaction: the days' partitions (``new_days``: those not known to exist),
    then events, messages, terms, bodies (COPY into temporary tables, then INSERT ... ON
    CONFLICT). Returns the events newly stored (the rest were stored before: a
    re-delivered entry)."""
    with conn.transaction():
        for statement in _STAGING:
            conn.execute(statement)
        for day in new_days:
            conn.execute("SELECT history_ensure_day(%s)", [day])
        stored = 0
        if batch.events:
            _copy(conn, "history_in_events", batch.events)
            stored = conn.execute(_INSERT_EVENTS).rowcount
        if batch.messages:
            _copy(conn, "history_in_messages", batch.messages)
            conn.execute(_UPSERT_MESSAGES)
        if batch.terms:
            _copy(conn, "history_in_terms", batch.terms)
            conn.execute(_INSERT_TERMS)
        if batch.bodies:
            _copy(conn, "history_in_bodies", batch.bodies)
            conn.execute(_INSERT_BODIES)
    return max(stored, 0)


# -- partitions --------------------------------------------------------------------------


def ensure_days(conn: Connection[Any], days: list[dt.date]) -> None:
    with conn.transaction():
        for day in days:
            conn.execute("SELECT history_ensure_day(%s)", [day])


def partition_days(conn: Connection[Any]) -> dict[str, list[dt.date]]:
    """Table -> the days it has partitions for."""
    rows = conn.execute(
        "SELECT parent.relname, child.relname FROM pg_inherits"
        " JOIN pg_class parent ON parent.oid = pg_inherits.inhparent"
        " JOIN pg_class child ON child.oid = pg_inherits.inhrelid"
        " WHERE parent.relname IN"
        " ('history_messages', 'history_events', 'history_terms', 'history_bodies')"
    ).fetchall()
    out: dict[str, list[dt.date]] = {}
    for parent, child in rows:
        suffix = child.rpartition("_")[2]
        if len(suffix) == 8 and suffix.isdigit():
            out.setdefault(parent, []).append(dt.datetime.strptime(suffix, "%Y%m%d").date())
    return out


def drop_days(conn: Connection[Any], table: str, days: list[dt.date]) -> None:
    """Drop ``table``'s partitions of ``days`` (retention)."""
    if table not in ("history_messages", "history_events", "history_terms", "history_bodies"):
        raise ValueError(table)
    with conn.transaction():
        for day in days:
            conn.execute(f"DROP TABLE IF EXISTS {table}_{day:%Y%m%d}")
