"""Tiny raw-ASGI helpers: read a bounded body, send JSON and problem+json responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from engine.models import Problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_encode = msgspec.json.Encoder().encode

PROBLEM_BASE = "https://engine.local/problems/"


class BodyTooLarge(Exception):
    pass


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """Whole request body, or BodyTooLarge as soon as it passes ``limit`` bytes."""
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, obj: object, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send_bytes(send, status, _encode(obj), b"application/json", extra_headers)


def problem_body(
    status: int, slug: str, title: str, detail: str = "", field: str | None = None
) -> bytes:
    return _encode(Problem(PROBLEM_BASE + slug, title, status, detail, field))


async def send_problem(
    send: Send,
    status: int,
    slug: str,
    title: str,
    detail: str = "",
    field: str | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_bytes(
        send,
        status,
        problem_body(status, slug, title, detail, field),
        b"application/problem+json",
        extra_headers,
    )
