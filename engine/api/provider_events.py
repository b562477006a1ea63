"""POST /v1/providers/{name}/events: the email providers' delivery webhooks. Public: the
provider's own signature is the credential (``engine.provider_events`` checks it and maps
the events); the events then go to the queue in one script call and on to the stream's
consumers (websocket hub, webhook dispatcher) like every other event.

Also SNS's signing certificates (SES's events come through SNS): fetched over HTTPS from
sns.<region>.amazonaws.com only (the URL is checked before anything is fetched), kept per
URL. Imports the queue and the leaves; never the senders or transports.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Protocol
from urllib.parse import urlsplit

import h11
import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric import rsa

from engine.api.exchange import Fail, Reply, Request, json_reply
from engine.config import ProviderEventSettings, parse_hostport
from engine.errors import ConfigError, EngineError
from engine.provider_events import (
    PROVIDERS,
    Delivery,
    MalformedDelivery,
    SignatureInvalid,
    SnsMessage,
    check_sns_url,
    check_topic,
    mailgun_events,
    missing_settings,
    parse_sns,
    postmark_events,
    resend_events,
    sendgrid_events,
    sendgrid_key,
    ses_events,
    sns_certificate_key,
    verify_basic,
    verify_mailgun,
    verify_sendgrid,
    verify_sns,
    verify_svix,
)
from engine.queue import ProviderEventStore

log = logging.getLogger(__name__)

# SNS signing certificates kept (one per region and key rotation: a handful).
_CERTS_KEPT: Final = 16
_CERT_FETCH_TIMEOUT_S: Final = 5.0
_CERT_MAX_BYTES: Final = 64 * 1024
_BASIC_CHALLENGE: Final = (b"www-authenticate", b'Basic realm="provider events"')
_decode_json = msgspec.json.Decoder().decode


class ProviderEventsTaken(msgspec.Struct, omit_defaults=True):
    """Answer of POST /v1/providers/{name}/events: what the delivery held."""

    received: int = 0  # delivery events of ours (delivered, bounced, complained, delayed)
    stored: int = 0  # appended to their messages' events
    duplicates: int = 0  # seen before (a provider's retry): dropped
    unmatched: int = 0  # of no message kept here (no job id, or its record expired)
    ignored: int = 0  # of other kinds (sent, opened, clicked...)
    suppressed: int = 0  # recipients newly on their tenant's suppression list
    # SNS: a SubscriptionConfirmation "confirmed" (its SubscribeURL fetched) or "logged"
    # (provider_events.ses_confirm_subscriptions is off); an UnsubscribeConfirmation
    # "unsubscribed".
    subscription: str | None = None


class CertUnavailable(EngineError):
    """An SNS URL could not be fetched (network, TLS, timeout): try again later (503)."""


class CertFetcher(Protocol):
    """GET an https URL the caller has checked: (status, body)."""

    async def get(self, url: str) -> tuple[int, bytes]: ...


class HttpsFetcher:
    """GET over HTTPS: h11 on a Trio TLS stream, the server's certificate verified for the
    URL's host, no redirects, bounded in time and bytes. ``connect_to`` (HOST:PORT) is
    where the connection goes instead of the URL's host (a proxy, tests)."""

    def __init__(
        self,
        *,
        ca_file: str | None = None,
        connect_to: str = "",
        timeout_s: float = _CERT_FETCH_TIMEOUT_S,
        max_bytes: int = _CERT_MAX_BYTES,
    ) -> None:
        self._ssl = ssl.create_default_context()
        if ca_file:
            try:
                self._ssl.load_verify_locations(ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"provider_events.ses_cert_ca_file: {exc}") from None
        self._connect_to = parse_hostport(connect_to) if connect_to else None
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes

    async def get(self, url: str) -> tuple[int, bytes]:
        parts = urlsplit(url)
        host = parts.hostname or ""
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        where = self._connect_to or (host, parts.port or 443)
        try:
            with trio.fail_after(self._timeout_s):
                tcp = await trio.open_tcp_stream(*where)
                stream = trio.SSLStream(tcp, self._ssl, server_hostname=host, https_compatible=True)
                async with stream:
                    return await self._exchange(stream, host, target)
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise CertUnavailable(f"GET {url[:200]}: {exc or type(exc).__name__}") from None

    async def _exchange(
        self, stream: trio.SSLStream[trio.SocketStream], host: str, target: str
    ) -> tuple[int, bytes]:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET", target=target,
            headers=[("Host", host), ("User-Agent", "engine"), ("Connection", "close")],
        )  # fmt: skip
        await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self._max_bytes:
                    raise h11.ProtocolError(f"more than {self._max_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, bytes(body)


class SigningCerts:
    """SNS signing certificates' keys by URL (the few most recently used): one fetch per
    certificate, again once it has expired."""

    def __init__(self, fetcher: CertFetcher, *, clock: Callable[[], float] = time.time) -> None:
        self._fetcher = fetcher
        self._clock = clock
        self._kept: OrderedDict[str, tuple[rsa.RSAPublicKey, float]] = OrderedDict()

    async def key(self, url: str) -> rsa.RSAPublicKey:
        """The key of the certificate at ``url`` (checked by the caller: an SNS host)."""
        now = self._clock()
        kept = self._kept.get(url)
        if kept is not None and now < kept[1]:
            self._kept.move_to_end(url)
            return kept[0]
        status, pem = await self._fetcher.get(url)
        if status != 200:
            raise SignatureInvalid(f"SigningCertURL answered {status}")
        cert = sns_certificate_key(pem, now_s=now)
        # Kept until it expires, a day at most: then fetched (and checked) again.
        self._kept[url] = (cert.key, min(cert.not_after_s, now + 86_400.0))
        while len(self._kept) > _CERTS_KEPT:
            self._kept.popitem(last=False)
        return cert.key


class ProviderEventRoutes:
    """The handler of POST /v1/providers/{name}/events: decide (verify, map) in sync code,
    then act (fetch a certificate, store) in async code."""

    def __init__(
        self,
        store: ProviderEventStore,
        settings: ProviderEventSettings,
        *,
        fetcher: CertFetcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self._fetcher = fetcher or HttpsFetcher(
            ca_file=settings.ses_cert_ca_file, connect_to=settings.ses_cert_connect_to
        )
        self._certs = SigningCerts(self._fetcher, clock=clock)
        self._resend_secret = settings.resend_secret
        # Decoded once (checked at load already: engine.config).
        self._sendgrid = None
        if settings.sendgrid_public_key:
            self._sendgrid = sendgrid_key(settings.sendgrid_public_key)

    async def receive(self, req: Request) -> Reply:
        """404 for an unknown provider, 503 naming the settings an unconfigured one needs;
        401 unless the delivery is shown to be the provider's (nothing stored); else 200
        with what it held, whatever it matched (a provider retries anything else)."""
        provider = req.params["name"]
        if provider not in PROVIDERS:
            raise Fail(404, "not-found", "No such provider",
                       f"providers are {', '.join(PROVIDERS)}")  # fmt: skip
        missing = missing_settings(self._settings, provider)
        if missing:
            names = " and ".join(f"provider_events.{m}" for m in missing)
            env = ", ".join(f"ENGINE_PROVIDER_EVENTS__{m.upper()}" for m in missing)
            raise Fail(
                503, "provider-not-configured", "Provider not configured",
                f"{provider}'s delivery webhooks are not taken here: set {names} ({env})",
                headers=[(b"retry-after", b"60")],
            )  # fmt: skip
        body = await req.body(self._settings.max_body_bytes, "provider_events.max_body_bytes")
        try:
            if provider == "ses":
                return await self._ses(body)
            delivery = self._verify(provider, req, body)
        except SignatureInvalid as exc:
            log.info("provider_events.refused provider=%s reason=%s", provider, exc)
            headers = [_BASIC_CHALLENGE] if provider == "postmark" else []
            raise Fail(401, "signature-invalid", "Not the provider's delivery", str(exc),
                       headers=headers) from None  # fmt: skip
        except MalformedDelivery as exc:
            raise Fail(400, "malformed-delivery", "Malformed delivery", str(exc)) from None
        return await self._store_delivery(provider, delivery)

    def _verify(self, provider: str, req: Request, body: bytes) -> Delivery:
        """Check the delivery's signature, then map it (pure, synchronous)."""
        s, now = self._settings, self._clock()
        now_ms = int(now * 1000)
        if provider == "mailgun":  # the signature is in the body
            doc = _json(body)
            token = verify_mailgun(s.mailgun_signing_key, doc, now_s=now,
                                   tolerance_s=s.tolerance_s)  # fmt: skip
            mapped = mailgun_events(doc, now_ms=now_ms)
            return Delivery(mapped.events, mapped.ignored, nonce=token)
        if provider == "postmark":
            authorization = req.header(b"authorization")
            verify_basic(s.postmark_user, s.postmark_password,
                         authorization.decode("latin-1") if authorization else None)  # fmt: skip
            return postmark_events(body, now_ms=now_ms)
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in reversed(req.scope["headers"])  # the first of a repeated one wins
        }
        if provider == "resend":
            event_id = verify_svix(self._resend_secret, headers, body, now_s=now,
                                   tolerance_s=s.tolerance_s)  # fmt: skip
            return resend_events(body, event_id, now_ms=now_ms)
        assert self._sendgrid is not None  # configured: missing_settings said so
        verify_sendgrid(self._sendgrid, headers, body, now_s=now, tolerance_s=s.tolerance_s)
        return sendgrid_events(body, now_ms=now_ms)

    async def _ses(self, body: bytes) -> Reply:
        """SES through SNS: the topic and the certificate's URL checked before any fetch,
        then the signature; then a subscription handled or the notification's event."""
        msg = parse_sns(body)
        check_topic(msg, self._settings.ses_topic_arns)
        check_sns_url(msg.cert_url, what="SigningCertURL", pem=True)
        try:
            verify_sns(msg, await self._certs.key(msg.cert_url))
        except CertUnavailable as exc:
            log.warning("provider_events.ses.certificate_unavailable error=%s", exc)
            raise Fail(503, "certificate-unavailable", "Signing certificate unavailable",
                       str(exc), headers=[(b"retry-after", b"5")]) from None  # fmt: skip
        if msg.type == "SubscriptionConfirmation":
            return json_reply(200, ProviderEventsTaken(subscription=await self._subscribe(msg)))
        if msg.type == "UnsubscribeConfirmation":
            log.warning("provider_events.ses.unsubscribed topic=%s", msg.topic_arn)
            return json_reply(200, ProviderEventsTaken(subscription="unsubscribed"))
        return await self._store_delivery("ses", ses_events(msg, now_ms=int(self._clock() * 1000)))

    async def _subscribe(self, msg: SnsMessage) -> str:
        url = msg.subscribe_url
        check_sns_url(url, what="SubscribeURL")
        if not self._settings.ses_confirm_subscriptions:
            log.warning(
                "provider_events.ses.subscription topic=%s: open SubscribeURL to confirm it "
                "(or set provider_events.ses_confirm_subscriptions = true): %s",
                msg.topic_arn, url,
            )  # fmt: skip
            return "logged"
        try:
            status, _ = await self._fetcher.get(url)
        except CertUnavailable as exc:
            raise Fail(503, "subscription-unconfirmed", "Subscription not confirmed",
                       str(exc), headers=[(b"retry-after", b"5")]) from None  # fmt: skip
        if status != 200:
            log.warning("provider_events.ses.subscription_refused topic=%s status=%d",
                        msg.topic_arn, status)  # fmt: skip
            return "logged"
        log.info("provider_events.ses.subscription_confirmed topic=%s", msg.topic_arn)
        return "confirmed"

    async def _store_delivery(self, provider: str, delivery: Delivery) -> Reply:
        done = await self._store.record(provider, delivery.events, nonce=delivery.nonce)
        if done.replayed:
            log.info("provider_events.refused provider=%s reason=replayed token", provider)
            raise Fail(401, "signature-invalid", "Not the provider's delivery",
                       "this delivery's token was used before: a replay")  # fmt: skip
        if done.unmatched:
            # Answered 200 all the same: the provider would retry for days otherwise.
            log.info("provider_events.unmatched provider=%s events=%d", provider, done.unmatched)
        log.debug(
            "provider_events.received provider=%s stored=%d duplicates=%d ignored=%d",
            provider, done.stored, done.duplicates, delivery.ignored,
        )  # fmt: skip
        return json_reply(200, ProviderEventsTaken(
            len(delivery.events), done.stored, done.duplicates, done.unmatched,
            delivery.ignored, done.suppressed,
        ))  # fmt: skip


def _json(body: bytes) -> object:
    try:
        return _decode_json(body)
    except msgspec.DecodeError as exc:
        raise MalformedDelivery(f"not JSON: {exc}") from None
