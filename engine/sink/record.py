"""What the sink keeps: counters and their statistics, the JSON-lines log, the Maildir.

Plain synchronous file I/O (the sink's writes are small and never fsynced); no asyncio.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import BinaryIO

import msgspec


class SinkStatistics(msgspec.Struct, frozen=True):
    """One snapshot of the counters, as written to ``--stats``."""

    received: int
    unique_message_ids: int
    duplicates: int
    bytes: int
    connections: int
    # Wall-clock time (Unix seconds) the sink started.
    started_at: float
    # Messages per second over about the last second.
    rate_last_s: float
    # Messages answered with a code other than 250 at the end of DATA (fault injection),
    # by code; they are not in "received". JSON object keys are the codes as strings.
    refused: dict[int, int] = {}
    # Messages whose connection the sink cut after the content (+drop, --drop-ratio).
    dropped: int = 0
    # Recipients refused at RCPT (+550, +451, +421), by code.
    rcpt_refused: dict[int, int] = {}


class Received(msgspec.Struct, frozen=True):
    """One line of ``--log``: a message the sink accepted."""

    at: float
    message_id: str | None
    job_id: str | None
    mail_from: str | None
    rcpt_tos: list[str]
    size: int


class Counters:
    """Running totals; mutated only from the event loop's thread."""

    __slots__ = (
        "_rate",
        "_seen",
        "bytes",
        "connections",
        "dropped",
        "duplicates",
        "rcpt_refused",
        "received",
        "refused",
        "started_at",
        "started_mono",
    )

    def __init__(self) -> None:
        self.received = 0
        self.bytes = 0
        self.connections = 0
        self.duplicates = 0
        # Only fault injection touches these: code -> count, and cut connections.
        self.refused: dict[int, int] = {}
        self.rcpt_refused: dict[int, int] = {}
        self.dropped = 0
        # Message-IDs seen so far (raw bytes: no decoding on the hot path).
        self._seen: set[bytes] = set()
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self._rate = RateMeter(window_s=1.0)

    def record(self, message_id: bytes | None, size: int) -> None:
        """Count one accepted message; a Message-ID seen before counts as a duplicate."""
        self.received += 1
        self.bytes += size
        if message_id is not None:
            if message_id in self._seen:
                self.duplicates += 1
            else:
                self._seen.add(message_id)

    def statistics(self) -> SinkStatistics:
        return SinkStatistics(
            received=self.received,
            unique_message_ids=len(self._seen),
            duplicates=self.duplicates,
            bytes=self.bytes,
            connections=self.connections,
            started_at=self.started_at,
            rate_last_s=round(self._rate.sample(time.monotonic(), self.received), 1),
            refused=dict(self.refused),
            dropped=self.dropped,
            rcpt_refused=dict(self.rcpt_refused),
        )

    def refuse(self, code: int) -> None:
        """Count one message answered ``code`` instead of 250 at the end of DATA."""
        self.refused[code] = self.refused.get(code, 0) + 1

    def refuse_rcpt(self, code: int) -> None:
        """Count one recipient refused with ``code`` at RCPT."""
        self.rcpt_refused[code] = self.rcpt_refused.get(code, 0) + 1

    def summary_line(self) -> str:
        elapsed = time.monotonic() - self.started_mono
        line = (
            f"sink summary: received={self.received} unique={len(self._seen)}"
            f" duplicates={self.duplicates} bytes={self.bytes}"
            f" connections={self.connections} elapsed={elapsed:.1f}s"
        )
        if self.refused or self.dropped:  # only after fault injection
            line += f" refused={sum(self.refused.values())} dropped={self.dropped}"
        return line


class RateMeter:
    """Rate of a growing count over a sliding window of samples."""

    def __init__(self, *, window_s: float) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, now: float, count: int) -> float:
        """Record ``count`` at ``now``; return the rate since about ``window_s`` ago."""
        samples = self._samples
        samples.append((now, count))
        # Keep the newest sample at or before the window's start as the baseline.
        while len(samples) > 2 and samples[1][0] <= now - self._window_s:
            samples.popleft()
        then, before = samples[0]
        return (count - before) / (now - then) if now > then else 0.0


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class MessageLog:
    """Buffered JSON-lines log; the owner calls ``flush`` periodically and ``close`` at exit."""

    def __init__(self, path: Path) -> None:
        self._file: BinaryIO = path.open("ab")
        self._encoder = msgspec.json.Encoder()
        self._pending: list[bytes] = []

    def append(self, entry: Received) -> None:
        self._pending.append(self._encoder.encode(entry))

    def flush(self) -> None:
        if self._pending:
            self._pending.append(b"")  # so the join ends with a newline
            self._file.write(b"\n".join(self._pending))
            self._pending.clear()
            self._file.flush()

    def close(self) -> None:
        self.flush()
        self._file.close()


class Maildir:
    """Delivers messages into a Maildir (tmp/ then rename into new/), without fsync."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # Maildir names must not contain "/" or ":".
        host = socket.gethostname().replace("/", r"\057").replace(":", r"\072")
        self._pid = os.getpid()
        self._host = host
        self._seq = 0

    def deliver(self, content: bytes) -> Path:
        self._seq += 1
        now = time.time()
        usec = int(now * 1e6) % 1_000_000
        name = f"{int(now)}.M{usec}P{self._pid}Q{self._seq}.{self._host}"
        tmp = self.root / "tmp" / name
        tmp.write_bytes(content)
        dest = self.root / "new" / name
        os.rename(tmp, dest)
        return dest
