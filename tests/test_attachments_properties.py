"""Whatever the API accepts with attachments, compose writes a mail that reads back the
same: the attachments' bytes, file names and content types, and the text and html (the
checks of tests/test_compose_properties.py), in the best form and the 7-bit fallback;
every line CRLF-terminated and at most 998 octets.

Hypothesis builds messages with one to five attachments -- contents that are and are not
PDF, PNG, JPEG, GIF or ZIP, declared types that agree with them or not, file names with
directories, quotes, backslashes, "=?", non-ASCII of every width, 255 characters,
Content-IDs next to html or not -- each decoded by the API's decoder and validated by
``new_job``; the blobs it would store are handed to ``compose`` as the sender would.
"""

from __future__ import annotations

import base64
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from test_compose_properties import _BODY, JOB, NOW, check_mail, parse, wire_lines

from engine.attachments import BlobIndex, clean_filename
from engine.errors import ValidationError
from engine.models import Message, MessageIn
from engine.queue import decode_message, new_job
from engine.transport import OutgoingMail, attachment_body, compose

_decode = msgspec.json.Decoder(MessageIn).decode
# (first bytes, the type they are) -- b"": nothing in particular.
_MAGIC = [
    (b"", "text/plain"), (b"%PDF-1.5\n", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff\xe0", "image/jpeg"),
    (b"GIF89a", "image/gif"), (b"PK\x03\x04", "application/zip"),
]  # fmt: skip
_REST = st.binary(min_size=1, max_size=400) | st.sampled_from(
    [b"\r\n", b".", b"\n.\n", b"--=_mix_" + JOB.encode(), bytes(range(256)) * 3]
)
_TYPES = st.sampled_from(
    ["application/pdf", "image/png", "image/jpeg", "image/gif", "application/zip",
     "text/plain", "text/html", "application/octet-stream", "Application/X-Custom+zip",
     "image/svg+xml", "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"]
)  # fmt: skip
_NAME_PIECES = st.sampled_from(
    ["report", ".pdf", " ", "  ", '"', "\\", "/", "=?", "?=", "'", ";", "%", "*", "é", "ü",
     "例え", "🎉", "\u00a0", "x" * 60, "März", "\u2013", ".."]
)  # fmt: skip
# Mostly ending in a name (a directory, "..", "" alone are refused).
_FILENAME = st.builds(
    lambda pieces, last: ("".join(pieces) + last)[-255:],
    st.lists(_NAME_PIECES, max_size=10),
    st.sampled_from(["a.pdf", "b", "例.png", "x.tar.gz", ""]),
)
_CID = st.sampled_from(["logo", "logo@example.com", "<img.1@x>", "a.b-c_d@e.f", "bad id"])


@st.composite
def attachments(draw: st.DrawFn) -> dict[str, Any]:
    magic, kind = draw(st.sampled_from(_MAGIC))
    item: dict[str, Any] = {
        "filename": draw(_FILENAME),
        "content": base64.b64encode(magic + draw(_REST)).decode(),
    }
    declared = draw(st.integers(0, 5))
    if declared in (1, 2):
        item["content_type"] = kind  # what it is
    elif declared == 3:
        item["content_type"] = draw(_TYPES)  # anything: may contradict the bytes
    if draw(st.integers(0, 2)) == 0:
        item["content_id"] = f"{draw(_CID)}{len(magic)}" if draw(st.booleans()) else draw(_CID)
    if draw(st.integers(0, 3)) == 0:
        item["disposition"] = draw(st.sampled_from(["attachment", "inline"]))
    return item


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    subject = draw(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30))
    body: dict[str, Any] = {"to": "Ann <ann@example.com>", "subject": subject}
    body["text"] = draw(st.none() | _BODY)
    body["html"] = draw(st.none() | _BODY if body["text"] is not None else _BODY)
    body["attachments"] = draw(st.lists(attachments(), min_size=1, max_size=5))
    return body


def accepted(body: dict[str, Any]) -> tuple[Message, dict[bytes, bytes]] | None:
    """The stored message and the part bodies its blobs give; None when refused."""
    index = BlobIndex()
    try:
        incoming = _decode(msgspec.json.encode(body))
        job = new_job(incoming, JOB, default_from="engine@example.org", now_ms=0, blobs=index)
    except (msgspec.ValidationError, ValidationError):
        return None
    bodies = {bytes.fromhex(i): attachment_body(raw) for i, raw in index.inline.items()}
    return decode_message(job.payload), bodies


def read_back(data: bytes) -> list[tuple[str | None, str, bytes]]:
    """(file name, content type, bytes) of each part with a Content-Disposition."""
    wire_lines(data)  # CRLF only
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    out = []
    for part in parse(data).walk():
        if part.is_multipart() or part.get_content_disposition() is None:
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        assert not part.defects, part.defects
        # The parsed parameter: get_filename() also strips a pair of quotes around it.
        filename = part["Content-Disposition"].params.get("filename")
        assert part["Content-Type"].params.get("name") == filename
        out.append((filename, part.get_content_type(), payload))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example({"to": "a@example.com", "text": "x", "attachments": [
    {"filename": "Ü" * 255, "content": "JVBERi0="},
    {"filename": 'C:\\a\\"q" =?utf-8?b?QUJD?= .pdf', "content": "AA=="},
]})  # fmt: skip
@example({"to": "a@example.com", "text": "é", "html": "<img src=cid:x>", "attachments": [
    {"filename": "x.png", "content": "iVBORw0KGgo=", "content_id": "x"},
]})  # fmt: skip
@given(requests())
def test_what_the_api_accepts_with_attachments_reads_back_the_same(body: dict[str, Any]) -> None:
    got = accepted(body)
    event("accepted" if got is not None else "refused")  # --hypothesis-show-statistics
    if got is None:
        return
    msg, bodies = got
    want = sorted(
        (clean_filename("f", a["filename"]), ref.content_type, base64.b64decode(a["content"]))
        for a, ref in zip(body["attachments"], msg.attachments, strict=True)
    )
    out = compose(JOB, msg, message_id_domain="engine.test", now=NOW, attachments=bodies)
    assert sorted(read_back(out.data)) == want
    # email takes an inline text/* attachment for a body when the message has none of that
    # kind: then the bodies are not compared.
    bodies_known = not any(a.inline and a.content_type.startswith("text/") for a in msg.attachments)
    if bodies_known:
        check_mail(out.data, body, msg, {})
    if out.fallback is None:
        assert out.data.isascii()
        return
    seven = out.for_server(set())
    assert isinstance(seven, OutgoingMail) and seven.data.isascii()
    assert sorted(read_back(seven.data)) == want
    if bodies_known:
        check_mail(seven.data, body, msg, {})
