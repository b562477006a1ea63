"""Inputs that cannot hurt (issue 13, point 5): every string is capped before any parser
sees it, control characters stay out of headers and bodies, trace and authentication
headers cannot be forged, duplicate JSON keys are refused, and what is accepted is
written within 998 octets a line. Through the real HTTP API (an in-process engine, real
Redis, in-memory transport), and at the model and composer level for what HTTP cannot
reach (a MessageIn built in code, messages stored before these rules)."""

from __future__ import annotations

import email
import email.policy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.api.jsonguard import duplicate_key
from engine.config import load_settings
from engine.embedded import RedisServer, free_port
from engine.errors import ValidationError
from engine.models import (
    MAX_ADDRESS_FIELD_CHARS,
    MAX_DISPLAY_NAME_CHARS,
    MAX_HEADER_NAME_CHARS,
    MAX_HEADER_VALUE_CHARS,
    MAX_HEADERS,
    MAX_RECIPIENTS,
    MAX_REPLY_TO,
    MAX_SUBJECT_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    Message,
    MessageIn,
    check_address,
    normalize,
    route,
)
from engine.transport import compose
from engine.transport.compose import UnwritableHeader
from engine.transport.memory import MemoryTransport
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine

MSG: dict[str, Any] = {"to": "ann@example.com", "subject": "Hello", "text": "Hi Ann"}
# The shape issue 13 measured: a run of spaces inside the angle brackets made the old
# address regex backtrack quadratically (40,000 characters: 3.3 s, the loop blocked).
SPACES_IN_ANGLES = "a <" + " " * 40000 + "b@example.com" + " " * 40000 + ">"


@dataclass
class Engine:
    client: httpx.AsyncClient
    transport: MemoryTransport


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Engine]:
    from engine.queue import open_redis

    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(
        environ={}, overrides={"http": {"bind": bind, "max_body_bytes": 1024 * 1024}}
    )
    transport = MemoryTransport()
    async with (
        inprocess_engine(settings, redis_server.url, transport),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        yield Engine(client, transport)


def refused(r: httpx.Response, field: str, status: int = 422) -> str:
    """The problem's detail, once the answer is ``status`` naming ``field``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["field"] == field, problem
    detail: str = problem["detail"]
    return detail


async def post_raw(client: httpx.AsyncClient, path: str, raw: bytes) -> httpx.Response:
    return await client.post(path, content=raw, headers={"content-type": "application/json"})


async def delivered(api: Engine, n: int = 1) -> list[bytes]:
    with trio.fail_after(10):
        while len(api.transport.sent) < n:
            await trio.sleep(0.01)
    return [m.data for m in api.transport.sent]


def wire_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    return data[:-2].split(b"\r\n")


# -- length caps, through HTTP ---------------------------------------------------------

LONG_NAME = "N" * (MAX_DISPLAY_NAME_CHARS + 1)
HEADER_77 = "X-" + "h" * (MAX_HEADER_NAME_CHARS - 1)


CAPPED: list[tuple[dict[str, Any], str]] = [
    ({"to": SPACES_IN_ANGLES}, "to"),
    ({"to": "a" * (MAX_ADDRESS_FIELD_CHARS + 1)}, "to"),
    ({"to": [f"u{i}@example.com" for i in range(MAX_RECIPIENTS + 1)]}, "to"),
    ({"cc": ["c@example.com", "c" * (MAX_ADDRESS_FIELD_CHARS + 1)]}, "cc[1]"),
    ({"bcc": "b" * (MAX_ADDRESS_FIELD_CHARS + 1)}, "bcc"),
    ({"from": "f" * (MAX_ADDRESS_FIELD_CHARS + 1)}, "from"),
    ({"reply_to": [f"r{i}@example.com" for i in range(MAX_REPLY_TO + 1)]}, "reply_to"),
    ({"to": f"{LONG_NAME} <a@example.com>"}, "to"),
    ({"to": "x" * 65 + "@example.com"}, "to"),  # local part over 64
    ({"to": "a@" + "d" * 64 + ".example"}, "to"),  # label over 63
    ({"subject": "s" * (MAX_SUBJECT_CHARS + 1)}, "subject"),
    ({"headers": {f"X-H{i}": "v" for i in range(MAX_HEADERS + 1)}}, "headers"),
    ({"headers": {HEADER_77: "v"}}, f"headers.{HEADER_77[:MAX_HEADER_NAME_CHARS]}..."),
    ({"headers": {"X-Long": "v" * (MAX_HEADER_VALUE_CHARS + 1)}}, "headers.X-Long"),
    ({"tags": ["t"] * (MAX_TAGS + 1)}, "tags"),
    ({"tags": ["t" * (MAX_TAG_CHARS + 1)]}, "tags[0]"),
    ({"tenant": "t" * 65}, "tenant"),
    ({"priority": "p" * 17}, "priority"),
    ({"send_at": "2026-11-22T10:00:00" + "0" * 50 + "Z"}, "send_at"),
]


async def test_every_string_is_capped(api: Engine) -> None:
    for change, field in CAPPED:
        refused(await api.client.post("/v1/messages", json={**MSG, **change}), field)


async def test_caps_inside_a_batch_name_the_message(api: Engine) -> None:
    batch = {"messages": [MSG, {**MSG, "subject": "s" * (MAX_SUBJECT_CHARS + 1)}]}
    refused(await api.client.post("/v1/messages/batch", json=batch), "messages[1].subject")


async def test_the_largest_message_accepted_is_written_within_998_octets(api: Engine) -> None:
    name = "Ünïcødé Nåme, " * (MAX_DISPLAY_NAME_CHARS // 14)
    addresses = [
        f"{name[:MAX_DISPLAY_NAME_CHARS].strip()} <{'l' * 60}{i:03d}@{'d' * 63}.example>"
        for i in range(MAX_RECIPIENTS)
    ]
    headers = {f"X-{i:02d}-" + "h" * 71: ("wörd " * 400)[:MAX_HEADER_VALUE_CHARS].strip()
               for i in range(MAX_HEADERS)}  # fmt: skip
    body = {
        **MSG,
        "to": addresses[:50],
        "cc": addresses[50:],
        "from": addresses[0],
        "reply_to": addresses[:MAX_REPLY_TO],
        "subject": "S" * MAX_SUBJECT_CHARS,  # one word: it cannot fold at a space
        "headers": headers,
        "tags": [f"{i:02d}" + "t" * (MAX_TAG_CHARS - 2) for i in range(MAX_TAGS)],
    }
    r = await api.client.post("/v1/messages", json=body)
    assert r.status_code == 202, r.text
    (data,) = await delivered(api)
    assert max(len(line) for line in wire_lines(data)) <= 998
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "S" * MAX_SUBJECT_CHARS
    assert [parsed[n] for n in headers] == list(headers.values())
    assert len(parsed["To"].addresses) + len(parsed["Cc"].addresses) == MAX_RECIPIENTS


# -- no regex backtracking: the shapes that made it backtrack parse like any other ------


@pytest.mark.parametrize(
    "address",
    [
        "a <" + " " * 250 + "b@example.com" + " " * 250 + ">",
        "a" + " " * 500 + "x<b@example.com> >",
        "<" * 250 + "b@example.com" + ">" * 250,
        "a@" + ("a" + "-" * 61 + ".") * 3 + "-",
    ],
)
def test_backtracking_shapes_are_refused_by_the_parser(address: str) -> None:
    assert len(address) <= MAX_ADDRESS_FIELD_CHARS
    with pytest.raises(ValidationError) as info:
        check_address("to", address)
    assert "not a valid email address" in info.value.detail


# -- control characters -----------------------------------------------------------------


CONTROLS: list[tuple[dict[str, Any], str]] = [
    ({"subject": "ding\x07"}, "subject"),
    ({"subject": "nul\x00"}, "subject"),
    ({"subject": "del\x7f"}, "subject"),
    ({"headers": {"X-A": "esc\x1b[31m"}}, "headers.X-A"),
    ({"headers": {"X-A": "a\rb"}}, "headers.X-A"),
    ({"to": "Ann\x00 <a@example.com>"}, "to"),
    ({"from": "Ann\x08 <a@example.com>"}, "from"),
    ({"tags": ["t\x01"]}, "tags[0]"),
    ({"text": "nul \x00 in a body"}, "text"),
    ({"text": "form feed \x0c"}, "text"),
    ({"html": "<p>\x7f</p>"}, "html"),
    ({"text": "x" * 10_000 + "\x00"}, "text"),  # the long-body scan
]


async def test_control_characters_are_refused(api: Engine) -> None:
    for change, field in CONTROLS:
        detail = refused(await api.client.post("/v1/messages", json={**MSG, **change}), field)
        assert "control characters" in detail or "CR or LF" in detail


async def test_tab_cr_lf_stay_allowed_where_they_are_text(api: Engine) -> None:
    body = {**MSG, "subject": "a\tb", "headers": {"X-A": "c\td"}, "to": "Ann\tLee <a@example.com>",
            "text": "line 1\r\n\tline 2\rline 3\n" + "y" * 5000}  # fmt: skip
    r = await api.client.post("/v1/messages", json=body)
    assert r.status_code == 202, r.text
    (data,) = await delivered(api)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "a\tb" and parsed["X-A"] == "c\td"
    content = parsed.get_content().replace("\r\n", "\n")
    assert content == "line 1\n\tline 2\nline 3\n" + "y" * 5000 + "\n"


# -- display names, reserved headers ---------------------------------------------------


async def test_encoded_words_in_display_names_are_refused(api: Engine) -> None:
    for field in ("to", "from", "cc", "reply_to"):
        body = {**MSG, field: "=?utf-8?b?QWRtaW4=?= <a@example.com>"}
        detail = refused(await api.client.post("/v1/messages", json=body), field)
        assert "encoded words" in detail


RESERVED: list[str] = [
    "Received",
    "DKIM-Signature",
    "ARC-Seal",
    "arc-message-signature",
    "Authentication-Results",
    "Return-Path",
    "Resent-From",
    "Content-Disposition",
    "content-type",
    "Received-SPF",
    "Message-ID",
    "X-Engine-Job-Id",
]


async def test_trace_and_authentication_headers_are_reserved(api: Engine) -> None:
    for name in RESERVED:
        body = {**MSG, "headers": {name: "forged"}}
        refused(await api.client.post("/v1/messages", json=body), f"headers.{name}")


async def test_fifty_custom_headers_are_fine(api: Engine) -> None:
    body = {**MSG, "headers": {f"X-H{i}": str(i) for i in range(MAX_HEADERS)}}
    assert (await api.client.post("/v1/messages", json=body)).status_code == 202


# -- duplicate JSON keys -----------------------------------------------------------------


DUPLICATES: list[tuple[str, bytes, str]] = [
    ("/v1/messages", b'{"to": "a@example.com", "text": "x", "to": "b@example.com"}', "to"),
    ("/v1/messages", b'{"to": "a@example.com", "text": "x", "t\\u006f": "b@x.org"}', "to"),
    ("/v1/messages", b'{"to": "a@example.com", "text": "x", "text": "y"}', "text"),
    (
        "/v1/messages",
        b'{"to": "a@example.com", "text": "x", "headers": {"X-A": "1", "X-A": "2"}}',
        "headers.X-A",
    ),
    (
        "/v1/messages/batch",
        b'{"messages": [{"to": "a@example.com", "text": "x"}, '
        b'{"to": "b@example.com", "text": "x", "to": "c@example.com"}]}',
        "messages[1].to",
    ),
    (
        "/v1/schedules",
        b'{"name": "n", "cron": "@daily", '
        b'"message": {"to": "a@example.com", "text": "x", "text": "y"}}',
        "message.text",
    ),
]


async def test_duplicate_keys_are_refused(api: Engine) -> None:
    for path, raw, field in DUPLICATES:
        detail = refused(await post_raw(api.client, path, raw), field)
        assert "more than once" in detail


async def test_colons_and_escapes_without_duplicates_pass(api: Engine) -> None:
    raw = (
        b'{"to": "a@example.com", "subject": "re: a\\u003ab \\\\u003a", '
        b'"text": "http://x:1/ \\u003A", "headers": {"X-A": "1:2", "x-a": "3"}}'
    )
    r = await post_raw(api.client, "/v1/messages", raw)
    assert r.status_code == 202, r.text
    (data,) = await delivered(api)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert parsed["Subject"] == "re: a:b \\u003a"
    assert parsed.get_all("X-A") == ["1:2", "3"]


def test_duplicate_key_finder() -> None:
    def field(body: bytes) -> str | None:
        found = duplicate_key(body)
        return None if found is None else found[0]

    assert field(b'{"a": 1, "b": {"a": 2}}') is None
    assert field(b'{"a": {"b": 1, "b": 2}}') == "a.b"
    assert field(b'[{"k": 1}, {"k": 1, "k": 2}]') == "[1].k"
    assert field(b'{"": 1, "": 2}') == "$"
    # An escaped backslash before "u003a" is text, not an escaped colon.
    assert field(b'{"x": "\\\\u003a", "y": ":"}') is None
    assert field(b'{"x": "\\\\\\u003a", "y": ":"}') is None
    # The first value of a repeated key is dropped by the decoder but still counted.
    assert field(b'{"a": {"q": ":::"}, "a": 1}') == "a"
    # Over 1 MiB the key is not named.
    big = b'{"a": "' + b"x" * (1 << 20) + b'", "a": 1}'
    assert duplicate_key(big) == ("$", "an object of this body has the same key more than once")


async def test_too_deep_json_is_400_not_500(api: Engine) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    raw = b'{"name": "n", "cron": "@daily", "message": ' + deep + b"}"
    r = await post_raw(api.client, "/v1/schedules", raw)
    assert r.status_code == 400, r.text


# -- schedules --------------------------------------------------------------------------


SCHEDULE_CAPS: list[tuple[dict[str, Any], str]] = [
    ({"name": "n" * 65}, "name"),
    ({"cron": "* " * 101}, "cron"),
    ({"timezone": "Europe/" + "x" * 60}, "timezone"),
    ({"message": {**MSG, "subject": "s" * (MAX_SUBJECT_CHARS + 1)}}, "message.subject"),
]


async def test_schedule_strings_are_capped(api: Engine) -> None:
    for change, field in SCHEDULE_CAPS:
        body = {"name": "digest", "cron": "@daily", "message": MSG, **change}
        refused(await api.client.post("/v1/schedules", json=body), field)


# -- the model without the decoder, the composer without the model -----------------------


def test_normalize_caps_a_message_built_in_code() -> None:
    """The decoder's caps do not hold for a MessageIn built in code; normalize's do."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"to": [f"u{i}@example.com" for i in range(MAX_RECIPIENTS + 1)]}, "to"),
        ({"to": "a" * 100_000}, "to"),
        ({"subject": "s" * 100_000}, "subject"),
        ({"headers": {"X-A": "v" * 100_000}}, "headers.X-A"),
        ({"headers": {"X" * 100_000: "v"}}, "headers." + "X" * MAX_HEADER_NAME_CHARS + "..."),
        ({"tags": ["t" * 100_000]}, "tags[0]"),
        ({"reply_to": ["r@example.com"] * (MAX_REPLY_TO + 1)}, "reply_to"),
    ]
    for change, field in cases:
        msg = MessageIn(**{"to": "a@example.com", "text": "x", **change})
        with pytest.raises(ValidationError) as info:
            normalize(msg, default_from="e@example.org")
        assert info.value.field == field
    for name in ("tenant", "send_at"):
        with pytest.raises(ValidationError) as info:
            long_string: dict[str, Any] = {name: "9" * 100_000}
            route(MessageIn(to="a@example.com", **long_string), now_ms=0)
        assert info.value.field == name


def stored(**overrides: Any) -> Message:
    fields: dict[str, Any] = dict(
        sender="ann@example.org", to=["bob@example.com"], cc=[], bcc=[], subject="Hi",
        text="x\n", html=None, headers=[], reply_to=[], tags=[],
    )  # fmt: skip
    return Message(**{**fields, **overrides})


def test_compose_refuses_what_cannot_be_written() -> None:
    """Messages stored before the caps: a header name or an address no line can hold."""
    for message in (
        stored(headers=[("X-" + "n" * 990, "v")]),
        stored(to=["l" * 1000 + "@example.com"]),
    ):
        with pytest.raises(UnwritableHeader):
            compose("J", message, message_id_domain="d", now=0)


def test_compose_re_encodes_encoded_words_and_folds_long_names() -> None:
    """A display name stored as "=?...?=" reads back literally, not decoded; an ASCII
    name too long for one line becomes encoded words, which fold."""
    message = stored(
        sender="=?utf-8?b?QWRtaW4=?= <ann@example.org>", to=[("N" * 2000) + " <b@example.com>"]
    )
    out = compose("J", message, message_id_domain="d", now=0)
    assert max(len(line) for line in wire_lines(out.data)) <= 998
    parsed = email.message_from_bytes(out.data, policy=email.policy.default)
    assert parsed["From"].addresses[0].display_name == "=?utf-8?b?QWRtaW4=?="
    assert parsed["To"].addresses[0].addr_spec == "b@example.com"


def test_first_fold_is_never_right_after_the_colon() -> None:
    """Folding "X-A: <90 characters>" after the colon would make a space part of the
    value (found by tests/test_compose_properties.py)."""
    out = compose("J", stored(headers=[("X-A", "v" * 90)]), message_id_domain="d", now=0)
    assert b"\r\nX-A: " + b"v" * 90 + b"\r\n" in out.data
    assert email.message_from_bytes(out.data, policy=email.policy.default)["X-A"] == "v" * 90


def test_schedule_in_caps_are_checked_while_decoding() -> None:
    from engine.api.schedules import ScheduleIn

    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(
            b'{"name": "%s", "cron": "x", "message": {}}' % (b"n" * 65), type=ScheduleIn
        )


# -- the duplicate-key guard agrees with a decoder that sees every pair -----------------

_CHARS = st.sampled_from([":", "a", "\\", '"', "/", "é", " ", "u003a"])


@st.composite
def json_text(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON whose strings are written in any legal way (":" as itself or an escape in
    either case, backslashes and quotes escaped), objects that may repeat a key."""

    def string() -> str:
        out = []
        for ch in draw(st.lists(_CHARS, max_size=5)):
            if ch == ":":
                out.append(draw(st.sampled_from([":", "\\u003a", "\\u003A"])))
            elif ch in '\\"':
                out.append("\\" + ch)
            elif ch == "/":
                out.append(draw(st.sampled_from(["/", "\\/"])))
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    kind = draw(st.sampled_from(["str", "num", "obj", "arr"] if depth < 3 else ["str", "num"]))
    if kind == "str":
        return string()
    if kind == "num":
        return draw(st.sampled_from(["1", "-2.5e3", "true", "null"]))
    items = [draw(json_text(depth + 1)) for _ in range(draw(st.integers(0, 4)))]
    if kind == "arr":
        return "[" + ", ".join(items) + "]"
    keys = [string() for _ in items]
    if keys and draw(st.booleans()):
        keys[-1] = draw(st.sampled_from(keys))  # the same key, maybe written otherwise
    return "{" + ",".join(f"{k} :{v}" for k, v in zip(keys, items, strict=True)) + "}"


def _every_pair_unique(body: bytes) -> bool:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise KeyError
        return dict(pairs)

    try:
        json.loads(body, object_pairs_hook=hook)
    except KeyError:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(json_text())
def test_duplicate_key_guard_matches_a_pairwise_decoder(text: str) -> None:
    body = text.encode()
    assert (duplicate_key(body) is None) == _every_pair_unique(body), body


# -- large bodies: refused before millions of objects are built --------------------------

MIB = 1024 * 1024
# Over the raw-JSON cap of "to" (~700 KB: 100 addresses of 584 escaped characters).
TINY_TO = b'{"text": "x", "to": [' + b'"a",' * 200_000 + b'"a"]}'  # 800 KB


def test_the_body_limit_is_2_mib_by_default() -> None:
    from engine.config import HttpSettings
    from engine.http.settings import ServerSettings

    assert HttpSettings().max_body_bytes == 2 * MIB
    assert ServerSettings().max_body_bytes == 2 * MIB


async def test_a_body_over_2_mib_gets_413_one_at_it_gets_202(redis_server: RedisServer) -> None:
    from engine.queue import open_redis

    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(environ={}, overrides={"http": {"bind": bind}})
    transport = MemoryTransport()
    prefix, suffix = b'{"to": "ann@example.com", "text": "', b'"}'
    line = "Grüße, schöne Straße.\\n".encode()  # multi-byte, many lines
    room = 2 * MIB - len(prefix) - len(suffix)
    at_limit = prefix + line * (room // len(line)) + b" " * (room % len(line)) + suffix
    assert len(at_limit) == 2 * MIB
    async with (
        inprocess_engine(settings, redis_server.url, transport),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=30) as client,
    ):
        r = await post_raw(client, "/v1/messages", at_limit + b" ")
        assert r.status_code == 413, r.text
        r = await post_raw(client, "/v1/messages", at_limit)
        assert r.status_code == 202, r.text
        with trio.fail_after(30):
            while not transport.sent:
                await trio.sleep(0.01)
    # Composed in a worker thread (engine.sender.pool): the bytes are the message's.
    parsed = email.message_from_bytes(transport.sent[0].data, policy=email.policy.default)
    text = "Grüße, schöne Straße.\n" * (room // len(line)) + " " * (room % len(line)) + "\n"
    assert parsed.get_content().replace("\r\n", "\n") == text


def _parse(body: bytes, batch: bool = False) -> tuple[int, str | None, str]:
    """(status, field, detail) of what ingest's parsing answers, or (200, None, "")."""
    from engine.api.exchange import Fail
    from engine.api.ingest import parse_batch, parse_message
    from engine.config import HttpSettings

    try:
        if batch:
            parse_batch(body, HttpSettings())
        else:
            parse_message(body)
    except Fail as fail:
        return fail.status, fail.field, fail.detail
    return 200, None, ""


async def test_an_oversized_to_list_is_refused_naming_to(api: Engine) -> None:
    detail = refused(await post_raw(api.client, "/v1/messages", TINY_TO), "to")
    assert "its JSON has" in detail
    for field in ("cc", "bcc", "reply_to", "tags"):
        raw = TINY_TO.replace(b'"to"', b'"%s"' % field.encode())
        assert _parse(raw)[:2] == (422, field)
    headers = b'{"to": "a@b.co", "text": "x", "headers": {' + b'"h": "",' * 200_000 + b'"h": ""}}'
    assert _parse(headers)[:2] == (422, "headers")


@pytest.mark.parametrize("char", ["\\ud83d\\ude00", '\\"'])
def test_the_raw_json_caps_refuse_nothing_the_decoder_takes(char: str) -> None:
    """At their caps -- every character an escaped surrogate pair (the most bytes) or an
    escaped quote (the most quotes), white space around every item -- capped fields
    still pass the look at large bodies."""
    address = ('"' + char * MAX_ADDRESS_FIELD_CHARS + '"').encode()
    to = b"[ " + b" , ".join([address] * MAX_RECIPIENTS) + b" ]"
    tag = ('"' + char * MAX_TAG_CHARS + '"').encode()
    tags = b"[" + b",".join([tag] * MAX_TAGS) + b"]"
    names = [('"' + char * (MAX_HEADER_NAME_CHARS - 2) + f'{i:02d}"').encode() for i in range(50)]
    value = ('"' + char * MAX_HEADER_VALUE_CHARS + '"').encode()
    headers = b"{" + b",".join(b"%s:%s" % (name, value) for name in names) + b"}"
    body = b'{"to": %s, "tags": %s, "headers": %s, "text": "x"}' % (to, tags, headers)
    assert len(body) > 64 * 1024
    assert _parse(body) == (200, None, "")
    # One item more, and the decoder would refuse it: so does the look.
    over = to[:-2] + b"," + address + b" ]"
    assert _parse(body.replace(to, over))[:2] == (422, "to")


def test_white_space_does_not_count_against_a_cap() -> None:
    body = b'{"to": [' + b" " * 1_000_000 + b'"ann@example.com"], "text": "x"}'
    assert _parse(body) == (200, None, "")


def test_a_value_hidden_behind_a_repeated_key_is_refused_unbuilt() -> None:
    """msgspec decodes every value of a repeated key, keeping the last: the look at a
    large body sees bytes its kept values do not explain."""
    hidden = TINY_TO[:-1] + b', "to": "ann@example.com"}'
    assert _parse(hidden)[:3] == (
        422,
        "$",
        "an object of this body has the same key more than once",
    )
    minimal = b'{"to": "a@b.co", "text": ""}'
    batch = (
        b'{"messages": [' + b",".join([minimal] * 50_000) + b'], "messages": [' + minimal + b"]}"
    )
    assert _parse(batch, batch=True)[:2] == (422, "$")
    inner = b'{"messages": [' + minimal + b", " + hidden + b"]}"
    assert _parse(inner, batch=True)[:2] == (422, "messages[1]")


async def test_a_batch_over_the_count_is_refused_before_its_messages_are_decoded(
    api: Engine,
) -> None:
    batch = {"messages": [MSG] * 1001}
    detail = refused(await api.client.post("/v1/messages/batch", json=batch), "messages")
    assert "1 to 1000" in detail
    # Counted before decoding: 1001 items that are not even messages get the same answer.
    assert _parse(b'{"messages": [' + b"5," * 1000 + b"5]}", batch=True)[:2] == (422, "messages")
    assert _parse(b'{"messages": [' + b"5," * 999 + b"5]}", batch=True)[:2] == (
        422,
        "messages[0]",
    )


def test_errors_inside_a_large_batch_message_keep_their_place() -> None:
    minimal = b'{"to": "a@b.co", "text": ""}'
    big = TINY_TO[:-1] + b', "colour": 1}'
    assert _parse(b'{"messages": [' + minimal + b", " + big + b"]}", batch=True)[:2] == (
        422,
        "messages[1].colour",
    )
    big_to = TINY_TO.replace(b'"a",' * 200_000, b'"a",' * 100_000)
    assert _parse(b'{"messages": [' + minimal + b", " + big_to + b"]}", batch=True)[:2] == (
        422,
        "messages[1].to",
    )
    bad = b'{"messages": [' + minimal + b', {"to": 1, "text": "' + b"x" * 100_000 + b'"}]}'
    assert _parse(bad, batch=True)[:2] == (422, "messages[1].to")


async def test_a_large_message_composes_in_a_thread_to_the_same_bytes() -> None:
    from engine.queue import encode_message
    from engine.sender.pool import compose_mail, composes_in_thread

    for text in ("Grüße, schöne Straße.\n" * 20_000, "x" * 400_000, "short"):
        message = stored(text=text, html=f"<p>{text}</p>", headers=[("X-A", "v" * 1000)])
        size = len(encode_message(message))
        assert composes_in_thread(size) == (text != "short")
        threaded = await compose_mail("J", message, message_id_domain="d", now=0, size=size)
        assert threaded == compose("J", message, message_id_domain="d", now=0)
