"""The engine's one exception hierarchy; adapters translate foreign errors into it.

    EngineError
    ├── ConfigError            bad settings (file, env, flags)
    ├── ValidationError        a request field is invalid (carries the field path)
    ├── QueueError             Redis-side failures
    │   └── QueueUnavailable   Redis unreachable or timing out
    ├── HistoryError           PostgreSQL-side failures (the message history)
    │   └── HistoryUnavailable PostgreSQL unreachable, timing out, or in recovery
    └── TransportError         delivery failed (carries the SMTP reply code or HTTP status)
        ├── TemporaryFailure   worth retrying: network errors, timeouts, 4xx (HTTP: 429, 5xx)
        │   ├── TransportUnavailable  the server (or the way to it) is down or refuses us
        │   │                          before any message's transaction: not the message's
        │   │                          fault; it costs no attempt and opens the breaker
        │   └── DeliveryUncertain  the whole message went out, no final reply came: it may
        │                          have been delivered (queue.on_uncertain decides)
        └── PermanentFailure   not worth retrying: 5xx (HTTP: other 4xx)

Imports nothing from the engine.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class ConfigError(EngineError):
    """Settings could not be loaded or are inconsistent."""


class ValidationError(EngineError):
    """A request is invalid; ``field`` is a JSON-pointer-like path such as ``to[1]``."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class QueueError(EngineError):
    """Redis answered with an error the engine did not expect."""


class QueueUnavailable(QueueError):
    """Redis could not be reached (connection refused, reset or timed out)."""


class HistoryError(EngineError):
    """PostgreSQL (the message history) answered with an error the engine did not expect."""


class HistoryUnavailable(HistoryError):
    """PostgreSQL could not be reached, timed out, or is starting or shutting down."""


class TransportError(EngineError):
    """A message could not be handed to the mail server. ``refused``: when the server
    refused every recipient, each one's (address, code, text). ``code`` is an SMTP reply
    code; a provider's HTTP API sets ``http_status`` instead (its statuses mean other
    things: an HTTP 503 is temporary, an SMTP 503 is not)."""

    http_status: int | None = None

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        refused: tuple[tuple[str, int, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.code = code
        self.refused = refused


class TemporaryFailure(TransportError):
    """Delivery may succeed later (connection errors, timeouts, SMTP 4xx, HTTP 429/5xx).
    ``retry_after_s``: how long the server asked us to wait (an HTTP Retry-After), if it did."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        refused: tuple[tuple[str, int, str], ...] = (),
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, code=code, refused=refused)
        self.retry_after_s = retry_after_s


class TransportUnavailable(TemporaryFailure):
    """The transport cannot take any message now: connection refused or reset before MAIL
    FROM, TLS failure, a 421 greeting, EHLO/AUTH refused. The message was not tried."""


class DeliveryUncertain(TemporaryFailure):
    """The whole message was sent (end of DATA written), then the connection broke or the
    server went silent before its final reply: the server may have taken it."""


class PermanentFailure(TransportError):
    """Delivery will not succeed by retrying (SMTP 5xx)."""
