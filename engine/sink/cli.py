"""Command line of ``engine sink``: flags -> ``SinkOptions`` -> ``server.run_sink``; the help
text documents the fault-injection tags and flags (decided in ``faults``).

Imports no asyncio/aiosmtpd/uvloop at module level (``run`` imports the server lazily),
so the main CLI can build its parser without paying for them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.config import parse_hostport
from engine.errors import ConfigError
from engine.sink.faults import FaultOptions
from engine.sink.options import DEFAULT_BIND, SinkOptions

FAULTS_HELP = """\
Recipient tags, in the local part after "+" (case-insensitive; several combine,
e.g. user+slow2s+552@example.com). At RCPT, for that recipient only:
  +550               550 5.1.1 user unknown
  +451               451 4.3.0 try again
  +421               421 4.3.2 service shutting down, then the sink closes the connection
At the end of DATA, when any accepted recipient of the transaction carries them:
  +slowNs, +slowNms  wait N s or N ms (+slow2s, +slow250ms) before the final reply
  +drop              close the connection after the content, with no final reply
  +552               552 5.3.4 message too big (permanent)
  +452               452 4.3.1 insufficient storage (temporary)
Tags win over the ratios below; a drop wins over a reply. Only messages answered 250
are recorded (log, maildir, stats "received"); the stats count the others under
"refused" (by code) and "dropped", and refused recipients under "rcpt_refused".

At run time, --control FILE: while FILE exists, its JSON object's keys fail_ratio,
fail_code, drop_ratio and delay_ms override those flags (absent keys keep the flag);
the sink looks at FILE every 0.2 s and re-reads it when it changed (write it
atomically: a temporary file, then rename). Deleting FILE restores the flags. With
--control the stats file also shows the faults in force under "faults", e.g.
  echo '{"fail_ratio": 1, "fail_code": 451}' > ctl.tmp && mv ctl.tmp ctl.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``engine sink`` flags to ``parser`` (its help keeps the tag table's lines)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
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
    faults = parser.add_argument_group("fault injection", FAULTS_HELP)
    faults.add_argument(
        "--fail-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="answer a transaction's DATA with --fail-code instead of 250, with "
        "probability R (0..1; default 0)",
    )
    faults.add_argument(
        "--fail-code",
        type=int,
        default=451,
        metavar="N",
        help="the reply code of --fail-ratio: 4xx temporary, 5xx permanent, 421 also "
        "closes the connection (default 451)",
    )
    faults.add_argument(
        "--drop-ratio",
        type=float,
        default=0.0,
        metavar="R",
        help="close the connection after a transaction's content, with no final reply, "
        "with probability R (0..1; default 0)",
    )
    faults.add_argument(
        "--delay-ms",
        type=int,
        default=0,
        metavar="N",
        help="wait N ms before every final DATA reply (default 0)",
    )
    faults.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed the ratios' draws: the same seed gives the n-th transaction the same "
        "fate (default: unseeded)",
    )
    faults.add_argument(
        "--control",
        type=Path,
        metavar="FILE",
        help="JSON file overriding the four flags above while it exists (see above)",
    )


def options_from_args(args: argparse.Namespace) -> SinkOptions:
    """Validate parsed flags; raise ConfigError naming the bad one."""
    host, port = parse_hostport(args.bind, what="--bind")
    if port > 65535:
        raise ConfigError(f"--bind port must be at most 65535, got {port}")
    for flag, ratio in (("--fail-ratio", args.fail_ratio), ("--drop-ratio", args.drop_ratio)):
        if not 0 <= ratio <= 1:
            raise ConfigError(f"{flag} must be between 0 and 1, got {ratio}")
    if not 400 <= args.fail_code <= 599:
        raise ConfigError(f"--fail-code must be a 4xx or 5xx code, got {args.fail_code}")
    if args.delay_ms < 0:
        raise ConfigError(f"--delay-ms must not be negative, got {args.delay_ms}")
    return SinkOptions(
        host=host,
        port=port,
        maildir=args.maildir,
        log=args.log,
        stats=args.stats,
        ready_file=args.ready_file,
        quiet=args.quiet,
        faults=FaultOptions(
            fail_ratio=args.fail_ratio,
            fail_code=args.fail_code,
            drop_ratio=args.drop_ratio,
            delay_ms=args.delay_ms,
            seed=args.seed,
        ),
        control=args.control,
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
