"""The webhook dispatcher's fast paths give what the general code gives: a stream entry as
RESP lists it parses to the same events as through a dict (``parse_flat_entry`` vs
``parse_entry``), and a plain event's formatted JSON is the bytes msgspec makes."""

from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from engine.models import Event, ms_to_iso
from engine.queue import parse_entry
from engine.queue.wire import parse_flat_entry
from engine.webhooks import payload
from engine.webhooks.endpoint import Payload

WORD = st.sampled_from(["queued", "processing", "sent", "retrying", "failed", "suppressed"])
TEXT = st.text(min_size=1, max_size=12)  # anything: quotes, backslashes, non-ASCII
ENTRY_ID = st.builds(lambda a, b: f"{a}-{b}", st.integers(0, 2**48), st.integers(0, 99))
JOB_ID = st.one_of(st.text("0123456789abcdef", min_size=32, max_size=32), TEXT)


@st.composite
def entries(draw: st.DrawFn) -> list[bytes]:
    """A stream entry's fields, flat, the plain five in lib_event's order and maybe more."""
    kind = draw(WORD)
    flat = [b"type", kind.encode(), b"id", draw(JOB_ID).encode(),
            b"at", str(draw(st.integers(0, 2**45))).encode(),
            b"attempt", str(draw(st.integers(0, 30))).encode(),
            b"state", draw(st.one_of(st.just(kind), WORD)).encode()]  # fmt: skip
    for name in draw(st.lists(st.sampled_from(["error", "tenant", "tags", "bounce"]),
                              unique=True)):  # fmt: skip
        flat += [name.encode(), draw(TEXT).encode()]
    return flat


@given(entry_id=ENTRY_ID, flat=entries())
def test_a_flat_entry_parses_as_its_dict_does(entry_id: str, flat: list[bytes]) -> None:
    fields = dict(zip(flat[0::2], flat[1::2], strict=True))
    assert parse_flat_entry(entry_id, flat) == parse_entry(entry_id, fields)


def test_a_batch_entry_goes_the_general_way() -> None:
    flat = [b"type", b"queued", b"ids", b"a,b", b"at", b"5", b"attempt", b"0", b"state", b"queued"]
    got = parse_flat_entry("7-0", flat)
    assert [(e.event_id, e.id) for e in got] == [("7-0.0", "a"), ("7-0.1", "b")]


@given(
    event_id=st.one_of(ENTRY_ID, ENTRY_ID.map(lambda e: f"{e}.3"), TEXT),
    kind=st.one_of(WORD, TEXT), state=st.one_of(WORD, TEXT), job_id=JOB_ID,
    at=st.integers(0, 2**45), attempt=st.integers(0, 30),
    tenant=st.one_of(st.just("default"), TEXT), tags=st.lists(TEXT, max_size=2),
    error=st.none() | TEXT,
)  # fmt: skip
def test_a_payload_is_the_bytes_msgspec_makes(
    event_id: str, kind: str, state: str, job_id: str, at: int, attempt: int, tenant: str,
    tags: list[str], error: str | None,
) -> None:  # fmt: skip
    e = Event(event_id, kind, job_id, at, attempt, state, tenant, error, tags)
    general = msgspec.json.encode(Payload(f"message.{kind}", ms_to_iso(at), e))
    assert payload(e) == general


@given(event_id=st.one_of(ENTRY_ID, ENTRY_ID.map(lambda e: f"{e}.12")), kind=WORD, state=WORD,
       job_id=st.text("0123456789abcdef", min_size=32, max_size=32),
       at=st.integers(0, 2**45), attempt=st.integers(0, 30))  # fmt: skip
def test_a_plain_payload_is_the_bytes_msgspec_makes(
    event_id: str, kind: str, state: str, job_id: str, at: int, attempt: int
) -> None:
    e = Event(event_id, kind, job_id, at, attempt, state)
    assert payload(e) == msgspec.json.encode(Payload(f"message.{kind}", ms_to_iso(at), e))
