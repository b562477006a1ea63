"""/v1/webhooks: endpoints (made -- the signing secret shown once --, listed, changed,
removed), their delivery attempts, and replaying the events since an event id. A key
manages its tenants' endpoints; an endpoint gets its tenant's events only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import time
from typing import Final

import msgspec

from engine.api.exchange import (
    Reply,
    Request,
    decode_json,
    empty_reply,
    invalid,
    json_reply,
    not_found,
)
from engine.config import WebhookSettings
from engine.errors import ValidationError
from engine.models import ms_to_iso
from engine.queue import EventLog, WebhookStore
from engine.webhooks import (
    EVENT_TYPES,
    MAX_BATCH,
    Attempt,
    Endpoint,
    Refused,
    new_secret,
    parse_url,
    payload,
)
from engine.webhooks.target import check_address, parse_allow

MAX_BODY: Final = 64 * 1024
MAX_TAGS: Final = 20
MAX_ENDPOINTS: Final = 100  # per tenant
MAX_REPLAY: Final = 100_000  # events one replay goes through at most


class WebhookIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/webhooks."""

    url: str
    events: list[str] = []  # event types wanted ([]: all)
    tags: list[str] = []  # only messages with one of these tags ([]: any)
    description: str = ""
    retry_window_s: float | None = None  # default webhooks.retry_window_s
    batch_max: int = 1  # events per request: more than 1 posts JSON arrays


class WebhookPatch(msgspec.Struct, forbid_unknown_fields=True):
    """Body of PATCH /v1/webhooks/{id}: the fields to change."""

    url: str | None = None
    events: list[str] | None = None
    tags: list[str] | None = None
    description: str | None = None
    retry_window_s: float | None = None
    batch_max: int | None = None
    enabled: bool | None = None  # true re-enables a disabled endpoint


class WebhookView(msgspec.Struct):
    id: str
    tenant: str
    url: str
    events: list[str]
    tags: list[str]
    description: str
    enabled: bool
    disabled_reason: str
    retry_window_s: float
    batch_max: int
    created_at: str
    last_attempt: Attempt | None = None


class WebhookCreated(WebhookView):
    """The new endpoint: ``secret`` (whsec_...) is shown this once."""

    secret: str = ""


class WebhookList(msgspec.Struct):
    items: list[WebhookView]


class AttemptList(msgspec.Struct):
    items: list[Attempt]


class ReplayIn(msgspec.Struct, forbid_unknown_fields=True):
    since: str  # an event id: the events after it are sent again


class Replayed(msgspec.Struct):
    owed: int  # deliveries added for this endpoint


_decode_in = msgspec.json.Decoder(WebhookIn).decode
_decode_patch = msgspec.json.Decoder(WebhookPatch).decode
_decode_replay = msgspec.json.Decoder(ReplayIn).decode
_decode_endpoint = msgspec.json.Decoder(Endpoint).decode
_decode_attempt = msgspec.json.Decoder(Attempt).decode
_encode = msgspec.json.Encoder().encode


def _view(ep: Endpoint, last: Attempt | None = None) -> WebhookView:
    return WebhookView(
        ep.id, ep.tenant, ep.url, ep.events, ep.tags, ep.description, ep.enabled,
        ep.disabled_reason, ep.retry_window_s, ep.batch_max, ep.created_at, last,
    )  # fmt: skip


class WebhookRoutes:
    def __init__(
        self, store: WebhookStore, events: EventLog | None, settings: WebhookSettings
    ) -> None:
        self._store = store
        self._events = events
        self._settings = settings
        self._allow = parse_allow(settings.allow)

    def _check_url(self, url: str) -> str:
        try:
            target = parse_url(url)
            # A literal address is checked now; a name when it is resolved.
            with contextlib.suppress(ValueError):
                check_address(ipaddress.ip_address(target.host.strip("[]")), self._allow)
        except Refused as exc:
            raise ValidationError("url", str(exc)) from None
        return url

    def _check_filters(self, events: list[str], tags: list[str]) -> None:
        for i, kind in enumerate(events):
            if kind not in EVENT_TYPES:
                raise ValidationError(f"events[{i}]", f"one of {', '.join(EVENT_TYPES)}")
        if len(tags) > MAX_TAGS or any(not 1 <= len(t) <= 64 for t in tags):
            raise ValidationError("tags", f"at most {MAX_TAGS} tags of 1 to 64 characters")

    def _check_window(self, seconds: float | None) -> float:
        if seconds is None:
            return self._settings.retry_window_s
        if not 60 <= seconds <= 7 * 86_400:
            raise ValidationError("retry_window_s", "from 60 s to 7 days")
        return seconds

    async def _mine(self, req: Request) -> Endpoint:
        eid = req.params["id"]
        raw = await self._store.endpoint(eid) if len(eid) <= 64 else None
        ep = _decode_endpoint(raw) if raw else None
        if ep is None or not req.principal.sees(ep.tenant):
            raise not_found("No such webhook", f"id {eid!r}")
        return ep

    async def create_webhook(self, req: Request) -> Reply:
        body = decode_json(_decode_in, await req.json_body(MAX_BODY))
        tenant = req.principal.tenant or "default"
        try:
            url = self._check_url(body.url)
            self._check_filters(body.events, body.tags)
            window = self._check_window(body.retry_window_s)
            batch = _check_batch(body.batch_max)
            if len(body.description) > 256:
                raise ValidationError("description", "at most 256 characters")
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        existing = [_decode_endpoint(r) for r in (await self._store.endpoints()).values()]
        if sum(e.tenant == tenant for e in existing) >= MAX_ENDPOINTS:
            raise invalid(None, f"a tenant has at most {MAX_ENDPOINTS} webhook endpoints")
        ep = Endpoint(
            "wh_" + secrets.token_hex(8), tenant, url, new_secret(),
            ms_to_iso(int(time.time() * 1000)), sorted(set(body.events)), sorted(set(body.tags)),
            body.description, retry_window_s=window, batch_max=batch,
        )  # fmt: skip
        await self._store.put_endpoint(ep.id, _encode(ep))
        view = _view(ep)
        created = WebhookCreated(**msgspec.structs.asdict(view), secret=ep.secret)
        return json_reply(201, created, [(b"location", f"/v1/webhooks/{ep.id}".encode())])

    async def list_webhooks(self, req: Request) -> Reply:
        eps = [_decode_endpoint(r) for r in (await self._store.endpoints()).values()]
        mine = sorted((e for e in eps if req.principal.sees(e.tenant)), key=lambda e: e.id)
        return json_reply(200, WebhookList([_view(e, await self._last(e.id)) for e in mine]))

    async def _last(self, eid: str) -> Attempt | None:
        raw = await self._store.attempts(eid, 1)
        return _decode_attempt(raw[0]) if raw else None

    async def get_webhook(self, req: Request) -> Reply:
        ep = await self._mine(req)
        return json_reply(200, _view(ep, await self._last(ep.id)))

    async def update_webhook(self, req: Request) -> Reply:
        ep = await self._mine(req)
        patch = decode_json(_decode_patch, await req.json_body(MAX_BODY))
        try:
            changes: dict[str, object] = {}
            if patch.url is not None:
                changes["url"] = self._check_url(patch.url)
            events = patch.events if patch.events is not None else ep.events
            tags = patch.tags if patch.tags is not None else ep.tags
            self._check_filters(events, tags)
            changes |= {"events": sorted(set(events)), "tags": sorted(set(tags))}
            if patch.description is not None:
                if len(patch.description) > 256:
                    raise ValidationError("description", "at most 256 characters")
                changes["description"] = patch.description
            if patch.retry_window_s is not None:
                changes["retry_window_s"] = self._check_window(patch.retry_window_s)
            if patch.batch_max is not None:
                changes["batch_max"] = _check_batch(patch.batch_max)
            if patch.enabled is not None:
                changes["enabled"] = patch.enabled
                changes["disabled_reason"] = "" if patch.enabled else "disabled through the API"
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        updated = msgspec.structs.replace(ep, **changes)
        await self._store.put_endpoint(ep.id, _encode(updated))
        return json_reply(200, _view(updated, await self._last(ep.id)))

    async def delete_webhook(self, req: Request) -> Reply:
        ep = await self._mine(req)
        await self._store.delete_endpoint(ep.id)
        return empty_reply(204)

    async def webhook_attempts(self, req: Request) -> Reply:
        ep = await self._mine(req)
        limit = req.int_query("limit", 50, 1, 100)
        items = [_decode_attempt(a) for a in await self._store.attempts(ep.id, limit)]
        return json_reply(200, AttemptList(items))

    async def replay_webhook(self, req: Request) -> Reply:
        ep = await self._mine(req)
        body = decode_json(_decode_replay, await req.json_body(MAX_BODY))
        if self._events is None:
            raise invalid("since", "this replica keeps no event stream")
        since, seen, owed = body.since, 0, 0
        while seen < MAX_REPLAY:
            try:
                page = await self._events.range(since, limit=1000)
            except ValueError:
                raise invalid(
                    "since", "an event id, e.g. 1718000000000-0 or 1718000000000-0.3"
                ) from None
            deliveries = [(f"{ep.id}|{e.event_id}", payload(e)) for e in page.events if ep.wants(e)]
            await self._store.fan_out(deliveries, [], int(time.time() * 1000))
            owed += len(deliveries)
            seen += page.entries
            if page.last is None or not page.entries:
                break
            since = page.last
        return json_reply(202, Replayed(owed))


def _check_batch(n: int) -> int:
    if not 1 <= n <= MAX_BATCH:
        raise ValidationError("batch_max", f"from 1 (one event per request) to {MAX_BATCH}")
    return n
