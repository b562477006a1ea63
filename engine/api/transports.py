"""``GET /v1/transports``: whether each transport takes mail, or its circuit breaker is
open (the senders of every replica wait and probe it); the dashboard shows a banner."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import msgspec

from engine.api.exchange import Reply, Request, json_reply
from engine.models import ms_to_iso
from engine.queue import Breaker


class TransportView(msgspec.Struct, omit_defaults=True):
    name: str
    state: str  # "up", or "down" while its breaker is open
    down_since: str | None = None
    next_probe_at: str | None = None
    # Failures in a row: the one that opened the breaker, then each failed probe.
    failures: int = 0
    reason: str | None = None  # the last failure, as the transport reported it


async def transport_view(breaker: Breaker) -> TransportView:
    state = await breaker.state()
    if state is None:
        return TransportView(breaker.name, "up")
    return TransportView(
        breaker.name, "down", ms_to_iso(state.opened_at_ms), ms_to_iso(state.probe_at_ms),
        state.trips, state.reason,
    )  # fmt: skip


class TransportList(msgspec.Struct):
    transports: list[TransportView]


def transports_route(breakers: Sequence[Breaker]) -> Callable[[Request], Awaitable[Reply]]:
    async def list_transports(_: Request) -> Reply:
        return json_reply(200, TransportList([await transport_view(b) for b in breakers]))

    return list_transports
