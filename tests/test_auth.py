"""Authentication and tenancy: API keys (made, shown once, hashed, revoked on every
replica), scopes (401/403), tenants (another tenant's things do not exist), sender
identities, per-tenant idempotency, the dashboard session cookie and its CSRF rules,
websockets, the Host allow-list, the first start's admin key. Real engines, real Redis."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from engine.auth import AccessTable, key_hash, key_id, make_key, principal_of
from engine.auth.principal import KeyRecord, check_may_send, identity_allowed
from engine.auth.tokens import session_kid, sign_session
from engine.config import Settings, load_settings
from engine.embedded import RedisServer, free_port
from engine.errors import ConfigError, ValidationError
from engine.keys import Keys
from engine.queue import AccessStore, open_redis
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.inproc import inprocess_engine

MSG = {"to": "ann@example.com", "subject": "Hi", "text": "Hello"}

# -- pure rules ---------------------------------------------------------------------------


def test_a_key_has_a_prefix_a_kid_and_256_random_bits_and_only_its_hash_is_kept() -> None:
    kid, key = make_key()
    assert key.startswith(f"ek_{kid}_") and len(key) == 3 + 12 + 1 + 43
    assert key_id(key) == kid and key_id(key + "x") is None and key_id("Bearer x") is None
    assert key_id("ek_" + "0" * 12 + "_" + "a" * 10_000) is None  # long: refused unread
    assert key_hash(key) != key and len({make_key()[1] for _ in range(1000)}) == 1000


def test_a_session_cookie_is_signed_and_expires() -> None:
    cookie = sign_session("abc123abc123", 2_000, "s3cret")
    assert session_kid(cookie, "s3cret", now_s=1_999) == "abc123abc123"
    assert session_kid(cookie, "s3cret", now_s=2_000) is None  # expired
    assert session_kid(cookie, "other", now_s=1_000) is None  # another deployment's
    forged = cookie.replace("2000", "9999")
    assert session_kid(forged, "s3cret", now_s=1_000) is None


def test_identities_are_domains_addresses_or_any() -> None:
    ids = ["acme.com", "billing@acme.org"]
    assert identity_allowed("noreply@acme.com", ids, "engine@localhost")
    assert identity_allowed("Billing@ACME.org", ids, "engine@localhost")
    assert not identity_allowed("x@acme.org", ids, "engine@localhost")
    assert not identity_allowed("x@mail.acme.com", ids, "engine@localhost")  # subdomain
    assert not identity_allowed("x@evil-acme.com", ids, "engine@localhost")
    assert identity_allowed("engine@localhost", [], "Engine <engine@localhost>")
    assert identity_allowed("anyone@anywhere.net", ["*"], "engine@localhost")


def test_a_key_sends_for_its_tenants_only() -> None:
    one = principal_of(KeyRecord("k1", "", "h", ["send"], "acme", []))
    many = principal_of(KeyRecord("k2", "", "h", ["send"], "acme", ["zeta"]))
    every = principal_of(KeyRecord("k3", "", "h", ["admin"], "default", ["*"]))
    assert not one.multi_tenant and many.multi_tenant and every.multi_tenant
    with pytest.raises(ValidationError) as info:
        check_may_send(one, "zeta", None, ["*"], "e@x.org")
    assert info.value.field == "tenant"
    check_may_send(many, "zeta", "a@zeta.io", ["zeta.io"], "e@x.org")
    with pytest.raises(ValidationError) as info:
        check_may_send(every, "zeta", "a@acme.com", ["zeta.io"], "e@x.org")
    assert info.value.field == "from"
    assert every.allows("dead-letters") and not one.allows("read") and one.allows("public")


# -- engines ----------------------------------------------------------------------------


async def _fresh(url: str) -> None:
    async with open_redis(url) as r:
        await r.flushall()


def _settings(bind: str, **auth: Any) -> Settings:
    overrides: dict[str, Any] = {"http": {"bind": bind}, "auth": {"refresh_s": 0.2, **auth}}
    return load_settings(environ={}, overrides=overrides)


@pytest.fixture
async def base(redis_server: RedisServer) -> AsyncIterator[str]:
    await _fresh(redis_server.url)
    bind = f"127.0.0.1:{free_port()}"
    async with inprocess_engine(_settings(bind), redis_server.url, MemoryTransport()):
        yield f"http://{bind}"


async def _key(admin: httpx.AsyncClient, **body: Any) -> dict[str, str]:
    r = await admin.post("/v1/keys", json=body)
    assert r.status_code == 201, r.text
    made: dict[str, str] = r.json()
    return {"Authorization": f"Bearer {made['key']}", "kid": made["kid"]}


def _headers(key: dict[str, str]) -> dict[str, str]:
    return {"Authorization": key["Authorization"]}


async def test_no_key_is_401_a_bad_key_401_a_missing_scope_403(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as admin:
        reader = await _key(admin, name="reader", scopes=["read"])
        async with httpx.AsyncClient(base_url=base, timeout=10) as anon:
            r = await anon.post("/v1/messages", json=MSG)
            assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="engine"'
            assert r.headers["content-type"] == "application/problem+json"
            r = await anon.get(
                "/v1/stats", headers={"X-API-Key": "ek_" + "0" * 12 + "_" + "a" * 43}
            )
            assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
            r = await anon.post("/v1/messages", json=MSG, headers=_headers(reader))
            assert r.status_code == 403
            assert 'error="insufficient_scope", scope="send"' in r.headers["www-authenticate"]
            assert (await anon.get("/v1/stats", headers=_headers(reader))).status_code == 200
            # Public routes stay public.
            for path in ("/healthz", "/readyz", "/openapi.json", "/v1", "/"):
                assert (await anon.get(path)).status_code == 200, path


async def test_keys_are_listed_without_secrets_and_stored_only_as_hashes(
    base: str, redis_server: RedisServer
) -> None:
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as admin:
        made = await admin.post("/v1/keys", json={"name": "app", "scopes": ["send"]})
        key = made.json()["key"]
        listed = (await admin.get("/v1/keys")).json()["items"]
        assert {k["name"] for k in listed} >= {"app"}
        assert key not in json.dumps(listed) and "sha256" not in json.dumps(listed)
    async with open_redis(redis_server.url) as r:
        dump = b""
        for k in await r.keys("*"):
            if await r.type(k) == b"hash":
                dump += b"".join(v for kv in (await r.hgetall(k)).items() for v in kv)
        assert key.encode() not in dump and key_hash(key).encode() in dump


async def test_another_tenants_messages_do_not_exist(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as admin:
        acme = _headers(await _key(admin, scopes=["send", "read", "events"], tenant="acme"))
        zeta = _headers(await _key(admin, scopes=["send", "read", "events"], tenant="zeta"))
        mine = (await admin.post("/v1/messages", json=MSG, headers=acme)).json()["id"]
        for method, path in (("GET", f"/v1/messages/{mine}"),
                             ("GET", f"/v1/messages/{mine}/events"),
                             ("DELETE", f"/v1/messages/{mine}")):  # fmt: skip
            assert (await admin.request(method, path, headers=zeta)).status_code == 404, path
        got = await admin.get(f"/v1/messages/{mine}", headers=acme)
        assert got.status_code == 200 and got.json()["tenant"] == "acme"
        assert (await admin.get(f"/v1/messages/{mine}")).status_code == 200  # admin: all
        # The tenant field is honoured only for keys acting for several tenants.
        r = await admin.post("/v1/messages", json={**MSG, "tenant": "zeta"}, headers=acme)
        assert r.status_code == 422 and r.json()["field"] == "tenant"
        both = _headers(await _key(admin, scopes=["send"], tenant="acme", tenants=["zeta"]))
        r = await admin.post("/v1/messages", json={**MSG, "tenant": "zeta"}, headers=both)
        assert r.status_code == 202
        # An admin key of one tenant cannot mint a key for another, nor for all.
        acme_admin = _headers(await _key(admin, scopes=["admin"], tenant="acme"))
        for body in ({"tenant": "zeta"}, {"tenant": "acme", "tenants": ["*"]}):
            r = await admin.post("/v1/keys", json={"scopes": ["send"], **body}, headers=acme_admin)
            assert r.status_code == 422 and r.json()["field"] == "tenants", body
        listed = (await admin.get("/v1/keys", headers=acme_admin)).json()["items"]
        assert {k["tenant"] for k in listed} == {"acme"}


async def test_dead_letters_and_schedules_are_per_tenant(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as admin:
        acme = _headers(await _key(admin, scopes=["schedules", "dead-letters"], tenant="acme"))
        zeta = _headers(await _key(admin, scopes=["schedules", "dead-letters"], tenant="zeta"))
        body = {"name": "digest", "cron": "@daily", "message": MSG}
        assert (await admin.post("/v1/schedules", json=body, headers=acme)).status_code == 201
        assert (await admin.get("/v1/schedules/digest", headers=zeta)).status_code == 404
        assert (await admin.get("/v1/schedules", headers=zeta)).json()["items"] == []
        assert (await admin.delete("/v1/schedules/digest", headers=zeta)).status_code == 404
        taken = await admin.post("/v1/schedules", json=body, headers=zeta)
        assert taken.status_code == 409
        view = (await admin.get("/v1/schedules/digest", headers=acme)).json()
        assert view["message"]["tenant"] == "acme"  # the owner is stored with the message
        page = await admin.get("/v1/dead", headers=zeta)
        assert page.status_code == 200 and page.json()["items"] == []


async def test_sender_identities_come_from_the_tenant(
    redis_server: RedisServer,
) -> None:
    await _fresh(redis_server.url)
    bind = f"127.0.0.1:{free_port()}"
    settings = _settings(bind, identities={"acme": ["acme.com"]})
    async with (
        inprocess_engine(settings, redis_server.url, MemoryTransport()),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as admin,
    ):
        acme = _headers(await _key(admin, scopes=["send"], tenant="acme"))
        ok = await admin.post("/v1/messages", json={**MSG, "from": "A <a@acme.com>"}, headers=acme)
        assert ok.status_code == 202, ok.text
        r = await admin.post("/v1/messages", json={**MSG, "from": "a@other.com"}, headers=acme)
        assert r.status_code == 422 and r.json()["field"] == "from"
        assert "PUT /v1/tenants/acme" in r.json()["detail"]
        batch = {"messages": [MSG, {**MSG, "from": "x@other.com"}]}
        r = await admin.post("/v1/messages/batch", json=batch, headers=acme)
        assert r.status_code == 422 and r.json()["field"] == "messages[1].from"
        # Through the API: takes effect at once on this replica.
        put = await admin.put("/v1/tenants/acme", json={"identities": ["other.com"]})
        assert put.status_code == 201, put.text
        r = await admin.post("/v1/messages", json={**MSG, "from": "a@other.com"}, headers=acme)
        assert r.status_code == 202
        bad = await admin.put("/v1/tenants/acme", json={"identities": ["not an identity"]})
        assert bad.status_code == 422 and bad.json()["field"] == "identities[0]"
        # The default From is the engine's own: always allowed.
        assert (await admin.post("/v1/messages", json=MSG, headers=acme)).status_code == 202


async def test_idempotency_keys_are_per_tenant(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as admin:
        acme = _headers(await _key(admin, scopes=["send"], tenant="acme"))
        zeta = _headers(await _key(admin, scopes=["send"], tenant="zeta"))
        idem = {"Idempotency-Key": "signup-42"}
        a = await admin.post("/v1/messages", json=MSG, headers={**acme, **idem})
        z = await admin.post("/v1/messages", json=MSG, headers={**zeta, **idem})
        again = await admin.post("/v1/messages", json=MSG, headers={**acme, **idem})
        assert a.status_code == z.status_code == 202 and again.status_code == 200
        assert a.json()["id"] != z.json()["id"] and again.json()["id"] == a.json()["id"]


async def test_revocation_reaches_another_replica(redis_server: RedisServer) -> None:
    await _fresh(redis_server.url)
    one, two = (f"127.0.0.1:{free_port()}" for _ in range(2))
    async with (
        inprocess_engine(_settings(one), redis_server.url, MemoryTransport()),
        inprocess_engine(_settings(two), redis_server.url, MemoryTransport()),
        httpx.AsyncClient(base_url=f"http://{one}", headers=AUTH, timeout=10) as admin,
        httpx.AsyncClient(base_url=f"http://{two}", timeout=10) as other,
    ):
        key = await _key(admin, scopes=["read"])
        # Made on one replica: the other knows it at once (one read on a miss).
        assert (await other.get("/v1/stats", headers=_headers(key))).status_code == 200
        assert (await admin.delete(f"/v1/keys/{key['kid']}")).status_code == 204
        assert (await admin.delete(f"/v1/keys/{key['kid']}")).status_code == 404
        with trio.fail_after(5):  # auth.refresh_s is 0.2 here
            while (await other.get("/v1/stats", headers=_headers(key))).status_code != 401:
                await trio.sleep(0.05)


async def test_the_session_cookie_and_its_cross_site_rules(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as browser:
        r = await browser.post("/v1/session", json={"key": "ek_" + "1" * 12 + "_" + "x" * 43})
        assert r.status_code == 422 and r.json()["field"] == "key"
        r = await browser.post("/v1/session", json={"key": TEST_ADMIN_KEY})
        assert r.status_code == 200
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Max-Age=" in cookie
        assert (await browser.get("/v1/session")).json()["scopes"] == ["admin"]
        assert (await browser.get("/v1/stats")).status_code == 200  # reads: the cookie is enough
        host = base.removeprefix("http://")
        # A state change carried by the cookie needs our own Origin.
        r = await browser.post("/v1/dead/retry", json={})
        assert r.status_code == 403 and r.json()["type"].endswith("/cross-site")
        r = await browser.post("/v1/dead/retry", json={}, headers={"Origin": "http://evil.test"})
        assert r.status_code == 403
        r = await browser.post("/v1/dead/retry", json={}, headers={"Origin": f"http://{host}"})
        assert r.status_code == 202
        assert (await browser.delete("/v1/session")).status_code == 204
        assert (await browser.get("/v1/stats")).status_code == 401  # the cookie is gone


async def test_websockets_need_a_key_and_see_their_tenant_only(base: str) -> None:
    ws_url = base.replace("http://", "ws://") + "/v1/events"
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url):
            pass
    assert info.value.status_code == 401
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as admin:
        acme = await _key(admin, scopes=["send", "events"], tenant="acme")
        zeta = await _key(admin, scopes=["send"], tenant="zeta")
        auth = [(b"authorization", acme["Authorization"].encode())]
        # A browser page of another site (Origin not this Host) is refused.
        evil = [*auth, (b"origin", b"http://evil.test")]
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(ws_url, extra_headers=[(b"cookie", b"x=1"), *evil]):
                pass
        assert info.value.status_code == 403
        async with open_websocket_url(ws_url + "?type=queued", extra_headers=auth) as ws:
            theirs = await admin.post("/v1/messages", json=MSG, headers=_headers(zeta))
            mine = await admin.post("/v1/messages", json=MSG, headers=_headers(acme))
            with trio.fail_after(5):
                events = json.loads(await ws.get_message())
        assert [e["id"] for e in events] == [mine.json()["id"]] != [theirs.json()["id"]]


async def test_an_unknown_host_is_421(base: str) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        for path in ("/v1", "/", "/v1/stats"):
            r = await c.get(path, headers={"Host": "attacker.example", **AUTH})
            assert r.status_code == 421 and r.json()["type"].endswith("/host-not-allowed")
        assert (await c.get("/v1", headers={"Host": "localhost:1"})).status_code == 200
        # Probes: a load balancer's health check names a Host of its own.
        for path in ("/healthz", "/readyz", "/metrics"):
            r = await c.get(path, headers={"Host": "lb"})
            assert r.status_code == 200, path


async def test_the_first_start_makes_an_admin_key_in_a_private_file(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    await _fresh(redis_server.url)
    bind = f"127.0.0.1:{free_port()}"
    key_file = tmp_path / "var" / "admin.key"
    settings = load_settings(
        environ={},
        overrides={"http": {"bind": bind}, "auth": {"admin_key_file": str(key_file)}},
    )
    from engine.service import run_engine

    async def start_once() -> Any:
        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            running = await nursery.start(
                lambda task_status: run_engine(
                    settings, redis_url=redis_server.url, smtp_url="smtp://unused:25",
                    transport=MemoryTransport(), handle_signals=False, stop=stop,
                    task_status=task_status,
                )
            )  # fmt: skip
            stop.set()
            return running.admin

    first = await start_once()
    key = key_file.read_text().strip()
    assert first.made == key and oct(os.stat(key_file).st_mode & 0o777) == "0o600"
    again = await start_once()  # finds the key: makes none, shows none
    assert again.made is None and again.file == str(key_file)
    async with open_redis(redis_server.url) as r:
        table = AccessTable(AccessStore(r, Keys()), refresh_s=1)
        await table.load()
        assert [k.kid for k in table.key_records()] == [key_id(key)]
        assert await table.authenticate(key) is not None


def test_the_keys_and_tenants_commands(redis_server: RedisServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    from fixtures.engine import EngineProcess

    trio.run(_fresh, redis_server.url)
    engine = EngineProcess(redis_server.url, "smtp://127.0.0.1:9", tmp_path, "--role", "api")
    env = {**os.environ, "ENGINE_URL": engine.base, "ENGINE_API_KEY": TEST_ADMIN_KEY}

    def cli(*argv: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "engine", *argv], env=env, capture_output=True, text=True,
            timeout=30, check=False,
        )  # fmt: skip
        assert (done.returncode == 0) == ok, (argv, done.stdout, done.stderr)
        return done

    try:
        made = cli("keys", "create", "--name", "billing app", "--scope", "send", "--tenant", "acme")
        key = made.stdout.strip()
        kid = key_id(key)
        assert kid is not None and "shown this once" in made.stderr
        listed = cli("keys", "list").stdout
        assert kid in listed and "billing app" in listed and key not in listed
        assert "acme: acme.com" in cli("tenants", "set", "acme", "--from", "acme.com").stdout
        assert "acme: acme.com" in cli("tenants", "list").stdout
        sent = cli("send", "--key", key, "--to", "a@b.org", "--from", "x@acme.com")
        assert len(sent.stdout.strip()) == 32
        cli("keys", "revoke", kid)
        refused = cli("send", "--key", key, "--to", "a@b.org", ok=False)
        assert "401" in refused.stderr
        generated = cli("keys", "generate").stdout.strip()
        assert key_id(generated) is not None and generated != key
        env.pop("ENGINE_API_KEY")
        env["ENGINE_AUTH__ADMIN_KEY_FILE"] = str(tmp_path / "none.key")
        assert "wants an API key" in cli("keys", "list", ok=False).stderr
    finally:
        engine.stop()


def test_forwarded_for_is_read_across_lines_behind_trusted_ranges() -> None:
    from engine.api.exchange import Request
    from engine.api.ingest import TrustedProxies, client_address

    async def nothing() -> dict[str, Any]:
        return {}

    def req(peer: str, *xff: bytes) -> Request:
        headers = [(b"x-forwarded-for", line) for line in xff]
        return Request({"client": (peer, 5000), "headers": headers}, nothing, {})

    lbs = TrustedProxies(["10.0.0.0/8", "fd00::/8", "192.168.1.7"])
    assert "10.2.3.4" in lbs and "fd00::1" in lbs and "192.168.1.8" not in lbs
    assert "not an ip" not in lbs
    # Two header lines are one list: the last line's hops are the nearest.
    assert client_address(req("10.0.0.1", b"6.6.6.6", b"1.2.3.4, 10.9.9.9"), lbs) == "1.2.3.4"
    assert client_address(req("192.168.1.7", b"fd00::2, 2001:db8::5"), lbs) == "2001:db8::5"
    assert client_address(req("9.9.9.9", b"1.2.3.4"), lbs) == "9.9.9.9"  # untrusted peer
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(environ={}, overrides={"ingest": {"trusted_proxies": ["10.0.0.0/33"]}})
    # A batch's size is bounded whatever the settings (its recipients are: 10,000).
    with pytest.raises(ConfigError, match="max_batch_messages"):
        load_settings(environ={}, overrides={"http": {"max_batch_messages": 20_000}})


async def test_a_batch_s_recipients_are_bounded_together(base: str) -> None:
    many = [f"r{i}@example.com" for i in range(100)]
    batch = {"messages": [{**MSG, "to": many}] * 101}  # 10,100 recipients > 10,000
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as c:
        r = await c.post("/v1/messages/batch", json=batch)
        assert r.status_code == 422 and r.json()["field"] == "messages"
        assert "max_batch_recipients" in r.json()["detail"]
        ok = await c.post("/v1/messages/batch", json={"messages": [{**MSG, "to": many}] * 100})
        assert ok.status_code == 202


async def test_the_client_rate_counts_recipients_not_requests(redis_server: RedisServer) -> None:
    await _fresh(redis_server.url)
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={},
        overrides={"http": {"bind": bind}, "ingest": {"client_rate_per_s": 1, "client_burst": 5}},
    )
    async with (
        inprocess_engine(settings, redis_server.url, MemoryTransport()),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as c,
    ):
        four = {**MSG, "to": ["a@example.com", "b@example.com"], "cc": ["c@example.com"],
                "bcc": ["d@example.com"]}  # fmt: skip
        first = await c.post("/v1/messages", json=four)
        assert first.status_code == 202 and first.headers["ratelimit-remaining"] == "1"
        two = await c.post("/v1/messages", json={**MSG, "to": ["e@example.com", "f@example.com"]})
        assert two.status_code == 429  # 2 recipients, 1 token left
        batch = {"messages": [{**MSG, "to": [f"r{i}@example.com" for i in range(6)]}]}
        r = await c.post("/v1/messages/batch", json=batch)
        assert r.status_code == 429 and "6 recipients at once" in r.json()["detail"]
