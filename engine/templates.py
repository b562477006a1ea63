"""Message templates: a name, numbered versions of subject / text / html with variables,
and rendering them. Pure: no I/O (the store is engine.queue.templates, the routes
engine.api.templates).

Rendered with minijinja (Jinja syntax, a Rust engine): it is sandboxed by construction
(templates see only the variables given, never Python attributes), an undefined
variable is an error (not an empty string), the html part is HTML-escaped (text and
subject are not), a fuel limit bounds the work one render may do (a loop of loops
stops, it does not hang the loop), and the output of each part is capped.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

import minijinja
import msgspec

from engine.errors import ValidationError
from engine.models import MAX_SUBJECT_CHARS

MAX_NAME_CHARS: Final = 64
MAX_PART_CHARS: Final = 512 * 1024  # a template part's source
MAX_OUTPUT_CHARS: Final = 2 * 1024 * 1024  # a rendered part
MAX_VERSIONS: Final = 20  # kept per template (older ones are dropped)
MAX_VARIABLES_BYTES: Final = 64 * 1024  # a message's variables, as JSON
# Instructions one render may run (each part): a plain template takes tens; 200k is a
# few milliseconds of the engine at most (measured: tests/test_templates.py).
FUEL: Final = 200_000
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
PARTS: Final = ("subject", "text", "html")
# minijinja's global functions: used by a template, they are not variables to give.
_BUILTINS: Final = frozenset({"range", "dict", "debug", "namespace"})


class TemplateIn(msgspec.Struct, forbid_unknown_fields=True):
    """Body of POST /v1/templates (with ``name``) and PUT /v1/templates/{name}."""

    subject: Annotated[str, msgspec.Meta(max_length=MAX_SUBJECT_CHARS)] = ""
    text: Annotated[str, msgspec.Meta(max_length=MAX_PART_CHARS)] | None = None
    html: Annotated[str, msgspec.Meta(max_length=MAX_PART_CHARS)] | None = None
    description: Annotated[str, msgspec.Meta(max_length=256)] = ""
    name: Annotated[str, msgspec.Meta(max_length=MAX_NAME_CHARS)] = ""


class Version(msgspec.Struct, frozen=True):
    """One version of a template, as stored and shown."""

    version: int
    subject: str
    text: str | None
    html: str | None
    variables: list[str]  # every variable its parts use (a send must give them all)
    created_at: str


class Template(msgspec.Struct, frozen=True):
    """A template as stored: its versions, oldest first (the last is the current one)."""

    name: str
    tenant: str
    description: str
    versions: list[Version]

    @property
    def current(self) -> Version:
        return self.versions[-1]

    def version(self, number: int | None) -> Version | None:
        if number is None:
            return self.current
        return next((v for v in self.versions if v.version == number), None)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None


def check_name(name: str) -> str:
    if not (1 <= len(name) <= MAX_NAME_CHARS and _NAME.fullmatch(name)):
        raise ValidationError(
            "name", f"1 to {MAX_NAME_CHARS} letters, digits, '_', '.' or '-', starting "
            "with a letter or digit",
        )  # fmt: skip
    return name


def new_version(body: TemplateIn, number: int, created_at: str) -> Version:
    """Version ``number`` of ``body``, its syntax checked (422 naming the part) and its
    variables found."""
    if body.text is None and body.html is None:
        raise ValidationError("text", "a template needs text, html or both")
    env = _environment()
    variables: set[str] = set()
    for part in PARTS:
        source = getattr(body, part)
        if source is None:
            continue
        try:
            variables |= env.undeclared_variables_in_str(source) - _BUILTINS
        except minijinja.TemplateError as exc:
            raise ValidationError(part, _first_line(exc)) from None
    return Version(number, body.subject, body.text, body.html, sorted(variables), created_at)


def check_variables(version: Version, variables: Mapping[str, Any]) -> None:
    """422 naming ``variables.<name>`` when a variable the template uses is missing."""
    missing = [v for v in version.variables if v not in variables]
    if missing:
        raise ValidationError(
            f"variables.{missing[0]}",
            f"the template uses {', '.join(missing)}: give every one (as null at least)",
        )


def render(template: Template, version: Version, variables: Mapping[str, Any]) -> Rendered:
    """``version`` rendered with ``variables``; ValidationError naming the part (or the
    variable) that failed."""
    check_variables(version, variables)
    env = _environment()
    out: dict[str, str | None] = {}
    for part in PARTS:
        source = getattr(version, part)
        if source is None:
            out[part] = None
            continue
        name = f"{template.tenant}/{template.name}/{version.version}.{part}"
        try:
            text = env.render_named_str(source, name, variables)
        except minijinja.TemplateError as exc:
            raise ValidationError(
                part, f"the template does not render: {_first_line(exc)}"
            ) from None
        if len(text) > MAX_OUTPUT_CHARS:
            raise ValidationError(part, f"renders to over {MAX_OUTPUT_CHARS} characters")
        out[part] = text
    subject = (out["subject"] or "").strip()
    if len(subject) > MAX_SUBJECT_CHARS or "\n" in subject or "\r" in subject:
        raise ValidationError(
            "subject", f"renders to more than one line or {MAX_SUBJECT_CHARS} characters"
        )
    return Rendered(subject, out["text"], out["html"])


def _first_line(exc: minijinja.TemplateError) -> str:
    return str(exc).splitlines()[0][:300]


class _Env(minijinja.Environment):
    """One environment per process. Each part is compiled once under its name
    (tenant/name/version.part) and rendered from then on -- again when that name comes
    with another source (a template deleted and made anew starts at version 1 again);
    past _COMPILED_KEPT names the cache starts again."""

    def render_named_str(self, source: str, name: str, variables: Mapping[str, Any]) -> str:
        compiled: dict[str, str] = self.__dict__.setdefault("_compiled", {})
        if compiled.get(name) != source:
            if len(compiled) >= _COMPILED_KEPT:
                self.clear_templates()
                compiled.clear()
            self.add_template(name, source)
            compiled[name] = source
        # A name ending in .html turns auto-escaping on for that part.
        return str(self.render_template(name, **variables))


_COMPILED_KEPT: Final = 2000


@functools.cache
def _environment() -> _Env:
    return _Env(
        undefined_behavior="strict",
        fuel=FUEL,
        auto_escape_callback=lambda name: name.endswith(".html"),
        keep_trailing_newline=True,
    )
