"""MemoryTransport: the in-memory stand-in senders are tested against."""

from __future__ import annotations

from contextlib import aclosing

import pytest
import trio
import trio.testing

from engine.errors import PermanentFailure, TemporaryFailure, TransportError, TransportUnavailable
from engine.transport import MemoryTransport, OutgoingMail, SendOutcome, SendResult, Transport


def mail(job_id: str = "J1", to: str = "bob@example.com") -> OutgoingMail:
    return OutgoingMail(job_id, "ann@example.org", [to], b"Subject: x\r\n\r\nhi\r\n")


async def send_one(transport: Transport, m: OutgoingMail) -> SendResult:
    """``send_many`` of one mail: its SendResult, or its TransportError raised."""
    async with aclosing(transport.send_many([m])) as outcomes:
        [(_, outcome)] = [item async for item in outcomes]
    if isinstance(outcome, TransportError):
        raise outcome
    return outcome


async def test_records_accepted_mail() -> None:
    transport: Transport = MemoryTransport()
    result = await send_one(transport, mail())
    assert result.code == 250
    assert isinstance(transport, MemoryTransport)
    assert [m.job_id for m in transport.sent] == ["J1"]
    stats = transport.statistics()
    assert (stats.sends, stats.failures, stats.in_flight, stats.closed) == (1, 0, 0, False)


async def test_scripted_outcomes_then_fail_rule() -> None:
    def fail(m: OutgoingMail) -> TransportError | None:
        return PermanentFailure("no such user", code=550) if "bad" in m.recipients[0] else None

    transport = MemoryTransport(fail=fail)
    custom = SendResult(250, "queued as X")
    transport.script(TemporaryFailure("busy", code=451), custom)
    with pytest.raises(TemporaryFailure):
        await send_one(transport, mail("J1"))
    assert await send_one(transport, mail("J2")) is custom
    with pytest.raises(PermanentFailure) as info:
        await send_one(transport, mail("J3", to="bad@example.com"))
    assert info.value.code == 550
    await send_one(transport, mail("J4"))
    assert [m.job_id for m in transport.sent] == ["J2", "J4"]
    assert [m.job_id for m in transport.attempts] == ["J1", "J2", "J3", "J4"]
    assert transport.statistics().failures == 2


async def test_delay_and_cancellation(autojump_clock: trio.testing.MockClock) -> None:
    transport = MemoryTransport(delay_s=5.0)
    with trio.move_on_after(1.0):
        await send_one(transport, mail("J1"))
    assert transport.sent == []
    assert transport.statistics().in_flight == 0
    start = trio.current_time()
    await send_one(transport, mail("J2"))
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_wait_sent() -> None:
    transport = MemoryTransport(delay_s=0.01)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(send_one, transport, mail(f"J{i}"))
        with trio.fail_after(5):
            await transport.wait_sent(3)
    assert len(transport.sent) == 3


async def test_closed_transport_refuses() -> None:
    transport = MemoryTransport()
    await transport.aclose()
    assert transport.statistics().closed
    with pytest.raises(TemporaryFailure):
        await send_one(transport, mail())


async def collect(transport: Transport, mails: list[OutgoingMail]) -> list[SendOutcome]:
    async with aclosing(transport.send_many(mails)) as outcomes:
        return [item async for item in outcomes]


async def test_send_many_yields_each_outcome_in_order() -> None:
    def fail(m: OutgoingMail) -> TransportError | None:
        return PermanentFailure("no such user", code=550) if "bad" in m.recipients[0] else None

    transport = MemoryTransport(fail=fail)
    custom = SendResult(250, "queued as X")
    transport.script(custom, TemporaryFailure("busy", code=451))
    mails = [mail("J1"), mail("J2"), mail("J3", to="bad@example.com"), mail("J4")]
    outcomes = await collect(transport, mails)
    assert [m for m, _ in outcomes] == mails
    assert outcomes[0][1] is custom
    assert [(type(o).__name__, o.code) for _, o in outcomes[1:]] == [
        ("TemporaryFailure", 451),
        ("PermanentFailure", 550),
        ("SendResult", 250),
    ]
    assert [m.job_id for m in transport.sent] == ["J1", "J4"]
    assert [m.job_id for m in transport.attempts] == ["J1", "J2", "J3", "J4"]
    stats = transport.statistics()
    assert (stats.sends, stats.failures, stats.in_flight) == (2, 2, 0)
    assert await collect(transport, []) == []


async def test_send_many_outcome_yielded_before_next_attempt() -> None:
    transport = MemoryTransport()
    async with aclosing(transport.send_many([mail("J1"), mail("J2")])) as outcomes:
        async for m, _ in outcomes:
            # The consumer acks each mail before the next one is tried.
            assert transport.attempts[-1] is m


async def test_send_many_stopped_early_leaves_the_rest_unattempted() -> None:
    transport = MemoryTransport()
    mails = [mail(f"J{i}") for i in range(5)]
    async with aclosing(transport.send_many(mails)) as outcomes:
        async for m, _ in outcomes:
            if m.job_id == "J1":
                break
    assert [m.job_id for m in transport.attempts] == ["J0", "J1"]
    assert transport.statistics().in_flight == 0


async def test_send_many_cancelled_mid_batch(autojump_clock: trio.testing.MockClock) -> None:
    transport = MemoryTransport(delay_s=1.0)
    seen: list[SendOutcome] = []
    with trio.move_on_after(2.5) as scope:
        async with aclosing(transport.send_many([mail(f"J{i}") for i in range(5)])) as outcomes:
            async for item in outcomes:
                seen.append(item)
    assert scope.cancelled_caught
    assert [m.job_id for m, _ in seen] == ["J0", "J1"]
    assert [m.job_id for m in transport.sent] == ["J0", "J1"]
    assert transport.statistics().in_flight == 0


async def test_send_many_on_closed_transport_fails_every_mail() -> None:
    transport = MemoryTransport()
    await transport.aclose()
    mails = [mail("J1"), mail("J2")]
    outcomes = await collect(transport, mails)
    assert [m for m, _ in outcomes] == mails
    assert all(isinstance(o, TemporaryFailure) for _, o in outcomes)
    assert transport.attempts == []


async def test_transport_unavailable_ends_the_batch_untried() -> None:
    """As over SMTP: after a TransportUnavailable no later mail of the batch is tried."""
    transport = MemoryTransport()
    transport.script(SendResult(250, "ok"), TransportUnavailable("connect: refused"))
    outcomes = await collect(transport, [mail(f"J{i}") for i in range(4)])
    assert [type(o).__name__ for _, o in outcomes] == [
        "SendResult",
        "TransportUnavailable",
        "TransportUnavailable",
        "TransportUnavailable",
    ]
    assert str(outcomes[2][1]) == "not tried: connect: refused"
    assert [m.job_id for m in transport.attempts] == ["J0", "J1"]


async def test_serve_starts_and_runs_until_cancelled() -> None:
    transport: Transport = MemoryTransport()
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.serve)
        assert isinstance(await send_one(transport, mail()), SendResult)
        nursery.cancel_scope.cancel()
