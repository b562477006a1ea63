"""Which transport a claimed message goes through, and when a transport is tested again.

Each transport has a breaker shared by every replica (``engine.queue.Breaker``, seen
through a ``TransportGate``). A message takes the first transport of its order
(``engine.policy.route_order``: the routing rules, else the default order) whose breaker
is closed: while the first is open, its mail goes to the next (failover). A breaker
opens when its transport is down (nothing of a message was tried), or after
``routing.trip_after_failures`` temporary failures in a row on this replica (a provider
answering 5xx or 429, timing out); one sender of all replicas then probes it with one
message at growing intervals, and a probe that goes through closes it.

Senders claim while any transport of any order is usable; with every breaker open they
wait (nothing is claimed that could only fail) and probe each in its turn.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import trio

from engine.config import RoutingSettings
from engine.models import Message
from engine.policy import route_order
from engine.queue import Queue
from engine.sender.gate import TransportGate
from engine.transport import Transport

log = logging.getLogger(__name__)

Turn = Literal["claim", "probe"]


@dataclass(slots=True)
class Route:
    """One named transport and its breaker, as this replica's senders use them."""

    name: str
    transport: Transport
    gate: TransportGate
    failures: int = 0  # temporary failures in a row here (a success resets it)


class Router:
    """The routes of one sender pool: by name, the default order and the rules."""

    def __init__(
        self,
        routes: Mapping[str, Route],
        settings: RoutingSettings,
        queue: Queue,
        *,
        refresh_s: float = 0.25,
    ) -> None:
        if not routes:
            raise ValueError("a router needs at least one route")
        self.routes = dict(routes)
        self.settings = settings
        self.queue = queue
        self._default: Sequence[str] = settings.order or list(self.routes)[:1]
        self._refresh_s = refresh_s

    def order_of(self, message: Message, tenant: str) -> Sequence[str]:
        return route_order(
            self._default, self.settings.rules, tenant=tenant, tags=message.tags,
            domains=(r.rpartition("@")[2] for r in message.envelope_recipients()),
        )  # fmt: skip

    async def turn(self, stopping: trio.Event) -> tuple[Turn, Route | None] | None:
        """Wait until this sender may claim (``("claim", None)``), or test an open
        transport with one message (``("probe", route)``); None once ``stopping``."""
        while not stopping.is_set():
            usable = False
            wait_s = 1.0
            for route in self.routes.values():
                state = await route.gate.current()
                if state is None:
                    usable = True
                    continue
                due_s = (state.probe_at_ms - self.queue.now_ms()) / 1000
                if due_s <= 0 and await route.gate.take_probe():
                    return "probe", route
                wait_s = min(wait_s, max(due_s, self._refresh_s))
            if usable:
                return "claim", None
            with trio.move_on_after(wait_s):
                await stopping.wait()
        return None

    async def probe_due(self, route: Route) -> bool:
        """Whether ``route``'s breaker is open, due a test, and this sender gets it."""
        state = route.gate.state
        if state is None or state.probe_at_ms > self.queue.now_ms():
            return False
        return await route.gate.take_probe()

    def succeeded(self, route: Route) -> None:
        route.failures = 0

    async def failed_temporarily(self, route: Route, reason: str) -> None:
        """A message's temporary failure at ``route``: enough in a row open its breaker."""
        route.failures += 1
        limit = self.settings.trip_after_failures
        if limit and route.failures >= limit and not route.gate.is_open():
            route.failures = 0
            log.warning(
                "sender.transport.failing transport=%s failures=%d last=%s: its mail "
                "goes to the next transport of each order while it is tested",
                route.name, limit, reason,
            )  # fmt: skip
            await route.gate.failed(f"{limit} temporary failures in a row; last: {reason}",
                                    probe=False)  # fmt: skip

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Each transport's upkeep (``Transport.serve``), until cancelled."""
        async with trio.open_nursery() as nursery:
            for route in self.routes.values():
                await nursery.start(route.transport.serve)
            task_status.started()

    async def aclose(self) -> None:
        for route in self.routes.values():
            await route.transport.aclose()

    def names(self) -> list[str]:
        return list(self.routes)
