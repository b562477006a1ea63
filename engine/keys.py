"""Every Redis key name the engine uses. Nothing else may spell a key.

All keys of one queue shard share the hash tag ``{<queue>:<shard>}`` so they live
in one Redis Cluster slot and multi-key Lua scripts stay legal there.
Imports nothing from the engine.
"""

from __future__ import annotations

from typing import Final

PRIORITIES: Final = ("high", "normal", "low")


class Keys:
    """Key names of one queue shard."""

    __slots__ = ("prefix", "queue", "shard")

    def __init__(self, queue: str = "mail", shard: int = 0) -> None:
        self.queue = queue
        self.shard = shard
        self.prefix = f"{{{queue}:{shard}}}:"

    @property
    def job_prefix(self) -> str:
        """Prefix that Lua scripts append a job id to (they build job keys in-slot)."""
        return self.prefix + "job:"

    def job(self, job_id: str) -> str:
        return self.prefix + "job:" + job_id

    def ready(self, priority: str = "normal") -> str:
        return self.prefix + "ready:" + priority

    def processing(self, instance: str) -> str:
        return self.prefix + "processing:" + instance

    @property
    def leases(self) -> str:
        return self.prefix + "leases"

    @property
    def instances(self) -> str:
        return self.prefix + "instances"

    @property
    def delayed(self) -> str:
        return self.prefix + "delayed"

    @property
    def dead(self) -> str:
        return self.prefix + "dead"

    def idem(self, key: str) -> str:
        return self.prefix + "idem:" + key

    @property
    def events(self) -> str:
        return self.prefix + "events"

    @property
    def stats(self) -> str:
        """Hash of monotonically increasing counters (enqueued, sent, failed...)."""
        return self.prefix + "stats"
