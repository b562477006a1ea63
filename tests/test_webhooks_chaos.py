"""Webhooks through crashes: two `engine serve` replicas, a receiver process; one replica
is killed with SIGKILL while deliveries are in flight and the receiver is down for a while;
every event of the stream must reach the receiver at least once (reconciled by event id,
duplicates counted). The default suite keeps the receiver down 3 s; `-m slow` 30 s."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

from engine.embedded import RedisServer, SinkProcess, free_port
from engine.keys import Keys
from engine.queue import EventLog, open_redis
from fixtures.auth import AUTH
from fixtures.engine import EngineProcess

ROOT = Path(__file__).resolve().parent.parent
MSG = {"to": "chaos@example.com", "subject": "Chaos", "text": "Hi"}
ENV = {"ENGINE_WEBHOOKS__ALLOW": '["127.0.0.1/32"]', "ENGINE_WEBHOOKS__LEASE_S": "3",
       "ENGINE_WEBHOOKS__FIRST_RETRY_S": "0.5", "ENGINE_WEBHOOKS__MAX_RETRY_S": "2"}  # fmt: skip


def _stream_event_ids(url: str) -> set[str]:
    async def read() -> set[str]:
        out: set[str] = set()
        async with open_redis(url) as r:
            log = EventLog(r, Keys())
            since = ""
            while True:
                page = await log.range(since, limit=1000)
                if not page.entries:
                    return out
                out |= {e.event_id for e in page.events}
                assert page.last is not None
                since = page.last

    return trio.run(read)


def _receiver(port: int, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fixtures.receiver", "--port", str(port), "--log", str(log)],
        cwd=ROOT,
    )


def _received(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [json.loads(x)["id"] for x in log.read_text().splitlines() if x]


@pytest.mark.parametrize(
    "down_s", [3.0, pytest.param(30.0, marks=pytest.mark.slow)], ids=["down-3s", "down-30s"]
)
def test_kill9_and_a_receiver_outage_lose_no_event(
    redis_server: RedisServer, tmp_path: Path, down_s: float
) -> None:
    trio.run(_flush, redis_server.url)
    port, log = free_port(), tmp_path / "received.jsonl"
    receiver = _receiver(port, log)
    with SinkProcess(workdir=tmp_path / "sink", log=False) as sink:
        one = EngineProcess(redis_server.url, sink.url, tmp_path / "one", env=ENV)
        two = EngineProcess(redis_server.url, sink.url, tmp_path / "two", env=ENV)
        try:
            with httpx.Client(base_url=one.base, headers=AUTH, timeout=30) as c:
                hook = {"url": f"http://127.0.0.1:{port}/hook", "batch_max": 20}
                assert c.post("/v1/webhooks", json=hook).status_code == 201
                time.sleep(1.5)  # both dispatchers see the endpoint
                batch = {"messages": [{**MSG, "to": f"u{i}@example.com"} for i in range(300)]}
                for _ in range(4):
                    assert c.post("/v1/messages/batch", json=batch).status_code == 202
            deadline = time.monotonic() + 30
            while len(_received(log)) < 200:
                assert time.monotonic() < deadline, "no deliveries started"
                time.sleep(0.05)
            one.kill()  # SIGKILL mid-delivery: its leased deliveries and unacked reads
            receiver.kill()  # and the receiver goes away for a while
            receiver.wait()
            time.sleep(down_s)
            receiver = _receiver(port, log)
            deadline = time.monotonic() + 60
            while int(sink.stats().get("received", 0)) < 1200:  # the mail itself first
                assert time.monotonic() < deadline, "mail not delivered"
                time.sleep(0.1)
            time.sleep(0.5)
            expected = _stream_event_ids(redis_server.url)
            # queued, processing, sent of each message (more: the killed replica's claims
            # were processed again after their lease)
            assert len(expected) >= 3 * 1200
            deadline = time.monotonic() + 60 + down_s
            while not expected <= set(_received(log)):
                assert time.monotonic() < deadline, (
                    f"{len(expected - set(_received(log)))} events never arrived; the "
                    f"surviving replica said:\n{two.output()[-3000:]}"
                )
                time.sleep(0.2)
            got = _received(log)
            duplicates = len(got) - len(set(got))
            print(f"events {len(expected)}, received {len(got)}, duplicates {duplicates}")
        finally:
            receiver.kill()
            two.stop()


async def _flush(url: str) -> None:
    async with open_redis(url) as r:
        await r.flushall()
