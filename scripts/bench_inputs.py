"""Micro-benchmark: the worst handler work any single input can cause (issue 13, point 5).

    .venv/bin/python -m scripts.bench_inputs [--quick]

For each field, the largest value the API accepts and the shapes that are worst for a
parser (runs of spaces, nested angle brackets, encoded words, colons and escapes for the
duplicate-key check, nesting), and some refused ones (the work done before the 422).
Each row times what the engine does with the body, in this process, no I/O:
``decode_json`` (msgspec + the duplicate-key guard), ``new_job`` (validation, routing,
msgpack) and ``compose`` (the wire form, what a sender does) -- the best of several runs.
Target: at most 20 ms a row. Also: the guard's cost on a typical 400-byte message, and
the pre-issue address regex on the shapes that made it backtrack.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from engine.api.exchange import Fail, decode_json
from engine.api.jsonguard import duplicate_key
from engine.api.schedules import ScheduleIn, check_schedule
from engine.errors import ValidationError
from engine.models import (
    MAX_DISPLAY_NAME_CHARS,
    MAX_HEADER_NAME_CHARS,
    MAX_HEADER_VALUE_CHARS,
    MAX_HEADERS,
    MAX_RECIPIENTS,
    MAX_REPLY_TO,
    MAX_SUBJECT_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    BatchIn,
    MessageIn,
)
from engine.queue import decode_message, new_job
from engine.transport import compose

TARGET_MS = 20.0
MAX_BODY_BYTES = 10 * 1024 * 1024  # http.max_body_bytes, default
MAX_BATCH = 1000  # http.max_batch_messages, default
JOB = "0190f0c2a7b84c5e8d3f2a1b0c9d8e7f"

_decode_one = msgspec.json.Decoder(MessageIn).decode
_decode_batch = msgspec.json.Decoder(BatchIn).decode
_decode_schedule = msgspec.json.Decoder(ScheduleIn).decode
# engine/models.py before issue 13 matched "Name <addr>" with this (quadratic in runs
# of white space that end in a failed match; it was behind a 998-character cap).
_OLD_NAMED_RE = re.compile(r"^\s*(?P<name>[^<>\r\n]*?)\s*<(?P<addr>[^<>\s]+)>\s*$")

TYPICAL: dict[str, Any] = {
    "from": "Shop <shop@example.com>",
    "to": "ann@example.com",
    "cc": ["Bob <bob@example.org>"],
    "subject": "Your order #12345 has shipped",
    "text": "Hello Ann,\n\nyour order has shipped and will arrive soon. Thanks!\n",
    "html": "<p>Hello Ann, your order has shipped: see https://shop.example.com/o/1</p>",
    "headers": {"X-Campaign": "spring"},
    "tags": ["order"],
}


@dataclass
class Row:
    name: str
    size: int
    outcome: str
    decode_ms: float
    guard_ms: float = 0.0
    job_ms: float = 0.0
    compose_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.decode_ms + self.guard_ms + self.job_ms + self.compose_ms


def best_ms(fn: Callable[[], object], budget_s: float) -> float:
    """The fastest of several runs of ``fn`` (at least 2, about ``budget_s`` in all)."""
    times: list[float] = []
    spent = 0.0
    while len(times) < 2 or (spent < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return min(times) * 1000


def run_message(name: str, body: bytes, *, batch: bool, budget_s: float) -> Row:
    decoder = _decode_batch if batch else _decode_one

    def decode() -> Any:
        try:
            return decoder(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            return exc

    decoded: Any
    try:
        decoded = decode_json(decoder, body)  # the API's answer, guard included
    except Fail as fail:
        decoded = fail
    decode_ms = best_ms(decode, budget_s)
    guard_ms = 0.0
    if not isinstance(decode(), Exception):  # decode_json runs the guard after a decode
        guard_ms = best_ms(lambda: duplicate_key(body), budget_s)
    if isinstance(decoded, Fail):
        return Row(name, len(body), f"{decoded.status} {decoded.field}", decode_ms, guard_ms)
    messages = decoded.messages if batch else [decoded]
    if batch and len(messages) > MAX_BATCH:  # ingest's check, right after the decode
        return Row(name, len(body), "422 messages", decode_ms, guard_ms)

    def jobs() -> Any:
        try:
            return [new_job(m, JOB, default_from="engine@example.org", now_ms=0) for m in messages]
        except ValidationError as exc:
            return exc

    made = jobs()
    job_ms = best_ms(jobs, budget_s)
    if isinstance(made, ValidationError):
        return Row(name, len(body), f"422 {made.field}", decode_ms, guard_ms, job_ms)
    stored = [decode_message(j.payload) for j in made]

    def wire() -> None:
        for s in stored:
            compose(JOB, s, message_id_domain="engine.example", now=0.0)

    compose_ms = best_ms(wire, budget_s) / (len(stored) if batch else 1)
    outcome = "202" if not batch else f"202 ({len(stored)} msgs; compose: per msg)"
    return Row(name, len(body), outcome, decode_ms, guard_ms, job_ms, compose_ms)


def run_schedule(name: str, body: bytes, budget_s: float) -> Row:
    def work() -> str:
        try:
            check_schedule(decode_json(_decode_schedule, body), default_from="e@x.org", now_ms=0)
        except Fail as fail:
            return f"{fail.status} {fail.field}"
        except ValidationError as exc:
            return f"422 {exc.field}"
        return "ok"

    outcome = work()
    return Row(name, len(body), outcome, best_ms(work, budget_s))


def enc(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def message(**fields: Any) -> bytes:
    return enc({"to": "ann@example.com", "text": "x", **fields})


def fill_body(prefix: bytes, unit: bytes, suffix: bytes, limit: int = MAX_BODY_BYTES) -> bytes:
    """``prefix + unit * n + suffix`` as long as ``limit`` allows."""
    n = (limit - len(prefix) - len(suffix)) // len(unit)
    return prefix + unit * n + suffix


def cases() -> list[tuple[str, bytes, str]]:
    """(name, body, kind): kind is "one", "batch" or "schedule"."""
    name = ("Ünïcødé Nåme, " * 30)[:MAX_DISPLAY_NAME_CHARS].strip()
    domain = f"{'d' * 63}.{'e' * 63}.{'x' * 55}.example"  # 191 + 1 + 60: 252 octets
    addresses = [f"{name} <{i:03d}{'l' * 57}@{domain}>" for i in range(MAX_RECIPIENTS)]
    address = addresses[0]
    big_headers = {
        f"X-{i:02d}-" + "h" * (MAX_HEADER_NAME_CHARS - 5): ("wörd " * 400)[:MAX_HEADER_VALUE_CHARS]
        for i in range(MAX_HEADERS)
    }
    ew_headers = {
        f"X-{i:02d}": ("=?utf-8?b?QUJD?= " * 200)[:MAX_HEADER_VALUE_CHARS].strip()
        for i in range(MAX_HEADERS)
    }
    spaces = " " * 250
    line = "The quick brown fox jumps over the lazy dog, again and again.\n"
    typical = enc(TYPICAL)
    one: list[tuple[str, bytes]] = [
        ("typical message", typical),
        ("to: 100 x largest named address", message(to=addresses)),
        (
            "to+cc+reply_to all largest",
            message(
                to=addresses[:50],
                cc=addresses[50:],
                reply_to=addresses[:MAX_REPLY_TO],
                **{"from": address},
            ),
        ),
        (
            "to: spaces inside <> (issue 13)",
            message(to="a <" + " " * 40000 + "b@example.com" + " " * 40000 + ">"),
        ),
        (
            "to: spaces inside <>, under the cap",
            message(to=["a <" + spaces + "b@example.com" + spaces + ">"] * 100),
        ),
        ("to: spaces before <, failing", message(to=["a" + " " * 570 + "x<b@e.com> >"] * 100)),
        ("to: nested angle brackets", message(to=["<" * 280 + "b@example.com" + ">" * 280] * 100)),
        (
            "to: hyphen labels (domain backtracking)",
            message(to=["a@" + ("a" + "-" * 61 + ".") * 3 + "-"] * 100),
        ),
        ("subject: 998 non-ASCII", message(subject="ü" * MAX_SUBJECT_CHARS)),
        ("subject: 998 of spaces and words", message(subject=("a" + " " * 20) * 47 + "b")),
        ("subject: 998 of =?", message(subject="=?" * (MAX_SUBJECT_CHARS // 2))),
        ("headers: 50 x 76-char name, 2000 non-ASCII", message(headers=big_headers)),
        ("headers: 50 x 2000 of encoded words", message(headers=ew_headers)),
        (
            "tags: 20 x 64",
            message(tags=[f"{i:02d}" + "t" * (MAX_TAG_CHARS - 2) for i in range(MAX_TAGS)]),
        ),
        (
            "text: 10 MiB ASCII, short lines",
            fill_body(b'{"to":"a@b.co","text":"', line.encode().replace(b"\n", b"\\n"), b'"}'),
        ),
        (
            "text: 10 MiB non-ASCII, short lines",
            fill_body(b'{"to":"a@b.co","text":"', "Grüße, schöne Straße.\\n".encode(), b'"}'),
        ),
        ("text: 10 MiB one line (QP)", fill_body(b'{"to":"a@b.co","text":"', b"x", b'"}')),
        (
            "html: 10 MiB of tags and colons",
            fill_body(
                b'{"to":"a@b.co","html":"',
                b'<a href=\\"https://x.example:443/p\\">link</a> ',
                b'"}',
            ),
        ),
        (
            "text: 10 MiB of \\\\u003a (not escapes)",
            fill_body(b'{"to":"a@b.co","text":"', b"\\\\u003a ", b'"}'),
        ),
        (
            "text: 10 MiB of \\u003a escapes",
            fill_body(b'{"to":"a@b.co","text":"', b"\\u003a ", b'"}'),
        ),
        (
            "to: 10 MiB list of tiny strings (refused)",
            fill_body(b'{"text":"x","to":[', b'"a",', b'"a"]}'),
        ),
        (
            "headers: 10 MiB object (refused)",
            fill_body(b'{"to":"a@b.co","text":"x","headers":{', b'"h":"",', b'"h":""}}'),
        ),
        (
            "duplicate key, 10 MiB body",
            fill_body(b'{"to":"a@b.co","to":"a@b.co","text":"', b"x:", b'"}'),
        ),
    ]
    out = [(n, b, "one") for n, b in one]
    out += [
        (
            "batch: 1000 typical",
            b'{"messages":[' + b",".join([typical] * MAX_BATCH) + b"]}",
            "batch",
        ),
        (
            "batch: 1000 x 100 recipients",
            enc(
                {
                    "messages": [
                        {"to": [f"u{i}@example.com" for i in range(MAX_RECIPIENTS)], "text": "x"}
                    ]
                    * MAX_BATCH
                }
            ),
            "batch",
        ),
        (
            "batch: 10 MiB of minimal msgs (refused)",
            fill_body(
                b'{"messages":[', b'{"to":"a@b.co","text":""},', b'{"to":"a@b.co","text":""}]}'
            ),
            "batch",
        ),
        (
            "schedule: largest name/cron/timezone",
            enc(
                {
                    "name": "n" * 64,
                    "cron": "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47,48,49,50,51,52,53,54,55,56,57 * * * *",
                    "timezone": "America/Argentina/ComodRivadavia",
                    "message": TYPICAL,
                }
            ),
            "schedule",
        ),
        (
            "schedule: message nested 2000 deep",
            b'{"name":"n","cron":"@daily","message":' + b"[" * 2000 + b"]" * 2000 + b"}",
            "schedule",
        ),
    ]
    return out


def guard_cost() -> tuple[float, float, float, int]:
    """(guard, decode, new_job) in µs on the typical message, and its size."""
    body = enc(TYPICAL)
    msg = _decode_one(body)
    n = 20_000

    def best(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6

    return (
        best(lambda: duplicate_key(body)),
        best(lambda: _decode_one(body)),
        best(lambda: new_job(msg, JOB, default_from="engine@example.org", now_ms=0)),
        len(body),
    )


def old_regex_rows() -> list[tuple[str, float]]:
    rows = []
    for n in (500, 2000, 8000, 16000):
        shape = "a" + " " * n + "x<b@e.com> >"
        rows.append((f"{len(shape)} chars", best_ms(lambda s=shape: _OLD_NAMED_RE.match(s), 0.2)))  # type: ignore[misc]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs per row")
    args = parser.parse_args()
    budget_s = 0.2 if args.quick else 1.0
    rows: list[Row] = []
    for name, body, kind in cases():
        print(f"  {name} ...", file=sys.stderr, flush=True)
        if kind == "schedule":
            rows.append(run_schedule(name, body, budget_s))
        else:
            rows.append(run_message(name, body, batch=kind == "batch", budget_s=budget_s))
    width = max(len(r.name) for r in rows)
    print(f"\nHandler work per input (best of several runs; target <= {TARGET_MS:g} ms)\n")
    head = ("input", "bytes", "decode", "guard", "new_job", "compose", "total", "ok", "outcome")
    print(f"{head[0]:<{width}}  {head[1]:>10}" + "".join(f"  {h:>9}" for h in head[2:7]), *head[7:])
    for r in rows:
        times = (r.decode_ms, r.guard_ms, r.job_ms, r.compose_ms, r.total_ms)
        ok = "yes" if r.total_ms <= TARGET_MS else "NO "
        print(
            f"{r.name:<{width}}  {r.size:>10,}" + "".join(f"  {t:>7.3f}ms" for t in times),
            ok,
            r.outcome,
        )
    guard, decode, job, size = guard_cost()
    print(f"\nDuplicate-key guard on the typical {size}-byte message: {guard:.2f} µs "
          f"(decode {decode:.2f} µs, new_job {job:.2f} µs: +{100 * guard / (decode + job):.0f} %)")  # fmt: skip
    print("\nThe address regex before issue 13, on 'a' + spaces + 'x<b@e.com> >':")
    for label, ms in old_regex_rows():
        print(f"  {label:>12}: {ms:8.2f} ms")


if __name__ == "__main__":
    main()
