"""DKIM: composed mail signed (RSA and Ed25519, relaxed/relaxed) and verified with
dkimpy, the reference implementation, DNS stubbed through its ``dnsfunc`` hook -- the
8bit form and each 7-bit fallback form; tampering fails; the canonical forms equal
dkimpy's; keys from the settings (checked at load) and from /v1/domains over real HTTP
(the DNS record shown, never the private key), through Redis to the senders' cache."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import dkim
import httpx
import msgspec
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import Settings, load_settings
from engine.domainkeys import DnsRecord, DomainRecord, generate_private_key
from engine.embedded import RedisServer, free_port
from engine.errors import ConfigError
from engine.keys import Keys
from engine.models import Message
from engine.queue import DomainStore, Redis, open_redis
from engine.sender import Signer
from engine.transport import DkimKey, OutgoingMail, compose, dkim_sign
from engine.transport.dkim import canonical_body
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

JOB = "01J0000000000000000000ABCD"
NOW = 1_700_000_000.0
_PEMS = {alg: generate_private_key(alg) for alg in ("rsa-sha256", "ed25519-sha256")}
ALGORITHMS = list(_PEMS)


def key_of(algorithm: str, domain: str = "example.org", selector: str = "s1") -> DkimKey:
    return DkimKey(domain, selector, algorithm, _PEMS[algorithm])  # type: ignore[arg-type]


def dns_of(*records: DnsRecord) -> Callable[..., bytes | None]:
    """dkimpy's documented DNS hook: the TXT record of a name, or None."""
    by_name = {r.name: r.value.encode() for r in records}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return by_name.get(name.decode().rstrip("."))

    return lookup


def message(**overrides: Any) -> Message:
    fields: dict[str, Any] = dict(
        sender="Ann <ann@example.org>", to=["bob@example.com"], cc=[], bcc=[],
        subject="Your receipt", text="Hello Bob,\n\nthanks  for\tyour order.  \n\n\n",
        html=None, headers=[], reply_to=[], tags=[],
    )  # fmt: skip
    fields.update(overrides)
    return Message(**fields)


def composed(**overrides: Any) -> OutgoingMail:
    return compose(JOB, message(**overrides), message_id_domain="example.org", now=NOW)


def verify(data: bytes, key: DkimKey) -> bool:
    return bool(dkim.verify(data, dnsfunc=dns_of(key.dns_record())))


def signature_tags(data: bytes) -> dict[str, str]:
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    field = head.split("\r\nFrom:", 1)[0].removeprefix("DKIM-Signature:")
    tags = (t.strip().split("=", 1) for t in field.replace("\r\n", "").split(";") if t.strip())
    return {k.strip(): v.replace(" ", "") for k, v in tags}


# -- signing ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ascii_mail_is_signed_and_verifies(algorithm: str) -> None:
    key = key_of(algorithm)
    mail = composed(
        cc=["Cy <cy@example.net>"], reply_to=["help@example.org"],
        headers=[("List-Unsubscribe", "<https://example.org/u/1>"),
                 ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")],
    )  # fmt: skip
    signed = dkim_sign(mail, {"example.org": key}, now=NOW)
    assert signed.data.startswith(b"DKIM-Signature: ") and signed.data.endswith(mail.data)
    assert verify(signed.data, key)
    tags = signature_tags(signed.data)
    assert (tags["v"], tags["a"], tags["c"], tags["d"], tags["s"], tags["t"]) == (
        "1", algorithm, "relaxed/relaxed", "example.org", "s1", str(int(NOW)),
    )  # fmt: skip
    signed_names = tags["h"].split(":")
    # Each present field of the set once more than it occurs (oversigned); never Bcc
    # or the engine's own job id.
    for name in (
        "from",
        "to",
        "cc",
        "reply-to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "content-type",
        "list-unsubscribe",
        "list-unsubscribe-post",
    ):
        assert signed_names.count(name) == 2, name  # fmt: skip
    assert "x-engine-job-id" not in signed_names and "bcc" not in signed_names
    assert max(map(len, signed.data.split(b"\r\n"))) <= 78


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_8bit_mail_and_each_fallback_form_verify(algorithm: str) -> None:
    """UTF-8 headers and an 8bit body: the best form and every 7-bit stand-in a server
    may get (their own signatures: the bodies and headers differ)."""
    key = key_of(algorithm)
    mail = composed(
        sender="Jürgen <juergen@example.org>", to=["Bob <bob@bücher.example>"],
        subject="Grüße", text="Grüße aus München\n", html="<p>Grüße</p>\n",
    )  # fmt: skip
    assert mail.needs_8bitmime and mail.needs_smtputf8 and mail.fallback is not None
    signed = dkim_sign(mail, {"example.org": key}, now=NOW)
    assert verify(signed.data, key)
    forms = set()
    for extensions in ({"8BITMIME", "SMTPUTF8"}, {"8BITMIME"}, {"SMTPUTF8"}, set()):
        form = signed.for_server(extensions)
        assert isinstance(form, OutgoingMail), form
        assert form.data.count(b"DKIM-Signature:") == 1
        assert verify(form.data, key), extensions
        assert form.data == signed.data_for(extensions)  # the same signature asked twice
        forms.add(form.data)
        if not extensions:
            assert form.data.isascii() and b"Content-Transfer-Encoding: 8bit" not in form.data
    assert len(forms) == 4


def test_the_envelope_only_form_keeps_the_signature() -> None:
    """An IDN address in Bcc only: the 7-bit form differs in the envelope alone."""
    key = key_of("ed25519-sha256")
    signed = dkim_sign(composed(bcc=["zoe@bücher.example"]), {"example.org": key})
    form = signed.for_server(set())
    assert isinstance(form, OutgoingMail) and form.data == signed.data
    assert form.recipients[-1] == "zoe@xn--bcher-kva.example"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tampering_fails(algorithm: str) -> None:
    key = key_of(algorithm)
    signed = dkim_sign(composed(), {"example.org": key}).data
    assert verify(signed, key)
    assert not verify(signed.replace(b"thanks", b"thank"), key)  # body
    assert not verify(signed.replace(b"Subject: Your receipt", b"Subject: Your invoice"), key)
    added = signed.replace(b"\r\nTo: ", b"\r\nFrom: mallory@evil.example\r\nTo: ")
    assert not verify(added, key)  # a second From: oversigned
    other = DkimKey("example.org", "s1", algorithm, generate_private_key(algorithm))  # type: ignore[arg-type]
    assert not dkim.verify(signed, dnsfunc=dns_of(other.dns_record()))  # another key
    # Whitespace a relay may change is what relaxed canonicalisation forgives.
    assert verify(signed.replace(b"Subject: Your receipt", b"Subject:  Your   receipt"), key)


def test_only_mail_from_a_domain_with_a_key_is_signed() -> None:
    mail = composed(sender="ann@example.com")
    keys = {"example.org": key_of("ed25519-sha256")}
    assert dkim_sign(mail, keys) is mail
    assert dkim_sign(mail, {}) is mail
    # A subdomain without its own key is signed with its parent's (DMARC relaxed
    # alignment); a bare top-level domain never is.
    sub = dkim_sign(composed(sender="Ann <ann@mail.example.org>"), keys)
    assert signature_tags(sub.data)["d"] == "example.org" and verify(sub.data, keys["example.org"])
    assert (
        dkim_sign(composed(sender="ann@example.org"), {"org": keys["example.org"]}).data[:4]
        != b"DKIM"
    )
    # The From header decides, not the envelope: a display name with an @ is no address.
    tricky = dkim_sign(composed(sender='"x@example.com" <ann@example.org>'), keys)
    assert signature_tags(tricky.data)["d"] == "example.org"


def test_an_idn_from_domain_signs_with_its_a_label_key() -> None:
    key = key_of("ed25519-sha256", domain="bücher.example")
    assert key.domain == "xn--bcher-kva.example"
    signed = dkim_sign(composed(sender="ann@bücher.example"), {key.domain: key})
    assert signature_tags(signed.data)["d"] == "xn--bcher-kva.example"
    assert verify(signed.data, key)


_WSP_TEXT = st.text(alphabet=st.sampled_from(list("ab \t-é\r\n")), max_size=80)


@settings(max_examples=300, deadline=None)
@given(_WSP_TEXT)
def test_canonical_body_equals_dkimpys(text: str) -> None:
    body = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n").encode()
    assert canonical_body(body) == Relaxed.canonicalize_body(body)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["Subject", "TO", "X-Extra"]), _WSP_TEXT),
                min_size=1, max_size=4), _WSP_TEXT)  # fmt: skip
def test_signatures_verify_whatever_the_whitespace(
    headers: list[tuple[str, str]], body: str
) -> None:
    """Odd spacing, folds and tabs in header fields and the body: dkimpy agrees."""
    key = key_of("ed25519-sha256")
    lines = [f"{name}: {_folded(value)}" for name, value in headers]
    crlf_body = body.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    data = ("From: ann@example.org\r\n" + "\r\n".join(lines) + "\r\n\r\n" + crlf_body).encode()
    signed = dkim_sign(
        OutgoingMail(JOB, "ann@example.org", ["b@x.org"], data), {"example.org": key}
    )
    assert verify(signed.data, key)


def _folded(value: str) -> str:
    """A header value with no bare CR/LF: line breaks become folds."""
    value = value.replace("\r", "").strip("\n")
    return "\r\n ".join(p for p in value.split("\n")) or "x"


def test_private_keys_show_in_no_repr() -> None:
    pem = _PEMS["rsa-sha256"]
    secret = pem.decode().splitlines()[1]
    key = key_of("rsa-sha256")
    mail = dkim_sign(composed(text="Grüße\n"), {"example.org": key})
    record = DomainRecord("example.org", "s1", "rsa-sha256", pem.decode())
    for shown in (repr(key), str(key), repr(mail), repr(record), str(record)):
        assert secret not in shown and "PRIVATE" not in shown, shown
    assert "***" in repr(key) and "***" in repr(record)


# -- settings --------------------------------------------------------------------------


def _write_key(tmp_path: Path, algorithm: str, name: str = "k.pem") -> str:
    path = tmp_path / name
    path.write_bytes(_PEMS[algorithm])
    return str(path)


def _dkim_settings(*keys: dict[str, Any]) -> Settings:
    return load_settings(environ={}, overrides={"dkim": {"keys": list(keys)}})


def test_settings_keys_are_checked_at_load(tmp_path: Path) -> None:
    rsa_file = _write_key(tmp_path, "rsa-sha256")
    ed_file = _write_key(tmp_path, "ed25519-sha256", "ed.pem")
    ok = _dkim_settings(
        {"domain": "Example.ORG", "selector": "s1", "private_key_file": rsa_file},
        {"domain": "example.net", "selector": "ed", "algorithm": "ed25519",
         "private_key_file": ed_file},
    )  # fmt: skip
    signer = Signer.from_settings(ok.dkim, None)
    assert sorted(signer.keys()) == ["example.net", "example.org"]
    assert signer.keys()["example.net"].algorithm == "ed25519-sha256"
    # Through the environment too (JSON), as every section.
    env = {"ENGINE_DKIM__KEYS": json.dumps([{"domain": "example.org", "selector": "s1",
                                              "private_key_file": rsa_file}])}  # fmt: skip
    assert load_settings(environ=env).dkim.keys[0].domain == "example.org"

    encrypted = tmp_path / "enc.pem"
    encrypted.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )  # fmt: skip
    ec_file = tmp_path / "ec.pem"
    ec_file.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )  # fmt: skip
    cases = [
        ({"domain": "localhost"}, "dkim.keys[0].domain"),
        ({"domain": "bad domain.org"}, "dkim.keys[0].domain"),
        ({"selector": "no_underscores"}, "dkim.keys[0].selector"),
        ({"algorithm": "dsa"}, "dkim.keys[0].algorithm"),
        ({"algorithm": "ed25519"}, "dkim.keys[0].private_key_file: " + repr(rsa_file)
         + ": the key is for rsa-sha256, not ed25519-sha256"),
        ({"private_key_file": str(tmp_path / "missing.pem")},
         "dkim.keys[0].private_key_file: cannot read"),
        ({"private_key_file": str(encrypted)}, "is encrypted"),
        ({"private_key_file": str(ec_file)}, "an RSA or Ed25519 key is needed"),
        ({"private_key_file": str(tmp_path)}, "dkim.keys[0].private_key_file: cannot read"),
    ]  # fmt: skip
    for change, expected in cases:
        entry = {"domain": "example.org", "selector": "s1", "private_key_file": rsa_file, **change}
        with pytest.raises(ConfigError, match=None) as caught:
            _dkim_settings(entry)
        assert expected in str(caught.value), (change, str(caught.value))
    with pytest.raises(ConfigError, match=r"dkim\.keys\[1\]\.domain: example\.org has another"):
        entry = {"domain": "example.org", "selector": "s1", "private_key_file": rsa_file}
        _dkim_settings(entry, {**entry, "domain": "EXAMPLE.org."})
    with pytest.raises(ConfigError, match=r"dkim\.keys"):  # a required field missing
        _dkim_settings({"domain": "example.org", "selector": "s1"})


# -- the senders' cache ------------------------------------------------------------------


def test_key_names() -> None:
    keys = Keys("mail", 0)
    assert (keys.dkim_domains, keys.dkim_version) == (
        "{mail:0}:dkim:domains",
        "{mail:0}:dkim:version",
    )


async def test_signer_follows_the_store_and_prefers_the_settings(redis: Redis) -> None:
    store = DomainStore(redis, Keys())
    configured = key_of("rsa-sha256", domain="example.net", selector="file")
    signer = Signer({configured.domain: configured}, store, refresh_s=0.05, rsa_in_thread=True)
    ed = key_of("ed25519-sha256")

    def record(domain: str, selector: str) -> bytes:
        return msgspec.json.encode(
            DomainRecord(domain, selector, "ed25519-sha256", _PEMS["ed25519-sha256"].decode())
        )

    async with trio.open_nursery() as nursery:
        await nursery.start(signer.serve)
        assert signer.statistics().domains == 1 and signer.version == 0
        await store.put("example.org", record("example.org", "s1"))
        await store.put("example.net", record("example.net", "api"))  # the file's wins
        await store.put("broken.example", b"{not json")  # skipped, logged
        with trio.fail_after(5):
            while signer.statistics().domains < 2:
                await trio.sleep(0.01)
        assert signer.keys()["example.net"].selector == "file"
        signed = await signer.sign(composed())
        assert verify(signed.data, ed)
        rsa_signed = await signer.sign(composed(sender="ann@example.net"))  # in a thread
        assert verify(rsa_signed.data, configured)
        plain = composed(sender="ann@elsewhere.example")
        assert await signer.sign(plain) is plain
        assert signer.statistics().signed == 2 and signer.statistics().failed == 0
        # A claimed batch: in order, the RSA ones through one thread hop.
        batch = [composed(sender="ann@example.net"), plain, composed()]
        out = await signer.sign_many(batch)
        assert out[1] is plain and verify(out[0].data, configured) and verify(out[2].data, ed)
        assert [m.job_id for m in out] == [m.job_id for m in batch]
        await store.delete("example.org")
        with trio.fail_after(5):
            while "example.org" in signer.keys():  # noqa: SIM118
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


# -- /v1/domains over HTTP ----------------------------------------------------------------


@pytest.fixture
async def api(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[str]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    file_key = {"domain": "example.net", "selector": "file",
                "private_key_file": _write_key(tmp_path, "rsa-sha256")}  # fmt: skip
    settings = load_settings(
        environ={}, overrides={"http": {"bind": bind}, "dkim": {"keys": [file_key]}}
    )
    async with inprocess_engine(settings, redis_server.url, MemoryTransport()):
        yield f"http://{bind}"


def _no_private_key(response: httpx.Response) -> None:
    assert "PRIVATE KEY" not in response.text and "private_key" not in response.text


async def test_domains_api_creates_lists_and_deletes(api: str, redis_server: RedisServer) -> None:
    async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30) as c:
        made = await c.post("/v1/domains", json={"domain": "Example.ORG"})
        assert made.status_code == 201, made.text
        _no_private_key(made)
        view = made.json()
        assert made.headers["location"] == "/v1/domains/example.org"
        assert (view["domain"], view["selector"], view["algorithm"], view["source"]) == (
            "example.org", "engine", "rsa-sha256", "api",
        )  # fmt: skip
        dns = view["dns"]
        assert dns["name"] == "engine._domainkey.example.org" and dns["type"] == "TXT"
        assert dns["value"].startswith("v=DKIM1; k=rsa; p=MIIBIjAN")  # SPKI of RSA 2048
        assert "".join(dns["strings"]) == dns["value"] and max(map(len, dns["strings"])) <= 255

        ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()  # fmt: skip
        given = await c.post(
            "/v1/domains", json={"domain": "mail.example.com", "selector": "ed1",
                                 "private_key": ed_pem},
        )  # fmt: skip
        assert given.status_code == 201, given.text
        _no_private_key(given)
        assert given.json()["algorithm"] == "ed25519-sha256"
        assert given.json()["dns"]["value"].startswith("v=DKIM1; k=ed25519; p=")
        again = await c.post("/v1/domains", json={"domain": "mail.example.com",
                                                  "algorithm": "ed25519"})  # fmt: skip
        assert again.status_code == 200 and again.json()["selector"] == "engine"  # replaced

        listed = await c.get("/v1/domains")
        _no_private_key(listed)
        items = listed.json()["items"]
        assert [(i["domain"], i["source"]) for i in items] == [
            ("example.net", "settings"), ("example.org", "api"), ("mail.example.com", "api"),
        ]  # fmt: skip
        got = await c.get("/v1/domains/EXAMPLE.org")
        assert got.status_code == 200 and got.json()["dns"] == dns
        _no_private_key(got)

        # The senders' cache reads what the API stored, and the record shown verifies it.
        async with open_redis(redis_server.url) as r:
            signer = Signer(None, DomainStore(r, Keys()))
            await signer.load()
        signed = await signer.sign(composed())
        record = DnsRecord(dns["name"], "TXT", dns["value"], dns["strings"])
        assert dkim.verify(signed.data, dnsfunc=dns_of(record))

        refusals = [
            ({"domain": "nodot"}, "domain"),
            ({"domain": "example.org", "selector": "a b"}, "selector"),
            ({"domain": "example.org", "algorithm": "dsa"}, "algorithm"),
            ({"domain": "example.org", "private_key": "-----BEGIN PRIVATE KEY-----\nxx"},
             "private_key"),
            ({"domain": "example.org", "algorithm": "rsa", "private_key": ed_pem},
             "private_key"),
        ]  # fmt: skip
        for body, field in refusals:
            answer = await c.post("/v1/domains", json=body)
            assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
        assert (await c.post("/v1/domains", json={"domain": "example.net"})).status_code == 409
        assert (await c.delete("/v1/domains/example.net")).status_code == 409

        assert (await c.delete("/v1/domains/example.org")).status_code == 204
        assert (await c.delete("/v1/domains/example.org")).status_code == 404
        assert (await c.get("/v1/domains/example.org")).status_code == 404
        assert (await c.get("/v1/domains/not a domain")).status_code == 404

        spec = (await c.get("/openapi.json")).json()
        assert {"post", "get"} <= set(spec["paths"]["/v1/domains"])
        assert spec["paths"]["/v1/domains"]["post"]["x-scope"] == "admin"
        assert "private_key" not in json.dumps(spec["components"]["schemas"]["DomainView"])


async def test_only_an_all_tenants_admin_adds_domains(api: str) -> None:
    async with httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30) as c:
        made = await c.post("/v1/keys", json={"scopes": ["admin"], "tenant": "acme"})
        assert made.status_code == 201, made.text
        tenant_admin = {"Authorization": f"Bearer {made.json()['key']}"}
        refused = await c.post("/v1/domains", json={"domain": "acme.example"},
                               headers=tenant_admin)  # fmt: skip
        assert refused.status_code == 403, refused.text
        assert (await c.get("/v1/domains", headers=tenant_admin)).status_code == 200
        sender = await c.post("/v1/keys", json={"scopes": ["send"]})
        send_only = {"Authorization": f"Bearer {sender.json()['key']}"}
        assert (await c.get("/v1/domains", headers=send_only)).status_code == 403


async def test_mail_from_a_domain_goes_out_signed(redis_server: RedisServer) -> None:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={}, overrides={"http": {"bind": bind}, "dkim": {"refresh_s": 0.05}}
    )
    transport = MemoryTransport()
    async with (
        inprocess_engine(settings, redis_server.url, transport),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=30) as c,
    ):
        made = await c.post("/v1/domains", json={"domain": "example.org", "algorithm": "ed25519"})
        d = made.json()["dns"]
        await trio.sleep(0.3)  # a refresh
        for sender in ("ann@example.org", "ann@example.com"):
            msg = {"from": sender, "to": "b@example.net", "subject": "Hi", "text": "Hello"}
            sent = await c.post("/v1/messages", json=msg)
            assert sent.status_code == 202, sent.text
        with trio.fail_after(10):
            await transport.wait_sent(2)
        by_sender = {m.sender: m.data for m in transport.sent}
        record = DnsRecord(d["name"], "TXT", d["value"], d["strings"])
        assert dkim.verify(by_sender["ann@example.org"], dnsfunc=dns_of(record))
        assert b"DKIM-Signature" not in by_sender["ann@example.com"]
