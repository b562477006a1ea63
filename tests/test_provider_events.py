"""The providers' delivery webhooks (POST /v1/providers/{name}/events): each provider's
signature scheme as a table of good and bad deliveries (signed by fixtures.providers.events
the way the provider signs), each provider's documented event shapes mapped to ours, the
store against a real Redis, and the whole path over HTTP into a running engine: the
message's events, its record, the suppression list, a webhook receiver."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from engine.api.provider_events import ProviderEventRoutes, SigningCerts
from engine.api.router import Router
from engine.api.routes import ROUTES
from engine.config import ProviderEventSettings, load_settings
from engine.embedded import RedisServer, free_port
from engine.errors import ConfigError
from engine.ids import new_id
from engine.keys import Keys
from engine.metrics import Metrics
from engine.models import Message, ProviderEvent
from engine.provider_events import (
    MalformedDelivery,
    SignatureInvalid,
    check_sns_url,
    mailgun_events,
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
from engine.queue import (
    EventLog,
    NewJob,
    ProviderEventStore,
    Queue,
    SuppressionStore,
    open_redis,
)
from engine.transport import MemoryTransport
from engine.watch import format_event
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine
from fixtures.providers.events import (
    Mailgun,
    Postmark,
    Resend,
    SendGrid,
    Signed,
    Sns,
    SnsEndpoint,
    sns_endpoint,
)
from fixtures.receiver import Receiver, webhook_receiver

NOW = time.time()
JOB = new_id()
TOLERANCE = 300.0


def _headers(signed: Signed) -> dict[str, str]:
    return {k.lower(): v for k, v in signed.headers.items()}


# -- verification: each scheme, good and bad -----------------------------------------------

RESEND = Resend()
OTHER_RESEND = Resend()


def _tampered(s: Signed) -> Signed:
    return replace(s, body=s.body.replace(b"Hello", b"Hullo"))


def _white_labelled(s: Signed) -> Signed:
    return replace(s, headers={k.replace("svix-", "webhook-"): v for k, v in s.headers.items()})


@pytest.mark.parametrize(
    ("signed", "error"),
    [
        (RESEND.sign({"type": "email.sent", "data": {"subject": "Hello"}}), None),
        # Svix's white-labelled names (Standard Webhooks) are the same scheme.
        (_white_labelled(RESEND.sign({"data": {"subject": "Hello"}})), None),
        (OTHER_RESEND.sign({"data": {"subject": "Hello"}}), "no svix-signature matches"),
        (_tampered(RESEND.sign({"data": {"subject": "Hello"}})), "no svix-signature matches"),
        (RESEND.sign({"data": {}}, at=int(NOW) - 301), "off this machine's clock"),
        (RESEND.sign({"data": {}}, at=int(NOW) + 301), "off this machine's clock"),
        (replace(RESEND.sign({}), headers={}), "no svix-id"),
    ],
)
def test_resend_deliveries_are_svix_signed(signed: Signed, error: str | None) -> None:
    if error is None:
        assert verify_svix(
            RESEND.secret, _headers(signed), signed.body, now_s=NOW, tolerance_s=TOLERANCE
        ) == signed.headers.get("svix-id", signed.headers.get("webhook-id"))
    else:
        with pytest.raises(SignatureInvalid, match=error):
            verify_svix(
                RESEND.secret, _headers(signed), signed.body, now_s=NOW, tolerance_s=TOLERANCE
            )


SENDGRID = SendGrid()


@pytest.mark.parametrize(
    ("signed", "error"),
    [
        (SENDGRID.sign([{"event": "delivered", "email": "Hello"}]), None),
        (SendGrid().sign([{"event": "delivered"}]), "does not match"),
        (_tampered(SENDGRID.sign([{"email": "Hello"}])), "does not match"),
        (SENDGRID.sign([], at=int(NOW) - 1000), "off this machine's clock"),
        (replace(SENDGRID.sign([]), headers={}), "Signed Event Webhook"),
        (
            replace(
                s := SENDGRID.sign([]),
                headers={**s.headers, "x-twilio-email-event-webhook-signature": "%%"},
            ),
            "not base64",
        ),
    ],
)
def test_sendgrid_deliveries_are_ecdsa_signed(signed: Signed, error: str | None) -> None:
    key = sendgrid_key(SENDGRID.public_key)
    if error is None:
        verify_sendgrid(key, _headers(signed), signed.body, now_s=NOW, tolerance_s=TOLERANCE)
    else:
        with pytest.raises(SignatureInvalid, match=error):
            verify_sendgrid(key, _headers(signed), signed.body, now_s=NOW, tolerance_s=TOLERANCE)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("authorization", "error"),
    [
        (_basic("pm", "s3cret"), None),
        (_basic("pm", "wrong"), "wrong Basic credentials"),
        (_basic("other", "s3cret"), "wrong Basic credentials"),
        ("Basic " + base64.b64encode(b"pms3cret").decode(), "wrong Basic credentials"),
        ("Bearer s3cret", "no Basic credentials"),
        (None, "no Basic credentials"),
        ("Basic %%%", "not base64"),
    ],
)
def test_postmark_deliveries_carry_basic_credentials(
    authorization: str | None, error: str | None
) -> None:
    if error is None:
        verify_basic("pm", "s3cret", authorization)
    else:
        with pytest.raises(SignatureInvalid, match=error):
            verify_basic("pm", "s3cret", authorization)


MAILGUN = Mailgun()


@pytest.mark.parametrize(
    ("signed", "error"),
    [
        (MAILGUN.sign({"event": "delivered"}), None),
        (MAILGUN.sign({"event": "delivered"}, key="key-other"), "does not match"),
        (MAILGUN.sign({}, at=int(NOW) - 301), "off this machine's clock"),
        (Signed("mailgun", {}, b'{"event-data": {}}'), "no signature object"),
        (Signed("mailgun", {}, b'{"signature": {"timestamp": "1"}}'), "lacks"),
    ],
)
def test_mailgun_deliveries_carry_an_hmac_of_timestamp_and_token(
    signed: Signed, error: str | None
) -> None:
    doc = json.loads(signed.body)
    if error is None:
        token = verify_mailgun(MAILGUN.signing_key, doc, now_s=NOW, tolerance_s=TOLERANCE)
        assert token == doc["signature"]["token"]
    else:
        with pytest.raises(SignatureInvalid, match=error):
            verify_mailgun(MAILGUN.signing_key, doc, now_s=NOW, tolerance_s=TOLERANCE)


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem", True),
        ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem", True),
        ("https://SNS.eu-west-1.AMAZONAWS.com/SimpleNotificationService-abc.pem", True),
        ("https://sns.us-east-1.amazonaws.com:443/x.pem", True),
        ("http://sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com.evil.example/x.pem", False),
        ("https://evil.example/sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com@evil.example/x.pem", False),
        ("https://user@sns.us-east-1.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com:8443/x.pem", False),
        ("https://s3.amazonaws.com/x.pem", False),
        ("https://sns.us-east-1.amazonaws.com/x.txt", False),
        ("https://[::1/x.pem", False),
    ],
)
def test_sns_certificates_come_from_sns_hosts_only(url: str, ok: bool) -> None:
    if ok:
        check_sns_url(url, what="SigningCertURL", pem=True)
    else:
        with pytest.raises(SignatureInvalid):
            check_sns_url(url, what="SigningCertURL", pem=True)


SNS = Sns()
OTHER_SNS = Sns()


@pytest.mark.parametrize(
    ("signed", "error"),
    [
        (SNS.notification({"eventType": "Delivery"}, version="1"), None),
        (SNS.notification({"eventType": "Delivery"}, version="2"), None),
        (SNS.subscription(), None),
        (SNS.notification({}, key=OTHER_SNS.key), "does not match"),
        (
            Signed(
                "ses",
                {},
                SNS.notification({"eventType": "Delivery"}).body.replace(b"Delivery", b"Bounce"),
            ),
            "does not match",
        ),
        (
            Signed(
                "ses",
                {},
                SNS.notification({}).body.replace(
                    b'"SignatureVersion":"2"', b'"SignatureVersion":"3"'
                ),
            ),
            "neither 1 nor 2",
        ),
    ],
)
def test_sns_messages_are_signed_by_the_certificate(signed: Signed, error: str | None) -> None:
    msg = parse_sns(signed.body)
    key = sns_certificate_key(SNS.cert_pem, now_s=NOW).key
    if error is None:
        verify_sns(msg, key)
    else:
        with pytest.raises(SignatureInvalid, match=error):
            verify_sns(msg, key)


def test_sns_refuses_raw_deliveries_and_expired_certificates() -> None:
    with pytest.raises(SignatureInvalid, match="raw message delivery"):
        parse_sns(b'{"eventType": "Bounce"}')
    with pytest.raises(SignatureInvalid, match="not valid now"):
        sns_certificate_key(SNS.cert_pem, now_s=NOW + 90 * 86400)
    with pytest.raises(SignatureInvalid, match="PEM"):
        sns_certificate_key(b"<html>", now_s=NOW)


# -- mapping: each provider's documented shapes ---------------------------------------------


@dataclass(frozen=True)
class Want:
    type: str
    recipient: str
    bounce: str | None = None
    suppressed: bool = False
    job_id: str = JOB


def _check(events: list[Any], *wanted: Want) -> None:
    got = [Want(e.type, e.recipient, e.bounce, bool(e.suppress_reason), e.job_id) for e in events]
    assert got == list(wanted)


def test_resend_events_map_by_type_with_their_bounce() -> None:
    r = Resend()

    def mapped(doc: dict[str, Any]) -> list[Any]:
        return resend_events(json.dumps(doc).encode(), "msg_1", now_ms=0).events

    _check(
        mapped(r.event("delivered", JOB, "ann@example.com")), Want("delivered", "ann@example.com")
    )
    hard = r.event(
        "bounced",
        JOB,
        "Ann <ann@example.com>",
        bounce={
            "message": "The recipient's email address is on the suppression list because it has a "
            "recent history of producing hard bounces.",
            "subType": "Suppressed",
            "type": "Permanent",
        },
    )
    _check(mapped(hard), Want("bounced", "ann@example.com", "invalid-recipient", True))
    soft = r.event(
        "bounced",
        JOB,
        "ann@example.com",
        bounce={"message": "mailbox full", "subType": "MailboxFull", "type": "Transient"},
    )
    _check(mapped(soft), Want("bounced", "ann@example.com", "mailbox-full"))
    _check(
        mapped(r.event("complained", JOB, "ann@example.com")),
        Want("complained", "ann@example.com", None, True),
    )
    _check(
        mapped(r.event("delivery_delayed", JOB, "ann@example.com")),
        Want("delayed", "ann@example.com", "temporary"),
    )
    # The tags as they were sent ([{name, value}]) are read too; no job id: unmatched.
    listed = r.event("delivered", "", "ann@example.com")
    listed["data"]["tags"] = [{"name": "job_id", "value": JOB}]
    _check(mapped(listed), Want("delivered", "ann@example.com"))
    _check(
        mapped(r.event("delivered", "not-an-id", "a@x.org")),
        Want("delivered", "a@x.org", job_id=""),
    )
    assert (
        resend_events(json.dumps(r.event("opened", JOB, "a@x.org")).encode(), "m", now_ms=0).ignored
        == 1
    )
    with pytest.raises(MalformedDelivery):
        resend_events(b"{nope", "m", now_ms=0)
    (event,) = mapped(hard)
    assert event.event_id == "msg_1" and event.provider == "resend" and event.hard
    assert event.suppress_reason.startswith("resend hard bounce: Permanent Suppressed")


def test_sendgrid_batches_map_each_event() -> None:
    sg = SendGrid()
    batch = [
        sg.event("processed", JOB, "a@example.com"),
        sg.event("delivered", JOB, "a@example.com", response="250 OK"),
        sg.event(
            "bounce",
            JOB,
            "b@example.com",
            type="bounce",
            status="5.1.1",
            reason="550 5.1.1 The email account that you tried to reach does not exist",
            bounce_classification="Invalid Address",
        ),
        sg.event(
            "bounce",
            JOB,
            "c@example.com",
            type="blocked",
            status="5.7.1",
            reason="550 5.7.1 Message rejected due to local policy",
            bounce_classification="Reputation",
        ),
        sg.event("dropped", JOB, "d@example.com", reason="Bounced Address", status="5.0.0"),
        sg.event(
            "deferred",
            JOB,
            "e@example.com",
            response="451 4.7.650 temporarily rate limited",
            attempt="2",
        ),
        sg.event("spamreport", JOB, "f@example.com"),
        sg.event("open", JOB, "a@example.com"),
        "not an event",
    ]
    got = sendgrid_events(json.dumps(batch).encode(), now_ms=0)
    assert got.ignored == 3
    _check(
        got.events,
        Want("delivered", "a@example.com"),
        Want("bounced", "b@example.com", "invalid-recipient", True),
        Want("bounced", "c@example.com", "policy-block"),
        Want("bounced", "d@example.com", "invalid-recipient", True),
        Want("delayed", "e@example.com", "rate-limited"),
        Want("complained", "f@example.com", None, True),
    )
    assert got.events[0].message_id == "14c5d75ce93.dfd.64b469"
    assert got.events[0].event_id == batch[1]["sg_event_id"]  # type: ignore[index]
    with pytest.raises(MalformedDelivery, match="array"):
        sendgrid_events(b"{}", now_ms=0)


def test_postmark_records_map_by_record_and_bounce_type() -> None:
    pm = Postmark()

    def mapped(doc: dict[str, Any]) -> Any:
        return postmark_events(json.dumps(doc).encode(), now_ms=0)

    _check(mapped(pm.delivery(JOB, "ann@example.com")).events, Want("delivered", "ann@example.com"))
    _check(
        mapped(pm.bounce(JOB, "ann@example.com")).events,
        Want("bounced", "ann@example.com", "invalid-recipient", True),
    )
    _check(
        mapped(pm.bounce(JOB, "ann@example.com", type_="Transient", details="")).events,
        Want("delayed", "ann@example.com", "temporary"),
    )
    _check(
        mapped(
            pm.bounce(
                JOB, "ann@example.com", type_="SoftBounce", details="smtp;452 4.2.2 mailbox full"
            )
        ).events,
        Want("bounced", "ann@example.com", "mailbox-full"),
    )
    _check(
        mapped(
            pm.bounce(
                JOB,
                "ann@example.com",
                type_="Blocked",
                details="smtp;554 5.7.1 blocked using spamhaus",
            )
        ).events,
        Want("bounced", "ann@example.com", "policy-block"),
    )
    _check(
        mapped(pm.complaint(JOB, "ann@example.com")).events,
        Want("complained", "ann@example.com", None, True),
    )
    assert mapped(pm.bounce(JOB, "ann@example.com", type_="AutoResponder")).ignored == 1
    assert mapped({"RecordType": "Open", "Metadata": {"job_id": JOB}}).ignored == 1
    bounce = pm.bounce(JOB, "ann@example.com")
    (event,) = mapped(bounce).events
    assert event.event_id == f"bounce:{bounce['ID']}"
    assert event.at_ms == 1767634090273  # 2026-01-05T13:28:10.2735393-04:00


def test_mailgun_events_map_by_event_and_severity() -> None:
    mg = Mailgun()

    def mapped(data: dict[str, Any]) -> Any:
        return mailgun_events({"event-data": data}, now_ms=0)

    _check(
        mapped(mg.event("delivered", JOB, "ann@example.com")).events,
        Want("delivered", "ann@example.com"),
    )
    status = {
        "code": 550,
        "enhanced-code": "5.1.1",
        "attempt-no": 1,
        "message": "The email account that you tried to reach does not exist.",
    }
    hard = mg.event(
        "failed",
        JOB,
        "ann@example.com",
        severity="permanent",
        reason="bounce",
        **{"delivery-status": status},
    )
    _check(mapped(hard).events, Want("bounced", "ann@example.com", "invalid-recipient", True))
    suppressed = mg.event(
        "failed",
        JOB,
        "ann@example.com",
        severity="permanent",
        reason="suppress-bounce",
        **{
            "delivery-status": {
                "code": 605,
                "message": "",
                "description": "Not delivering to previously bounced address",
            }
        },
    )
    _check(mapped(suppressed).events, Want("bounced", "ann@example.com", "invalid-recipient", True))
    temporary = mg.event(
        "failed",
        JOB,
        "ann@example.com",
        severity="temporary",
        **{"delivery-status": {"code": 452, "enhanced-code": "4.2.2", "message": "Mailbox full"}},
    )
    _check(mapped(temporary).events, Want("delayed", "ann@example.com", "mailbox-full"))
    _check(
        mapped(mg.event("complained", JOB, "ann@example.com")).events,
        Want("complained", "ann@example.com", None, True),
    )
    assert mapped(mg.event("opened", JOB, "ann@example.com")).ignored == 1
    with pytest.raises(MalformedDelivery):
        mailgun_events({"signature": {}}, now_ms=0)


def test_ses_events_map_one_event_per_recipient() -> None:
    sns = SNS

    def mapped(doc: dict[str, Any]) -> Any:
        return ses_events(parse_sns(sns.notification(doc).body), now_ms=0)

    _check(
        mapped(sns.ses_event("Delivery", JOB, "ann@example.com")).events,
        Want("delivered", "ann@example.com"),
    )
    _check(
        mapped(sns.ses_event("Bounce", JOB, "ann@example.com")).events,
        Want("bounced", "ann@example.com", "invalid-recipient", True),
    )
    policy = sns.ses_event(
        "Bounce",
        JOB,
        "ann@example.com",
        bouncedRecipients=[
            {
                "emailAddress": "ann@example.com",
                "status": "5.7.1",
                "diagnosticCode": "smtp; 550 5.7.1 Message rejected: blocked using Spamhaus",
            },
            {"emailAddress": "bob@example.com"},
        ],
    )
    _check(
        mapped(policy).events,
        Want("bounced", "ann@example.com", "policy-block"),
        Want("bounced", "bob@example.com", "invalid-recipient", True),
    )
    _check(
        mapped(sns.ses_event("Complaint", JOB, "ann@example.com")).events,
        Want("complained", "ann@example.com", None, True),
    )
    _check(
        mapped(sns.ses_event("DeliveryDelay", JOB, "ann@example.com")).events,
        Want("delayed", "ann@example.com", "dns-routing"),
    )
    assert mapped(sns.ses_event("Send", JOB, "ann@example.com")).ignored == 1
    # Identity notifications carry no tags: no job of ours.
    identity = sns.ses_event("Bounce", JOB, "ann@example.com")
    identity["notificationType"] = identity.pop("eventType")
    del identity["mail"]["tags"]
    _check(
        mapped(identity).events,
        Want("bounced", "ann@example.com", "invalid-recipient", True, job_id=""),
    )


# -- settings --------------------------------------------------------------------------------


def test_provider_settings_are_checked_and_their_secrets_redacted() -> None:
    secret = Resend().secret
    settings = load_settings(
        environ={
            "ENGINE_PROVIDER_EVENTS__RESEND_SECRET": secret,
            "ENGINE_PROVIDER_EVENTS__MAILGUN_SIGNING_KEY": "key-mailgun-secret",
            "ENGINE_PROVIDER_EVENTS__POSTMARK_USER": "pm",
            "ENGINE_PROVIDER_EVENTS__POSTMARK_PASSWORD": "pm-secret",
            "ENGINE_PROVIDER_EVENTS__SENDGRID_PUBLIC_KEY": SENDGRID.public_key,
        }
    )
    shown = repr(settings)
    for hidden in (secret, "key-mailgun-secret", "pm-secret"):
        assert hidden not in shown
    assert SENDGRID.public_key in shown  # a public key is no secret
    bad = [
        {"resend_secret": "not-a-secret"},
        {"sendgrid_public_key": "AAAA"},
        {"postmark_user": "only-the-user"},
        {"ses_topic_arns": ["arn:aws:sqs:us-east-1:123:queue"]},
        {"ses_cert_connect_to": "nowhere"},
        {"tolerance_s": 0},
        {"ses_cert_ca_file": "/nonexistent/ca.pem"},
    ]
    for given in bad:
        with pytest.raises(ConfigError, match="provider_events"):
            load_settings(environ={}, overrides={"provider_events": given})


# -- the route, with an in-memory certificate fetcher -----------------------------------------


class MemoryFetcher:
    """Answers from a dict of URL -> (status, body); records what was asked."""

    def __init__(self, pages: dict[str, tuple[int, bytes]]) -> None:
        self.pages = pages
        self.asked: list[str] = []

    async def get(self, url: str) -> tuple[int, bytes]:
        self.asked.append(url)
        return self.pages.get(url, (404, b""))


def _app(settings: ProviderEventSettings, fetcher: MemoryFetcher) -> httpx.AsyncClient:
    routes = ProviderEventRoutes(None, settings, fetcher=fetcher)  # type: ignore[arg-type]
    route = next(r for r in ROUTES if r.op == "provider_events")
    app = Router([route], {"provider_events": routes.receive}, Metrics().ingest)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://engine")


async def test_unknown_and_unconfigured_providers_say_what_to_set() -> None:
    async with _app(ProviderEventSettings(), MemoryFetcher({})) as client:
        r = await client.post("/v1/providers/sparkpost/events", content=b"{}")
        assert r.status_code == 404 and "resend, sendgrid, ses, postmark, mailgun" in r.text
        r = await client.post("/v1/providers/postmark/events", content=b"{}")
        assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
        assert "provider_events.postmark_user and provider_events.postmark_password" in r.text
        assert "ENGINE_PROVIDER_EVENTS__POSTMARK_USER" in r.text
        r = await client.post("/v1/providers/ses/events", content=b"{}")
        assert r.status_code == 503 and "provider_events.ses_topic_arns" in r.json()["detail"]


async def test_an_sns_subscription_is_logged_unless_confirming_is_on() -> None:
    sns = Sns()
    fetcher = MemoryFetcher({sns.cert_url: (200, sns.cert_pem)})
    settings = ProviderEventSettings(ses_topic_arns=[sns.topic_arn])
    async with _app(settings, fetcher) as client:
        signed = sns.subscription()
        r = await client.post(signed.path, content=signed.body, headers=signed.headers)
        assert r.status_code == 200 and r.json() == {"subscription": "logged"}
        assert fetcher.asked == [sns.cert_url]  # the certificate only, not the SubscribeURL
        # A topic not listed is refused before anything is fetched.
        other = Sns(topic_arn="arn:aws:sns:us-east-1:999999999999:theirs").subscription()
        r = await client.post(other.path, content=other.body, headers=other.headers)
        assert r.status_code == 401 and "ses_topic_arns" in r.json()["detail"]
        assert fetcher.asked == [sns.cert_url]


async def test_signing_certificates_are_fetched_once_and_kept() -> None:
    sns = Sns()
    fetcher = MemoryFetcher({sns.cert_url: (200, sns.cert_pem)})
    now = [NOW]
    certs = SigningCerts(fetcher, clock=lambda: now[0])
    first = await certs.key(sns.cert_url)
    assert await certs.key(sns.cert_url) is first and len(fetcher.asked) == 1
    now[0] += 2 * 86400  # a day on, fetched (and checked) again
    await certs.key(sns.cert_url)
    assert len(fetcher.asked) == 2
    with pytest.raises(SignatureInvalid, match="answered 404"):
        await certs.key(sns.cert_url.replace(".pem", "-gone.pem"))


# -- the store, against a real Redis ---------------------------------------------------------


def _job(tenant: str, *to: str) -> NewJob:
    msg = Message("e@localhost", list(to), [], [], "Hi", "body", None, [], [], [])
    return NewJob(new_id(), msgspec.msgpack.encode(msg), tenant=tenant, tags="vip")


async def test_the_store_records_once_keeps_the_state_and_suppresses_the_jobs_recipients(
    queue: Queue,
) -> None:
    job = _job("acme", "Ann <ann@example.com>", "bob@example.com")
    await queue.enqueue([job])
    store = ProviderEventStore(queue.client, queue.keys)

    def event(eid: str, kind: Any, rcpt: str, reason: str = "", job_id: str = job.id) -> Any:
        return ProviderEvent(
            "ses",
            eid,
            kind,
            job_id,
            rcpt,
            "ses-1",
            1_700_000_000_000,
            "smtp; 550 5.1.1 user unknown",
            "invalid-recipient",
            True,
            reason,
        )

    done = await store.record(
        "ses",
        [
            event("e1", "bounced", "ANN@example.com", "ses hard bounce"),
            event("e2", "complained", "eve@example.com", "ses spam complaint"),  # not a recipient
            event("e3", "delivered", "bob@example.com", job_id=new_id()),  # no such job
            event("e4", "delivered", "bob@example.com", job_id=""),
        ],
    )
    assert (done.stored, done.duplicates, done.unmatched, done.suppressed) == (2, 0, 2, 1)
    again = await store.record("ses", [event("e1", "bounced", "ann@example.com", "x")])
    assert (again.stored, again.duplicates) == (0, 1)

    rec = await queue.get(job.id)
    assert rec is not None and rec.state == "queued"  # never moved by a provider's event
    assert (rec.provider_state, rec.provider_id) == ("complained", "ses-1")  # in its view too
    fields = await queue.client.hmget(queue.keys.job(job.id), ["provider_state", "provider_id"])
    assert list(fields) == [b"complained", b"ses-1"]
    suppressions = SuppressionStore(queue.client, queue.keys)
    entry = await suppressions.get("acme", "ann@example.com")
    assert entry is not None and (entry.reason, entry.source, entry.bounce) == (
        "ses hard bounce",
        job.id,
        "invalid-recipient",
    )
    assert await suppressions.get("acme", "eve@example.com") is None
    events = [
        e for e in (await EventLog(queue.client, queue.keys).range()).events if e.id == job.id
    ]
    assert [(e.type, e.state, e.recipients, e.tenant, e.tags, e.bounce, e.at) for e in events] == [
        ("queued", "queued", [], "acme", ["vip"], None, events[0].at),
        (
            "bounced",
            "queued",
            ["ANN@example.com"],
            "acme",
            ["vip"],
            "invalid-recipient",
            1_700_000_000_000,
        ),
        (
            "complained",
            "queued",
            ["eve@example.com"],
            "acme",
            ["vip"],
            "invalid-recipient",
            1_700_000_000_000,
        ),
    ]
    assert "bounced" in format_event(events[1]) and "recipient=ANN@example.com" in format_event(
        events[1]
    )
    # A one-time token: the second delivery with it writes nothing.
    assert not (await store.record("mailgun", [], nonce="t1")).replayed
    assert (
        await store.record("mailgun", [event("e9", "delivered", "bob@example.com")], nonce="t1")
    ).replayed


# -- end to end: signed deliveries over HTTP into a running engine ---------------------------


@dataclass
class Env:
    client: httpx.AsyncClient
    receiver: Receiver
    sns_host: SnsEndpoint
    resend: Resend
    sendgrid: SendGrid
    postmark: Postmark
    mailgun: Mailgun
    sns: Sns
    redis_url: str

    async def post(self, signed: Signed) -> httpx.Response:
        return await self.client.post(signed.path, content=signed.body, headers=signed.headers)


@pytest.fixture
async def env(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[Env]:
    async with open_redis(redis_server.url) as r:
        await r.flushall()
    resend, sendgrid, postmark, mailgun, sns = Resend(), SendGrid(), Postmark(), Mailgun(), Sns()
    bind = f"127.0.0.1:{free_port()}"
    async with sns_endpoint(sns, tmp_path) as host, webhook_receiver() as receiver:
        providers = {
            "resend_secret": resend.secret,
            "sendgrid_public_key": sendgrid.public_key,
            "postmark_user": postmark.user,
            "postmark_password": postmark.password,
            "mailgun_signing_key": mailgun.signing_key,
            "ses_topic_arns": [sns.topic_arn],
            "ses_confirm_subscriptions": True,
            "ses_cert_ca_file": host.ca_file,
            "ses_cert_connect_to": host.connect_to,
        }
        settings = load_settings(
            environ={},
            overrides={
                "http": {"bind": bind},
                "provider_events": providers,
                "webhooks": {"allow": ["127.0.0.1/32"], "first_retry_s": 0.2},
            },
        )
        async with (
            inprocess_engine(settings, redis_server.url, MemoryTransport()),
            httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
        ):
            yield Env(
                client, receiver, host, resend, sendgrid, postmark, mailgun, sns, redis_server.url
            )


async def _until(what: str, check: Callable[[], Any], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.02)


async def _sent(env: Env, to: str, tenant: str = "default") -> str:
    r = await env.client.post(
        "/v1/messages", json={"to": to, "subject": "Hi", "text": "Hello", "tenant": tenant}
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]

    async def sent() -> bool:
        return (await env.client.get(f"/v1/messages/{job_id}")).json()["state"] == "sent"

    await _until("sent", sent)
    return job_id


async def _events(env: Env, job_id: str) -> list[dict[str, Any]]:
    r = await env.client.get(f"/v1/messages/{job_id}/events")
    assert r.status_code == 200
    events: list[dict[str, Any]] = r.json()
    return events


def _delivered(env: Env, provider: str, job_id: str, to: str) -> Signed:
    if provider == "resend":
        return env.resend.sign(env.resend.event("delivered", job_id, to))
    if provider == "sendgrid":
        return env.sendgrid.sign([env.sendgrid.event("delivered", job_id, to, response="250 OK")])
    if provider == "postmark":
        return env.postmark.sign(env.postmark.delivery(job_id, to))
    if provider == "mailgun":
        return env.mailgun.sign(env.mailgun.event("delivered", job_id, to))
    return env.sns.notification(env.sns.ses_event("Delivery", job_id, to))


def _bad(env: Env, provider: str, job_id: str, to: str) -> Signed:
    """A delivery of ``provider``'s that is not shown to be theirs."""
    if provider == "resend":
        return Resend().sign(env.resend.event("delivered", job_id, to))
    if provider == "sendgrid":
        return SendGrid().sign([env.sendgrid.event("delivered", job_id, to)])
    if provider == "postmark":
        return env.postmark.sign(env.postmark.delivery(job_id, to), password="guess")
    if provider == "mailgun":
        return env.mailgun.sign(env.mailgun.event("delivered", job_id, to), key="key-guess")
    return env.sns.notification(env.sns.ses_event("Delivery", job_id, to), key=Sns().key)


PROVIDER_NAMES = ["resend", "sendgrid", "postmark", "mailgun", "ses"]


@pytest.mark.parametrize("provider", PROVIDER_NAMES)
async def test_each_providers_signed_delivery_reaches_the_message(env: Env, provider: str) -> None:
    job_id = await _sent(env, "ann@example.com")
    bad = await env.post(_bad(env, provider, job_id, "ann@example.com"))
    assert bad.status_code == 401 and bad.headers["content-type"] == "application/problem+json"
    assert [e["type"] for e in await _events(env, job_id)] == ["queued", "processing", "sent"]

    r = await env.post(_delivered(env, provider, job_id, "ann@example.com"))
    assert r.status_code == 200, r.text
    assert r.json() == {"received": 1, "stored": 1}
    last = (await _events(env, job_id))[-1]
    assert (last["type"], last["state"], last["recipients"]) == (
        "delivered",
        "sent",
        ["ann@example.com"],
    )
    status = (await env.client.get(f"/v1/messages/{job_id}")).json()
    assert status["state"] == "sent"
    async with open_redis(env.redis_url) as r:
        marked = await r.hmget(Keys().job(job_id), ["provider_state", "provider_at"])
    assert marked[0] == b"delivered" and int(marked[1] or 0) > 0


async def test_a_retried_event_is_one_event(env: Env) -> None:
    job_id = await _sent(env, "ann@example.com")
    doc = env.resend.event("delivered", job_id, "ann@example.com")
    first = await env.post(env.resend.sign(doc, msg_id="msg_same"))
    again = await env.post(env.resend.sign(doc, msg_id="msg_same"))  # re-signed, as Svix does
    assert first.json()["stored"] == 1 and again.json() == {"received": 1, "duplicates": 1}
    types = [e["type"] for e in await _events(env, job_id)]
    assert types.count("delivered") == 1
    # Mailgun's token is used once: the same signed delivery again is a replay.
    signed = env.mailgun.sign(env.mailgun.event("delivered", job_id, "ann@example.com"))
    assert (await env.post(signed)).status_code == 200
    replay = await env.post(signed)
    assert replay.status_code == 401 and "replay" in replay.json()["detail"]


async def test_hard_bounces_and_complaints_suppress_and_reach_webhooks(env: Env) -> None:
    hook = await env.client.post(
        "/v1/webhooks", json={"url": env.receiver.url, "events": ["bounced", "complained"]}
    )
    assert hook.status_code == 201, hook.text
    bounced_to, complained_to = "gone@example.com", "angry@example.com"
    bounced = await _sent(env, bounced_to)
    complained = await _sent(env, complained_to)
    r = await env.post(env.sns.notification(env.sns.ses_event("Bounce", bounced, bounced_to)))
    assert r.json() == {"received": 1, "stored": 1, "suppressed": 1}
    r = await env.post(env.postmark.sign(env.postmark.complaint(complained, complained_to)))
    assert r.json() == {"received": 1, "stored": 1, "suppressed": 1}

    entry = (await env.client.get(f"/v1/suppressions/{bounced_to}")).json()
    assert entry["source"] == bounced and entry["bounce"] == "invalid-recipient"
    assert entry["reason"].startswith("ses hard bounce: Permanent General")
    entry = (await env.client.get(f"/v1/suppressions/{complained_to}")).json()
    assert entry["source"] == complained and entry["reason"].startswith("postmark spam complaint")
    last = (await _events(env, bounced))[-1]
    assert (last["type"], last["bounce"], last["error"]) == (
        "bounced",
        "invalid-recipient",
        "Permanent General: smtp; 550 5.1.1 user unknown",
    )
    # A soft bounce (a delay) suppresses nothing.
    r = await env.post(
        env.sendgrid.sign(
            [
                env.sendgrid.event(
                    "deferred", bounced, bounced_to, response="421 4.7.0 try again later"
                )
            ]
        )
    )
    assert r.json() == {"received": 1, "stored": 1}

    async def delivered() -> bool:
        return len(env.receiver.requests) >= 2

    await _until("the webhooks", delivered)
    got = sorted(
        (json.loads(q.body)["type"], json.loads(q.body)["data"]["id"])
        for q in env.receiver.requests
    )
    assert got == sorted([("message.bounced", bounced), ("message.complained", complained)])
    # The next message to a suppressed address is not sent.
    r = await env.client.post("/v1/messages", json={"to": bounced_to, "subject": "Hi", "text": "x"})
    assert r.status_code == 202
    assert (await env.client.get(f"/v1/messages/{r.json()['id']}")).json()["state"] == "suppressed"


async def test_unknown_messages_are_taken_and_counted(env: Env) -> None:
    r = await env.post(env.resend.sign(env.resend.event("delivered", new_id(), "a@example.com")))
    assert r.status_code == 200 and r.json() == {"received": 1, "unmatched": 1}
    r = await env.post(env.resend.sign(env.resend.event("opened", new_id(), "a@example.com")))
    assert r.json() == {"ignored": 1}


async def test_sns_certificates_are_fetched_from_sns_hosts_only(env: Env) -> None:
    job_id = await _sent(env, "ann@example.com")
    doc = env.sns.ses_event("Delivery", job_id, "ann@example.com")
    for url in (
        "https://evil.example/SimpleNotificationService-x.pem",
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-x.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/x.pem",
    ):
        r = await env.post(env.sns.notification(doc, cert_url=url))
        assert r.status_code == 401 and "sns.<region>.amazonaws.com" in r.json()["detail"]
    # Refused before any fetch: the stand-in for every host got no request at all.
    assert env.sns_host.requests == []
    assert (await env.post(env.sns.notification(doc, version="1"))).json()["stored"] == 1
    assert env.sns_host.requests == [env.sns.cert_path]


async def test_an_sns_subscription_is_confirmed_at_its_sns_url(env: Env) -> None:
    r = await env.post(env.sns.subscription())
    assert r.status_code == 200 and r.json() == {"subscription": "confirmed"}
    assert env.sns_host.requests[0] == env.sns.cert_path
    assert env.sns_host.requests[1].startswith("/?Action=ConfirmSubscription&TopicArn=")
    # A SubscribeURL elsewhere is never visited.
    evil = env.sns.subscription(subscribe_url="https://evil.example/?Action=ConfirmSubscription")
    r = await env.post(evil)
    assert r.status_code == 401 and len(env.sns_host.requests) == 2
