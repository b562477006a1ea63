"""compose(): the wire form of a stored Message, checked by parsing it back."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.message import EmailMessage, MIMEPart
from typing import Any

from engine.models import Message
from engine.transport.compose import compose

JOB = "01J0000000000000000000ABCD"
NOW = 1_700_000_000.0


def make(**overrides: Any) -> Message:
    fields: dict[str, Any] = dict(
        sender="Ann <ann@example.org>",
        to=["bob@example.com"],
        cc=[],
        bcc=[],
        subject="Hello",
        text="Hi Bob\n",
        html=None,
        headers=[],
        reply_to=[],
        tags=[],
    )
    fields.update(overrides)
    return Message(**fields)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def content(part: MIMEPart | None) -> str:
    """Decoded text of a part; the wire form is CRLF, which the parser keeps."""
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    return data[:-2].split(b"\r\n")


def test_headers_and_envelope() -> None:
    msg = make(
        to=["Bob <bob@example.com>", "carl@example.com"],
        cc=["Dee <dee@example.com>"],
        reply_to=["replies@example.org"],
        headers=[("X-Campaign", "spring"), ("List-Unsubscribe", "<mailto:u@example.org>")],
    )
    out = compose(JOB, msg, message_id_domain="mail.example.org", now=NOW)
    assert out.job_id == JOB
    assert out.sender == "ann@example.org"
    assert out.recipients == ["bob@example.com", "carl@example.com", "dee@example.com"]
    parsed = parse(out.data)
    assert parsed["From"] == "Ann <ann@example.org>"
    assert parsed["To"] == "Bob <bob@example.com>, carl@example.com"
    assert parsed["Cc"] == "Dee <dee@example.com>"
    assert parsed["Reply-To"] == "replies@example.org"
    assert parsed["Subject"] == "Hello"
    assert b"\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n" in out.data
    assert parsed["Date"].datetime.timestamp() == NOW
    assert parsed["Message-ID"] == f"<{JOB}@mail.example.org>"
    assert parsed["X-Engine-Job-Id"] == JOB
    assert parsed["MIME-Version"] == "1.0"
    assert parsed["X-Campaign"] == "spring"
    assert parsed["List-Unsubscribe"] == "<mailto:u@example.org>"
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content_charset() == "utf-8"
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    assert content(parsed) == "Hi Bob\n"
    # Engine headers come before user headers, and the body follows one empty line.
    names = [line.split(b":")[0] for line in lines(out.data) if line and line[:1] != b" "]
    assert names.index(b"X-Engine-Job-Id") < names.index(b"X-Campaign")
    assert b"\r\n\r\nHi Bob\r\n" in out.data


def test_message_id_is_stable_across_retries() -> None:
    msg = make()
    first = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    retry = compose(JOB, msg, message_id_domain="d.example", now=NOW + 600)
    assert parse(first.data)["Message-ID"] == parse(retry.data)["Message-ID"]
    assert parse(first.data)["Date"] != parse(retry.data)["Date"]
    other = compose("01J0000000000000000000ABCE", msg, message_id_domain="d.example", now=NOW)
    assert parse(other.data)["Message-ID"] != parse(first.data)["Message-ID"]


def test_bcc_only_in_envelope() -> None:
    msg = make(to=["a@example.com"], cc=["b@example.com"], bcc=["Secret <hidden@example.net>"])
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.recipients == ["a@example.com", "b@example.com", "hidden@example.net"]
    assert b"hidden@example.net" not in out.data
    assert b"Bcc" not in out.data
    assert "Bcc" not in parse(out.data)


def test_duplicate_recipients_once_in_envelope() -> None:
    msg = make(to=["a@example.com", "A <a@example.com>"], bcc=["a@example.com"])
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.recipients == ["a@example.com"]


def test_non_ascii_round_trip() -> None:
    subject = "Grüße aus Köln: ünïcødé 🎉"
    text = "Liebe Grüße,\nJörg ☕\n"
    msg = make(
        sender="Jörg Müller <joerg@example.de>",
        to=["Zoë <zoe@example.com>"],
        subject=subject,
        text=text,
        headers=[("X-Note", "café")],
    )
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.data.isascii(), "headers are encoded words and the body is QP: 7-bit clean"
    parsed = parse(out.data)
    assert parsed["Subject"] == subject
    assert parsed["From"].addresses[0].display_name == "Jörg Müller"
    assert parsed["From"].addresses[0].addr_spec == "joerg@example.de"
    assert parsed["To"].addresses[0].display_name == "Zoë"
    assert parsed["X-Note"] == "café"
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(parsed) == text
    assert b"=?utf-8?" in out.data


def test_display_names_with_specials_are_quoted() -> None:
    msg = make(to=["Doe, John <john@example.com>", "J. R. <jr@example.com>"])
    parsed = parse(compose(JOB, msg, message_id_domain="d.example", now=NOW).data)
    assert [a.display_name for a in parsed["To"].addresses] == ["Doe, John", "J. R."]
    assert [a.addr_spec for a in parsed["To"].addresses] == ["john@example.com", "jr@example.com"]


def test_multipart_alternative() -> None:
    msg = make(text="plain version\n", html="<p>html <b>version</b></p>")
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    parsed = parse(out.data)
    assert parsed.get_content_type() == "multipart/alternative"
    boundary = parsed.get_boundary()
    assert boundary is not None and JOB in boundary
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    plain = parsed.get_body(("plain",))
    html = parsed.get_body(("html",))
    assert content(plain) == "plain version\n"
    assert content(html) == "<p>html <b>version</b></p>\n"
    # The boundary is derived from the job id: the same job composes the same bytes.
    assert compose(JOB, msg, message_id_domain="d.example", now=NOW).data == out.data


def test_html_only() -> None:
    msg = make(text=None, html="<h1>Hi</h1>")
    parsed = parse(compose(JOB, msg, message_id_domain="d.example", now=NOW).data)
    assert parsed.get_content_type() == "text/html"
    assert content(parsed) == "<h1>Hi</h1>\n"


def test_body_containing_the_boundary_is_still_parsed() -> None:
    evil = f"--=_alt_{JOB}\nnot a part\n--=_alt_{JOB}--\n"
    msg = make(text=evil, html="<p>x</p>")
    parsed = parse(compose(JOB, msg, message_id_domain="d.example", now=NOW).data)
    parts = list(parsed.iter_parts())
    assert len(parts) == 2
    assert content(parts[0]) == evil


def test_long_lines_use_quoted_printable() -> None:
    long_line = "x" * 1500
    msg = make(text=f"short\n{long_line}\n")
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert all(len(line) <= 78 for line in lines(out.data))
    parsed = parse(out.data)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(parsed) == f"short\n{long_line}\n"


def test_line_of_998_is_still_7bit() -> None:
    msg = make(text="y" * 998)
    parsed = parse(compose(JOB, msg, message_id_domain="d.example", now=NOW).data)
    assert parsed["Content-Transfer-Encoding"] == "7bit"
    assert content(parsed) == "y" * 998 + "\n"


def test_line_endings_normalised_to_crlf_and_dots_not_stuffed() -> None:
    msg = make(text="one\r\ntwo\rthree\n.four\n..five")
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.data.endswith(b"\r\n\r\none\r\ntwo\r\nthree\r\n.four\r\n..five\r\n")
    lines(out.data)
    assert content(parse(out.data)) == "one\ntwo\nthree\n.four\n..five\n"


def test_long_headers_are_folded() -> None:
    to = [f"Recipient Number {i} <recipient{i}@example.com>" for i in range(60)]
    subject = " ".join(["word"] * 150)
    msg = make(to=to, subject=subject, headers=[("X-Long", "v" * 1200)])
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert all(len(line) <= 998 for line in lines(out.data))
    parsed = parse(out.data)
    assert parsed["Subject"] == subject
    assert parsed["X-Long"] == "v" * 1200
    assert [a.addr_spec for a in parsed["To"].addresses] == [
        f"recipient{i}@example.com" for i in range(60)
    ]


def test_long_non_ascii_display_name() -> None:
    name = "Ünïcødé " * 40
    msg = make(sender=f"{name.strip()} <ann@example.org>")
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert all(len(line) <= 998 for line in lines(out.data))
    # RFC 2047: the whitespace between adjacent encoded words is not part of the text.
    # (email's modern address parser keeps it, so decode the raw header value instead.)
    raw = email.message_from_bytes(out.data, policy=email.policy.compat32)["From"]
    assert str(make_header(decode_header(raw))) == f"{name.strip()} <ann@example.org>"


def test_empty_subject() -> None:
    parsed = parse(compose(JOB, make(subject=""), message_id_domain="d.example", now=NOW).data)
    assert parsed["Subject"] == ""
