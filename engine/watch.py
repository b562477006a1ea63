"""``engine watch``: follow job events live over the engine's websocket (WS /v1/events).

A trio-websocket client. Prints one line per event (or JSON lines) and, after a drop,
reconnects with ``since=<the last event id printed>`` so nothing is missed or repeated
(within the stream's retention). Imports only the leaves; never the queue or the API.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import msgspec
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from engine.models import (
    CLOSE_GOING_AWAY,
    CLOSE_TOO_SLOW,
    CLOSE_UNAVAILABLE,
    DEFAULT_TENANT,
    PROVIDER_EVENT_TYPES,
    Event,
)

_decode_raw = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_event = msgspec.json.Decoder(Event).decode
_MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
_BACKOFF_MAX_S: Final = 10.0
_CLOSE_REASONS: Final = {
    CLOSE_GOING_AWAY: "the engine is shutting down",
    1006: "the connection was lost",  # never sent: what a client reports for a lost TCP
    CLOSE_UNAVAILABLE: "the engine cannot read its event stream",
    CLOSE_TOO_SLOW: "this watcher fell behind",
}


@dataclass(frozen=True, slots=True)
class WatchOptions:
    url: str = "http://127.0.0.1:8080"  # the engine's base URL (http, https, ws or wss)
    ids: Sequence[str] = ()
    types: Sequence[str] = ()
    tenants: Sequence[str] = ()
    tags: Sequence[str] = ()
    since: str = ""  # an event id to resume after
    json: bool = False
    key: str | None = None  # the API key presented (Authorization: Bearer)


def events_url(options: WatchOptions, since: str = "") -> str:
    """The websocket URL for ``options`` (``since`` overrides ``options.since``)."""
    parts = urlsplit(options.url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"--url must be http(s):// or ws(s)://, got {options.url!r}")
    query: list[tuple[str, str]] = [("id", i) for i in options.ids]
    query += [("type", t) for t in options.types]
    query += [("tenant", t) for t in options.tenants]
    query += [("tag", t) for t in options.tags]
    if since or options.since:
        query.append(("since", since or options.since))
    path = parts.path.rstrip("/") + "/v1/events"
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


def format_event(e: Event) -> str:
    """One readable line: local time, the id's last 12 characters (the first ones are
    its creation time, shared by a batch), state, attempt, tenant, tags, a failure's
    bounce class, error."""
    at = datetime.fromtimestamp(e.at / 1000).strftime("%H:%M:%S.%f")[:-3]
    # A provider's event leaves the state as it was ("sent"): its type says what happened.
    shown = e.type if e.type in PROVIDER_EVENT_TYPES else e.state
    line = f"{at}  {e.id[-12:]}  {shown:<10}  attempt {e.attempt}"
    if e.tenant != DEFAULT_TENANT:
        line += f"  tenant={e.tenant}"
    if e.tags:
        line += "  tags=" + ",".join(e.tags)
    if e.bounce:
        line += f"  bounce={e.bounce}"
    if e.recipients:  # a suppressed event: the recipients dropped; a provider's: its one
        label = "suppressed" if e.type == "suppressed" else "recipient"
        line += f"  {label}=" + ",".join(e.recipients)
    if e.error:
        line += f"  error: {e.error}"
    return line


class _Fatal(Exception):
    """The engine refused the request itself (e.g. a bad filter): retrying cannot help."""


async def follow(options: WatchOptions, out: TextIO, err: TextIO) -> None:
    """Print events until cancelled; reconnect (with backoff) after every drop."""
    since = options.since
    backoff = 0.5
    while True:
        url = events_url(options, since)
        try:
            headers = (
                [(b"authorization", b"Bearer " + options.key.encode())] if options.key else None
            )
            async with open_websocket_url(
                url, max_message_size=_MAX_MESSAGE_BYTES, extra_headers=headers
            ) as ws:
                if backoff > 0.5:
                    print(f"watch: connected to {options.url}", file=err, flush=True)
                backoff = 0.5
                gap = dict(ws.handshake_headers).get(b"events-gap")
                if gap is not None:
                    print(
                        f"watch: warning: the event stream no longer holds what followed "
                        f"{since}; resuming from its oldest event {gap.decode()} (some "
                        "events are missing: see queue.events_maxlen)",
                        file=err,
                        flush=True,
                    )
                while True:
                    message = await ws.get_message()
                    since = _print(message, options.json, out) or since
        except ConnectionRejected as exc:
            body = (exc.body or b"").decode(errors="replace")
            if 400 <= exc.status_code < 500:
                raise _Fatal(f"the engine refused: {exc.status_code} {body}") from None
            note = f"the engine answered {exc.status_code}"
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason is not None else 1006
            note = f"closed {code}: {_CLOSE_REASONS.get(code, exc.reason)}"
        except (HandshakeError, OSError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ or exc.__context__
            note = f"cannot connect: {exc or cause or type(exc).__name__}"
        print(f"watch: {note}; reconnecting in {backoff:g} s", file=err, flush=True)
        await trio.sleep(backoff)
        backoff = min(backoff * 2, _BACKOFF_MAX_S)


def _print(message: str | bytes, as_json: bool, out: TextIO) -> str:
    """Print one websocket message (a JSON array of events); return its last event id."""
    raw = message.encode() if isinstance(message, str) else message
    items = _decode_raw(raw)
    last = ""
    lines: list[str] = []
    for item in items:
        event = _decode_event(item)
        last = event.event_id
        lines.append(bytes(item).decode() if as_json else format_event(event))
    if lines:
        out.write("\n".join(lines) + "\n")
        out.flush()
    return last


async def _main(options: WatchOptions) -> int:
    code = 0
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(stop_on_signal)
        try:
            await follow(options, sys.stdout, sys.stderr)
        except _Fatal as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
        nursery.cancel_scope.cancel()
    return code


def run(args: argparse.Namespace, key: str | None = None) -> int:
    """``engine watch`` (its flags are defined in engine.cli)."""
    options = WatchOptions(
        url=args.url, ids=args.ids, types=args.types, tenants=args.tenants,
        tags=args.tags, since=args.since, json=args.json, key=key,
    )  # fmt: skip
    try:
        events_url(options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return trio.run(_main, options)
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
