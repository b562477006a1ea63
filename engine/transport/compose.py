"""Turn a stored ``Message`` into RFC 5322 bytes (CRLF, not dot-stuffed) for the wire.

Pure and hand-built for speed (no ``EmailMessage`` on the hot path). Imports only leaves.
"""

from __future__ import annotations

import binascii
import functools
import re
from email.header import Header
from email.utils import formataddr, formatdate
from typing import Final

from engine.models import Message, bare_address, split_address
from engine.transport.base import OutgoingMail

_FOLD_AT: Final = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters
_MAX_LINE: Final = 998  # ... and MUST be at most 998
# A display name made only of atext and spaces needs neither quoting nor encoding.
_PLAIN_PHRASE_RE: Final = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]*$")
_NEWLINES_RE: Final = re.compile(r"\r\n|\r|\n")
_CRLF: Final = "\r\n"


@functools.lru_cache(maxsize=4)
def _date_header(second: int) -> str:
    # One formatted Date per second, not per message (formatdate showed in profiles).
    return formatdate(second, usegmt=True)


def compose(job_id: str, msg: Message, *, message_id_domain: str, now: float) -> OutgoingMail:
    """Build the wire form of ``msg``; the Message-ID depends only on the job id."""
    lines = [
        _address_header("From", [msg.sender]),
        _address_header("To", msg.to),
    ]
    if msg.cc:
        lines.append(_address_header("Cc", msg.cc))
    if msg.reply_to:
        lines.append(_address_header("Reply-To", msg.reply_to))
    lines += [
        _unstructured_header("Subject", msg.subject),
        f"Date: {_date_header(int(now))}",
        f"Message-ID: <{job_id}@{message_id_domain}>",
        f"X-Engine-Job-Id: {job_id}",
        "MIME-Version: 1.0",
    ]
    lines += [_unstructured_header(name, value) for name, value in msg.headers]

    if msg.text is not None and msg.html is not None:
        # "=_" cannot occur in quoted-printable output, and a part that contains the
        # boundary is forced to QP below, so the boundary never collides with content.
        boundary = f"=_alt_{job_id}"
        text_headers, text_body = _part("text/plain", msg.text, boundary)
        html_headers, html_body = _part("text/html", msg.html, boundary)
        lines.append(f'Content-Type: multipart/alternative; boundary="{boundary}"')
        head = "\r\n".join(lines).encode("ascii")
        data = b"".join(
            (
                head,
                b"\r\n\r\n--",
                boundary.encode("ascii"),
                b"\r\n",
                text_headers,
                b"\r\n\r\n",
                # The CRLF before a delimiter belongs to it: add one so the part keeps its own.
                text_body,
                b"\r\n",
                b"--",
                boundary.encode("ascii"),
                b"\r\n",
                html_headers,
                b"\r\n\r\n",
                html_body,
                b"\r\n",
                b"--",
                boundary.encode("ascii"),
                b"--\r\n",
            )
        )
    else:
        subtype, content = (
            ("text/plain", msg.text) if msg.text is not None else ("text/html", msg.html or "")
        )
        part_headers, body = _part(subtype, content, None)
        data = b"".join(
            ("\r\n".join(lines).encode("ascii"), b"\r\n", part_headers, b"\r\n\r\n", body)
        )
    return OutgoingMail(
        job_id=job_id,
        sender=bare_address(msg.sender),
        recipients=msg.envelope_recipients(),
        data=data,
    )


def _part(content_type: str, text: str, boundary: str | None) -> tuple[bytes, bytes]:
    """Content-Type/-Transfer-Encoding header lines and the encoded body (ending in CRLF)."""
    text = _NEWLINES_RE.sub("\n", text)
    if not text.endswith("\n"):
        text += "\n"
    raw = text.encode("utf-8")
    if (
        raw.isascii()
        and (boundary is None or boundary not in text)
        and all(len(line) <= _MAX_LINE for line in raw.split(b"\n"))
    ):
        encoding, body = "7bit", raw
    else:
        encoding, body = "quoted-printable", binascii.b2a_qp(raw, istext=True)
    headers = (
        f"Content-Type: {content_type}; charset=utf-8\r\nContent-Transfer-Encoding: {encoding}"
    )
    return headers.encode("ascii"), body.replace(b"\n", b"\r\n")


def _format_address(addr: str) -> str:
    """One address as header text: display names quoted or RFC 2047-encoded as needed."""
    name, bare = split_address(addr)
    if not name:
        return addr if bare == addr else f"<{bare}>"  # a bare address as given; "<a>" trimmed
    if _PLAIN_PHRASE_RE.match(name) and "=?" not in name:
        return f"{name} <{bare}>"
    if name.isascii():
        return formataddr((name, bare))  # quotes and escapes specials
    # Header splits a long name into several encoded words, folded between them.
    return f"{Header(name, 'utf-8', maxlinelen=_FOLD_AT).encode(linesep=_CRLF)} <{bare}>"


def _address_header(name: str, addresses: list[str]) -> str:
    """``Name: a, b, c`` folded after a comma whenever a line would pass 78 characters."""
    out = f"{name}:"
    width = len(out)
    items = [_format_address(a) for a in addresses]
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
    """A folded unstructured header; non-ASCII values become RFC 2047 encoded words."""
    if value.isascii() and "=?" not in value:
        folded = _fold_words(f"{name}: {value}")
        if all(len(line) <= _MAX_LINE for line in folded.split("\r\n")):
            return folded
    encoded = Header(value, "utf-8", header_name=name, maxlinelen=_FOLD_AT).encode(linesep=_CRLF)
    return f"{name}: {encoded}"


def _fold_words(line: str) -> str:
    """Fold an ASCII header line at spaces so that each line stays within 78 characters."""
    if len(line) <= _FOLD_AT:
        return line
    out: list[str] = []
    current = ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > _FOLD_AT and current.strip():
            out.append(current)
            current = " " + word
        else:
            current = f"{current} {word}" if current or out else word
    out.append(current)
    return "\r\n".join(out)
