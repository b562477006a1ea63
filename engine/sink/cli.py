"""Command line of ``engine sink``: flags -> ``SinkOptions`` -> ``server.run_sink``.

Imports no asyncio/aiosmtpd/uvloop at module level (``run`` imports the server lazily),
so the main CLI can build its parser without paying for them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from engine.config import parse_hostport
from engine.errors import ConfigError

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``engine sink`` flags to ``parser``."""
    parser.add_argument(
        "--bind",
        default=DEFAULT_BIND,
        metavar="HOST:PORT",
        help=f"address to listen on; port 0 picks a free one (default {DEFAULT_BIND})",
    )
    parser.add_argument(
        "--maildir", type=Path, metavar="DIR", help="store each message in this Maildir"
    )
    parser.add_argument(
        "--log", type=Path, metavar="FILE", help="append one JSON line per received message"
    )
    parser.add_argument(
        "--stats", type=Path, metavar="FILE", help="keep JSON statistics in this file"
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        metavar="FILE",
        help='write the bound "host:port" here once listening',
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing on stdout")


def options_from_args(args: argparse.Namespace) -> SinkOptions:
    """Validate parsed flags; raise ConfigError naming the bad one."""
    host, port = parse_hostport(args.bind, what="--bind")
    if port > 65535:
        raise ConfigError(f"--bind port must be at most 65535, got {port}")
    return SinkOptions(
        host=host,
        port=port,
        maildir=args.maildir,
        log=args.log,
        stats=args.stats,
        ready_file=args.ready_file,
        quiet=args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    """Run the sink until SIGINT/SIGTERM; return the process exit code (0 on a clean stop)."""
    try:
        options = options_from_args(args)
    except ConfigError as exc:
        print(f"sink: {exc}", file=sys.stderr)
        return 2
    # Lazy: asyncio, aiosmtpd and uvloop are imported only when the sink really runs.
    from engine.sink.server import run_sink

    return run_sink(options)
