"""/v1/templates: a tenant's message templates -- created, listed, read (any kept
version), given a new version, rendered for a preview, deleted. A key manages the
templates of the tenants it acts for (``?tenant=``, its own by default); sends name them
in ingest (``template`` + ``variables``), which renders them through ``Templates``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final

import msgspec

from engine.api.exchange import (
    Reply,
    Request,
    decode_json,
    empty_reply,
    invalid,
    json_reply,
    not_found,
    requested_tenant,
)
from engine.errors import ValidationError
from engine.models import ms_to_iso
from engine.queue import TemplateStore
from engine.templates import (
    MAX_VARIABLES_BYTES,
    MAX_VERSIONS,
    Rendered,
    Template,
    TemplateIn,
    Version,
    check_name,
    new_version,
    render,
)

MAX_BODY: Final = 2 * 1024 * 1024  # a template's three parts and some JSON
MAX_TEMPLATES: Final = 1000  # per tenant
# A replica reuses a template it read this recently (a send that names it costs no
# Redis round trip); a new version reaches every replica within this time.
CACHE_S: Final = 1.0

_decode_in = msgspec.json.Decoder(TemplateIn).decode
_decode_template = msgspec.json.Decoder(Template).decode
_encode = msgspec.json.Encoder().encode


class TemplateSummary(msgspec.Struct):
    name: str
    tenant: str
    description: str
    version: int  # the current one
    variables: list[str]
    updated_at: str


class TemplateList(msgspec.Struct):
    items: list[TemplateSummary]


class TemplateView(msgspec.Struct):
    """A template at one version (the current one unless ``?version=``)."""

    name: str
    tenant: str
    description: str
    version: int
    versions: list[int]  # the kept ones, oldest first
    subject: str
    text: str | None
    html: str | None
    variables: list[str]
    created_at: str  # of this version


class RenderIn(msgspec.Struct, forbid_unknown_fields=True):
    variables: dict[str, Any] = {}
    version: int | None = None


class RenderOut(msgspec.Struct):
    version: int
    subject: str
    text: str | None
    html: str | None


_decode_render = msgspec.json.Decoder(RenderIn).decode


def _summary(t: Template) -> TemplateSummary:
    v = t.current
    return TemplateSummary(t.name, t.tenant, t.description, v.version, v.variables, v.created_at)


def _view(t: Template, v: Version) -> TemplateView:
    return TemplateView(
        t.name, t.tenant, t.description, v.version, [x.version for x in t.versions],
        v.subject, v.text, v.html, v.variables, v.created_at,
    )  # fmt: skip


class Templates:
    """Reads templates for sends (cached per replica for CACHE_S) and renders them."""

    def __init__(self, store: TemplateStore, *, clock: Any = time.monotonic) -> None:
        self.store = store
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Template | None]] = {}

    async def get(self, tenant: str, name: str, *, fresh: bool = False) -> Template | None:
        key = (tenant, name)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and not fresh and now - hit[0] < CACHE_S:
            return hit[1]
        raw = await self.store.get(tenant, name)
        template = _decode_template(raw) if raw else None
        if len(self._cache) > 4 * MAX_TEMPLATES:
            self._cache.clear()
        self._cache[key] = (now, template)
        return template

    async def render(
        self, tenant: str, name: str, version: int | None, variables: Mapping[str, Any]
    ) -> tuple[Version, Rendered]:
        """The message parts of a send that names a template; ValidationError naming
        ``template``, ``template_version``, ``variables.<name>`` or the failing part."""
        template = await self.get(tenant, name)
        if template is None:
            raise ValidationError("template", f"no template {name!r} for tenant {tenant!r}")
        chosen = template.version(version)
        if chosen is None:
            kept = ", ".join(str(v.version) for v in template.versions)
            raise ValidationError("template_version", f"no version {version} (kept: {kept})")
        if len(_encode(variables)) > MAX_VARIABLES_BYTES:
            raise ValidationError("variables", f"at most {MAX_VARIABLES_BYTES} bytes of JSON")
        try:
            return chosen, render(template, chosen, variables)
        except ValidationError as exc:
            field = exc.field if exc.field.startswith("variables") else f"template.{exc.field}"
            raise ValidationError(field, exc.detail) from None


class TemplateRoutes:
    def __init__(self, templates: Templates) -> None:
        self._templates = templates
        self._store = templates.store

    def _tenant(self, req: Request) -> str:
        """The tenant a request is about: ``?tenant=``, else the key's own."""
        return requested_tenant(req) or req.principal.tenant

    async def _existing(self, tenant: str, name: str) -> Template:
        template = await self._templates.get(tenant, name, fresh=True) if len(name) <= 64 else None
        if template is None:
            raise not_found("No such template", f"{name!r} (tenant {tenant!r})")
        return template

    async def _store_version(
        self, tenant: str, name: str, body: TemplateIn, before: Template | None
    ) -> Template:
        number = await self._store.next_version(tenant, name)
        try:
            version = new_version(body, number, ms_to_iso(int(time.time() * 1000)))
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        kept = (before.versions if before else [])[-(MAX_VERSIONS - 1) :]
        description = body.description or (before.description if before else "")
        template = Template(name, tenant, description, [*kept, version])
        await self._store.put(tenant, name, _encode(template))
        await self._templates.get(tenant, name, fresh=True)
        return template

    async def create_template(self, req: Request) -> Reply:
        body = decode_json(_decode_in, await req.json_body(MAX_BODY))
        tenant = self._tenant(req)
        try:
            name = check_name(body.name)
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        if await self._store.get(tenant, name) is not None:
            raise invalid("name", f"a template {name!r} exists: PUT /v1/templates/{name}")
        if len(await self._store.all(tenant)) >= MAX_TEMPLATES:
            raise invalid(None, f"a tenant has at most {MAX_TEMPLATES} templates")
        template = await self._store_version(tenant, name, body, None)
        location = f"/v1/templates/{name}".encode()
        return json_reply(201, _view(template, template.current), [(b"location", location)])

    async def update_template(self, req: Request) -> Reply:
        body = decode_json(_decode_in, await req.json_body(MAX_BODY))
        tenant = self._tenant(req)
        before = await self._existing(tenant, req.params["name"])
        if body.name and body.name != before.name:
            raise invalid("name", "the name is the path's; it cannot change")
        template = await self._store_version(tenant, before.name, body, before)
        return json_reply(200, _view(template, template.current))

    async def list_templates(self, req: Request) -> Reply:
        tenant = self._tenant(req)
        found = [_decode_template(r) for r in (await self._store.all(tenant)).values()]
        found.sort(key=lambda t: t.name)
        return json_reply(200, TemplateList([_summary(t) for t in found]))

    async def get_template(self, req: Request) -> Reply:
        template = await self._existing(self._tenant(req), req.params["name"])
        number = req.query("version")
        version = template.version(req.int_query("version", 0, 1, 10**9) if number else None)
        if version is None:
            raise not_found("No such version", f"version {number} of {template.name!r}")
        return json_reply(200, _view(template, version))

    async def delete_template(self, req: Request) -> Reply:
        tenant = self._tenant(req)
        template = await self._existing(tenant, req.params["name"])
        await self._store.delete(tenant, template.name)
        await self._templates.get(tenant, template.name, fresh=True)
        return empty_reply(204)

    async def render_template(self, req: Request) -> Reply:
        """A preview: the parts a send with these variables would carry (nothing sent)."""
        body = decode_json(_decode_render, await req.json_body(MAX_BODY))
        tenant = self._tenant(req)
        name = (await self._existing(tenant, req.params["name"])).name
        try:
            version, rendered = await self._templates.render(
                tenant, name, body.version, body.variables
            )
        except ValidationError as exc:
            raise invalid(exc.field, exc.detail) from None
        return json_reply(
            200, RenderOut(version.version, rendered.subject, rendered.text, rendered.html)
        )
