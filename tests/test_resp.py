"""The lean RESP connection (engine.queue.resp) against a real Redis: replies, error
replies, AUTH and SELECT from the URL, a blocking read cut short, and reconnecting after
the server went away."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from engine.embedded import RedisServer
from engine.errors import QueueError, QueueUnavailable
from engine.queue import Redis, RespConnection


async def test_replies_come_back_decoded(redis: Redis, redis_server: RedisServer) -> None:
    conn = RespConnection(redis_server.url)
    try:
        assert await conn.call("SET", "k", b"v\r\nw") == b"OK"
        assert await conn.call("GET", "k") == b"v\r\nw"
        assert await conn.call("INCRBY", "n", 5) == 5
        await conn.call("XADD", "s", "*", "type", "sent", "id", "j1")
        await conn.call("XGROUP", "CREATE", "s", "g", "0")
        reply = await conn.call("XREADGROUP", "GROUP", "g", "c", "COUNT", 10, "STREAMS", "s", ">")
        [[stream, [[entry_id, fields]]]] = reply
        assert stream == b"s" and entry_id.count(b"-") == 1
        assert fields == [b"type", b"sent", b"id", b"j1"]
        # Nothing new within the block: nil, after about that long.
        start = trio.current_time()
        none = await conn.call(
            "XREADGROUP", "GROUP", "g", "c", "BLOCK", 200, "STREAMS", "s", ">", block_s=0.2
        )
        assert none is None and trio.current_time() - start >= 0.15
    finally:
        await conn.aclose()


async def test_an_error_reply_raises_and_the_connection_goes_on(
    redis: Redis, redis_server: RedisServer
) -> None:
    conn = RespConnection(redis_server.url)
    try:
        with pytest.raises(QueueError, match="NOGROUP"):
            await conn.call("XREADGROUP", "GROUP", "nope", "c", "STREAMS", "missing", ">")
        assert await conn.call("PING") == b"PONG"
    finally:
        await conn.aclose()


async def test_password_and_database_from_the_url(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r", password="s3cret", appendonly=False) as server:
        conn = RespConnection(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        try:
            await conn.call("SET", "where", "db3")
            info = (await conn.call("CLIENT", "INFO")).decode()
            assert " db=3 " in info
        finally:
            await conn.aclose()
        wrong = RespConnection(f"redis://:wrong@127.0.0.1:{server.port}")
        with pytest.raises(QueueError, match="AUTH"):
            await wrong.call("PING")


async def test_a_server_gone_is_unavailable_then_reconnected(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r", appendonly=False)
    with server:
        conn = RespConnection(server.url, connect_timeout_s=1.0, command_timeout_s=1.0)
        assert await conn.call("PING") == b"PONG"
    with pytest.raises(QueueUnavailable):
        await conn.call("PING")
    with RedisServer(tmp_path / "r", port=server.port, appendonly=False):
        assert await conn.call("PING") == b"PONG"
    await conn.aclose()


async def test_cancelled_mid_command_the_next_one_starts_clean(
    redis: Redis, redis_server: RedisServer
) -> None:
    conn = RespConnection(redis_server.url)
    try:
        await conn.call("XGROUP", "CREATE", "s2", "g", "$", "MKSTREAM")
        with trio.move_on_after(0.1):
            await conn.call(
                "XREADGROUP", "GROUP", "g", "c", "BLOCK", 5000, "STREAMS", "s2", ">", block_s=5
            )
        # A reply still owed on the old connection would be read as this one's.
        assert await conn.call("ECHO", "after") == b"after"
    finally:
        await conn.aclose()
