"""A message's wire form read back for a person to look at: the headers that matter,
the text and html parts (decoded, bounded), and what is attached. The dashboard shows
the html in a sandboxed iframe (no scripts, no forms, no remote loads: its CSP), for
mail the embedded sink captured and for sandboxed messages. Pure: bytes in, a struct out.
"""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage
from typing import Final

import msgspec

MAX_PART_CHARS: Final = 512 * 1024  # of each of text and html shown (the rest is cut)


class PreviewAttachment(msgspec.Struct):
    filename: str | None
    content_type: str
    size: int  # decoded bytes


class Preview(msgspec.Struct, rename={"sender": "from"}):
    subject: str | None
    sender: str | None
    to: str | None
    cc: str | None
    date: str | None
    text: str | None
    html: str | None
    attachments: list[PreviewAttachment]
    truncated: bool  # a part was longer than MAX_PART_CHARS


def preview_of(raw: bytes) -> Preview:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)  # policy.default makes EmailMessage
    cut = False

    def body(kind: str) -> str | None:
        nonlocal cut
        part = msg.get_body((kind,))
        if part is None:
            return None
        try:
            content = part.get_content()
        except (LookupError, ValueError):  # an unknown charset, a broken encoding
            payload = part.get_payload(decode=True)
            content = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
        text = str(content)
        if len(text) > MAX_PART_CHARS:
            cut = True
            text = text[:MAX_PART_CHARS]
        return text

    attachments = []
    for part in msg.iter_attachments():
        payload = part.get_payload(decode=True)
        size = len(payload) if isinstance(payload, bytes) else 0
        attachments.append(PreviewAttachment(part.get_filename(), part.get_content_type(), size))
    return Preview(
        _header(msg, "Subject"), _header(msg, "From"), _header(msg, "To"), _header(msg, "Cc"),
        _header(msg, "Date"), body("plain"), body("html"), attachments, cut,
    )  # fmt: skip


# A message's html as the dashboard's preview frame loads it: nothing may load from
# anywhere (a tracking pixel, a font, a style sheet) and nothing may run -- enforced by
# the answer's own CSP, before the page is parsed (a policy inside the html, or the
# frame's inherited one, let Chromium's preload scanner fetch images now and then).
HTML_HEADERS: Final = [
    (b"content-security-policy",
     b"default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
]  # fmt: skip


def _header(msg: EmailMessage, name: str) -> str | None:
    value = msg.get(name)
    return None if value is None else str(value)
