"""DKIM key material: a private key checked or made, its DNS TXT record, the stored
record of a domain's key. Pure (cryptography, no I/O but ``read_key_file``); imports
only errors, so settings, the API and the senders can all use it.

The private key never appears in a repr, a log line or an API answer.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Final, Literal, TypeAlias

import idna
import msgspec
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# The a= tags we sign with (RFC 6376 3.3; RFC 8463 for Ed25519).
Algorithm: TypeAlias = Literal["rsa-sha256", "ed25519-sha256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("rsa-sha256", "ed25519-sha256")
# What users may write for each: the short names of the API, the a= tags.
_ALGORITHM_NAMES: Final[dict[str, Algorithm]] = {
    "rsa": "rsa-sha256",
    "rsa-sha256": "rsa-sha256",
    "ed25519": "ed25519-sha256",
    "ed25519-sha256": "ed25519-sha256",
}
# RFC 8301 3.2: verifiers take 1024 to 4096 bits; signers SHOULD use at least 2048.
MIN_RSA_BITS: Final = 1024
MAX_RSA_BITS: Final = 4096
GENERATED_RSA_BITS: Final = 2048
DEFAULT_SELECTOR: Final = "engine"
# A PEM private key of 4096 bits is ~3.3 kB; anything much larger is not one.
MAX_PEM_BYTES: Final = 16 * 1024
# DNS character-strings hold at most 255 octets (RFC 1035 3.3); a longer TXT value is
# published as several strings, which receivers concatenate (RFC 6376 3.6.2.2).
TXT_STRING_MAX: Final = 255
_LABEL: Final = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE: Final = re.compile(rf"^(?:{_LABEL}\.)+{_LABEL}$")
_SELECTOR_RE: Final = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class UnusableKey(ValueError):
    """A private key that cannot sign DKIM here: its text says why (no key material)."""


def algorithm_of(name: str) -> Algorithm:
    """``rsa``/``ed25519`` or the a= tag itself -> the a= tag; ValueError otherwise."""
    try:
        return _ALGORITHM_NAMES[name.strip().lower()]
    except KeyError:
        raise ValueError("rsa or ed25519 (rsa-sha256, ed25519-sha256)") from None


def check_domain(domain: str) -> str:
    """The signing domain in one spelling: lower case, IDNA A-labels (``d=``, RFC 8616);
    ValueError when it is not a domain name of two labels or more."""
    text = domain.strip().rstrip(".").lower()
    if not text or len(text) > 253:
        raise ValueError("a domain name such as example.com")
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise ValueError("a domain name such as example.com (not a valid IDN)") from None
    if not _DOMAIN_RE.match(text):
        raise ValueError("a domain name such as example.com")
    return text


def check_selector(selector: str) -> str:
    """A selector (``s=``): one or more DNS labels, lower case."""
    text = selector.strip().lower()
    if not text or len(text) > 63 or not _SELECTOR_RE.match(text):
        raise ValueError("DNS labels of letters, digits and hyphens, e.g. engine or s2026")
    return text


def load_private_key(
    pem: bytes, algorithm: Algorithm | None = None, *, checked: bool = True
) -> PrivateKey:
    """The key in ``pem`` (PKCS#8 or PKCS#1, unencrypted), checked to sign with
    ``algorithm`` (None: whichever the key is for). UnusableKey says what is wrong.

    ``checked=False`` skips OpenSSL's RSA consistency check (~50 ms a key here): for a
    key that was checked when it was stored."""
    if len(pem) > MAX_PEM_BYTES:
        raise UnusableKey(f"a PEM private key is at most {MAX_PEM_BYTES} bytes")
    try:
        key = serialization.load_pem_private_key(
            pem, password=None, unsafe_skip_rsa_key_validation=not checked
        )
    except TypeError:
        raise UnusableKey("the key is encrypted: give it without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise UnusableKey("not a PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise UnusableKey(
                f"an RSA key of {key.key_size} bits: DKIM takes {MIN_RSA_BITS} to "
                f"{MAX_RSA_BITS} (RFC 8301; 2048 recommended)"
            )
        kind: Algorithm = "rsa-sha256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        kind = "ed25519-sha256"
    else:
        raise UnusableKey("an RSA or Ed25519 key is needed")
    if algorithm is not None and kind != algorithm:
        raise UnusableKey(f"the key is for {kind}, not {algorithm}")
    return key


def key_algorithm(key: PrivateKey) -> Algorithm:
    return "rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else "ed25519-sha256"


def generate_private_key(algorithm: Algorithm) -> bytes:
    """A new private key, PEM (PKCS#8): RSA 2048 or Ed25519."""
    key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=GENERATED_RSA_BITS)
        if algorithm == "rsa-sha256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_pem(key: PrivateKey) -> str:
    """``key`` as PEM (PKCS#8): one spelling, whatever form it came in."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


def read_key_file(path: str, algorithm: Algorithm, *, what: str) -> bytes:
    """The PEM in ``path``, checked (``load_private_key``); ValueError names ``what``."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path!r}: {exc.strerror or exc}") from None
    try:
        load_private_key(pem, algorithm)
    except UnusableKey as exc:
        raise ValueError(f"{what}: {path!r}: {exc}") from None
    return pem


class DnsRecord(msgspec.Struct, frozen=True):
    """The TXT record that publishes a key's public half."""

    name: str  # <selector>._domainkey.<domain>
    type: str  # always "TXT"
    value: str  # v=DKIM1; k=rsa; p=...
    # ``value`` cut into DNS strings of at most 255 characters, for zone files and DNS
    # consoles that want them apart; receivers join them back.
    strings: list[str]


def dns_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def dns_record(selector: str, domain: str, key: PrivateKey) -> DnsRecord:
    """RSA: ``p=`` is the DER SubjectPublicKeyInfo (RFC 6376 3.6.1); Ed25519: the raw 32
    bytes of the public key (RFC 8463 4.2)."""
    if isinstance(key, rsa.RSAPrivateKey):
        public = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        k = "rsa"
    else:
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        k = "ed25519"
    value = f"v=DKIM1; k={k}; p={base64.b64encode(public).decode('ascii')}"
    strings = [value[i : i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    return DnsRecord(dns_name(selector, domain), "TXT", value, strings)


class DomainRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A signing domain's key as stored (Redis, through ``/v1/domains``)."""

    domain: str  # A-labels, lower case
    selector: str
    algorithm: Algorithm
    private_key: str  # PEM; never leaves through the API, never in a repr or log
    created_at: str = ""

    def __repr__(self) -> str:
        return (
            f"DomainRecord(domain={self.domain!r}, selector={self.selector!r}, "
            f"algorithm={self.algorithm!r}, private_key=***, created_at={self.created_at!r})"
        )

    __str__ = __repr__
