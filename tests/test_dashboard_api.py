"""The dashboard's HTTP side without a browser: the page and its files, GET /v1/stats,
GET /v1/sink/messages (and the Maildir reader behind it)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from engine.api.dashboard import ASSETS, read_maildir
from engine.config import load_settings
from engine.embedded import RedisServer, free_port
from engine.service import run_engine
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH, with_test_key


@asynccontextmanager
async def _engine(
    redis_server: RedisServer, sink_maildir: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    from engine.queue import open_redis

    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = with_test_key(load_settings(environ={}, overrides={"http": {"bind": bind}}))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: run_engine(
                settings,
                redis_url=redis_server.url,
                smtp_url="smtp://unused:25",
                transport=MemoryTransport(),
                handle_signals=False,
                stop=stop,
                sink_maildir=sink_maildir,
                task_status=task_status,
            )
        )
        async with httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client:
            yield client
        stop.set()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[httpx.AsyncClient]:
    async with _engine(redis_server, None) as c:
        yield c


def _deliver(root: Path, name: str, content: bytes, sub: str = "new") -> None:
    for d in ("tmp", "new", "cur"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / sub / name).write_bytes(content)


def _mail(subject: str, job_id: str = "", body: bytes = b"body\r\n") -> bytes:
    head = f"From: Shop <shop@example.com>\r\nTo: ann@example.com\r\nSubject: {subject}\r\n"
    head += "Date: Sun, 22 Nov 2026 20:00:00 +0000\r\nMessage-ID: <m@example.com>\r\n"
    if job_id:
        head += f"X-Engine-Job-Id: {job_id}\r\n"
    return head.encode() + b"\r\n" + body


async def test_page_and_its_files_come_from_the_engine(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    docs = await client.get("/docs")  # the API reference page uses the rest
    assert (
        docs.status_code == 200 and "script-src 'self'" in docs.headers["content-security-policy"]
    )
    for name in ASSETS:
        assert f"/static/{name}" in r.text or f"/static/{name}" in docs.text, name
        asset = await client.get(f"/static/{name}")
        assert asset.status_code == 200 and asset.content, name
        again = await client.get(
            f"/static/{name}", headers={"If-None-Match": asset.headers["etag"]}
        )
        assert again.status_code == 304
    assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere


@pytest.mark.parametrize(
    "path", ["/static/app.py", "/static/..%2fapp.py", "/static/VENDORED.md", "/static/"]
)
async def test_only_listed_files_are_served(client: httpx.AsyncClient, path: str) -> None:
    r = await client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"


async def test_the_json_index_moved_to_v1(client: httpx.AsyncClient) -> None:
    body = (await client.get("/v1")).json()
    assert "GET /v1/stats" in body["endpoints"] and "GET /v1/sink/messages" in body["endpoints"]


async def test_stats_count_what_happens(client: httpx.AsyncClient) -> None:
    first = (await client.get("/v1/stats")).json()
    assert set(first) == {
        "at", "ready", "ready_by_lane", "processing", "delayed", "dead", "instances",
        "totals", "senders", "transports",
    }  # fmt: skip
    assert first["transports"] == [{"name": "smtp", "state": "up"}]
    assert set(first["totals"]) == {
        "enqueued", "sent", "failed", "cancelled", "throttled", "reaped",
    }  # fmt: skip
    assert first["instances"] == 1 and first["senders"] > 0
    r = await client.post("/v1/messages", json={"to": "a@example.com", "text": "x", "delay_s": 60})
    job_id = r.json()["id"]
    assert (await client.delete(f"/v1/messages/{job_id}")).status_code == 200
    with trio.fail_after(5):
        while True:
            now = (await client.get("/v1/stats")).json()
            if now["totals"]["cancelled"] == 1:
                break
            await trio.sleep(0.02)
    assert now["totals"]["enqueued"] == first["totals"]["enqueued"] + 1
    assert now["at"] >= first["at"]


async def test_without_an_embedded_sink_mail_is_a_clear_404(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/sink/messages")
    assert r.status_code == 404
    problem = r.json()
    assert problem["type"].endswith("/no-sink") and "smtp.url" in problem["detail"]


async def test_captured_mail_newest_first(redis_server: RedisServer, tmp_path: Path) -> None:
    root = tmp_path / "maildir"
    _deliver(root, "1700000000.M5P1Q1.host", _mail("old"))
    _deliver(root, "1700000001.M7P1Q2.host", _mail("new", "ab" * 16))
    _deliver(root, "1700000000.M9P1Q3.host:2,S", _mail("read one"), sub="cur")
    async with _engine(redis_server, str(root)) as client:
        page = (await client.get("/v1/sink/messages?limit=2")).json()
        assert page["total"] == 3 and page["maildir"] == str(root)
        assert [m["subject"] for m in page["items"]] == ["new", "read one"]
        newest = page["items"][0]
        assert newest["from"] == "Shop <shop@example.com>" and newest["to"] == "ann@example.com"
        assert newest["job_id"] == "ab" * 16 and newest["message_id"] == "<m@example.com>"
        assert newest["received_at"] == "2023-11-14T22:13:21.000Z"
        assert newest["size"] == len(_mail("new", "ab" * 16))
        bad = await client.get("/v1/sink/messages?limit=0")
        assert bad.status_code == 422 and bad.json()["field"] == "limit"


def test_maildir_reader_reads_headers_only_and_copes(tmp_path: Path) -> None:
    root = tmp_path / "md"
    big = _mail("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", body=b"x" * 5_000_000)
    _deliver(root, "1700000002.M1P1Q1.host", big)
    _deliver(root, "odd-name", b"Subject: no blank line, no body")
    _deliver(root, "1700000000.M1P1Q2.host", b"\x00\xff garbage without headers\r\n")
    os.utime(root / "new" / "odd-name", (1_600_000_000, 1_600_000_000))
    page = read_maildir(root, 10)
    assert [m.subject for m in page.items] == ["Grüße", None, "no blank line, no body"]
    assert page.items[0].size == len(big)
    assert read_maildir(tmp_path / "missing", 10).total == 0
