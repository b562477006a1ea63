"""Micro-benchmark: the worst handler work any single input can cause (issue 13, point 5).

    .venv/bin/python -m scripts.bench_inputs [--quick] [--max-body-mib N]

For each field, the largest value the API accepts and the shapes that are worst for a
parser (runs of spaces, nested angle brackets, encoded words, colons and escapes for the
duplicate-key check, nesting), and some refused ones (the work done before the 422).
"Largest" is sized at ``http.max_body_bytes`` (its default, or ``--max-body-mib``); a
body over it would get 413 before any work. Each row times what the engine does with
the body, in this process, no I/O, calling the production functions: ``parse_message``
/ ``parse_batch`` (engine.api.ingest: the raw-JSON look at large bodies, the batch
count, msgspec, the recipient cap), ``refuse_repeated_keys`` (the duplicate-key guard),
``new_job`` (validation, routing, msgpack) and ``compose`` (the wire form, what a sender
does; in a worker thread above engine.sender.pool.COMPOSE_THREAD_ABOVE_BYTES, where the
"stall" column is the longest the Trio loop then waited, measured) -- the best of
several runs. Target: at most 20 ms of handler work a row, and of stall. Also: the
two-step batch decode against one decode, the guard's cost on a typical 400-byte
message, and the pre-issue address regex on the shapes that made it backtrack.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
import timeit
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import trio

from engine.api.exchange import Fail, decode_json, refuse_repeated_keys
from engine.api.ingest import _YIELD_EVERY, YIELD_ABOVE_BYTES, parse_batch, parse_message
from engine.api.schedules import ScheduleIn, check_schedule
from engine.config import HttpSettings
from engine.errors import ValidationError
from engine.models import (
    MAX_DISPLAY_NAME_CHARS,
    MAX_FIELD_JSON,
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
from engine.queue import NewJob, decode_message, new_job
from engine.sender.pool import compose_mail, composes_in_thread
from engine.transport import compose

TARGET_MS = 20.0
MIB = 1024 * 1024
HTTP = HttpSettings()
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
    where: str = ""  # where compose ran: "inline", "thread" ("" when not composed)
    stall_ms: float = 0.0  # longest the loop waited while composing
    # A batch's new_job work is done _YIELD_EVERY messages between turns of the loop:
    # the slowest such chunk (0: not a batch -- decode, guard and new_job run at once).
    chunk_ms: float = 0.0

    @property
    def handler_ms(self) -> float:
        return self.decode_ms + self.guard_ms + self.job_ms

    @property
    def hold_ms(self) -> float:
        """The longest the handler holds the loop without letting anything else run: a
        batch yields every _YIELD_EVERY messages, a single message over
        YIELD_ABOVE_BYTES between its steps (engine.api.ingest)."""
        if self.chunk_ms:
            return max(self.decode_ms + self.guard_ms, self.chunk_ms)
        if self.size > YIELD_ABOVE_BYTES:
            return max(self.decode_ms, self.guard_ms, self.job_ms)
        return self.handler_ms

    @property
    def ok(self) -> bool:
        return self.hold_ms <= TARGET_MS and self.stall_ms <= TARGET_MS


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


def loop_stall_ms(fn: Callable[[], Awaitable[object]], runs: int) -> float:
    """The longest the Trio loop waited while ``fn()`` ran (the loop spinning on
    checkpoints, as busy as it can be) -- the best of ``runs``."""

    async def once() -> float:
        done = trio.Event()
        worst = 0.0

        async def work() -> None:
            await fn()
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(work)
            last = time.perf_counter()
            while not done.is_set():
                await trio.lowlevel.checkpoint()
                now = time.perf_counter()
                worst = max(worst, now - last)
                last = now
        return worst * 1000

    return min(trio.run(once) for _ in range(runs))


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Fail as fail:
        return f"{fail.status} {fail.field}"
    return "ok"


def run_message(name: str, body: bytes, *, batch: bool, limit: int, budget_s: float) -> Row:
    if len(body) > limit:
        return Row(name, len(body), "413 (over http.max_body_bytes)", 0.0)

    def parse() -> list[MessageIn]:
        if batch:
            return parse_batch(body, HTTP)[0]
        return [parse_message(body)]

    def guard() -> None:
        refuse_repeated_keys(body)

    outcome = _outcome(parse)
    decode_ms = best_ms(lambda: _outcome(parse), budget_s)
    if outcome != "ok":
        return Row(name, len(body), outcome, decode_ms)
    messages = parse()
    outcome = _outcome(guard)
    guard_ms = best_ms(lambda: _outcome(guard), budget_s)
    if outcome != "ok":
        return Row(name, len(body), outcome, decode_ms, guard_ms)

    def jobs() -> Any:
        try:
            return [new_job(m, JOB, default_from="engine@example.org", now_ms=0) for m in messages]
        except ValidationError as exc:
            return exc

    made = jobs()
    job_ms = best_ms(jobs, budget_s)
    chunk_ms = 0.0
    if batch:
        chunks = [messages[i : i + _YIELD_EVERY] for i in range(0, len(messages), _YIELD_EVERY)]

        def chunk_jobs(chunk: list[MessageIn]) -> list[NewJob]:
            return [new_job(m, JOB, default_from="engine@example.org", now_ms=0) for m in chunk]

        chunk_ms = max(
            best_ms(functools.partial(chunk_jobs, c), budget_s / len(chunks)) for c in chunks
        )
    if isinstance(made, ValidationError):
        prefix = "messages[?]." if batch else ""
        return Row(name, len(body), f"422 {prefix}{made.field}", decode_ms, guard_ms, job_ms)
    payloads = [j.payload for j in made]
    stored = [decode_message(p) for p in payloads]
    threaded = [composes_in_thread(len(p)) for p in payloads]

    def wire() -> None:
        for s in stored:
            compose(JOB, s, message_id_domain="engine.example", now=0.0)

    compose_ms = best_ms(wire, budget_s) / len(stored)
    where = "thread" if any(threaded) else "inline"
    stall_ms = compose_ms
    if any(threaded):
        # The sender's own call (engine.sender.pool.compose_mail), which runs compose in
        # a worker thread: how long the loop waits, and the same bytes as inline.
        big = max(range(len(stored)), key=lambda i: len(payloads[i]))
        call = functools.partial(
            compose_mail, JOB, stored[big], message_id_domain="engine.example", now=0.0,
            size=len(payloads[big]),
        )  # fmt: skip
        stall_ms = loop_stall_ms(call, 2 if budget_s < 1 else 5)
        inline = compose(JOB, stored[big], message_id_domain="engine.example", now=0.0)
        assert trio.run(call) == inline, "compose in a thread gave other bytes"
    outcome = "202" if not batch else f"202 ({len(stored)} msgs; compose: per msg)"
    return Row(
        name, len(body), outcome, decode_ms, guard_ms, job_ms, compose_ms, where, stall_ms,
        chunk_ms,
    )  # fmt: skip


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


def fill_body(prefix: bytes, unit: bytes, suffix: bytes, limit: int) -> bytes:
    """``prefix + unit * n + suffix`` as long as ``limit`` allows."""
    n = (limit - len(prefix) - len(suffix)) // len(unit)
    return prefix + unit * n + suffix


def under_cap(prefix: bytes, units: Callable[[int], bytes], suffix: bytes, field: str) -> bytes:
    """``prefix`` + a value of ``field`` made of ``units(i)`` (comma-separated), as many
    as its raw-JSON caps (engine.models.MAX_FIELD_JSON: bytes, quotes) allow +
    ``suffix``: the most the typed decode builds before its 422."""
    cap = MAX_FIELD_JSON[field]
    parts: list[bytes] = []
    size, quotes = 2, 0
    while True:
        unit = units(len(parts))
        if size + len(unit) + 1 > cap.max_bytes or quotes + unit.count(b'"') > cap.max_quotes:
            break
        parts.append(unit)
        size += len(unit) + 1
        quotes += unit.count(b'"')
    return prefix + b",".join(parts) + suffix


def cases(limit: int) -> list[tuple[str, bytes, str]]:
    """(name, body, kind): kind is "one", "batch" or "schedule"; "largest" bodies are
    ``limit`` bytes."""
    mib = f"{limit / MIB:g} MiB"
    batch_max = HTTP.max_batch_messages
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
            f"text: {mib} ASCII, short lines",
            fill_body(
                b'{"to":"a@b.co","text":"', line.encode().replace(b"\n", b"\\n"), b'"}', limit
            ),
        ),
        (
            f"text: {mib} non-ASCII, short lines",
            fill_body(
                b'{"to":"a@b.co","text":"', "Grüße, schöne Straße.\\n".encode(), b'"}', limit
            ),
        ),
        (f"text: {mib} one line (QP)", fill_body(b'{"to":"a@b.co","text":"', b"x", b'"}', limit)),
        (
            f"html: {mib} of tags and colons",
            fill_body(
                b'{"to":"a@b.co","html":"',
                b'<a href=\\"https://x.example:443/p\\">link</a> ',
                b'"}',
                limit,
            ),
        ),
        (
            f"text: {mib} of \\\\u003a (not escapes)",
            fill_body(b'{"to":"a@b.co","text":"', b"\\\\u003a ", b'"}', limit),
        ),
        (
            f"text: {mib} of \\u003a escapes",
            fill_body(b'{"to":"a@b.co","text":"', b"\\u003a ", b'"}', limit),
        ),
        (
            f"to: {mib} list of tiny strings (refused)",
            fill_body(b'{"text":"x","to":[', b'"a",', b'"a"]}', limit),
        ),
        (
            "to: most items its JSON caps allow (refused)",
            under_cap(b'{"text":"x","to":[', lambda i: b'"%020x"' % i, b"]}", "to"),
        ),
        (
            f"to: {mib} list hidden by a repeated key (refused)",
            fill_body(b'{"text":"x","to":[', b'"a",', b'"a"],"to":"a@b.co"}', limit),
        ),
        (
            f"headers: {mib} object (refused)",
            fill_body(b'{"to":"a@b.co","text":"x","headers":{', b'"h":"",', b'"h":""}}', limit),
        ),
        (
            "headers: most pairs its JSON caps allow (refused)",
            under_cap(
                b'{"to":"a@b.co","text":"x","headers":{',
                lambda i: b'"%020x":"%021x"' % (i, i),
                b"}}",
                "headers",
            ),
        ),
        (
            f"duplicate key, {mib} body",
            fill_body(b'{"to":"a@b.co","to":"a@b.co","text":"', b"x:", b'"}', limit),
        ),
    ]
    out = [(n, b, "one") for n, b in one]
    minimal = b'{"to":"a@b.co","text":""}'

    def batch_of(messages: list[Any]) -> bytes:
        return enc({"messages": messages})

    def recipients(n: int) -> dict[str, Any]:
        return {"to": [f"u{i}@example.com" for i in range(n)], "text": "x"}

    per_message = HTTP.max_batch_recipients // batch_max
    out += [
        (f"batch: {batch_max} typical", batch_of([TYPICAL] * batch_max), "batch"),
        (
            f"batch: {batch_max} x {per_message} recipients (largest accepted)",
            batch_of([recipients(per_message)] * batch_max),
            "batch",
        ),
        (
            f"batch: {batch_max} x {MAX_RECIPIENTS} recipients (refused)",
            batch_of([recipients(MAX_RECIPIENTS)] * batch_max),
            "batch",
        ),
        (
            f"batch: {batch_max} x {MAX_HEADERS} headers",
            batch_of(
                [{**TYPICAL, "headers": {f"X-H{i:02d}": "v" for i in range(MAX_HEADERS)}}]
                * batch_max
            ),
            "batch",
        ),
        (
            f"batch: {batch_max + 1} typical (refused)",
            batch_of([TYPICAL] * (batch_max + 1)),
            "batch",
        ),
        (
            f"batch: {mib} of minimal msgs (refused)",
            fill_body(b'{"messages":[', minimal + b",", minimal + b"]}", limit),
            "batch",
        ),
        (
            f"batch: {mib} hidden by a repeated key (refused)",
            fill_body(
                b'{"messages":[',
                minimal + b",",
                minimal + b'],"messages":[' + minimal + b"]}",
                limit,
            ),
            "batch",
        ),
        (
            f"batch: a message's {mib} to list (refused)",
            fill_body(
                b'{"messages":[' + minimal + b',{"text":"x","to":[', b'"a",', b'"a"]}]}', limit
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


def batch_steps(budget_s: float) -> tuple[float, float, float]:
    """On the typical full batch: (two-step parse_batch, one msgspec decode + the count
    and recipient checks it replaced, parse + guard + new_job) in ms."""
    batch_max = HTTP.max_batch_messages
    body = enc({"messages": [TYPICAL] * batch_max})

    def one_step() -> object:
        messages = _decode_batch(body).messages
        if not messages or len(messages) > batch_max:
            raise AssertionError
        return sum(1 if isinstance(m.to, str) else len(m.to) for m in messages)

    def handler() -> object:
        messages, _ = parse_batch(body, HTTP)
        refuse_repeated_keys(body)
        return [new_job(m, JOB, default_from="engine@example.org", now_ms=0) for m in messages]

    budget = max(budget_s, 1.0)
    return (
        best_ms(lambda: parse_batch(body, HTTP), budget),
        best_ms(one_step, budget),
        best_ms(handler, budget),
    )


def guard_cost() -> tuple[float, float, float, int]:
    """(guard, decode, new_job) in µs on the typical message, and its size."""
    body = enc(TYPICAL)
    msg = _decode_one(body)
    n = 20_000

    def best(fn: Callable[[], object]) -> float:
        return min(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6

    return (
        best(lambda: refuse_repeated_keys(body)),
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
    parser.add_argument(
        "--max-body-mib",
        type=float,
        default=HTTP.max_body_bytes / MIB,
        help=f"the body limit to size rows at (default: http.max_body_bytes, {HTTP.max_body_bytes / MIB:g})",
    )
    args = parser.parse_args()
    budget_s = 0.2 if args.quick else 1.0
    limit = int(args.max_body_mib * MIB)
    rows: list[Row] = []
    for name, body, kind in cases(limit):
        print(f"  {name} ...", file=sys.stderr, flush=True)
        if kind == "schedule":
            rows.append(run_schedule(name, body, budget_s))
        else:
            rows.append(
                run_message(name, body, batch=kind == "batch", limit=limit, budget_s=budget_s)
            )
    width = max(len(r.name) for r in rows)
    print(
        f"\nHandler work per input, bodies up to {limit:,} bytes (best of several runs; "
        f"target <= {TARGET_MS:g} ms; ok: the longest hold of the loop -- handler work done "
        f"at once (a batch yields every {_YIELD_EVERY} messages) -- and the loop stall "
        "while composing are both within it; `handler` is all the work, yields aside)\n"
    )
    head = ("input", "bytes", "decode", "guard", "new_job", "handler", "hold", "compose",
            "stall")  # fmt: skip
    print(
        f"{head[0]:<{width}}  {head[1]:>10}" + "".join(f"  {h:>9}" for h in head[2:]),
        " where ", "ok ", "outcome",
    )  # fmt: skip
    for r in rows:
        times = (r.decode_ms, r.guard_ms, r.job_ms, r.handler_ms, r.hold_ms, r.compose_ms,
                 r.stall_ms)  # fmt: skip
        print(
            f"{r.name:<{width}}  {r.size:>10,}" + "".join(f"  {t:>7.3f}ms" for t in times),
            f"{r.where or '-':<6}",
            "yes" if r.ok else "NO ",
            r.outcome,
        )
    two, one, handler = batch_steps(budget_s)
    print(
        f"\nTypical batch of {HTTP.max_batch_messages}: two-step parse_batch {two:.3f} ms, one "
        f"decode + the same checks {one:.3f} ms (+{two - one:.3f} ms); the whole handler work "
        f"{handler:.3f} ms (+{100 * (two - one) / (handler - two + one):.1f} %)"
    )
    guard, decode, job, size = guard_cost()
    print(f"Duplicate-key guard on the typical {size}-byte message: {guard:.2f} µs "
          f"(decode {decode:.2f} µs, new_job {job:.2f} µs: +{100 * guard / (decode + job):.0f} %)")  # fmt: skip
    print("\nThe address regex before issue 13, on 'a' + spaces + 'x<b@e.com> >':")
    for label, ms in old_regex_rows():
        print(f"  {label:>12}: {ms:8.2f} ms")


if __name__ == "__main__":
    main()
