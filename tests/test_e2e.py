"""End to end with real processes: `engine serve` + `engine sink` + Redis, over TCP."""

from __future__ import annotations

import email
import email.policy
import mailbox
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from engine.embedded import RedisServer, SinkProcess
from fixtures.auth import AUTH, TEST_ADMIN_KEY
from fixtures.engine import EngineProcess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    with SinkProcess(workdir=tmp_path / "sink", maildir=tmp_path / "maildir") as s:
        yield s


def _flush(url: str) -> None:
    import trio

    from engine.queue import open_redis

    async def go() -> None:
        async with open_redis(url) as r:
            await r.flushall()

    trio.run(go)


@pytest.fixture
def engine(redis_server: RedisServer, sink: SinkProcess, tmp_path: Path) -> Iterator[EngineProcess]:
    _flush(redis_server.url)
    e = EngineProcess(redis_server.url, sink.url, tmp_path)
    try:
        yield e
    finally:
        if e.proc.poll() is None:
            assert e.stop() == 0, e.output()


def _read_maildir(path: Path) -> dict[str, email.message.EmailMessage]:
    out: dict[str, email.message.EmailMessage] = {}
    for _, msg in mailbox.Maildir(path, create=False).iteritems():
        parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
        assert isinstance(parsed, email.message.EmailMessage)
        job_id = str(parsed["X-Engine-Job-Id"])
        assert job_id not in out, f"job {job_id} delivered twice"
        out[job_id] = parsed
    return out


def test_single_and_batch_messages_reach_the_sink_exactly_once(
    engine: EngineProcess, sink: SinkProcess, tmp_path: Path
) -> None:
    singles: dict[str, dict[str, object]] = {}
    with httpx.Client(base_url=engine.base, headers=AUTH, timeout=10) as client:
        # The admin key's tenant ("default") may send From example.com addresses.
        r = client.put("/v1/tenants/default", json={"identities": ["example.com"]})
        assert r.status_code in (200, 201), r.text
        for i in range(20):
            body = {
                "to": [f"user{i}@example.com"],
                "cc": "cc@example.org",
                "bcc": "hidden@example.net",
                "from": "Shop <shop@example.com>",
                "subject": f"Order {i} — confirmed",
                "text": f"Hello {i}\n.leading dot line\n",
                "headers": {"X-Campaign": "e2e"},
                "reply_to": "help@example.com",
                "tags": ["e2e"],
            }
            r = client.post("/v1/messages", json=body)
            assert r.status_code == 202, r.text
            singles[r.json()["id"]] = body
        batch = [
            {
                "to": f"b{i}@example.com",
                "subject": f"Batch {i}",
                "text": f"batch body {i}",
                "html": f"<p>batch body {i}</p>",
            }
            for i in range(300)
        ]
        r = client.post("/v1/messages/batch", json={"messages": batch})
        assert r.status_code == 202, r.text
        batch_ids = r.json()["ids"]
        assert len(batch_ids) == 300

        all_ids = set(singles) | set(batch_ids)
        records = sink.wait_received(len(all_ids), timeout=30)
        assert len(records) == len(all_ids)
        assert sorted(rec["job_id"] for rec in records) == sorted(all_ids)  # each exactly once
        for rec in records:
            if rec["job_id"] in singles:
                assert sorted(rec["rcpt_tos"]) == sorted(
                    [
                        singles[rec["job_id"]]["to"][0],  # type: ignore[index]
                        "cc@example.org",
                        "hidden@example.net",
                    ]
                )

        # The engine's status agrees.
        for job_id in list(all_ids)[:25]:
            deadline = time.monotonic() + 5
            while (state := client.get(f"/v1/messages/{job_id}").json()["state"]) != "sent":
                assert time.monotonic() < deadline, state
                time.sleep(0.05)

    mails = _read_maildir(tmp_path / "maildir")
    assert set(mails) == all_ids
    for job_id, body in singles.items():
        m = mails[job_id]
        assert m["Message-ID"] == f"<{job_id}@engine.localhost>"
        assert m["Subject"] == body["subject"]
        assert m["From"] == "Shop <shop@example.com>"
        assert m["Cc"] == "cc@example.org"
        assert m["Bcc"] is None  # never in the headers
        assert m["Reply-To"] == "help@example.com"
        assert m["X-Campaign"] == "e2e"
        assert m.get_content() == body["text"]
    for i, job_id in enumerate(batch_ids):
        m = mails[job_id]
        assert m.get_content_type() == "multipart/alternative"
        plain = m.get_body(("plain",))
        html = m.get_body(("html",))
        assert plain is not None and plain.get_content().strip() == f"batch body {i}"
        assert html is not None and html.get_content().strip() == f"<p>batch body {i}</p>"


def test_engine_send_cli_prints_an_id_that_is_delivered(
    engine: EngineProcess, sink: SinkProcess
) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "send",
            "--url",
            engine.base,
            "--key",
            TEST_ADMIN_KEY,
            "--to",
            "cli@example.com",
            "--subject",
            "From the CLI",
            "--text",
            "hello",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    (rec,) = sink.wait_received(1, timeout=10)
    assert rec["job_id"] == job_id and rec["rcpt_tos"] == ["cli@example.com"]


def test_engine_send_cli_reports_validation_errors(engine: EngineProcess) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "send",
            "--url",
            engine.base,
            "--key",
            TEST_ADMIN_KEY,
            "--to",
            "broken",
            "--text",
            "x",
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 1
    assert "422" in out.stderr and '"field":"to"' in out.stderr


def test_sigterm_exits_zero(engine: EngineProcess) -> None:
    assert engine.stop() == 0
    assert "engine.stopped" in engine.output()


def test_second_signal_exits_at_once(redis_server: RedisServer, tmp_path: Path) -> None:
    _flush(redis_server.url)
    # The sink holds every final reply for 5 s: the engine is mid-send when signalled.
    with SinkProcess(workdir=tmp_path / "slow-sink", extra_args=["--delay-ms", "5000"]) as slow:
        e = EngineProcess(redis_server.url, slow.url, tmp_path / "e2")
        msg = {"to": "a@example.com", "text": "x"}
        r = httpx.post(e.base + "/v1/messages", json=msg, headers=AUTH)
        assert r.status_code == 202
        deadline = time.monotonic() + 5
        job = e.base + f"/v1/messages/{r.json()['id']}"
        while httpx.get(job, headers=AUTH).json()["state"] != "processing":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        e.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        start = time.monotonic()
        e.proc.send_signal(signal.SIGTERM)  # impatient operator: stop now
        code = e.proc.wait(10)
        assert code == 0 and time.monotonic() - start < 2.0, e.output()
        assert "second signal" in e.output()


def test_admin_routes_answer_503_while_redis_is_down(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "own-redis") as own:
        e = EngineProcess(own.url, "smtp://127.0.0.1:9", tmp_path / "e3", "--role", "api")
        assert httpx.get(e.base + "/v1/dead", headers=AUTH).status_code == 200
        own.kill()
        dead = e.base + "/v1/dead"
        for r in (httpx.get(dead, headers=AUTH), httpx.post(dead + "/retry", headers=AUTH)):
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.headers["content-type"] == "application/problem+json"
        assert e.stop() == 0


def test_engine_send_cli_names_a_template_with_variables(
    engine: EngineProcess, sink: SinkProcess
) -> None:
    with httpx.Client(base_url=engine.base, headers=AUTH, timeout=10) as client:
        made = client.post("/v1/templates", json={
            "name": "cli-welcome", "subject": "Hi {{ name }}", "text": "Code {{ code }}",
        })  # fmt: skip
        assert made.status_code == 201, made.text

        def cli(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "engine", "send", "--url", engine.base,
                 "--key", TEST_ADMIN_KEY, "--to", "tpl@example.com",
                 "--template", "cli-welcome", *extra],
                capture_output=True, check=False, text=True, timeout=30,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip

        missing = cli("--var", "name=Ann")
        assert missing.returncode != 0 and "variables.code" in missing.stderr
        out = cli("--var", "name=Ann", "--var", "code=42", "--unsubscribe")
        assert out.returncode == 0, out.stderr
        job_id = out.stdout.strip()
        deadline = time.monotonic() + 15
        while client.get(f"/v1/messages/{job_id}").json()["state"] != "sent":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while not any(r["job_id"] == job_id for r in sink.received()):  # the sink's log line
        assert time.monotonic() < deadline
        time.sleep(0.05)
