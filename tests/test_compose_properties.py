"""Whatever the API accepts, compose writes a mail that reads back the same.

Hypothesis builds request bodies (addresses with display names, subjects, custom headers
and bodies made of the characters that break mail: specials, runs of spaces, TAB, "=?",
non-ASCII, U+2028, long words and lines); each goes the way a request goes -- decoded by
the API's decoder, validated by ``new_job``, stored, read back -- and then through
``compose``. What the API refuses is fine; what it accepts must give a wire message whose
lines are CRLF-terminated and at most 998 octets, with no white-space-only folded line,
which ``email`` (policy.default) parses back to the same headers and bodies, in its best
form and in its 7-bit fallback.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import re
from collections.abc import Sequence
from email.errors import NonASCIILocalPartDefect
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

import msgspec
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from engine.errors import ValidationError
from engine.models import MessageIn, ascii_domain, split_address
from engine.queue import decode_message, new_job
from engine.transport import OutgoingMail, compose
from engine.transport.base import SevenBitForm
from engine.transport.compose import qp_encode

JOB = "0190f0c2a7b84c5e8d3f2a1b0c9d8e7f"
NOW = 1_700_000_000.0
_decode = msgspec.json.Decoder(MessageIn).decode

# -- what a client may send -------------------------------------------------------------

# Characters that make header writing hard: specials, backslash, white space of every
# kind, "=" and "?", line separators, non-ASCII of every width ...
_TRICKY = " ,.;:@()[]\\=?\t\u0085\u00a0\u2028\u3000éü例🎉-_"
_WORDS = ["Ann", "Bob", "O'Brien", "Jörg", "Zoë", "例え", "x" * 90, "", " "]
_CLEAN = st.one_of(
    st.sampled_from(_WORDS),
    st.text(st.sampled_from(_TRICKY), max_size=4),
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=6),
)
_TEXT = st.lists(_CLEAN, max_size=12).map(" ".join)
_NAME = st.one_of(st.just(""), _TEXT.map(lambda s: s[:300]))
# ... and, in one request in eight, something the API must refuse: a control character,
# a quote, an angle bracket, an encoded word, a line break.
_BAD = st.sampled_from(["\x00", "\x07", "\x7f", "\x1b", '"', "<", ">", "=?utf-8?b?QUJD?=", "\r\n"])
_LOCAL = st.one_of(
    st.from_regex(r"[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,12}(\.[a-z0-9_-]{1,8}){0,2}", fullmatch=True),
    st.sampled_from(["ünal", "用户", "a.b", "x" * 64]),
)
_DOMAIN = st.sampled_from(
    ["example.com", "mail.example.org", "münchen.de", "例え.jp", "xn--mnchen-3ya.de", "a-b.io"]
)
_BARE = st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAIN)
_ADDRESS = st.builds(
    lambda name, bare, angle: f"{name} <{bare}>" if name or angle else bare,
    _NAME,
    _BARE,
    st.booleans(),
)
_ADDRESSES = st.one_of(_ADDRESS, st.lists(_ADDRESS, min_size=1, max_size=4))
_HEADER_NAME = st.one_of(
    st.sampled_from(["X-Campaign", "List-Unsubscribe", "X-A", "x-a", "Keywords"]),
    st.from_regex(r"X-[!-9;-~]{1,20}", fullmatch=True),
    st.just("X-" + "N" * 74),
)
_BODY = st.lists(
    st.one_of(
        _TEXT,
        st.builds(lambda c, n: c * n, st.sampled_from("xü例 ."), st.integers(300, 1200)),
        st.sampled_from(["\r\n", "\r", "\n", "\t", ".", "--=_alt_" + JOB]),
    ),
    max_size=8,
).map("".join)


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"to": draw(_ADDRESSES)}
    for key, strategy in (
        ("from", _ADDRESS),
        ("cc", _ADDRESSES),
        ("bcc", _ADDRESSES),
        ("reply_to", _ADDRESSES),
        ("subject", _TEXT.map(lambda s: s[:998])),
        ("headers", st.dictionaries(_HEADER_NAME, _TEXT.map(lambda s: s[:2000]), max_size=4)),
    ):
        if draw(st.booleans()):
            body[key] = draw(strategy)
    body["text"] = draw(st.none() | _BODY)
    body["html"] = draw(st.none() | _BODY if body["text"] is not None else _BODY)
    if draw(st.integers(0, 7)) == 0:
        key = draw(st.sampled_from(["to", "subject", "text", "html"]))
        value = body.get(key)
        value = value if isinstance(value, str) else ""
        cut = draw(st.integers(0, len(value)))
        body[key] = value[:cut] + draw(_BAD) + value[cut:]
    return body


# -- reading a wire message back ----------------------------------------------------------


def wire_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b""), "a bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "a bare CR"
    return data[:-2].split(b"\r\n")


def parse(data: bytes, *, utf8_headers: bool = False) -> EmailMessage:
    """The message as email (policy.default) reads it. RFC 6532 UTF-8 headers need the
    str parser (the bytes parser keeps them as surrogate escapes), 8bit bodies the bytes
    parser (the str parser mangles them)."""
    msg = (
        email.message_from_string(data.decode("utf-8"), policy=email.policy.default)
        if utf8_headers
        else email.message_from_bytes(data, policy=email.policy.default)
    )
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def collapsed(text: str) -> str:
    return " ".join(text.split())


def rfc2047_names(raw: str) -> list[str]:
    """Display names of an address header decoded per RFC 2047 (6.2: white space between
    adjacent encoded words is not text)."""
    return [str(make_header(decode_header(name))) for name, _ in getaddresses([raw])]


def raw_header(parsed: EmailMessage, name: str) -> str:
    """A header's value as written, unfolded."""
    (raw,) = [v for n, v in parsed.raw_items() if n.lower() == name.lower()]
    return re.sub(r"\r?\n(?=[ \t])", "", str(raw))


def check_addresses(
    parsed: EmailMessage, header: str, given: Sequence[str], forms: dict[str, str]
) -> None:
    if not given:
        assert header not in parsed
        return
    value = parsed[header]
    raw = raw_header(parsed, header)
    # RFC 6532 allows UTF-8 local parts (the mail then needs SMTPUTF8); email flags them.
    defects = [d for d in value.defects if not isinstance(d, NonASCIILocalPartDefect)]
    assert not defects, (header, defects)
    addresses = value.addresses
    assert [a.addr_spec for a in addresses] == [
        forms.get(b, b) for _, b in map(split_address, given)
    ]
    raw_names: list[str] | None = None
    for got, (name, _) in zip(addresses, map(split_address, given), strict=True):
        if got.display_name == name:
            continue
        # A phrase's runs of white space mean one space (RFC 5322 3.2.2): email collapses
        # them inside encoded words, which keep everything else.
        if collapsed(got.display_name) == collapsed(name) and "=?" in raw:
            continue
        # email before 3.14 keeps the white space between adjacent encoded words of a
        # display name (python/cpython#128110); decode those as RFC 2047 says.
        raw_names = raw_names or rfc2047_names(raw)
        assert any(collapsed(n) == collapsed(name) for n in raw_names), (got.display_name, name)


def check_mail(data: bytes, body: dict[str, Any], stored: Any, forms: dict[str, str]) -> None:
    lines = wire_lines(data)
    assert all(len(line) <= 998 for line in lines), "RFC 5322 2.1.1: 998 octets a line"
    head = lines[: lines.index(b"")]
    assert not any(line[:1] in (b" ", b"\t") and not line.strip() for line in head), (
        "a folded header line with only white space"
    )
    parsed = parse(data, utf8_headers=not data.partition(b"\r\n\r\n")[0].isascii())
    check_addresses(parsed, "From", [stored.sender], forms)
    check_addresses(parsed, "To", stored.to, forms)
    check_addresses(parsed, "Cc", stored.cc, forms)
    check_addresses(parsed, "Reply-To", stored.reply_to, forms)
    assert "Bcc" not in parsed
    assert parsed["Subject"] == stored.subject
    for name in {n.lower() for n, _ in stored.headers}:
        want = [v for n, v in stored.headers if n.lower() == name]
        assert parsed.get_all(name) == want, (name, parsed.get_all(name), want)
    parsed = parse(data)
    for subtype, text in (("plain", stored.text), ("html", stored.html)):
        part = parsed.get_body((subtype,))
        if text is None:
            assert part is None or part.get_content_subtype() != subtype
            continue
        assert part is not None
        got = part.get_content()
        assert isinstance(got, str)
        body_text = re.sub(r"\r\n|\r", "\n", text)
        expected = body_text if body_text.endswith("\n") else body_text + "\n"
        assert got.replace("\r\n", "\n") == expected


def accepted(body: dict[str, Any]) -> Any | None:
    """The stored message for ``body``, as the API would store it; None when refused."""
    try:
        incoming = _decode(msgspec.json.encode(body))
        job = new_job(incoming, JOB, default_from="engine@example.org", now_ms=0)
    except (msgspec.ValidationError, ValidationError):
        return None
    return decode_message(job.payload)


def ascii_forms(stored: Any) -> dict[str, str]:
    forms = {}
    for addr in (stored.sender, *stored.to, *stored.cc, *stored.reply_to):
        bare = split_address(addr)[1]
        local, _, domain = bare.rpartition("@")
        forms[bare] = f"{local}@{ascii_domain(domain)}"
    return forms


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example({"to": "Ann  Lee <a@example.com>", "text": "x"})
@example({"to": "a@example.com", "from": "=?utf-8?b?QUJD?= <a@example.com>", "text": "x"})
@example({"to": "Dûbois-Bénard Bérénice-Amélie Rosemonde <r@example.com>", "text": "x"})
@example({"to": "a@example.com", "subject": "a" + " " * 900 + "b", "text": "x"})
@example({"to": "a@example.com", "headers": {"X-" + "N" * 74: "v " * 999}, "text": "x"})
@example({"to": ["N" * 256 + " <" + "l" * 64 + "@" + "d" * 63 + ".example>"] * 3, "text": "x"})
@given(requests())
def test_what_the_api_accepts_reads_back_the_same(body: dict[str, Any]) -> None:
    stored = accepted(body)
    event("accepted" if stored is not None else "refused")  # --hypothesis-show-statistics
    if stored is None:
        return
    out = compose(JOB, stored, message_id_domain="engine.test", now=NOW)
    assert out.recipients == stored.envelope_recipients()
    check_mail(out.data, body, stored, {})
    if out.fallback is None:
        assert out.data.isascii() and not out.needs_8bitmime and not out.needs_smtputf8
        return
    assert isinstance(out.fallback, SevenBitForm)
    seven = out.for_server(set())
    if out.fallback.unsendable:
        assert not isinstance(seven, OutgoingMail)
        return
    assert isinstance(seven, OutgoingMail) and seven.data.isascii()
    check_mail(seven.data, body, stored, ascii_forms(stored))


_QP_PIECES = st.sampled_from(["a", " ", "\t", "=", "é", "€", ".", "x" * 80])


@given(
    st.lists(st.lists(_QP_PIECES, max_size=30).map("".join), max_size=40),
    st.integers(min_value=1, max_value=200),
)
def test_quoted_printable_in_chunks_of_lines_is_the_same(lines: list[str], chunk: int) -> None:
    """compose.qp_encode splits a large body after newlines (the GIL is let go between
    calls): the same bytes as one b2a_qp call, trailing white space and long lines too."""
    raw = "\n".join(lines).encode()
    assert qp_encode(raw, chunk) == binascii.b2a_qp(raw, istext=True)
