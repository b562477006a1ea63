"""HTTP surface: a raw-ASGI fast path for ingest and status, Quart for everything else.

Imports the queue and leaves; never the senders or transports. Callers use this face.
"""

from engine.api.app import build_app
from engine.api.asgi import ASGIApp
from engine.api.backend import ApiBackend, Senders
from engine.api.hub import EventHub, HubStatistics

__all__ = ["ASGIApp", "ApiBackend", "EventHub", "HubStatistics", "Senders", "build_app"]
