"""The dashboard's History view in a real browser (Debian's chromium): `engine serve` with
its history in the session's PostgreSQL; a search lists what was sent, as text only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine.embedded import RedisServer, free_port
from engine.pgserver import PostgresServer
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.dashboard import chromium_path, post
from fixtures.engine import EngineProcess
from fixtures.postgres import create_database, drop_database

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (./scripts/test installs Debian's chromium when run as root)",
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency)")
expect = sync_api.expect


@pytest.fixture
def engine(
    redis_server: RedisServer, pg_server: PostgresServer, tmp_path: Any
) -> Iterator[EngineProcess]:
    import trio

    from engine.queue import open_redis

    async def flush() -> None:
        async with open_redis(redis_server.url) as r:
            await r.flushall()

    trio.run(flush)
    dsn = create_database(pg_server, "dash_history")
    env = {
        "ENGINE_SINK__BIND": f"127.0.0.1:{free_port()}",
        "ENGINE_SINK__MAILDIR": str(tmp_path / "maildir"),
        "ENGINE_HISTORY_DSN": dsn,
        "ENGINE_HISTORY__LINGER_S": "0.05",
    }
    e = EngineProcess(redis_server.url, None, tmp_path, env=env)
    try:
        yield e
    finally:
        if e.proc.poll() is None:
            assert e.stop() == 0, e.output()
        drop_database(pg_server, "dash_history")


def test_history_search_lists_messages_as_text(engine: EngineProcess) -> None:
    with httpx.Client(base_url=engine.base, timeout=10, headers=AUTH) as api:
        job_id = post(api, "hist@example.com", subject="<b>not bold</b>")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = api.get("/v1/history", params={"to": "hist@example.com"})
            if got.status_code == 200 and got.json()["items"]:
                break
            time.sleep(0.1)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(engine.base + "/")
            page.fill("#login-key", TEST_ADMIN_KEY)
            page.click("#login-form button[type=submit]")
            page.fill("#history-to", "HIST@example.com")
            page.click("#history-form button[type=submit]")
            row = page.locator(f'#history tr[data-id="{job_id}"]')
            expect(row).to_have_count(1)
            # The subject is text: no <b> element was made from it.
            expect(row.locator("td").nth(4)).to_have_text("<b>not bold</b>")
            expect(row.locator("b")).to_have_count(0)
            expect(page.locator("#history-lag")).to_contain_text("writer lag")
            assert "to=HIST%40example.com" in (page.get_attribute("#history-csv", "href") or "")
        finally:
            browser.close()
