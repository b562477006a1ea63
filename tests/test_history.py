"""The message history against a real PostgreSQL (fixtures/postgres.py) and the real
Redis of the session: migrations, the writer (exactly one row per event however often an
entry is delivered, in any order, across an outage), search, the API and its fallbacks."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import pytest
import trio

from engine.config import HistorySettings, load_settings
from engine.embedded import RedisServer, free_port
from engine.history import Database, HistoryStore, HistoryWriter, Search, migrate, migrations
from engine.history.rows import build, oldest_kept_day, plan
from engine.ids import new_id
from engine.models import Event, MessageIn
from engine.pgserver import FAST_UNSAFE, PostgresServer
from engine.queue import (
    Failure,
    HistoryStream,
    NewJob,
    Queue,
    Redis,
    RespConnection,
    new_job,
)
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine
from fixtures.postgres import create_database

FAST = HistorySettings(linger_s=0.05, batch_entries=500)


def _job(to: str = "ann@example.com", **extra: Any) -> NewJob:
    incoming = MessageIn(to=to, subject=extra.pop("subject", "Hi"), text="Hello", **extra)
    return new_job(incoming, new_id(), default_from="app@example.com", now_ms=0)


def _rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


@asynccontextmanager
async def running_writer(
    redis_server: RedisServer,
    queue: Queue,
    dsn: str,
    settings: HistorySettings = FAST,
    instance: str = "w1",
) -> AsyncIterator[HistoryWriter]:
    db = Database(dsn, size=2)
    stream = HistoryStream(queue.client, queue.keys, RespConnection(redis_server.url))
    writer = HistoryWriter(stream, db, settings, instance, events_maxlen=100_000)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.serve)
        try:
            yield writer
        finally:
            nursery.cancel_scope.cancel()
    await stream.aclose()
    await db.aclose()


async def wait_events(dsn: str, n: int, timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while True:
            try:
                got = await trio.to_thread.run_sync(
                    _rows, dsn, "SELECT count(*) FROM history_events"
                )
            except (psycopg.errors.UndefinedTable, psycopg.OperationalError):
                got = [(0,)]  # not migrated yet, or PostgreSQL restarting
            if got[0][0] >= n:
                return
            await trio.sleep(0.05)


# -- schema -------------------------------------------------------------------------------


def test_migrations_are_versioned_files() -> None:
    found = migrations()
    assert [m.version for m in found] == sorted({m.version for m in found})
    assert found[0].version == 1 and "CREATE TABLE history_messages" in found[0].sql


def test_migrate_twice_and_concurrently(pg_dsn: str) -> None:
    errors: list[BaseException] = []
    applied: list[int] = []

    def run() -> None:
        try:
            with psycopg.connect(pg_dsn) as conn:
                applied.extend(m.version for m in migrate(conn))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(applied) == [m.version for m in migrations()]  # each applied once
    with psycopg.connect(pg_dsn) as conn:
        assert migrate(conn) == []
        conn.execute("SELECT history_ensure_day(current_date)")
        conn.execute("SELECT history_ensure_day(current_date)")  # idempotent


# -- the writer -------------------------------------------------------------------------


async def test_writer_keeps_every_message_and_event_once(
    redis_server: RedisServer, queue: Queue, pg_dsn: str
) -> None:
    jobs = [_job(f"user{i}@example.com", tags=["welcome"] if i % 2 else []) for i in range(30)]
    jobs.append(_job("Boss <BOSS@Example.com>", cc=["cc@example.com"], tenant="acme"))
    # An enqueue entry announces many jobs (one event each: <entry>.<n>).
    assert (await queue.enqueue(jobs)).outcome == "stored"
    claimed = await queue.claim(10)
    for c in claimed[:8]:
        await queue.ack(c.id)
    await queue.fail([Failure(claimed[8].id, "dead", 0, "550 no such user", bounce="invalid")])
    async with running_writer(redis_server, queue, pg_dsn) as writer:
        await wait_events(pg_dsn, 31 + 10 + 9)
        assert writer.statistics().up
    msgs = dict(_rows(pg_dsn, "SELECT id::text, state FROM history_messages"))
    assert len(msgs) == 31
    states = sorted(msgs.values())
    assert states.count("sent") == 8 and states.count("failed") == 1
    assert states.count("processing") == 1 and states.count("queued") == 21
    dup = _rows(
        pg_dsn, "SELECT event_id, count(*) FROM history_events GROUP BY 1 HAVING count(*) > 1"
    )
    assert dup == []
    (row,) = _rows(
        pg_dsn,
        "SELECT sender, recipients, subject, tenant, metadata->'cc', last_error, bounce"
        " FROM history_messages WHERE tenant = 'acme'",
    )
    assert row[0] == "app@example.com" and row[1] == ["BOSS@Example.com", "cc@example.com"]
    assert row[2] == "Hi" and row[3] == "acme" and row[4] == ["cc@example.com"]
    failed = _rows(pg_dsn, "SELECT last_error, bounce FROM history_messages WHERE state = 'failed'")
    assert failed == [("550 no such user", "invalid")]


async def test_redelivered_and_reordered_entries_end_the_same(
    redis_server: RedisServer, queue: Queue, pg_dsn: str, redis: Redis
) -> None:
    """The same entries written twice, and a later event committed before an earlier
    one: one row per event, the latest state wins."""
    with psycopg.connect(pg_dsn) as conn:
        migrate(conn)
    mid = new_id()
    later = [("2-0", [Event("2-0", "sent", mid, 2000, 1, "sent")])]
    earlier = [
        ("1-0", [Event("1-0.0", "queued", mid, 1000, 0, "queued", tags=["a"])]),
        ("1-5", [Event("1-5", "processing", mid, 1500, 1, "processing")]),
    ]
    store_db = Database(pg_dsn, size=1)
    from engine.history import sql

    oldest = oldest_kept_day(0, 1)
    for entries in (later, earlier, later, earlier):
        batch = build(plan(entries), {}, oldest_day=oldest, keep_bodies=False)
        await store_db.run(lambda conn, b=batch: sql.write_batch(conn, b, b.days))
    await store_db.aclose()
    assert _rows(pg_dsn, "SELECT state, attempts, tags FROM history_messages") == [
        ("sent", 1, ["a"])
    ]
    assert _rows(pg_dsn, "SELECT count(*) FROM history_events") == [(3,)]


async def test_outage_waits_and_loses_nothing(
    redis_server: RedisServer, queue: Queue, tmp_path: Any
) -> None:
    """PostgreSQL stopped under the writer: entries stay pending, the lag grows; started
    again, every event is written once."""
    with PostgresServer(settings=FAST_UNSAFE) as pg:
        settings = HistorySettings(linger_s=0.05, batch_entries=50, connect_timeout_s=1)
        async with running_writer(redis_server, queue, pg.dsn, settings) as writer:
            await queue.enqueue([_job() for _ in range(20)])
            await wait_events(pg.dsn, 20)
            await trio.to_thread.run_sync(pg.stop)
            await queue.enqueue([_job() for _ in range(20)])
            for c in await queue.claim(40):
                await queue.ack(c.id)
            with trio.fail_after(10):
                while writer.statistics().up or writer.statistics().lag_entries == 0:
                    await trio.sleep(0.1)
            assert writer.statistics().lag_s >= 0
            await trio.to_thread.run_sync(pg.start)
            await wait_events(pg.dsn, 40 + 40 + 40, timeout_s=20)
            with trio.fail_after(10):
                while writer.statistics().lag_entries:
                    await trio.sleep(0.1)
        assert _rows(pg.dsn, "SELECT count(*), count(DISTINCT event_id) FROM history_events") == [
            (120, 120)
        ]
        assert _rows(pg.dsn, "SELECT state, count(*) FROM history_messages GROUP BY 1") == [
            ("sent", 40)
        ]


# -- search -------------------------------------------------------------------------------


async def test_search_filters_and_pages(
    redis_server: RedisServer, queue: Queue, pg_dsn: str
) -> None:
    jobs = [_job(f"u{i % 3}@example.com", tags=["t1"] if i % 2 else ["t2"]) for i in range(12)]
    jobs += [_job("u0@example.com", tenant="acme", **{"from_": "Shop <shop@acme.test>"})]
    await queue.enqueue(jobs)
    async with running_writer(redis_server, queue, pg_dsn):
        await wait_events(pg_dsn, 13)
    db = Database(pg_dsn, size=1)
    store = HistoryStore(db)
    page = await store.search(Search(to="U0@example.com"))
    assert len(page.items) == 5 and page.next_cursor is None
    ids = [m.id for m in page.items]
    assert ids == sorted(ids, reverse=True)  # newest first
    assert len((await store.search(Search(to="u0@example.com", tenants=("default",)))).items) == 4
    assert len((await store.search(Search(tag="t1"))).items) == 6
    assert len((await store.search(Search(to="u1@example.com", tag="t1"))).items) == 2
    assert [m.tenant for m in (await store.search(Search(sender="shop@acme.test"))).items] == [
        "acme"
    ]
    assert len((await store.search(Search(state="queued", tenants=("acme",)))).items) == 1
    # Pages: 5 + 5 + 3, each older than the last.
    seen: list[str] = []
    cursor = ""
    while True:
        page = await store.search(Search(limit=5, cursor=cursor))
        seen += [m.id for m in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert len(seen) == 13 == len(set(seen)) and seen == sorted(seen, reverse=True)
    one = await store.message(seen[0], events=True)
    assert one is not None and one.events is not None and one.events[0].type == "queued"
    await db.aclose()


# -- the engine: API, fallbacks, idempotency ----------------------------------------------


@asynccontextmanager
async def history_engine(
    redis_url: str, dsn: str, **history: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    from engine.queue import open_redis

    async with open_redis(redis_url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={},
        overrides={"http": {"bind": bind},
                   "history": {"dsn": dsn, "linger_s": 0.05, **history}},
    )  # fmt: skip
    async with (
        inprocess_engine(settings, redis_url, MemoryTransport()) as running,
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        yield client, running


async def test_api_search_csv_fallback_and_readiness(
    redis_server: RedisServer, pg_dsn: str
) -> None:
    async with history_engine(redis_server.url, pg_dsn) as (client, running):
        r = await client.post(
            "/v1/messages/batch",
            json={"messages": [
                {"to": "ann@example.com", "subject": "=1+1", "text": "x", "tags": ["x"]},
                {"to": "bob@example.com", "subject": "Hi", "text": "x", "tenant": "acme"},
            ]},
        )  # fmt: skip
        ann, bob = r.json()["ids"]
        with trio.fail_after(10):
            while True:
                got = await client.get("/v1/history", params={"to": "ann@example.com"})
                assert got.status_code in (200, 503), got.text  # 503: not migrated yet
                page = got.json()
                if got.status_code == 200 and page["items"] and page["items"][0]["state"] == "sent":
                    break
                await trio.sleep(0.05)
        assert page["items"][0]["id"] == ann and page["items"][0]["tags"] == ["x"]
        csv = await client.get("/v1/history", params={"format": "csv", "tag": "x"})
        assert csv.headers["content-type"].startswith("text/csv")
        lines = csv.text.splitlines()
        assert lines[0].startswith("id,created_at,tenant,state") and ann in lines[1]
        assert "'=1+1" in lines[1]  # no formula for a spreadsheet
        detail = (await client.get(f"/v1/history/{bob}")).json()
        assert detail["tenant"] == "acme" and detail["events"][0]["type"] == "queued"
        ready = (await client.get("/readyz")).json()
        assert ready["history"]["up"] is True and ready["history"]["refusing"] is False
        # Redis lets the record go: the status comes from the history.
        await running.queue.client.delete([running.queue.keys.job(ann)])
        got = await client.get(f"/v1/messages/{ann}")
        assert got.status_code == 200 and got.headers["x-engine-source"] == "history"
        assert got.json()["state"] == "sent" and got.json()["id"] == ann
        assert (await client.get(f"/v1/messages/{new_id()}")).status_code == 404
        bad = await client.get("/v1/history", params={"cursor": "nope"})
        assert bad.status_code == 422 and bad.json()["field"] == "cursor"


async def test_tenant_key_sees_only_its_history(redis_server: RedisServer, pg_dsn: str) -> None:
    async with history_engine(redis_server.url, pg_dsn) as (client, _):
        made = await client.post(
            "/v1/keys", json={"name": "acme", "scopes": ["send", "read"], "tenant": "acme"}
        )
        acme = {"authorization": f"Bearer {made.json()['key']}"}
        theirs = (await client.post("/v1/messages", json={"to": "a@x.org", "text": "1"})).json()
        mine = (
            await client.post("/v1/messages", json={"to": "a@x.org", "text": "2"}, headers=acme)
        ).json()
        with trio.fail_after(10):
            while len((await client.get("/v1/history")).json().get("items", [])) < 2:
                await trio.sleep(0.05)
        page = (await client.get("/v1/history", headers=acme, params={"to": "a@x.org"})).json()
        assert [m["id"] for m in page["items"]] == [mine["id"]]
        assert (await client.get(f"/v1/history/{theirs['id']}", headers=acme)).status_code == 404
        other = await client.get("/v1/history", headers=acme, params={"tenant": "default"})
        assert other.status_code == 422


async def test_idempotency_key_beyond_redis(redis_server: RedisServer, pg_dsn: str) -> None:
    async with history_engine(redis_server.url, pg_dsn) as (client, running):
        body = {"to": "a@x.org", "text": "once"}
        first = await client.post("/v1/messages", json=body, headers={"idempotency-key": "k1"})
        with trio.fail_after(10):
            while not (await client.get("/v1/history")).json().get("items"):
                await trio.sleep(0.05)
        # Redis forgets the key (its 24 h passed): PostgreSQL still answers it.
        await running.queue.client.delete([running.queue.keys.idem("default/k1")])
        again = await client.post("/v1/messages", json=body, headers={"idempotency-key": "k1"})
        assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        assert again.headers["idempotent-replayed"] == "true"
        other = await client.post(
            "/v1/messages", json={**body, "text": "other"}, headers={"idempotency-key": "k1"}
        )
        assert other.status_code == 409


async def test_without_dsn_no_history_routes(redis_server: RedisServer) -> None:
    from fixtures.inproc import engine_client

    async with engine_client(redis_server.url) as (client, _, _):
        assert (await client.get("/v1/history")).status_code == 404
        assert "history" not in (await client.get("/readyz")).json()


def test_create_database_helper(pg_server: PostgresServer) -> None:
    dsn = create_database(pg_server, "helper_check")
    assert _rows(dsn, "SELECT 1") == [(1,)]


@pytest.mark.parametrize("ratio", [0.5])
def test_refusing_rule(ratio: float) -> None:
    w = HistoryWriter.__new__(HistoryWriter)
    w.settings = HistorySettings(refuse_at_ratio=ratio)
    w.events_maxlen = 100
    from engine.queue import GroupLag

    w._lag = GroupLag(40, 9, None)
    assert not w.refusing()
    w._lag = GroupLag(40, 10, None)
    assert w.refusing()
    w.settings = HistorySettings(on_lag="trim")
    assert not w.refusing()


async def test_free_text_survives_copy(
    redis_server: RedisServer, queue: Queue, pg_dsn: str
) -> None:
    """Tabs and backslashes (allowed in subjects, tags and display names) go through
    COPY's text format and come back as they were."""
    job = _job(
        "a@example.com", subject="tab\there \\ back\\slash", tags=["t\tag\\"],
        **{"from_": "Ann \\ Co <ann@example.com>"},
    )  # fmt: skip
    await queue.enqueue([job])
    async with running_writer(redis_server, queue, pg_dsn):
        await wait_events(pg_dsn, 1)
    (row,) = _rows(
        pg_dsn, "SELECT subject, tags, sender, metadata->>'priority' FROM history_messages"
    )
    assert row == ("tab\there \\ back\\slash", ["t\tag\\"], "Ann \\ Co <ann@example.com>", "normal")
    db = Database(pg_dsn, size=1)
    page = await HistoryStore(db).search(Search(tag="t\tag\\"))
    await db.aclose()
    assert [m.id for m in page.items] == [job.id]


async def test_ingest_waits_before_unwritten_history_is_trimmed(
    redis_server: RedisServer,
) -> None:
    """PostgreSQL unreachable from the start: entries pile up unwritten; at half of
    queue.events_maxlen ingest answers 503 history-behind, and /readyz shows the lag."""
    from engine.queue import open_redis

    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={},
        overrides={"http": {"bind": bind}, "queue": {"events_maxlen": 40},
                   "history": {"dsn": f"postgresql://nobody@127.0.0.1:{free_port()}/x",
                               "connect_timeout_s": 1}},
    )  # fmt: skip
    async with (
        inprocess_engine(settings, redis_server.url, MemoryTransport()),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        statuses = []
        with trio.fail_after(15):
            while 503 not in statuses:
                r = await client.post("/v1/messages", json={"to": "a@x.org", "text": "x"})
                statuses.append(r.status_code)
                await trio.sleep(0.1)
        assert r.json()["type"].endswith("history-behind") and r.headers["retry-after"] == "5"
        ready = await client.get("/readyz")
        assert ready.status_code == 200  # not a readiness condition
        h = ready.json()["history"]
        assert h["refusing"] is True and h["up"] is False and h["lag_entries"] >= 20
