"""The HTTP transports (engine.transport.providers over engine.transport.http1) against the
provider emulators (fixtures/providers) over real HTTP on loopback: what each provider
receives for a mail (addresses, bodies, headers, tags, the job id, attachment bytes),
how every kind of answer and failure becomes an outcome, idempotent retries through
Resend, URL parsing and redaction; and the HTTP client's own edges against scripted
servers (a kept connection closed under a request, chunked and oversized answers,
garbage, cancellation)."""

from __future__ import annotations

import base64
import dataclasses
import email.policy
import hashlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import getaddresses
from functools import partial
from typing import Any

import msgspec
import pytest
import trio
import trustme

from engine.attachments import AttachmentRef
from engine.config import ProviderSettings, redact_url
from engine.embedded import free_port
from engine.errors import (
    ConfigError,
    DeliveryUncertain,
    PermanentFailure,
    TemporaryFailure,
    TransportUnavailable,
)
from engine.ids import new_id
from engine.models import Message
from engine.transport import OutgoingMail, SendResult, attachment_body, compose
from engine.transport import providers as providers_face
from engine.transport.http1 import Http1Pool, HttpFailure, Response, make_ssl_context
from engine.transport.providers import ProviderTransport, ProviderUrl, transport_for
from engine.transport.providers.base import outcome_of, retry_after_s
from engine.transport.providers.resend import Resend
from fixtures.providers import running
from fixtures.providers.base import Emulator, StoredEmail
from fixtures.providers.mailgun import FormFile, MailgunEmulator, parse_form
from fixtures.providers.postmark import PostmarkEmulator
from fixtures.providers.resend import ResendEmulator
from fixtures.providers.sendgrid import SendGridEmulator
from fixtures.providers.ses import SesEmulator

PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(200)) * 3
PDF_REF = AttachmentRef(hashlib.sha256(PDF).digest(), len(PDF), "report.pdf", "application/pdf")
PNG_REF = AttachmentRef(
    hashlib.sha256(PNG).digest(), len(PNG), "logo.png", "image/png", "logo@acme", inline=True
)
PARTS = {PDF_REF.sha256: attachment_body(PDF), PNG_REF.sha256: attachment_body(PNG)}
FAST = ProviderSettings(request_timeout_s=0.5, connect_timeout_s=2.0)


def message(**change: Any) -> Message:
    fields: dict[str, Any] = {
        "sender": "Acme <noreply@acme.test>",
        "to": ["Ann <ann@example.com>"],
        "cc": [],
        "bcc": [],
        "subject": "Hello",
        "text": "Hi Ann",
        "html": None,
        "headers": [],
        "reply_to": [],
        "tags": [],
    }
    fields.update(change)
    return Message(**fields)


FULL = message(
    to=["Ann <ann@example.com>", '"Doe, John" <john@example.com>'],
    cc=["bob@example.com"],
    bcc=["eve@example.com"],
    reply_to=["help@acme.test"],
    text="Hi Ann,\nyour report is attached.",
    html='<p>Hi Ann,</p><img src="cid:logo@acme">',
    headers=[("X-Campaign", "spring")],
    tags=["order", "welcome mail"],
    attachments=[PDF_REF, PNG_REF],
)


def mail_of(msg: Message, job_id: str | None = None) -> OutgoingMail:
    return compose(
        job_id or new_id(), msg, message_id_domain="engine.test", now=1.7e9, attachments=PARTS
    )


async def send(transport: ProviderTransport, *mails: OutgoingMail) -> list[Any]:
    async with aclosing(transport.send_many(list(mails))) as outcomes:
        return [outcome async for _, outcome in outcomes]


# -- what a provider received, read back the same way for all ---------------------------


@dataclass
class Sent:
    sender: str
    to: list[str]  # bare addresses: the To field (MIME: the To header)
    cc: list[str]
    bcc: list[str]  # JSON: the bcc field; MIME: the envelope recipients not shown
    reply_to: list[str]
    subject: str
    text: str | None
    html: str | None
    headers: dict[str, str]
    job_id: str
    tags: Any  # each provider's own shape
    files: dict[str, tuple[bytes, str | None]] = field(default_factory=dict)  # name: (bytes, cid)


def _bare(addresses: list[str]) -> list[str]:
    return [address for _, address in getaddresses(addresses)]


def _people(items: list[dict[str, str]] | None) -> list[str]:
    return [p["email"] for p in items or []]


def _mime(raw: bytes) -> tuple[EmailMessage, dict[str, tuple[bytes, str | None]]]:
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage) and not msg.defects
    files: dict[str, tuple[bytes, str | None]] = {}
    for part in msg.walk():
        name = part.get_filename()
        if name:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            cid = part["Content-ID"]
            files[name] = (payload, cid.strip("<>") if cid else None)
    return msg, files


def _content(part: Any) -> str | None:
    """A text part's content as given (the parser ends it with a newline of its own)."""
    if part is None:
        return None
    text: str = part.get_content()
    return text.replace("\r\n", "\n").removesuffix("\n")


def _mime_sent(raw: bytes, envelope: list[str], job_id: str, tags: Any) -> Sent:
    msg, files = _mime(raw)
    to = _bare([str(msg["To"])])
    cc = _bare([str(msg["Cc"])]) if msg["Cc"] else []
    text = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    return Sent(
        sender=_bare([str(msg["From"])])[0],
        to=to,
        cc=cc,
        bcc=[a for a in envelope if a not in to + cc],
        reply_to=_bare([str(msg["Reply-To"])]) if msg["Reply-To"] else [],
        subject=str(msg["Subject"]),
        text=_content(text),
        html=_content(html),
        headers={"X-Campaign": str(msg["X-Campaign"])} if msg["X-Campaign"] else {},
        job_id=job_id,
        tags=tags,
        files=files,
    )


def read_resend(stored: StoredEmail) -> Sent:
    doc = json.loads(stored.request.body)
    tags = {t["name"]: t["value"] for t in doc["tags"]}
    assert stored.request.headers["idempotency-key"] == tags["job_id"]
    return Sent(
        _bare([doc["from"]])[0], _bare(doc["to"]), _bare(doc.get("cc", [])),
        _bare(doc.get("bcc", [])), _bare(doc.get("reply_to", [])), doc["subject"],
        doc.get("text"), doc.get("html"), doc.get("headers", {}), tags.pop("job_id"), tags,
        {
            a["filename"]: (base64.b64decode(a["content"], validate=True), a.get("content_id"))
            for a in doc.get("attachments", [])
        },
    )  # fmt: skip


def read_sendgrid(stored: StoredEmail) -> Sent:
    doc = json.loads(stored.request.body)
    (person,) = doc["personalizations"]
    content = {c["type"]: c["value"] for c in doc["content"]}
    reply = [doc["reply_to"]] if "reply_to" in doc else doc.get("reply_to_list", [])
    files = {}
    for a in doc.get("attachments", []):
        inline = a["disposition"] == "inline"
        assert inline == ("content_id" in a)
        files[a["filename"]] = (base64.b64decode(a["content"], validate=True), a.get("content_id"))
    return Sent(
        doc["from"]["email"], _people(person["to"]), _people(person.get("cc")),
        _people(person.get("bcc")), _people(reply), doc["subject"], content.get("text/plain"),
        content.get("text/html"), doc.get("headers", {}), doc["custom_args"]["job_id"],
        doc.get("categories", []), files,
    )  # fmt: skip


def read_postmark(stored: StoredEmail) -> Sent:
    doc = json.loads(stored.request.body)
    return Sent(
        _bare([doc["From"]])[0], _bare([doc["To"]]), _bare([doc.get("Cc", "")]) if "Cc" in doc
        else [], _bare([doc["Bcc"]]) if "Bcc" in doc else [],
        _bare([doc["ReplyTo"]]) if "ReplyTo" in doc else [], doc["Subject"], doc.get("TextBody"),
        doc.get("HtmlBody"), {h["Name"]: h["Value"] for h in doc.get("Headers", [])},
        doc["Metadata"]["job_id"], doc.get("Tag"),
        {
            a["Name"]: (
                base64.b64decode(a["Content"], validate=True),
                a["ContentID"].removeprefix("cid:") if "ContentID" in a else None,
            )
            for a in doc.get("Attachments", [])
        },
    )  # fmt: skip


def read_mailgun(stored: StoredEmail) -> Sent:
    fields = parse_form(stored.request)
    values: dict[str, list[str]] = {}
    mime = b""
    for name, value in fields:
        if isinstance(value, FormFile):
            assert (name, value.content_type) == ("message", "message/rfc822")
            mime = value.content
        else:
            values.setdefault(name, []).append(value)
    (job_id,) = values["v:job_id"]
    return _mime_sent(mime, values["to"], job_id, values.get("o:tag", []))


def read_ses(stored: StoredEmail) -> Sent:
    doc = json.loads(stored.request.body)
    tags = {t["Name"]: t["Value"] for t in doc["EmailTags"]}
    raw = base64.b64decode(doc["Content"]["Raw"]["Data"], validate=True)
    dest = doc["Destination"]
    envelope = [
        *dest["ToAddresses"], *dest.get("CcAddresses", []), *dest.get("BccAddresses", [])
    ]  # fmt: skip
    sent = _mime_sent(raw, envelope, tags.pop("job_id"), tags)
    assert sent.bcc == dest.get("BccAddresses", [])
    return sent


# -- one case per provider -----------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    emulator: Callable[..., Emulator]
    url: Callable[[str], str]  # api_base -> the transport's URL (good credentials)
    bad_url: Callable[[str], str]  # ... with a wrong key
    secret: str
    read: Callable[[StoredEmail], Sent]
    auth_status: int

    def transport(self, emu: Emulator, settings: ProviderSettings = FAST) -> ProviderTransport:
        return transport_for(self.url(emu.url), settings)


SES_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYsecret"
CASES = [
    Case(
        "resend", partial(ResendEmulator, key="re_live_secret1"),
        lambda base: f"resend://re_live_secret1@?api_base={base}",
        lambda base: f"resend://re_wrong_secret9@?api_base={base}",
        "re_live_secret1", read_resend, 403,
    ),
    Case(
        "sendgrid", partial(SendGridEmulator, key="SG.live.secret2"),
        lambda base: f"sendgrid://SG.live.secret2@?api_base={base}",
        lambda base: f"sendgrid://SG.wrong.secret9@?api_base={base}",
        "SG.live.secret2", read_sendgrid, 401,
    ),
    Case(
        "postmark", partial(PostmarkEmulator, key="pm-secret-3"),
        lambda base: f"postmark://pm-secret-3@?api_base={base}",
        lambda base: f"postmark://pm-wrong-9@?api_base={base}",
        "pm-secret-3", read_postmark, 401,
    ),
    Case(
        "mailgun", partial(MailgunEmulator, key="key-secret-4", domain="mg.acme.test"),
        lambda base: f"mailgun://key-secret-4@mg.acme.test?api_base={base}",
        lambda base: f"mailgun://key-wrong-9@mg.acme.test?api_base={base}",
        "key-secret-4", read_mailgun, 401,
    ),
    Case(
        "ses",
        partial(
            SesEmulator, access_key_id="AKIDTEST", secret_access_key=SES_SECRET,
            region="eu-west-1",
        ),
        lambda base: f"ses://AKIDTEST:{SES_SECRET}@eu-west-1?api_base={base}",
        lambda base: f"ses://AKIDTEST:wrong{SES_SECRET}@eu-west-1?api_base={base}",
        SES_SECRET, read_ses, 403,
    ),
]  # fmt: skip
BY_NAME = {case.name: case for case in CASES}


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    param: Case = request.param
    return param


@asynccontextmanager
async def provider(
    case: Case, settings: ProviderSettings = FAST, **options: Any
) -> AsyncIterator[tuple[Emulator, ProviderTransport]]:
    async with running(case.emulator(**options)) as emu:
        transport = case.transport(emu, settings)
        try:
            yield emu, transport
        finally:
            await transport.aclose()


def stored_id(emu: Emulator, stored: StoredEmail) -> str:
    return stored.id.strip("<>")  # Mailgun's ids come in angle brackets; the event's do not


# -- what arrives ---------------------------------------------------------------------


async def test_a_plain_message(case: Case) -> None:
    mail = mail_of(message())
    async with provider(case) as (emu, transport):
        [outcome] = await send(transport, mail)
    assert isinstance(outcome, SendResult), outcome
    (stored,) = emu.emails
    assert outcome.code == 250 and outcome.provider_id == stored_id(emu, stored)
    assert outcome.text == f"{case.name} accepted {outcome.provider_id}"
    sent = case.read(stored)
    assert (sent.sender, sent.to, sent.cc, sent.bcc) == (
        "noreply@acme.test", ["ann@example.com"], [], [],
    )  # fmt: skip
    assert (sent.subject, sent.text, sent.html) == ("Hello", "Hi Ann", None)
    assert sent.job_id == mail.job_id and sent.files == {}


async def test_everything_a_message_holds(case: Case) -> None:
    """cc, bcc, reply-to, text and html, a custom header, tags, an attachment and an
    inline image: each where the provider takes it; the files' bytes arrive equal."""
    mail = mail_of(FULL)
    async with provider(case) as (emu, transport):
        [outcome] = await send(transport, mail)
    assert isinstance(outcome, SendResult), outcome
    sent = case.read(emu.emails[0])
    assert sent.sender == "noreply@acme.test"
    assert (sent.to, sent.cc, sent.bcc) == (
        ["ann@example.com", "john@example.com"], ["bob@example.com"], ["eve@example.com"],
    )  # fmt: skip
    assert sent.reply_to == ["help@acme.test"]
    assert sent.subject == "Hello"
    assert (sent.text, sent.html) == (FULL.text, FULL.html)
    assert sent.headers == {"X-Campaign": "spring"}
    assert sent.job_id == mail.job_id
    assert sent.files == {"report.pdf": (PDF, None), "logo.png": (PNG, "logo@acme")}
    expected_tags: dict[str, Any] = {
        "resend": {"order": "true", "welcome_mail": "true"},
        "ses": {"order": "true", "welcome_mail": "true"},
        "sendgrid": ["order", "welcome mail"],
        "postmark": "order",  # one Tag a message
        "mailgun": ["order", "welcome mail"],
    }
    assert sent.tags == expected_tags[case.name]


async def test_a_display_name_with_a_comma_stays_one_address(case: Case) -> None:
    mail = mail_of(message(to=['"Doe, John" <john@example.com>', "ann@example.com"]))
    async with provider(case) as (emu, transport):
        [outcome] = await send(transport, mail)
    assert isinstance(outcome, SendResult), outcome
    assert case.read(emu.emails[0]).to == ["john@example.com", "ann@example.com"]


async def test_only_the_recipients_still_owed_get_it(case: Case) -> None:
    """A retry after a partial delivery (or with suppressed addresses left out) names
    fewer recipients: only they are sent to; a Cc left alone becomes the To."""
    mail = dataclasses.replace(mail_of(FULL), recipients=["bob@example.com"])
    async with provider(case) as (emu, transport):
        [outcome] = await send(transport, mail)
    assert isinstance(outcome, SendResult), outcome
    (stored,) = emu.emails
    assert sorted(stored.recipients) == ["bob@example.com"]


async def test_html_only_and_utf8(case: Case) -> None:
    mail = mail_of(message(subject="Grüße ✓", text=None, html="<p>Grüße</p>"))
    async with provider(case) as (emu, transport):
        [outcome] = await send(transport, mail)
    assert isinstance(outcome, SendResult), outcome
    sent = case.read(emu.emails[0])
    assert (sent.subject, sent.text, sent.html) == ("Grüße ✓", None, "<p>Grüße</p>")


async def test_many_mails_in_order_and_senders_at_once(case: Case) -> None:
    settings = msgspec.structs.replace(FAST, pool_size=3)
    async with provider(case, settings) as (emu, transport):
        results: dict[str, Any] = {}

        async def sender(k: int) -> None:
            mails = [mail_of(message(subject=f"s{k}-{i}")) for i in range(6)]
            async with aclosing(transport.send_many(mails)) as outcomes:
                got = [(m.job_id, o) async for m, o in outcomes]
            assert [job for job, _ in got] == [m.job_id for m in mails]  # in order
            results.update(got)

        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(sender, k)
        stats = transport.statistics()
    assert all(isinstance(o, SendResult) for o in results.values())
    assert len(results) == 24 and emu.count == 24
    assert stats.accepted == 24 and stats.pool.connects <= 3 and stats.pool.open <= 3


# -- answers and failures ------------------------------------------------------------


async def test_429_is_temporary_with_retry_after(case: Case) -> None:
    async with provider(case) as (emu, transport):
        emu.set_faults({"status": 429, "count": 1, "retry_after": 1.5})
        limited, passed = await send(transport, mail_of(message()), mail_of(message()))
    assert type(limited) is TemporaryFailure, limited
    assert (limited.http_status, limited.retry_after_s) == (429, 1.5)
    assert str(limited).startswith(f"{case.name}: 429 ")
    assert isinstance(passed, SendResult)  # an answer: the next mail still goes
    assert emu.count == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_temporary(case: Case, status: int) -> None:
    async with provider(case) as (emu, transport):
        emu.set_faults({"status": status})
        [failed] = await send(transport, mail_of(message()))
    assert type(failed) is TemporaryFailure, failed
    assert (failed.http_status, failed.retry_after_s) == (status, None)


@pytest.mark.parametrize(
    ("status", "headers", "wait_s"),
    [
        (503, [(b"retry-after", b"2")], 2.0),
        (429, [(b"retry-after", b"Thu, 01 Jan 2026 00:01:00 GMT")], 60.0),
        (429, [(b"retry-after", b"soon")], None),
        (429, [(b"retry-after", b"-5")], 0.0),
        (429, [(b"retry-after", b"99999999")], 86400.0),
        (429, [(b"ratelimit-reset", b"3")], 3.0),  # Resend
        (429, [(b"x-ratelimit-reset", b"1767225610")], 10.0),  # SendGrid: a Unix time
        (500, [], None),
    ],
)
def test_retry_after(status: int, headers: list[tuple[bytes, bytes]], wait_s: float | None) -> None:
    answer = Response(status, headers, b"{}")
    assert retry_after_s(answer, now=1767225600.0) == wait_s  # 2026-01-01T00:00:00Z
    outcome = outcome_of(Resend(ProviderUrl.parse("resend://k@")), answer)
    assert type(outcome) is TemporaryFailure and outcome.http_status == status


@pytest.mark.parametrize("status", [400, 422])
async def test_validation_errors_are_permanent(case: Case, status: int) -> None:
    async with provider(case) as (emu, transport):
        emu.set_faults({"status": status})
        [refused] = await send(transport, mail_of(message()))
    assert type(refused) is PermanentFailure, refused
    assert refused.http_status == status
    assert str(refused).startswith(f"{case.name}: {status} ") and len(str(refused)) > 20


REAL_REFUSALS: dict[str, tuple[dict[str, Any], Message, int, str]] = {
    "resend": ({}, message(to=[f"u{i}@example.com" for i in range(51)]), 422, "Too many"),
    "sendgrid": ({}, message(subject=""), 400, "subject: The subject is required"),
    "postmark": (
        {"inactive": ["ann@example.com"]}, message(), 422, "ErrorCode 406: You tried to send"
    ),
    "mailgun": ({"domain": "other.test"}, message(), 404, "Domain not found: mg.acme.test"),
    "ses": (
        {"verified_identities": ["other.test"]}, message(), 400,
        "MessageRejected: Email address is not verified",
    ),
}  # fmt: skip


async def test_the_providers_own_refusals_are_permanent_in_their_words(case: Case) -> None:
    options, msg, status, words = REAL_REFUSALS[case.name]
    async with provider(case, **options) as (emu, transport):
        [refused] = await send(transport, mail_of(msg))
    assert type(refused) is PermanentFailure, refused
    assert refused.http_status == status and words in str(refused), str(refused)
    assert emu.count == 0


async def test_a_refused_key_fails_each_mail_and_is_logged_once(
    case: Case, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="engine.transport")
    async with running(case.emulator()) as emu:
        transport = transport_for(case.bad_url(emu.url), FAST)
        try:
            outcomes = await send(transport, *(mail_of(message()) for _ in range(3)))
        finally:
            await transport.aclose()
    assert all(type(o) is PermanentFailure for o in outcomes), outcomes
    assert {o.http_status for o in outcomes} == {case.auth_status}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors  # loud, but not once a mail
    assert f"transport.{case.name}.auth_refused" in errors[0].getMessage()
    bad = case.bad_url("x").split("://")[1].rpartition("@")[0].rpartition(":")[2]
    for text in [*(str(o) for o in outcomes), *(r.getMessage() for r in caplog.records)]:
        assert bad not in text and case.secret not in text
    assert emu.count == 0


async def test_unreachable_is_transport_unavailable_for_every_mail(case: Case) -> None:
    port = free_port()  # nobody listens
    transport = transport_for(case.url(f"http://127.0.0.1:{port}"), FAST)
    try:
        outcomes = await send(transport, *(mail_of(message()) for _ in range(3)))
    finally:
        await transport.aclose()
    assert all(type(o) is TransportUnavailable for o in outcomes), outcomes
    assert f"127.0.0.1:{port}" in str(outcomes[0]) and "refused" in str(outcomes[0])
    assert all(case.secret not in str(o) for o in outcomes)


async def test_down_the_mail_in_flight_is_undecided_the_rest_untried(case: Case) -> None:
    """``down`` drops every request unanswered once it was read: the first mail's fate
    cannot be told (the emulator's own test shows ``down`` closing an accepted, hung
    request the same way), so it is uncertain -- temporary for Resend, whose retry is
    idempotent; the mails after it are not tried. Cleared, the transport recovers."""
    async with provider(case) as (emu, transport):
        [warm] = await send(transport, mail_of(message()))
        assert isinstance(warm, SendResult)
        emu.set_faults({"down": True})
        first, *rest = await send(transport, *(mail_of(message()) for _ in range(3)))
        emu.clear_faults()
        [again] = await send(transport, mail_of(message()))
    expected = TemporaryFailure if case.name == "resend" else DeliveryUncertain
    assert type(first) is expected, first
    assert "closed the connection with no answer" in str(first)
    assert [type(o) for o in rest] == [TransportUnavailable] * 2
    assert all(str(o).startswith("not tried: ") for o in rest)
    assert isinstance(again, SendResult)
    assert emu.statistics().dropped == 1 and emu.count == 2


async def test_accepted_then_no_answer(case: Case) -> None:
    """The provider took the mail and never answered: uncertain (its retry may send it
    twice) -- except Resend, where the retry carries the same Idempotency-Key: a
    temporary failure, and the retry gets the first answer back, one email stored."""
    mail = mail_of(message())
    async with provider(case) as (emu, transport):
        emu.set_faults({"accept_then_hang": 1})
        with trio.fail_after(3):
            hung, untried = await send(transport, mail, mail_of(message()))
        [retried] = await send(transport, mail)
    assert emu.statistics().hung == 1
    assert type(untried) is TransportUnavailable
    assert "no answer within 0.5s" in str(hung)
    assert isinstance(retried, SendResult), retried
    if case.name == "resend":
        assert type(hung) is TemporaryFailure, hung
        (stored,) = emu.emails
        assert retried.provider_id == stored.id and stored.idempotency_key == mail.job_id
        assert emu.statistics().replayed == 1
    else:
        assert type(hung) is DeliveryUncertain, hung
        assert emu.count == 2  # what uncertain means: it went twice


async def test_slow_answers_within_the_timeout_are_waited_for(case: Case) -> None:
    async with provider(case) as (emu, transport):
        emu.set_faults({"delay_s": 0.2})
        [late] = await send(transport, mail_of(message()))
    assert isinstance(late, SendResult)


async def test_cancelled_mid_request_then_the_next_goes(case: Case) -> None:
    async with provider(case) as (emu, transport):
        emu.set_faults({"delay_s": 0.3})
        with trio.move_on_after(0.1):
            await send(transport, mail_of(message()))
        emu.clear_faults()
        [after] = await send(transport, mail_of(message()))
        stats = transport.statistics().pool
    assert isinstance(after, SendResult)
    assert stats.open == stats.idle == 1  # the interrupted connection was closed


async def test_a_mail_without_its_message_is_refused_by_json_apis() -> None:
    bare = OutgoingMail(new_id(), "a@acme.test", ["b@example.com"], b"Subject: x\r\n\r\nhi\r\n")
    case = BY_NAME["resend"]
    async with provider(case) as (emu, transport):
        [refused] = await send(transport, bare)
    assert type(refused) is PermanentFailure and "not composed from a message" in str(refused)
    assert emu.statistics().requests == 0


async def test_ses_refuses_a_utf8_local_part_up_front() -> None:
    mail = mail_of(message(to=["jörg@example.com"]))
    async with provider(BY_NAME["ses"]) as (emu, transport):
        [refused] = await send(transport, mail)
    assert type(refused) is PermanentFailure and "SMTPUTF8" in str(refused)
    assert emu.statistics().requests == 0


async def test_ses_gets_a_utf8_domain_as_a_labels() -> None:
    mail = mail_of(message(to=["ann@bücher.example"]))
    async with provider(BY_NAME["ses"]) as (emu, transport):
        [outcome] = await send(transport, mail)
    assert isinstance(outcome, SendResult), outcome
    assert emu.emails[0].to == ("ann@xn--bcher-kva.example",)


# -- URLs and settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "provider", "where", "api_base"),
    [
        ("resend://re_1@", "resend", "", "https://api.resend.com"),
        ("sendgrid://SG.a.b@", "sendgrid", "", "https://api.sendgrid.com"),
        ("postmark://tok@", "postmark", "", "https://api.postmarkapp.com"),
        ("mailgun://k@mg.acme.test", "mailgun", "mg.acme.test", "https://api.mailgun.net"),
        (
            "mailgun://k@mg.acme.test?api_base=https://api.eu.mailgun.net/",
            "mailgun", "mg.acme.test", "https://api.eu.mailgun.net",
        ),
        ("ses://AK:se/cr+et@eu-west-1", "ses", "eu-west-1", "https://email.eu-west-1.amazonaws.com"),
        ("RESEND://re_1@?api_base=http://127.0.0.1:9", "resend", "", "http://127.0.0.1:9"),
    ],
)  # fmt: skip
def test_urls(url: str, provider: str, where: str, api_base: str) -> None:
    parsed = ProviderUrl.parse(url)
    assert (parsed.provider, parsed.where, parsed.api_base) == (provider, where, api_base)
    assert "re_1" not in repr(parsed) and "se/cr+et" not in repr(parsed)
    assert str(parsed).startswith(f"{provider}://***@")


def test_ses_secret_may_hold_slashes_and_encoded_characters() -> None:
    parsed = ProviderUrl.parse("ses://AKID:a/b+c%3Fd@us-east-1")
    assert (parsed.key, parsed.secret) == ("AKID", "a/b+c?d")


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("smtp://re_secret@", "the scheme names the provider"),
        ("resend://api.resend.com", "no credentials"),
        ("resend://re_secret@api.resend.com", "no host"),
        ("resend://re:secret@", "one key"),
        ("mailgun://key_secret@", "sending domain"),
        ("ses://AKID@eu-west-1", "access key id and the secret"),
        ("ses://AKID:secret@europe", "region"),
        ("resend://re_secret@?region=eu", "unknown parameter 'region'"),
        ("resend://re_secret@?api_base=ftp://x", "API base URL"),
    ],
)
def test_bad_urls_say_why_without_the_secret(url: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        transport_for(url)
    assert needle in str(info.value)
    assert "secret" not in str(info.value).replace("the secret", "")


def test_redact_url_hides_provider_keys() -> None:
    assert redact_url("resend://re_abc@") == "resend://***@"
    assert redact_url("mailgun://key-1@mg.acme.test?api_base=http://x") == (
        "mailgun://***@mg.acme.test?api_base=http://x"
    )
    assert redact_url("ses://AKID:se/cr@eu-west-1") == "ses://AKID:***@eu-west-1"
    assert redact_url("smtp://mailer@mx.example.com") == "smtp://mailer@mx.example.com"


def test_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        transport_for("resend://k@", ProviderSettings(pool_size=0))
    with pytest.raises(ConfigError):
        transport_for("resend://k@", ProviderSettings(request_timeout_s=0))


def test_public_surface() -> None:
    assert sorted(providers_face.__all__) == [
        "DEFAULT_API_BASES", "PROVIDER_SCHEMES", "Provider", "ProviderTransport",
        "ProviderTransportStatistics", "ProviderUrl", "is_provider_url", "transport_for",
    ]  # fmt: skip
    assert providers_face.is_provider_url("ses://a:b@eu-west-1")
    assert not providers_face.is_provider_url("smtp://mx:25")


def test_compose_keeps_what_json_apis_need_and_defaults_stay() -> None:
    mail = mail_of(FULL)
    assert mail.message is FULL and mail.parts is PARTS
    assert OutgoingMail("J", "a@b.c", ["d@e.f"], b"x").message is None
    assert SendResult(250, "ok").provider_id == ""
    assert TemporaryFailure("busy", code=451).retry_after_s is None
    assert TransportUnavailable("down").retry_after_s is None


# -- the HTTP client against scripted servers -------------------------------------------

Handler = Callable[[trio.abc.Stream, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def read_request(stream: trio.abc.Stream) -> bytes:
    """One request (a Content-Length body) off ``stream``; b"" at EOF."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await stream.receive_some(65536)
    return data


@asynccontextmanager
async def scripted(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """A server calling ``handler(stream, n)`` for its n-th connection (from 0)."""
    count = [0]

    async def serve(stream: trio.abc.Stream) -> None:
        n = count[0]
        count[0] += 1
        async with stream:
            with suppress(trio.BrokenResourceError):
                await handler(stream, n)

    async with trio.open_nursery() as nursery:
        if tls is None:
            start = partial(trio.serve_tcp, serve, 0, host="127.0.0.1")
        else:
            start = partial(
                trio.serve_ssl_over_tcp, serve, 0, tls, host="127.0.0.1", https_compatible=True
            )
        listeners = await nursery.start(start)
        sock = listeners[0].socket if tls is None else listeners[0].transport_listener.socket
        port = sock.getsockname()[1]
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def post(pool: Http1Pool, timeout_s: float = 2.0) -> Any:
    return await pool.request(b"POST", b"/x", b"", b"{}", timeout_s=timeout_s)


async def test_a_kept_connection_closed_under_a_request_is_retried_on_a_new_one() -> None:
    """The first connection answers once, then reads the next request and closes
    without a word (a server's idle close racing our request): it goes once more."""

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while await read_request(stream):
            await stream.send_all(OK)
            if n == 0:
                await read_request(stream)
                return

    async with scripted(handler) as base:
        pool = Http1Pool(base)
        first = await post(pool)
        second = await post(pool)
        stats = pool.statistics()
        await pool.aclose()
    assert first.status == second.status == 200 and second.body == b"ok"
    assert (stats.stale, stats.connects, stats.requests) == (1, 2, 2)


async def test_an_idle_connection_the_server_closed_is_not_used() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(OK)  # keep-alive, then gone

    async with scripted(handler) as base:
        pool = Http1Pool(base)
        await post(pool)
        await trio.sleep(0.05)  # the FIN arrives
        assert (await post(pool)).status == 200
        stats = pool.statistics()
        await pool.aclose()
    assert (stats.stale, stats.idle_closed, stats.connects) == (0, 1, 2)


async def test_a_new_connection_closed_without_an_answer_is_a_failure_after_sending() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)

    async with scripted(handler) as base:
        pool = Http1Pool(base)
        with pytest.raises(HttpFailure) as info:
            await post(pool)
        await pool.aclose()
    assert info.value.stage == "answer" and info.value.sent
    assert pool.statistics().open == 0


async def test_answers_chunked_after_1xx_and_cut_at_the_size_limit() -> None:
    big = b"y" * 5000

    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Id: 7\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + big)

    async with scripted(handler) as base:
        pool = Http1Pool(base, max_response_bytes=1024)
        chunked = await post(pool)
        cut = await post(pool)
        stats = pool.statistics()
        await pool.aclose()
    assert (chunked.status, chunked.body, chunked.header(b"x-id")) == (201, b"abcde", b"7")
    assert chunked.complete
    assert (cut.status, cut.body, cut.complete) == (200, big[:1024], False)
    assert stats.connects == 1 and stats.open == 0  # the cut answer's connection is closed


async def test_garbage_and_silence() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        if n == 0:
            await stream.send_all(b"220 mx.example.com ESMTP\r\n")
        await trio.sleep_forever()

    async with scripted(handler) as base:
        pool = Http1Pool(base)
        with pytest.raises(HttpFailure) as garbage:
            await post(pool)
        with pytest.raises(HttpFailure) as silence:
            await post(pool, timeout_s=0.2)
        await pool.aclose()
    assert garbage.value.stage == "answer" and "not an HTTP/1.1 answer" in str(garbage.value)
    assert silence.value.stage == "answer" and "no answer within 0.2s" in str(silence.value)


async def test_the_pool_bounds_connections_and_serve_sweeps_idle_ones() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        while await read_request(stream):
            await trio.sleep(0.02)
            await stream.send_all(OK)

    async with scripted(handler) as base:
        pool = Http1Pool(base, max_connections=2, idle_timeout_s=0.3)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.serve)
            async with trio.open_nursery() as senders:
                for _ in range(6):
                    senders.start_soon(post, pool)
            busy = pool.statistics()
            await trio.sleep(1.5)  # past idle_timeout_s and one sweep
            quiet = pool.statistics()
            nursery.cancel_scope.cancel()
        await pool.aclose()
    assert (busy.connects, busy.requests, busy.idle) == (2, 6, 2)
    assert (quiet.open, quiet.idle_closed) == (0, 2)


async def test_a_closed_pool_refuses() -> None:
    pool = Http1Pool("http://127.0.0.1:9")
    await pool.aclose()
    with pytest.raises(HttpFailure) as info:
        await post(pool)
    assert info.value.stage == "connect"


async def test_tls_keeps_its_connection_and_checks_the_certificate(tmp_path: Any) -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def handler(stream: trio.abc.Stream, n: int) -> None:
        while await read_request(stream):
            await stream.send_all(OK)
            if n == 0:
                return  # then closed (close_notify, FIN) while the client keeps it idle

    async with scripted(handler, server) as base:
        pool = Http1Pool(base, ssl_context=make_ssl_context(ca_file=str(ca_file)))
        answers = [await post(pool)]
        await trio.sleep(0.05)
        answers += [await post(pool) for _ in range(2)]
        stats = pool.statistics()
        await pool.aclose()
        untrusted = Http1Pool(base)  # the system's CAs only
        with pytest.raises(HttpFailure) as info:
            await post(untrusted)
        unchecked = Http1Pool(base, ssl_context=make_ssl_context(verify=False))
        assert (await post(unchecked)).status == 200
        await unchecked.aclose()
    assert [a.body for a in answers] == [b"ok"] * 3
    assert (stats.connects, stats.requests, stats.stale, stats.idle_closed) == (2, 3, 0, 1)
    assert info.value.stage == "connect" and "certificate verify failed" in str(info.value)
