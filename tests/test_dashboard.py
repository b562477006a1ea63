"""The dashboard in a real browser: Playwright drives Debian's headless chromium against
`engine serve` with its embedded sink, real Redis, real TCP."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.embedded import RedisServer
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.dashboard import chromium_path, engine_with_sink, post, post_batch
from fixtures.engine import EngineProcess

CHROMIUM = chromium_path()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (./scripts/test installs Debian's chromium when run as root)",
)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (a dev dependency)")
expect = sync_api.expect


def _flush(url: str) -> None:
    import trio

    from engine.queue import open_redis

    async def go() -> None:
        async with open_redis(url) as r:
            await r.flushall()

    trio.run(go)


@pytest.fixture(scope="module")
def engine(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineProcess]:
    _flush(redis_server.url)
    e = engine_with_sink(redis_server.url, tmp_path_factory.mktemp("dashboard"))
    try:
        yield e
    finally:
        if e.proc.poll() is None:
            assert e.stop() == 0, e.output()


@pytest.fixture
def api(engine: EngineProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.base, timeout=10, headers=AUTH) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Dashboard:
    page: Any
    errors: list[str] = field(default_factory=list)

    def assert_no_errors(self) -> None:
        assert not self.errors, self.errors

    def on_console(self, msg: Any) -> None:
        if msg.type != "error":
            return
        url: str = msg.location.get("url", "")
        # Chromium logs every 4xx answer; those of the API are problems the page shows.
        if msg.text.startswith("Failed to load resource") and "/v1/" in url:
            return
        self.errors.append(f"{msg.text} ({url})")


@pytest.fixture
def dash(browser: Any, engine: EngineProcess) -> Iterator[Dashboard]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(15_000)
    d = Dashboard(page)
    page.on("console", d.on_console)
    page.on("pageerror", lambda exc: d.errors.append(f"page error: {exc}"))
    page.goto(engine.base + "/")
    log_in(page, TEST_ADMIN_KEY)
    expect(page.locator("#api-status")).to_have_text("API: ok")
    try:
        yield d
    finally:
        context.close()


def log_in(page: Any, key: str) -> None:
    """The page asks for a key first (no session cookie yet)."""
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("main")).to_be_hidden()
    page.fill("#login-key", key)
    page.click("#login-form button[type=submit]")
    expect(page.locator("main")).to_be_visible()


def test_login_refuses_a_bad_key_and_logout_forgets_the_session(
    browser: Any, engine: EngineProcess, api: httpx.Client
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        page.goto(engine.base + "/")
        expect(page.locator("#login")).to_be_visible()
        page.fill("#login-key", "ek_000000000000_" + "x" * 43)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#login-error")).to_contain_text("422")
        expect(page.locator("main")).to_be_hidden()
        # A send-only key cannot open the dashboard either.
        made = api.post("/v1/keys", json={"name": "app", "scopes": ["send"]})
        assert made.status_code == 201, made.text
        page.fill("#login-key", made.json()["key"])
        page.click("#login-form button[type=submit]")
        expect(page.locator("#login-error")).to_contain_text("read or admin")
        log_in_again = TEST_ADMIN_KEY
        page.fill("#login-key", log_in_again)
        page.click("#login-form button[type=submit]")
        expect(page.locator("#api-status")).to_have_text("API: ok")
        expect(page.locator("#who")).to_contain_text("default")
        cookie = next(c for c in context.cookies() if c["name"] == "engine_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        page.click("#logout")
        expect(page.locator("#login")).to_be_visible()
        assert not [c for c in context.cookies() if c["name"] == "engine_session"]
    finally:
        context.close()


def _stats(api: httpx.Client) -> dict[str, Any]:
    r = api.get("/v1/stats")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _wait(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _number(text: str) -> int:
    return int(text.replace(",", ""))


def test_page_loads_offline_with_no_console_errors(dash: Dashboard, engine: EngineProcess) -> None:
    page = dash.page
    assert page.title() == "engine · dashboard"
    # Everything the page loaded came from the engine itself (no CDN).
    urls = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(engine.base) or u.startswith("ws://") for u in urls), urls
    expect(page.locator("#stat-instances")).to_have_text("1")
    expect(page.locator("#chart canvas")).to_have_count(1)
    dash.assert_no_errors()


def test_counters_and_rate_move_when_mail_is_sent(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    before = _stats(api)["totals"]["sent"]
    expect(page.locator("#stat-sent")).to_have_text(f"{before:,}")
    post_batch(api, [{"to": f"u{i}@example.com", "subject": "hi", "text": "x"} for i in range(25)])
    expect(page.locator("#stat-sent")).to_have_text(f"{before + 25:,}")
    expect(page.locator("#stat-enqueued")).not_to_have_text("0")
    # The rate line and the chart are fed from the deltas of the sent total.
    page.wait_for_function(
        "() => Number(document.getElementById('minute-sent').textContent.replace(/,/g, '')) >= 25"
    )
    dash.assert_no_errors()


def test_feed_shows_each_transition_live(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    expect(page.locator("#feed-status")).to_have_text("events: live")
    job_id = post(api, "feed@example.com", tenant="acme")
    for kind in ("queued", "processing", "sent"):
        row = page.locator(f'#feed tr[data-id="{job_id}"][data-type="{kind}"]')
        expect(row).to_have_count(1)
    expect(page.locator(f'#feed tr[data-id="{job_id}"][data-type="sent"]')).to_contain_text("acme")
    # Newest first.
    first = page.locator(f'#feed tr[data-id="{job_id}"]').first
    expect(first).to_have_attribute("data-type", "sent")
    dash.assert_no_errors()


def test_dlq_retry_from_the_page_requeues_the_message(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    # +552: refused at DATA as too big, for good -- and not suppressed (a +550 "user
    # unknown" would put the address on the suppression list, and a retry would end
    # suppressed, tried below).
    job_id = post(api, "nobody+552@example.com", subject="bounces")
    row = page.locator(f'#dead tr[data-id="{job_id}"]')
    expect(row).to_contain_text("552")
    failed = _stats(api)["totals"]["failed"]
    row.locator("button.retry").click()
    expect(page.locator("#notices")).to_contain_text(f"re-queued {job_id}")
    # It was attempted again (and refused again: the sink's +552 tag is permanent).
    _wait("the second attempt", lambda: _stats(api)["totals"]["failed"] == failed + 1)
    events = api.get(f"/v1/messages/{job_id}/events").json()
    items = events if isinstance(events, list) else events["items"]
    types = [e["type"] for e in items]
    assert types.count("failed") == 2 and "queued" in types[types.index("failed") :], types
    expect(row).to_have_count(1)

    unknown = post(api, "nobody+550@example.com", subject="unknown")
    gone = page.locator(f'#dead tr[data-id="{unknown}"]')
    expect(gone).to_contain_text("550")
    gone.locator("button.retry").click()
    expect(page.locator("#notices")).to_contain_text(
        f"not re-queued: every recipient of {unknown} is suppressed now"
    )
    expect(gone).to_have_count(0)
    dash.assert_no_errors()


def test_dlq_delete_and_retry_all_ask_first(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    doomed = post(api, "gone+552@example.com")
    kept = [post(api, f"again{i}+552@example.com") for i in range(2)]
    for job_id in (doomed, *kept):
        expect(page.locator(f'#dead tr[data-id="{job_id}"]')).to_have_count(1)

    page.once("dialog", lambda d: d.dismiss())
    page.locator(f'#dead tr[data-id="{doomed}"] button.delete').click()
    expect(page.locator(f'#dead tr[data-id="{doomed}"]')).to_have_count(1)  # declined

    page.once("dialog", lambda d: d.accept())
    page.locator(f'#dead tr[data-id="{doomed}"] button.delete').click()
    expect(page.locator(f'#dead tr[data-id="{doomed}"]')).to_have_count(0)
    assert api.get(f"/v1/messages/{doomed}").status_code == 404

    failed = _stats(api)["totals"]["failed"]
    dead = _stats(api)["dead"]
    page.once("dialog", lambda d: d.accept())
    page.locator("#retry-all").click()
    expect(page.locator("#notices")).to_contain_text(f"re-queued {dead} messages")
    _wait(
        "every retried message to fail again",
        lambda: _stats(api)["totals"]["failed"] == failed + dead,
    )
    dash.assert_no_errors()


def test_lookup_shows_state_and_timeline(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    job_id = post(api, "look@example.com", subject="look me up")
    _wait("sent", lambda: api.get(f"/v1/messages/{job_id}").json()["state"] == "sent")
    page.fill("#lookup-id", job_id)
    page.click("#lookup-form button")
    result = page.locator("#lookup-result")
    expect(result.locator(".facts")).to_have_attribute("data-id", job_id)
    expect(result.locator(".facts .badge").first).to_have_text("sent")
    for kind in ("queued", "processing", "sent"):
        expect(result.locator(f'.timeline li[data-type="{kind}"]')).to_have_count(1)

    # A problem from the API is shown, not swallowed.
    page.fill("#lookup-id", "0" * 32)
    page.click("#lookup-form button")
    expect(result.locator(".problem").first).to_contain_text("No such message (404)")
    dash.assert_no_errors()


def test_captured_mail_is_listed_and_never_rendered_as_html(
    dash: Dashboard, api: httpx.Client
) -> None:
    page = dash.page
    subject = '<img src=x onerror="window.__pwned = 1"> & <b>bold</b>'
    job_id = post(api, "mail@example.com", subject=subject, **{"from": "Eve <eve@example.com>"})
    row = page.locator(f'#mail tr[data-id="{job_id}"]')
    expect(row.locator("td.subject")).to_have_text(subject)
    expect(row).to_contain_text("eve@example.com")
    assert page.locator("#mail img, #mail b").count() == 0
    assert page.evaluate("window.__pwned") is None
    # Its id leads to the lookup.
    row.locator("button.id").click()
    expect(page.locator("#lookup-result .facts")).to_have_attribute("data-id", job_id)
    dash.assert_no_errors()


def test_dead_letter_id_link_offers_retry_in_the_lookup(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    job_id = post(api, "lookdead+552@example.com")  # too big: dead, not suppressed
    page.locator(f'#dead tr[data-id="{job_id}"] button.id').click()
    card = page.locator("#lookup-result .card")
    expect(card).to_contain_text("552")
    failed = _stats(api)["totals"]["failed"]
    card.get_by_role("button", name="Retry").click()
    _wait("the second attempt", lambda: _stats(api)["totals"]["failed"] == failed + 1)
    expect(page.locator("#notices")).to_contain_text(re.compile(f"re-queued {job_id}"))
    dash.assert_no_errors()


def test_feed_resumes_after_a_drop_without_missing_events(
    browser: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The page's engine goes away; mail is sent through another replica meanwhile; once
    the engine is back the page reconnects with since= and shows what it missed."""
    _flush(redis_server.url)
    first = engine_with_sink(redis_server.url, tmp_path / "a")
    other = engine_with_sink(redis_server.url, tmp_path / "b")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(20_000)
        page.goto(first.base + "/")
        log_in(page, TEST_ADMIN_KEY)
        expect(page.locator("#feed-status")).to_have_text("events: live")
        with httpx.Client(base_url=other.base, timeout=10, headers=AUTH) as api:
            before = post(api, "before@example.com")
            expect(page.locator(f'#feed tr[data-id="{before}"][data-type="sent"]')).to_have_count(1)
            port = first.port
            assert first.stop() == 0
            expect(page.locator("#feed-status")).to_contain_text("disconnected")
            expect(page.locator("#problems")).to_contain_text("API unreachable")
            missed = post(api, "missed@example.com")
            _wait("sent", lambda: api.get(f"/v1/messages/{missed}").json()["state"] == "sent")
            first = engine_with_sink(redis_server.url, tmp_path / "a2", port=port)
        for kind in ("queued", "processing", "sent"):
            expect(page.locator(f'#feed tr[data-id="{missed}"][data-type="{kind}"]')).to_have_count(
                1
            )
        expect(page.locator(f'#feed tr[data-id="{before}"]')).to_have_count(3)  # no duplicates
        expect(page.locator("#feed-status")).to_have_text("events: live")
        expect(page.locator("#problems")).to_be_empty()
    finally:
        context.close()
        for e in (first, other):
            if e.proc.poll() is None:
                e.stop()


def test_api_reference_renders_the_route_table_offline(browser: Any, engine: EngineProcess) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    d = Dashboard(page)
    page.on("console", d.on_console)
    page.on("pageerror", lambda exc: d.errors.append(f"page error: {exc}"))
    try:
        page.goto(engine.base + "/docs")
        # Rendered from /openapi.json: a summary and a schema of the route table.
        for summary in ("Send one message", "Cancel a queued, scheduled or retrying message"):
            expect(page.get_by_role("heading", name=summary)).to_be_visible()
        urls = page.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        # Redoc's footer links a logo on its CDN; the page's CSP (img-src 'self') refuses
        # it, so nothing leaves the machine, and Redoc drops the image when it fails.
        logo = "https://cdn.redoc.ly/redoc/logo-mini.svg"
        assert all(u.startswith((engine.base, "blob:")) or u == logo for u in urls), urls
        refused = [e for e in d.errors if "Content Security Policy" in e and logo in e]
        favicon = [e for e in d.errors if "/favicon.ico" in e]  # the browser's own 404
        assert [e for e in d.errors if e not in refused + favicon] == []
    finally:
        context.close()


def test_webhook_endpoints_and_bounce_classes_are_shown(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    made = api.post("/v1/webhooks", json={"url": "https://hooks.example.org/mail",
                                          "events": ["sent", "failed"]})  # fmt: skip
    assert made.status_code == 201, made.text
    row = page.locator(f'#webhooks tr[data-id="{made.json()["id"]}"]')
    expect(row).to_contain_text("hooks.example.org", timeout=15_000)
    expect(row).to_contain_text("failed, sent")  # sorted
    expect(row).to_contain_text("no attempts yet")
    # A hard bounce lands in the dead letters with its class.
    job_id = post(api, "bounced+550@example.com")
    expect(page.locator(f'#dead tr[data-id="{job_id}"] .badge.bounce')).to_have_text(
        "invalid-recipient", timeout=15_000
    )
    # ... and its address on the suppression list, with the class that put it there.
    listed = page.locator('#suppressed tr[data-address="bounced+550@example.com"]')
    expect(listed).to_contain_text("invalid-recipient", timeout=15_000)
    dash.assert_no_errors()


def test_a_captured_message_previews_in_a_sandboxed_frame(
    dash: Dashboard, api: httpx.Client, engine: EngineProcess
) -> None:
    """The html is shown in an iframe with no allow-* token: its script does not run, and
    its images load from nowhere -- not even from the engine itself, a URL that would
    answer (the frame's own CSP: no request is made)."""
    page = dash.page
    probe = f"{engine.base}/static/dashboard.css?probe={time.monotonic_ns()}"
    # Chromium reports the request it then blocks (CSP); what must never come is an
    # answer: the URL is the engine's own, which would serve it.
    loads: list[str] = []
    page.on("response", lambda r: loads.append(r.url) if "probe=" in r.url else None)
    html = (f'<h1 id="hello">Hello Ann</h1><img id="pixel" src="{probe}">'
            "<script>parent.__pwned = 1</script>")  # fmt: skip
    job_id = post(api, "preview@example.com", subject="Look", html=html)
    row = page.locator(f'#mail tr[data-id="{job_id}"]')
    row.locator("button.preview").click()
    expect(page.locator("#preview")).to_be_visible()
    expect(page.locator("#preview-head")).to_contain_text("preview@example.com")
    frame = page.frame_locator("#preview-html")
    expect(frame.locator("#hello")).to_have_text("Hello Ann")
    expect(frame.locator("#pixel")).to_have_count(1)
    page.wait_for_timeout(500)  # time for the image to be asked for, were it allowed
    assert page.locator("#preview-html").get_attribute("sandbox") == ""
    assert page.evaluate("window.__pwned") is None
    assert loads == []
    page.click("#preview-close")
    expect(page.locator("#preview")).to_be_hidden()


def test_templates_are_listed_shown_and_rendered_as_text(
    dash: Dashboard, api: httpx.Client
) -> None:
    """A template's parts and their rendering are source text: a variable holding markup
    shows as those characters, and no element of it is made, nothing of it runs."""
    page = dash.page
    first = {"name": "welcome", "subject": "Welcome, {{ name }}",
             "text": "Hello {{ name }}, your code is {{ code }}.",
             "html": "<p>Hello {{ name }}, your code is <b>{{ code }}</b>.</p>"}  # fmt: skip
    made = api.post("/v1/templates", json=first)
    assert made.status_code == 201, made.text
    again = api.put("/v1/templates/welcome", json={"subject": "Hi {{ name }}", "text": "Hi."})
    assert again.status_code == 200, again.text
    row = page.locator('#templates tr[data-name="welcome"]')
    expect(row).to_contain_text("v2", timeout=15_000)  # the list is polled every 5 s
    expect(row).to_contain_text("name")  # the current version's variables
    row.locator("button.template").click()
    view = page.locator("#template-view")
    expect(page.locator("#template-subject")).to_have_text("Hi {{ name }}")
    expect(page.locator("#template-html")).to_have_text("(no such part)")
    expect(page.locator("#template-version option")).to_have_count(2)
    page.select_option("#template-version", "1")
    expect(page.locator("#template-subject")).to_have_text("Welcome, {{ name }}")
    expect(page.locator("#template-html")).to_have_text(first["html"])  # its source, as text

    variables = {"name": '<b>x</b><img src=x onerror="window.__pwned = 1">', "code": "A1"}
    page.fill("#render-variables", json.dumps(variables))
    page.click("#render-form button[type=submit]")
    expected = api.post("/v1/templates/welcome/render", json={"variables": variables, "version": 1})
    assert expected.status_code == 200, expected.text
    out = expected.json()
    assert "<b>x</b>" not in out["html"]  # the html part escapes what it is given
    expect(page.locator("#rendered-version")).to_have_text("v1")
    expect(page.locator("#rendered-subject")).to_have_text(f"Welcome, {variables['name']}")
    expect(page.locator("#rendered-text")).to_have_text(out["text"])
    expect(page.locator("#rendered-html")).to_have_text(out["html"])
    # Every part is one text node: no element was made of the markup.
    assert view.locator("pre.source").count() == 6 and view.locator("pre.source *").count() == 0
    assert page.locator("main img").count() == 0
    assert page.evaluate("window.__pwned") is None
    expect(page.locator("#render-error")).to_be_hidden()

    # A variable the template uses is missing: the 422 names it, nothing is shown rendered.
    page.fill("#render-variables", '{"name": "Ann"}')
    page.click("#render-form button[type=submit]")
    expect(page.locator("#render-error")).to_contain_text("(422)")
    expect(page.locator("#render-error")).to_contain_text("[variables.code]")
    expect(page.locator("#render-result")).to_be_hidden()
    page.fill("#render-variables", "{nope")
    page.click("#render-form button[type=submit]")
    expect(page.locator("#render-error")).to_contain_text("must be a JSON object")
    dash.assert_no_errors()


def test_lookup_lists_the_files_a_message_carries(dash: Dashboard, api: httpx.Client) -> None:
    page = dash.page
    pdf = b"%PDF-1.7\n" + bytes(range(256)) * 8
    png = b"\x89PNG\r\n\x1a\n" + bytes(600)
    files = [{"filename": "report <1>.pdf", "content": base64.b64encode(pdf).decode()},
             {"filename": "logo.png", "content": base64.b64encode(png).decode(),
              "content_id": "logo"}]  # fmt: skip
    job_id = post(api, "files@example.com", html="<img src='cid:logo'>", attachments=files)
    page.fill("#lookup-id", job_id)
    page.click("#lookup-form button")
    listed = page.locator("#lookup-result ul.attachments li")
    expect(listed).to_have_count(2)
    report = page.locator('#lookup-result li[data-filename="report <1>.pdf"]')
    expect(report).to_contain_text("report <1>.pdf (application/pdf, 2.0 KiB)")
    logo = page.locator('#lookup-result li[data-filename="logo.png"]')
    expect(logo).to_contain_text("(image/png, 608 B, inline, cid:logo)")
    dash.assert_no_errors()
