"""Live job events: the stream the Lua scripts write, the websocket hub over real TCP
(filters, resume, slow subscribers), the history route, two replicas, `engine watch`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)
from trio_websocket import open_websocket_url as _open_websocket_url

from engine.api.hub import EventHub, HubStatistics, pause_s
from engine.config import EventsSettings, load_settings
from engine.embedded import RedisServer, SinkProcess, free_port
from engine.ids import new_id
from engine.queue import EventLog, NewJob, Queue, Redis, event_order, open_redis, parse_event_id
from engine.service import Running
from engine.transport.memory import MemoryTransport
from engine.watch import WatchOptions, events_url
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.engine import EngineProcess
from fixtures.inproc import inprocess_engine

ROOT = Path(__file__).resolve().parent.parent

Events = list[dict[str, Any]]
# The websocket upgrade presents the test admin key, as every HTTP request does.
WS_AUTH = [(b"authorization", b"Bearer " + TEST_ADMIN_KEY.encode())]


def open_websocket_url(url: str, **kwargs: Any) -> Any:
    """trio_websocket's ``open_websocket_url`` with the test admin key."""
    return _open_websocket_url(url, extra_headers=WS_AUTH, **kwargs)


def _msg(**extra: Any) -> dict[str, Any]:
    return {"to": "ann@example.com", "subject": "Hi", "text": "Hello", **extra}


# -- the stream ---------------------------------------------------------------------------


async def test_events_carry_tenant_and_tags_and_enqueue_entries_expand(
    queue: Queue, redis: Redis
) -> None:
    log = EventLog(redis, queue.keys)
    a, b, c, d = (new_id() for _ in range(4))
    await queue.enqueue([
        NewJob(a, b"m", tenant="acme", tags="vip\nq3,eu"),
        NewJob(b, b"m"),
        NewJob(c, b"m", tenant="acme"),
        NewJob(d, b"m", tenant="acme", due_ms=queue.now_ms() + 60_000, tags="later"),
    ])  # fmt: skip
    # One entry per (lane, tenant) group, and one for the scheduled job.
    entries = await redis.xrange(queue.keys.events)
    assert [(e.field_values[b"type"], e.field_values.get(b"tenant")) for e in entries] == [
        (b"queued", b"acme"), (b"queued", None), (b"scheduled", b"acme"),
    ]  # fmt: skip
    queued = (await log.range()).events
    assert [(e.id, e.type, e.tenant, e.tags) for e in queued] == [
        (a, "queued", "acme", ["vip", "q3,eu"]),
        (c, "queued", "acme", []),
        (b, "queued", "default", []),
        (d, "scheduled", "acme", ["later"]),
    ]
    first = entries[0].identifier.decode()
    assert [e.event_id for e in queued[:2]] == [f"{first}.0", f"{first}.1"]
    assert queued[2].event_id.endswith(".0") and queued[2].event_id != queued[3].event_id
    assert parse_event_id(queued[1].event_id) == (first, 1)

    # Resume inside an enqueue entry: exactly the rest of it, then the entries after it.
    after = await log.range(queued[0].event_id)
    assert [e.id for e in after.events] == [c, b, d]
    assert [e.id for e in (await log.range(first)).events] == [b, d]

    claimed = await queue.claim(3)
    for job in claimed:
        await queue.ack(job.id)
    page = await log.range(queued[-1].event_id)
    by_id = {(e.id, e.type): e for e in page.events}
    assert by_id[a, "processing"].tags == ["vip", "q3,eu"] and by_id[a, "sent"].tenant == "acme"
    assert by_id[a, "sent"].attempt == 1 and by_id[a, "sent"].event_id.count(".") == 0
    assert by_id[b, "sent"].tenant == "default" and by_id[b, "sent"].tags == []

    history = await log.history(a)
    assert [e.type for e in history.events] == ["queued", "processing", "sent"]
    assert history.complete and history.exists


async def test_the_hub_tails_only_while_someone_listens(queue: Queue, redis: Redis) -> None:
    hub = EventHub(EventLog(redis, queue.keys), EventsSettings())
    to_app, app_receive = trio.open_memory_channel[dict[str, Any]](10)
    app_send, from_app = trio.open_memory_channel[dict[str, Any]](10)
    scope = {"type": "websocket", "path": "/v1/events", "query_string": b"", "extensions": {}}
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve)
        await queue.enqueue([NewJob(new_id(), b"m")])  # before anyone listens: not sent
        assert hub.statistics() == HubStatistics(0, 0, 0, 0, False)
        nursery.start_soon(hub.websocket, scope, app_receive.receive, app_send.send)
        await to_app.send({"type": "websocket.connect"})
        assert (await from_app.receive())["type"] == "websocket.accept"
        assert hub.statistics().subscribers == 1 and hub.statistics().tailing
        job = new_id()
        await queue.enqueue([NewJob(job, b"m")])
        with trio.fail_after(5):
            message = await from_app.receive()
        assert [(x["id"], x["type"]) for x in json.loads(message["text"])] == [(job, "queued")]
        await to_app.send({"type": "websocket.disconnect"})
        with trio.fail_after(5):
            while hub.statistics().subscribers:
                await trio.sleep(0.01)
        stats = hub.statistics()
        assert (stats.events_read, stats.events_sent, stats.dropped) == (1, 1, 0)
        nursery.cancel_scope.cancel()


def test_watch_cli_surface() -> None:
    out = subprocess.run([sys.executable, "-m", "engine", "watch", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout  # fmt: skip
    for flag in ("--url", "--id", "--type", "--tenant", "--tag", "--since", "--json"):
        assert flag in out
    options = WatchOptions("https://mail.example/", ids=["a", "b"], tags=["x,y"], since="1-0.2")
    assert events_url(options) == ("wss://mail.example/v1/events?id=a&id=b&tag=x%2Cy&since=1-0.2")


# -- an engine in this process, websockets over TCP --------------------------------------


@dataclass
class Engine:
    base: str
    ws: str
    client: httpx.AsyncClient
    running: Running
    transport: MemoryTransport

    async def post(self, *messages: dict[str, Any]) -> list[str]:
        r = await self.client.post("/v1/messages/batch", json={"messages": list(messages)})
        assert r.status_code == 202, r.text
        ids: list[str] = r.json()["ids"]
        return ids


@asynccontextmanager
async def engine(
    redis_server: RedisServer, *, role: str = "all", **events: Any
) -> AsyncIterator[Engine]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    overrides: dict[str, Any] = {"http": {"bind": bind}, "role": role, "events": events}
    settings = load_settings(environ={}, overrides=overrides)
    transport = MemoryTransport()
    async with (
        inprocess_engine(settings, redis_server.url, transport) as running,
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        yield Engine(f"http://{bind}", f"ws://{bind}/v1/events", client, running, transport)


async def receive_until(
    ws: WebSocketConnection, done: Callable[[Events], bool], timeout: float = 10
) -> Events:
    got: Events = []
    with trio.fail_after(timeout):
        while not done(got):
            got += json.loads(await ws.get_message())
    return got


async def receive_for(ws: WebSocketConnection, seconds: float) -> Events:
    got: Events = []
    with trio.move_on_after(seconds):
        while True:
            got += json.loads(await ws.get_message())
    return got


def sent(*ids: str) -> Callable[[Events], bool]:
    return lambda got: {e["id"] for e in got if e["type"] == "sent"} >= set(ids)


async def test_filters_by_id_type_tenant_and_tag(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        url = e.ws
        async with (
            open_websocket_url(url) as everything,
            open_websocket_url(url + "?type=sent") as only_sent,
            open_websocket_url(url + "?type=sent") as only_sent_too,  # shares the scan
            open_websocket_url(url + "?tenant=acme&type=queued,sent") as acme,
            open_websocket_url(url + "?tag=vip,gold") as vip,
        ):
            before = await EventLog(e.running.queue.client, e.running.queue.keys).last_id()
            ids = await e.post(
                _msg(tenant="acme", tags=["vip,gold"]), _msg(tenant="beta", tags=["vip"]), _msg()
            )
            # Ids are known once posted: these replay what they may have missed (since).
            async with (
                open_websocket_url(f"{url}?id={ids[0]}&id={ids[1]}&since={before}") as two,
                open_websocket_url(
                    f"{url}?id={ids[2]},{ids[1]}&type=sent&since={before}"
                ) as two_sent,
            ):
                all_events = await receive_until(everything, sent(*ids))
                assert sorted(e["type"] for e in all_events) == sorted(
                    ["queued", "processing", "sent"] * 3
                )
                await e.transport.wait_sent(3)
                got_two = await receive_until(two, sent(ids[0], ids[1]))
                got_two_sent = await receive_until(two_sent, sent(ids[1], ids[2]))
                got_sent = await receive_until(only_sent, sent(*ids))
                got_sent_too = await receive_until(only_sent_too, sent(*ids))
                got_acme = await receive_until(acme, sent(ids[0]))
                got_vip = await receive_until(vip, lambda g: len(g) >= 3)
                for ws, got in [(two, got_two), (two_sent, got_two_sent), (only_sent, got_sent),
                                (acme, got_acme), (vip, got_vip)]:  # fmt: skip
                    got.extend(await receive_for(ws, 0.3))  # nothing else arrives
        assert sorted((x["id"], x["type"]) for x in got_two) == sorted(
            (i, t) for i in ids[:2] for t in ("queued", "processing", "sent")
        )
        assert {(x["id"], x["type"]) for x in got_two_sent} == {(ids[1], "sent"), (ids[2], "sent")}
        assert sorted(x["id"] for x in got_sent) == sorted(ids)
        assert got_sent_too == got_sent[: len(got_sent_too)] and len(got_sent_too) == 3
        assert {x["type"] for x in got_sent} == {"sent"}
        assert [(x["id"], x["type"]) for x in got_acme] == [(ids[0], "queued"), (ids[0], "sent")]
        # A tag may hold a comma: 'tag' is never split (here it is the tag "vip,gold").
        assert {x["id"] for x in got_vip} == {ids[0]} and len(got_vip) == 3
        assert got_vip[0]["tags"] == ["vip,gold"] and got_vip[0]["tenant"] == "acme"

        for bad in ("?type=nope", "?id=xyz", "?tenant=a%20b", "?since=yesterday", "?colour=red"):
            with pytest.raises(ConnectionRejected) as rejected:
                async with open_websocket_url(url + bad):
                    pass
            assert rejected.value.status_code == 400, bad


async def test_resume_with_since_has_no_gap_and_no_duplicate(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e, open_websocket_url(e.ws) as reference:
        async with open_websocket_url(e.ws) as first:
            ids = await e.post(*[_msg() for _ in range(10)])
            seen = (await receive_until(first, lambda g: len(g) >= 3))[:3]
        # Stopped inside the enqueue entry that announced all ten (event id "<entry>.2").
        assert seen[2]["event_id"].endswith(".2"), seen
        more = await e.post(*[_msg() for _ in range(10)])
        async with open_websocket_url(f"{e.ws}?since={seen[2]['event_id']}") as second:
            rest = await receive_until(second, sent(*ids, *more))
            # Resume again from a whole (single-job) entry.
            cut = next(i for i, x in enumerate(rest) if "." not in x["event_id"])
        async with open_websocket_url(f"{e.ws}?since={rest[cut]['event_id']}") as third:
            last = await e.post(_msg())
            tail = await receive_until(third, sent(*ids, *more, *last))
        full = await receive_until(reference, sent(*ids, *more, *last))
        resumed = [x["event_id"] for x in seen + rest[: cut + 1] + tail]
        assert resumed == [x["event_id"] for x in full]
        assert len(set(resumed)) == len(resumed) == 3 * 21


async def test_resume_from_an_event_the_tail_has_not_read_yet(redis_server: RedisServer) -> None:
    # A client that comes from a replica whose tail is ahead of this one's.
    async with (
        engine(redis_server, role="api", batch_interval_s=1.5) as e,
        open_websocket_url(e.ws) as first,
    ):
        (a,) = await e.post(_msg())
        # The tail hands out the queued event of a, then pauses 1.5 s.
        assert [x["id"] for x in await receive_until(first, lambda g: len(g) == 1)] == [a]
        (b,) = await e.post(_msg())
        (c,) = await e.post(_msg())
        log = EventLog(e.running.queue.client, e.running.queue.keys)
        b_event = next(x for x in (await log.range()).events if x.id == b)
        async with open_websocket_url(f"{e.ws}?since={b_event.event_id}") as second:
            got = await receive_until(second, lambda g: len(g) >= 1, timeout=5)
            got += await receive_for(second, 0.3)
        assert [x["id"] for x in got] == [c]
        assert [x["id"] for x in await receive_until(first, lambda g: len(g) >= 2)] == [b, c]


async def test_a_subscriber_that_never_reads_is_dropped_and_others_keep_up(
    redis_server: RedisServer,
) -> None:
    buffer = 2000
    async with engine(redis_server, subscriber_buffer=buffer) as e, trio.open_nursery() as nursery:
        host, port = e.base.removeprefix("http://").split(":")
        sock = trio.socket.socket()
        # A tiny receive window, and trio-websocket stops reading once one message waits.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        slow = await wrap_client_stream(
            nursery,
            trio.SocketStream(sock),
            host,
            "/v1/events",
            message_queue_size=1,
            extra_headers=WS_AUTH,
        )
        got: Events = []

        async def keep_reading(ws: WebSocketConnection) -> None:
            while True:
                got.extend(json.loads(await ws.get_message()))

        async with (
            open_websocket_url(
                e.ws, max_message_size=1 << 24, receive_buffer_size=1 << 16
            ) as normal,
            trio.open_nursery() as reading,
        ):
            reading.start_soon(keep_reading, normal)
            # ~1.5 KB an event, 3 events a message: more than the kernel buffers a socket
            # that is not read (it grows to tcp_wmem's maximum) and the hub's buffer.
            tags = [f"{i:02d}" + "t" * 62 for i in range(20)]
            needed = 1.5 * (_socket_buffer_max() + buffer * 1500)
            ids: list[str] = []
            while len(ids) * 3 * 1500 < needed:
                ids += await e.post(*[_msg(tags=tags) for _ in range(500)])
                # One batch at a time (1500 events < the buffer): this reader, which
                # shares the process with the engine, is never the one too slow.
                with trio.fail_after(30):
                    while not sent(*ids)(got):
                        await trio.sleep(0.02)
            reading.cancel_scope.cancel()
        assert len({(x["id"], x["type"]) for x in got}) == len(got) == 3 * len(ids)
        # The slow one gets what was already on its socket, then the close code.
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
            while True:
                await slow.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 4008
        nursery.cancel_scope.cancel()


def _socket_buffer_max() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024


async def test_history_lists_a_messages_events(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        (job,) = await e.post(_msg(tags=["welcome"], tenant="acme"))
        await e.transport.wait_sent(1)
        with trio.fail_after(5):
            while True:
                r = await e.client.get(f"/v1/messages/{job}/events")
                assert r.status_code == 200
                if len(r.json()) == 3:
                    break
                await trio.sleep(0.02)
        assert [x["type"] for x in r.json()] == ["queued", "processing", "sent"]
        assert r.json()[2]["tags"] == ["welcome"] and r.json()[2]["tenant"] == "acme"
        assert r.headers["events-complete"] == "true"
        assert (await e.client.get(f"/v1/messages/{new_id()}/events")).status_code == 404
        assert (await e.client.get("/v1/messages/nope/events")).status_code == 404


# -- two replicas, real processes ---------------------------------------------------------


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    with SinkProcess(workdir=tmp_path / "sink") as s:
        yield s


def test_a_watcher_on_one_replica_sees_what_another_sends(
    redis_server: RedisServer, sink: SinkProcess, tmp_path: Path
) -> None:
    trio.run(_flush, redis_server.url)
    api = EngineProcess(redis_server.url, sink.url, tmp_path / "a", "--role", "api")
    worker = EngineProcess(redis_server.url, sink.url, tmp_path / "b")
    out_file = tmp_path / "watch.out"
    with out_file.open("w") as out, (tmp_path / "watch.err").open("w") as err:
        watch = subprocess.Popen(
            # since 0-0: from the start of the (flushed) stream, however late it connects.
            [sys.executable, "-m", "engine", "watch", "--json", "--url", api.base,
             "--key", TEST_ADMIN_KEY, "--since", "0-0"],
            stdout=out, stderr=err, cwd=ROOT,
        )  # fmt: skip
    engines = [api, worker]

    def printed() -> Events:
        return [json.loads(line) for line in out_file.read_text().splitlines()]

    def wait_printed(job: str) -> None:
        deadline = time.monotonic() + 10
        while not sent(job)(printed()):
            assert time.monotonic() < deadline, (printed(), (tmp_path / "watch.err").read_text())
            time.sleep(0.05)

    def post_to_worker() -> str:
        r = httpx.post(
            worker.base + "/v1/messages", json=_msg(tags=["x"]), headers=AUTH, timeout=10
        )
        assert r.status_code == 202, r.text
        job: str = r.json()["id"]
        return job

    try:
        got: Events = []

        async def watch_a_and_post_to_b() -> None:
            async with open_websocket_url(api.base.replace("http", "ws") + "/v1/events") as ws:
                job = await trio.to_thread.run_sync(post_to_worker)
                got.extend(await receive_until(ws, sent(job)))

        trio.run(watch_a_and_post_to_b)
        first = got[0]["id"]
        assert [x["type"] for x in got if x["id"] == first] == ["queued", "processing", "sent"]
        wait_printed(first)

        # Replica A goes away (its watchers get 1001); what happens meanwhile is replayed
        # when `engine watch` gets back in (since=<last event id>).
        assert api.stop() == 0, api.output()
        while_down = post_to_worker()
        time.sleep(0.3)
        api = EngineProcess(
            redis_server.url, sink.url, tmp_path / "a", "--role", "api", port=api.port
        )
        engines.append(api)
        wait_printed(while_down)
        after = post_to_worker()
        wait_printed(after)

        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0
        errors = (tmp_path / "watch.err").read_text()
        assert "closed 1001" in errors and "Traceback" not in errors, errors
        events = [(x["id"], x["type"]) for x in printed()]
        assert len(set(events)) == len(events) == 9, events
        assert {i for i, _ in events} == {first, while_down, after}
    finally:
        if watch.poll() is None:
            watch.kill()
        for e in engines:
            if e.proc.poll() is None:
                assert e.stop() == 0, e.output()


async def _flush(url: str) -> None:
    async with open_redis(url) as r:
        await r.flushall()


async def test_resume_past_the_streams_retention_says_so(redis_server: RedisServer) -> None:
    async with engine(redis_server) as e:
        log = EventLog(e.running.queue.client, e.running.queue.keys)

        async def wait_sent(n: int) -> None:
            with trio.fail_after(10):
                while len({x.id for x in (await log.range()).events if x.type == "sent"}) < n:
                    await trio.sleep(0.05)

        first = await e.post(_msg())
        await wait_sent(1)  # all of ``first``'s events come before ``more``'s
        more = await e.post(_msg(), _msg())
        await wait_sent(3)
        events = (await log.range()).events
        gone = next(x for x in events if x.id == first[0] and x.type == "sent")
        # Trim the stream past ``gone`` (as queue.events_maxlen does on a busy stream).
        kept = [x for x in events if event_order(x.event_id) > event_order(gone.event_id)]
        oldest_kept = kept[1].event_id.partition(".")[0]
        await e.running.queue.client.xtrim(e.running.queue.keys.events, "MINID", oldest_kept)
        async with open_websocket_url(f"{e.ws}?since={gone.event_id}") as ws:
            assert dict(ws.handshake_headers)[b"events-gap"] == oldest_kept.encode()
            got = await receive_until(ws, sent(*more))
        assert got[0]["event_id"].partition(".")[0] == oldest_kept
        # Within retention: no such header.
        async with open_websocket_url(f"{e.ws}?since={kept[1].event_id}") as ws:
            assert b"events-gap" not in dict(ws.handshake_headers)


def test_the_tail_pauses_longer_with_more_subscribers() -> None:
    settings = EventsSettings()  # 20 ms + 0.5 ms per subscriber, at most 50 ms
    assert pause_s(0, settings) == pytest.approx(0.02)
    assert pause_s(1, settings) == pytest.approx(0.0205)
    assert pause_s(20, settings) == pytest.approx(0.03)
    assert pause_s(100, settings) == pytest.approx(0.05)
    slow = EventsSettings(batch_interval_s=1.5)  # the floor wins over a lower cap
    assert pause_s(100, slow) == pytest.approx(1.5)
