"""The provider emulators (fixtures/providers) driven over real HTTP on loopback: each
provider's accepted shape, auth refusal and validation errors; every fault; Resend's
idempotency (a timeout after acceptance, then a retry: one email); SES's SigV4 check
against botocore's signer; the process mode (asyncio shell) with its ready line and SIGTERM."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from botocore.session import get_session

from fixtures.providers import PROVIDERS, emulator_class, running, wait_emails
from fixtures.providers.base import Emulator, parse_faults
from fixtures.providers.mailgun import MailgunEmulator
from fixtures.providers.postmark import PostmarkEmulator
from fixtures.providers.resend import ResendEmulator
from fixtures.providers.sendgrid import SendGridEmulator
from fixtures.providers.ses import SesEmulator

ROOT = Path(__file__).resolve().parent.parent
RESEND = {"Authorization": "Bearer re_test"}
EMAIL = {
    "from": "Acme <noreply@acme.test>",
    "to": ["ann@example.com"],
    "subject": "Hello",
    "text": "Hi",
    "html": "<p>Hi</p>",
}


def client(emulator: Emulator, timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=emulator.url, timeout=timeout)


@pytest.fixture
async def resend() -> AsyncIterator[ResendEmulator]:
    async with running(ResendEmulator(key="re_test")) as emulator:
        yield emulator


# -- Resend ---------------------------------------------------------------------------


async def test_resend_accepts_and_stores(resend: ResendEmulator) -> None:
    async with client(resend) as http:
        email = {
            **EMAIL,
            "to": "ann@example.com",
            "cc": ["Bob <bob@example.com>"],
            "bcc": "eve@example.com",
            "reply_to": "help@acme.test",
            "headers": {"X-Entity": "1"},
            "tags": [{"name": "kind", "value": "welcome"}],
            "attachments": [{"filename": "a.txt", "content": base64.b64encode(b"a").decode()}],
        }
        answer = await http.post("/emails", json=email, headers=RESEND)
    assert answer.status_code == 200
    (key,) = answer.json()
    assert key == "id" and uuid.UUID(answer.json()["id"])
    (stored,) = resend.emails
    assert stored.id == answer.json()["id"]
    assert (stored.sender, stored.to, stored.cc, stored.bcc, stored.subject) == (
        "noreply@acme.test",
        ("ann@example.com",),
        ("bob@example.com",),
        ("eve@example.com",),
        "Hello",
    )
    assert json.loads(stored.request.body)["tags"] == email["tags"]
    assert stored.idempotency_key is None


async def test_resend_refuses_bad_keys(resend: ResendEmulator) -> None:
    async with client(resend) as http:
        missing = await http.post("/emails", json=EMAIL)
        wrong = await http.post("/emails", json=EMAIL, headers={"Authorization": "Bearer nope"})
    assert missing.status_code == 401
    assert missing.json() == {
        "statusCode": 401,
        "name": "missing_api_key",
        "message": "Missing API key in the authorization header.",
    }
    assert wrong.status_code == 403 and wrong.json()["name"] == "invalid_api_key"
    assert resend.emails == []


@pytest.mark.parametrize(
    ("change", "status", "name"),
    [
        ({"subject": None}, 422, "missing_required_field"),
        ({"to": []}, 422, "missing_required_field"),
        ({"from": "not an address"}, 422, "invalid_from_address"),
        ({"to": ["ann@example.com", "nope"]}, 422, "validation_error"),
        ({"to": [f"u{i}@example.com" for i in range(51)]}, 422, "validation_error"),
        ({"tags": [{"name": "bad tag", "value": "x"}]}, 422, "validation_error"),
        ({"attachments": [{"filename": "a.txt"}]}, 422, "invalid_attachment"),
        ({"headers": {"X-A": 1}}, 422, "validation_error"),
    ],
)
async def test_resend_validation(
    resend: ResendEmulator, change: dict[str, Any], status: int, name: str
) -> None:
    email = {k: v for k, v in {**EMAIL, **change}.items() if v is not None}
    async with client(resend) as http:
        answer = await http.post("/emails", json=email, headers=RESEND)
    assert (answer.status_code, answer.json()["name"]) == (status, name)
    assert answer.json()["statusCode"] == status
    assert resend.count == 0


async def test_resend_not_json_and_unknown_routes(resend: ResendEmulator) -> None:
    async with client(resend) as http:
        bad = await http.post("/emails", content=b"{", headers=RESEND)
        unknown = await http.post("/domains", json={}, headers=RESEND)
        method = await http.get("/emails", headers=RESEND)
    assert (bad.status_code, bad.json()["name"]) == (400, "validation_error")
    assert (unknown.status_code, unknown.json()["name"]) == (404, "not_found")
    assert (method.status_code, method.json()["name"]) == (405, "method_not_allowed")


async def test_resend_idempotency_same_key_same_email(resend: ResendEmulator) -> None:
    headers = {**RESEND, "Idempotency-Key": "welcome-user/42"}
    async with client(resend) as http:
        first = await http.post("/emails", json=EMAIL, headers=headers)
        # The same payload with its keys in another order is the same payload.
        again = await http.post("/emails", json=dict(reversed(EMAIL.items())), headers=headers)
        other = await http.post("/emails", json={**EMAIL, "subject": "Other"}, headers=headers)
        too_long = await http.post(
            "/emails", json=EMAIL, headers={**RESEND, "Idempotency-Key": "k" * 257}
        )
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert other.status_code == 409 and other.json()["name"] == "invalid_idempotent_request"
    assert too_long.status_code == 400 and too_long.json()["name"] == "invalid_idempotency_key"
    (stored,) = resend.emails
    assert stored.idempotency_key == "welcome-user/42" and stored.id == first.json()["id"]
    stats = resend.statistics()
    assert (stats.accepted, stats.replayed, stats.rejected) == (1, 1, 2)


async def test_resend_idempotency_keys_expire() -> None:
    now = [1000.0]
    emulator = ResendEmulator(key="re_test", clock=lambda: now[0])
    headers = {**RESEND, "Idempotency-Key": "k1"}
    async with running(emulator), client(emulator) as http:
        first = await http.post("/emails", json=EMAIL, headers=headers)
        now[0] += 24 * 3600 - 1
        replay = await http.post("/emails", json=EMAIL, headers=headers)
        now[0] += 2  # past the documented 24 hours: the key is new again
        fresh = await http.post("/emails", json={**EMAIL, "subject": "New"}, headers=headers)
    assert replay.json() == first.json()
    assert fresh.status_code == 200 and fresh.json() != first.json()
    assert emulator.count == 2


async def test_resend_timeout_after_acceptance_then_retry_sends_once(
    resend: ResendEmulator,
) -> None:
    """How Resend's idempotency is proven: the email is accepted, the answer never comes,
    the client times out and retries with the same key: the same id, one email."""
    resend.set_faults({"accept_then_hang": 1})
    headers = {**RESEND, "Idempotency-Key": "order-7/confirmation"}
    async with client(resend, timeout=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/emails", json=EMAIL, headers=headers)
        assert resend.count == 1  # accepted although the client saw a timeout
        retry = await http.post("/emails", json=EMAIL, headers=headers)
    assert retry.status_code == 200
    assert [e.id for e in resend.emails] == [retry.json()["id"]]
    stats = resend.statistics()
    assert (stats.accepted, stats.hung, stats.replayed) == (1, 1, 1)


async def test_resend_batch(resend: ResendEmulator) -> None:
    batch = [EMAIL, {**EMAIL, "to": "bob@example.com", "subject": "Second"}]
    headers = {**RESEND, "Idempotency-Key": "batch-1"}
    async with client(resend) as http:
        answer = await http.post("/emails/batch", json=batch, headers=headers)
        replay = await http.post("/emails/batch", json=batch, headers=headers)
        invalid = await http.post(
            "/emails/batch", json=[EMAIL, {**EMAIL, "to": "x"}], headers=RESEND
        )
        empty = await http.post("/emails/batch", json=[], headers=RESEND)
    assert answer.status_code == 200 and replay.json() == answer.json()
    assert [e.id for e in resend.emails] == [d["id"] for d in answer.json()["data"]]
    assert [e.subject for e in resend.emails] == ["Hello", "Second"]
    assert invalid.status_code == 422 and invalid.json()["message"].startswith("Email 1: ")
    assert empty.status_code == 422


async def test_wait_emails(resend: ResendEmulator) -> None:
    # The client outlives the nursery: its requests finish before it closes.
    async with client(resend) as http, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: http.post("/emails", json=EMAIL))  # a 401: no email
        for _ in range(2):
            nursery.start_soon(lambda: http.post("/emails", json=EMAIL, headers=RESEND))
        with trio.fail_after(5):
            emails = await wait_emails(resend, 2)
    assert len(emails) == 2


async def test_expect_100_continue_and_keep_alive(resend: ResendEmulator) -> None:
    """curl sends larger bodies after "100 Continue" only; two requests, one connection."""
    body = json.dumps({**EMAIL, "text": "x" * 4000}).encode()
    head = (
        "POST /emails HTTP/1.1\r\nHost: emulator\r\nAuthorization: Bearer re_test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    ).encode()
    port = int(resend.url.rpartition(":")[2])
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head + b"Expect: 100-continue\r\n\r\n")
            assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body + head + b"\r\n" + body)
            answers = b""
            while answers.count(b"HTTP/1.1 200 ") < 2:
                answers += await stream.receive_some(65536)
    assert resend.count == 2


# -- faults (on every provider: each answers them in its own shape) -------------------


async def test_injected_statuses_then_recovery(resend: ResendEmulator) -> None:
    async with client(resend) as http:
        faults = await http.post(
            "/_emulator/faults", json={"status": 429, "count": 2, "retry_after": 1.5}
        )
        assert faults.json()["count"] == 2
        limited = [await http.post("/emails", json=EMAIL, headers=RESEND) for _ in range(2)]
        passed = await http.post("/emails", json=EMAIL, headers=RESEND)
        await http.post("/_emulator/faults", json={"status": 500})  # count defaults to 1
        failed = await http.post("/emails", json=EMAIL, headers=RESEND)
        passed_again = await http.post("/emails", json=EMAIL, headers=RESEND)
    for answer in limited:
        assert answer.status_code == 429
        assert answer.json()["name"] == "rate_limit_exceeded"
        assert answer.headers["retry-after"] == "1.5"
        assert answer.headers["ratelimit-remaining"] == "0"
    assert failed.status_code == 500 and failed.json()["statusCode"] == 500
    assert passed.status_code == passed_again.status_code == 200
    stats = resend.statistics()
    assert (stats.requests, stats.injected, stats.accepted) == (5, 3, 2)
    assert dict(stats.statuses) == {429: 2, 200: 2, 500: 1}


async def test_slow_answers(resend: ResendEmulator) -> None:
    resend.set_faults({"delay_s": 0.3})
    async with client(resend) as http:
        started = trio.current_time()
        answer = await http.post("/emails", json=EMAIL, headers=RESEND)
        took = trio.current_time() - started
    assert answer.status_code == 200 and took >= 0.3
    assert resend.statistics().delayed == 1


async def test_down_closes_every_connection_and_control_still_works(
    resend: ResendEmulator,
) -> None:
    outcome: list[BaseException] = []

    async def hung() -> None:
        try:
            await http.post("/emails", json={**EMAIL, "subject": "hung"}, headers=RESEND)
        except httpx.HTTPError as exc:
            outcome.append(exc)

    async with client(resend, timeout=10) as http, client(resend) as control:
        assert (await http.post("/emails", json=EMAIL, headers=RESEND)).status_code == 200
        resend.set_faults({"accept_then_hang": 1})
        with trio.fail_after(3):  # not the 10 s timeout: down closed the hung connection
            async with trio.open_nursery() as nursery:
                nursery.start_soon(hung)
                await wait_emails(resend, 2)
                answer = await control.post("/_emulator/faults", json={"down": True})
                assert answer.json()["down"] is True
        assert isinstance(outcome[0], httpx.RemoteProtocolError | httpx.ReadError)
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            await http.post("/emails", json=EMAIL, headers=RESEND)
        assert (await control.get("/_emulator/emails")).json()["count"] == 2
        await control.post("/_emulator/faults", json={"clear": True})
        assert (await http.post("/emails", json=EMAIL, headers=RESEND)).status_code == 200
    stats = resend.statistics()
    assert (stats.accepted, stats.hung, stats.dropped) == (3, 1, 1)


async def test_control_api(resend: ResendEmulator) -> None:
    async with client(resend) as http:
        for subject in ("one", "two", "three"):
            await http.post("/emails", json={**EMAIL, "subject": subject}, headers=RESEND)
        page = (await http.get("/_emulator/emails", params={"offset": 1, "limit": 1})).json()
        stats = (await http.get("/_emulator/stats")).json()
        bad = await http.post("/_emulator/faults", json={"status": 200})
        unknown = await http.post("/_emulator/faults", json={"explode": True})
        faults = (await http.get("/_emulator/faults")).json()
        reset = await http.delete("/_emulator/emails")
        after = (await http.get("/_emulator/emails")).json()
    assert page["count"] == 3 and [e["subject"] for e in page["emails"]] == ["two"]
    assert page["emails"][0]["request"]["headers"]["authorization"] == "Bearer re_test"
    assert json.loads(page["emails"][0]["request"]["body"])["subject"] == "two"
    assert (stats["accepted"], stats["requests"], stats["statuses"]) == (3, 3, {"200": 3})
    assert bad.status_code == unknown.status_code == 400
    assert faults == {
        "status": 0,
        "count": 0,
        "retry_after": None,
        "delay_s": 0.0,
        "accept_then_hang": 0,
        "down": False,
    }
    assert reset.json()["count"] == 0 and after == {"provider": "resend", "count": 0, "emails": []}


def test_fault_documents() -> None:
    from fixtures.providers.base import Faults

    faults = parse_faults({"status": 503, "retry_after": 2, "delay_s": 0.1}, Faults())
    assert (faults.status, faults.count, faults.retry_after_s, faults.delay_s) == (503, 1, 2, 0.1)
    assert parse_faults({"accept_then_hang": 2}, faults).delay_s == 0.1  # the others stay
    assert parse_faults({"clear": True, "down": True}, faults) == Faults(down=True)
    for bad in ({"count": 2}, {"status": "429"}, {"delay_s": -1}, {"down": 1}, [1]):
        with pytest.raises(ValueError):
            parse_faults(bad, Faults())


# -- SendGrid -------------------------------------------------------------------------

SENDGRID = {"Authorization": "Bearer SG.test"}
SG_MAIL = {
    "personalizations": [
        {
            "to": [{"email": "ann@example.com", "name": "Ann"}],
            "cc": [{"email": "bob@example.com"}],
            "custom_args": {"n": "1"},
        }
    ],
    "from": {"email": "noreply@acme.test", "name": "Acme"},
    "reply_to": {"email": "help@acme.test"},
    "subject": "Hello",
    "content": [{"type": "text/plain", "value": "Hi"}, {"type": "text/html", "value": "<p>Hi</p>"}],
    "headers": {"X-Entity": "1"},
    "categories": ["welcome"],
}


async def test_sendgrid() -> None:
    emulator = SendGridEmulator(key="SG.test")
    async with running(emulator), client(emulator) as http:
        accepted = await http.post("/v3/mail/send", json=SG_MAIL, headers=SENDGRID)
        unauthorized = await http.post(
            "/v3/mail/send", json=SG_MAIL, headers={"Authorization": "Bearer SG.nope"}
        )
        invalid = await http.post(
            "/v3/mail/send",
            headers=SENDGRID,
            json={
                **SG_MAIL,
                "personalizations": [{"to": [{"email": "nope"}]}],
                "subject": None,
                "content": [{"type": "text/html", "value": ""}],
            },
        )
        emulator.set_faults({"status": 429, "retry_after": 3})
        limited = await http.post("/v3/mail/send", json=SG_MAIL, headers=SENDGRID)
    assert accepted.status_code == 202 and accepted.content == b""
    message_id = accepted.headers["x-message-id"]
    assert len(message_id) == 22
    (stored,) = emulator.emails
    assert (stored.id, stored.to, stored.cc, stored.subject) == (
        message_id,
        ("ann@example.com",),
        ("bob@example.com",),
        "Hello",
    )
    assert unauthorized.status_code == 401
    assert unauthorized.json()["errors"][0]["message"].startswith("The provided authorization")
    assert invalid.status_code == 400
    fields = {e["field"] for e in invalid.json()["errors"]}
    assert {"personalizations.0.to.0.email", "subject", "content.0.value"} <= fields
    assert all(set(e) == {"message", "field", "help"} for e in invalid.json()["errors"])
    assert limited.status_code == 429
    assert limited.json() == {
        "errors": [{"message": "too many requests", "field": None, "help": None}]
    }
    assert int(limited.headers["x-ratelimit-reset"]) >= int(emulator.clock()) + 3


# -- Postmark -------------------------------------------------------------------------

POSTMARK = {"X-Postmark-Server-Token": "pm-test", "Accept": "application/json"}
PM_MAIL = {
    "From": "Acme <noreply@acme.test>",
    "To": 'ann@example.com, "Doe, Bob" <bob@example.com>',
    "Bcc": "eve@example.com",
    "Subject": "Hello",
    "TextBody": "Hi",
    "HtmlBody": "<p>Hi</p>",
    "ReplyTo": "help@acme.test",
    "Headers": [{"Name": "X-Entity", "Value": "1"}],
    "Tag": "welcome",
    "Metadata": {"n": "1"},
    "MessageStream": "outbound",
    "Attachments": [{"Name": "a.txt", "Content": "YQ==", "ContentType": "text/plain"}],
}


async def test_postmark() -> None:
    emulator = PostmarkEmulator(key="pm-test", inactive=["gone@example.com"])
    async with running(emulator), client(emulator) as http:
        accepted = await http.post("/email", json=PM_MAIL, headers=POSTMARK)
        unauthorized = await http.post("/email", json=PM_MAIL)
        no_body = await http.post(
            "/email", json={**PM_MAIL, "TextBody": "", "HtmlBody": ""}, headers=POSTMARK
        )
        inactive = await http.post(
            "/email", json={**PM_MAIL, "To": "gone@example.com"}, headers=POSTMARK
        )
        not_json = await http.post("/email", content=b"nope", headers=POSTMARK)
        batch = await http.post(
            "/email/batch", json=[PM_MAIL, {**PM_MAIL, "To": "x"}], headers=POSTMARK
        )
        emulator.set_faults({"status": 429})
        limited = await http.post("/email", json=PM_MAIL, headers=POSTMARK)
    assert accepted.status_code == 200
    body = accepted.json()
    assert (body["To"], body["ErrorCode"], body["Message"]) == (PM_MAIL["To"], 0, "OK")
    assert body["SubmittedAt"] and uuid.UUID(body["MessageID"])
    first = emulator.emails[0]
    assert (first.id, first.to, first.bcc) == (
        body["MessageID"],
        ("ann@example.com", "bob@example.com"),
        ("eve@example.com",),
    )
    assert (unauthorized.status_code, unauthorized.json()["ErrorCode"]) == (401, 10)
    assert (no_body.status_code, no_body.json()["ErrorCode"]) == (422, 300)
    assert (inactive.status_code, inactive.json()["ErrorCode"]) == (422, 406)
    assert (not_json.status_code, not_json.json()["ErrorCode"]) == (422, 402)
    assert batch.status_code == 200
    assert [r["ErrorCode"] for r in batch.json()] == [0, 300]
    assert (limited.status_code, limited.json()["ErrorCode"]) == (429, 429)
    assert emulator.count == 2


# -- Mailgun --------------------------------------------------------------------------

MAILGUN_AUTH = ("api", "key-test")


async def test_mailgun_messages() -> None:
    emulator = MailgunEmulator(key="key-test", domain="mg.acme.test")
    form = {
        "from": "Acme <noreply@acme.test>",
        "to": ["ann@example.com", "bob@example.com, c@d.ef"],
        "cc": "eve@example.com",
        "subject": "Hello",
        "text": "Hi",
        "html": "<p>Hi</p>",
        "h:Reply-To": "help@acme.test",
        "o:tag": "welcome",
        "v:user": "42",
    }
    files = [("attachment", ("a.bin", bytes(range(256)), "application/octet-stream"))]
    async with running(emulator), client(emulator) as http:
        multipart = await http.post(
            "/v3/mg.acme.test/messages", data=form, files=files, auth=MAILGUN_AUTH
        )
        urlencoded = await http.post("/v3/mg.acme.test/messages", data=form, auth=MAILGUN_AUTH)
        forbidden = await http.post("/v3/mg.acme.test/messages", data=form, auth=("api", "no"))
        no_from = await http.post(
            "/v3/mg.acme.test/messages",
            auth=MAILGUN_AUTH,
            data={k: v for k, v in form.items() if k != "from"},
        )
        no_body = await http.post(
            "/v3/mg.acme.test/messages",
            auth=MAILGUN_AUTH,
            data={k: v for k, v in form.items() if k not in ("text", "html")},
        )
        other_domain = await http.post("/v3/other.test/messages", data=form, auth=MAILGUN_AUTH)
    assert multipart.status_code == urlencoded.status_code == 200
    assert multipart.json()["message"] == "Queued. Thank you."
    assert multipart.json()["id"].startswith("<") and multipart.json()["id"].endswith(
        "@mg.acme.test>"
    )
    first = emulator.emails[0]
    assert (first.sender, first.to, first.cc, first.subject) == (
        "noreply@acme.test",
        ("ann@example.com", "bob@example.com", "c@d.ef"),
        ("eve@example.com",),
        "Hello",
    )
    assert bytes(range(256)) in first.request.body
    assert (forbidden.status_code, forbidden.text) == (401, "Forbidden")
    assert (no_from.status_code, no_from.json()) == (400, {"message": "from parameter is missing"})
    assert no_body.status_code == 400 and "at least one of" in no_body.json()["message"]
    assert other_domain.status_code == 404


async def test_mailgun_mime() -> None:
    emulator = MailgunEmulator(key="key-test", domain="mg.acme.test")
    mime = (
        b"From: Acme <noreply@acme.test>\r\nTo: ann@example.com\r\n"
        b"Subject: =?utf-8?q?Caf=C3=A9?=\r\nContent-Type: text/plain\r\n\r\nHi\r\n"
    )
    async with running(emulator), client(emulator) as http:
        answer = await http.post(
            "/v3/mg.acme.test/messages.mime",
            auth=MAILGUN_AUTH,
            data={"to": ["ann@example.com", "bcc@example.com"]},
            files={"message": ("message.mime", mime, "message/rfc822")},
        )
        missing = await http.post(
            "/v3/mg.acme.test/messages.mime",
            auth=MAILGUN_AUTH,
            data={"to": "ann@example.com"},
            files={"other": ("x", b"x", "text/plain")},
        )
    assert answer.status_code == 200
    (stored,) = emulator.emails
    assert (stored.sender, stored.to, stored.subject) == (
        "noreply@acme.test",
        ("ann@example.com", "bcc@example.com"),
        "Café",
    )
    assert missing.status_code == 400


# -- SES ------------------------------------------------------------------------------

SES_KEYS = {"aws_access_key_id": "AKIDTEST", "aws_secret_access_key": "s3cret"}
SES_MAIL = {
    "FromEmailAddress": "Acme <noreply@acme.test>",
    "Destination": {"ToAddresses": ["ann@example.com"], "BccAddresses": ["eve@example.com"]},
    "ReplyToAddresses": ["help@acme.test"],
    "Content": {
        "Simple": {
            "Subject": {"Data": "Hello", "Charset": "UTF-8"},
            "Body": {"Text": {"Data": "Hi"}, "Html": {"Data": "<p>Hi</p>"}},
            "Headers": [{"Name": "X-Entity", "Value": "1"}],
        }
    },
    "EmailTags": [{"Name": "kind", "Value": "welcome"}],
    "ConfigurationSetName": "default",
}


def ses_emulator(**kwargs: Any) -> SesEmulator:
    return SesEmulator(access_key_id="AKIDTEST", secret_access_key="s3cret", **kwargs)


def ses_client(url: str, secret: str = "s3cret") -> Any:
    return get_session().create_client(
        "sesv2",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="AKIDTEST",
        aws_secret_access_key=secret,
        config=Config(retries={"total_max_attempts": 1}),
    )


def signed(url: str, body: bytes, secret: str = "s3cret") -> tuple[dict[str, str], bytes]:
    request = AWSRequest(
        method="POST",
        url=url + "/v2/email/outbound-emails",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    SigV4Auth(Credentials("AKIDTEST", secret), "ses", "us-east-1").add_auth(request)
    return dict(request.headers.items()), body


async def test_ses_with_botocore_client() -> None:
    emulator = ses_emulator(verified_identities=["acme.test"])
    async with running(emulator):
        ses = await trio.to_thread.run_sync(ses_client, emulator.url)
        simple = await trio.to_thread.run_sync(lambda: ses.send_email(**SES_MAIL))
        raw_mime = (
            b"From: Acme <noreply@acme.test>\r\nTo: ann@example.com\r\n"
            b"Cc: bob@example.com\r\nSubject: Raw\r\n\r\nHi\r\n"
        )
        raw = await trio.to_thread.run_sync(
            lambda: ses.send_email(Content={"Raw": {"Data": raw_mime}})
        )
        with pytest.raises(ClientError) as rejected:
            await trio.to_thread.run_sync(
                lambda: ses.send_email(**{**SES_MAIL, "FromEmailAddress": "someone@elsewhere.test"})
            )
        emulator.set_faults({"status": 429})
        with pytest.raises(ClientError) as limited:
            await trio.to_thread.run_sync(lambda: ses.send_email(**SES_MAIL))
        wrong = await trio.to_thread.run_sync(ses_client, emulator.url, "not-the-secret")
        with pytest.raises(ClientError) as bad_signature:
            await trio.to_thread.run_sync(lambda: wrong.send_email(**SES_MAIL))
    assert simple["MessageId"] == emulator.emails[0].id
    assert simple["MessageId"].startswith("0100") and simple["MessageId"].endswith("-000000")
    first, second = emulator.emails
    assert (first.sender, first.to, first.bcc, first.subject) == (
        "noreply@acme.test",
        ("ann@example.com",),
        ("eve@example.com",),
        "Hello",
    )
    assert raw["MessageId"] == second.id
    assert (second.to, second.cc, second.subject) == (
        ("ann@example.com",),
        ("bob@example.com",),
        "Raw",
    )
    for caught, status, code in (
        (rejected, 400, "MessageRejected"),
        (limited, 429, "TooManyRequestsException"),
        (bad_signature, 403, "InvalidSignatureException"),
    ):
        assert caught.value.response["Error"]["Code"] == code
        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status


async def test_ses_signature_is_verified() -> None:
    emulator = ses_emulator()
    body = json.dumps(SES_MAIL).encode()
    async with running(emulator), client(emulator) as http:
        url = "/v2/email/outbound-emails"
        headers, _ = signed(emulator.url, body)
        good = await http.post(url, content=body, headers=headers)
        tampered_body = body.replace(b"ann@example.com", b"mallory@example.com")
        tampered = await http.post(url, content=tampered_body, headers=headers)
        other_header = await http.post(
            url, content=body, headers={**headers, "X-Amz-Date": "20200101T000000Z"}
        )
        wrong_secret = await http.post(
            url, content=body, headers=signed(emulator.url, body, "x")[0]
        )
        unsigned = await http.post(url, content=body, headers={"Content-Type": "application/json"})
        unknown_key = await http.post(
            url,
            content=body,
            headers={
                **headers,
                "Authorization": headers["Authorization"].replace("AKIDTEST", "AKIDOTHER"),
            },
        )
    assert good.status_code == 200 and good.json()["MessageId"] == emulator.emails[0].id
    for refused, code in (
        (tampered, "InvalidSignatureException"),
        (other_header, "InvalidSignatureException"),
        (wrong_secret, "InvalidSignatureException"),
        (unsigned, "MissingAuthenticationTokenException"),
        (unknown_key, "UnrecognizedClientException"),
    ):
        assert refused.status_code == 403
        assert refused.headers["x-amzn-errortype"] == code
        assert "message" in refused.json()
    assert emulator.count == 1


async def test_ses_validation() -> None:
    emulator = ses_emulator()
    cases = [
        {**SES_MAIL, "Destination": {"ToAddresses": ["nope"]}},
        {**SES_MAIL, "Destination": {}},
        {**SES_MAIL, "Destination": {"ToAddresses": [f"u{i}@example.com" for i in range(51)]}},
        {k: v for k, v in SES_MAIL.items() if k != "FromEmailAddress"},
        {**SES_MAIL, "Content": {"Simple": {"Subject": {"Data": "x"}, "Body": {}}}},
        {**SES_MAIL, "EmailTags": [{"Name": "bad tag", "Value": "x"}]},
    ]
    async with running(emulator), client(emulator) as http:
        answers = []
        for case in cases:
            headers, body = signed(emulator.url, json.dumps(case).encode())
            answers.append(
                await http.post("/v2/email/outbound-emails", content=body, headers=headers)
            )
    assert [a.status_code for a in answers] == [400] * len(cases)
    assert {a.headers["x-amzn-errortype"] for a in answers} == {"BadRequestException"}
    assert emulator.count == 0


# -- every provider -------------------------------------------------------------------


def test_public_surface() -> None:
    assert sorted(PROVIDERS) == ["mailgun", "postmark", "resend", "sendgrid", "ses"]
    for name in PROVIDERS:
        cls = emulator_class(name)
        assert cls.provider == name and cls.max_body_bytes > 1024 * 1024
        assert cls.__module__.endswith(name) and "documented behaviour" in (
            sys.modules[cls.__module__].__doc__ or ""
        )


@pytest.mark.parametrize("provider", sorted(PROVIDERS))
async def test_every_provider_answers_faults_in_its_shape(provider: str) -> None:
    emulator = emulator_class(provider)()
    async with running(emulator), client(emulator) as http:
        emulator.set_faults({"status": 503, "count": 1})
        answer = await http.post("/anything", json={})
        emulator.set_faults({"status": 413})
        too_large = await http.post("/anything", json={})
        unknown = await http.post("/no/such/route", json={})
    assert answer.status_code == 503 and too_large.status_code == 413
    assert unknown.status_code == 404
    stats = emulator.statistics()
    assert (stats.requests, stats.injected, stats.rejected, stats.accepted) == (3, 2, 1, 0)


# -- the process mode -----------------------------------------------------------------


async def test_process_mode_ready_line_faults_and_sigterm() -> None:
    command = [
        sys.executable,
        "-m",
        "fixtures.providers",
        "--provider",
        "resend",
        "--port",
        "0",
        "--key",
        "re_test",
    ]
    process = await trio.lowlevel.open_process(command, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(10):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive_some(1)
        words = line.decode().split()
        assert words[:3] == ["emulator", "resend", "ready"]
        async with httpx.AsyncClient(base_url=words[3], timeout=5) as http:
            accepted = await http.post("/emails", json=EMAIL, headers=RESEND)
            await http.post("/_emulator/faults", json={"delay_s": 0.2, "status": 429})
            started = trio.current_time()
            limited = await http.post("/emails", json=EMAIL, headers=RESEND)
            assert trio.current_time() - started >= 0.2
            await http.post("/_emulator/faults", json={"clear": True, "accept_then_hang": 1})
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/emails", json=EMAIL, headers=RESEND, timeout=0.3)
            await http.post("/_emulator/faults", json={"down": True})
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await http.post("/emails", json=EMAIL, headers=RESEND)
            listed = (await http.get("/_emulator/emails")).json()
        assert accepted.status_code == 200 and limited.status_code == 429
        assert listed["count"] == 2 and listed["emails"][0]["id"] == accepted.json()["id"]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
