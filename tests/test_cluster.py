"""loadtest.cluster and loadtest.tcpcut with real processes: two replicas behind HAProxy,
Redis with AOF, the sink; every fault hook the chaos scenarios use, in one story.

Skipped (with the reason) when HAProxy is missing and cannot be installed here; the
proxy test needs nothing but Python.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from fixtures.auth import AUTH, TEST_ADMIN_KEY
from loadtest import tcpcut
from loadtest.cluster import Cluster, ClusterError, main
from loadtest.haproxy import HaproxyMissing, ensure_haproxy

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[1]


def poll(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(0.05)


def message(tag: str, **extra: Any) -> dict[str, Any]:
    return {"to": f"{tag}@example.com", "subject": tag, "text": f"body of {tag}", **extra}


def post(http: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(url + "/v1/messages", json=body)


def ingested(replica_url: str) -> float:
    text = httpx.get(replica_url + "/metrics", timeout=5).text
    found = re.search(r"^engine_ingest_messages_total (\S+)$", text, re.M)
    assert found, text[:500]
    return float(found.group(1))


def delivered(cluster: Cluster, job_id: str) -> bool:
    return any(r["job_id"] == job_id for r in cluster.sink.received())


# -- a minimal websocket client (RFC 6455, client side: masked frames) -------------------


class WebSocket:
    def __init__(self, base_url: str, path: str) -> None:
        host, port = base_url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Authorization: Bearer {TEST_ADMIN_KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "closed during the handshake"
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("websocket closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def receive_text(self) -> str:
        """The next text message (pings and other control frames are skipped)."""
        while True:
            b0, b1 = self._read(2)
            size = b1 & 0x7F
            if size == 126:
                size = int.from_bytes(self._read(2), "big")
            elif size == 127:
                size = int.from_bytes(self._read(8), "big")
            payload = self._read(size)
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError(f"websocket closed by the server: {payload!r}")
            if opcode == 0x1:
                return payload.decode()

    def close(self) -> None:
        self.sock.close()


# -- the proxy alone ---------------------------------------------------------------------


def test_tcpcut_forwards_cuts_and_heals(tmp_path: Path) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    upstream_port = upstream.getsockname()[1]

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets it on a cut
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = upstream.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    ready, control = tmp_path / "ready", tmp_path / "cut.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.tcpcut", "--listen", "127.0.0.1:0",
         "--target", f"127.0.0.1:{upstream_port}", "--control", str(control),
         "--ready-file", str(ready)],
        stdout=(tmp_path / "proxy.log").open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    try:
        address = poll(lambda: ready.exists() and ready.read_text(), 10, "the proxy")
        host, port = address.rsplit(":", 1)

        def roundtrip(sock: socket.socket, data: bytes) -> bytes:
            sock.sendall(data)
            got = b""
            while len(got) < len(data):
                chunk = sock.recv(1 << 20)
                assert chunk, "connection closed"
                got += chunk
            return got

        conn = socket.create_connection((host, int(port)), timeout=5)
        big = os.urandom(3 * 1024 * 1024)  # more than the socket buffers: back-pressure
        assert roundtrip(conn, big) == big
        assert roundtrip(conn, b"PING") == b"PING"

        until = tcpcut.request_cut(control, proc.pid, 1.0)
        with pytest.raises(OSError):  # reset; or closed, seen as "connection closed"
            for _ in range(50):
                roundtrip(conn, b"x")
                time.sleep(0.02)
        conn.close()
        with pytest.raises(OSError):
            refused = socket.create_connection((host, int(port)), timeout=5)
            with refused:
                roundtrip(refused, b"y")

        time.sleep(max(0.0, until - time.time()) + 0.3)
        with socket.create_connection((host, int(port)), timeout=5) as healed:
            assert roundtrip(healed, b"back") == b"back"

        tcpcut.request_cut(control, proc.pid, 30.0)
        time.sleep(0.2)
        tcpcut.request_heal(control, proc.pid)
        time.sleep(0.2)
        with socket.create_connection((host, int(port)), timeout=5) as again:
            assert roundtrip(again, b"again") == b"again"
    finally:
        proc.terminate()
        proc.wait(10)
        upstream.close()
    log = (tmp_path / "proxy.log").read_text()
    assert "cut for 1.00s: reset 1 connections" in log
    assert "healed (deadline reached)" in log
    assert "healed (on request)" in log


# -- the whole cluster -------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    try:
        ensure_haproxy()
    except HaproxyMissing as exc:
        pytest.skip(f"no HAProxy: {exc}")
    c = Cluster(
        tmp_path / "run",
        replicas=2,
        senders=4,
        # Retries after 0.5 s, not 2 s: the sink-fault story stays short.
        engine_env={"ENGINE_QUEUE__BACKOFF_BASE_S": "0.5"},
    )
    try:
        c.up()
        yield c
    finally:
        c.down(graceful=False)


def test_cluster_story(cluster: Cluster) -> None:
    c = cluster
    start = time.monotonic()
    state = json.loads((c.run_dir / "cluster.json").read_text())
    assert state["lb_url"] == c.lb_url
    assert set(state["processes"]) == {
        "redis", "sink", "haproxy", "engine1", "engine2", "redis-proxy1", "redis-proxy2",
    }  # fmt: skip
    assert c.lb_servers() == {"engine1": "UP", "engine2": "UP"}
    http = httpx.Client(headers=AUTH, timeout=10)

    # A websocket through the balancer sees what either replica does.
    ws = WebSocket(c.lb_url, "/v1/events?type=sent")
    ids = []
    for n in range(6):
        r = post(http, c.lb_url, message(f"lb{n}"))
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    assert all(ingested(url) >= 1 for url in c.replica_urls), "round robin over both"
    seen: set[str] = set()
    while not set(ids) <= seen:
        seen |= {event["id"] for event in json.loads(ws.receive_text())}
    ws.close()
    poll(lambda: all(delivered(c, i) for i in ids), 10, "the six deliveries")
    assert "faults" in c.sink.stats()
    assert Cluster.probe(c.lb_url + "/readyz") == 200

    # kill -9 one replica: the balancer keeps answering 202 (retry + redispatch).
    pid = c.replica_pids[0]
    held = c.kill_replica(0)
    assert isinstance(held, int) and held >= 0
    assert c.replica_pids[0] is None and pid is not None
    assert not Path(f"/proc/{pid}").exists()
    statuses = [post(http, c.lb_url, message(f"after-kill{n}")).status_code for n in range(10)]
    assert statuses == [202] * 10
    poll(lambda: c.lb_servers()["engine1"].startswith("DOWN"), 5, "engine1 DOWN")
    c.start_replica(0)
    assert c.replica_pids[0] not in (None, pid)
    c.wait_lb(timeout=10)

    # Cut engine2 off Redis for 2 s: /readyz 503 meanwhile, 200 again after.
    until = c.cut_redis(1, 2.0)
    readyz = c.replica_urls[1] + "/readyz"
    poll(lambda: Cluster.probe(readyz) == 503, 2, "engine2 unready during the cut")
    assert time.time() < until
    poll(lambda: Cluster.probe(readyz) == 200, 15, "engine2 ready after the cut")
    assert c.in_flight("engine2") is not None
    assert "reset" in (c.logs / "redis-proxy2.log").read_text()
    c.wait_lb(timeout=10)

    # Redis crashes (SIGKILL) and comes back: the AOF kept an accepted message.
    r = post(http, c.lb_url, message("durable", delay_s=4))
    assert r.status_code == 202 and r.json()["state"] == "scheduled"
    durable = r.json()["id"]
    time.sleep(1.2)  # appendfsync everysec: older than 1 s is on disk
    stopped_at, ready_at = c.restart_redis(down_s=0.5)
    assert ready_at - stopped_at >= 0.5
    assert not delivered(c, durable)
    poll(lambda: delivered(c, durable), 20, "the scheduled message after the Redis restart")
    assert "DB loaded from append only file" in (c.logs / "redis.log").read_text()

    # The sink refuses everything: deliveries retry; cleared, they get through.
    faults = c.sink_faults(fail_ratio=1, fail_code=451)
    assert faults["source"] == "control" and faults["fail_ratio"] == 1.0
    refused_before = c.sink.stats()["refused"].get("451", 0)
    r = poll(lambda: _accepted(http, c.lb_url, message("retried")), 15, "a 202 again")
    retried = r.json()["id"]
    poll(lambda: c.sink.stats()["refused"].get("451", 0) > refused_before, 10, "a refusal")
    record = http.get(f"{c.lb_url}/v1/messages/{retried}").json()
    assert record["state"] in ("retrying", "queued", "processing") and record["attempts"] >= 1
    assert c.sink_clear()["source"] == "flags"
    poll(lambda: delivered(c, retried), 15, "the retried message")
    http.close()

    # Another process sees the same cluster; down() stops everything, twice is harmless.
    other = Cluster.attach(c.run_dir)
    assert other.pids == c.pids
    pids = [p for p in c.pids.values() if p is not None]
    assert len(pids) == 7
    stopped = c.down()
    assert set(stopped) == set(c.procs)
    assert all(not Path(f"/proc/{p}").exists() for p in pids)
    assert other.down() == []
    assert all(p is None for p in other.pids.values())
    assert time.monotonic() - start < 60


def _accepted(http: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response | None:
    r = post(http, url, body)
    return r if r.status_code == 202 else None


def test_a_used_run_dir_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "cluster.json").write_text(json.dumps(Cluster(run, replicas=1).describe()))
    with pytest.raises(ClusterError, match="already held a cluster"):
        Cluster(run, replicas=1).up()


def test_command_line_help_and_missing_cluster(tmp_path: Path, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for word in ("up", "status", "down", "kill", "restart-redis", "cut", "sink-faults"):
        assert word in out
    assert main(["status", "--run-dir", str(tmp_path)]) == 1
    assert "no cluster in" in capsys.readouterr().err
