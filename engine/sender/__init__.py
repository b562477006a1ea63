"""Sender pool: claim -> rate-limit -> send over pooled SMTP -> ack / retry / dead-letter.

Imports the queue, transports, policy and leaves; never the API.
"""

from engine.sender.pool import SenderPool, SenderStatistics

__all__ = ["SenderPool", "SenderStatistics"]
