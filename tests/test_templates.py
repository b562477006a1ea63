"""Templates: rendering rules (pure), the /v1/templates API over real HTTP, and sends
that name a template (single and batch) delivered over SMTP into the sink."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from engine.embedded import RedisServer
from engine.errors import ValidationError
from engine.templates import Template, TemplateIn, new_version, render
from engine.transport.memory import MemoryTransport
from fixtures.inproc import engine_client


def test_render_escapes_html_only_and_refuses_undefined_variables() -> None:
    version = new_version(
        TemplateIn(subject="Hi {{ name }}", text="Dear {{ name }}: {{ n }} items",
                   html="<p>{{ name }}</p>"),
        1, "x",
    )  # fmt: skip
    assert version.variables == ["n", "name"]
    template = Template("welcome", "default", "", [version])
    out = render(template, version, {"name": "<Ann & Co>", "n": 3})
    assert out.subject == "Hi <Ann & Co>"
    assert out.text == "Dear <Ann & Co>: 3 items"
    assert out.html == "<p>&lt;Ann &amp; Co&gt;</p>"
    with pytest.raises(ValidationError) as missing:
        render(template, version, {"name": "Ann"})
    assert missing.value.field == "variables.n"


def test_syntax_errors_name_the_part_and_loops_run_out_of_fuel() -> None:
    with pytest.raises(ValidationError) as bad:
        new_version(TemplateIn(text="ok", html="{{ name "), 1, "x")
    assert bad.value.field == "html" and "syntax error" in bad.value.detail
    with pytest.raises(ValidationError) as empty:
        new_version(TemplateIn(subject="s"), 1, "x")
    assert empty.value.field == "text"
    looping = new_version(
        TemplateIn(text="{% for i in range(100000) %}{% for j in range(100000) %}x"
                        "{% endfor %}{% endfor %}"),
        1, "x",
    )  # fmt: skip
    assert looping.variables == []  # range is a function, not a variable to give
    started = time.monotonic()
    with pytest.raises(ValidationError) as fuel:
        render(Template("l", "default", "", [looping]), looping, {})
    assert fuel.value.field == "text" and "fuel" in fuel.value.detail
    assert time.monotonic() - started < 1.0  # stopped, not run for 10^10 steps


def test_no_python_attribute_reaches_a_template() -> None:
    version = new_version(TemplateIn(text="{{ x.__class__ }}"), 1, "x")
    with pytest.raises(ValidationError):
        render(Template("s", "default", "", [version]), version, {"x": "a"})
    newline = new_version(TemplateIn(subject="{{ s }}", text="t"), 1, "x")
    with pytest.raises(ValidationError) as two_lines:
        render(Template("n", "default", "", [newline]), newline, {"s": "a\r\nBcc: x@y"})
    assert two_lines.value.field == "subject"


Api = tuple[httpx.AsyncClient, MemoryTransport]


@pytest.fixture
async def api(redis_server: RedisServer) -> AsyncIterator[Api]:
    async with engine_client(redis_server.url) as (client, transport, _):
        yield client, transport


WELCOME = {"name": "welcome", "subject": "Welcome, {{ name }}",
           "text": "Hello {{ name }}, your code is {{ code }}.",
           "html": "<p>Hello {{ name }}, your code is <b>{{ code }}</b>.</p>"}  # fmt: skip


async def test_the_api_keeps_versions_lists_previews_and_deletes(
    api: Api,
) -> None:
    c, _ = api
    made = await c.post("/v1/templates", json=WELCOME)
    assert made.status_code == 201, made.text
    assert made.json()["version"] == 1 and made.json()["variables"] == ["code", "name"]
    again = await c.post("/v1/templates", json=WELCOME)
    assert again.status_code == 422 and again.json()["field"] == "name"
    bad = await c.post("/v1/templates", json={"name": "x", "text": "{% if %}"})
    assert bad.status_code == 422 and bad.json()["field"] == "text"
    assert (await c.post("/v1/templates", json={"name": "../x", "text": "t"})).json()[
        "field"
    ] == "name"

    v2 = await c.put("/v1/templates/welcome", json={**WELCOME, "name": "",
                                                     "subject": "Hi {{ name }}"})  # fmt: skip
    assert v2.status_code == 200 and v2.json()["version"] == 2
    assert v2.json()["versions"] == [1, 2]
    old = await c.get("/v1/templates/welcome", params={"version": 1})
    assert old.json()["subject"] == "Welcome, {{ name }}"
    listed = (await c.get("/v1/templates")).json()["items"]
    assert [(t["name"], t["version"]) for t in listed] == [("welcome", 2)]

    preview = await c.post("/v1/templates/welcome/render",
                           json={"variables": {"name": "<Ann>", "code": 42}})  # fmt: skip
    assert preview.json()["html"] == "<p>Hello &lt;Ann&gt;, your code is <b>42</b>.</p>"
    missing = await c.post("/v1/templates/welcome/render", json={"variables": {"name": "A"}})
    assert missing.status_code == 422 and missing.json()["field"] == "variables.code"

    # Another tenant's key does not see it.
    key = await c.post("/v1/keys", json={"scopes": ["templates", "send"], "tenant": "acme"})
    acme = {"Authorization": f"Bearer {key.json()['key']}"}
    assert (await c.get("/v1/templates/welcome", headers=acme)).status_code == 404
    assert (await c.get("/v1/templates", headers=acme)).json()["items"] == []
    reader = await c.post("/v1/keys", json={"scopes": ["read"], "tenant": "default"})
    forbidden = {"Authorization": f"Bearer {reader.json()['key']}"}
    assert (await c.get("/v1/templates", headers=forbidden)).status_code == 403

    assert (await c.delete("/v1/templates/welcome")).status_code == 204
    assert (await c.get("/v1/templates/welcome")).status_code == 404
    spec = (await c.get("/openapi.json")).json()
    assert "/v1/templates/{name}/render" in spec["paths"]


async def _sent(transport: MemoryTransport, n: int) -> None:
    with trio.fail_after(10):
        while len(transport.sent) < n:
            await trio.sleep(0.02)


async def test_sends_name_a_template_single_and_batch(api: Api) -> None:
    c, transport = api
    assert (await c.post("/v1/templates", json=WELCOME)).status_code == 201
    ann = {"to": "ann@example.com", "template": "welcome",
           "variables": {"name": "Ann", "code": "A1"}}  # fmt: skip
    one = await c.post("/v1/messages", json=ann)
    assert one.status_code == 202, one.text
    batch = {"messages": [
        {"to": f"u{i}@example.com", "template": "welcome",
         "variables": {"name": f"<U{i}>", "code": i}} for i in range(3)
    ]}  # fmt: skip
    many = await c.post("/v1/messages/batch", json=batch)
    assert many.status_code == 202, many.text
    await _sent(transport, 4)
    bodies = {m.recipients[0]: m.data.decode() for m in transport.sent}
    assert "Subject: Welcome, Ann" in bodies["ann@example.com"]
    assert "your code is A1." in bodies["ann@example.com"]
    assert "&lt;U2&gt;" in bodies["u2@example.com"] and "<U2>" in bodies["u2@example.com"]

    # Refused at ingest, naming the field: a missing variable (in a batch: its place),
    # an unknown template or version, a template and a body both.
    r = await c.post("/v1/messages", json={"to": "a@example.com", "template": "welcome",
                                           "variables": {"name": "A"}})  # fmt: skip
    assert (r.status_code, r.json()["field"]) == (422, "variables.code")
    bad = {"messages": [batch["messages"][0], {"to": "b@example.com", "template": "welcome"}]}
    r = await c.post("/v1/messages/batch", json=bad)
    assert (r.status_code, r.json()["field"]) == (422, "messages[1].variables.code")
    r = await c.post("/v1/messages", json={"to": "a@example.com", "template": "nope"})
    assert (r.status_code, r.json()["field"]) == (422, "template")
    r = await c.post("/v1/messages", json={"to": "a@example.com", "template": "welcome",
                                           "template_version": 9, "variables": {}})  # fmt: skip
    assert (r.status_code, r.json()["field"]) == (422, "template_version")
    r = await c.post("/v1/messages", json={"to": "a@example.com", "template": "welcome",
                                           "text": "x", "variables": {}})  # fmt: skip
    assert (r.status_code, r.json()["field"]) == (422, "template")
