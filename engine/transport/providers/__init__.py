"""Sending through email providers' HTTP APIs, behind the Transport protocol: Resend,
SendGrid, Postmark, Mailgun and Amazon SES, each chosen by a URL.

    resend://KEY@                 POST /emails            the job id: Idempotency-Key, tag
    sendgrid://KEY@               POST /v3/mail/send      custom_args.job_id
    postmark://SERVER_TOKEN@      POST /email             Metadata.job_id
    mailgun://KEY@DOMAIN          POST /v3/DOMAIN/messages.mime (our MIME)   v:job_id
    ses://ACCESS_KEY_ID:SECRET@REGION   POST /v2/email/outbound-emails (Raw MIME, SigV4)
                                                          EmailTags job_id
    any of them + ?api_base=URL   another endpoint: https://api.eu.mailgun.net, an
                                  emulator (http://127.0.0.1:PORT), a proxy

``transport_for(url, settings)`` builds one; ``settings`` (``[providers]``) holds what all
share: pool size, timeouts, TLS. Answers: 2xx accepted (code 250, ``provider_id``); 429
and 5xx TemporaryFailure (``retry_after_s``); other 4xx PermanentFailure, 401/403 logged
as ``transport.<name>.auth_refused``; every refusal's ``code`` is the HTTP status. No
connection: TransportUnavailable for the mail and those after it; a request written but
not answered: DeliveryUncertain (Resend: TemporaryFailure, its retry is idempotent).
Credentials never show: URLs only through ``redact_url`` or ``ProviderUrl.__str__``.
"""

from __future__ import annotations

from engine.config import ProviderSettings
from engine.transport.http1 import Http1Pool, make_ssl_context
from engine.transport.providers.base import Provider
from engine.transport.providers.transport import ProviderTransport, ProviderTransportStatistics
from engine.transport.providers.url import (
    DEFAULT_API_BASES,
    PROVIDER_SCHEMES,
    ProviderUrl,
    is_provider_url,
)


def transport_for(url: str, settings: ProviderSettings | None = None) -> ProviderTransport:
    """The transport a provider URL names (forms above); ConfigError, the URL redacted,
    when it is not one or ``settings`` are out of range. Opens nothing yet."""
    from engine.errors import ConfigError

    settings = settings or ProviderSettings()
    parsed = ProviderUrl.parse(url)
    if (
        settings.pool_size < 1
        or min(settings.connect_timeout_s, settings.request_timeout_s, settings.idle_timeout_s) <= 0
        or settings.max_response_bytes < 1024
    ):
        raise ConfigError(
            "providers: pool_size >= 1, timeouts > 0 and max_response_bytes >= 1024 needed"
        )
    pool = Http1Pool(
        parsed.api_base,
        max_connections=settings.pool_size,
        connect_timeout_s=settings.connect_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        max_response_bytes=settings.max_response_bytes,
        ssl_context=make_ssl_context(verify=settings.tls_verify, ca_file=settings.tls_ca_file)
        if parsed.api_base.startswith("https:")
        else None,
    )
    provider: Provider
    if parsed.provider == "resend":
        from engine.transport.providers.resend import Resend

        provider = Resend(parsed)
    elif parsed.provider == "sendgrid":
        from engine.transport.providers.sendgrid import SendGrid

        provider = SendGrid(parsed)
    elif parsed.provider == "postmark":
        from engine.transport.providers.postmark import Postmark

        provider = Postmark(parsed)
    elif parsed.provider == "mailgun":
        from engine.transport.providers.mailgun import Mailgun

        provider = Mailgun(parsed)
    else:  # botocore is imported only for SES
        from engine.transport.providers.ses import Ses

        provider = Ses(parsed, pool.origin)
    return ProviderTransport(provider, pool, request_timeout_s=settings.request_timeout_s)


__all__ = [
    "DEFAULT_API_BASES",
    "PROVIDER_SCHEMES",
    "Provider",
    "ProviderTransport",
    "ProviderTransportStatistics",
    "ProviderUrl",
    "is_provider_url",
    "transport_for",
]
