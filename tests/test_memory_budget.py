"""Memory as a byte budget: the embedded Redis runs with a maxmemory and noeviction;
ingest answers 503 (backlog full) from ingest.max_memory_ratio of it, before Redis
refuses anything; the scripts that drain the queue run even over maxmemory.

Each test starts its own small Redis (maxmemory is server-wide), never the session one.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from engine.config import IngestSettings, QueueSettings, load_settings
from engine.embedded import RedisServer, default_maxmemory_bytes, free_port, machine_memory_bytes
from engine.errors import ConfigError
from engine.keys import Keys
from engine.queue import Failure, NewJob, Queue, Redis, open_redis
from engine.queue.memory import MemoryStatistics, limit_bytes, parse_info_memory
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


@pytest.fixture
def small_redis() -> Iterator[RedisServer]:
    with RedisServer(maxmemory_bytes=24 * MiB, appendonly=False) as server:
        yield server


@asynccontextmanager
async def running_queue(client: Redis, ratio: float) -> AsyncIterator[Queue]:
    queue = Queue(
        client, QueueSettings(lease_s=5.0), "mem-1", ingest=IngestSettings(max_memory_ratio=ratio)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.serve)
        yield queue
        nursery.cancel_scope.cancel()


def job(n: int, size: int = 200) -> NewJob:
    return NewJob(f"job-{n:06d}", b"x" * size)


async def errorstat_oom(client: Redis) -> int:
    """How many commands Redis refused for memory since it started."""
    stats = await client.info("errorstats")
    entry = stats.get("errorstat_OOM")
    if not entry:
        return 0
    return int(entry["count"]) if isinstance(entry, dict) else int(str(entry).split("=")[1])


# -- pure parts -------------------------------------------------------------------------


def test_the_budget_is_a_share_of_maxmemory() -> None:
    assert limit_bytes(1000, 0.9) == 900
    assert limit_bytes(0, 0.9) == 0, "no maxmemory: nothing to check against"
    assert limit_bytes(1000, 0.0) == 0, "ratio 0: no check"
    assert MemoryStatistics(900, 1000, "noeviction", 900, 1).full
    assert not MemoryStatistics(899, 1000, "noeviction", 900, 1).full
    assert not MemoryStatistics(10**9, 0, "noeviction", 0, 1).full
    info = {"used_memory": 5, "maxmemory": 10, "maxmemory_policy": b"noeviction"}
    assert parse_info_memory(info) == (5, 10, "noeviction")


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"ingest\.max_memory_ratio"):
        load_settings(environ={"ENGINE_INGEST__MAX_MEMORY_RATIO": "1.5"})
    with pytest.raises(ConfigError, match=r"redis\.maxmemory_bytes"):
        load_settings(environ={"ENGINE_REDIS__MAXMEMORY_BYTES": "1000"})
    settings = load_settings(environ={})
    assert (settings.redis.maxmemory_bytes, settings.ingest.max_memory_ratio) == (0, 0.9)


# -- the embedded Redis -------------------------------------------------------------------


def test_embedded_redis_has_maxmemory_and_noeviction(small_redis: RedisServer) -> None:
    async def check() -> None:
        async with open_redis(small_redis.url) as client:
            got = await client.config_get(["maxmemory", "maxmemory-policy"])
        assert got == {b"maxmemory": str(24 * MiB).encode(), b"maxmemory-policy": b"noeviction"}

    trio.run(check)
    assert 0 < default_maxmemory_bytes() == machine_memory_bytes() // 2


def test_engine_serve_gives_its_redis_the_setting(tmp_path: Path) -> None:
    """``engine serve`` without --redis-url: its Redis gets redis.maxmemory_bytes."""
    port = free_port()
    env = {
        "ENGINE_REDIS__DATA_DIR": str(tmp_path / "redis"),
        "ENGINE_REDIS__MAXMEMORY_BYTES": str(48 * MiB),
        "ENGINE_AUTH__ENABLED": "false",
        "PYTHONPATH": str(ROOT),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "serve", "--bind", f"127.0.0.1:{port}",
         "--smtp-url", "smtp://127.0.0.1:9"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "(embedded)" in line or len(lines) > 200:
                break
        found = re.search(r"redis://127\.0\.0\.1:(\d+)/0\s+\(embedded\)", "".join(lines))
        assert found, "".join(lines)

        async def check() -> dict[bytes, bytes]:
            async with open_redis(f"redis://127.0.0.1:{found[1]}/0") as client:
                return await client.config_get(["maxmemory", "maxmemory-policy"])

        got = trio.run(check)
        assert got == {b"maxmemory": str(48 * MiB).encode(), b"maxmemory-policy": b"noeviction"}
    finally:
        proc.terminate()
        proc.wait(20)


# -- the queue ----------------------------------------------------------------------------


async def test_enqueue_refused_over_budget_replays_still_answered(
    small_redis: RedisServer,
) -> None:
    async with open_redis(small_redis.url) as client, running_queue(client, 0.5) as queue:
        first = await queue.enqueue([job(1)], idempotency_key="k1", fingerprint="f1")
        assert first.outcome == "stored"
        # Fill Redis past half its maxmemory with something that is not a job.
        fillers = [f"filler:{i}" for i in range(14)]
        for key in fillers:
            await client.set(key, b"f" * MiB)
        stats = await queue.memory.sample()
        assert stats.full and stats.limit_bytes == 12 * MiB

        refused = await queue.enqueue([job(2)])
        assert refused.outcome == "backlog"
        assert refused.used_bytes == stats.used_bytes > refused.limit_bytes == 12 * MiB
        assert await client.exists([Keys().job("job-000002")]) == 0, "nothing stored"
        replay = await queue.enqueue([job(3)], idempotency_key="k1", fingerprint="f1")
        assert (replay.outcome, replay.ids) == ("replayed", ["job-000001"])

        await client.delete(fillers)
        assert not (await queue.memory.sample()).full
        assert (await queue.enqueue([job(2)])).outcome == "stored"
        assert await errorstat_oom(client) == 0, "Redis itself refused nothing"


async def test_the_budget_is_sampled_not_read_per_request(small_redis: RedisServer) -> None:
    async with open_redis(small_redis.url) as client, running_queue(client, 0.9) as queue:
        with trio.fail_after(5):
            while queue.memory.statistics().samples == 0:
                await trio.sleep(0.01)
        await client.config_resetstat()
        for n in range(200):
            await queue.enqueue([job(n)])
        stats = await client.info("commandstats")
        info_calls = int(stats.get("cmdstat_info", {}).get("calls", 0))
        assert info_calls <= 10, f"{info_calls} INFO calls for 200 enqueues"


async def test_over_maxmemory_enqueue_is_backlog_and_draining_still_works(
    small_redis: RedisServer,
) -> None:
    """Redis over its maxmemory before a sample saw it (here: no sampling at all):
    the enqueue is refused by Redis with nothing stored and answered as a full backlog;
    claim, ack, fail, release, renew, reap and cancel still run (allow-oom)."""
    async with open_redis(small_redis.url) as client, running_queue(client, 0.0) as queue:
        for n in range(6):
            assert (await queue.enqueue([job(n)])).outcome == "stored"
        await client.config_set({"maxmemory": "1"})  # far below what it holds
        try:
            refused = await queue.enqueue([job(99)])
            assert (refused.outcome, refused.ids) == ("backlog", [])
            assert refused.used_bytes > 0
            assert await client.exists([Keys().job("job-000099")]) == 0
            assert await errorstat_oom(client) >= 1, "Redis did refuse the enqueue"
            oom_before = await errorstat_oom(client)

            claimed = await queue.claim(6)
            assert len(claimed) == 6
            await queue.renew([c.id for c in claimed])
            await queue.ack(claimed[0].id)
            await queue.ack(claimed[1].id)
            await queue.fail([Failure(claimed[2].id, "retry", queue.now_ms() + 60_000, "451")])
            await queue.fail([Failure(claimed[3].id, "dead", 0, "550")])
            assert await queue.release([claimed[4].id, claimed[5].id]) == 2
            assert await queue.cancel(claimed[2].id) == ("cancelled", "cancelled")
            await queue.reap()
            assert await errorstat_oom(client) == oom_before, "no drain step was refused"
            states = [(await queue.get(f"job-{n:06d}")) for n in range(6)]  # records, none lost
            assert [s.state if s else None for s in states] == [
                "sent", "sent", "cancelled", "failed", "queued", "queued",
            ]  # fmt: skip
        finally:
            await client.config_set({"maxmemory": str(24 * MiB)})


# -- through the API ----------------------------------------------------------------------


def _settings(bind: str, role: str, **ingest: Any) -> Any:
    return load_settings(
        environ={},
        overrides={
            "http": {"bind": bind},
            "role": role,
            "ingest": ingest,
            "queue": {"events_maxlen": 1000},
        },
    )


def _message(n: int) -> dict[str, Any]:
    return {"to": f"user{n}@example.com", "subject": f"budget {n}", "text": "word " * 250}


async def test_ingest_answers_503_before_redis_refuses_and_senders_drain(
    small_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="engine.queue.memory")
    api_bind = f"127.0.0.1:{free_port()}"
    accepted: list[str] = []
    refusals: list[httpx.Response] = []
    async with open_redis(small_redis.url) as client:
        async with (
            inprocess_engine(_settings(api_bind, "api", max_memory_ratio=0.5),
                             small_redis.url, MemoryTransport()),
            httpx.AsyncClient(base_url=f"http://{api_bind}", timeout=10, headers=AUTH) as http,
        ):  # fmt: skip

            async def post_batch(first: int) -> httpx.Response:
                batch = {"messages": [_message(first + i) for i in range(50)]}
                answer = await http.post("/v1/messages/batch", json=batch)
                if answer.status_code == 202:
                    accepted.extend(answer.json()["ids"])
                else:
                    refusals.append(answer)
                return answer

            # Fill: no sender runs, so everything accepted waits in Redis.
            with trio.fail_after(60):
                n = 0
                while (await post_batch(n)).status_code == 202:
                    n += 50
            refused = refusals[-1]
            assert refused.status_code == 503, refused.text
            problem = refused.json()
            assert problem["type"].endswith("/backlog-full"), problem
            assert "bytes" in problem["detail"] and "ingest.max_memory_ratio" in problem["detail"]
            assert int(refused.headers["retry-after"]) > 0
            assert len(accepted) > 1000, "the budget (12 MiB) holds more than this"
            memory = await client.info("memory")
            assert memory["used_memory"] < memory["maxmemory"]
            assert any("queue.memory.full" in r.getMessage() for r in caplog.records)

            # A sender replica drains while ingest keeps being refused: its acks are
            # never refused (kept records of sent mail still count, so memory stays up).
            sender_transport = MemoryTransport()
            sender_bind = f"127.0.0.1:{free_port()}"
            async with inprocess_engine(
                _settings(sender_bind, "sender"), small_redis.url, sender_transport
            ):
                done = trio.Event()

                async def keep_posting() -> None:
                    while not done.is_set():
                        answer = await post_batch(10**6 + len(refusals) * 50)
                        assert answer.status_code in (202, 503), answer.text
                        if answer.status_code == 503:
                            assert answer.json()["type"].endswith("/backlog-full")
                        await trio.sleep(0.05)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_posting)
                    with trio.fail_after(60):
                        while len(sender_transport.sent) < len(accepted):
                            await trio.sleep(0.05)
                    done.set()
                with trio.fail_after(30):
                    while len(sender_transport.sent) < len(accepted):
                        await trio.sleep(0.05)

        sent_ids = [mail.job_id for mail in sender_transport.sent]
        assert sorted(sent_ids) == sorted(accepted), "every accepted message sent, once"
        assert len(refusals) > 1
        assert await errorstat_oom(client) == 0, "Redis never refused a write"
        stats = await client.hgetall(Keys().stats)
        assert int(stats[b"enqueued"]) == len(accepted), "a refused request stored nothing"
