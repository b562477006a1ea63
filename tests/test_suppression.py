"""Suppression lists against a real Redis, the real API over TCP and the real sink: a
hard bounce (+550 at RCPT) suppresses the address in fail.lua, enqueue drops suppressed
recipients (a `suppressed` event; the final state `suppressed` when none is left), the
API lists, adds, removes and imports per tenant, and tenants never see each other's."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
import trio

from engine.api.suppression import parse_import
from engine.config import SmtpSettings, load_settings
from engine.embedded import RedisServer, SinkProcess, free_port
from engine.ids import new_id
from engine.keys import Keys
from engine.models import Event, Message
from engine.queue import (
    EventLog,
    Failure,
    NewJob,
    Queue,
    Redis,
    SuppressionStore,
    address_key,
    open_redis,
)
from engine.transport import SmtpPool
from engine.watch import format_event
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

# -- pure parts --------------------------------------------------------------------------


def test_addresses_are_kept_bare_with_ascii_letters_lower_cased() -> None:
    assert address_key(" Ann Lee <Ann.Lee@Example.COM> ") == "ann.lee@example.com"
    # Lua's string.lower, which enqueue.lua and fail.lua use, leaves other letters alone.
    assert address_key("Jörg@Bücher.example") == "jörg@bücher.example"


def test_an_import_takes_address_or_address_reason_lines_and_names_the_bad_ones() -> None:
    text = (
        "email,reason\n"  # a header: skipped
        "ann@example.com\n"
        "\n"
        'Bob@Example.com,"left us, for good"\n'
        "not-an-address,complaint\n"
        "ann@example.com,again\n"  # a repeat: the first line's reason stays
        "eve@example.com,bad\x07reason\n"
    )
    parsed = parse_import(text, "import")
    assert parsed.lines == 7 and parsed.accepted == 3
    assert parsed.reasons == {"ann@example.com": "import", "bob@example.com": "left us, for good"}
    assert [r.line for r in parsed.refused] == [5, 7]
    assert "not a valid email address" in parsed.refused[0].detail
    # Without a header the first line is an address like the others.
    assert parse_import("x@example.com", "r").reasons == {"x@example.com": "r"}
    assert [r.line for r in parse_import("oops\nnope", "r").refused] == [2]


# -- the queue: enqueue and fail scripts -------------------------------------------------


def _payload(*to: str, cc: tuple[str, ...] = ()) -> bytes:
    msg = Message("e@localhost", list(to), list(cc), [], "Hi", "body", None, [], [], [])
    return msgspec.msgpack.encode(msg)


def _job(tenant: str, *to: str, **kw: Any) -> NewJob:
    bare = [address.rpartition("<")[2].rstrip(">") for address in to]
    return NewJob(new_id(), _payload(*to), tenant=tenant, recipients=",".join(bare), **kw)


async def _events(queue: Queue, job_id: str) -> list[Event]:
    return [e for e in (await EventLog(queue.client, queue.keys).range()).events if e.id == job_id]


async def test_enqueue_drops_suppressed_recipients_of_that_tenant_only(queue: Queue) -> None:
    store = SuppressionStore(queue.client, queue.keys)
    assert await store.add("acme", {"gone@example.com": "unsubscribed"}) == 1
    only = _job("acme", "Gone <GONE@example.com>")
    some = _job("acme", "ann@Example.com", "gone@example.com", tags="vip", domains="example.com")
    elsewhere = _job(
        "acme", "ann@example.org", "gone@example.com", domains="example.org,example.com"
    )
    later = _job("acme", "gone@example.com", "bob@example.com", due_ms=queue.now_ms() + 60_000)
    other = _job("zeta", "gone@example.com")  # zeta's list is not acme's
    unchecked = NewJob(new_id(), _payload("gone@example.com"), tenant="acme")  # no recipients
    await queue.enqueue([only, some, elsewhere, later, other, unchecked])

    rec = await queue.get(only.id)
    assert rec is not None and rec.state == "suppressed"
    assert rec.last_error == "every recipient is suppressed: GONE@example.com"
    assert await queue.client.ttl(queue.keys.job(only.id)) > 0  # kept like a failed record
    (event,) = await _events(queue, only.id)
    assert (event.type, event.state, event.recipients) == (
        "suppressed", "suppressed", ["GONE@example.com"],
    )  # fmt: skip
    assert event.tenant == "acme"
    assert "suppressed=GONE@example.com" in format_event(event)

    assert await queue.client.hget(queue.keys.job(some.id), "rcpts") == b"ann@Example.com"
    # The rate-limit buckets are those of the recipients left.
    assert await queue.client.hget(queue.keys.job(elsewhere.id), "doms") == b"example.org"
    kinds = [(e.type, e.state, e.recipients, e.tags) for e in await _events(queue, some.id)]
    assert kinds == [
        ("suppressed", "queued", ["gone@example.com"], ["vip"]),
        ("queued", "queued", [], ["vip"]),
    ]
    rec = await queue.get(later.id)
    assert rec is not None and rec.state == "scheduled"
    assert await queue.client.hget(queue.keys.job(later.id), "rcpts") == b"bob@example.com"
    for job in (other, unchecked):
        assert await queue.client.hget(queue.keys.job(job.id), "rcpts") is None

    # Claiming hands out the rest only: the partly suppressed job to ann alone.
    claimed = {j.id: j for j in await queue.claim(10)}
    assert set(claimed) == {some.id, elsewhere.id, other.id, unchecked.id}
    assert claimed[some.id].recipients == ["ann@Example.com"]
    assert claimed[other.id].recipients is None


async def _fail_dead(queue: Queue, job: NewJob, *, suppress: bool = True) -> None:
    await queue.enqueue([job])
    assert [j.id for j in await queue.claim(1)] == [job.id]
    error = "RCPT TO: 550 5.1.1 no such user"
    failure = Failure(job.id, "dead", queue.now_ms(), error, None, "invalid-recipient", suppress)
    assert await queue.fail([failure]) == 1


async def test_a_hard_bounce_suppresses_the_one_recipient_in_the_fail_script(
    queue: Queue,
) -> None:
    store = SuppressionStore(queue.client, queue.keys)
    job = _job("acme", "Zed <Zed@Example.com>")
    await _fail_dead(queue, job)
    entry = await store.get("acme", "zed@example.com")
    assert entry is not None
    assert (entry.source, entry.bounce, entry.reason) == (
        job.id, "invalid-recipient", "RCPT TO: 550 5.1.1 no such user",
    )  # fmt: skip
    assert abs(entry.at_ms - queue.now_ms()) < 60_000
    assert await store.get("zeta", "zed@example.com") is None

    # Several recipients: the failure does not say which one is unknown, none is added.
    await _fail_dead(queue, _job("acme", "a@example.com", "b@example.com"))
    # Not a hard bounce: nothing either.
    await _fail_dead(queue, _job("acme", "c@example.com"), suppress=False)
    assert await store.count("acme") == 1

    # A retry narrowed the job to one recipient ('rcpts'): that one is the attempt's.
    narrowed = _job("acme", "d@example.com", "e@example.com")
    await queue.enqueue([narrowed])
    await queue.client.hset(queue.keys.job(narrowed.id), {"rcpts": "E@example.com"})
    await queue.claim(1)
    await queue.fail(
        [Failure(narrowed.id, "dead", queue.now_ms(), "550", None, "invalid-recipient", True)]
    )
    # A message stored behind a deliver-by deadline (engine.queue.jobs.with_deadline).
    deadline = (queue.now_ms() + 3_600_000).to_bytes(8, "big")
    timed = _job("acme", "f@example.com")
    timed = NewJob(timed.id, b"\xcf" + deadline + timed.payload, tenant="acme")
    await _fail_dead(queue, timed)
    assert sorted(s.address for s in (await store.page("acme", 0, 100)).items) == [
        "e@example.com", "f@example.com", "zed@example.com",
    ]  # fmt: skip


async def test_a_dead_letter_retried_goes_to_the_recipients_still_owed_less_suppressed(
    queue: Queue,
) -> None:
    """Retrying a dead letter keeps its narrowing (who already got it does not get it
    twice) and drops recipients suppressed since; with none left it ends suppressed."""
    store = SuppressionStore(queue.client, queue.keys)
    partial = _job("acme", "a@example.com", "b@example.com", "c@example.com")
    await queue.enqueue([partial])
    await queue.claim(1)
    # Delivered to a; b and c refused for now, then the job died.
    retry = Failure(partial.id, "retry", queue.now_ms(), "451", ["b@example.com", "c@example.com"])
    await queue.fail([retry])
    await queue.client.zadd(queue.keys.delayed, {partial.id: 0})  # due now
    await queue.reap()  # promotes it
    claimed = await queue.claim(1)
    assert [(j.id, j.recipients) for j in claimed] == [
        (partial.id, ["b@example.com", "c@example.com"]),
    ]
    await queue.fail([Failure(partial.id, "dead", queue.now_ms(), "554 no")])
    await store.add("acme", {"c@example.com": "unsubscribed"})
    alone = _job("acme", "z@example.com")
    await _fail_dead(queue, alone, suppress=True)  # its own hard bounce suppressed z

    done = await queue.dead_requeue([partial.id, alone.id])
    assert done.retried == [partial.id] and done.suppressed == [alone.id]
    assert await queue.client.hget(queue.keys.job(partial.id), "rcpts") == b"b@example.com"
    rec = await queue.get(alone.id)
    assert rec is not None and rec.state == "suppressed"
    assert alone.id not in await queue.dead_ids()
    kinds = [(e.type, e.state, e.recipients) for e in await _events(queue, partial.id)]
    assert ("suppressed", "queued", ["c@example.com"]) in kinds
    (last,) = [e for e in await _events(queue, alone.id) if e.type == "suppressed"]
    assert (last.state, last.recipients) == ("suppressed", ["z@example.com"])


async def test_the_store_adds_once_lists_in_pages_and_removes(redis: Redis) -> None:
    store = SuppressionStore(redis, Keys(), clock=lambda: 1_700_000_000.0)
    # More than Redis keeps in a listpack (hash-max-listpack-entries): HSCAN pages.
    addresses = {f"u{i:04d}@example.com": "r" for i in range(1200)}
    assert await store.add("acme", addresses) == 1200
    assert await store.add("acme", {"u0000@example.com": "other", "new@example.com": "n"}) == 1
    first = await store.get("acme", "u0000@example.com")
    assert first is not None and (first.reason, first.at_ms) == ("r", 1_700_000_000_000)
    seen: set[str] = set()
    cursor, pages = 0, 0
    while True:
        page = await store.page("acme", cursor, 100)
        assert page.total == 1201 and len(page.items) <= 300
        seen |= {s.address for s in page.items}
        pages += 1
        cursor = page.next_cursor
        if not cursor:
            break
    assert len(seen) == 1201 and pages >= 4
    assert await store.remove("acme", "new@example.com")
    assert not await store.remove("acme", "new@example.com")
    assert await store.get("acme", "new@example.com") is None
    assert await store.count("acme") == 1200 and await store.count("zeta") == 0


# -- end to end: the API, the senders, the sink over SMTP --------------------------------


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    with SinkProcess(workdir=tmp_path_factory.mktemp("sink")) as s:
        yield s


@dataclass
class Env:
    client: httpx.AsyncClient
    sink: SinkProcess
    queue: Queue

    async def key(self, tenant: str, *scopes: str) -> dict[str, str]:
        made = await self.client.post("/v1/keys", json={"scopes": list(scopes), "tenant": tenant})
        assert made.status_code == 201, made.text
        return {"Authorization": f"Bearer {made.json()['key']}"}

    async def final(self, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        with trio.fail_after(15):
            while True:
                r = await self.client.get(f"/v1/messages/{job_id}", headers=headers)
                body: dict[str, Any] = r.json()
                if body["state"] in ("sent", "failed", "suppressed"):
                    return body
                await trio.sleep(0.02)

    def delivered_to(self, job_id: str) -> list[str]:
        return [r for m in self.sink.received() if m["job_id"] == job_id for r in m["rcpt_tos"]]


@pytest.fixture
async def env(redis_server: RedisServer, sink: SinkProcess) -> AsyncIterator[Env]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(environ={}, overrides={"http": {"bind": bind}})
    smtp = SmtpPool(SmtpSettings(starttls="never", command_timeout_s=5), sink.url)
    async with (
        inprocess_engine(settings, redis_server.url, smtp) as running,
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        yield Env(client, sink, running.queue)


async def test_a_hard_bounce_suppresses_the_address_and_later_mail_to_it_is_not_tried(
    env: Env,
) -> None:
    c = env.client
    dead = "Bob+550@example.com"
    first = (await c.post("/v1/messages", json={"to": dead, "subject": "1", "text": "x"})).json()
    rec = await env.final(first["id"])
    assert (rec["state"], rec["bounce"]) == ("failed", "invalid-recipient")
    entry = (await c.get(f"/v1/suppressions/{dead}")).json()
    assert entry["address"] == "bob+550@example.com" and entry["source"] == first["id"]
    assert entry["bounce"] == "invalid-recipient" and "550" in entry["reason"]
    assert entry["added_at"].endswith("Z")
    # Its dead letter, retried, is not sent to the address it just suppressed.
    r = await c.post(f"/v1/dead/{first['id']}/retry")
    assert (r.status_code, r.json()["state"]) == (200, "suppressed")
    assert (await c.get(f"/v1/messages/{first['id']}")).json()["state"] == "suppressed"

    # Only that recipient: not attempted at all, final state suppressed.
    again = (await c.post("/v1/messages", json={"to": dead, "subject": "2", "text": "x"})).json()
    rec = await env.final(again["id"])
    assert rec["state"] == "suppressed" and rec["attempts"] == 0
    assert "every recipient is suppressed" in rec["last_error"]
    events = (await c.get(f"/v1/messages/{again['id']}/events")).json()
    assert [(e["type"], e["state"], e["recipients"]) for e in events] == [
        ("suppressed", "suppressed", [dead]),
    ]
    assert (await c.delete(f"/v1/messages/{again['id']}")).status_code == 409  # finished

    # With others: they get it, the suppressed one is dropped (cc and bcc alike).
    body = {"to": ["ann@example.com"], "cc": [f"Bob <{dead}>"], "bcc": "cy@example.com",
            "subject": "3", "text": "x"}  # fmt: skip
    mixed = (await c.post("/v1/messages", json=body)).json()
    rec = await env.final(mixed["id"])
    assert rec["state"] == "sent"
    with trio.fail_after(5):
        while not env.delivered_to(mixed["id"]):
            await trio.sleep(0.02)
    assert sorted(env.delivered_to(mixed["id"])) == ["ann@example.com", "cy@example.com"]
    events = (await c.get(f"/v1/messages/{mixed['id']}/events")).json()
    assert [e["type"] for e in events] == ["suppressed", "queued", "processing", "sent"]
    assert events[0]["recipients"] == [dead] and events[0]["state"] == "queued"
    assert env.delivered_to(again["id"]) == []

    # Taken off the list, the address is tried again (and bounces again).
    assert (await c.delete(f"/v1/suppressions/{dead}")).status_code == 204
    assert (await c.get(f"/v1/suppressions/{dead}")).status_code == 404
    third = (await c.post("/v1/messages", json={"to": dead, "subject": "4", "text": "x"})).json()
    assert (await env.final(third["id"]))["state"] == "failed"
    assert (await c.get(f"/v1/suppressions/{dead}")).json()["source"] == third["id"]


async def test_the_api_adds_lists_deletes_and_imports_per_tenant(env: Env) -> None:
    c = env.client
    acme = await env.key("acme", "suppressions", "send", "read")
    zeta = await env.key("zeta", "suppressions", "send", "read")
    sender_only = await env.key("acme", "send")

    r = await c.post("/v1/suppressions", headers=acme,
                     json={"addresses": ["Ann <ANN@example.com>", "ann@example.com",
                                         "eve@example.com"], "reason": "unsubscribed"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json() == {"tenant": "acme", "added": 2, "existing": 1}
    listed = (await c.get("/v1/suppressions", headers=acme)).json()
    assert listed["tenant"] == "acme" and listed["total"] == 2 and listed["next_cursor"] is None
    assert [(i["address"], i["reason"], i["source"]) for i in listed["items"]] == [
        ("ann@example.com", "unsubscribed", None), ("eve@example.com", "unsubscribed", None),
    ]  # fmt: skip

    # Tenants are isolated: zeta sees none of it, cannot name acme, mails ann freely.
    assert (await c.get("/v1/suppressions", headers=zeta)).json()["total"] == 0
    assert (await c.get("/v1/suppressions/ann@example.com", headers=zeta)).status_code == 404
    assert (await c.delete("/v1/suppressions/ann@example.com", headers=zeta)).status_code == 404
    r = await c.get("/v1/suppressions?tenant=acme", headers=zeta)
    assert r.status_code == 422 and r.json()["field"] == "tenant"
    msg = {"from": "shop@example.com", "to": "ann@example.com", "subject": "s", "text": "x"}
    to_zeta = (await c.post("/v1/messages", json=msg, headers=zeta)).json()
    to_acme = (await c.post("/v1/messages", json=msg, headers=acme)).json()
    assert (await env.final(to_zeta["id"], zeta))["state"] == "sent"
    assert (await env.final(to_acme["id"], acme))["state"] == "suppressed"
    # The admin key acts for every tenant: ?tenant= picks the list.
    assert (await c.get("/v1/suppressions?tenant=acme")).json()["total"] == 2
    assert (await c.get("/v1/suppressions")).json()["total"] == 0  # its own: default
    # The scope is needed.
    assert (await c.get("/v1/suppressions", headers=sender_only)).status_code == 403

    r = await c.post("/v1/suppressions", headers=acme, json={"addresses": ["nope"]})
    assert r.status_code == 422 and r.json()["field"] == "addresses[0]"
    r = await c.post("/v1/suppressions", headers=acme, json={"addresses": []})
    assert r.status_code == 422
    r = await c.post("/v1/suppressions", headers=acme,
                     json={"addresses": ["x@example.com"], "reason": "a\nb"})  # fmt: skip
    assert r.status_code == 422 and r.json()["field"] == "reason"

    csv = "address,reason\nbob@example.com,complaint\nbroken\n\nann@example.com\ncy@example.com\n"
    r = await c.post("/v1/suppressions/import", headers={**acme, "Content-Type": "text/csv"},
                     content=csv)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json() == {
        "tenant": "acme", "lines": 6, "added": 2, "existing": 1, "refused": 1,
        "refused_lines": [{"line": 3, "detail": "'broken' is not a valid email address"}],
    }  # fmt: skip
    bob = (await c.get("/v1/suppressions/bob@example.com", headers=acme)).json()
    assert bob["reason"] == "complaint"
    r = await c.post("/v1/suppressions/import", headers={**acme, "Content-Type": "text/csv"},
                     content=b"\xff\xfe")  # fmt: skip
    assert r.status_code == 400
    json_type = {**acme, "Content-Type": "application/json"}
    r = await c.post("/v1/suppressions/import", headers=json_type, content=b"[]")
    assert r.status_code == 415
    r = await c.post("/v1/suppressions/import", headers={**acme, "Content-Type": "text/csv"},
                     content=b"a@example.com\n" * 400_000)  # fmt: skip
    assert r.status_code == 413

    # Paged with the cursor; deleting takes it off for good.
    await c.post("/v1/suppressions/import", headers={**acme, "Content-Type": "text/csv"},
                 content="".join(f"p{i}@example.com\n" for i in range(300)))  # fmt: skip
    seen: list[str] = []
    cursor = "0"
    while cursor:
        page = (await c.get(f"/v1/suppressions?limit=100&cursor={cursor}", headers=acme)).json()
        assert page["total"] == 304
        seen += [i["address"] for i in page["items"]]
        cursor = page["next_cursor"]
    assert len(set(seen)) == 304
    assert (await c.get("/v1/suppressions?cursor=x", headers=acme)).status_code == 422
    assert (await c.delete("/v1/suppressions/Ann@Example.com", headers=acme)).status_code == 204
    assert (await c.delete("/v1/suppressions/ann@example.com", headers=acme)).status_code == 404
    again = (await c.post("/v1/messages", json=msg, headers=acme)).json()
    assert (await env.final(again["id"], acme))["state"] == "sent"


def test_the_route_table_lists_the_suppression_routes() -> None:
    from engine.api.routes import ROUTES

    mine = {(r.method, r.path): r.scope for r in ROUTES if r.tag == "suppressions"}
    assert mine == {
        ("GET", "/v1/suppressions"): "suppressions",
        ("POST", "/v1/suppressions"): "suppressions",
        ("POST", "/v1/suppressions/import"): "suppressions",
        ("GET", "/v1/suppressions/{address}"): "suppressions",
        ("DELETE", "/v1/suppressions/{address}"): "suppressions",
    }


async def test_recipients_refused_as_unknown_are_suppressed_with_several_recipients(
    env: Env,
) -> None:
    """A 550 5.1.1 at RCPT suppresses that recipient even when the message had others:
    delivered to the rest (suppress_refused.lua), or refused for all (fail.lua, each)."""
    c = env.client
    gone = "Gone+550@example.com"
    partial = {"to": ["ann@example.com", gone], "subject": "p", "text": "x"}
    first = (await c.post("/v1/messages", json=partial)).json()
    rec = await env.final(first["id"])
    assert rec["state"] == "sent" and "550" in rec["last_error"]
    with trio.fail_after(5):
        while (await c.get(f"/v1/suppressions/{gone}")).status_code != 200:
            await trio.sleep(0.02)
    entry = (await c.get(f"/v1/suppressions/{gone}")).json()
    assert entry["source"] == first["id"] and entry["bounce"] == "invalid-recipient"
    assert (await c.get("/v1/suppressions/ann@example.com")).status_code == 404

    both = ["x+550@example.com", "y+550@example.com"]
    second = (await c.post("/v1/messages", json={"to": both, "subject": "a", "text": "x"})).json()
    rec = await env.final(second["id"])
    assert (rec["state"], rec["bounce"]) == ("failed", "invalid-recipient")
    for address in both:
        entry = (await c.get(f"/v1/suppressions/{address}")).json()
        assert entry["source"] == second["id"] and "550" in entry["reason"], entry
    # A refusal that is not about the address (here: a temporary one) suppresses nothing.
    third = {"to": ["ann@example.com", "z+451@example.com"], "subject": "t", "text": "x"}
    await c.post("/v1/messages", json=third)
    await trio.sleep(0.5)
    assert (await c.get("/v1/suppressions/z+451@example.com")).status_code == 404
