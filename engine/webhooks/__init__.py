"""Webhooks: endpoints that are told what happened to their tenant's messages, signed
per the Standard Webhooks specification, at least once, SSRF-safe. Reads Redis only
through ``engine.queue``; never imports the API or the senders. Callers use this face.
"""

from engine.webhooks.dispatcher import Attempt, Dispatcher
from engine.webhooks.endpoint import (
    EVENT_TYPES,
    MAX_BATCH,
    Endpoint,
    new_secret,
    payload,
    sign,
)
from engine.webhooks.target import Refused, parse_url

__all__ = [
    "EVENT_TYPES",
    "MAX_BATCH",
    "Attempt",
    "Dispatcher",
    "Endpoint",
    "Refused",
    "new_secret",
    "parse_url",
    "payload",
    "sign",
]
