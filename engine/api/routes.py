"""The route table: every route of the API declared once -- method, path, the scope a
caller will need (API keys, issue 13), request and response types, every status it can
answer -- and what is generated from it: ``GET /v1`` and ``GET /openapi.json``.

``router.py`` dispatches from it (``app.py`` binds a handler to each route's ``op``);
``tests/test_routes.py`` checks that every route answers only the statuses listed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from engine import __version__
from engine.api.access import (
    KeyCreated,
    KeyIn,
    KeyList,
    LoginIn,
    SessionView,
    TenantIn,
    TenantList,
)
from engine.api.attachments import AttachmentView
from engine.api.dashboard import SinkPage, Stats
from engine.api.dead import DeadPage, DeadRetried, RetryFilter
from engine.api.domains import DomainIn, DomainList, DomainView
from engine.api.ingest import MessageView
from engine.api.limits import LimitsView
from engine.api.preview import Preview
from engine.api.provider_events import ProviderEventsTaken
from engine.api.schedules import ScheduleIn, ScheduleList, ScheduleView
from engine.api.suppression import (
    ImportResult,
    SuppressionList,
    SuppressionsAdded,
    SuppressionsIn,
    SuppressionView,
)
from engine.api.templates import RenderIn, RenderOut, TemplateList, TemplateView
from engine.api.transports import TransportList
from engine.api.webhooks import (
    AttemptList,
    Replayed,
    ReplayIn,
    WebhookCreated,
    WebhookIn,
    WebhookList,
    WebhookPatch,
    WebhookView,
)
from engine.auth import PUBLIC, TenantRecord
from engine.auth import SCOPES as KEY_SCOPES
from engine.history import HistoryMessage, HistoryPage
from engine.models import Accepted, BatchAccepted, BatchIn, Event, MessageIn, Problem
from engine.templates import TemplateIn

# What a route needs: a scope an API key carries, or "public" (no key).
SCOPES: Final = (PUBLIC, *KEY_SCOPES)


class Health(msgspec.Struct):
    alive: bool


class HistoryReadiness(msgspec.Struct):
    """The message history's writer as this replica sees it (not a readiness condition:
    a PostgreSQL outage only makes it lag; ingest answers 503 itself when it must)."""

    up: bool  # PostgreSQL took the last write
    lag_entries: int  # stream entries not yet in PostgreSQL
    lag_s: float  # age of the oldest of them
    refusing: bool  # ingest answers 503 (history-behind)


class Readiness(msgspec.Struct, omit_defaults=True):
    ready: bool
    redis: str
    senders: int
    draining: bool
    history: HistoryReadiness | None = None  # absent: no history.dsn


# Statuses every route may answer: 405 (wrong method), the server's limits (414, 431);
# and, while Redis is down, 503.
_COMMON: Final[dict[int, str]] = {
    405: "method not allowed (Allow lists the methods)",
    # The HTTP server's limits, checked before any route is found.
    414: "request target over http.max_url_bytes",
    431: "header fields over http.max_headers or http.max_header_bytes",
}
_QUEUE: Final[dict[int, tuple[str, Any]]] = {503: ("Redis unavailable: retry (Retry-After)", None)}


@dataclass(frozen=True, slots=True)
class Route:
    op: str  # the handler's name (OpenAPI operationId); app.py binds one to each
    method: str  # GET, POST, DELETE, or WS (a websocket upgrade)
    path: str  # OpenAPI template: /v1/messages/{id}
    summary: str
    scope: str
    # status -> (description, body type or None for none, or a media type string)
    responses: Mapping[int, tuple[str, Any]]
    request: Any = None  # a msgspec type (JSON), or a media type string (text/csv)
    # name -> description, or (description, JSON schema) when it is not a plain string
    query: Mapping[str, str | tuple[str, dict[str, Any]]] = field(default_factory=dict)
    tag: str = "messages"


def _int(low: int, high: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": low, "maximum": high}


def _desc(q: str | tuple[str, dict[str, Any]]) -> str:
    return q if isinstance(q, str) else q[0]


def _schema(q: str | tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"type": "string"} if isinstance(q, str) else q[1]


def _ok(desc: str, body: Any = None) -> tuple[str, Any]:
    return desc, body


_INGEST_ERRORS: Final = {
    400: _ok("malformed JSON, or an invalid Idempotency-Key header"),
    409: _ok("Idempotency-Key reused with a different body"),
    413: _ok("body over http.max_body_bytes"),
    415: _ok("body is not JSON"),
    422: _ok("a field is invalid (problem.field names it)"),
    429: _ok("over this client's rate (Retry-After, RateLimit-* headers)"),
    503: _ok("not accepted: Redis unavailable, backlog full or shutting down (Retry-After)"),
}

# A suppression list: a tenant's (?tenant=, one the key acts for; default its own), or
# with ?list= its list of one-click unsubscribes from that list.
_SUPPRESSION_SCOPE: Final = {
    "tenant": "whose list (a tenant this key acts for; default its own)",
    "list": "one list's one-click unsubscribes (for messages sent with that unsubscribe "
    "list name), instead of the tenant's own list",
}

# Templates are a tenant's: ?tenant= picks one the key acts for.
_TEMPLATE_TENANT: Final = {
    "tenant": "whose templates (a tenant this key acts for; default its own)"
}

# The dashboard's files carry an ETag; If-None-Match with it answers 304 and no body.
_NOT_MODIFIED: Final = _ok("not modified: If-None-Match matched the ETag")

ROUTES: Final[tuple[Route, ...]] = (
    Route("send_message", "POST", "/v1/messages", "Send one message", "send",
          {202: _ok("stored and queued (or scheduled)", Accepted),
           200: _ok("a repeat of an Idempotency-Key: the first request's id", Accepted),
           **_INGEST_ERRORS}, request=MessageIn),
    Route("send_batch", "POST", "/v1/messages/batch",
          "Send up to http.max_batch_messages messages at once",
          "send", {202: _ok("all stored", BatchAccepted),
                   200: _ok("a repeat of an Idempotency-Key", BatchAccepted),
                   **_INGEST_ERRORS}, request=BatchIn),
    Route("upload_attachment", "POST", "/v1/attachments",
          "Upload an attachment (the raw bytes) to name in messages by its id", "send",
          {201: _ok("stored (once per content): name it as attachment_id", AttachmentView),
           400: _ok("the body ended early"), 413: _ok("body over attachments.max_bytes"),
           422: _ok("empty, or a bad filename, tenant or Content-Type (one the bytes "
                    "contradict names content_type)"),
           503: _ok("not stored: Redis unavailable or over its memory budget (Retry-After)")},
          request="*/*",
          query={"filename": "a file name: the Content-Type is guessed from it when the "
                             "bytes say nothing",
                 "tenant": "whose messages may name it (a tenant this key acts for)"}),
    Route("get_message", "GET", "/v1/messages/{id}", "A message's state", "read",
          {200: _ok("the message's record (and, when asked, the files it carries); once "
                    "Redis has let it go, the history's (X-Engine-Source: history)",
                    MessageView),
           404: _ok("no such message"), **_QUEUE},
          query={"include": "attachments: also list the files the message carries "
                            "(names, types and sizes; a Redis read more)"}),
    Route("message_html", "GET", "/v1/messages/{id}/html",
          "A sandboxed message's html, for a sandboxed frame (its CSP loads nothing)", "read",
          {200: _ok("the html part", "text/html"),
           404: _ok("no such message, or not a sandboxed html one"), **_QUEUE}),
    Route("message_preview", "GET", "/v1/messages/{id}/preview",
          "A sandboxed message read back (headers, text, html, attachments)", "read",
          {200: _ok("the message", Preview),
           404: _ok("no such message, or not a sandboxed one that was composed"),
           **_QUEUE}),
    Route("message_raw", "GET", "/v1/messages/{id}/raw",
          "A sandboxed message's wire form (kept instead of sent)", "read",
          {200: _ok("the message as it would have gone to the server", "message/rfc822"),
           404: _ok("no such message, or not a sandboxed one that was composed"),
           **_QUEUE}),
    Route("cancel_message", "DELETE", "/v1/messages/{id}",
          "Cancel a queued, scheduled or retrying message",
          "send", {200: _ok("cancelled", Accepted), 404: _ok("no such message"),
                   409: _ok("too late: processing or finished"), **_QUEUE}),
    Route("search_history", "GET", "/v1/history",
          "Search the message history (PostgreSQL): newest first, a page at a time", "read",
          {200: _ok("a page (next_cursor: the next one's ?cursor=); ?format=csv: the page as "
                    "CSV, its next cursor in the Next-Cursor header", HistoryPage),
           404: _ok("no history here (this engine has no history.dsn)"),
           422: _ok("a bad filter, time, cursor or limit"),
           503: _ok("the history (PostgreSQL) is unavailable (Retry-After)")},
          query={"to": "a recipient (to, cc or bcc; any case)", "from": "the From address",
                 "tenant": "a tenant this key acts for (default: all of them)",
                 "tag": "one of the message's tags", "state": "its state now (sent, failed...)",
                 "since": "made at or after: RFC 3339, or ms since the epoch",
                 "until": "made before: RFC 3339, or ms since the epoch",
                 "cursor": "next_cursor of the previous page",
                 "limit": ("items (1-500, default 50; csv 1-10000, default 1000)",
                           _int(1, 10_000)),
                 "format": "json (default) or csv"}, tag="history"),
    Route("history_message", "GET", "/v1/history/{id}",
          "One message from the history, with its events", "read",
          {200: _ok("the message and its events, oldest first", HistoryMessage),
           404: _ok("not in the history (or no history here: no history.dsn)"),
           503: _ok("the history (PostgreSQL) is unavailable (Retry-After)")}, tag="history"),
    Route("message_events", "GET", "/v1/messages/{id}/events",
          "A message's lifecycle events still kept",
          "events", {200: _ok("oldest first (Events-Complete: false if the scan stopped)",
                              list[Event]), 404: _ok("no such message"), **_QUEUE}),
    Route("watch_events", "WS", "/v1/events",
          "Live lifecycle events (filters, since= resume)", "events",
          {101: _ok("upgraded: text frames are JSON arrays of events"),
           400: _ok("a bad filter or since"), 503: _ok("too many subscribers")},
          query={"id": "message ids", "type": "event types", "tenant": "tenants",
                 "tag": "tags", "since": "resume after this event id"}, tag="events"),
    Route("list_dead", "GET", "/v1/dead", "The dead-letter queue, oldest first", "dead-letters",
          {200: _ok("a page", DeadPage), 422: _ok("bad offset or limit"), **_QUEUE},
          query={"offset": ("first item (default 0)", _int(0, 10**9)),
                 "limit": ("items (1-500, default 50)", _int(1, 500))},
          tag="dead letters"),
    Route("retry_dead", "POST", "/v1/dead/{id}/retry", "Queue a dead letter again", "dead-letters",
          {202: _ok("queued with fresh attempts (to the recipients it still owed)", Accepted),
           200: _ok("not queued: every recipient it owed is suppressed now (state "
                    "suppressed)", Accepted),
           404: _ok("not in the dead-letter queue"),
           409: _ok("past its deliver-by deadline (expires_at): not re-queued"), **_QUEUE},
          tag="dead letters"),
    Route("retry_dead_many", "POST", "/v1/dead/retry",
          "Queue dead letters again (all, by ids or by error)",
          "dead-letters", {202: _ok("queued", DeadRetried), 400: _ok("malformed JSON"),
                           413: _ok("body over the filter's 1 MiB"),
                           422: _ok("a field is invalid"), **_QUEUE},
          request=RetryFilter, tag="dead letters"),
    Route("delete_dead", "DELETE", "/v1/dead/{id}", "Delete a dead letter for good", "dead-letters",
          {204: _ok("deleted"), 404: _ok("not in the dead-letter queue"), **_QUEUE},
          tag="dead letters"),
    Route("put_schedule", "POST", "/v1/schedules",
          "Create or replace a recurring schedule", "schedules",
          {201: _ok("created", ScheduleView), 200: _ok("replaced", ScheduleView),
           400: _ok("malformed JSON"), 413: _ok("body too large"), 415: _ok("not JSON"),
           409: _ok("the name is another tenant's schedule"),
           422: _ok("invalid name, cron, zone or message"), **_QUEUE},
          request=ScheduleIn, tag="schedules"),
    Route("list_schedules", "GET", "/v1/schedules", "Every schedule", "schedules",
          {200: _ok("by name", ScheduleList), **_QUEUE}, tag="schedules"),
    Route("get_schedule", "GET", "/v1/schedules/{name}", "One schedule", "schedules",
          {200: _ok("the schedule", ScheduleView), 404: _ok("no such schedule"), **_QUEUE},
          tag="schedules"),
    Route("delete_schedule", "DELETE", "/v1/schedules/{name}", "Delete a schedule", "schedules",
          {204: _ok("deleted"), 404: _ok("no such schedule"), **_QUEUE}, tag="schedules"),
    Route("list_limits", "GET", "/v1/limits",
          "The shared rate limits and their live state", "admin",
          {200: _ok("every configured bucket", LimitsView), **_QUEUE}, tag="operations"),
    Route("list_transports", "GET", "/v1/transports",
          "Whether each transport takes mail (its breaker)", "read",
          {200: _ok("up, or down with the reason", TransportList), **_QUEUE},
          tag="operations"),
    Route("stats", "GET", "/v1/stats", "Queue-wide counts (the dashboard polls it)", "read",
          {200: _ok("counts", Stats), **_QUEUE}, tag="operations"),
    Route("sink_messages", "GET", "/v1/sink/messages", "Mail the embedded sink captured", "admin",
          {200: _ok("newest first", SinkPage), 404: _ok("no embedded sink"),
           422: _ok("bad limit")}, query={"limit": ("1-500, default 50", _int(1, 500))},
          tag="operations"),
    Route("sink_message_html", "GET", "/v1/sink/messages/{key}/html",
          "A captured message's html, for a sandboxed frame (its CSP loads nothing)", "admin",
          {200: _ok("the html part", "text/html"), 404: _ok("no such message, or no html")},
          tag="operations"),
    Route("sink_message_preview", "GET", "/v1/sink/messages/{key}/preview",
          "One captured message read back (headers, text, html, attachments)", "admin",
          {200: _ok("the message", Preview), 404: _ok("no such captured message")},
          tag="operations"),
    Route("create_webhook", "POST", "/v1/webhooks",
          "Add a webhook endpoint (the answer shows its signing secret, once)", "webhooks",
          {201: _ok("added: `secret` is shown this once", WebhookCreated),
           400: _ok("malformed JSON"), 413: _ok("body too large"), 415: _ok("not JSON"),
           422: _ok("a field is invalid (a refused URL names `url`)"), **_QUEUE},
          request=WebhookIn, tag="webhooks"),
    Route("list_webhooks", "GET", "/v1/webhooks", "Webhook endpoints and their last attempt",
          "webhooks", {200: _ok("this key's tenants' endpoints", WebhookList), **_QUEUE},
          tag="webhooks"),
    Route("get_webhook", "GET", "/v1/webhooks/{id}", "One webhook endpoint", "webhooks",
          {200: _ok("the endpoint", WebhookView), 404: _ok("no such endpoint"), **_QUEUE},
          tag="webhooks"),
    Route("update_webhook", "PATCH", "/v1/webhooks/{id}",
          "Change an endpoint (enabled: true re-enables it)", "webhooks",
          {200: _ok("changed", WebhookView), 400: _ok("malformed JSON"),
           404: _ok("no such endpoint"), 413: _ok("body too large"), 415: _ok("not JSON"),
           422: _ok("a field is invalid"), **_QUEUE}, request=WebhookPatch, tag="webhooks"),
    Route("delete_webhook", "DELETE", "/v1/webhooks/{id}", "Remove an endpoint", "webhooks",
          {204: _ok("removed"), 404: _ok("no such endpoint"), **_QUEUE}, tag="webhooks"),
    Route("webhook_attempts", "GET", "/v1/webhooks/{id}/attempts",
          "An endpoint's latest delivery attempts, newest first", "webhooks",
          {200: _ok("status, latency, outcome, the answer's start", AttemptList),
           404: _ok("no such endpoint"), 422: _ok("bad limit"), **_QUEUE},
          query={"limit": ("1-100, default 50", _int(1, 100))}, tag="webhooks"),
    Route("replay_webhook", "POST", "/v1/webhooks/{id}/replay",
          "Send an endpoint the events after an event id again", "webhooks",
          {202: _ok("owed again", Replayed), 400: _ok("malformed JSON"),
           404: _ok("no such endpoint"), 413: _ok("body too large"), 415: _ok("not JSON"),
           422: _ok("bad since"), **_QUEUE}, request=ReplayIn, tag="webhooks"),
    Route("create_domain", "POST", "/v1/domains",
          "Add a DKIM signing domain: a key made (or given); the answer shows its DNS record",
          "admin", {201: _ok("added: publish `dns` (TXT) before sending", DomainView),
                    200: _ok("the domain's key replaced", DomainView),
                    400: _ok("malformed JSON"), 413: _ok("body too large"),
                    415: _ok("not JSON"),
                    409: _ok("the domain's key is in the settings file (dkim.keys)"),
                    422: _ok("a field is invalid (a refused key names `private_key`)"),
                    **_QUEUE}, request=DomainIn, tag="domains"),
    Route("list_domains", "GET", "/v1/domains",
          "DKIM signing domains and their DNS records (never a private key)", "admin",
          {200: _ok("by domain: the API's and the settings'", DomainList), **_QUEUE},
          tag="domains"),
    Route("get_domain", "GET", "/v1/domains/{domain}", "One signing domain and its DNS record",
          "admin", {200: _ok("the domain", DomainView), 404: _ok("no key for that domain"),
                    **_QUEUE}, tag="domains"),
    Route("delete_domain", "DELETE", "/v1/domains/{domain}",
          "Stop signing a domain's mail (its key is deleted)", "admin",
          {204: _ok("deleted"), 404: _ok("no key for that domain"),
           409: _ok("the domain's key is in the settings file (dkim.keys)"), **_QUEUE},
          tag="domains"),
    Route("list_suppressions", "GET", "/v1/suppressions",
          "A tenant's suppression list, a page at a time", "suppressions",
          {200: _ok("a page (next_cursor: the next one's ?cursor=)", SuppressionList),
           422: _ok("bad cursor, limit or tenant"), **_QUEUE},
          query={**_SUPPRESSION_SCOPE,
                 "cursor": "next_cursor of the previous page (default: the start)",
                 "limit": ("about this many (1-1000, default 100)", _int(1, 1000))},
          tag="suppressions"),
    Route("add_suppressions", "POST", "/v1/suppressions",
          "Suppress addresses (mail to them is not sent)", "suppressions",
          {200: _ok("added (an address already on the list keeps its entry)",
                    SuppressionsAdded),
           400: _ok("malformed JSON"), 413: _ok("body too large"), 415: _ok("not JSON"),
           422: _ok("an address, the reason or the tenant is invalid"), **_QUEUE},
          request=SuppressionsIn, query=_SUPPRESSION_SCOPE,
          tag="suppressions"),
    Route("import_suppressions", "POST", "/v1/suppressions/import",
          "Suppress the addresses of a CSV (address or address,reason a line)", "suppressions",
          {200: _ok("counts, and the lines refused", ImportResult),
           400: _ok("not UTF-8"), 413: _ok("over 4 MiB"), 415: _ok("not text/csv"),
           422: _ok("too many lines, or a bad tenant"), **_QUEUE},
          request="text/csv", query=_SUPPRESSION_SCOPE,
          tag="suppressions"),
    Route("get_suppression", "GET", "/v1/suppressions/{address}",
          "Whether an address is suppressed, and why", "suppressions",
          {200: _ok("its entry", SuppressionView), 404: _ok("not suppressed"),
           422: _ok("a bad tenant"), **_QUEUE},
          query=_SUPPRESSION_SCOPE, tag="suppressions"),
    Route("delete_suppression", "DELETE", "/v1/suppressions/{address}",
          "Take an address off the list (mail to it is sent again)", "suppressions",
          {204: _ok("removed"), 404: _ok("not suppressed"), 422: _ok("a bad tenant"),
           **_QUEUE}, query=_SUPPRESSION_SCOPE,
          tag="suppressions"),
    Route("create_template", "POST", "/v1/templates",
          "Add a template (subject, text, html with {{ variables }}; version 1)", "templates",
          {201: _ok("added: its variables listed", TemplateView), 400: _ok("malformed JSON"),
           413: _ok("body too large"), 415: _ok("not JSON"),
           422: _ok("a field is invalid (a syntax error names the part); the name exists"),
           **_QUEUE}, request=TemplateIn, query=_TEMPLATE_TENANT, tag="templates"),
    Route("list_templates", "GET", "/v1/templates", "A tenant's templates", "templates",
          {200: _ok("their current versions", TemplateList), 422: _ok("a bad tenant"),
           **_QUEUE}, query=_TEMPLATE_TENANT, tag="templates"),
    Route("get_template", "GET", "/v1/templates/{name}", "A template, at one version",
          "templates", {200: _ok("the template (the current version by default)", TemplateView),
                        404: _ok("no such template or version"),
                        422: _ok("a bad tenant or version"), **_QUEUE},
          query={**_TEMPLATE_TENANT, "version": ("a kept version (default: the current)",
                                                 _int(1, 10**9))}, tag="templates"),
    Route("update_template", "PUT", "/v1/templates/{name}",
          "Give a template a new version (sends name it from then on)", "templates",
          {200: _ok("the new version", TemplateView), 400: _ok("malformed JSON"),
           404: _ok("no such template"), 413: _ok("body too large"), 415: _ok("not JSON"),
           422: _ok("a field is invalid"), **_QUEUE}, request=TemplateIn,
          query=_TEMPLATE_TENANT, tag="templates"),
    Route("delete_template", "DELETE", "/v1/templates/{name}", "Delete a template",
          "templates", {204: _ok("deleted (every version)"), 404: _ok("no such template"),
                        422: _ok("a bad tenant"), **_QUEUE},
          query=_TEMPLATE_TENANT, tag="templates"),
    Route("render_template", "POST", "/v1/templates/{name}/render",
          "Render a template with variables (a preview: nothing is sent)", "templates",
          {200: _ok("the parts a send would carry", RenderOut), 400: _ok("malformed JSON"),
           404: _ok("no such template"), 413: _ok("body too large"), 415: _ok("not JSON"),
           422: _ok("a variable is missing, or the template does not render"), **_QUEUE},
          request=RenderIn, query=_TEMPLATE_TENANT, tag="templates"),
    Route("create_key", "POST", "/v1/keys", "Make an API key (the answer shows it, once)",
          "admin", {201: _ok("made: `key` is shown this once", KeyCreated),
                    400: _ok("malformed JSON"), 413: _ok("body too large"),
                    415: _ok("not JSON"), 422: _ok("a field is invalid"), **_QUEUE},
          request=KeyIn, tag="access"),
    Route("list_keys", "GET", "/v1/keys", "The API keys (never the keys themselves)", "admin",
          {200: _ok("the keys of the tenants this key acts for", KeyList)}, tag="access"),
    Route("revoke_key", "DELETE", "/v1/keys/{kid}", "Revoke an API key (every replica, ~1 s)",
          "admin", {204: _ok("revoked"), 404: _ok("no such key"), **_QUEUE}, tag="access"),
    Route("put_tenant", "PUT", "/v1/tenants/{name}", "Set a tenant's sender identities",
          "admin", {201: _ok("created", TenantRecord), 200: _ok("replaced", TenantRecord),
                    400: _ok("malformed JSON"), 404: _ok("not a tenant this key acts for"),
                    413: _ok("body too large"), 415: _ok("not JSON"),
                    422: _ok("a field is invalid"), **_QUEUE},
          request=TenantIn, tag="access"),
    Route("list_tenants", "GET", "/v1/tenants", "Tenants and their sender identities", "admin",
          {200: _ok("by name", TenantList)}, tag="access"),
    Route("login", "POST", "/v1/session", "Dashboard login: a session cookie for a key",
          "public", {200: _ok("logged in (Set-Cookie)", SessionView),
                     400: _ok("malformed JSON"), 413: _ok("body too large"),
                     415: _ok("not JSON"), 422: _ok("not a key with the read scope"),
                     **_QUEUE}, request=LoginIn, tag="access"),
    Route("whoami", "GET", "/v1/session", "Who the session (or key) acts as", "read",
          {200: _ok("the key's name, tenant and scopes", SessionView)}, tag="access"),
    Route("logout", "DELETE", "/v1/session", "Dashboard logout (clears the cookie)", "public",
          {204: _ok("logged out")}, tag="access"),
    Route("index", "GET", "/v1", "This API's routes", "public",
          {200: _ok("service and endpoints", dict[str, Any])}, tag="operations"),
    Route("openapi", "GET", "/openapi.json", "This document", "public",
          {200: _ok("OpenAPI 3.1", dict[str, Any])}, tag="operations"),
    Route("unsubscribe_page", "GET", "/u/{token}",
          "A one-click unsubscribe link, opened: a page asking to confirm (changes nothing)",
          "public", {200: _ok("the page", "text/html"), 404: _ok("not a valid link", "text/html")},
          tag="unsubscribe"),
    Route("unsubscribe", "POST", "/u/{token}",
          "One-click unsubscribe (RFC 8058): the link's address goes on its tenant's "
          "suppression list", "public",
          {200: _ok("unsubscribed", "text/html"), 404: _ok("not a valid link", "text/html"),
           413: _ok("body over 4 KiB")}, tag="unsubscribe"),
    Route("provider_events", "POST", "/v1/providers/{name}/events",
          "An email provider's delivery webhook (resend, sendgrid, ses, postmark, mailgun): "
          "its delivered, bounced, complained and delayed events, verified by the "
          "provider's own signature", "public",
          {200: _ok("taken: what it held (repeats and other messages' events too: the "
                    "provider need not retry)", ProviderEventsTaken),
           400: _ok("signed, but not the provider's documented shape"),
           401: _ok("not shown to be the provider's: no signature or a wrong one, wrong "
                    "credentials, an old timestamp, a used token, an SNS certificate URL or "
                    "topic not allowed (nothing stored)"),
           404: _ok("no such provider"), 413: _ok("body over provider_events.max_body_bytes"),
           503: _ok("the provider is not configured (the problem names the setting), an "
                    "SNS URL could not be fetched, or Redis is unavailable (Retry-After)")},
          request="application/json", tag="providers"),
    Route("healthz", "GET", "/healthz", "Liveness", "public", {200: _ok("alive", Health)},
          tag="operations"),
    Route("readyz", "GET", "/readyz", "Readiness (Redis reachable, senders running, not draining)",
          "public", {200: _ok("ready", Readiness), 503: _ok("not ready", Readiness)},
          tag="operations"),
    Route("metrics", "GET", "/metrics", "Prometheus metrics", "public",
          {200: _ok("text exposition format", "text/plain")}, tag="operations"),
    Route("dashboard", "GET", "/", "The dashboard", "public",
          {200: _ok("the page", "text/html"), 304: _NOT_MODIFIED}, tag="operations"),
    Route("docs", "GET", "/docs", "This reference, rendered (offline: vendored Redoc)", "public",
          {200: _ok("the page", "text/html"), 304: _NOT_MODIFIED}, tag="operations"),
    Route("static", "GET", "/static/{name}", "The dashboard's assets", "public",
          {200: _ok("the file (text/css or text/javascript)", "text/*"),
           304: _NOT_MODIFIED, 404: _ok("no such file")},
          tag="operations"),
)  # fmt: skip


def index() -> dict[str, Any]:
    """The body of ``GET /v1``."""
    return {
        "service": "engine",
        "version": __version__,
        "openapi": "/openapi.json",
        "endpoints": [f"{r.method} {r.path}" for r in ROUTES],
    }


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``ROUTES`` (schemas from the msgspec types)."""
    types: list[Any] = [Problem]
    for r in ROUTES:
        if _is_type(r.request):
            types.append(r.request)
        types += [body for _, body in r.responses.values() if _is_type(body)]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    by_type = dict(zip(map(repr, types), schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "operationId": r.op,
            "summary": r.summary,
            "tags": [r.tag],
            "x-scope": r.scope,
            "responses": {
                str(status): _response(status, desc, body, by_type)
                for status, (desc, body) in sorted({**_common(r), **r.responses}.items())
            },
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_params(r.path)
        ] + [
            {"name": name, "in": "query", "required": False, "description": _desc(q),
             "schema": _schema(q)}
            for name, q in r.query.items()
        ]  # fmt: skip
        if params:
            op["parameters"] = params
        op["security"] = (
            [] if r.scope == PUBLIC else [{"bearer": []}, {"apiKey": []}, {"session": []}]
        )
        if isinstance(r.request, str):  # a media type (the CSV import): text
            op["requestBody"] = {
                "required": True,
                "content": {r.request: {"schema": {"type": "string"}}},
            }
        elif r.request is not None:
            op["requestBody"] = {
                "required": r.method != "POST" or r.path != "/v1/dead/retry",
                "content": {"application/json": {"schema": by_type[repr(r.request)]}},
            }
        method = "get" if r.method == "WS" else r.method.lower()
        if r.method == "WS":
            op["description"] = "A websocket upgrade (GET with Upgrade: websocket)."
        paths.setdefault(r.path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "engine", "version": __version__,
                 "description": "Email delivery over HTTP: accepted (202) means stored."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": _SECURITY},
    }  # fmt: skip


_SECURITY: Final = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "An API key: Authorization: Bearer ek_..."},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "session": {"type": "apiKey", "in": "cookie", "name": "engine_session",
                "description": "The dashboard's login (POST /v1/session)"},
}  # fmt: skip


def statuses(route: Route) -> set[int]:
    """Every status ``route`` may answer (its own and the common ones)."""
    return set(route.responses) | set(_common(route))


def _common(route: Route) -> dict[int, tuple[str, Any]]:
    out = {s: (d, None) for s, d in _COMMON.items()} if route.method != "WS" else {}
    out[421] = ("the Host is not one this server answers for (http.allowed_hosts)", None)
    if route.scope != PUBLIC:
        out[401] = ("no API key, or not a valid one (WWW-Authenticate)", None)
        out[403] = (f"the key lacks the {route.scope!r} scope, or a cross-site request", None)
    return out


def _is_type(body: Any) -> bool:
    return body is not None and not isinstance(body, str)


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _response(status: int, desc: str, body: Any, by_type: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"description": desc}
    if isinstance(body, str):
        out["content"] = {body: {}}
    elif body is not None:
        out["content"] = {"application/json": {"schema": by_type[repr(body)]}}
    elif status >= 400:
        out["content"] = {"application/problem+json": {"schema": by_type[repr(Problem)]}}
    return out
