"""Pure decisions about what the sink answers; the seed of fault injection.

Recipient local-part tags pick a reply: ``user+550@x`` is refused with 550,
``user+451@x`` deferred with 451. No I/O, no asyncio: the server only acts on the verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply the sink gives instead of the normal 250."""

    # Later faults (+421 close, +slowNs delay, +drop, a failure ratio) add fields here,
    # e.g. ``delay_s`` and ``close``, and the server acts on them.
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


USER_UNKNOWN: Final = Reply(550, "5.1.1 user unknown")
TRY_AGAIN: Final = Reply(451, "4.3.0 try again")

# Local-part tag (after "+", case-insensitive) -> reply at RCPT.
RCPT_TAGS: Final[Mapping[str, Reply]] = {"550": USER_UNKNOWN, "451": TRY_AGAIN}


def decide_rcpt(address: str) -> Reply | None:
    """Return the reply to give at RCPT TO for ``address``, or None to accept it."""
    if "+" not in address:  # the common case costs one scan
        return None
    local, at, _domain = address.rpartition("@")
    if not at:
        local = address
    for tag in local.split("+")[1:]:
        reply = RCPT_TAGS.get(tag.lower())
        if reply is not None:
            return reply
    return None
