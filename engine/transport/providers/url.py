"""Provider URLs: which API, its credentials, its domain or region, its endpoint.

    resend://KEY@                         sendgrid://KEY@          postmark://SERVER_TOKEN@
    mailgun://KEY@DOMAIN                  ses://ACCESS_KEY_ID:SECRET_ACCESS_KEY@REGION
    ...?api_base=https://api.eu.mailgun.net   another endpoint (a region, an emulator)

The last ``@`` ends the credentials, so a secret may hold ``/`` or ``+`` as it is (an AWS
secret does); ``?``, ``#`` and ``%`` in one are percent-encoded. Secrets never show: the
URL is only ever shown through ``engine.config.redact_url``. Imports only config, errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl, unquote

from engine.config import redact_url
from engine.errors import ConfigError

# Each provider's API, and what the host part of its URL is.
DEFAULT_API_BASES: Final = {
    "resend": "https://api.resend.com",
    "sendgrid": "https://api.sendgrid.com",
    "postmark": "https://api.postmarkapp.com",
    "mailgun": "https://api.mailgun.net",
    "ses": "https://email.{region}.amazonaws.com",
}
PROVIDER_SCHEMES: Final = frozenset(DEFAULT_API_BASES)
_REGION: Final = re.compile(r"[a-z]{2}(-[a-z0-9]+)+-\d+")
_DOMAIN: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_FORMS: Final = {
    "resend": "resend://KEY@",
    "sendgrid": "sendgrid://KEY@",
    "postmark": "postmark://SERVER_TOKEN@",
    "mailgun": "mailgun://KEY@DOMAIN",
    "ses": "ses://ACCESS_KEY_ID:SECRET_ACCESS_KEY@REGION",
}


def is_provider_url(url: str) -> bool:
    """Whether ``url`` names a provider's HTTP API (else it is SMTP's, or wrong)."""
    return url.partition("://")[0].lower() in PROVIDER_SCHEMES


def _shown(url: str) -> str:
    """``url`` for an error message: redacted, and with no user part at all (in a URL
    that failed to parse, whatever stands before an ``@`` may be a key)."""
    scheme, sep, rest = redact_url(url).partition("://")
    head, mark, query = rest.partition("?")
    _, at, where = head.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{where}{mark}{query}"


@dataclass(frozen=True, slots=True)
class ProviderUrl:
    provider: str  # "resend", "sendgrid", "postmark", "mailgun" or "ses"
    key: str = field(repr=False)  # the API key or token; SES: the access key id
    secret: str = field(repr=False)  # SES: the secret access key; else ""
    where: str  # Mailgun: the sending domain; SES: the region; else ""
    api_base: str  # the endpoint, default or given

    @classmethod
    def parse(cls, url: str) -> ProviderUrl:
        """Parse ``url``; ConfigError saying what is wrong (the URL redacted)."""
        shown = f"provider URL {_shown(url)!r}"
        scheme, sep, rest = url.partition("://")
        provider = scheme.lower()
        if not sep or provider not in PROVIDER_SCHEMES:
            forms = ", ".join(_FORMS.values())
            raise ConfigError(f"{shown}: the scheme names the provider: {forms}")
        form = _FORMS[provider]
        head, _, query = rest.partition("?")
        userinfo, at, where = head.rpartition("@")
        where = where.rstrip("/")
        if not at or not userinfo:
            raise ConfigError(f"{shown}: no credentials: write {form}")
        user, colon, password = userinfo.partition(":")
        key, secret = unquote(user), unquote(password)
        if provider == "ses":
            if not colon or not key or not secret:
                raise ConfigError(f"{shown}: give the access key id and the secret: {form}")
        elif colon:
            raise ConfigError(f"{shown}: one key, no ':': write {form}")
        for value in (key, secret):
            if any(c.isspace() or not c.isprintable() for c in value):
                raise ConfigError(f"{shown}: the credentials hold white space or controls")
        if provider == "mailgun" and not _DOMAIN.fullmatch(where):
            raise ConfigError(f"{shown}: the host part is the sending domain: {form}")
        if provider == "ses" and not _REGION.fullmatch(where):
            raise ConfigError(f"{shown}: the host part is the region (eu-west-1): {form}")
        if provider not in ("mailgun", "ses") and where:
            raise ConfigError(
                f"{shown}: no host: write {form} (?api_base=URL for another endpoint)"
            )
        options = dict(parse_qsl(query, keep_blank_values=True))
        unknown = sorted(set(options) - {"api_base"})
        if unknown:
            raise ConfigError(f"{shown}: unknown parameter {unknown[0]!r} (only api_base)")
        api_base = options.get("api_base") or DEFAULT_API_BASES[provider].format(region=where)
        return cls(provider, key, secret, where, api_base.rstrip("/"))

    def __str__(self) -> str:
        """The URL with its secrets hidden (for banners and logs)."""
        where = self.where
        if self.api_base != DEFAULT_API_BASES[self.provider].format(region=self.where):
            where += f"?api_base={self.api_base}"
        return f"{self.provider}://***@{where}"
