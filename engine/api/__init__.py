"""HTTP surface: a raw-ASGI fast path for ingest and status, Quart for everything else.

Imports the queue and leaves; never the senders or transports.
"""

from engine.api.app import ApiBackend, build_app

__all__ = ["ApiBackend", "build_app"]
