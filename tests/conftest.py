"""Shared fixtures: one real Redis server per test session (flushed per test)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.config import QueueSettings  # noqa: E402
from engine.embedded import RedisServer  # noqa: E402
from engine.queue import (  # noqa: E402
    Queue,
    Redis,
    open_redis,
)
from fixtures.postfix import postfix  # noqa: E402, F401 (the `postfix` fixture)
from fixtures.postgres import pg_dsn, pg_server  # noqa: E402, F401 (PostgreSQL: history)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    async with open_redis(redis_server.url) as client:
        await client.flushall()
        yield client


@pytest.fixture
def queue_settings() -> QueueSettings:
    return QueueSettings(lease_s=2.0, heartbeat_s=0.5)


@pytest.fixture
async def queue(redis: Redis, queue_settings: QueueSettings) -> AsyncIterator[Queue]:
    import trio

    q = Queue(redis, queue_settings, "test-instance")
    async with trio.open_nursery() as nursery:
        await nursery.start(q.serve)
        yield q
        nursery.cancel_scope.cancel()
