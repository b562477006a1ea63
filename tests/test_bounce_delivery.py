"""Bounce classes end to end: the sender, a real Redis and the real sink over TCP.

The sink's recipient tags make the replies (+550 at RCPT, +552 / +452 at the end of
DATA, +drop: the content arrives, then the connection is cut with no final reply);
the job record, its events and its API view must carry the class.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import msgspec
import pytest
import trio

from engine.config import QueueSettings, SenderSettings, SmtpSettings
from engine.embedded import SinkProcess
from engine.ids import new_ids
from engine.metrics import Metrics
from engine.models import Event, Message
from engine.queue import EventLog, JobRecord, NewJob, Queue, Redis, job_view
from engine.sender import SenderPool
from engine.transport import SmtpPool
from engine.watch import format_event


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    with SinkProcess(workdir=tmp_path_factory.mktemp("sink")) as s:
        yield s


def _settings(on_uncertain: str = "retry") -> QueueSettings:
    # Long backoff: a retried job stays "retrying" while the test looks at it.
    return QueueSettings(
        lease_s=5, heartbeat_s=1, backoff_base_s=60, backoff_max_s=60,
        on_uncertain=on_uncertain,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture
async def smtp(sink: SinkProcess) -> AsyncIterator[SmtpPool]:
    pool = SmtpPool(SmtpSettings(starttls="never", command_timeout_s=5), sink.url)
    yield pool
    await pool.aclose()


async def _send(
    redis: Redis, smtp: SmtpPool, settings: QueueSettings, *to: str, metrics: Metrics | None = None
) -> tuple[Queue, list[str]]:
    """Enqueue one message per address (in this order), run one sender until each has
    left ``processing``; return the queue and the ids."""
    queue = Queue(redis, settings, "bounce-test")
    ids = new_ids(len(to))
    async with trio.open_nursery() as nursery:
        await nursery.start(queue.serve)
        jobs = []
        for job_id, address in zip(ids, to, strict=True):
            msg = Message("e@localhost", [address], [], [], "Hi", "body", None, [], [], [])
            jobs.append(NewJob(job_id, msgspec.msgpack.encode(msg)))
        await queue.enqueue(jobs)
        pool = SenderPool(
            queue, smtp, SenderSettings(senders=1, claim_batch=8), settings,
            metrics=(metrics or Metrics()).sender,
        )  # fmt: skip
        await nursery.start(pool.serve)
        with trio.fail_after(15):
            while any(r is None or r.state == "processing" for r in await _records(queue, ids)):
                await trio.sleep(0.02)
        pool.stop_claiming()
        nursery.cancel_scope.cancel()
    return queue, ids


async def _records(queue: Queue, ids: list[str]) -> list[JobRecord | None]:
    found = await queue.get_many(ids)
    return [None if r is None or r.state == "queued" else r for r in found]


async def _record(queue: Queue, job_id: str) -> JobRecord:
    rec = await queue.get(job_id)
    assert rec is not None
    return rec


async def _last_event(queue: Queue, job_id: str) -> Event:
    events = (await EventLog(queue.client, queue.keys).range()).events
    return [e for e in events if e.id == job_id][-1]


async def test_a_refused_recipient_is_a_dead_letter_of_class_invalid_recipient(
    redis: Redis, smtp: SmtpPool
) -> None:
    metrics = Metrics()
    queue, (job_id,) = await _send(redis, smtp, _settings(), "bob+550@example.com", metrics=metrics)
    # Counted by class on /metrics.
    assert 'engine_bounces_total{class="invalid-recipient"} 1.0' in metrics.render(None).decode()
    rec = await _record(queue, job_id)
    assert (rec.state, rec.bounce) == ("failed", "invalid-recipient")
    assert rec.last_error is not None and "5.1.1" in rec.last_error
    assert await queue.dead_ids() == [job_id]
    event = await _last_event(queue, job_id)
    assert (event.type, event.bounce) == ("failed", "invalid-recipient")
    line = format_event(event)  # what `engine watch` prints
    assert "failed" in line and "bounce=invalid-recipient  error: " in line
    assert "bounce" not in format_event(msgspec.structs.replace(event, bounce=None))
    view = msgspec.json.decode(msgspec.json.encode(job_view(rec)))
    assert view["bounce"] == "invalid-recipient" and "5.1.1" in view["last_error"]


async def test_the_final_reply_decides_by_class(redis: Redis, smtp: SmtpPool) -> None:
    queue, (too_big, storage, fine) = await _send(
        redis, smtp, _settings(), "big+552@example.com", "full+452@example.com",
        "fine@example.com",
    )  # fmt: skip
    rec = await _record(queue, too_big)
    assert (rec.state, rec.bounce) == ("failed", "message-too-large")
    assert (await _last_event(queue, too_big)).bounce == "message-too-large"
    rec = await _record(queue, storage)  # 452 4.3.1: the server's storage, not the mailbox
    assert (rec.state, rec.bounce) == ("retrying", "temporary")
    event = await _last_event(queue, storage)
    assert (event.type, event.bounce) == ("retrying", "temporary")
    rec = await _record(queue, fine)
    assert (rec.state, rec.bounce) == ("sent", None)
    assert (await _last_event(queue, fine)).bounce is None


@pytest.mark.parametrize(
    ("on_uncertain", "state", "event"), [("retry", "retrying", "retrying"),
                                         ("dead-letter", "failed", "failed")]
)  # fmt: skip
async def test_a_connection_cut_after_the_whole_message_is_uncertain(
    redis: Redis, smtp: SmtpPool, sink: SinkProcess, on_uncertain: str, state: str, event: str
) -> None:
    """+drop: the sink reads the content up to its final dot, then hangs up. The message
    before it and the one pipelined behind it are delivered; the dropped one is
    uncertain, and the setting decides whether it is retried or dead-lettered."""
    dropped_before = (await trio.to_thread.run_sync(sink.stats)).get("dropped", 0)
    queue, (a, b, c) = await _send(
        redis, smtp, _settings(on_uncertain), "a@example.com", "b+drop@example.com",
        "c@example.com",
    )  # fmt: skip
    rec = await _record(queue, b)
    assert (rec.state, rec.bounce) == (state, "uncertain")
    assert rec.last_error is not None and "delivery uncertain" in rec.last_error
    got = await _last_event(queue, b)
    assert (got.type, got.bounce) == (event, "uncertain")
    assert (await queue.dead_ids()) == ([b] if on_uncertain == "dead-letter" else [])
    assert [(await _record(queue, j)).state for j in (a, c)] == ["sent", "sent"]
    # The sink counts a drop once it has read the content up to its final dot.
    await trio.to_thread.run_sync(lambda: sink.wait_stats(dropped=dropped_before + 1))


async def test_a_connection_cut_before_the_content_is_not_uncertain(
    redis: Redis, smtp: SmtpPool
) -> None:
    """+421 at RCPT: the server hangs up before any content went out; a reply, so the
    class comes from it (4.3.2: temporary), never "uncertain"."""
    queue, (job_id,) = await _send(redis, smtp, _settings("dead-letter"), "x+421@example.com")
    rec = await _record(queue, job_id)
    assert (rec.state, rec.bounce) == ("retrying", "temporary")
