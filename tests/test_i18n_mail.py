"""8bit bodies and internationalised addresses end to end: compose's two forms parse back
(property test), and real servers get the form their EHLO allows -- our sink (aiosmtpd,
8BITMIME and SMTPUTF8), aiosmtpd with either withheld, and Postfix.
"""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from aiosmtpd.controller import Controller
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import SmtpSettings, load_settings
from engine.embedded import RedisServer, SinkProcess, free_port
from engine.errors import PermanentFailure, TransportError
from engine.models import Message
from engine.transport import (
    MemoryTransport,
    OutgoingMail,
    SendOutcome,
    SendResult,
    SmtpPool,
    compose,
)
from engine.transport.smtp import SmtpConnection, SmtpUrl
from fixtures.auth import AUTH
from fixtures.inproc import inprocess_engine
from fixtures.postfix import PostfixServer

JOB = "01J0000000000000000000ABCD"
NOW = 1_700_000_000.0
HOST = "127.0.0.1"
SETTINGS = SmtpSettings(starttls="never", connect_timeout_s=10.0, command_timeout_s=30.0)


def make(**overrides: Any) -> Message:
    fields: dict[str, Any] = dict(
        sender="Ann <ann@example.org>",
        to=["bob@example.test"],
        cc=[],
        bcc=[],
        subject="Hello",
        text="Hi Bob\n",
        html=None,
        headers=[],
        reply_to=[],
        tags=[],
    )
    fields.update(overrides)
    return Message(**fields)


def mail(job_id: str = JOB, **overrides: Any) -> OutgoingMail:
    return compose(job_id, make(**overrides), message_id_domain="engine.test", now=NOW)


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert not msg.defects, msg.defects
    return msg


def body_text(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def wire_lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    return data[:-2].split(b"\r\n")


def normalized(text: str) -> str:
    """What a body becomes: CRLF/CR as LF, and a final newline."""
    text = re.sub(r"\r\n|\r", "\n", text)
    return text if text.endswith("\n") else text + "\n"


def cyrillic_body(size: int) -> str:
    """About ``size`` octets of UTF-8 that is almost all two-octet characters (what
    quoted-printable triples), in 70-character lines."""
    line = ("Съешь же ещё этих мягких французских булок, да выпей чаю. " * 2)[:70] + "\n"
    return line * (size // len(line.encode()))


# -- compose: the property ---------------------------------------------------------------

# Any text a JSON string can carry (no lone surrogates), now and then with a line far
# over 998 octets, which 8bit may not carry.
_CHARS = st.characters(blacklist_categories=("Cs",))
_TEXT = st.lists(
    st.one_of(
        st.text(_CHARS, max_size=80),
        st.builds(lambda c, n: c * n, _CHARS, st.integers(300, 1200)),
    ),
    max_size=6,
).map("\n".join)
# Subjects are validated: no CR or LF, at most 998 characters.
_SUBJECT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.none() | _TEXT, html=st.none() | _TEXT, subject=_SUBJECT.map(lambda s: s[:998]))
def test_both_forms_parse_back_to_the_same_text(
    text: str | None, html: str | None, subject: str
) -> None:
    if text is None and html is None:
        text = ""
    out = compose(JOB, make(text=text, html=html, subject=subject), message_id_domain="d", now=NOW)
    forms = [out.data]
    if out.fallback is None:
        assert out.data.isascii() and not out.needs_8bitmime
    else:
        assert out.needs_8bitmime and not out.data.isascii()
        seven = out.for_server(set())
        assert isinstance(seven, OutgoingMail) and not seven.needs_8bitmime
        assert seven.data.isascii(), "the 7-bit form is pure ASCII"
        forms.append(seven.data)
    for data in forms:
        assert all(len(line) <= 998 for line in wire_lines(data)), "RFC 5322 2.1.1"
        assert b"\0" not in data
        parsed = parse(data)
        assert parsed["Subject"] == subject
        if text is not None:
            assert body_text(parsed, "plain") == normalized(text)
        if html is not None:
            assert body_text(parsed, "html") == normalized(html)


# -- a real aiosmtpd server with extensions withheld ------------------------------------


@dataclass
class Got:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]


@dataclass
class Handler:
    withhold: Sequence[str] = ()  # EHLO keywords not to offer ("8BITMIME")
    received: list[Got] = field(default_factory=list)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        session.host_name = hostname
        return [r for r in responses if r[4:].split(" ")[0] not in self.withhold]

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.received.append(
            Got(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
            )
        )
        return "250 2.0.0 Ok: queued"


@pytest.fixture
def aiosmtpd() -> Iterator[Callable[..., tuple[Handler, str]]]:
    controllers: list[Controller] = []

    def start(*, smtputf8: bool, withhold: Sequence[str] = ()) -> tuple[Handler, str]:
        handler = Handler(withhold=withhold)
        port = free_port(HOST)
        controller = Controller(
            handler,
            hostname=HOST,
            port=port,
            server_hostname="sink.test",
            enable_SMTPUTF8=smtputf8,
            decode_data=False,
        )
        controller.start()
        controllers.append(controller)
        return handler, f"smtp://{HOST}:{port}"

    yield start
    for controller in controllers:
        controller.stop()


async def send(url: str, mails: Sequence[OutgoingMail]) -> list[SendResult | TransportError]:
    pool = SmtpPool(SETTINGS, url)
    try:
        async with aclosing(pool.send_many(mails)) as outcomes:
            got: list[SendOutcome] = [item async for item in outcomes]
    finally:
        await pool.aclose()
    assert [m for m, _ in got] == list(mails)
    return [outcome for _, outcome in got]


async def extensions(url: str) -> dict[str, str]:
    conn = await SmtpConnection.open(SmtpUrl.parse(url), SETTINGS, None)
    try:
        return conn.extensions
    finally:
        await conn.aclose()


async def test_8bit_goes_as_is_or_as_quoted_printable(
    aiosmtpd: Callable[..., tuple[Handler, str]],
) -> None:
    m = mail(text="Grüße aus Köln\n", html="<p>ascii</p>")
    assert m.needs_8bitmime
    with_8bit, url = aiosmtpd(smtputf8=False)
    without, url_7bit = aiosmtpd(smtputf8=False, withhold=["8BITMIME"])
    assert "8BITMIME" in await extensions(url)
    assert "8BITMIME" not in await extensions(url_7bit)
    [ok] = await send(url, [m])
    [ok_7bit] = await send(url_7bit, [m])
    assert isinstance(ok, SendResult) and isinstance(ok_7bit, SendResult)
    [got] = with_8bit.received
    assert got.data == m.data
    assert got.mail_options == [f"SIZE={len(m.data)}", "BODY=8BITMIME"]
    [got_7bit] = without.received
    assert got_7bit.data.isascii() and got_7bit.data == m.data_for(set())
    assert got_7bit.mail_options == [f"SIZE={len(got_7bit.data)}"]
    for data in (got.data, got_7bit.data):
        assert body_text(parse(data), "plain") == "Grüße aus Köln\n"


async def test_without_smtputf8_domains_become_a_labels_and_utf8_local_parts_fail(
    aiosmtpd: Callable[..., tuple[Handler, str]],
) -> None:
    handler, url = aiosmtpd(smtputf8=False)
    assert "SMTPUTF8" not in await extensions(url)
    idn = mail("01J0000000000000000000IDN1", sender="Jörg <jörg@bücher.example>")
    idn_ok = mail("01J0000000000000000000IDN2", to=["Zoë <zoe@bücher.example>"])
    plain = mail("01J0000000000000000000IDN3")
    local = mail("01J0000000000000000000IDN4", to=["ünal@example.test"], text="Grüße\n")
    outcomes = await send(url, [idn, idn_ok, plain, local])
    assert isinstance(outcomes[0], PermanentFailure)
    assert str(outcomes[0]) == (
        "the server does not offer SMTPUTF8; the address <jörg@bücher.example> has a "
        "non-ASCII local part"
    )
    assert isinstance(outcomes[1], SendResult) and isinstance(outcomes[2], SendResult)
    assert isinstance(outcomes[3], PermanentFailure)
    assert "<ünal@example.test> has a non-ASCII local part" in str(outcomes[3])
    got_idn, got_plain = handler.received
    assert got_idn.rcpt_tos == ["zoe@xn--bcher-kva.example"]
    assert "SMTPUTF8" not in got_idn.mail_options
    assert got_idn.data.isascii()
    assert parse(got_idn.data)["To"].addresses[0].addr_spec == "zoe@xn--bcher-kva.example"
    assert parse(got_idn.data)["To"].addresses[0].display_name == "Zoë"
    assert got_plain.data == plain.data


async def test_sink_gets_utf8_addresses_and_8bit_as_they_are(tmp_path: Path) -> None:
    m = mail(
        sender="Jörg <jörg@bücher.example>",
        to=["Zoë <zoë@例え.jp>", "bob@example.test"],
        text="Grüße\n",
    )
    assert m.needs_8bitmime and m.needs_smtputf8
    with SinkProcess(workdir=tmp_path / "sink", maildir=tmp_path / "maildir") as sink:
        offered = await extensions(sink.url)
        assert {"8BITMIME", "SMTPUTF8"} <= set(offered)
        [ok] = await send(sink.url, [m])
        assert isinstance(ok, SendResult), ok
        [got] = sink.wait_received(1)
    assert got["mail_from"] == "jörg@bücher.example"
    assert got["rcpt_tos"] == ["zoë@例え.jp", "bob@example.test"]
    assert got["size"] == len(m.data)
    [stored] = list((tmp_path / "maildir" / "new").iterdir())
    assert stored.read_bytes() == m.data


# -- Postfix: the 4 MB body of the issue ------------------------------------------------

# Postfix's default message_size_limit (10240000), as the server had ~10 MB.
POSTFIX_LIMIT = 10_240_000


def delivered_size(server: PostfixServer, job_id: str) -> int:
    """The size Postfix logged for the message (what it received, plus its own
    Received header)."""
    for line in server.logs().splitlines():
        if f"message-id=<{job_id}@" in line:
            queue_id = line.split(": ")[1]
            break
    else:
        raise AssertionError(f"no message-id {job_id} in the log")
    sizes = re.findall(rf"{queue_id}: from=<[^>]*>, size=(\d+)", server.logs())
    return int(sizes[0])


async def test_postfix_takes_a_4mb_accented_body_as_8bit() -> None:
    big = mail("01J00000000000000000BIG8BT", text=cyrillic_body(4_000_000))
    assert big.needs_8bitmime
    seven = big.for_server(set())
    assert isinstance(seven, OutgoingMail)
    assert 3_950_000 < len(big.data) < 4_050_000
    assert len(seven.data) > 11_000_000  # what the issue saw: ~12 MB of quoted-printable
    main_cf = {"message_size_limit": str(POSTFIX_LIMIT)}
    with PostfixServer(implicit_tls=False, main_cf=main_cf) as server:
        offered = await extensions(server.url())
        assert {"8BITMIME", "SMTPUTF8"} <= set(offered)
        assert offered["SIZE"] == str(POSTFIX_LIMIT)
        [ok] = await send(server.url(), [big])
        assert isinstance(ok, SendResult), ok
        [got] = server.wait_received(1, timeout=30)
        size = delivered_size(server, big.job_id)
    assert len(big.data) <= size < len(big.data) + 1000  # + Postfix's Received header
    assert got.message["Content-Transfer-Encoding"] == "8bit"
    assert body_text(got.message, "plain") == cyrillic_body(4_000_000)


async def test_postfix_without_8bitmime_and_smtputf8_gets_7bit() -> None:
    # Postfix can withhold EHLO keywords: a server that speaks neither extension. The
    # 4 MB body as quoted-printable is over its 10 MB limit: refused before the wire.
    big = mail("01J00000000000000000BIG7BT", text=cyrillic_body(4_000_000))
    small = mail("01J00000000000000000SML7BT", text=cyrillic_body(100_000))
    idn = mail("01J0000000000000000IDN7BT", to=["Zoë <zoe@bücher.test>"])
    local = mail("01J0000000000000000LOC7BT", to=["ünal@example.test"])
    main_cf = {
        "message_size_limit": str(POSTFIX_LIMIT),
        "smtpd_discard_ehlo_keywords": "8bitmime, smtputf8",
    }
    domains = ("example.test", "xn--bcher-kva.test")
    with PostfixServer(implicit_tls=False, domains=domains, main_cf=main_cf) as server:
        offered = await extensions(server.url())
        assert "8BITMIME" not in offered and "SMTPUTF8" not in offered
        refused, ok, idn_ok, local_refused = await send(server.url(), [big, small, idn, local])
        assert isinstance(refused, PermanentFailure)
        assert f"the server takes {POSTFIX_LIMIT}" in str(refused)
        assert isinstance(ok, SendResult), ok
        assert isinstance(idn_ok, SendResult), idn_ok
        assert isinstance(local_refused, PermanentFailure)
        assert "<ünal@example.test> has a non-ASCII local part" in str(local_refused)
        by_id = {m.message["Message-ID"]: m for m in server.wait_received(2, timeout=30)}
        size = delivered_size(server, small.job_id)
    got = by_id[f"<{small.job_id}@engine.test>"]
    got_idn = by_id[f"<{idn.job_id}@engine.test>"]
    assert got_idn.recipient == "zoe@xn--bcher-kva.test"
    assert got_idn.message["To"].addresses[0].addr_spec == "zoe@xn--bcher-kva.test"
    assert got_idn.message["To"].addresses[0].display_name == "Zoë"
    small_7bit = small.data_for(set())
    assert small_7bit.isascii() and len(small_7bit) > 2.5 * len(small.data)
    assert len(small_7bit) <= size < len(small_7bit) + 1000
    assert got.message["Content-Transfer-Encoding"] == "quoted-printable"
    assert body_text(got.message, "plain") == cyrillic_body(100_000)


async def test_postfix_with_smtputf8_gets_utf8_addresses() -> None:
    utf8 = mail("01J0000000000000000UTF8AA", to=["Ünal <ünal@example.test>"], text="Grüße\n")
    idn = mail("01J0000000000000000IDNAAA", to=["zoe@bücher.test"])
    domains = ("example.test", "xn--bcher-kva.test")  # Postfix matches U-labels to these
    with PostfixServer(implicit_tls=False, domains=domains) as server:
        ok = await send(server.url(), [utf8, idn])
        assert all(isinstance(o, SendResult) for o in ok), ok
        got = {m.message["Message-ID"]: m for m in server.wait_received(2)}
    first = got[f"<{utf8.job_id}@engine.test>"]
    assert first.recipient == "ünal@example.test"
    assert body_text(first.message, "plain") == "Grüße\n"
    assert got[f"<{idn.job_id}@engine.test>"].recipient == "zoe@bücher.test"


# -- the API -----------------------------------------------------------------------------


async def test_api_takes_international_addresses(redis_server: RedisServer) -> None:
    from engine.queue import open_redis

    async with open_redis(redis_server.url) as r:
        await r.flushall()
    bind = f"127.0.0.1:{free_port()}"
    settings = load_settings(environ={}, overrides={"http": {"bind": bind}})
    transport = MemoryTransport()
    body = {
        "from": "Jörg <jörg@Bücher.example>",
        "to": ["用户@例子.广告", "ann@xn--mnchen-3ya.de"],
        "subject": "Grüße",
        "text": "Grüße\n",
    }
    async with (
        inprocess_engine(settings, redis_server.url, transport),
        httpx.AsyncClient(base_url=f"http://{bind}", headers=AUTH, timeout=10) as client,
    ):
        # The tenant may send From its (internationalized) domain.
        put = await client.put("/v1/tenants/default", json={"identities": ["bücher.example"]})
        assert put.status_code in (200, 201), put.text
        accepted = await client.post("/v1/messages", json=body)
        assert accepted.status_code == 202, accepted.text
        bad = await client.post("/v1/messages", json={**body, "cc": ["a\u202eb@example.com"]})
        with trio.fail_after(10):
            await transport.wait_sent(1)
    assert bad.status_code == 422
    assert bad.json()["field"] == "cc[0]"
    assert "U+202E may not appear in a local part" in bad.json()["detail"]
    [sent] = transport.sent
    assert sent.sender == "jörg@bücher.example"  # the U-label in canonical (lower) case
    assert sent.recipients == ["用户@例子.广告", "ann@xn--mnchen-3ya.de"]
    assert sent.needs_smtputf8 and sent.needs_8bitmime
    assert isinstance(sent.for_server({"8BITMIME"}), PermanentFailure)
