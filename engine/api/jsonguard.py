"""Duplicate keys in a JSON object are refused: msgspec (like most decoders) silently
keeps the last one, so a proxy that reads the first and the engine would disagree on
what one body says. Pure; imports only msgspec and the standard library.
"""

from __future__ import annotations

import json
from typing import Any, Final

import msgspec

_decode: Final = msgspec.json.Decoder().decode
_encode: Final = msgspec.json.Encoder().encode
# A ":" inside a string may also be written as an escape (either case of "a").
_ESCAPED_COLONS: Final = (b"\\u003a", b"\\u003A")
# Up to this size a body with a repeated key is decoded once more to name the key.
_NAME_BELOW_BYTES: Final = 1024 * 1024


class TooDeep(ValueError):
    """The body nests too deeply to be checked (or decoded)."""


def duplicate_key(body: bytes) -> tuple[str, str] | None:
    """``(field, detail)`` for the 422 when some object of ``body`` (valid JSON) repeats
    a key, the field in ``error_field`` form (``messages[2].to``); None when none does.
    Over 1 MiB the key is not looked for (field ``$``).

    Raises TooDeep when the body nests past the interpreter's recursion limit.
    """
    try:
        repeats = _repeats(body)
    except RecursionError:
        raise TooDeep("the JSON body nests too deeply") from None
    if not repeats:
        return None
    found = _find_repeat(body) if len(body) < _NAME_BELOW_BYTES else None
    if found is None:
        return "$", "an object of this body has the same key more than once"
    path, key = found
    return path, f"the key {key!r} appears more than once in an object"


def _repeats(body: bytes) -> bool:
    """Whether some object of ``body`` repeats a key, decided in C by counting colons,
    at about the cost of decoding ``body`` once more.

    Outside strings a ":" follows each key written, so ``body`` holds (keys written) +
    (":" inside its strings, less those written as a ``\\u003a`` escape) colons.
    Re-encoded, its decoded form (msgspec never escapes ":") holds (distinct keys) +
    (":" inside the decoded strings). Without a repeated key the two counts agree; a
    repeated key makes the first larger (the strings of the value the decoder dropped
    only add to it).
    """
    escaped = 0
    if b"\\u003" in body:
        # Escapes pair backslashes from the left, so without the "\\\\" pairs every
        # backslash left starts an escape: "\\\\u003a" is text, "\\\\\\u003a" a ":".
        # With no backslash right before any "\\u003", each of them is an escape: the
        # copy without pairs (~2 ms a MiB when there are many) is not needed.
        unpaired = body.replace(b"\\\\", b"") if b"\\\\u003" in body else body
        escaped = sum(unpaired.count(e) for e in _ESCAPED_COLONS)
    return body.count(b":") + escaped != _encode(_decode(body)).count(b":")


class _Repeated(dict[str, Any]):
    """A decoded object that wrote ``key`` more than once."""

    key: str = ""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    repeated = _Repeated(obj)
    for key, _ in pairs:
        if key in seen:
            repeated.key = key
            break
        seen.add(key)
    return repeated


def _find_repeat(body: bytes) -> tuple[str, str] | None:
    """Where the repeated key is: the stdlib's C scanner hands each object's pairs to
    ``_pairs``, then the first object that repeats one, in document order."""
    try:
        root = json.loads(body, object_pairs_hook=_pairs)
    except RecursionError:
        raise TooDeep("the JSON body nests too deeply") from None
    stack: list[tuple[Any, str]] = [(root, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _Repeated):
            return _join(path, value.key) or "$", value.key
        if isinstance(value, dict):
            stack.extend((v, _join(path, k)) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]") for i, v in reversed(list(enumerate(value))))
    return None  # _repeats said yes: not reached


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
