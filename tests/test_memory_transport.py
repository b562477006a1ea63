"""MemoryTransport: the in-memory stand-in senders are tested against."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from engine.errors import PermanentFailure, TemporaryFailure, TransportError
from engine.transport.base import OutgoingMail, SendResult, Transport
from engine.transport.memory import MemoryTransport


def mail(job_id: str = "J1", to: str = "bob@example.com") -> OutgoingMail:
    return OutgoingMail(job_id, "ann@example.org", [to], b"Subject: x\r\n\r\nhi\r\n")


async def test_records_accepted_mail() -> None:
    transport: Transport = MemoryTransport()
    result = await transport.send(mail())
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
        await transport.send(mail("J1"))
    assert await transport.send(mail("J2")) is custom
    with pytest.raises(PermanentFailure) as info:
        await transport.send(mail("J3", to="bad@example.com"))
    assert info.value.code == 550
    await transport.send(mail("J4"))
    assert [m.job_id for m in transport.sent] == ["J2", "J4"]
    assert [m.job_id for m in transport.attempts] == ["J1", "J2", "J3", "J4"]
    assert transport.statistics().failures == 2


async def test_delay_and_cancellation(autojump_clock: trio.testing.MockClock) -> None:
    transport = MemoryTransport(delay_s=5.0)
    with trio.move_on_after(1.0):
        await transport.send(mail("J1"))
    assert transport.sent == []
    assert transport.statistics().in_flight == 0
    start = trio.current_time()
    await transport.send(mail("J2"))
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_wait_sent() -> None:
    transport = MemoryTransport(delay_s=0.01)
    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(transport.send, mail(f"J{i}"))
        with trio.fail_after(5):
            await transport.wait_sent(3)
    assert len(transport.sent) == 3


async def test_closed_transport_refuses() -> None:
    transport = MemoryTransport()
    await transport.aclose()
    assert transport.statistics().closed
    with pytest.raises(TemporaryFailure):
        await transport.send(mail())
