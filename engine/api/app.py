"""The ASGI application: the route table's router with a handler bound to every op.

Handlers live with what they serve (ingest, dead letters, schedules, the dashboard...);
this module only builds them from the backend and names which route each one answers.
"""

from __future__ import annotations

import msgspec
import trio

from engine.api.access import AccessRoutes
from engine.api.asgi import ASGIApp
from engine.api.attachments import UPLOAD_PATH, Attachments
from engine.api.backend import ApiBackend
from engine.api.dashboard import DashboardRoutes
from engine.api.dead import DeadRoutes
from engine.api.domains import DomainRoutes
from engine.api.exchange import Reply, Request, json_reply
from engine.api.guard import Guard, allowed_hosts
from engine.api.history import HistoryRoutes
from engine.api.hub import history_route
from engine.api.ingest import Ingest
from engine.api.limits import limits_route
from engine.api.metrics import metrics_route
from engine.api.provider_events import ProviderEventRoutes
from engine.api.router import PROBES, Handler, Router, Socket
from engine.api.routes import ROUTES, Health, HistoryReadiness, Readiness, index, openapi
from engine.api.schedules import ScheduleRoutes
from engine.api.suppression import MAX_IMPORT_BYTES, SuppressionRoutes
from engine.api.templates import TemplateRoutes, Templates
from engine.api.transports import transports_route
from engine.api.unsubscribe import Unsubscribe
from engine.api.webhooks import WebhookRoutes
from engine.config import Settings
from engine.errors import QueueError
from engine.provider_events import PROVIDERS
from engine.queue import AccessStore, ProviderEventStore, SuppressionStore, TemplateStore

# All a sender-only replica (role sender) serves.
OPS_ONLY = PROBES


def body_limits(settings: Settings) -> tuple[tuple[str, int], ...]:
    """Paths whose request bodies may pass http.max_body_bytes, and their limit: for the
    HTTP server's parser, which knows no route (the handlers check them too)."""
    return (
        (UPLOAD_PATH, settings.attachments.max_bytes),
        ("/v1/suppressions/import", MAX_IMPORT_BYTES),
        *((f"/v1/providers/{name}/events", settings.provider_events.max_body_bytes)
          for name in PROVIDERS),
    )  # fmt: skip


def build_app(backend: ApiBackend, settings: Settings) -> ASGIApp:
    templates = Templates(TemplateStore(backend.queue.client, backend.queue.keys))
    template_routes = TemplateRoutes(templates)
    attachments = Attachments(backend.queue, settings.attachments, settings.ingest)
    unsubscribe = Unsubscribe(
        AccessStore(backend.queue.client, backend.queue.keys),
        SuppressionStore(backend.queue.client, backend.queue.keys),
        settings.unsubscribe,
        bind=settings.http.bind,
    )
    ingest = Ingest(
        backend.queue,
        settings.http,
        settings.sender.default_from,
        settings.ingest,
        backend.drain,
        backend.metrics.ingest,
        stopping=backend.stopping,
        access=backend.access,
        templates=templates,
        attachments=attachments,
        unsubscribe=unsubscribe,
        history=backend.history,
    )
    dead = DeadRoutes(backend.queue)
    schedules = ScheduleRoutes(
        backend.schedules,
        default_from=settings.sender.default_from,
        max_body_bytes=settings.http.max_body_bytes,
        access=backend.access,
    )
    dashboard = DashboardRoutes(backend)
    suppressions = SuppressionRoutes(SuppressionStore(backend.queue.client, backend.queue.keys))
    provider_events = ProviderEventRoutes(
        ProviderEventStore(
            backend.queue.client, backend.queue.keys, queue=settings.queue,
            settings=settings.provider_events,
        ),
        settings.provider_events,
    )  # fmt: skip
    spec = msgspec.json.encode(openapi())
    listing = msgspec.json.encode(index())

    async def healthz(_: Request) -> Reply:
        return json_reply(200, Health(alive=True))

    async def readyz(_: Request) -> Reply:
        redis_ok = False
        with trio.move_on_after(1.0):
            try:
                redis_ok = await backend.queue.ping()
            except QueueError:
                redis_ok = False
        senders = backend.senders.statistics().running
        senders_ok = senders > 0 or not backend.expects_senders
        draining = backend.stopping.is_set()
        ok = redis_ok and senders_ok and not draining
        ready = Readiness(ok, "ok" if redis_ok else "unavailable", senders, draining)
        if backend.history is not None:
            h = backend.history.writer.statistics()
            ready.history = HistoryReadiness(h.up, h.lag_entries, h.lag_s, h.refusing)
        return json_reply(200 if ok else 503, ready)

    async def routes_index(_: Request) -> Reply:
        return Reply(200, listing)

    async def openapi_json(_: Request) -> Reply:
        return Reply(200, spec)

    handlers: dict[str, Handler | Socket] = {
        "send_message": ingest.send_message,
        "send_batch": ingest.send_batch,
        "upload_attachment": attachments.upload,
        "get_message": ingest.get_message,
        "message_raw": ingest.message_raw,
        "message_preview": ingest.message_preview,
        "message_html": ingest.message_html,
        "sink_message_html": dashboard.sink_message_html,
        "sink_message_preview": dashboard.sink_message_preview,
        "cancel_message": ingest.cancel_message,
        "list_dead": dead.list_dead,
        "retry_dead": dead.retry_dead,
        "retry_dead_many": dead.retry_dead_many,
        "delete_dead": dead.delete_dead,
        "put_schedule": schedules.put_schedule,
        "list_schedules": schedules.list_schedules,
        "get_schedule": schedules.get_schedule,
        "delete_schedule": schedules.delete_schedule,
        "list_suppressions": suppressions.list_suppressions,
        "add_suppressions": suppressions.add_suppressions,
        "import_suppressions": suppressions.import_suppressions,
        "get_suppression": suppressions.get_suppression,
        "delete_suppression": suppressions.delete_suppression,
        "create_template": template_routes.create_template,
        "list_templates": template_routes.list_templates,
        "get_template": template_routes.get_template,
        "update_template": template_routes.update_template,
        "delete_template": template_routes.delete_template,
        "render_template": template_routes.render_template,
        "unsubscribe_page": unsubscribe.unsubscribe_page,
        "unsubscribe": unsubscribe.unsubscribe,
        "provider_events": provider_events.receive,
        "list_limits": limits_route(backend.limits),
        "list_transports": transports_route(backend.breakers),
        "stats": dashboard.stats,
        "sink_messages": dashboard.sink_messages,
        "dashboard": dashboard.dashboard,
        "docs": dashboard.docs,
        "static": dashboard.static,
        "index": routes_index,
        "openapi": openapi_json,
        "healthz": healthz,
        "readyz": readyz,
        "metrics": metrics_route(backend.queue, backend.metrics),
    }
    routes = ROUTES
    if backend.access is not None:
        access = AccessRoutes(backend.access, session_ttl_s=settings.auth.session_ttl_s)
        handlers.update(
            create_key=access.create_key, list_keys=access.list_keys,
            revoke_key=access.revoke_key, put_tenant=access.put_tenant,
            list_tenants=access.list_tenants, login=access.login, whoami=access.whoami,
            logout=access.logout,
        )  # fmt: skip
    else:  # auth off: no keys to manage, nobody to log in
        routes = tuple(r for r in routes if r.tag != "access")
    if backend.webhooks is not None:
        hooks = WebhookRoutes(
            backend.webhooks, backend.events.log if backend.events else None, settings.webhooks
        )
        handlers.update(
            create_webhook=hooks.create_webhook, list_webhooks=hooks.list_webhooks,
            get_webhook=hooks.get_webhook, update_webhook=hooks.update_webhook,
            delete_webhook=hooks.delete_webhook, webhook_attempts=hooks.webhook_attempts,
            replay_webhook=hooks.replay_webhook,
        )  # fmt: skip
    else:
        routes = tuple(r for r in routes if r.tag != "webhooks")
    if backend.domains is not None:
        domains = DomainRoutes(backend.domains, settings.dkim)
        handlers.update(
            create_domain=domains.create_domain, list_domains=domains.list_domains,
            get_domain=domains.get_domain, delete_domain=domains.delete_domain,
        )  # fmt: skip
    else:
        routes = tuple(r for r in routes if r.tag != "domains")
    if backend.history is not None:
        history = HistoryRoutes(backend.history)
        handlers.update(
            search_history=history.search_history, history_message=history.history_message
        )
    else:
        routes = tuple(r for r in routes if r.tag != "history")
    if backend.events is not None:
        handlers["watch_events"] = backend.events.websocket
        handlers["message_events"] = history_route(
            backend.events.log, backend.queue, settings.events
        )
    else:  # no event stream configured: those routes do not exist here
        routes = tuple(r for r in routes if r.op not in ("watch_events", "message_events"))
    guard = Guard(backend.access, allowed_hosts(settings.http.allowed_hosts, settings.http.bind))
    if settings.role == "sender":
        return Router(
            routes, handlers, backend.metrics.ingest, guard=guard, only=OPS_ONLY,
            refusal="this replica runs senders only (role sender): it answers "
            "/healthz, /readyz and /metrics; send to an api replica",
        )  # fmt: skip
    return Router(routes, handlers, backend.metrics.ingest, guard=guard)
