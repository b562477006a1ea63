"""DKIM signing of composed mail (RFC 6376, relaxed/relaxed; RFC 8463 for Ed25519).

Pure, no I/O; imports the key material (``engine.domainkeys``) and the transport's
shapes. Canonicalisation and the header are ours, the signature is OpenSSL's (through
``cryptography``): dkimpy, the reference implementation, verifies what we sign in the
tests, but signs a typical message in ~10 ms with RSA 2048 (pure-Python arithmetic) and
~0.4-0.6 ms with Ed25519 (its parsing and regexes), against ~0.5 ms and ~0.1 ms here,
where OpenSSL's own RSA 2048 signature takes ~0.4 ms (``python -m scripts.bench_dkim``).

Which key: the From header's domain, or its closest parent that has one (``d=`` must
align with the From domain for DMARC; relaxed alignment accepts a parent). The
envelope sender plays no part (it may be a bounce address on another domain).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from engine.domainkeys import (
    Algorithm,
    DnsRecord,
    PrivateKey,
    check_domain,
    check_selector,
    dns_record,
    load_private_key,
)
from engine.transport.base import OutgoingMail

# The header fields signed when present (RFC 6376 5.4.1's list, less the Resent-* and
# List-* fields the engine does not write, plus List-Unsubscribe(-Post): Gmail and Yahoo
# want one-click unsubscribe signed). Each is signed once more than it occurs
# ("oversigned", RFC 6376 8.15): nobody can add another From, Subject or
# List-Unsubscribe without breaking the signature.
SIGNED_HEADERS: Final = (
    "from", "to", "cc", "reply-to", "subject", "date", "message-id", "in-reply-to",
    "references", "mime-version", "content-type", "list-id", "list-unsubscribe",
    "list-unsubscribe-post",
)  # fmt: skip
_SIGNED: Final = frozenset(h.encode("ascii") for h in SIGNED_HEADERS)
# Runs of spaces, once tabs are spaces: ~10x faster than one pattern for both (its
# literal prefix is searched for in C).
_SPACES: Final = re.compile(rb"  +")
_CRLF: Final = b"\r\n"
_FOLD_AT: Final = 76  # characters a line of the DKIM-Signature field stays within
_B64_LINE: Final = 72
_PKCS1: Final = padding.PKCS1v15()
_SHA256: Final = hashes.SHA256()


@dataclass(frozen=True, slots=True, repr=False)
class DkimKey:
    """A signing domain's key. ``domain`` and ``selector`` are normalised (lower case,
    A-labels); the PEM is parsed once, here (ValueError if it cannot sign). The private
    key shows in no repr.

    ``checked=False`` skips OpenSSL's RSA consistency check (~50 ms a key) for keys that
    were checked when stored (the API and the settings check them).
    """

    domain: str
    selector: str
    algorithm: Algorithm
    private_key: bytes = field(compare=False)
    checked: dataclasses.InitVar[bool] = True
    _key: PrivateKey = field(init=False, compare=False)

    def __post_init__(self, checked: bool) -> None:
        object.__setattr__(self, "domain", check_domain(self.domain))
        object.__setattr__(self, "selector", check_selector(self.selector))
        key = load_private_key(self.private_key, self.algorithm, checked=checked)
        object.__setattr__(self, "_key", key)

    def __repr__(self) -> str:
        return (
            f"DkimKey(domain={self.domain!r}, selector={self.selector!r}, "
            f"algorithm={self.algorithm!r}, private_key=***)"
        )

    __str__ = __repr__

    def dns_record(self) -> DnsRecord:
        return dns_record(self.selector, self.domain, self._key)

    def sign_data(self, data: bytes) -> bytes:
        """The signature of the canonical header data: RSASSA-PKCS1-v1_5 over its
        SHA-256, or Ed25519 over its SHA-256 (RFC 8463 3: the hash is what is signed)."""
        key = self._key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, _PKCS1, _SHA256)
        return key.sign(hashlib.sha256(data).digest())


def sign(
    mail: OutgoingMail, keys: Mapping[str, DkimKey], *, now: float | None = None
) -> OutgoingMail:
    """``mail`` with a DKIM-Signature field first, when its From domain (or a parent)
    has a key in ``keys`` (by domain, A-labels); else ``mail`` itself."""
    key = signing_key(mail, keys)
    return mail if key is None else sign_with(mail, key, now=now)


def signing_key(mail: OutgoingMail, keys: Mapping[str, DkimKey]) -> DkimKey | None:
    """The key that signs ``mail``: its From domain's, or its closest parent's."""
    if not keys:
        return None
    return key_for(_from_domain(_from_value(mail.data)), keys)


def sign_with(mail: OutgoingMail, key: DkimKey, *, now: float | None = None) -> OutgoingMail:
    """``mail`` signed with ``key`` (``signing_key`` chose it).

    Its 7-bit fallback forms get their own signatures (their bodies or headers differ),
    made only if one is sent: ``SevenBitForm.signer``. Servers without 8BITMIME or
    SMTPUTF8 are rare, and a signature costs as much as the rest of a send.
    """
    head, body = _split(mail.data)
    stamp = int(time.time() if now is None else now)
    header = _signature(key, head, body, stamp)
    alt = mail.fallback
    if alt is not None:
        alt = dataclasses.replace(
            alt, split=alt.split + len(header), signed=len(header), signer=FormSigner(key, stamp)
        )
    return dataclasses.replace(mail, data=header + mail.data, fallback=alt)


def key_for(domain: str | None, keys: Mapping[str, DkimKey]) -> DkimKey | None:
    """The key of ``domain`` or of its closest parent (not a top-level domain)."""
    if not domain:
        return None
    labels = domain.split(".")
    for i in range(len(labels) - 1):
        key = keys.get(".".join(labels[i:]))
        if key is not None:
            return key
    return None


class FormSigner:
    """Signs the other forms of one mail on demand (``SevenBitForm.signer``), once each:
    the transport asks for a form's data more than once per send."""

    __slots__ = ("_done", "key", "stamp")

    def __init__(self, key: DkimKey, stamp: int) -> None:
        self.key = key
        self.stamp = stamp
        self._done: dict[str, bytes] = {}

    def __repr__(self) -> str:
        return f"FormSigner({self.key!r})"

    def header_for(self, message: bytes, form: str) -> bytes:
        header = self._done.get(form)
        if header is None:
            head, body = _split(message)
            header = self._done[form] = _signature(self.key, head, body, self.stamp)
        return header


def _split(message: bytes) -> tuple[bytes, bytes]:
    """The header section (each field ending in CRLF) and the body."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 4 :]


def _from_value(data: bytes) -> bytes | None:
    """The (first) From field's value, unfolded; the composer writes it first."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    start = 0 if head[:5].lower() == b"from:" else head.lower().find(b"\r\nfrom:") + 2
    if start == 1:  # not found
        return None
    start += 5
    stop = head.find(b"\r\n", start)
    while stop >= 0 and head[stop + 2 : stop + 3] in (b" ", b"\t"):  # folded
        stop = head.find(b"\r\n", stop + 2)
    return head[start : len(head) if stop < 0 else stop].replace(b"\r\n", b"")


@functools.lru_cache(maxsize=4096)  # the same few From fields, again and again
def _from_domain(value: bytes | None) -> str | None:
    """The domain of a From field's (first) address, in A-labels; None if none."""
    if not value:
        return None
    text = value.decode("utf-8", "replace")
    # The address is in the last <...>, or the whole value when there is none.
    if ">" in text:
        text = text[: text.rindex(">")]
        text = text[text.rfind("<") + 1 :]
    domain = text.rpartition("@")[2].strip()
    try:
        return check_domain(domain) if domain else None
    except ValueError:
        return None


def _canonical_field(name: bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2 (relaxed): lower-case name, unfolded value, each run of WSP one
    space, none at the value's ends or around the colon."""
    value = _spaced(value.replace(_CRLF, b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + _CRLF


def _spaced(text: bytes) -> bytes:
    """``text`` with each run of WSP one space."""
    if b"\t" in text:
        text = text.replace(b"\t", b" ")
    return _SPACES.sub(b" ", text) if b"  " in text else text


def canonical_body(body: bytes) -> bytes:
    """RFC 6376 3.4.4 (relaxed): each run of WSP one space, none at line ends, no empty
    lines at the end; a non-empty body ends with CRLF. ``body`` has CRLF line ends (the
    composer's output always has). Like dkimpy, WSP after the last CRLF stays (the
    composer's bodies always end in CRLF)."""
    body = _spaced(body).replace(b" \r\n", b"\r\n").rstrip(b"\r\n")
    return body + _CRLF if body else b""


def _signed_fields(head: bytes) -> tuple[tuple[str, ...], bytes]:
    """The h= list -- each present field of SIGNED_HEADERS once per occurrence and once
    more -- and the canonical fields it selects, the last occurrence first (RFC 6376
    5.4.2), from the header section ``head``. One pass; other fields are skipped."""
    found: dict[bytes, list[list[bytes]]] = {}  # name -> each occurrence's lines
    lines: list[bytes] | None = None
    for line in head.split(_CRLF):
        if not line:
            continue
        if line[0] in b" \t":  # a fold: unfolding drops the CRLF only
            if lines is not None:
                lines.append(line)
            continue
        name, _, value = line.partition(b":")
        lower = name.rstrip(b" \t").lower()
        lines = [value] if lower in _SIGNED else None
        if lines is not None:
            found.setdefault(lower, []).append(lines)
    names: list[str] = []
    chosen: list[bytes] = []
    for header in SIGNED_HEADERS:
        occurrences = found.get(header.encode("ascii"))
        if occurrences:
            names += [header] * (len(occurrences) + 1)
            prefix = header.encode("ascii") + b":"
            chosen += [
                prefix + _spaced(b"".join(parts)).strip(b" ") + _CRLF
                for parts in reversed(occurrences)
            ]
    return tuple(names), b"".join(chosen)


def _signature(key: DkimKey, head: bytes, body: bytes, stamp: int) -> bytes:
    """The DKIM-Signature field (ending in CRLF) of a message of this header section
    (each field ending in CRLF) and this body."""
    names, chosen = _signed_fields(head)
    body_hash = base64.b64encode(hashlib.sha256(canonical_body(body)).digest()).decode()
    text = f"{_tags(key.algorithm, key.domain, key.selector, names)}\r\n t={stamp}; bh={body_hash};"
    # What is signed: the chosen fields, then this one with an empty b= and no final
    # CRLF (RFC 6376 3.7), all canonical.
    unsigned = _canonical_field(b"dkim-signature", text[len("DKIM-Signature:") :].encode())
    data = b"".join((chosen, unsigned[:-2], b" b="))
    value = base64.b64encode(key.sign_data(data)).decode("ascii")
    first = _B64_LINE - len(" b=")
    lines = [value[:first]] + [
        value[i : i + _B64_LINE] for i in range(first, len(value), _B64_LINE)
    ]
    return (text + "\r\n b=" + "\r\n ".join(lines) + "\r\n").encode("ascii")


@functools.lru_cache(maxsize=256)
def _tags(algorithm: str, domain: str, selector: str, names: tuple[str, ...]) -> str:
    """The field's start, folded: every tag but t=, bh= and b= (the same for every mail
    of a key with the same fields)."""
    tags = ["v=1;", f"a={algorithm};", "c=relaxed/relaxed;", f"d={domain};", f"s={selector};"]
    # h= may fold after any colon (RFC 6376 3.5: FWS around ":"), so a long list folds.
    h = [f"{n}:" for n in names]
    h[0], h[-1] = "h=" + h[0], h[-1][:-1] + ";"
    atoms = [(" ", t) for t in tags] + [(" ", h[0])] + [("", part) for part in h[1:]]
    return _fold("DKIM-Signature:", atoms)


def _fold(start: str, atoms: list[tuple[str, str]]) -> str:
    """``start`` and each (glue, atom), a line break (CRLF SP) instead of the glue where
    the line would pass _FOLD_AT characters."""
    out = [start]
    width = len(start)
    for glue, atom in atoms:
        if width + len(glue) + len(atom) > _FOLD_AT:
            out.append("\r\n " + atom)
            width = 1 + len(atom)
        else:
            out.append(glue + atom)
            width += len(glue) + len(atom)
    return "".join(out)
