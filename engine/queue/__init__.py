"""The reliable Redis queue: the only package that talks to Redis.

Multi-key transitions are Lua scripts in ``lua/``; key names come from ``engine.keys``;
the job's wire format (stored jobs, API views, event entries) is ``wire``. Callers import
from this face only (an import-linter contract). Imports the leaves and policy; never
the API, senders or transports.
"""

from engine.queue.access import AccessStore
from engine.queue.blobs import BlobStore
from engine.queue.breaker import Breaker, BreakerState
from engine.queue.commit import GroupCommitter
from engine.queue.domains import DomainStore
from engine.queue.drain import DrainMeter
from engine.queue.events import EventLog, EventPage, JobHistory
from engine.queue.history import GroupLag, HistoryStream, IdempotencyProbe, StoredJob
from engine.queue.jobs import (
    ClaimedJob,
    EnqueueRequest,
    EnqueueResult,
    Failure,
    JobRecord,
    NewJob,
    Queue,
    QueueCounts,
    ReapResult,
    decode_message,
)
from engine.queue.limits import BucketState, RateLimits
from engine.queue.provider_events import ProviderEventStore, Recorded
from engine.queue.redis import SCRIPT_NAMES, Redis, load_script_sources, open_redis
from engine.queue.resp import RespConnection
from engine.queue.schedules import Schedule, ScheduleStore
from engine.queue.suppression import Suppression, SuppressionPage, SuppressionStore, address_key
from engine.queue.templates import TemplateStore
from engine.queue.webhooks import Owed, WebhookStore
from engine.queue.wire import (
    TAG_SEPARATOR,
    encode_message,
    event_order,
    job_view,
    new_job,
    parse_entry,
    parse_event_id,
)

__all__ = [
    "SCRIPT_NAMES",
    "TAG_SEPARATOR",
    "AccessStore",
    "BlobStore",
    "Breaker",
    "BreakerState",
    "BucketState",
    "ClaimedJob",
    "DomainStore",
    "DrainMeter",
    "EnqueueRequest",
    "EnqueueResult",
    "EventLog",
    "EventPage",
    "Failure",
    "GroupCommitter",
    "GroupLag",
    "HistoryStream",
    "IdempotencyProbe",
    "JobHistory",
    "JobRecord",
    "NewJob",
    "Owed",
    "ProviderEventStore",
    "Queue",
    "QueueCounts",
    "RateLimits",
    "ReapResult",
    "Recorded",
    "Redis",
    "RespConnection",
    "Schedule",
    "ScheduleStore",
    "StoredJob",
    "Suppression",
    "SuppressionPage",
    "SuppressionStore",
    "TemplateStore",
    "WebhookStore",
    "address_key",
    "decode_message",
    "encode_message",
    "event_order",
    "job_view",
    "load_script_sources",
    "new_job",
    "open_redis",
    "parse_entry",
    "parse_event_id",
]
