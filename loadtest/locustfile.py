"""The locustfile of the load suite (scripts/load runs it): Locust imports it by path, so
the repo root must be on sys.path for ``loadtest.*``: ``loadtest.load`` sets PYTHONPATH;
by hand, ``python -m locust -f loadtest/locustfile.py`` from the root (``-m`` adds it).

Users are in loadtest/users.py, shapes in loadtest/shapes.py, RUN/ files in
loadtest/recorder.py; each module's docstring lists its LOAD_* variables. Options added
here (each also an environment variable): --shape, --batch-size, --watch-batch,
--watch-timeout, --watch-skew-ms, --to-tags, --known-ids, --steps, --spike-factor,
--spike-at, --spike-len. Single process, or ``--processes N`` (forked workers: one
accepted file and one watcher part each, merged into RUN/watchers.json).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import gevent
from locust import events

from loadtest import recorder
from loadtest.shapes import SHAPES, LoadShape
from loadtest.users import BatchSender, SingleSender, StatusPoller, Watcher

# What Locust collects from this module: four user classes and one shape.
__all__ = ["BatchSender", "LoadShape", "SingleSender", "StatusPoller", "Watcher"]

recorder.install(events)

_OPTIONS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("--shape", "LOAD_SHAPE", "steady|step|spike (loadtest/shapes.py)", {"choices": SHAPES}),
    ("--batch-size", "LOAD_BATCH_SIZE", "messages per batch POST of BatchSender", {}),
    ("--watch-batch", "LOAD_WATCH_BATCH", "messages each Watcher posts and follows", {}),
    (
        "--watch-timeout",
        "LOAD_WATCH_TIMEOUT_S",
        "seconds until a followed message is unfinished",
        {},
    ),
    ("--watch-skew-ms", "LOAD_WATCH_SKEW_MS", "replay margin of a watcher's first subscribe", {}),
    ("--to-tags", "LOAD_TO_TAGS", "sink fault tags for every recipient, e.g. 451", {}),
    ("--known-ids", "LOAD_KNOWN_IDS", "ids StatusPoller may poll (comma list)", {}),
    ("--steps", "LOAD_STEPS", "steps of the step shape", {}),
    ("--spike-factor", "LOAD_SPIKE_FACTOR", "users during the spike / users", {}),
    ("--spike-at", "LOAD_SPIKE_AT", "spike start, fraction of the run time", {}),
    ("--spike-len", "LOAD_SPIKE_LEN", "spike length, fraction of the run time", {}),
]


@events.init_command_line_parser.add_listener
def _options(parser: Any, **_: Any) -> None:
    group = parser.add_argument_group("engine load suite (loadtest/)")
    for flag, var, help_text, extra in _OPTIONS:
        group.add_argument(
            flag, env_var=var, default=None, help=f"{help_text} [env {var}]", **extra
        )


@events.init.add_listener
def _signals_stop_the_run(**_: Any) -> None:
    """SIGINT and SIGTERM end the run like Ctrl-C: users stop, reports and RUN/ files get
    written. Locust installs its SIGTERM handler only after a headless shape run ends
    (SIGTERM would kill it without a report until then), and a process started in the
    background by a shell inherits SIGINT ignored (Python then never raises
    KeyboardInterrupt): loadtest.load stops a run with SIGINT, so restore both."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gevent.signal_handler(signal.SIGTERM, lambda: os.kill(os.getpid(), signal.SIGINT))
    gevent.signal_handler(signal.SIGUSR2, _dump_greenlets)


def _dump_greenlets() -> None:
    """SIGUSR2: every greenlet's stack to RUN/locust-stacks-<pid>.txt (the chaos runner
    asks for it when Locust outlives its run time)."""
    import gevent.util

    run_dir = os.environ.get(recorder.RUN_DIR_ENV)
    if run_dir:
        path = Path(run_dir) / f"locust-stacks-{os.getpid()}.txt"
        path.write_text("\n".join(gevent.util.format_run_info()))


@events.test_start.add_listener
def _drop_idle_classes(environment: Any, **_: Any) -> None:
    """A user class whose tasks --tags/--exclude-tags removed would only raise: drop it
    (tasks are filtered just before test_start, the dispatcher is made after it)."""
    keep = [cls for cls in environment.user_classes if cls.tasks]
    if keep and len(keep) != len(environment.user_classes):
        environment.user_classes[:] = keep
