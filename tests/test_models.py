"""Request validation: every rejection names the field."""

from __future__ import annotations

import msgspec
import pytest

from engine.api.ingest import error_field
from engine.errors import ValidationError
from engine.models import BatchIn, Message, MessageIn, bare_address, ms_to_iso, normalize


def _norm(**body: object) -> Message:
    raw = msgspec.json.encode({"to": "a@example.com", "text": "hi", **body})
    return normalize(msgspec.json.decode(raw, type=MessageIn), default_from="engine@localhost")


def _field_of(**body: object) -> str:
    with pytest.raises(ValidationError) as info:
        _norm(**body)
    return info.value.field


def test_minimal_message_gets_default_sender() -> None:
    m = _norm()
    assert m.sender == "engine@localhost" and m.to == ["a@example.com"] and m.text == "hi"


def test_string_or_list_recipients_and_named_addresses() -> None:
    m = _norm(to=["Ann <ann@example.com>", "bob@example.org"], cc="c@example.net", bcc=["d@x.io"])
    assert m.to == ["Ann <ann@example.com>", "bob@example.org"]
    assert m.envelope_recipients() == [
        "ann@example.com",
        "bob@example.org",
        "c@example.net",
        "d@x.io",
    ]


def test_envelope_recipients_are_deduplicated() -> None:
    m = _norm(to=["a@example.com", "A <a@example.com>"], cc=["a@example.com"])
    assert m.envelope_recipients() == ["a@example.com"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"to": []}, "to"),
        ({"to": "not-an-address"}, "to"),
        ({"to": ["a@example.com", "bad@"]}, "to[1]"),
        ({"cc": ["x y@example.com"]}, "cc[0]"),
        ({"from": "nobody"}, "from"),
        ({"subject": "hi\r\nBcc: evil@example.com"}, "subject"),
        ({"subject": "line\nbreak"}, "subject"),
        ({"headers": {"X-Ok": "fine", "X-Bad": "a\r\nb"}}, "headers.X-Bad"),
        ({"headers": {"Bad Name": "v"}}, "headers.Bad Name"),
        ({"headers": {"Message-ID": "<x@y>"}}, "headers.Message-ID"),
        ({"text": None}, "text"),
        ({"reply_to": "nope"}, "reply_to"),
        ({"tags": [""]}, "tags[0]"),
        ({"to": "Ann\n <a@example.com>"}, "to"),
    ],
)
def test_invalid_fields_are_named(body: dict[str, object], field: str) -> None:
    assert _field_of(**body) == field


def test_too_many_recipients() -> None:
    assert _field_of(to=[f"u{i}@example.com" for i in range(101)]) == "to"


def test_batch_prefix() -> None:
    batch = msgspec.json.decode(
        b'{"messages":[{"to":"a@b.co","text":"x"},{"to":"bad","text":"x"}]}', type=BatchIn
    )
    normalize(batch.messages[0], default_from="e@l")
    with pytest.raises(ValidationError) as info:
        normalize(batch.messages[1], default_from="e@l", field_prefix="messages[1].")
    assert info.value.field == "messages[1].to"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"to": 5, "text": "x"}', "to"),
        (b'{"to": "a@b.co", "text": "x", "colour": 1}', "colour"),
        (b'{"text": "x"}', "to"),
        (b'{"to": ["a@b.co", 7], "text": "x"}', "to[1]"),
    ],
)
def test_decode_errors_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(raw, type=MessageIn)
    assert error_field(info.value)[0] == field


def test_batch_decode_error_path() -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.json.decode(b'{"messages":[{"to":"a@b.co"},{"to":1}]}', type=BatchIn)
    assert error_field(info.value)[0] == "messages[1].to"


def test_stored_form_roundtrips_msgpack() -> None:
    m = _norm(subject="Grüße", html="<p>x</p>", headers={"X-Campaign": "7"}, tags=["a"])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(m), type=Message) == m


def test_helpers() -> None:
    assert bare_address("Ann <a@b.co>") == "a@b.co"
    assert bare_address("a@b.co") == "a@b.co"
    assert ms_to_iso(0) == "1970-01-01T00:00:00.000Z"
