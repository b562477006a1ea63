"""The history's parts of one engine process, made by the composition root in one call
(``build_history``): the database pool, the writer (and lag watcher), what the API reads,
and the Idempotency-Key probe. None when ``history.dsn`` is unset: no history."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import Settings
from engine.errors import ConfigError
from engine.history.db import Database
from engine.history.store import HistoryStore
from engine.history.writer import HistoryWriter
from engine.metrics import Metrics
from engine.queue import HistoryStream, IdempotencyProbe, Queue, RespConnection


@dataclass(frozen=True, slots=True)
class History:
    db: Database
    writer: HistoryWriter  # writes when history.writer; always watches the lag
    store: HistoryStore
    probe: IdempotencyProbe | None  # None: history.idempotency_window_s = 0

    async def aclose(self) -> None:
        await self.writer.stream.aclose()
        await self.db.aclose()


def build_history(
    settings: Settings, queue: Queue, metrics: Metrics, *, redis_url: str
) -> History | None:
    h = settings.history
    if not h.dsn:
        return None
    if h.dsn == "local":
        raise ConfigError('history.dsn = "local" is resolved by `engine serve` (it starts one)')
    db = Database(
        h.dsn, size=h.pool_size, connect_timeout_s=h.connect_timeout_s,
        statement_timeout_s=h.statement_timeout_s, name=f"engine-{queue.instance}"[:63],
    )  # fmt: skip
    reader = RespConnection(
        redis_url, connect_timeout_s=settings.redis.connect_timeout_s,
        command_timeout_s=settings.redis.command_timeout_s,
    )  # fmt: skip
    writer = HistoryWriter(
        HistoryStream(queue.client, queue.keys, reader), db, h, queue.instance,
        events_maxlen=settings.queue.events_maxlen, metrics=metrics.history,
    )  # fmt: skip
    window = min(h.idempotency_window_s, h.retention_days * 86400)
    probe = IdempotencyProbe(queue.client, queue.keys) if window > 0 else None
    return History(db, writer, HistoryStore(db, idempotency_window_s=window), probe)
