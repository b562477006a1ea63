"""Sender pool: claim -> rate-limit -> send over pooled SMTP -> ack / retry / dead-letter.

Imports the queue, transports, policy and leaves; never the API.
"""

from engine.sender.blobs import AttachmentCache, AttachmentStatistics
from engine.sender.gate import TransportGate
from engine.sender.pool import SenderPool, SenderStatistics
from engine.sender.routing import Route, Router
from engine.sender.signing import Signer, SignerStatistics

__all__ = [
    "AttachmentCache",
    "AttachmentStatistics",
    "Route",
    "Router",
    "SenderPool",
    "SenderStatistics",
    "Signer",
    "SignerStatistics",
    "TransportGate",
]
