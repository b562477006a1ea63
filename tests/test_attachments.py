"""Attachments (issue 15): every rule at the API (422 naming ``attachments[i].<field>``),
the MIME the composer writes, the blob store (stored once, expiry only ever raised, one
tenant's uploads not another's), and the whole way over real SMTP into the sink: inline
and uploaded attachments, one upload shared by many messages stored once, a blob gone
at send time failing as ``attachment-missing``, an upload never holding the loop."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from engine.api.exchange import error_field
from engine.attachments import (
    AttachmentLimits,
    AttachmentRef,
    BlobIndex,
    BlobInfo,
    clean_filename,
    content_type_for,
    sniff,
)
from engine.config import SmtpSettings, load_settings
from engine.embedded import RedisServer, SinkProcess, free_port
from engine.errors import ValidationError
from engine.http import ServerSettings
from engine.http.h1 import Requests, request_error
from engine.models import Message, MessageIn
from engine.queue import (
    BlobStore,
    ClaimedJob,
    Queue,
    decode_message,
    encode_message,
    new_job,
    open_redis,
)
from engine.sender import AttachmentCache
from engine.transport import MissingAttachment, SmtpPool, attachment_body, compose
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

JOB = "0190f0c2a7b84c5e8d3f2a1b0c9d8e7f"
LONG_NAME = "Überweisung \u2013 März 2026 \u2013 sehr langer Name, damit er umbricht.pdf"
PDF = b"%PDF-1.7\n" + bytes(range(256)) * 40
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)
JPEG = b"\xff\xd8\xff\xe0" + os.urandom(500)
GIF = b"GIF89a" + os.urandom(100)
ZIP = b"PK\x03\x04" + os.urandom(100)
_decode = msgspec.json.Decoder(MessageIn).decode


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(body: dict[str, Any], index: BlobIndex | None = None) -> Message:
    incoming = _decode(msgspec.json.encode(body))
    job = new_job(incoming, JOB, default_from="e@example.org", now_ms=0, blobs=index or BlobIndex())
    return decode_message(job.payload)


def refusal(body: dict[str, Any], index: BlobIndex | None = None) -> tuple[str, str]:
    """(field, detail) of the 422 ``body`` gets (decoder or normalize)."""
    try:
        stored(body, index)
    except msgspec.ValidationError as exc:
        return error_field(exc)
    except ValidationError as exc:
        return exc.field, exc.detail
    raise AssertionError("accepted")


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def files(msg: EmailMessage) -> list[tuple[str | None, str, bytes, str | None, str | None]]:
    """(filename, content type, bytes, Content-ID, disposition) of every non-text leaf."""
    out = []
    for part in msg.walk():
        if part.is_multipart() or part.get_content_disposition() is None:
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append(
            (part.get_filename(), part.get_content_type(), payload, part["Content-ID"],
             part.get_content_disposition())
        )  # fmt: skip
    return out


def message(**kw: Any) -> dict[str, Any]:
    return {"to": "ann@example.com", "subject": "Invoice", "text": "Attached.", **kw}


# -- the rules ---------------------------------------------------------------------------


def test_file_names_lose_their_directories_and_keep_their_letters() -> None:
    assert clean_filename("f", "C:\\Users\\ann\\Rechnung März.pdf") == "Rechnung März.pdf"
    assert clean_filename("f", "../../etc/passwd") == "passwd"
    assert clean_filename("f", "  report.pdf ") == "report.pdf"
    assert clean_filename("f", "e\u0301t\u00e9.txt") == "\u00e9t\u00e9.txt"  # NFC
    for bad in ("a\x00b.pdf", "a\nb.pdf", "a\x7fb", "invoice\u202efdp.exe", "x\u2028y"):
        with pytest.raises(ValidationError, match="control or format"):
            clean_filename("f", bad)
    for empty in ("", "  ", "dir/", "..", "a/.."):
        with pytest.raises(ValidationError, match="needs a file name"):
            clean_filename("f", empty)


def test_formats_are_told_by_their_first_bytes() -> None:
    assert [sniff(b) for b in (PDF, PNG, JPEG, GIF, ZIP, b"hello")] == [
        "pdf", "png", "jpeg", "gif", "zip", None,
    ]  # fmt: skip
    assert sniff(b"\xef\xbb\xbf junk %PDF-1.4") == "pdf"  # readers look past a little junk
    # No declared type: what the bytes are, else what the name says, else generic.
    assert content_type_for("t", None, PNG, "logo.bin") == "image/png"
    assert content_type_for("t", None, b"a,b\n", "data.csv") == "text/csv"
    assert content_type_for("t", None, b"xx", "noext") == "application/octet-stream"
    assert content_type_for("t", None, b"From: a", "m.eml") == "application/octet-stream"
    # A name that says PDF over bytes that are not: not claimed.
    assert content_type_for("t", None, b"plain", "fake.pdf") == "application/octet-stream"
    # Declared: kept (lower-cased) unless the bytes contradict it.
    assert content_type_for("t", "Application/PDF", PDF, "x") == "application/pdf"
    assert content_type_for("t", "application/vnd.ms-excel", PDF, "x") == "application/vnd.ms-excel"
    docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
    assert content_type_for("t", docx, ZIP, "a.docx") == docx
    with pytest.raises(ValidationError, match="a PDF file"):
        content_type_for("t", "image/png", PDF, "x.png")
    with pytest.raises(ValidationError, match="not one"):
        content_type_for("t", docx, b"plain text", "a.docx")


# Every rule: (the attachment, or the message's attachments, field named, words of detail).
RULES: list[tuple[Any, str, str]] = [
    ({"filename": "a\x07.pdf", "content": b64(PDF)}, "attachments[0].filename", "control"),
    ({"filename": "/tmp/", "content": b64(PDF)}, "attachments[0].filename", "file name"),
    ({"filename": "x" * 256, "content": b64(PDF)}, "attachments[0].filename", "length"),
    ({"filename": "a.pdf"}, "attachments[0].content", "one of them"),
    ({"filename": "a.pdf", "content": b64(PDF), "attachment_id": sha(PDF)},
     "attachments[0].content", "one of them"),
    ({"filename": "a.pdf", "content": "not base64!"}, "attachments[0].content", "base64"),
    ({"filename": "a.pdf", "content": ""}, "attachments[0].content", "at least one byte"),
    ({"filename": "a.pdf", "content": b64(b"x" * 1001)}, "attachments[0].content",
     "attachments.max_bytes"),
    ([{"filename": f"{i}.bin", "content": b64(bytes([i]) * 600)} for i in range(2)],
     "attachments[1].content", "attachments.max_message_bytes"),
    ({"filename": "a.pdf", "attachment_id": "nothex"}, "attachments[0].attachment_id", "64 hex"),
    ({"filename": "a.pdf", "attachment_id": "0" * 64}, "attachments[0].attachment_id",
     "no such attachment"),
    ({"filename": "a.pdf", "content": b64(PDF), "content_type": "pdf"},
     "attachments[0].content_type", "type/subtype"),
    ({"filename": "a.pdf", "content": b64(PDF), "content_type": "application/pdf; x=1"},
     "attachments[0].content_type", "type/subtype"),
    ({"filename": "a.eml", "content": b64(b"From: x"), "content_type": "message/rfc822"},
     "attachments[0].content_type", "cannot be attached"),
    ({"filename": "a.png", "content": b64(PDF), "content_type": "image/png"},
     "attachments[0].content_type", "does not match"),
    ({"filename": "a.png", "content": b64(PNG), "content_id": "logo@@x"},
     "attachments[0].content_id", "dot-atoms"),
    ({"filename": "a.png", "content": b64(PNG), "content_id": "a b"},
     "attachments[0].content_id", "dot-atoms"),
    ([{"filename": "a.png", "content": b64(PNG), "content_id": "logo"},
      {"filename": "b.png", "content": b64(PNG), "content_id": "<logo>"}],
     "attachments[1].content_id", "another attachment"),
    ({"filename": "a.pdf", "content": b64(PDF), "disposition": "attachement"},
     "attachments[0].disposition", "enum"),
    ([{"filename": "a.txt", "content": b64(b"x")}] * 21, "attachments", "length"),
    ({"filename": "a.pdf", "content": b64(PDF), "size": 3}, "attachments[0].size", "unknown"),
]  # fmt: skip
SMALL = AttachmentLimits(max_bytes=1000, max_message_bytes=1000)


@pytest.mark.parametrize(("given", "field", "words"), RULES)
def test_every_rule_names_its_field(given: Any, field: str, words: str) -> None:
    items = given if isinstance(given, list) else [given]
    limits = SMALL if "max_" in words else AttachmentLimits()
    got_field, detail = refusal(message(attachments=items), BlobIndex(limits=limits))
    assert got_field == field, detail
    assert words in detail


def test_a_message_keeps_references_and_the_index_the_bytes() -> None:
    index = BlobIndex()
    msg = stored(
        message(
            html="<img src='cid:logo@acme'>",
            attachments=[
                {"filename": "../invoice.pdf", "content": b64(PDF)},
                {"filename": "logo.png", "content": b64(PNG), "content_id": "<logo@acme>"},
                {"filename": "copy.pdf", "content": b64(PDF), "disposition": "inline"},
            ],
        ),
        index,
    )
    pdf, logo, copy = msg.attachments
    assert pdf == AttachmentRef(
        hashlib.sha256(PDF).digest(), len(PDF), "invoice.pdf", "application/pdf", None, False
    )
    assert (logo.content_id, logo.inline, logo.content_type) == ("logo@acme", True, "image/png")
    assert copy.inline and copy.sha256 == pdf.sha256
    assert index.inline == {sha(PDF): PDF, sha(PNG): PNG}  # each content once
    assert list(index.used) == [sha(PDF), sha(PNG)]
    # The stored form holds 32 bytes a reference, not the content.
    assert len(encode_message(msg)) < 400


def test_uploaded_ids_are_checked_against_what_was_looked_up() -> None:
    index = BlobIndex({sha(PNG): BlobInfo(len(PNG), PNG[:1024])})
    msg = stored(
        message(attachments=[{"filename": "l.png", "attachment_id": sha(PNG).upper()}]), index
    )
    assert msg.attachments[0].size == len(PNG) and msg.attachments[0].content_type == "image/png"
    assert index.inline == {} and list(index.used) == [sha(PNG)]
    field, detail = refusal(
        message(attachments=[{"filename": "l.pdf", "attachment_id": sha(PNG),
                              "content_type": "application/pdf"}]),
        BlobIndex({sha(PNG): BlobInfo(len(PNG), PNG[:1024])}),
    )  # fmt: skip
    assert field == "attachments[0].content_type" and "a PNG file" in detail


def test_attachments_are_refused_where_nothing_would_store_them() -> None:
    incoming = _decode(
        msgspec.json.encode(message(attachments=[{"filename": "a", "content": "eA=="}]))
    )
    with pytest.raises(ValidationError, match="POST /v1/messages") as exc:
        new_job(incoming, JOB, default_from="e@example.org", now_ms=0)  # no index: schedules
    assert exc.value.field == "attachments"


def test_records_stored_before_attachments_still_decode() -> None:
    old = msgspec.msgpack.encode(
        ["e@x.org", ["a@x.org"], [], [], "s", "t", None, [], [], [], None, None]
    )
    assert decode_message(old).attachments == []


def test_the_http_parser_gives_listed_paths_their_own_body_limit() -> None:
    settings = ServerSettings(max_body_bytes=10, body_limits=(("/v1/attachments", 100),))

    def fed(path: bytes, body: bytes, chunked: bool = False) -> Requests:
        requests = Requests(settings)
        if chunked:
            head = b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            requests.feed(head + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
        else:
            head = b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
            requests.feed(head % len(body) + body)
        return requests

    ok = fed(b"/v1/attachments?filename=a", b"x" * 50)
    assert ok.error is None and request_error(ok.ready[0], ok.ready[0].max_body) is None
    over = fed(b"/v1/attachments", b"x" * 101)
    assert request_error(over.ready[0], over.ready[0].max_body) == (
        413, "request body larger than 100 bytes",
    )  # fmt: skip
    assert fed(b"/v1/messages", b"x" * 11, chunked=True).error == (
        413, "request body larger than 10 bytes",
    )  # fmt: skip
    assert fed(b"/v1/attachments", b"x" * 101, chunked=True).error is not None


# -- composing ---------------------------------------------------------------------------


def test_the_mime_tree_puts_cid_parts_next_to_the_html_and_lists_the_rest() -> None:
    index = BlobIndex()
    msg = stored(
        message(
            html="<p>Hi <img src='cid:logo'></p>",
            attachments=[
                {"filename": LONG_NAME, "content": b64(PDF)},
                {"filename": "logo.png", "content": b64(PNG), "content_id": "logo"},
                {"filename": 'say "hi".txt', "content": b64(b"hi\r\n")},
            ],
        ),
        index,
    )  # fmt: skip
    bodies = {bytes.fromhex(k): attachment_body(v) for k, v in index.inline.items()}
    out = compose(JOB, msg, message_id_domain="x.test", now=0, attachments=bodies)
    assert out.data.isascii() and out.fallback is None
    parsed = parse(out.data)
    assert parsed.get_content_type() == "multipart/mixed"
    alternative = parsed.get_payload()[0]
    assert [p.get_content_type() for p in alternative.get_payload()] == [
        "text/plain", "multipart/related",
    ]  # fmt: skip
    html = parsed.get_body(("html",))
    assert html is not None and html.get_content() == "<p>Hi <img src='cid:logo'></p>\r\n"
    assert files(parsed) == [
        ("logo.png", "image/png", PNG, "<logo>", "inline"),
        (msg.attachments[0].filename, "application/pdf", PDF, None, "attachment"),
        ('say "hi".txt', "text/plain", b"hi\r\n", None, "attachment"),
    ]
    lines = out.data.split(b"\r\n")
    assert max(map(len, lines)) <= 998
    # base64 in 76-character lines; the long non-ASCII name in RFC 2231 sections.
    assert b"\r\n\r\niVBORw0KGg" in out.data
    assert [x for x in lines if len(x) > 78] == []
    assert b"filename*0*=utf-8''%C3%9Cberweisung" in out.data


def test_cid_parts_without_html_are_listed_and_a_missing_blob_is_named() -> None:
    index = BlobIndex()
    msg = stored(message(attachments=[{"filename": "l.png", "content": b64(PNG),
                                       "content_id": "logo"}]), index)  # fmt: skip
    bodies = {bytes.fromhex(k): attachment_body(v) for k, v in index.inline.items()}
    parsed = parse(compose(JOB, msg, message_id_domain="x", now=0, attachments=bodies).data)
    assert parsed.get_content_type() == "multipart/mixed"
    assert files(parsed) == [("l.png", "image/png", PNG, "<logo>", "inline")]
    with pytest.raises(MissingAttachment, match=re.escape("attachment-missing: 'l.png'")):
        compose(JOB, msg, message_id_domain="x", now=0, attachments={})


def test_a_text_body_holding_a_boundary_is_quoted_printable() -> None:
    index = BlobIndex()
    text = f"--=_mix_{JOB}\r\nnot a part\r\n"
    msg = stored(message(text=text, attachments=[{"filename": "a", "content": b64(ZIP)}]), index)
    bodies = {bytes.fromhex(k): attachment_body(v) for k, v in index.inline.items()}
    parsed = parse(compose(JOB, msg, message_id_domain="x", now=0, attachments=bodies).data)
    assert parsed.get_body(("plain",)).get_content().replace("\r\n", "\n") == text.replace(
        "\r\n", "\n"
    )
    assert files(parsed)[0][2] == ZIP


# -- the sender's cache --------------------------------------------------------------------


async def test_the_cache_reads_a_shared_blob_once_and_stays_within_its_bytes(
    queue: Queue,
) -> None:
    store = BlobStore(queue.client, queue.keys, queue.settings)
    blobs = {sha(b): b for b in (PDF, PNG, GIF)}
    await store.hold([("t", i, b) for i, b in blobs.items()], 60)
    cache = AttachmentCache(store, max_bytes=len(attachment_body(PDF)) + len(attachment_body(GIF)))

    def job(*data: bytes) -> ClaimedJob:
        refs = [AttachmentRef(hashlib.sha256(d).digest(), len(d), "f", "x/y") for d in data]
        msg = Message("e@x.org", ["a@x.org"], [], [], "s", "t", None, [], [], [], attachments=refs)
        return ClaimedJob(JOB, encode_message(msg), 1)

    got = await cache.for_jobs([job(PDF), job(PDF, GIF), job(PDF)])
    assert got.bodies == {hashlib.sha256(d).digest(): attachment_body(d) for d in (PDF, GIF)}
    assert cache.statistics().fetched == 2 and cache.statistics().hits == 0
    await cache.for_jobs([job(PDF, GIF)])
    assert cache.statistics().hits == 2
    await cache.for_jobs([job(PNG)])  # PNG in, the least recently used (PDF) out
    s = cache.statistics()
    assert s.cached == 2 and s.cached_bytes <= cache.max_bytes
    # Gone from Redis: not found, counted; Redis down: unavailable (not "missing").
    await queue.client.delete([queue.keys.blob(sha(JPEG))])
    got = await cache.for_jobs([job(JPEG)])
    assert got.bodies == {} and not got.unavailable and cache.statistics().missing == 1
    _, bounce = got.failure(MissingAttachment(AttachmentRef(b"\0" * 32, 1, "f", "x/y")))
    assert bounce is not None and bounce.cls == "attachment-missing"


async def test_blobs_are_written_once_and_their_expiry_only_ever_rises(queue: Queue) -> None:
    store = BlobStore(queue.client, queue.keys, queue.settings)
    i = sha(PDF)
    assert await store.hold([("acme", i, PDF)], 100) == []
    assert 99 <= await store.ttl_s(i) <= 100
    await store.hold([("acme", i, b"")], 50)  # lower: unchanged
    assert await store.ttl_s(i) > 90
    await store.hold([("zeta", i, PDF)], 500)  # another tenant's copy: stored once
    assert 499 <= await store.ttl_s(i) <= 500
    assert await queue.client.get(queue.keys.blob(i)) == PDF
    assert await store.hold([("acme", i, b"")], 0) == []  # for ever
    assert await store.ttl_s(i) == -1
    assert await store.hold([("acme", sha(PNG), b"")], 10) == [("acme", sha(PNG))]
    # Each tenant sees the blobs it gave, none of another's.
    assert set(await store.look([("acme", i), ("zeta", i), ("other", i)])) == {
        ("acme", i), ("zeta", i),
    }  # fmt: skip
    day = 24 * 3600
    q = queue.settings
    keep = q.keep_failed_s
    assert store.keep_s(now_ms=0) == q.retry_for_s + keep
    assert store.keep_s(now_ms=0, due_ms=3600_000) == 3600 + q.retry_for_s + keep
    assert store.keep_s(now_ms=0, expires_ms=60_000) == 60 + keep
    assert store.keep_s(now_ms=0, retry_for_s=day * 3) == 3 * day + keep


# -- over HTTP and real SMTP ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    work = tmp_path_factory.mktemp("sink")
    with SinkProcess(workdir=work, maildir=work / "maildir") as s:
        yield s


@dataclass
class Env:
    client: httpx.AsyncClient
    sink: SinkProcess
    queue: Queue
    maildir: Path

    async def final(self, job_id: str) -> dict[str, Any]:
        with trio.fail_after(15):
            while True:
                body: dict[str, Any] = (await self.client.get(f"/v1/messages/{job_id}")).json()
                if body["state"] in ("sent", "failed"):
                    return body
                await trio.sleep(0.02)

    async def mail(self, job_id: str) -> EmailMessage:
        """The message as the sink kept it (the raw bytes of its Maildir file)."""
        with trio.fail_after(10):
            while True:
                for path in (self.maildir / "new").glob("*"):
                    data = path.read_bytes()
                    if f"X-Engine-Job-Id: {job_id}".encode() in data:
                        return parse(data)
                await trio.sleep(0.05)

    async def upload(self, data: bytes, **params: str) -> dict[str, Any]:
        octets = {"content-type": "application/octet-stream"}
        r = await self.client.post("/v1/attachments", content=data, params=params, headers=octets)
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    async def blob_keys(self) -> list[bytes]:
        return [k async for k in self.queue.client.scan_iter(match=self.queue.keys.blob("*"))]


@pytest.fixture
async def env(redis_server: RedisServer, sink: SinkProcess) -> AsyncIterator[Env]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={}, overrides={"http": {"bind": bind}, "attachments": {"max_bytes": 3 << 20}}
    )
    smtp = SmtpPool(SmtpSettings(starttls="never", command_timeout_s=5), sink.url)
    async with (
        inprocess_engine(settings, redis_server.url, smtp) as running,
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        yield Env(client, sink, running.queue, sink.workdir / "maildir")


async def test_an_inline_attachment_reaches_the_sink_byte_for_byte(env: Env) -> None:
    body = message(html="<img src='cid:logo'>", attachments=[
        {"filename": "Rechnung 04/2026 €.pdf", "content": b64(PDF)},
        {"filename": "logo.png", "content": b64(PNG), "content_id": "logo"},
    ])  # fmt: skip
    r = await env.client.post("/v1/messages", json=body)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    status = await env.final(job_id)
    assert status["state"] == "sent"
    # Asked, the status lists them (what the dashboard's lookup shows), in the order
    # given; the plain status poll does not read the stored message.
    assert "attachments" not in status
    r = await env.client.get(f"/v1/messages/{job_id}", params={"include": "attachments"})
    assert r.json()["attachments"] == [
        {"filename": "2026 €.pdf", "content_type": "application/pdf", "size": len(PDF),
         "inline": False, "content_id": None},
        {"filename": "logo.png", "content_type": "image/png", "size": len(PNG),
         "inline": True, "content_id": "logo"},
    ]  # fmt: skip
    got = files(await env.mail(job_id))
    assert got == [
        ("logo.png", "image/png", PNG, "<logo>", "inline"),
        ("2026 €.pdf", "application/pdf", PDF, None, "attachment"),  # "04/" was a directory
    ]
    # The job holds references; the bytes are in two blobs that outlive the job's keep.
    raw = await env.queue.client.hget(env.queue.keys.job(job_id), "msg")
    assert raw is not None and len(raw) < 500
    assert sorted(await env.blob_keys()) == sorted(
        env.queue.keys.blob(sha(b)).encode() for b in (PDF, PNG)
    )
    q = env.queue.settings
    assert (await BlobStore(env.queue.client, env.queue.keys).ttl_s(sha(PDF))) > (
        q.retry_for_s + q.keep_failed_s - 60
    )


async def test_an_upload_shared_by_many_messages_is_stored_once(env: Env) -> None:
    big = b"%PDF-1.4\n" + os.urandom(int(2.5 * 1024 * 1024))  # over http.max_body_bytes
    up = await env.upload(big, filename="C:\\docs\\terms.pdf")
    assert up == {"id": sha(big), "size": len(big), "content_type": "application/pdf",
                  "filename": "terms.pdf", "expires_in_s": 86400}  # fmt: skip
    store = BlobStore(env.queue.client, env.queue.keys)
    assert 86000 < await store.ttl_s(up["id"]) <= 86400
    again = await env.upload(big)  # the same bytes: the same id, nothing new stored
    assert again["id"] == up["id"]
    ref = {"filename": "terms.pdf", "attachment_id": up["id"]}
    batch = [message(to=f"u{i}@example.com", attachments=[ref]) for i in range(5)]
    r = await env.client.post("/v1/messages/batch", json={"messages": batch})
    assert r.status_code == 202, r.text
    single = await env.client.post(
        "/v1/messages", json=message(attachments=[ref], delay_s=0.2, retry_for_s=3 * 86400)
    )
    assert single.status_code == 202, single.text
    ids = [*r.json()["ids"], single.json()["id"]]
    # Named by jobs: kept for the longest of them (3 days of retries, then its record).
    assert await store.ttl_s(up["id"]) > 3 * 86400 + env.queue.settings.keep_failed_s - 60
    for job_id in ids:
        assert (await env.final(job_id))["state"] == "sent"
        assert files(await env.mail(job_id)) == [
            ("terms.pdf", "application/pdf", big, None, "attachment")
        ]
    assert await env.blob_keys() == [env.queue.keys.blob(up["id"]).encode()]


async def test_a_blob_gone_at_send_time_fails_for_good_as_attachment_missing(env: Env) -> None:
    up = await env.upload(PNG, filename="logo.png")
    r = await env.client.post(
        "/v1/messages",
        json=message(delay_s=0.5, attachments=[{"filename": "l.png", "attachment_id": up["id"]}]),
    )
    assert r.status_code == 202, r.text
    await env.queue.client.delete([env.queue.keys.blob(up["id"])])  # e.g. deleted by hand
    rec = await env.final(r.json()["id"])
    assert (rec["state"], rec["bounce"], rec["attempts"]) == ("failed", "attachment-missing", 1)
    assert (
        rec["last_error"].startswith("attachment-missing: 'l.png'")
        and up["id"] in rec["last_error"]
    )


async def test_another_tenants_upload_cannot_be_named(env: Env) -> None:
    made = await env.client.post("/v1/keys", json={"scopes": ["send", "read"], "tenant": "zeta"})
    zeta = {"Authorization": f"Bearer {made.json()['key']}"}
    up = await env.upload(GIF, filename="a.gif")  # the admin key's tenant
    r = await env.client.post(
        "/v1/messages", headers=zeta,
        json=message(attachments=[{"filename": "a.gif", "attachment_id": up["id"]}]),
    )  # fmt: skip
    assert r.status_code == 422 and r.json()["field"] == "attachments[0].attachment_id"
    assert "no such attachment" in r.json()["detail"]


HTTP_RULES: list[tuple[Any, str]] = [
    ({"filename": "a\x01", "content": b64(PDF)}, "attachments[0].filename"),
    ({"filename": "a.pdf", "content": "%%%"}, "attachments[0].content"),
    ({"filename": "a.pdf"}, "attachments[0].content"),
    ({"filename": "a.pdf", "content": ""}, "attachments[0].content"),
    ({"filename": "a.pdf", "attachment_id": "f" * 64}, "attachments[0].attachment_id"),
    ({"filename": "a.pdf", "attachment_id": "xyz"}, "attachments[0].attachment_id"),
    ({"filename": "a.png", "content": b64(JPEG), "content_type": "image/png"},
     "attachments[0].content_type"),
    ({"filename": "a.png", "content": b64(PNG), "content_type": "image png"},
     "attachments[0].content_type"),
    ({"filename": "a.png", "content": b64(PNG), "content_id": "<>"}, "attachments[0].content_id"),
    ({"filename": "a.png", "content": b64(PNG), "disposition": "x"},
     "attachments[0].disposition"),
    ({"filename": "a.png", "content": b64(PNG), "other": 1}, "attachments[0].other"),
]  # fmt: skip


async def test_every_rule_is_a_422_naming_its_field_over_http(env: Env) -> None:
    for item, field in HTTP_RULES:
        r = await env.client.post("/v1/messages", json=message(attachments=[item]))
        assert (r.status_code, r.json().get("field")) == (422, field), (item, r.text)
        batch = {"messages": [message(), message(attachments=[item])]}
        r = await env.client.post("/v1/messages/batch", json=batch)
        assert (r.status_code, r.json().get("field")) == (422, f"messages[1].{field}"), item
    many = [{"filename": f"{i}", "content": "eA=="} for i in range(21)]
    r = await env.client.post("/v1/messages", json=message(attachments=many))
    assert (r.status_code, r.json()["field"]) == (422, "attachments")
    # The limits: per attachment (3 MiB here) and per message (10 MiB).
    up = await env.upload(b"\0" * (3 << 20))
    refs = [{"filename": f"{i}", "attachment_id": up["id"]} for i in range(4)]
    r = await env.client.post("/v1/messages", json=message(attachments=refs))
    assert (r.status_code, r.json()["field"]) == (422, "attachments[3].attachment_id")
    assert "attachments.max_message_bytes" in r.json()["detail"]
    # Nothing of a refused request was stored.
    assert await env.blob_keys() == [env.queue.keys.blob(up["id"]).encode()]
    # A schedule cannot carry attachments (nothing would keep their blobs).
    sched = {"name": "n", "cron": "@daily", "message": message(attachments=[HTTP_RULES[0][0]])}
    r = await env.client.post("/v1/schedules", json=sched)
    assert r.status_code == 422 and r.json()["field"].startswith("message.attachments")


async def test_the_upload_route_has_its_own_limit_and_checks_what_it_is_told(env: Env) -> None:
    c = env.client
    over = await c.post("/v1/attachments", content=b"\0" * ((3 << 20) + 1))
    assert over.status_code == 413  # by the server's parser: the route's own limit
    # Other routes keep http.max_body_bytes, also at the server's parser.
    r = await c.post("/v1/messages", content=b"{" + b" " * (2 << 20) + b"}",
                     headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 413
    assert (await c.post("/v1/attachments", content=b"")).status_code == 422
    r = await c.post("/v1/attachments", content=PDF, headers={"content-type": "image/gif"})
    assert (r.status_code, r.json()["field"]) == (422, "content_type")
    r = await c.post("/v1/attachments", content=PNG, params={"filename": "a\x00"})
    assert (r.status_code, r.json()["field"]) == (422, "filename")
    r = await c.post("/v1/attachments", content=b"a,b\n", params={"filename": "x.csv"})
    assert r.json()["content_type"] == "text/csv"
    r = await c.post(
        "/v1/attachments", content=b"x", headers={"content-type": "Text/Plain; charset=utf-8"}
    )
    assert r.json()["content_type"] == "text/plain"


async def test_a_10_mib_upload_never_holds_the_loop(
    redis_server: RedisServer, sink: SinkProcess
) -> None:
    """The upload is hashed a slice at a time: a ticker on the same loop never waits long."""
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(environ={}, overrides={"http": {"bind": bind}, "role": "api"})
    smtp = SmtpPool(SmtpSettings(starttls="never"), sink.url)
    data = os.urandom(10 << 20)
    gaps: list[float] = []
    async with (
        inprocess_engine(settings, redis_server.url, smtp),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=30) as client,
    ):
        done = trio.Event()

        async def tick() -> None:
            last = trio.current_time()
            while not done.is_set():
                await trio.sleep(0)
                now = trio.current_time()
                gaps.append(now - last)
                last = now

        async def post() -> None:
            # The client runs on this loop too: it sends in pieces, the server reads them.
            r = await client.post("/v1/attachments", content=data)
            assert r.status_code == 201, r.text
            done.set()

        async with trio.open_nursery() as n:
            n.start_soon(tick)
            n.start_soon(post)
    worst = max(gaps)
    print(f"longest loop stall during a 10 MiB upload: {worst * 1000:.1f} ms")
    assert worst < 0.02


async def test_engine_send_attach_uploads_the_file_and_names_it(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from engine import cli
    from fixtures.auth import TEST_ADMIN_KEY

    doc = tmp_path / "Angebot Nr. 7.pdf"
    doc.write_bytes(PDF)
    argv = ["send", "--to", "bo@example.com", "--text", "see attached", "--attach", str(doc),
            "--url", str(env.client.base_url), "--key", TEST_ADMIN_KEY]  # fmt: skip
    assert await trio.to_thread.run_sync(cli.main, argv) == 0
    job_id = capsys.readouterr().out.strip()
    assert (await env.final(job_id))["state"] == "sent"
    assert files(await env.mail(job_id)) == [
        ("Angebot Nr. 7.pdf", "application/pdf", PDF, None, "attachment")
    ]
    missing = ["send", "--to", "bo@example.com", "--attach", str(tmp_path / "nope.pdf"),
               "--url", str(env.client.base_url), "--key", TEST_ADMIN_KEY]  # fmt: skip
    assert await trio.to_thread.run_sync(cli.main, missing) == 1
    assert "cannot upload an attachment" in capsys.readouterr().err
