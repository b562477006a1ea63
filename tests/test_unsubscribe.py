"""One-click unsubscribe (RFC 8058): signed tokens (pure), and end to end over real HTTP:
a send with ``unsubscribe`` carries the two headers, GET on the link changes nothing,
POST (as a mailbox provider sends it, no cookie, no Origin) suppresses the address."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping

import httpx
import pytest
import trio

from engine.config import load_settings
from engine.embedded import RedisServer
from engine.errors import ConfigError, ValidationError
from engine.transport.memory import MemoryTransport
from engine.unsubscribe import headers, list_name, make_token, read_token, signing_key
from fixtures.inproc import engine_client


def test_tokens_are_signed_and_name_tenant_list_and_address() -> None:
    key = signing_key("s3cret")
    token = make_token(key, "acme", "news", "ann@example.com")
    assert read_token(key, token) == ("acme", "news", "ann@example.com")
    assert read_token(signing_key("other"), token) is None
    payload, _, mac = token.partition(".")
    forged = make_token(key, "acme", "news", "bob@example.com").partition(".")[0]
    assert read_token(key, f"{forged}.{mac}") is None  # another address, the old mac
    assert read_token(key, payload) is None and read_token(key, "%%%.%%%") is None
    assert read_token(key, "x" * 5000) is None
    assert list_name(True) == "all" and list_name("weekly-news") == "weekly-news"
    for bad in ("", "a b", "x" * 65, "../x"):
        with pytest.raises(ValidationError):
            list_name(bad)
    out = headers("https://mail.example.com/", token, "unsub@example.com")
    assert out["List-Unsubscribe"].startswith(f"<https://mail.example.com/u/{token}>, <mailto:")
    assert out["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_settings_refuse_a_base_url_that_is_not_http() -> None:
    with pytest.raises(ConfigError, match=r"unsubscribe\.base_url"):
        load_settings(environ={}, overrides={"unsubscribe": {"base_url": "ftp://x"}})


Api = tuple[httpx.AsyncClient, MemoryTransport, str]


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Api]:
    async with engine_client(redis_server.url) as running:
        yield running


async def test_a_send_carries_the_link_and_a_post_to_it_suppresses(api: Api) -> None:
    c, transport, bind = api
    r = await c.post("/v1/messages", json={"to": "Ann <ann@example.com>", "subject": "News",
                                           "text": "hi", "unsubscribe": True})  # fmt: skip
    assert r.status_code == 202, r.text
    with trio.fail_after(10):
        while not transport.sent:
            await trio.sleep(0.02)
    data = transport.sent[0].data.decode()
    link = re.search(r"^List-Unsubscribe: <(http://[^>]+)>", data, re.M)
    assert link is not None, data
    assert "\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in data
    url = link.group(1)
    assert url.startswith(f"http://{bind}/u/")

    async with httpx.AsyncClient(timeout=10) as outsider:  # no key, no cookie
        page = await outsider.get(url)
        assert page.status_code == 200 and "ann@example.com" in page.text
        assert '<form method="post">' in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert (await c.get("/v1/suppressions/ann@example.com")).status_code == 404  # GET: no
        done = await outsider.post(
            url, content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Origin": "https://mail.google.com"},
        )  # fmt: skip
        assert done.status_code == 200 and "no more" in done.text
        bad = await outsider.post(url[:-3] + "AAA", content=b"List-Unsubscribe=One-Click")
        assert bad.status_code == 404
    entry = (await c.get("/v1/suppressions/ann@example.com")).json()
    assert entry["reason"] == "one-click unsubscribe"

    again = await c.post("/v1/messages", json={"to": "ann@example.com", "text": "x"})
    with trio.fail_after(10):
        while (await c.get(f"/v1/messages/{again.json()['id']}")).json()["state"] != "suppressed":
            await trio.sleep(0.02)

    two = await c.post("/v1/messages", json={"to": ["a@example.com", "b@example.com"],
                                             "text": "x", "unsubscribe": True})  # fmt: skip
    assert (two.status_code, two.json()["field"]) == (422, "unsubscribe")
    both = await c.post("/v1/messages", json={"to": "a@example.com", "text": "x",
                                              "unsubscribe": True,
                                              "headers": {"List-Unsubscribe": "<x>"}})  # fmt: skip
    assert (both.status_code, both.json()["field"]) == (422, "headers.List-Unsubscribe")


async def test_an_unsubscribe_from_a_list_stops_that_list_only(api: Api) -> None:
    """`"unsubscribe": "weekly"` puts the address on the tenant's list for "weekly"
    (GET /v1/suppressions?list=weekly): later "weekly" mail to it ends suppressed, other
    mail to it still goes out; "unsubscribe": true stops all of it."""
    c, transport, _ = api
    news = {"to": "cy@example.com", "text": "news", "unsubscribe": "weekly"}
    assert (await c.post("/v1/messages", json=news)).status_code == 202
    with trio.fail_after(10):
        while not transport.sent:
            await trio.sleep(0.02)
    link = re.search(r"^List-Unsubscribe: <(http://[^>]+)>", transport.sent[0].data.decode(), re.M)
    assert link is not None
    async with httpx.AsyncClient(timeout=10) as outsider:
        done = await outsider.post(link.group(1), content=b"List-Unsubscribe=One-Click")
        assert done.status_code == 200

    scoped = await c.get("/v1/suppressions/cy@example.com", params={"list": "weekly"})
    assert scoped.status_code == 200 and "weekly" in scoped.json()["reason"]
    assert (await c.get("/v1/suppressions/cy@example.com")).status_code == 404
    bad = await c.get("/v1/suppressions", params={"list": "no such/list"})
    assert (bad.status_code, bad.json()["field"]) == (422, "list")

    async def final(body: Mapping[str, object]) -> str:
        job_id = (await c.post("/v1/messages", json=body)).json()["id"]
        with trio.fail_after(10):
            while True:
                state: str = (await c.get(f"/v1/messages/{job_id}")).json()["state"]
                if state in ("sent", "suppressed"):
                    return state
                await trio.sleep(0.02)

    assert await final(news) == "suppressed"
    assert await final({**news, "unsubscribe": "monthly"}) == "sent"
    assert await final({"to": "cy@example.com", "text": "receipt"}) == "sent"
    # Taken off that list, the next weekly mail goes out again.
    removed = await c.delete("/v1/suppressions/cy@example.com", params={"list": "weekly"})
    assert removed.status_code == 204
    assert await final(news) == "sent"
