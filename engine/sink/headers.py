"""Cheap scan of a raw message's header block for Message-ID and X-Engine-Job-Id.

Bytes in, bytes out: no ``email`` parser, no decoding of the body. Pure.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# A header we want, at the start of a line, with its folded continuation lines.
_WANTED = re.compile(
    rb"^(message-id|x-engine-job-id)[ \t]*:[ \t]*((?:[^\r\n]|\r?\n[ \t])*)",
    re.IGNORECASE | re.MULTILINE,
)
_FOLD = re.compile(rb"\r?\n[ \t]+")


class MessageIds(NamedTuple):
    message_id: bytes | None
    job_id: bytes | None


def header_block(content: bytes) -> bytes:
    """The headers of ``content``: everything before the first empty line."""
    if content.startswith((b"\r\n", b"\n")):
        return b""
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
    return content if end < 0 else content[:end]


def scan_ids(content: bytes) -> MessageIds:
    """First Message-ID and X-Engine-Job-Id values (unfolded, stripped), or None."""
    message_id: bytes | None = None
    job_id: bytes | None = None
    for match in _WANTED.finditer(header_block(content)):
        value = match.group(2)
        if b"\n" in value:
            value = _FOLD.sub(b" ", value)
        value = value.strip()
        if match.group(1)[0] in b"mM":
            if message_id is None:
                message_id = value
        elif job_id is None:
            job_id = value
        if message_id is not None and job_id is not None:
            break
    return MessageIds(message_id, job_id)
