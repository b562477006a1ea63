"""What a route handler sees and answers: a ``Request`` (method, path parameters, query,
headers, a bounded body) and a ``Reply`` (status, body, headers); ``Fail`` raised anywhere in
a handler answers problem+json (RFC 9457). The router (``router.py``) turns both to ASGI.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar
from urllib.parse import parse_qsl

import msgspec

from engine.api.asgi import BodyTooLarge, Receive, Scope, Send, header, problem_body, read_body
from engine.api.jsonguard import TooDeep, duplicate_key
from engine.auth import UNCHECKED, Principal
from engine.errors import ValidationError
from engine.models import CLOSE_POLICY, check_tenant

Headers = list[tuple[bytes, bytes]]

_encode = msgspec.json.Encoder().encode
JSON: Final = b"application/json"
PROBLEM_JSON: Final = b"application/problem+json"
RETRY_AFTER_1: Final = (b"retry-after", b"1")
# msgspec says "... - at `$.messages[0].to`"; unknown fields "... field `x`".
_AT_RE: Final = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_UNKNOWN_RE: Final = re.compile(r"unknown field `(?P<name>[^`]+)`")

D = TypeVar("D")
B = TypeVar("B", bound=bytes)


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: bytes | None = JSON  # None: no Content-Type (204, 304)
    headers: Headers = field(default_factory=list)


def json_reply(status: int, obj: object, headers: Headers | None = None) -> Reply:
    return Reply(status, _encode(obj), JSON, headers if headers is not None else [])


def empty_reply(status: int = 204, headers: Headers | None = None) -> Reply:
    return Reply(status, b"", None, headers if headers is not None else [])


class Fail(Exception):
    """An answer in problem+json, raised from anywhere in a handler: ``status``, a slug
    (``type`` is ``PROBLEM_BASE + slug``), a title, a detail and the field at fault."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str = "",
        field: str | None = None,
        headers: Headers | None = None,
    ) -> None:
        super().__init__(status, slug, detail)
        self.status, self.slug, self.title = status, slug, title
        self.detail, self.field = detail, field
        self.headers = headers if headers is not None else []

    def reply(self) -> Reply:
        body = problem_body(self.status, self.slug, self.title, self.detail, self.field)
        return Reply(self.status, body, PROBLEM_JSON, self.headers)


def not_found(title: str, detail: str) -> Fail:
    return Fail(404, "not-found", title, detail)


def invalid(field: str | None, detail: str, title: str = "Invalid field") -> Fail:
    return Fail(422, "invalid-field", title, detail, field)


@dataclass(slots=True)
class Request:
    """One HTTP request as a handler sees it; ``params`` are the path's ``{name}`` parts."""

    scope: Scope
    receive: Receive
    params: dict[str, str]
    # Who it acts as (the router's guard sets it before the handler runs).
    principal: Principal = UNCHECKED
    _query: dict[str, str] | None = None

    @property
    def method(self) -> str:
        return self.scope["method"]  # type: ignore[no-any-return]

    @property
    def path(self) -> str:
        return self.scope["path"]  # type: ignore[no-any-return]

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes)."""
        return header(self.scope, name)

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name``, in the order the lines came."""
        return [value for key, value in self.scope["headers"] if key == name]

    def query(self, name: str) -> str | None:
        """The first value of query parameter ``name``."""
        if self._query is None:
            raw = self.scope.get("query_string", b"").decode("latin-1")
            self._query = {}
            for key, value in parse_qsl(raw, keep_blank_values=True):
                self._query.setdefault(key, value)
        return self._query.get(name)

    def int_query(self, name: str, default: int, low: int, high: int) -> int:
        """Query parameter ``name`` as an integer in [low, high]; 422 naming it otherwise."""
        raw = self.query(name)
        if raw is None:
            return default
        # ASCII digits only ("²".isdigit() is true), and few enough for int().
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or not low <= int(raw) <= high:
            raise invalid(
                name, f"{name} must be an integer from {low} to {high}", "Invalid query parameter"
            )
        return int(raw)

    async def body(self, limit: int, what: str = "http.max_body_bytes") -> bytes:
        """The whole body; 413 as soon as it passes ``limit`` bytes (never read past it)."""
        try:
            return await read_body(self.scope, self.receive, limit)
        except BodyTooLarge:
            raise Fail(
                413, "body-too-large", "Request body too large",
                f"the body limit is {limit} bytes ({what})",
            ) from None  # fmt: skip

    async def json_body(self, limit: int, what: str = "http.max_body_bytes") -> bytes:
        """The body of a JSON request: 415 unless Content-Type is JSON, then ``body``."""
        if not is_json(self.header(b"content-type")):
            raise Fail(
                415, "unsupported-media-type", "Unsupported Media Type",
                "send the body as JSON with Content-Type: application/json",
            )  # fmt: skip
        return await self.body(limit, what)


def is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    mime = content_type.split(b";", 1)[0].strip().lower()
    return mime == b"application/json" or mime.endswith(b"+json")


def error_field(exc: msgspec.ValidationError) -> tuple[str, str]:
    """(field path, detail) of a msgspec validation error."""
    text = str(exc)
    path = ""
    m = _AT_RE.search(text)
    if m:
        path = m.group("path")
        text = text[: m.start()]
    unknown = _UNKNOWN_RE.search(text)
    if unknown:
        path = f"{path}.{unknown.group('name')}" if path else unknown.group("name")
    if text.startswith("Object missing required field"):
        name = text.rsplit("`", 2)[-2]
        path = f"{path}.{name}" if path else name
    return path or "$", text


def parse_json(decode: Callable[[B], D], body: B, at: str = "") -> D:
    """``decode(body)``; 422 naming the field (prefixed with ``at``, e.g. ``messages[3].``,
    when ``body`` is part of a larger one), or 400 for malformed or too deeply nested JSON.
    Not the duplicate-key check: ``refuse_repeated_keys``."""
    try:
        return decode(body)
    except msgspec.ValidationError as exc:
        path, detail = error_field(exc)
        if at:
            path = at.rstrip(".") if path == "$" else at + path
        raise invalid(path, detail) from None
    except msgspec.DecodeError as exc:
        raise Fail(400, "malformed-json", "Malformed JSON", str(exc)) from None
    except RecursionError:
        raise Fail(400, "malformed-json", "Malformed JSON", "the body nests too deeply") from None


def refuse_repeated_keys(body: bytes) -> None:
    """422 naming the key when an object of ``body`` (valid JSON) repeats one: msgspec
    would keep the last one silently, a proxy may read the first."""
    try:
        repeated = duplicate_key(body)
    except (RecursionError, TooDeep):
        raise Fail(400, "malformed-json", "Malformed JSON", "the body nests too deeply") from None
    if repeated is not None:
        raise invalid(*repeated)


def decode_json(decode: Callable[[bytes], D], body: bytes) -> D:
    """``parse_json`` then ``refuse_repeated_keys``: 422 naming the field or the repeated
    key, or 400 for malformed or too deeply nested JSON."""
    value = parse_json(decode, body)
    refuse_repeated_keys(body)
    return value


async def refuse_upgrade(scope: Scope, send: Send, fail: Fail) -> None:
    """Answer a websocket handshake with a problem (a 403 close where the server
    cannot send an HTTP answer)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": CLOSE_POLICY})
        return
    reply = fail.reply()
    headers = [(b"content-type", PROBLEM_JSON), (b"content-length", str(len(reply.body)).encode()),
               *reply.headers]  # fmt: skip
    await send(
        {"type": "websocket.http.response.start", "status": reply.status, "headers": headers}
    )
    await send({"type": "websocket.http.response.body", "body": reply.body})


def requested_tenant(req: Request) -> str | None:
    """``?tenant=``, checked: a valid name the request's key acts for (422 naming
    ``tenant`` otherwise); None when it is not given."""
    given = req.query("tenant")
    if given is None:
        return None
    try:
        check_tenant("tenant", given)
    except ValidationError as exc:
        raise invalid(exc.field, exc.detail, "Invalid query parameter") from None
    if not req.principal.sees(given):
        raise invalid("tenant", f"this API key does not act for tenant {given!r}")
    return given
