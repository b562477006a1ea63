"""Load shapes over the run time T, for U users (``--users``) spawned at R/s (``--spawn-rate``).

    steady  U users from start to T
    step    LOAD_STEPS (4) equal steps up to U: U/4 users, then U/2, 3U/4, U
    spike   U users; from LOAD_SPIKE_AT (0.4) x T on, for LOAD_SPIKE_LEN (0.2) x T,
            LOAD_SPIKE_FACTOR (4) x U users, started within a second; then U again

Chosen by ``--shape`` or LOAD_SHAPE (default steady); T is ``--run-time`` (else
LOAD_SECONDS, else 60 s). Every shape ends the run at T by itself (``tick`` returns
None). ``plan`` is the pure part; ``LoadShape`` is the one class the locustfile exposes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Final

from locust import LoadTestShape

SHAPES: Final = ("steady", "step", "spike")


@dataclass(frozen=True)
class ShapeSettings:
    shape: str = "steady"
    seconds: float = 60.0  # T
    users: int = 10  # U
    spawn_rate: float = 5.0  # R, users/s
    steps: int = 4
    spike_factor: float = 4.0
    spike_at: float = 0.4  # fraction of T
    spike_len: float = 0.2  # fraction of T


def plan(s: ShapeSettings, t: float) -> tuple[int, float] | None:
    """(users, spawn rate) at ``t`` seconds into the run, None once the run is over."""
    if t >= s.seconds:
        return None
    if s.shape == "steady":
        return s.users, s.spawn_rate
    if s.shape == "step":
        steps = max(1, s.steps)
        k = min(steps, int(t // (s.seconds / steps)) + 1)
        return max(1, math.ceil(s.users * k / steps)), s.spawn_rate
    if s.shape == "spike":
        start = s.spike_at * s.seconds
        if start <= t < start + s.spike_len * s.seconds:
            peak = max(s.users, math.ceil(s.users * s.spike_factor))
            return peak, max(s.spawn_rate, float(peak))
        return s.users, max(s.spawn_rate, float(s.users))  # back down at once, too
    raise ValueError(f"unknown shape {s.shape!r}: use one of {', '.join(SHAPES)}")


def settings_from(options: Any) -> ShapeSettings:
    """ShapeSettings from Locust's parsed options, falling back to LOAD_* variables."""

    def get(option: str, var: str, default: str) -> str:
        value = getattr(options, option, None) if options is not None else None
        return str(value) if value not in (None, "") else os.environ.get(var, default)

    return ShapeSettings(
        shape=get("shape", "LOAD_SHAPE", "steady"),
        seconds=float(get("run_time", "LOAD_SECONDS", "60")),
        users=int(get("num_users", "LOAD_USERS", "10")),
        spawn_rate=float(get("spawn_rate", "LOAD_SPAWN_RATE", "5")),
        steps=int(get("steps", "LOAD_STEPS", "4")),
        spike_factor=float(get("spike_factor", "LOAD_SPIKE_FACTOR", "4")),
        spike_at=float(get("spike_at", "LOAD_SPIKE_AT", "0.4")),
        spike_len=float(get("spike_len", "LOAD_SPIKE_LEN", "0.2")),
    )


class LoadShape(LoadTestShape):
    """The shape named by ``--shape``/LOAD_SHAPE (read at the first tick)."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self._settings: ShapeSettings | None = None

    def tick(self) -> tuple[int, float] | None:
        if self._settings is None:
            runner = self.runner
            options = runner.environment.parsed_options if runner is not None else None
            self._settings = settings_from(options)
        return plan(self._settings, self.get_run_time())
