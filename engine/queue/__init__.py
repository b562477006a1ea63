"""The reliable Redis queue: the only package that talks to Redis.

Multi-key transitions are Lua scripts in ``lua/``; key names come from ``engine.keys``.
Imports the leaves and policy; never the API, senders or transports.
"""

from engine.queue.commit import GroupCommitter
from engine.queue.jobs import ClaimedJob, JobRecord, NewJob, Queue, QueueCounts, ReapResult
from engine.queue.limits import BucketState, RateLimits
from engine.queue.redis import open_redis

__all__ = [
    "BucketState",
    "ClaimedJob",
    "GroupCommitter",
    "JobRecord",
    "NewJob",
    "Queue",
    "QueueCounts",
    "RateLimits",
    "ReapResult",
    "open_redis",
]
