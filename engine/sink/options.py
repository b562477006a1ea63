"""What one sink process is told to do (``SinkOptions``), built by ``cli`` and run by
``server``. Imports only ``faults`` (no asyncio)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.sink.faults import NO_FAULTS, FaultOptions

DEFAULT_BIND = "127.0.0.1:2525"


@dataclass(frozen=True, slots=True)
class SinkOptions:
    # Address to listen on; port 0 picks a free port (see ready_file).
    host: str = "127.0.0.1"
    port: int = 2525
    # Maildir to store each message in; None keeps counts only.
    maildir: Path | None = None
    # JSON-lines file, one line per received message, flushed at least every 0.2 s.
    log: Path | None = None
    # JSON statistics file, rewritten atomically every 0.25 s and at exit.
    stats: Path | None = None
    # File that receives the bound "host:port" once the sink is listening.
    ready_file: Path | None = None
    # Print nothing on stdout (errors still go to stderr).
    quiet: bool = False
    # Transaction-wide fault injection (--fail-ratio, --delay-ms, ...); none by default.
    faults: FaultOptions = NO_FAULTS
    # JSON file whose keys override ``faults`` while it exists (checked every 0.2 s).
    control: Path | None = None
