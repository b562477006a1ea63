"""Request validation: every rejection names the field."""

from __future__ import annotations

import msgspec
import pytest

from engine.api.exchange import error_field
from engine.errors import ValidationError
from engine.models import (
    MAX_ADDRESS_FIELD_CHARS,
    BatchIn,
    Message,
    MessageIn,
    ascii_domain,
    bare_address,
    check_address,
    ms_to_iso,
    normalize,
)


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
    # One list over the cap is refused by the decoder; to+cc+bcc over it by normalize.
    with pytest.raises(msgspec.ValidationError) as info:
        _norm(to=[f"u{i}@example.com" for i in range(101)])
    assert error_field(info.value)[0] == "to"
    to = [f"u{i}@example.com" for i in range(60)]
    assert _field_of(to=to, cc=[f"c{i}@example.com" for i in range(41)]) == "to"


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


# -- internationalised addresses (RFC 6531 local parts, IDNA 2008 domains) ---------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("ünal@example.com", "ünal@example.com"),
        ("用户@例子.广告", "用户@例子.广告"),
        ("Jörg <jörg@münchen.de>", "Jörg <jörg@münchen.de>"),
        # U-labels are stored in canonical form (UTS 46 mapping folds case); A-labels as given.
        ("ann@MÜNCHEN.DE", "ann@münchen.de"),
        ("Ann <ann@Bücher.Example>", "Ann <ann@bücher.example>"),
        ("ann@xn--mnchen-3ya.de", "ann@xn--mnchen-3ya.de"),
        ("ANN@EXAMPLE.COM", "ANN@EXAMPLE.COM"),
        ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή@παράδειγμα.δοκιμή"),
    ],
)
def test_international_addresses_are_accepted(given: str, stored: str) -> None:
    assert check_address("to", given) == stored
    assert _norm(to=given).to == [stored]


@pytest.mark.parametrize(
    ("address", "complaint"),
    [
        ("ü@exa_mple.de", "not a valid email address"),  # "_" is no hostname character
        ("a@ü_b.de", "bad IDNA 2008 domain"),
        ("a@xn--zz.de", "bad IDNA 2008 domain"),  # not Punycode
        ("a@xn--a.de", "bad IDNA 2008 domain"),  # Punycode of a control character
        ("a@-ü.de", "bad IDNA 2008 domain"),
        ("a@ü..de", "bad IDNA 2008 domain"),
        ("a@ü.de.", "not a valid email address"),
        ("a@" + "ü" * 64 + ".de", "bad IDNA 2008 domain"),  # label over 63 octets as A-label
        ("ü@" + "a" * 250 + ".de", "not a valid email address"),  # over 254 characters
        ("ü" * 33 + "@example.com", "longer than 64 octets"),  # 66 octets, 33 characters
        ("a\u200db@example.com", "U+200D may not appear"),  # zero-width joiner
        ("a\u202eb@example.com", "U+202E may not appear"),  # bidi override
        ("a\u00a0b@example.com", "U+00A0 may not appear"),  # no-break space
        ("a\u0085b@example.com", "U+0085 may not appear"),  # C1 control (NEL)
        ("u\u0308nal@example.com", "not in Unicode normalization form NFC"),
        ("ü..x@example.com", "not a valid email address"),
        (".ü@example.com", "not a valid email address"),
        ("ü@", "not a valid email address"),
        ("ü", "not a valid email address"),
        ("Ann <ü b@example.com>", "not a valid email address"),
    ],
)
def test_bad_international_addresses_are_refused(address: str, complaint: str) -> None:
    with pytest.raises(ValidationError) as info:
        check_address("to", address)
    assert complaint in info.value.detail
    assert info.value.field == "to"


def test_address_length_is_capped_before_parsing() -> None:
    with pytest.raises(ValidationError) as info:
        check_address("to", " " * 5000 + "a@example.com")
    assert f"at most {MAX_ADDRESS_FIELD_CHARS} characters" in info.value.detail


def test_ascii_domain() -> None:
    assert ascii_domain("example.com") == "example.com"
    assert ascii_domain("münchen.de") == "xn--mnchen-3ya.de"
    assert ascii_domain("MÜNCHEN.de") == "xn--mnchen-3ya.de"
    with pytest.raises(UnicodeError):
        ascii_domain("ü_b.de")
