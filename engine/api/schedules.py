"""Recurring schedule routes (Quart): create or replace, list, show, delete.

A schedule's message is validated like POST /v1/messages when it is put, so a bad
one is refused up front rather than skipped at every tick. Never imports the senders.
"""

from __future__ import annotations

import re
from typing import Final

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from engine.api.ingest import error_field
from engine.api.responses import json_response, problem_response
from engine.cron import check_cron, check_timezone
from engine.errors import ValidationError
from engine.models import MessageIn, ms_to_iso, normalize, route
from engine.queue import Schedule, ScheduleStore

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_decode_message = msgspec.json.Decoder(MessageIn).decode


class ScheduleIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/schedules."""

    name: str
    # Standard 5-field cron (minute hour day-of-month month day-of-week) or @daily etc.
    cron: str
    # The body of a POST /v1/messages, sent at each tick (no send_at / delay_s).
    message: msgspec.Raw
    # IANA zone the cron fields are read in (DST-aware).
    timezone: str = "UTC"


class ScheduleView(msgspec.Struct):
    """A schedule as the API shows it."""

    name: str
    cron: str
    timezone: str
    message: msgspec.Raw
    version: int
    created_at: str
    updated_at: str
    next_tick: str | None
    last_tick: str | None
    last_job_id: str | None
    fired: int
    skipped: int


def schedule_view(s: Schedule) -> ScheduleView:
    return ScheduleView(
        s.name, s.cron, s.timezone, msgspec.Raw(s.message.encode()), s.version,
        ms_to_iso(s.created_at_ms), ms_to_iso(s.updated_at_ms),
        ms_to_iso(s.next_tick_ms) if s.next_tick_ms is not None else None,
        ms_to_iso(s.last_tick_ms) if s.last_tick_ms is not None else None,
        s.last_job_id, s.fired, s.skipped,
    )  # fmt: skip


def _invalid(exc: ValidationError) -> Response:
    return problem_response(422, "invalid-field", "Invalid field", exc.detail, exc.field)


def check_schedule(body: ScheduleIn, *, default_from: str, now_ms: int) -> tuple[str, str]:
    """Validate a schedule as it will run: (normalized cron, message JSON to store).
    Raises ValidationError naming the field (``cron``, ``message.to``...)."""
    if not _NAME_RE.match(body.name):
        raise ValidationError("name", "1 to 64 characters from A-Z a-z 0-9 . _ -")
    cron = check_cron(body.cron)
    check_timezone(body.timezone)
    try:
        message = _decode_message(body.message)
    except msgspec.ValidationError as exc:
        field, detail = error_field(exc)
        raise ValidationError("message" if field == "$" else f"message.{field}", detail) from None
    for name, value in (("send_at", message.send_at), ("delay_s", message.delay_s)):
        if value is not None:
            raise ValidationError(f"message.{name}", "a schedule's message is sent at each tick")
    normalize(message, default_from=default_from, field_prefix="message.")
    route(message, now_ms=now_ms, field_prefix="message.")
    return cron, bytes(body.message).decode()


def register_schedule_routes(
    app: QuartTrio, store: ScheduleStore, *, default_from: str, max_body_bytes: int = 100_000
) -> None:
    """Add /v1/schedules routes to ``app`` (its QueueError handler answers 503)."""

    @app.post("/v1/schedules")
    async def put_schedule() -> Response:
        if not request.is_json:
            detail = "send the body as JSON with Content-Type: application/json"
            return problem_response(415, "unsupported-media-type", "Unsupported Media Type", detail)
        limit = f"the body limit is {max_body_bytes} bytes"
        too_large = problem_response(413, "body-too-large", "Request body too large", limit)
        if (request.content_length or 0) > max_body_bytes:
            return too_large
        raw = await request.get_data(cache=False, as_text=False)
        if len(raw) > max_body_bytes:
            return too_large
        try:
            body = msgspec.json.decode(raw, type=ScheduleIn)
        except msgspec.ValidationError as exc:
            field, detail = error_field(exc)
            return problem_response(422, "invalid-field", "Invalid field", detail, field)
        except msgspec.DecodeError as exc:
            return problem_response(400, "malformed-json", "Malformed JSON", str(exc))
        try:
            cron, message = check_schedule(body, default_from=default_from, now_ms=store.now_ms())
            created, schedule = await store.put(body.name, cron, body.timezone, message)
        except ValidationError as exc:
            return _invalid(exc)
        view = schedule_view(schedule)
        if created:
            return json_response(201, view, {"Location": f"/v1/schedules/{schedule.name}"})
        return json_response(200, view)

    @app.get("/v1/schedules")
    async def list_schedules() -> Response:
        return json_response(200, {"items": [schedule_view(s) for s in await store.list_all()]})

    @app.get("/v1/schedules/<name>")
    async def get_schedule(name: str) -> Response:
        schedule = await store.get(name) if _NAME_RE.match(name) else None
        if schedule is None:
            return problem_response(404, "not-found", "No such schedule", f"schedule {name!r}")
        return json_response(200, schedule_view(schedule))

    @app.delete("/v1/schedules/<name>")
    async def delete_schedule(name: str) -> Response:
        if not (_NAME_RE.match(name) and await store.delete(name)):
            return problem_response(404, "not-found", "No such schedule", f"schedule {name!r}")
        return Response(b"", status=204)
