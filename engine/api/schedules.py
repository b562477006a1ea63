"""Recurring schedule routes: create or replace, list, show, delete.

A schedule's message is validated like POST /v1/messages when it is put, so a bad
one is refused up front rather than skipped at every tick. Never imports the senders.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

import msgspec

from engine.api.exchange import (
    Fail,
    Reply,
    Request,
    decode_json,
    empty_reply,
    error_field,
    invalid,
    json_reply,
    not_found,
)
from engine.auth import AccessTable, check_may_send
from engine.cron import MAX_CRON_CHARS, check_cron, check_timezone
from engine.errors import ValidationError
from engine.models import DEFAULT_TENANT, MessageIn, ms_to_iso, normalize, route
from engine.queue import Schedule, ScheduleStore

_NAME_RE: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_decode_message = msgspec.json.Decoder(MessageIn).decode


class ScheduleIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/schedules. The caps are checked while decoding, before the name
    pattern, cronsim or zoneinfo see a string."""

    name: Annotated[str, msgspec.Meta(max_length=64)]
    # Standard 5-field cron (minute hour day-of-month month day-of-week) or @daily etc.
    cron: Annotated[str, msgspec.Meta(max_length=MAX_CRON_CHARS)]
    # The body of a POST /v1/messages, sent at each tick (no send_at / delay_s).
    message: msgspec.Raw
    # IANA zone the cron fields are read in (DST-aware); the longest IANA name has 32.
    timezone: Annotated[str, msgspec.Meta(max_length=64)] = "UTC"


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


class ScheduleList(msgspec.Struct):
    items: list[ScheduleView]


_decode_schedule = msgspec.json.Decoder(ScheduleIn).decode


def schedule_view(s: Schedule) -> ScheduleView:
    return ScheduleView(
        s.name, s.cron, s.timezone, msgspec.Raw(s.message.encode()), s.version,
        ms_to_iso(s.created_at_ms), ms_to_iso(s.updated_at_ms),
        ms_to_iso(s.next_tick_ms) if s.next_tick_ms is not None else None,
        ms_to_iso(s.last_tick_ms) if s.last_tick_ms is not None else None,
        s.last_job_id, s.fired, s.skipped,
    )  # fmt: skip


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


def schedule_tenant(s: Schedule) -> str:
    """Whose schedule it is: its message's tenant."""
    try:
        tenant = msgspec.json.decode(s.message).get("tenant")
    except (msgspec.DecodeError, AttributeError):
        return DEFAULT_TENANT
    return tenant if isinstance(tenant, str) else DEFAULT_TENANT


class ScheduleRoutes:
    """Handlers of the /v1/schedules routes. A key sees the schedules of its tenants
    (the tenant of the schedule's message; the key's own when the message names none)."""

    def __init__(
        self,
        store: ScheduleStore,
        *,
        default_from: str,
        max_body_bytes: int,
        access: AccessTable | None = None,
    ) -> None:
        self._store = store
        self._default_from = default_from
        self._max_body_bytes = max_body_bytes
        self._access = access

    async def put_schedule(self, req: Request) -> Reply:
        raw = await req.json_body(self._max_body_bytes)
        body = decode_json(_decode_schedule, raw)
        store = self._store
        p = req.principal
        try:
            cron, message = check_schedule(
                body, default_from=self._default_from, now_ms=store.now_ms()
            )
            fields = msgspec.json.decode(message)
            tenant = fields.setdefault("tenant", p.tenant or DEFAULT_TENANT)
            if self._access is not None:
                identities = self._access.identities(tenant)
                try:
                    check_may_send(p, tenant, fields.get("from"), identities, self._default_from)
                except ValidationError as exc:
                    raise ValidationError(f"message.{exc.field}", exc.detail) from None
            existing = await store.get(body.name)
            if existing is not None and not p.sees(schedule_tenant(existing)):
                raise Fail(
                    409, "name-taken", "Schedule name taken",
                    f"another tenant has a schedule named {body.name!r}; choose another name",
                )  # fmt: skip
            message = msgspec.json.encode(fields).decode()
            created, schedule = await store.put(body.name, cron, body.timezone, message)
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        view = schedule_view(schedule)
        if created:
            return json_reply(201, view, [(b"location", f"/v1/schedules/{schedule.name}".encode())])
        return json_reply(200, view)

    async def list_schedules(self, req: Request) -> Reply:
        mine = [s for s in await self._store.list_all() if req.principal.sees(schedule_tenant(s))]
        return json_reply(200, ScheduleList([schedule_view(s) for s in mine]))

    async def _get(self, req: Request) -> Schedule:
        name = req.params["name"]
        schedule = await self._store.get(name) if _NAME_RE.match(name) else None
        if schedule is None or not req.principal.sees(schedule_tenant(schedule)):
            raise not_found("No such schedule", f"schedule {name!r}")
        return schedule

    async def get_schedule(self, req: Request) -> Reply:
        return json_reply(200, schedule_view(await self._get(req)))

    async def delete_schedule(self, req: Request) -> Reply:
        schedule = await self._get(req)
        if not await self._store.delete(schedule.name):
            raise not_found("No such schedule", f"schedule {schedule.name!r}")
        return empty_reply(204)
