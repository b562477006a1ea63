"""SMTP sink (``engine sink``): aiosmtpd on uvloop in its own process, for dev, tests, benchmarks.

The only part of the engine that may import asyncio, aiosmtpd or uvloop, and only lazily
(in ``server`` and ``protocol``), so importing this package stays cheap.

    cli      flags -> SinkOptions; ``add_arguments`` and ``run`` for ``engine sink``
    server   asyncio/aiosmtpd/uvloop: the SMTP handler and the process's main loop
    protocol aiosmtpd's SMTP with hot-path shortcuts (fast addresses, block DATA reads,
             coalesced pipelined replies)
    record   counters, statistics, the JSON-lines log, the Maildir, atomic files
    headers  cheap bytes scan for Message-ID and X-Engine-Job-Id
    faults   pure: what to answer a recipient (``decide_rcpt``), grows into fault injection
"""

from engine.sink.cli import SinkOptions, add_arguments, run

__all__ = ["SinkOptions", "add_arguments", "run"]
