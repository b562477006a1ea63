"""The embedded Redis with real servers: a data dir is always run by the server that
wrote it (SERVER_MARKER), and a server that cannot start says why in its own words.

The "system redis-server" here is a stand-in script on PATH that, like Debian's Redis
7.0 on Valkey 9's files, cannot read the data (none is installed on purpose).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine.embedded import (
    SERVER_MARKER,
    ChildError,
    RedisServer,
    find_redis_server,
    free_port,
    server_version,
)
from engine.errors import ConfigError

OLD_REDIS = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "Redis server v=7.0.15 sha=00000000:0 bits=64"; exit 0; fi
echo "1:M 01 Jan 2026 00:00:00.000 # Can't handle RDB format version 80"
exit 1
"""


def written_by_the_default(data_dir: Path) -> str:
    """Start and stop a server on ``data_dir`` (no system Redis on PATH); its binary."""
    with RedisServer(data_dir) as server:
        assert server.ping()
    return server.binary


def put_old_redis_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "redis-server"
    fake.write_text(OLD_REDIS)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return fake


def test_the_marker_names_the_server_that_wrote_the_data(tmp_path: Path) -> None:
    binary = written_by_the_default(tmp_path / "redis")
    marker = json.loads((tmp_path / "redis" / SERVER_MARKER).read_text())
    assert marker == {"binary": binary, "version": server_version(binary)}
    assert marker["version"].startswith(("Valkey server v=", "Redis server v="))


def test_data_stays_with_its_server_when_another_appears_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = written_by_the_default(tmp_path / "redis")
    old_redis = put_old_redis_on_path(tmp_path, monkeypatch)  # apt-get install redis-server
    assert find_redis_server() == str(old_redis)  # new data would get it
    with RedisServer(tmp_path / "redis") as server:  # this data does not
        assert server.binary == binary and server.ping()
    # Written before markers existed: Valkey's own file header says who wrote it.
    (tmp_path / "redis" / SERVER_MARKER).unlink()
    if server_version(binary).startswith("Valkey"):
        assert find_redis_server(tmp_path / "redis") == binary


def test_a_writer_that_is_gone_is_a_clear_error(tmp_path: Path) -> None:
    written_by_the_default(tmp_path / "redis")
    gone = {"binary": "/opt/gone/redis-server", "version": "Redis server v=6.0.0"}
    (tmp_path / "redis" / SERVER_MARKER).write_text(json.dumps(gone))
    with pytest.raises(ConfigError) as raised:
        RedisServer(tmp_path / "redis")
    message = str(raised.value)
    assert "written by Redis server v=6.0.0 (/opt/gone/redis-server)" in message
    assert "not installed any more" in message
    assert f"move {tmp_path / 'redis'} away" in message


def test_a_gone_writer_of_the_same_version_is_replaced_by_that_version(tmp_path: Path) -> None:
    binary = written_by_the_default(tmp_path / "redis")
    moved = {"binary": "/opt/moved/redis-server", "version": server_version(binary)}
    (tmp_path / "redis" / SERVER_MARKER).write_text(json.dumps(moved))
    assert find_redis_server(tmp_path / "redis") == binary


def test_a_failed_start_shows_the_servers_own_log_lines(tmp_path: Path) -> None:
    written_by_the_default(tmp_path / "redis")
    manifest = next((tmp_path / "redis").glob("appendonlydir/*.manifest"))
    manifest.write_text("not a manifest\n")
    server = RedisServer(tmp_path / "redis")
    with pytest.raises(ChildError) as raised:
        server.start()
    message = str(raised.value)
    assert "exited with code 1 before answering PING" in message
    assert "Invalid AOF manifest file format" in message  # the server's own words
    assert f"Its data dir is {tmp_path / 'redis'}" in message
    assert not server.child.alive()


def test_engine_serve_prints_why_redis_did_not_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new data dir goes to the first server found: here one that cannot start.
    old_redis = put_old_redis_on_path(tmp_path, monkeypatch)
    done = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--bind", f"127.0.0.1:{free_port()}",
         "--smtp-url", "smtp://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "ENGINE_REDIS__DATA_DIR": str(tmp_path / "redis")},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"redis server ({old_redis}) exited with code 1" in done.stderr
    assert "Can't handle RDB format version 80" in done.stderr
    assert not (tmp_path / "redis" / SERVER_MARKER).exists()
