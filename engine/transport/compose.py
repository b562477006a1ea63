"""Turn a stored ``Message`` into RFC 5322 bytes (CRLF, not dot-stuffed) for the wire.

Pure and hand-built for speed (no ``EmailMessage`` on the hot path). Mail that is not
plain 7-bit (8bit bodies, UTF-8 addresses) also gets its 7-bit fallback. Imports only leaves.
"""

from __future__ import annotations

import binascii
import functools
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from email.utils import formatdate, quote
from typing import Final

from engine.attachments import AttachmentRef
from engine.models import Message, ascii_domain, bare_address, split_address
from engine.transport.base import OutgoingMail, SevenBitForm

_FOLD_AT: Final = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_MAX_LINE: Final = 998  # ... and MUST be at most 998 octets (RFC 6152: 8bit lines too)
# A display name made only of atext and spaces needs neither quoting nor encoding.
_PLAIN_PHRASE_RE: Final = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*$")
_CRLF: Final = "\r\n"
_BLANK_LINE: Final = b"\r\n\r\n"
_NO_FORMS: Final[Mapping[str, str]] = {}
# UTF-8 octets per encoded word: 56 base64 characters, 68 with the rest (RFC 2047 2: 75).
_WORD_OCTETS: Final = 42
_WORD_CHARS: Final = 68
# The longest address item that fits on a line after "Reply-To: " and before a comma.
_MAX_ITEM: Final = _MAX_LINE - len("Reply-To: ,")


class UnwritableHeader(ValueError):
    """A header cannot be written within 998 octets a line (an address or a header
    name that long): the mail cannot go out as it is. The API refuses such input; this
    guards what was stored before it did."""


@functools.lru_cache(maxsize=4)
def _date_header(second: int) -> str:
    # One formatted Date per second, not per message (formatdate showed in profiles).
    return formatdate(second, usegmt=True)


@functools.lru_cache(maxsize=16)
def _part_headers(content_type: str, encoding: str) -> bytes:
    return (
        f"Content-Type: {content_type}; charset=utf-8\r\nContent-Transfer-Encoding: {encoding}"
    ).encode("ascii")


def compose(
    job_id: str,
    msg: Message,
    *,
    message_id_domain: str,
    now: float,
    attachments: Mapping[bytes, bytes] | None = None,
) -> OutgoingMail:
    """Build the wire form of ``msg``; the Message-ID depends only on the job id.

    ``attachments``: the part body (``attachment_body``) of each attachment ``msg``
    names, by SHA-256; one not there raises MissingAttachment.

    ``data`` is the best form: 8bit bodies and UTF-8 addresses as they are. Only when
    that is not plain 7-bit does the mail get flags and a ``fallback`` (quoted-printable
    bodies, A-label domains), so ASCII mail costs nothing extra.
    """
    sender = bare_address(msg.sender)
    recipients = msg.envelope_recipients()
    multipart = ""  # the top-level Content-Type when there are two parts
    if msg.attachments:
        body, body_7bit = _with_attachments(job_id, msg, attachments or {})
    elif msg.text is not None and msg.html is not None:
        # "=_" cannot occur in quoted-printable output, and a part that contains the
        # boundary is forced to QP below, so the boundary never collides with content.
        boundary = f"=_alt_{job_id}"
        multipart = f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        text, text_7bit = _part("text/plain", msg.text, boundary)
        html, html_7bit = _part("text/html", msg.html, boundary)
        # The CRLF before a delimiter belongs to it, so each part keeps its own last one.
        delimiter = f"\r\n--{boundary}\r\n".encode("ascii")
        close = f"\r\n--{boundary}--\r\n".encode("ascii")
        body = [delimiter, *text, delimiter, *html, close]
        body_7bit = None
        if text_7bit is not None or html_7bit is not None:
            body_7bit = [delimiter, *(text_7bit or text), delimiter, *(html_7bit or html), close]
    else:
        subtype, content = (
            ("text/plain", msg.text) if msg.text is not None else ("text/html", msg.html or "")
        )
        body, body_7bit = _part(subtype, content, None)
    head = _head(job_id, msg, message_id_domain, now, _NO_FORMS) + multipart
    head_bytes = _checked(head.encode("utf-8"))
    data = b"".join((head_bytes, *body))
    needs_smtputf8 = (
        not head.isascii() or not sender.isascii() or not all(r.isascii() for r in recipients)
    )
    if body_7bit is None and not needs_smtputf8:
        return OutgoingMail(job_id, sender, recipients, data, message=msg, parts=attachments)
    forms, unsendable = _ascii_forms(
        bare_address(a) for a in (msg.sender, *msg.to, *msg.cc, *msg.bcc, *msg.reply_to)
    )
    head_7bit = None
    if not head.isascii() and not unsendable:
        head_7bit = _checked(
            (_head(job_id, msg, message_id_domain, now, forms) + multipart).encode("ascii")
        )
    fallback = SevenBitForm(
        split=len(head_bytes),
        body=None if body_7bit is None else b"".join(body_7bit),
        head=head_7bit,
        addresses=forms,
        unsendable=unsendable,
    )
    return OutgoingMail(
        job_id,
        sender,
        recipients,
        data,
        needs_8bitmime=body_7bit is not None,
        needs_smtputf8=needs_smtputf8,
        fallback=fallback,
        message=msg,
        parts=attachments,
    )


def _head(
    job_id: str, msg: Message, message_id_domain: str, now: float, forms: Mapping[str, str]
) -> str:
    """The header section up to the MIME headers, each line ending in CRLF; addresses
    are replaced by their ``forms`` (the ASCII ones) where given."""
    lines = [
        _address_header("From", [msg.sender], forms),
        _address_header("To", msg.to, forms),
    ]
    if msg.cc:
        lines.append(_address_header("Cc", msg.cc, forms))
    if msg.reply_to:
        lines.append(_address_header("Reply-To", msg.reply_to, forms))
    lines += [
        _unstructured_header("Subject", msg.subject),
        f"Date: {_date_header(int(now))}",
        f"Message-ID: <{job_id}@{message_id_domain}>",
        f"X-Engine-Job-Id: {job_id}",
        "MIME-Version: 1.0",
    ]
    lines += [_unstructured_header(name, value) for name, value in msg.headers]
    lines.append("")
    return _CRLF.join(lines)


def _checked(head: bytes) -> bytes:
    """``head`` when every line of it is within 998 octets; else UnwritableHeader."""
    if len(head) > _MAX_LINE and max(map(len, head.split(b"\r\n"))) > _MAX_LINE:
        raise UnwritableHeader("a header line would be longer than 998 octets")
    return head


def _ascii_forms(addresses: Iterable[str]) -> tuple[dict[str, str], str]:
    """The ASCII form (domain in A-labels) of each non-ASCII bare address, or why one
    has none (a non-ASCII local part; RFC 6531 3.2 forbids rewriting it)."""
    forms: dict[str, str] = {}
    for bare in addresses:
        if bare.isascii() or bare in forms:
            continue
        local, _, domain = bare.rpartition("@")
        if not local.isascii():
            return {}, f"the address <{bare}> has a non-ASCII local part"
        try:
            forms[bare] = f"{local}@{ascii_domain(domain)}"
        except UnicodeError:
            return {}, f"the address <{bare}> has a domain that is not a valid IDN"
    return forms, ""


def _part(
    content_type: str, text: str, boundary: str | None
) -> tuple[list[bytes], list[bytes] | None]:
    """A MIME part (its Content-Type/-Transfer-Encoding lines, a blank line, the body
    ending in CRLF) as chunks, in its best form; and its 7-bit form when that is 8bit."""
    if "\r" in text:  # str.replace, not a regex: ~100x faster on megabytes
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.endswith("\n"):
        text += "\n"
    raw = text.encode("utf-8")
    # raw ends with its newline: a body that short has no line longer than it, less one.
    longest = len(raw) - 1 if len(raw) <= _MAX_LINE + 1 else max(map(len, raw.split(b"\n")))
    if longest > QP_CHUNK_BYTES:
        # A line this long is one b2a_qp call, which holds the GIL throughout (a 2 MiB
        # line: ~25 ms of a stalled loop, even composed in a thread); base64 splits
        # anywhere, a chunk per call.
        return _encoded(content_type, "base64", b64_encode(raw)), None
    if (
        (boundary is not None and boundary in text)
        or b"\0" in raw  # neither 7bit nor 8bit data may hold NUL (RFC 2045 2.7, 2.8)
        or longest > _MAX_LINE
    ):
        return _encoded(content_type, "quoted-printable", _qp(raw)), None
    if raw.isascii():
        return _encoded(content_type, "7bit", raw), None
    return (
        _encoded(content_type, "8bit", raw),
        _encoded(content_type, "quoted-printable", _qp(raw)),
    )


# Quoted-printable is encoded a chunk of lines at a time: one b2a_qp call holds the GIL
# throughout (~9 ms a MiB), so a large body composed in a worker thread would stall the
# Trio loop for all of it at once. Each line is encoded on its own, so splitting after
# a newline gives the same bytes (tests/test_compose_properties.py).
QP_CHUNK_BYTES: Final = 64 * 1024


def qp_encode(raw: bytes, chunk: int = QP_CHUNK_BYTES) -> bytes:
    """``binascii.b2a_qp(raw, istext=True)``, a chunk of whole lines per call."""
    if len(raw) <= chunk:
        return binascii.b2a_qp(raw, istext=True)
    out = []
    start = 0
    while start < len(raw):
        end = raw.find(b"\n", start + chunk)
        end = len(raw) if end < 0 else end + 1
        out.append(binascii.b2a_qp(raw[start:end], istext=True))
        start = end
    return b"".join(out)


def _qp(raw: bytes) -> bytes:
    return qp_encode(raw)


def b64_encode(raw: bytes) -> bytes:
    """base64 in 76-character lines (RFC 2045 6.8): 57 bytes a call, so a thread
    composing a large part lets the GIL go between lines."""
    return b"".join(binascii.b2a_base64(raw[i : i + 57]) for i in range(0, len(raw), 57))


def _encoded(content_type: str, encoding: str, body: bytes) -> list[bytes]:
    return [_part_headers(content_type, encoding), _BLANK_LINE, body.replace(b"\n", b"\r\n")]


def _format_address(addr: str, forms: Mapping[str, str]) -> str:
    """One address as header text: display names quoted or RFC 2047-encoded as needed
    (in either form: RFC 6532 allows UTF-8 names, but they would need SMTPUTF8)."""
    name, bare = split_address(addr)
    if forms and bare in forms:
        bare = addr = forms[bare]
    if not name:
        return addr if bare == addr else f"<{bare}>"  # a bare address as given; "<a>" trimmed
    # "=?" in a name is encoded too: written as is, a reader would decode it as a word.
    if "=?" not in name and name.isascii() and name.isprintable():
        if _PLAIN_PHRASE_RE.match(name) and "  " not in name:
            item = f"{name} <{bare}>"
        else:  # a quoted string keeps specials and runs of spaces (RFC 5322 3.2.4)
            item = f'"{quote(name)}" <{bare}>'
        if len(item) <= _MAX_ITEM:  # else encoded words, which fold
            return item
    return f"{_encoded_words(name)} <{bare}>"


def _address_header(name: str, addresses: list[str], forms: Mapping[str, str]) -> str:
    """``Name: a, b, c`` folded after a comma whenever a line would pass 78 characters."""
    out = f"{name}:"
    width = len(out)
    items = [_format_address(a, forms) for a in addresses]
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        first_line = piece.partition(_CRLF)[0]
        if width + 1 + len(first_line) > _FOLD_AT and width > len(name) + 1:
            out += _CRLF + " " + piece
        else:
            out += " " + piece
        width = len(out) - out.rfind("\n") - 1
    return out


def _unstructured_header(name: str, value: str) -> str:
    """A folded unstructured header; values that would not survive as they are (non-ASCII,
    controls, "=?", edge whitespace, an over-long word) become RFC 2047 encoded words."""
    if len(name) + len(": ") + _WORD_CHARS > _MAX_LINE:
        raise UnwritableHeader(f"the header name {name[:40]!r}... is too long to write")
    if value.isascii() and value.isprintable() and "=?" not in value and value == value.strip():
        folded = _fold_words(name, value)
        if all(len(line) <= _MAX_LINE for line in folded.split(_CRLF)):
            return folded
    return f"{name}: {_encoded_words(value)}"


def _encoded_words(value: str) -> str:
    """``value`` as RFC 2047 encoded words (UTF-8, base64), one per folded line.

    Not ``email.header.Header``: it breaks values at every character ``str.splitlines``
    knows (form feed, U+2028 ...), which then do not survive the trip.
    """
    raw = value.encode("utf-8")
    words = []
    start = 0
    while start < len(raw):
        end = min(start + _WORD_OCTETS, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:
            end -= 1  # RFC 2047 5: a word never splits a character
        b64 = binascii.b2a_base64(raw[start:end], newline=False).decode("ascii")
        words.append(f"=?utf-8?b?{b64}?=")
        start = end
    return (_CRLF + " ").join(words)


def _fold_words(name: str, value: str) -> str:
    """``name: value`` (ASCII, no edge white space) folded at spaces so that each line
    stays within 78 characters where the words allow. Never right after the colon: that
    space would become part of the value. Never before a line of white space only."""
    line = f"{name}: {value}"
    if len(line) <= _FOLD_AT:
        return line
    words = value.split(" ")
    out: list[str] = []
    current = f"{name}: {words[0]}"
    for word in words[1:]:
        if len(current) + 1 + len(word) > _FOLD_AT and current.strip():
            out.append(current)
            current = " " + word
        else:
            current = f"{current} {word}"
    out.append(current)
    return _CRLF.join(out)


# -- attachments ------------------------------------------------------------------------
#
#   multipart/mixed                      (when there is an attachment to list)
#   ├── multipart/alternative            (text and html; else the one body part)
#   │   ├── text/plain
#   │   └── multipart/related            (html with the inline parts it names by cid:)
#   │       ├── text/html
#   │       └── image/png  Content-ID: <logo>, inline
#   └── application/pdf  attachment; filename=...
#
# Every attachment is base64 in 76-character lines, the same bytes in both forms of the
# mail: only text parts have a 7-bit stand-in.

# (its chunks: header lines, blank line, body; the same in 7-bit form, None: identical)
_Entity = tuple[list[bytes], list[bytes] | None]
# RFC 2231 7: attribute-char, what a parameter's extended value keeps unencoded.
_ATTR_CHARS: Final = "!#$&+-.^_`|~"
# Written RFC 2231 too, though ASCII: a quoted-pair (\" \\) that readers (Python's email
# among them) do not all undo.
_NEEDS_2231: Final = frozenset('"\\')


class MissingAttachment(ValueError):
    """A message names an attachment whose bytes are gone (its blob expired or was
    deleted): it cannot be sent as it was accepted."""

    def __init__(self, ref: AttachmentRef) -> None:
        super().__init__(
            f"attachment-missing: {ref.filename!r} ({ref.size} bytes, sha256 "
            f"{ref.sha256.hex()}) is no longer stored"
        )
        self.ref = ref


def attachment_body(raw: bytes) -> bytes:
    """An attachment's part body as ``compose`` writes it: base64 in 76-character lines,
    each ending in CRLF (b64_encode: the GIL is let go between lines)."""
    return b64_encode(raw).replace(b"\n", b"\r\n")


def _with_attachments(job_id: str, msg: Message, bodies: Mapping[bytes, bytes]) -> _Entity:
    """The MIME body of a message with attachments: its text and html, then its files."""
    boundaries = (f"=_mix_{job_id}", f"=_alt_{job_id}", f"=_rel_{job_id}")
    # Inline parts with a Content-ID go next to the html that shows them; the rest
    # (all of them when there is no html) are listed after the body.
    has_html = msg.html is not None
    related = [a for a in msg.attachments if has_html and a.inline and a.content_id]
    listed = [a for a in msg.attachments if not (has_html and a.inline and a.content_id)]
    text = _leaf("text/plain", msg.text, boundaries) if msg.text is not None else None
    html = _leaf("text/html", msg.html, boundaries) if msg.html is not None else None
    if html is not None and related:
        parts = [html, *(_attachment(a, bodies) for a in related)]
        html = _multipart('related; type="text/html"', boundaries[2], parts)
    if text is not None and html is not None:
        content = _multipart("alternative", boundaries[1], [text, html])
    else:
        content = text or html or _leaf("text/plain", "", boundaries)
    if not listed:
        return content
    return _multipart("mixed", boundaries[0], [content, *(_attachment(a, bodies) for a in listed)])


def _leaf(content_type: str, text: str, boundaries: tuple[str, ...]) -> _Entity:
    """A text part; quoted-printable when it holds any of the ``boundaries``."""
    hit = next((b for b in boundaries if b in text), None)
    return _part(content_type, text, hit)


def _multipart(subtype: str, boundary: str, children: list[_Entity]) -> _Entity:
    head = f'Content-Type: multipart/{subtype};\r\n boundary="{boundary}"'.encode("ascii")
    first = f"--{boundary}\r\n".encode("ascii")
    between = f"\r\n--{boundary}\r\n".encode("ascii")
    close = f"\r\n--{boundary}--\r\n".encode("ascii")

    def joined(parts: list[list[bytes]]) -> list[bytes]:
        out = [head, _BLANK_LINE, first]
        for i, chunks in enumerate(parts):
            if i:
                out.append(between)
            out += chunks  # its body ends in CRLF: the delimiter's own CRLF follows
        out.append(close)
        return out

    best = joined([c[0] for c in children])
    if all(c[1] is None for c in children):
        return best, None
    return best, joined([c[1] or c[0] for c in children])


def _attachment(ref: AttachmentRef, bodies: Mapping[bytes, bytes]) -> _Entity:
    body = bodies.get(ref.sha256)
    if body is None:
        raise MissingAttachment(ref)
    lines = [
        f"Content-Type: {ref.content_type};{_param('name', ref.filename)}",
        f"Content-Disposition: {'inline' if ref.inline else 'attachment'};"
        + _param("filename", ref.filename),
        "Content-Transfer-Encoding: base64",
    ]
    if ref.content_id:
        lines.append(f"Content-ID: <{ref.content_id}>")
    return [_CRLF.join(lines).encode("ascii"), _BLANK_LINE, body], None


def _param(name: str, value: str) -> str:
    """A MIME parameter on a folded line of its own: ``name="value"`` for printable
    ASCII without quotes, backslashes or "=?" (a file name of at most 255 characters:
    within 998 octets), else RFC 2231
    ``name*=utf-8''%E2%82%AC...``, in numbered sections of one line each when long."""
    plain = value.isascii() and value.isprintable() and "=?" not in value
    if plain and not _NEEDS_2231.intersection(value):
        return f'\r\n {name}="{value}"'
    encoded = urllib.parse.quote(value, safe=_ATTR_CHARS)
    single = f"\r\n {name}*=utf-8''{encoded}"
    if len(single) <= _FOLD_AT + 2:
        return single
    lines: list[str] = []
    start = 0
    while start < len(encoded):
        line = f" {name}*{len(lines)}*=" + ("utf-8''" if not lines else "")
        end = min(start + _FOLD_AT - len(line) - 1, len(encoded))  # 1: the ";"
        while end < len(encoded) and "%" in encoded[end - 2 : end]:
            end -= 1  # never split a %XX
        lines.append(line + encoded[start:end])
        start = end
    return ";".join(f"\r\n{line}" for line in lines)
