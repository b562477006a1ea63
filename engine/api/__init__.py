"""HTTP surface: the route table, its router, and the handlers bound to it.

Imports the queue and leaves; never the senders or transports. Callers use this face.
"""

from engine.api.app import body_limits, build_app
from engine.api.asgi import ASGIApp
from engine.api.backend import ApiBackend, Senders
from engine.api.hub import EventHub, HubStatistics

__all__ = [
    "ASGIApp",
    "ApiBackend",
    "EventHub",
    "HubStatistics",
    "Senders",
    "body_limits",
    "build_app",
]
