"""The Locust users of the load suite: SingleSender, BatchSender, StatusPoller, Watcher.

Every 202 id goes to the recorder (RUN/accepted/<pid>.csv). 429 and 503 are the engine
pushing back, not failing: they count as Locust failures named "backpressure 429: ..." /
"backpressure 503: ..." and their ids (there are none) are never recorded; a refused or
cut connection (a replica killed by a chaos scenario) is the failure "connection error:
<kind>". Runs only inside Locust (gevent monkeypatching): never import the engine here.

Environment, read at import (class attributes):

    LOAD_WEIGHTS   user mix, default "single=4,batch=1,status=2,watch=1"; a class given 0
                   (or left out of a given list) is not spawned
    LOAD_WAIT      pacing of each user between two tasks: "A,B" a random wait of A to B
                   seconds (default "0.1,0.5"), "A" a constant wait, "tput:N" N tasks/s

Environment or locustfile option (--batch-size, ...), read when a user starts:

    LOAD_BATCH_SIZE        messages per POST /v1/messages/batch of BatchSender (50)
    LOAD_WATCH_BATCH       messages a Watcher posts as one batch and then follows (5)
    LOAD_WATCH_TIMEOUT_S   a followed message not sent or failed by then is "unfinished" (60)
    LOAD_WATCH_SKEW_MS     the first subscribe replays from the message's id time minus
                           this (ids carry the engine's clock, events Redis's) (2000)
    LOAD_TO_TAGS           sink fault tags for every recipient, e.g. "451" or "slow250ms+drop"
                           (engine sink --help); default none
    LOAD_KNOWN_IDS         comma list of ids StatusPoller polls while this process has
                           accepted none of its own
    LOAD_HTTP_TIMEOUT_S    connect and network timeout of every request (10)

Environment, read at import: ENGINE_API_KEY, the API key every request and websocket
presents (``Authorization: Bearer``); ``scripts/load --key`` and ``LoadSettings.api_key``
set it. Unset: no key (an engine with auth on answers 401).

Tags for --tags/--exclude-tags: single, batch, status, watch (one per user class).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import struct
import time
from collections.abc import Callable
from typing import Any, Final

import websocket
from locust import FastHttpUser, between, constant, constant_throughput, tag, task
from locust.env import Environment

from loadtest.recorder import RECORDER, TALLY, Followed

DEFAULT_WEIGHTS: Final = "single=4,batch=1,status=2,watch=1"
DEFAULT_WAIT: Final = "0.1,0.5"

_ID_RE: Final = re.compile(r"^[0-9a-f]{32}$")

# Close codes of WS /v1/events (engine/api/hub.py).
CLOSE_REASONS: Final = {1001: "replica shutting down", 1011: "event stream down", 4008: "too slow"}


# -- settings -------------------------------------------------------------------------


def parse_weights(text: str) -> dict[str, int]:
    """``"single=4,batch=1"`` -> {"single": 4, "batch": 1}; raises ValueError."""
    out: dict[str, int] = {}
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or name not in ("single", "batch", "status", "watch"):
            raise ValueError(f"LOAD_WEIGHTS: {item!r} is not single|batch|status|watch=N")
        out[name] = int(value)
        if out[name] < 0:
            raise ValueError(f"LOAD_WEIGHTS: negative weight in {item!r}")
    return out


def parse_wait(text: str) -> Callable[..., float]:
    """A Locust wait_time from ``"A,B"``, ``"A"`` or ``"tput:N"``; raises ValueError."""
    text = text.strip()
    if text.startswith("tput:"):
        return constant_throughput(float(text[5:]))
    low, sep, high = text.partition(",")
    if sep:
        return between(float(low), float(high))
    return constant(float(low))


def setting(env: Environment, option: str, var: str, default: str) -> str:
    """A locustfile option (``env.parsed_options``) else the environment, else default."""
    parsed = getattr(env, "parsed_options", None)
    value = getattr(parsed, option, None) if parsed is not None else None
    if value is None or value == "":
        value = os.environ.get(var, default)
    return str(value)


_WEIGHTS = parse_weights(DEFAULT_WEIGHTS)
if os.environ.get("LOAD_WEIGHTS"):
    _given = parse_weights(os.environ["LOAD_WEIGHTS"])
    _WEIGHTS = {name: _given.get(name, 0) for name in _WEIGHTS}
_WAIT = parse_wait(os.environ.get("LOAD_WAIT") or DEFAULT_WAIT)
_HTTP_TIMEOUT_S = float(os.environ.get("LOAD_HTTP_TIMEOUT_S") or 10)
_API_KEY = os.environ.get("ENGINE_API_KEY", "").strip()
# What every request presents: the API key, when there is one.
AUTH_HEADERS: Final[dict[str, str]] = {"Authorization": f"Bearer {_API_KEY}"} if _API_KEY else {}

# -- messages and answers -------------------------------------------------------------

_serial = itertools.count(1)


def message(to_tags: str, domain: str = "example.com") -> dict[str, Any]:
    """A small message to a unique address (``load+p<pid>n<k>``: never a sink fault tag
    by accident, ``+550`` would be one)."""
    n = next(_serial)
    local = f"load+p{os.getpid()}n{n}" + (f"+{to_tags.strip('+')}" if to_tags else "")
    return {"to": f"{local}@{domain}", "subject": f"load {n}", "text": f"Load test message {n}.\n"}


def judge(resp: Any, *, many: bool) -> list[str]:
    """Mark a POST answer in Locust's stats and return its accepted ids (recorded)."""
    status = int(resp.status_code or 0)
    if status == 202:
        try:
            body = resp.json()
            ids = list(body["ids"]) if many else [body["id"]]
        except (ValueError, KeyError, TypeError):
            if not resp.content:  # the connection broke after the status line
                resp.failure("connection error: 202 cut short, its ids unknown")
            else:
                resp.failure("202 with an unreadable body")
            return []
        if not all(isinstance(i, str) and _ID_RE.match(i) for i in ids):
            resp.failure("202 with a malformed id")
            return []
        RECORDER.record(ids, time.time())
        resp.success()
        return ids
    fail(resp, status)
    return []


def fail(resp: Any, status: int) -> None:
    """Name a failure so that Locust's failure table groups it by cause."""
    if status == 429:
        resp.failure("backpressure 429: over ingest.client_rate_per_s")
    elif status == 503:
        resp.failure("backpressure 503: backlog full, Redis down or replica draining")
    elif status == 0:
        error = getattr(resp, "error", None)
        resp.failure(f"connection error: {type(error).__name__ if error else 'unknown'}")
    else:
        detail = ""
        with contextlib.suppress(ValueError, AttributeError, TypeError):
            detail = str(resp.json().get("detail", ""))[:120]
        resp.failure(f"HTTP {status}" + (f": {detail}" if detail else ""))


class _Base(FastHttpUser):
    abstract = True
    wait_time = _WAIT
    network_timeout = _HTTP_TIMEOUT_S
    connection_timeout = _HTTP_TIMEOUT_S
    default_headers = dict(AUTH_HEADERS) or None

    def on_start(self) -> None:
        self.to_tags = setting(self.environment, "to_tags", "LOAD_TO_TAGS", "")

    def post_batch(self, size: int, name: str) -> list[str]:
        body = {"messages": [message(self.to_tags) for _ in range(size)]}
        with self.client.post(
            "/v1/messages/batch", json=body, name=name, catch_response=True
        ) as resp:
            return judge(resp, many=True)


class SingleSender(_Base):
    """POST /v1/messages, one small message per task."""

    weight = _WEIGHTS["single"]

    @tag("single")
    @task
    def send_one(self) -> None:
        with self.client.post(
            "/v1/messages", json=message(self.to_tags), name="/v1/messages", catch_response=True
        ) as resp:
            judge(resp, many=False)


class BatchSender(_Base):
    """POST /v1/messages/batch with LOAD_BATCH_SIZE messages per task."""

    weight = _WEIGHTS["batch"]

    def on_start(self) -> None:
        super().on_start()
        self.batch_size = int(setting(self.environment, "batch_size", "LOAD_BATCH_SIZE", "50"))

    @tag("batch")
    @task
    def send_batch(self) -> None:
        self.post_batch(self.batch_size, "/v1/messages/batch")


class StatusPoller(_Base):
    """GET /v1/messages/{id} of an id this process accepted lately (else LOAD_KNOWN_IDS)."""

    weight = _WEIGHTS["status"]

    def on_start(self) -> None:
        super().on_start()
        known = setting(self.environment, "known_ids", "LOAD_KNOWN_IDS", "")
        self.known = [i for i in known.split(",") if _ID_RE.match(i)]

    @tag("status")
    @task
    def poll(self) -> None:
        job_id = RECORDER.pick_recent() or (random.choice(self.known) if self.known else None)
        if job_id is None:
            return  # nothing accepted yet: wait for the senders
        with self.client.get(
            f"/v1/messages/{job_id}", name="/v1/messages/[id]", catch_response=True
        ) as resp:
            status = int(resp.status_code or 0)
            if status == 200:
                resp.success()
            elif status == 404:
                resp.failure("404 for an accepted id")
            else:
                fail(resp, status)


# -- the watcher ----------------------------------------------------------------------


class Watcher(_Base):
    """Posts LOAD_WATCH_BATCH messages, then follows them on WS /v1/events?id=...

    Checks that each message's events come in lifecycle order (NEXT: queued first; then
    processing; retrying/queued/processing again; finally sent or failed) with increasing
    event ids, and measures the latency now - ``at``. A dropped socket (1001 when a
    replica shuts down, 4008 too slow, a reset) is reopened with ``since=`` the last
    event id received; a message still open after LOAD_WATCH_TIMEOUT_S is "unfinished".
    Connects, events, closes and violations are Locust request events of type "WS".
    """

    weight = _WEIGHTS["watch"]

    def on_start(self) -> None:
        super().on_start()
        env = self.environment
        self.watch_batch = int(setting(env, "watch_batch", "LOAD_WATCH_BATCH", "5"))
        self.watch_timeout_s = float(setting(env, "watch_timeout", "LOAD_WATCH_TIMEOUT_S", "60"))
        self.skew_ms = int(setting(env, "watch_skew_ms", "LOAD_WATCH_SKEW_MS", "2000"))
        host = (self.host or "").rstrip("/")
        self.ws_base = re.sub(r"^http", "ws", host) + "/v1/events"
        TALLY.watchers += 1

    @tag("watch")
    @task
    def post_and_follow(self) -> None:
        ids = self.post_batch(self.watch_batch, "/v1/messages/batch [watch]")
        if ids:
            self.follow(ids)

    def ws_event(self, name: str, started: float, length: int, error: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )

    def connect(self, ids: list[str], since: str) -> websocket.WebSocket | None:
        url = f"{self.ws_base}?id={','.join(ids)}&since={since}"
        started = time.perf_counter()
        try:
            ws = websocket.create_connection(
                url,
                timeout=_HTTP_TIMEOUT_S,
                enable_multithread=False,
                header=[f"{name}: {value}" for name, value in AUTH_HEADERS.items()],
            )
        except websocket.WebSocketBadStatusException as exc:
            TALLY.connect_failures += 1
            reason = f"backpressure {exc.status_code}" if exc.status_code in (429, 503) else ""
            self.ws_event(
                "/v1/events [connect]",
                started,
                0,
                ConnectionError(reason or f"handshake refused: HTTP {exc.status_code}"),
            )
            return None
        except (OSError, websocket.WebSocketException) as exc:
            TALLY.connect_failures += 1
            self.ws_event(
                "/v1/events [connect]",
                started,
                0,
                ConnectionError(f"connection error: {type(exc).__name__}"),
            )
            return None
        ws.settimeout(1.0)
        self.ws_event("/v1/events [connect]", started, 0, None)
        return ws

    def follow(self, ids: list[str]) -> None:
        followed = Followed(ids)
        TALLY.followed += len(ids)
        first_ms = min(int(job_id[:12], 16) for job_id in ids)
        since = f"{max(0, first_ms - self.skew_ms)}-0"
        deadline = time.monotonic() + self.watch_timeout_s
        ws: websocket.WebSocket | None = None
        connects = 0
        backoff = 0.2
        try:
            while followed.open and time.monotonic() < deadline:
                if ws is None:
                    if connects:
                        TALLY.reconnects += 1
                    connects += 1
                    ws = self.connect(sorted(followed.open), since)
                    if ws is None:
                        time.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                    continue
                started = time.perf_counter()
                try:
                    opcode, frame = ws.recv_data_frame()
                except websocket.WebSocketTimeoutException:
                    continue
                except (OSError, websocket.WebSocketException) as exc:
                    self.ws_event(
                        "/v1/events [receive]",
                        started,
                        0,
                        ConnectionError(f"connection lost: {type(exc).__name__}"),
                    )
                    ws.shutdown()
                    ws = None
                    continue
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    data = bytes(frame.data or b"")
                    code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005
                    TALLY.close_codes[str(code)] += 1
                    reason = CLOSE_REASONS.get(code, "closed by the server")
                    self.ws_event(
                        "/v1/events [closed]", started, 0, ConnectionError(f"{code} {reason}")
                    )
                    ws.shutdown()  # the close frame was answered already
                    ws = None
                    continue
                if opcode != websocket.ABNF.OPCODE_TEXT:
                    continue
                backoff = 0.2
                raw = bytes(frame.data)
                try:
                    events = json.loads(raw)
                except ValueError:
                    TALLY.violation(f"unreadable frame: {raw[:80]!r}")
                    continue
                now_ms = time.time() * 1000
                for event in events:
                    since = str(event.get("event_id", since))
                    self.account(followed, event, now_ms, len(raw) // max(1, len(events)))
        finally:
            TALLY.unfinished += len(followed.open)
            if ws is not None:
                if followed.open:  # timed out, or the run is stopping this greenlet: no handshake
                    ws.shutdown()
                else:
                    _close(ws)

    def account(
        self, followed: Followed, event: dict[str, Any], now_ms: float, length: int
    ) -> None:
        """Check one event (``Followed.see``) and count it."""
        seen = followed.see(event)
        for problem in seen.violations:
            self.violate(problem)
        if not seen.ours:
            return
        TALLY.events += 1
        latency = max(0.0, now_ms - float(event.get("at", now_ms)))
        TALLY.latency(latency)
        self.environment.events.request.fire(
            request_type="WS",
            name="/v1/events [event]",
            response_time=latency,
            response_length=length,
            exception=None,
            context={},
        )
        if seen.final is not None:
            TALLY.finished += 1
            TALLY.outcomes[seen.final] += 1

    def violate(self, text: str) -> None:
        TALLY.violation(text)
        self.environment.events.request.fire(
            request_type="WS",
            name="/v1/events [order]",
            response_time=0,
            response_length=0,
            exception=AssertionError("order violation"),
            context={},
        )


def _close(ws: websocket.WebSocket) -> None:
    """Send a close frame and drop the socket, without waiting for the server's answer:
    websocket-client's ``close()`` waits for it inside a bare ``except:``, which swallowed
    the GreenletExit Locust stops a user with; that user then ran on past the run's end
    (seen in about 1 run in 10, found with the runner's SIGUSR2 stack dump)."""
    with contextlib.suppress(OSError, websocket.WebSocketException):
        ws.send_close()
    ws.shutdown()
