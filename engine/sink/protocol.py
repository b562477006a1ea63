"""``SinkSMTP``: aiosmtpd's SMTP protocol with the sink's hot-path shortcuts.

1. Plain ``<local@domain>`` addresses skip the ``email`` header parser (``fast_addr``).
2. DATA is read in blocks up to the lone dot, not line by line; ``unstuff`` (pure)
   checks line lengths and removes transparency dots exactly as aiosmtpd does.
3. Replies to pipelined commands are written together: while another complete command
   is already buffered, a reply is held and goes out with the next one (one send per
   group instead of one per command; order is unchanged).
4. For fault injection, ``hang_up`` closes the connection from inside a hook (after a
   421, or mid-DATA with no reply), and ``SinkEnvelope`` carries a transaction's faults.
Imports asyncio (directly and through aiosmtpd); only ``server`` uses it.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Final, NoReturn

from aiosmtpd.smtp import MISSING, SMTP, Envelope

from engine.sink.faults import DataVerdict

# Longest DATA line in bytes, CRLF included (aiosmtpd's limit; RFC 5321 4.5.3.1.6).
DATA_LINE_LIMIT: Final = 1001
# Dot-atom local part and a plain (ASCII) domain; anything else takes aiosmtpd's path.
_ATEXT: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ANGLE_ADDR: Final = re.compile(
    rf"<({_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*(.*)", re.DOTALL
)
# Replies after which aiosmtpd may close the connection in the same step: never held.
_FINAL_CODES: Final = (b"221", b"421")


class SinkEnvelope(Envelope):
    """aiosmtpd's Envelope plus the end-of-DATA faults its accepted recipients asked for."""

    # A class attribute: untagged transactions never pay for setting it.
    faults: DataVerdict | None = None


def fast_addr(arg: str) -> tuple[str, str] | None:
    """``(address, rest)`` for a plain ``<local@domain> params``, else None (use aiosmtpd)."""
    match = _PLAIN_ANGLE_ADDR.fullmatch(arg)
    return None if match is None else (match.group(1), match.group(2))


def unstuff(lines: bytes, *, line_limit: int = DATA_LINE_LIMIT) -> bytes | str:
    """Message content from DATA lines as received (each ends in CRLF; no final dot line).

    Removes the transparency dot of each line (RFC 5321 4.5.2); returns an error reply
    instead when a line is longer than ``line_limit`` bytes.
    """
    if len(lines) > line_limit - 2 and _has_long_line(lines, line_limit - 2):
        return "500 Line too long (see RFC5321 4.5.3.1.6)"
    if lines.startswith(b"."):
        lines = lines[1:]
    if _may_have_dot_lines(lines) and b"\r\n." in lines:
        lines = lines.replace(b"\r\n.", b"\r\n")
    return lines


# A 100 KiB attachment is ~1,800 lines of base64: splitting them all (~200 us), or
# searching them for a 3-byte needle such as "\r\n." (~110 us: bytes.find crawls at ~1 ns
# a byte for short needles), cost the sink more than the rest of the message. Both
# helpers below decide from a few fast scans and fall back to the exact check.


def _has_long_line(data: bytes, limit: int) -> bool:
    """Whether a CRLF-separated line of ``data`` has more than ``limit`` bytes. Such a
    line, with its CR, covers a whole aligned window of (limit + 1) // 2 + 1 bytes
    without CRLF: only when one is found are the lines measured."""
    window = (limit + 1) // 2
    find = data.find
    for start in range(0, len(data) - window, window):
        if find(b"\r\n", start, start + window + 1) < 0:
            return max(map(len, data.split(b"\r\n"))) > limit
    return False


def _may_have_dot_lines(data: bytes) -> bool:
    """False when no line of ``data`` after its first starts with "." (its dots, found with
    memchr while they are few, none follows a LF); past 32 dots, the full search decides.
    The same as engine.transport.smtp's, which the sink does not import."""
    at = data.find(b".", 1)
    for _ in range(32):
        if at < 0:
            return False
        if data[at - 1] == 0x0A:
            return True
        at = data.find(b".", at + 1)
    return at >= 0


async def read_data_lines(reader: asyncio.StreamReader, size_limit: int | None) -> bytes | None:
    """Consume DATA up to and including the lone dot line; return the lines before it.

    None when they exceed ``size_limit`` bytes (the excess is read and dropped). Reads in
    blocks as they come, not line by line; what follows the dot line (pipelined
    commands) goes back to the reader's buffer, where aiosmtpd reads the next command.
    """
    data = bytearray()
    dropped = 0
    scan = 0  # where a dot line may start in data, none before
    while True:
        block = await reader.read(_READ_BYTES)
        if not block:
            raise asyncio.IncompleteReadError(bytes(data), None)
        data += block
        end = _end_of_data(data, scan, at_start=not dropped)
        if end >= 0:
            break
        scan = max(0, len(data) - 4)  # a dot line may begin in what came before
        if size_limit and dropped + len(data) > size_limit + 3:
            # Over the limit: keep only what the line-start check needs.
            dropped += len(data) - 4
            del data[:-4]
            scan = 0
    rest = data[end + 3 :]
    if rest:
        # StreamReader keeps unread bytes in _buffer (as push and aiosmtpd read them).
        reader._buffer[:0] = rest  # type: ignore[attr-defined]
    if size_limit and dropped + end > size_limit:
        return None
    return bytes(data[:end])


# DATA comes in blocks of up to this many bytes.
_READ_BYTES: Final = 256 * 1024


def _end_of_data(data: bytearray, start: int, *, at_start: bool) -> int:
    """Where the lone dot line (".\r\n" at a line start) begins in ``data``, looking from
    ``start``; -1 when not there yet. ``at_start``: ``data`` begins the DATA (a line
    start). Its dots are looked at (memchr) while they are few: bytearray.find of
    "\r\n.\r\n" crawls at ~0.5 ns a byte, and base64 has no dot at all."""
    if at_start and start == 0 and data.startswith(b".\r\n"):
        return 0
    at = data.find(b".", max(start, 2))
    for _ in range(32):
        if at < 0:
            return -1
        if data[at - 2 : at] == b"\r\n" and data[at + 1 : at + 3] == b"\r\n":
            return at
        at = data.find(b".", at + 1)
    if at < 0:
        return -1
    found = data.find(b"\r\n.\r\n", at - 2)
    return found + 2 if found >= 0 else -1


class SinkSMTP(SMTP):
    """aiosmtpd's SMTP with a fast address parse, block DATA reads and coalesced replies."""

    # The stream reader's limit: DATA is read in blocks of up to this many bytes.
    # Command lines stay limited by aiosmtpd's command_size_limits, DATA lines by unstuff.
    line_length_limit = 64 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[bytes] = []
        self._flush_scheduled = False

    def _create_envelope(self) -> SinkEnvelope:
        return SinkEnvelope()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        parsed = fast_addr(arg)
        if parsed is None or (
            self.local_part_limit and len(parsed[0].rpartition("@")[0]) > self.local_part_limit
        ):
            return super()._getaddr(arg)
        return parsed

    async def push(self, status: str | bytes) -> None:
        response = (
            status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
            if isinstance(status, str)
            else status
        )
        self._held.append(response + b"\r\n")
        # StreamReader keeps unread bytes in _buffer (aiosmtpd reads it the same way).
        buffered: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        if b"\n" in buffered and not response.startswith(_FINAL_CODES):
            # The next pipelined command is already here; its reply carries this one.
            # The callback makes sure a reply is never held while this task waits.
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self.loop.call_soon(self.flush_replies)
            return
        self.flush_replies()
        await self._writer.drain()

    async def hang_up(self) -> NoReturn:
        """Send held replies, close the connection and end its task: nothing more is read
        or answered. For hooks; raises CancelledError, which aiosmtpd's client loop
        treats as a lost connection.
        """
        self.flush_replies()
        # close(), not abort(): what was written still goes out before the FIN.
        self._writer.transport.close()
        assert self._handler_coroutine is not None
        self._handler_coroutine.cancel()
        # Land the cancellation now: a pipelined command already buffered would
        # otherwise be read and handled without ever waiting.
        await asyncio.sleep(0)
        raise AssertionError("hang_up: the task was not cancelled")  # pragma: no cover

    def flush_replies(self) -> None:
        """Send every held reply now (a hook that is about to wait should call this)."""
        self._flush_scheduled = False
        if self._held:
            data = b"".join(self._held)
            self._held.clear()
            if not self._writer.transport.is_closing():
                self._writer.write(data)

    async def smtp_DATA(self, arg: str | None) -> None:
        # The checks and replies of aiosmtpd's smtp_DATA; only the reading differs.
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            lines = await read_data_lines(self._reader, self.data_size_limit)
        except asyncio.CancelledError:
            self._writer.close()  # the connection went away during DATA
            raise
        content = unstuff(lines) if lines is not None else "552 Error: Too much mail data"
        if isinstance(content, str):
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(content)
            return
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)
