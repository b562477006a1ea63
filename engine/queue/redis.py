"""Redis connection, Lua script registry, and translation of coredis errors.

The adapter boundary: nothing outside ``engine.queue`` sees a coredis exception.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any

import coredis
import coredis.exceptions
import trio
from coredis.commands.script import Script
from coredis.retry import NoRetryPolicy

from engine.config import redact_url
from engine.errors import ConfigError, QueueError, QueueUnavailable

log = logging.getLogger(__name__)

SCRIPT_NAMES = (
    "enqueue",
    "claim",
    "ack",
    "fail",
    "suppress_refused",
    "release",
    "renew",
    "reap",
    "dead_retry",
    "dead_delete",
    "cancel",
    "slowdown",
    "schedule_put",
    "schedule_advance",
    "schedule_delete",
    "webhook_claim",
    "webhook_owe",
    "webhook_idle",
    "blob_hold",
    "blob_commit",
    "provider_events",
    "history_records",
    "transport_slots",
)

# The scripts that move work out (claim, send, retry, recover, cancel, delete) run even
# when Redis is over its maxmemory (noeviction refuses every other write then): senders
# keep draining whatever happens. Those that add work (enqueue, a dead letter retried, a
# schedule's tick or its definition) are refused instead. Ingest stops well before that
# (ingest.max_memory_ratio); this is the guarantee behind it. Script flags: Redis >= 7.
ALLOW_OOM = frozenset(
    {"claim", "ack", "fail", "release", "renew", "reap", "dead_delete", "cancel", "slowdown",
     "schedule_delete", "webhook_claim", "suppress_refused", "transport_slots"}
)  # fmt: skip

Redis = coredis.Redis[bytes]


@contextmanager
def translate_errors() -> Iterator[None]:
    """Map coredis/socket failures to QueueUnavailable and other Redis errors to QueueError."""
    try:
        yield
    except (
        coredis.exceptions.ConnectionError,
        TimeoutError,
        OSError,
        trio.BrokenResourceError,
        trio.ClosedResourceError,
    ) as exc:
        raise QueueUnavailable(f"redis unavailable: {exc or type(exc).__name__}") from exc
    except coredis.exceptions.RedisError as exc:
        raise QueueError(f"redis error: {exc}") from exc


def load_script_sources() -> dict[str, str]:
    """Every ``lua/NAME.lua`` shipped with the package, ``lua/_lib.lua`` prepended
    (Redis scripts cannot call each other; the shared functions travel with each)."""
    base = resources.files("engine.queue") / "lua"
    lib = (base / "_lib.lua").read_text()
    return {name: lib + (base / f"{name}.lua").read_text() for name in SCRIPT_NAMES}


def with_flags(name: str, source: str) -> str:
    """``source`` as loaded into Redis: the scripts in ALLOW_OOM start with their flag."""
    return f"#!lua flags=allow-oom\n{source}" if name in ALLOW_OOM else source


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a command because it is over its maxmemory (noeviction):
    nothing of that command (or script: it stops at its first write) was written."""
    return isinstance(exc, coredis.exceptions.ResponseError) and str(exc).startswith("OOM ")


class Scripts:
    """The Lua scripts, registered on one client (EVALSHA; reloaded on NOSCRIPT)."""

    def __init__(self, client: Redis) -> None:
        sources = load_script_sources()
        self._by_name: dict[str, Script[bytes]] = {
            name: client.register_script(with_flags(name, src)) for name, src in sources.items()
        }

    def __getitem__(self, name: str) -> Script[bytes]:
        return self._by_name[name]

    async def load(self, client: Redis) -> None:
        """SCRIPT LOAD every script up front, so many first calls don't all hit NOSCRIPT."""
        with translate_errors():
            for script in self._by_name.values():
                await client.script_load(script.script)


@asynccontextmanager
async def open_redis(
    url: str, *, connect_timeout_s: float = 5.0, command_timeout_s: float = 5.0
) -> AsyncIterator[Redis]:
    """Connect to ``redis://`` / ``rediss://`` / ``unix://`` ``url``; bytes replies.

    Retries are off: every write script is idempotent per id, and the callers decide
    what a failure means (503 to a client, back-off for a sender).
    """
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "connect_timeout": connect_timeout_s,
        "stream_timeout": command_timeout_s,
        "retry_policy": NoRetryPolicy(),
    }
    try:
        with translate_errors():
            client: Redis = coredis.Redis.from_url(url, **kwargs)
    except ValueError as exc:  # a malformed URL; its text never reaches an error whole
        raise ConfigError(f"redis.url {redact_url(url)!r}: {exc}") from None
    async with client:
        yield client
