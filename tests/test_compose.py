"""compose(): the wire form of a stored Message, checked by parsing it back."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from email.header import decode_header, make_header
from email.message import EmailMessage, MIMEPart
from typing import Any

from engine.errors import PermanentFailure
from engine.models import Message
from engine.transport import OutgoingMail
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


def seven_bit(mail: OutgoingMail) -> OutgoingMail:
    """What goes to a server that offers neither 8BITMIME nor SMTPUTF8."""
    form = mail.for_server(set())
    assert isinstance(form, OutgoingMail), form
    assert not form.needs_8bitmime and not form.needs_smtputf8
    return form


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
    assert (out.needs_8bitmime, out.needs_smtputf8) == (True, False)
    seven = seven_bit(out)
    assert seven.data.isascii(), "headers are encoded words and the body is QP: 7-bit clean"
    assert out.data.partition(b"\r\n\r\n")[0].isascii(), "headers are encoded words in both"
    for data, encoding in ((out.data, "8bit"), (seven.data, "quoted-printable")):
        parsed = parse(data)
        assert parsed["Subject"] == subject
        assert parsed["From"].addresses[0].display_name == "Jörg Müller"
        assert parsed["From"].addresses[0].addr_spec == "joerg@example.de"
        assert parsed["To"].addresses[0].display_name == "Zoë"
        assert parsed["X-Note"] == "café"
        assert parsed["Content-Transfer-Encoding"] == encoding
        assert content(parsed) == text
        assert b"=?utf-8?" in data
    assert "Liebe Grüße,\r\nJörg ☕\r\n".encode() in out.data


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


# -- 8bit bodies and internationalised addresses (RFC 6152, 6531, 6532) ------------------


def utf8_parse(data: bytes) -> EmailMessage:
    """Parse a message whose headers may be UTF-8 (RFC 6532): email's bytes parser
    would keep them as surrogate escapes."""
    msg = email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def test_ascii_mail_has_no_fallback() -> None:
    out = compose(JOB, make(text="plain\n", html="<p>plain</p>"), message_id_domain="d", now=NOW)
    assert (out.needs_8bitmime, out.needs_smtputf8, out.fallback) == (False, False, None)
    assert out.for_server(set()) is out
    assert out.data_for(set()) is out.data


def test_8bit_fallback_changes_only_the_8bit_part() -> None:
    msg = make(text="plain ascii\n", html="<p>Grüße</p>")
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.needs_8bitmime and not out.needs_smtputf8
    assert out.for_server({"8BITMIME"}) is out
    seven = seven_bit(out)
    assert out.fallback is not None and out.fallback.head is None
    assert seven.data[: out.fallback.split] == out.data[: out.fallback.split]
    for data, html_encoding in ((out.data, "8bit"), (seven.data, "quoted-printable")):
        plain, html = parse(data).iter_parts()
        assert plain["Content-Transfer-Encoding"] == "7bit"
        assert html["Content-Transfer-Encoding"] == html_encoding
        assert content(html) == "<p>Grüße</p>\n"
    assert out.data_for(set()) == seven.data
    assert out.data_for({"8BITMIME"}) is out.data


def test_long_8bit_line_is_quoted_printable_even_with_8bitmime() -> None:
    # RFC 5322 2.1.1: 998 octets, not characters: 500 two-octet characters are too long.
    out = compose(JOB, make(text="ü" * 500), message_id_domain="d.example", now=NOW)
    assert not out.needs_8bitmime and out.fallback is None
    assert out.data.isascii()
    parsed = parse(out.data)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert content(parsed) == "ü" * 500 + "\n"
    fits = compose(JOB, make(text="ü" * 499), message_id_domain="d.example", now=NOW)
    assert fits.needs_8bitmime
    assert max(len(line) for line in lines(fits.data)) == 998


def test_nul_is_never_sent_as_7bit_or_8bit() -> None:
    for text in ("nul \0 here\n", "nül \0 here\n"):
        out = compose(JOB, make(text=text), message_id_domain="d.example", now=NOW)
        assert out.data.isascii() and b"\0" not in out.data
        assert content(parse(out.data)) == text


def test_idn_domains_utf8_with_smtputf8_a_labels_without() -> None:
    msg = make(
        sender="Jörg <joerg@bücher.example>",
        to=["Zoë <zoe@例え.jp>", "plain@example.com"],
        reply_to=["help@bücher.example"],
        bcc=["audit@münchen.de"],
        text="ascii body\n",
    )
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.needs_smtputf8 and not out.needs_8bitmime
    assert out.sender == "joerg@bücher.example"
    assert out.recipients == ["zoe@例え.jp", "plain@example.com", "audit@münchen.de"]
    best = utf8_parse(out.data)
    assert best["From"].addresses[0].addr_spec == "joerg@bücher.example"
    assert best["To"].addresses[0].addr_spec == "zoe@例え.jp"
    assert out.data.startswith(b"From: =?utf-8?"), "display names stay encoded words"
    # With SMTPUTF8 (which implies 8BITMIME) the mail goes as it is.
    assert out.for_server({"8BITMIME", "SMTPUTF8"}) is out
    for extensions in (set(), {"8BITMIME"}):
        seven = out.for_server(extensions)
        assert isinstance(seven, OutgoingMail) and seven.data.isascii()
        assert not seven.needs_smtputf8
        assert seven.sender == "joerg@xn--bcher-kva.example"
        assert seven.recipients == [
            "zoe@xn--r8jz45g.jp",
            "plain@example.com",
            "audit@xn--mnchen-3ya.de",
        ]
        parsed = parse(seven.data)
        assert parsed["From"].addresses[0].display_name == "Jörg"
        assert parsed["From"].addresses[0].addr_spec == "joerg@xn--bcher-kva.example"
        assert [a.addr_spec for a in parsed["To"].addresses] == [
            "zoe@xn--r8jz45g.jp",
            "plain@example.com",
        ]
        assert parsed["Reply-To"] == "help@xn--bcher-kva.example"
        assert content(parsed) == "ascii body\n"
        assert b"audit" not in seven.data


def test_idn_only_in_bcc_keeps_the_headers() -> None:
    out = compose(JOB, make(bcc=["audit@münchen.de"]), message_id_domain="d.example", now=NOW)
    assert out.needs_smtputf8 and out.data.isascii()
    assert out.fallback is not None and out.fallback.head is None
    seven = seven_bit(out)
    assert seven.data == out.data
    assert seven.recipients == ["bob@example.com", "audit@xn--mnchen-3ya.de"]


def test_idn_and_8bit_body_each_fall_back_on_its_own() -> None:
    msg = make(to=["zoe@bücher.example"], text="Grüße\n")
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.needs_8bitmime and out.needs_smtputf8
    only_8bit = out.for_server({"8BITMIME"})
    assert isinstance(only_8bit, OutgoingMail)
    assert (only_8bit.needs_8bitmime, only_8bit.needs_smtputf8) == (True, False)
    assert only_8bit.recipients == ["zoe@xn--bcher-kva.example"]
    head, _, body = only_8bit.data.partition(b"\r\n\r\n")
    assert head.isascii() and "Grüße".encode() in body
    assert parse(only_8bit.data)["To"] == "zoe@xn--bcher-kva.example"
    assert content(parse(only_8bit.data)) == "Grüße\n"
    seven = seven_bit(out)
    assert seven.data.isascii() and content(parse(seven.data)) == "Grüße\n"


def test_non_ascii_local_part_needs_smtputf8() -> None:
    msg = make(to=["Ünal <ünal@example.com>", "bob@bücher.example"], text="Grüße\n")
    out = compose(JOB, msg, message_id_domain="d.example", now=NOW)
    assert out.needs_smtputf8
    assert out.for_server({"8BITMIME", "SMTPUTF8"}) is out
    assert utf8_parse(out.data)["To"].addresses[0].addr_spec == "ünal@example.com"
    for extensions in (set(), {"8BITMIME"}):
        refused = out.for_server(extensions)
        assert isinstance(refused, PermanentFailure)
        assert str(refused) == (
            "the server does not offer SMTPUTF8; "
            "the address <ünal@example.com> has a non-ASCII local part"
        )


def test_fallback_follows_a_narrowed_recipient_list() -> None:
    # A retry after a partial delivery replaces the recipients (engine/sender/pool.py).
    out = compose(
        JOB, make(to=["a@bücher.example", "b@münchen.de"]), message_id_domain="d", now=NOW
    )
    retry = dataclasses.replace(out, recipients=["b@münchen.de"])
    seven = seven_bit(retry)
    assert seven.recipients == ["b@xn--mnchen-3ya.de"]


def test_a_line_longer_than_a_qp_chunk_goes_base64_and_reads_back() -> None:
    """One b2a_qp call per such line would hold the GIL for all of it (compose.py): a
    part with a line over QP_CHUNK_BYTES is base64, 76-character lines."""
    line = "é" + "x" * 200_000
    parsed = parse(compose(JOB, make(text=line), message_id_domain="d.example", now=NOW).data)
    assert parsed["Content-Transfer-Encoding"] == "base64"
    assert content(parsed) == line + "\n"
    short = parse(compose(JOB, make(text="y" * 2000), message_id_domain="d.example", now=NOW).data)
    assert short["Content-Transfer-Encoding"] == "quoted-printable"
