"""The sink process: an aiosmtpd server on a uvloop event loop, stopped by SIGINT/SIGTERM.

With ``protocol``, the only code in the engine that imports asyncio, aiosmtpd and uvloop.
Decisions come from ``faults`` and ``headers`` (pure); this module draws the random
numbers the fault ratios need, acts on the verdicts (wait, refuse, hang up) and records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

from engine.sink.faults import (
    DataVerdict,
    FaultOptions,
    Reply,
    control_faults,
    decide_data,
    decide_rcpt,
)
from engine.sink.headers import scan_ids
from engine.sink.options import SinkOptions
from engine.sink.protocol import SinkEnvelope, SinkSMTP
from engine.sink.record import Counters, Maildir, MessageLog, Received, write_atomic

logger = logging.getLogger(__name__)

# Generous: the sink must never be the reason a large test message fails.
DATA_SIZE_LIMIT = 64 * 1024 * 1024
LOG_FLUSH_S = 0.2
STATS_WRITE_S = 0.25
# How often the --control file is looked at (one stat() per period, off the hot path).
CONTROL_POLL_S = 0.2
IDENT = "engine-sink"


class SinkHandler:
    """aiosmtpd handler: advertises PIPELINING, acts on the fault verdicts, records DATA."""

    def __init__(
        self,
        counters: Counters,
        log: MessageLog | None,
        maildir: Maildir | None,
        faults: FaultOptions,
    ) -> None:
        self.counters = counters
        self.log = log
        self.maildir = maildir
        self.set_faults(faults)
        # Set when the sink stops: a transaction finishing after the log was closed is
        # refused (421), never answered 250 without being recorded.
        self.closing = False
        # One generator for the process: with a seed, the n-th transaction's fate is fixed.
        self._random = random.Random(faults.seed)

    def set_faults(self, faults: FaultOptions) -> None:
        """Apply ``faults`` from the next transaction on (the --control file changed)."""
        self.faults = faults
        # Whether every transaction is decided, or only those with tagged recipients.
        self._every_transaction = faults.active
        self._draws = faults.draws

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        # With the 5-argument hook aiosmtpd leaves recording the client's name to us.
        session.host_name = hostname
        # aiosmtpd's last line is "250 HELP"; PIPELINING goes just before it.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self,
        server: SinkSMTP,
        session: Session,
        envelope: SinkEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if "+" in address:  # the only fault work an untagged recipient costs
            verdict = decide_rcpt(address)
            if isinstance(verdict, Reply):
                self.counters.refuse_rcpt(verdict.code)
                if verdict.closes:
                    await server.push(str(verdict))
                    await server.hang_up()
                return str(verdict)
            if verdict is not None:
                tagged = envelope.faults
                envelope.faults = verdict if tagged is None else tagged.merge(verdict)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SinkSMTP, session: Session, envelope: SinkEnvelope) -> str:
        if self.closing:
            return "421 4.3.2 sink shutting down"
        if envelope.faults is not None or self._every_transaction:
            verdict = self._data_verdict(envelope.faults)
            if verdict.delay_s > 0:
                server.flush_replies()  # nothing held while this transaction waits
                await asyncio.sleep(verdict.delay_s)
            if verdict.drop:
                self.counters.dropped += 1
                await server.hang_up()
            if verdict.reply is not None:
                self.counters.refuse(verdict.reply.code)
                if verdict.reply.closes:
                    await server.push(str(verdict.reply))
                    await server.hang_up()
                return str(verdict.reply)
        content = envelope.original_content
        assert content is not None  # aiosmtpd sets it before calling this hook
        ids = scan_ids(content)
        self.counters.record(ids.message_id, len(content))
        if self.maildir is not None:
            self.maildir.deliver(content)
        if self.log is not None:
            self.log.append(
                Received(
                    at=time.time(),
                    message_id=_text(ids.message_id),
                    job_id=_text(ids.job_id),
                    mail_from=envelope.mail_from,
                    rcpt_tos=list(envelope.rcpt_tos),
                    size=len(content),
                )
            )
        return "250 OK"

    def _data_verdict(self, tagged: DataVerdict | None) -> DataVerdict:
        """The end-of-DATA verdict; draws for every transaction when a ratio is set."""
        if not self._draws:
            return decide_data(tagged, self.faults)
        draw = self._random.random
        return decide_data(tagged, self.faults, drop_draw=draw(), fail_draw=draw())

    async def handle_exception(self, error: Exception) -> str:
        # A local failure (disk full, bad maildir) is temporary from the client's view.
        logger.error("sink.handler.failed: %r", error, exc_info=error)
        return f"451 4.3.0 sink error: {type(error).__name__}"


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _hostport(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _every(period_s: float, action: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(period_s)
        action()


class ControlFile:
    """The --control file: re-read when its identity (inode, mtime, size) changes.

    Polled from a background task, so the SMTP hot path never touches the file system.
    A file that cannot be used (bad JSON, bad value) is reported and leaves the faults
    in force unchanged until it changes again.
    """

    def __init__(self, path: Path, flags: FaultOptions, handler: SinkHandler, quiet: bool) -> None:
        self.path = path
        self.flags = flags
        self.handler = handler
        self.quiet = quiet
        # Identity of the file last looked at; None: there was none.
        self._seen: tuple[int, int, int] | None = None
        self.error: str | None = None
        self.active = False  # whether the faults in force come from the file

    def poll(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            seen = None
        else:
            seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen == self._seen:
            return
        self._seen = seen
        try:
            control = None if seen is None else json.loads(self.path.read_bytes())
            faults = control_faults(self.flags, control)
        except FileNotFoundError:
            self._seen = None  # removed between stat() and read: look again next time
            return
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            self.error = str(exc)
            print(f"sink: control file {self.path} ignored: {exc}", file=sys.stderr, flush=True)
            return
        self.error = None
        self.active = control is not None
        self.handler.set_faults(faults)
        if not self.quiet:
            source = "control file" if self.active else "flags"
            print(f"sink faults from {source}: {_describe(faults)}", flush=True)

    def statistics(self) -> dict[str, Any]:
        """The faults in force, for the stats file's "faults" key."""
        f = self.handler.faults
        return {
            "fail_ratio": f.fail_ratio,
            "fail_code": f.fail_code,
            "drop_ratio": f.drop_ratio,
            "delay_ms": f.delay_ms,
            "source": "control" if self.active else "flags",
            "error": self.error,
        }


def _describe(f: FaultOptions) -> str:
    return (
        f"fail_ratio={f.fail_ratio:g} fail_code={f.fail_code} drop_ratio={f.drop_ratio:g} "
        f"delay_ms={f.delay_ms}"
    )


async def serve_sink(options: SinkOptions, counters: Counters) -> None:
    """Listen, announce readiness, record messages until SIGINT/SIGTERM, then flush."""
    loop = asyncio.get_running_loop()
    log = MessageLog(options.log) if options.log is not None else None
    maildir = Maildir(options.maildir) if options.maildir is not None else None
    handler = SinkHandler(counters, log, maildir, options.faults)
    control = (
        ControlFile(options.control, options.faults, handler, options.quiet)
        if options.control is not None
        else None
    )
    # Explicit: aiosmtpd would otherwise call socket.getfqdn() (DNS) per connection.
    hostname = socket.gethostname()

    def write_stats() -> None:
        if options.stats is None:
            return
        if control is None:
            write_atomic(options.stats, msgspec.json.encode(counters.statistics()))
        else:
            stats = msgspec.structs.asdict(counters.statistics())
            stats["faults"] = control.statistics()
            write_atomic(options.stats, msgspec.json.encode(stats))

    def new_connection() -> SinkSMTP:
        counters.connections += 1
        return SinkSMTP(
            handler,
            hostname=hostname,
            ident=IDENT,
            decode_data=False,
            enable_SMTPUTF8=True,
            data_size_limit=DATA_SIZE_LIMIT,
            loop=loop,
        )

    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server: asyncio.AbstractServer | None = None
    try:
        if control is not None:
            control.poll()  # a control file present at start applies from the first message
        server = await loop.create_server(
            new_connection, options.host, options.port, reuse_address=True, backlog=1024
        )
        bound = _hostport(server.sockets[0].getsockname())
        write_stats()
        if options.ready_file is not None:
            write_atomic(options.ready_file, bound.encode())
        if not options.quiet:
            print(f"sink listening on {bound}", flush=True)
        async with asyncio.TaskGroup() as tasks:
            periodic = [tasks.create_task(_every(STATS_WRITE_S, write_stats))]
            if log is not None:
                periodic.append(tasks.create_task(_every(LOG_FLUSH_S, log.flush)))
            if control is not None:
                periodic.append(tasks.create_task(_every(CONTROL_POLL_S, control.poll)))
            await stop.wait()
            for task in periodic:
                task.cancel()
    finally:
        # Open connections are cancelled when the loop shuts down; nothing acked is lost:
        # handle_DATA records a message before its 250 is sent (and only then).
        handler.closing = True
        if server is not None:
            server.close()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if log is not None:
            log.close()
        write_stats()


def run_sink(options: SinkOptions) -> int:
    """Run the sink on uvloop; print the summary line; return 0 after SIGINT/SIGTERM."""
    # aiosmtpd logs every command at INFO; keep its cost to a level check.
    logging.getLogger("mail.log").setLevel(logging.ERROR if options.quiet else logging.WARNING)
    counters = Counters()
    try:
        uvloop.run(serve_sink(options, counters))
    except OSError as exc:
        print(f"sink: {exc}", file=sys.stderr)
        return 1
    if not options.quiet:
        print(counters.summary_line(), flush=True)
    sys.stdout.flush()
    return 0
