"""Secrets are redacted everywhere: one helper (``engine.config.redact_url``) for the
start-up banner, logs, error messages, ``/v1`` answers and the repr of settings.

The end-to-end test starts ``engine serve`` with a password in redis.url (a Redis with
requirepass) and in smtp.url (an SMTP server that wants AUTH over STARTTLS), makes it
deliver, then fail, and looks for the passwords everywhere it can be read.
"""

from __future__ import annotations

import base64
import contextlib
import ssl
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from engine.config import (
    AuthSettings,
    QueueSettings,
    Settings,
    SmtpSettings,
    load_settings,
    redact_url,
)
from engine.embedded import RedisServer, free_port
from engine.errors import ConfigError, TransportUnavailable
from engine.queue import Queue, open_redis
from engine.transport import OutgoingMail, SmtpPool
from engine.transport.smtp import SmtpUrl
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.engine import EngineProcess

HOST = "127.0.0.1"
REDIS_PW = "redispw-7c1f93"
SMTP_USER, SMTP_PW = "mailer", "smtppw-9d2e41"


def secret_forms() -> list[str]:
    """Each password, and the SMTP one as AUTH PLAIN and LOGIN would encode it."""
    plain = base64.b64encode(f"\0{SMTP_USER}\0{SMTP_PW}".encode()).decode()
    return [REDIS_PW, SMTP_PW, plain, base64.b64encode(SMTP_PW.encode()).decode()]


def assert_no_secret(where: str, text: str) -> None:
    for form in secret_forms():
        assert form not in text, f"a password ({form!r}) shows in {where}"


# -- the helper ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("smtp://mailer:secret@mx.example.com:587", "smtp://mailer:***@mx.example.com:587"),
        ("redis://:secret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://default:secret@cache:6380/2", "rediss://default:***@cache:6380/2"),
        ("smtp://mailer:pa/ss@w@mx.example.com", "smtp://mailer:***@mx.example.com"),
        ("redis://cache:6379/0?password=secret&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("smtp://mx.example.com:25", "smtp://mx.example.com:25"),
        ("smtp://mailer@mx.example.com", "smtp://mailer@mx.example.com"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_repr_of_settings_hides_passwords_and_keys() -> None:
    settings = load_settings(
        environ={
            "ENGINE_REDIS_URL": f"redis://:{REDIS_PW}@cache:6379/0",
            "ENGINE_SMTP_URL": f"smtp://{SMTP_USER}:{SMTP_PW}@mx.example.com:587",
        }
    )
    for text in (repr(settings), str(settings), f"{settings!r}", repr(settings.smtp)):
        assert_no_secret("repr(settings)", text)
    assert "smtp://mailer:***@mx.example.com:587" in repr(settings)
    assert "redis://:***@cache:6379/0" in repr(settings.redis)
    assert "admin_key='***'" in repr(AuthSettings(admin_key="ek_0123456789ab_" + "x" * 43))
    assert repr(Settings()).startswith("Settings(redis=RedisSettings(url=None,")
    assert SMTP_PW not in repr(SmtpUrl.parse(f"smtp://{SMTP_USER}:{SMTP_PW}@h:587"))


def test_a_malformed_redis_url_error_hides_the_password() -> None:
    async def go() -> None:
        async with open_redis(f"redis://:{REDIS_PW}@cache:port/0"):
            pass

    with pytest.raises(ConfigError) as info:
        trio.run(go)
    assert str(info.value).startswith("redis.url 'redis://:***@cache:port/0': ")
    assert_no_secret("the error", str(info.value))


def _mail() -> OutgoingMail:
    data = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: x\r\n\r\nHi.\r\n"
    return OutgoingMail("J1", "a@example.org", ["b@example.com"], data)


async def test_failing_connections_say_where_not_the_password(
    redis_with_password: RedisServer,
) -> None:
    closed = free_port()
    pool = SmtpPool(
        SmtpSettings(connect_timeout_s=2.0), f"smtp://{SMTP_USER}:{SMTP_PW}@{HOST}:{closed}"
    )
    try:
        [(_, failure)] = [item async for item in pool.send_many([_mail()])]
    finally:
        await pool.aclose()
    assert isinstance(failure, TransportUnavailable)
    assert f"{HOST}:{closed}" in str(failure)
    assert_no_secret("the SMTP error", str(failure))

    for url in (
        f"redis://:{REDIS_PW}@{HOST}:{closed}/0",  # nobody listens
        f"redis://:wrong-{REDIS_PW}@{HOST}:{redis_with_password.port}/0",  # refused
    ):
        try:
            async with open_redis(url, connect_timeout_s=2.0) as client:
                await Queue(client, QueueSettings(), "redaction").ping()
        except BaseException as exc:  # coredis's task group may wrap it in a group
            text = "".join(traceback.format_exception(exc))
        else:
            pytest.fail(f"{redact_url(url)} answered")
        assert "QueueUnavailable" in text or "QueueError" in text, text
        assert_no_secret("the Redis error and its traceback", text)


# -- the whole engine ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_with_password() -> Iterator[RedisServer]:
    with RedisServer(password=REDIS_PW, appendonly=False) as server:
        yield server


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[tuple[Controller, list[bytes], str]]:
    """An SMTP server that offers AUTH only after STARTTLS; (controller, received, CA file)."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST, "localhost").configure_cert(tls)
    received: list[bytes] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            received.append(envelope.original_content)
            return "250 2.0.0 Ok: queued"

    def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and data == (SMTP_USER.encode(), SMTP_PW.encode())
        return AuthResult(success=ok, handled=False)

    controller = Controller(
        Handler(), hostname=HOST, port=free_port(), tls_context=tls, require_starttls=True,
        authenticator=check, auth_required=True,
    )  # fmt: skip
    controller.start()
    try:
        yield controller, received, str(ca_file)
    finally:
        with contextlib.suppress(AssertionError):  # the test may have stopped it
            controller.stop()


def _wait(predicate: Any, what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (got := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return got


def test_passwords_show_nowhere(
    redis_with_password: RedisServer,
    smtp_server: tuple[Controller, list[bytes], str],
    tmp_path: Path,
) -> None:
    controller, received, ca_file = smtp_server
    smtp_url = f"smtp://{SMTP_USER}:{SMTP_PW}@{HOST}:{controller.port}"
    engine = EngineProcess(
        redis_with_password.url, smtp_url, tmp_path, "--log-level", "debug",
        env={"ENGINE_SMTP__TLS_CA_FILE": ca_file, "ENGINE_SENDER__BREAKER_PROBE_S": "0.2"},
    )  # fmt: skip
    seen: dict[str, str] = {}
    try:
        with httpx.Client(base_url=engine.base, timeout=10, headers=AUTH) as http:
            message = {"to": "ann@example.com", "subject": "redaction", "text": "hi"}
            first = http.post("/v1/messages", json=message)
            assert first.status_code == 202, first.text
            _wait(lambda: received, "the delivery over STARTTLS with AUTH")

            # The SMTP server goes away: the next message fails to connect.
            controller.stop()
            second = http.post("/v1/messages", json=message)
            assert second.status_code == 202, second.text

            def down() -> dict[str, Any] | None:
                [view] = http.get("/v1/transports").json()["transports"]
                return view if view["state"] == "down" else None

            view = _wait(down, "the transport to be down")
            assert f"{HOST}:{controller.port}" in view["reason"]
            seen["the failing connection's error"] = view["reason"]
            for path in ("/v1", "/v1/transports", "/metrics", "/v1/stats", "/readyz",
                         f"/v1/messages/{first.json()['id']}",
                         f"/v1/messages/{second.json()['id']}"):  # fmt: skip
                answer = http.get(path)
                assert answer.status_code == 200, (path, answer.text)
                seen[f"GET {path}"] = answer.text
    finally:
        code = engine.stop()
    output = engine.output()
    seen["stdout and stderr"] = output
    assert code == 0, output[-3000:]
    # The banner was printed, with the URLs redacted rather than left out.
    assert f"redis://:***@{HOST}:{redis_with_password.port}/0" in output
    assert f"smtp://{SMTP_USER}:***@{HOST}:{controller.port}" in output
    assert "sender.transport.down" in output, "the failure was logged"
    for where, text in seen.items():
        assert_no_secret(where, text)
        # The admin key (auth.admin_key, from the environment) is a secret too.
        assert TEST_ADMIN_KEY not in text, where
