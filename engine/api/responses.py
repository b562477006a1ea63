"""Quart responses in the house style: JSON bodies and problem+json errors (RFC 9457)."""

from __future__ import annotations

import msgspec
from quart import Response

from engine.api.asgi import problem_body

_encode = msgspec.json.Encoder().encode


def json_response(status: int, obj: object, headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(obj), status=status, content_type="application/json", headers=headers)


def problem_response(
    status: int,
    slug: str,
    title: str,
    detail: str = "",
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        problem_body(status, slug, title, detail, field),
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )
