"""SMTP sink (``engine sink``): aiosmtpd on uvloop in its own process, for dev, tests, benchmarks.

The only part of the engine that may import asyncio, aiosmtpd or uvloop, and only lazily
(in ``server`` and ``protocol``), so importing this package stays cheap.

    cli      flags -> SinkOptions; ``add_arguments`` and ``run`` for ``engine sink``
    options  SinkOptions: what one sink process is told to do
    server   asyncio/aiosmtpd/uvloop: the SMTP handler and the process's main loop
    protocol aiosmtpd's SMTP with hot-path shortcuts (fast addresses, block DATA reads,
             coalesced pipelined replies) and ``hang_up`` for faults that close
    record   counters, statistics, the JSON-lines log, the Maildir, atomic files
    headers  cheap bytes scan for Message-ID and X-Engine-Job-Id
    faults   pure fault injection: recipient tags (``decide_rcpt``) and flags plus random
             draws (``decide_data``) -> verdicts the server acts on
"""

from engine.sink.cli import add_arguments, run
from engine.sink.options import SinkOptions

__all__ = ["SinkOptions", "add_arguments", "run"]
