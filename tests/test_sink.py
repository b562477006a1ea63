"""The SMTP sink, driven as a real subprocess through fixtures.sink (smtplib and raw sockets)."""

from __future__ import annotations

import asyncio
import mailbox
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from email._header_value_parser import get_angle_addr
from pathlib import Path

import pytest

from engine.sink.faults import decide_rcpt
from engine.sink.headers import scan_ids
from engine.sink.protocol import DATA_LINE_LIMIT, fast_addr, read_data_lines, unstuff
from fixtures.sink import REPO_ROOT, SINK_COMMAND, SinkError, SinkProcess


def message(mid: str, job: str = "job-1", body: str = "hello") -> bytes:
    return (
        f"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n"
        f"Message-ID: {mid}\r\nX-Engine-Job-Id: {job}\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    with SinkProcess(workdir=tmp_path / "sink") as proc:
        yield proc


def connect(sink: SinkProcess) -> smtplib.SMTP:
    return smtplib.SMTP(sink.host, sink.port, timeout=10)


# --- pure parts -------------------------------------------------------------------------


def test_scan_ids_finds_headers_case_insensitively_and_unfolds() -> None:
    raw = (
        b"Subject: x\r\nmessage-id:\r\n <a@b>\r\nX-ENGINE-JOB-ID:  j-9 \r\n"
        b"\r\nMessage-ID: <in-body@x>\r\n"
    )
    assert scan_ids(raw) == (b"<a@b>", b"j-9")


def test_scan_ids_ignores_the_body_and_lookalike_headers() -> None:
    assert scan_ids(b"X-Message-ID: <no>\r\n\r\nMessage-ID: <body>\r\n") == (None, None)
    assert scan_ids(b"\r\nMessage-ID: <body>\r\n") == (None, None)
    assert scan_ids(b"Message-ID: <bare-lf>\n\nbody\n") == (b"<bare-lf>", None)
    assert scan_ids(b"Message-ID: <first>\r\nMessage-ID: <second>\r\n\r\n").message_id == (
        b"<first>"
    )


def test_decide_rcpt_tags() -> None:
    assert decide_rcpt("user@example.com") is None
    assert decide_rcpt("user+tag@example.com") is None
    assert str(decide_rcpt("user+550@example.com")) == "550 5.1.1 user unknown"
    assert str(decide_rcpt("user+x+451@example.com")) == "451 4.3.0 try again"


@pytest.mark.parametrize(
    "arg",
    [
        "<a@b>",
        "<a@b> SIZE=10 BODY=8BITMIME",
        "<first.last+tag@sub.example.com>",
        "<o'hara!#$%&*/=?^_`{|}~-@x-y.z>",
        "<a@b>SMTPUTF8",
    ],
)
def test_fast_addr_agrees_with_aiosmtpd(arg: str) -> None:
    address, rest = get_angle_addr(arg)
    assert fast_addr(arg) == (address.addr_spec, rest)


@pytest.mark.parametrize(
    "arg",
    ["<>", '<"x y"@b>', "<@route:a@b>", "<a@[1.2.3.4]>", "<ä@b>", "a@b", "<a..b@c>", "<a@b"],
)
def test_fast_addr_leaves_unusual_addresses_to_aiosmtpd(arg: str) -> None:
    assert fast_addr(arg) is None


def test_unstuff_removes_transparency_dots() -> None:
    assert unstuff(b"") == b""
    assert unstuff(b"..\r\n") == b".\r\n"
    assert unstuff(b"a\r\n..b\r\n...\r\nc.\r\n") == b"a\r\n.b\r\n..\r\nc.\r\n"
    assert unstuff(b".lead\r\nbare\n.lf\r\n") == b"lead\r\nbare\n.lf\r\n"


def test_unstuff_refuses_overlong_lines() -> None:
    longest = b"x" * (DATA_LINE_LIMIT - 2) + b"\r\n"
    assert unstuff(b"a\r\n" + longest) == b"a\r\n" + longest
    assert str(unstuff(b"a\r\nx" + longest)).startswith("500 ")


def read_data(raw: bytes, *, reader_limit: int = 64, size_limit: int | None = None) -> object:
    async def go() -> tuple[bytes | None, bytes]:
        reader = asyncio.StreamReader(limit=reader_limit)
        reader.feed_data(raw)
        reader.feed_eof()
        lines = await read_data_lines(reader, size_limit)
        return lines, await reader.read()

    return asyncio.run(go())


def test_read_data_lines_stops_at_the_lone_dot_only() -> None:
    body = b"one.\r\n..\r\nx" * 40 + b"\r\nlast.\r\n"
    assert read_data(body + b".\r\nQUIT\r\n") == (body, b"QUIT\r\n")
    assert read_data(b".\r\nMAIL FROM:<a@b>\r\n") == (b"", b"MAIL FROM:<a@b>\r\n")
    assert read_data(b"\r\n.\r\n") == (b"\r\n", b"")


def test_read_data_lines_drops_what_exceeds_the_size_limit() -> None:
    body = b"y" * 70 + b"\r\n"
    assert read_data(body * 3 + b".\r\nNOOP\r\n", size_limit=len(body) * 3) == (
        body * 3,
        b"NOOP\r\n",
    )
    assert read_data(body * 50 + b".\r\nNOOP\r\n", size_limit=100) == (None, b"NOOP\r\n")


# --- the process ------------------------------------------------------------------------


def test_ready_file_gives_a_real_port(sink: SinkProcess) -> None:
    assert sink.host == "127.0.0.1"
    assert sink.port > 0
    assert sink.url == f"smtp://127.0.0.1:{sink.port}"
    assert f"sink listening on 127.0.0.1:{sink.port}" in sink.stdout_file.read_text()


def test_single_message_is_logged_and_counted(sink: SinkProcess) -> None:
    with connect(sink) as client:
        client.sendmail("a@example.com", ["b@example.com", "c@example.com"], message("<m1@x>"))
    [entry] = sink.wait_received(1)
    assert entry["message_id"] == "<m1@x>"
    assert entry["job_id"] == "job-1"
    assert entry["mail_from"] == "a@example.com"
    assert entry["rcpt_tos"] == ["b@example.com", "c@example.com"]
    assert entry["size"] == len(message("<m1@x>"))
    assert isinstance(entry["at"], float)
    stats = sink.wait_stats(received=1)
    assert stats["unique_message_ids"] == 1
    assert stats["duplicates"] == 0
    assert stats["bytes"] == entry["size"]
    assert stats["connections"] == 1


def test_several_messages_over_one_connection(sink: SinkProcess) -> None:
    with connect(sink) as client:
        for i in range(5):
            client.sendmail("a@example.com", ["b@example.com"], message(f"<m{i}@x>", f"j{i}"))
    got = sink.wait_received(5)
    assert [e["message_id"] for e in got] == [f"<m{i}@x>" for i in range(5)]
    assert [e["job_id"] for e in got] == [f"j{i}" for i in range(5)]
    stats = sink.wait_stats(received=5)
    assert stats["connections"] == 1
    assert stats["unique_message_ids"] == 5


def test_same_message_id_twice_counts_a_duplicate(sink: SinkProcess) -> None:
    with connect(sink) as client:
        client.sendmail("a@example.com", ["b@example.com"], message("<dup@x>"))
        client.sendmail("a@example.com", ["b@example.com"], message("<dup@x>"))
        client.sendmail("a@example.com", ["b@example.com"], message("<other@x>"))
    stats = sink.wait_stats(received=3)
    assert stats["duplicates"] == 1
    assert stats["unique_message_ids"] == 2


def test_maildir_keeps_the_message(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    raw = message("<md@x>", body="stored body")
    with SinkProcess(workdir=tmp_path / "sink", maildir=maildir) as sink:
        with connect(sink) as client:
            client.sendmail("a@example.com", ["b@example.com"], raw)
        sink.stop()
    stored = [bytes(m.as_bytes()) for m in mailbox.Maildir(maildir, create=False)]
    assert len(stored) == 1
    assert b"Message-ID: <md@x>" in stored[0]
    assert b"stored body" in stored[0]
    assert (maildir / "new").is_dir()
    assert not list((maildir / "tmp").iterdir())


def test_ehlo_advertises_pipelining_8bitmime_smtputf8(sink: SinkProcess) -> None:
    with connect(sink) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert client.has_extn("pipelining")
        assert client.has_extn("8bitmime")
        assert client.has_extn("smtputf8")


def test_smtputf8_message_is_accepted(sink: SinkProcess) -> None:
    raw = "Message-ID: <ü@x>\r\nSubject: grüße\r\n\r\nß\r\n".encode()
    with connect(sink) as client:
        client.sendmail("ä@example.com", ["ö@example.com"], raw, mail_options=["SMTPUTF8"])
    [entry] = sink.wait_received(1)
    assert entry["mail_from"] == "ä@example.com"
    assert entry["rcpt_tos"] == ["ö@example.com"]
    assert entry["message_id"] == "<ü@x>"


def read_replies(sock: socket.socket, count: int) -> list[str]:
    """Read ``count`` complete SMTP replies; return each reply's last line."""
    buf = b""
    replies: list[str] = []
    while len(replies) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after replies {replies}"
        buf += chunk
        *lines, buf = buf.split(b"\r\n")
        replies.extend(line.decode() for line in lines if line[3:4] == b" ")
    assert buf == b""
    return replies


def test_pipelined_burst_is_answered_in_order(sink: SinkProcess) -> None:
    with socket.create_connection((sink.host, sink.port), timeout=10) as sock:
        read_replies(sock, 1)  # greeting
        sock.sendall(b"EHLO client.test\r\n")
        read_replies(sock, 1)
        sock.sendall(
            b"MAIL FROM:<a@example.com>\r\n"
            b"RCPT TO:<b@example.com>\r\n"
            b"RCPT TO:<nobody+550@example.com>\r\n"
            b"RCPT TO:<c@example.com>\r\n"
            b"DATA\r\n"
        )
        replies = read_replies(sock, 5)
        assert [r[:3] for r in replies] == ["250", "250", "550", "250", "354"]
        # The end of data may open the next group (RFC 2920): body, dot and a whole
        # second transaction in one write.
        sock.sendall(
            message("<p1@x>", "jp1")
            + b".\r\n"
            + b"MAIL FROM:<a@example.com>\r\nRCPT TO:<d@example.com>\r\nDATA\r\n"
        )
        replies = read_replies(sock, 4)
        assert [r[:3] for r in replies] == ["250", "250", "250", "354"]
        sock.sendall(message("<p2@x>", "jp2") + b".\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(sock, 2)] == ["250", "221"]
    got = sink.wait_received(2)
    assert [(e["message_id"], e["rcpt_tos"]) for e in got] == [
        ("<p1@x>", ["b@example.com", "c@example.com"]),
        ("<p2@x>", ["d@example.com"]),
    ]


def test_message_content_survives_dot_stuffing_and_large_sizes(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    small = message("<dots@x>", body=".\r\n..\r\n.leading\r\nend.\r\n.")
    # Larger than the sink's 64 KiB read block, full of lines that end in a dot.
    big = message("<big@x>", body="A sentence.\r\n" * 30_000)
    with SinkProcess(workdir=tmp_path / "sink", maildir=maildir) as sink:
        with connect(sink) as client:
            client.sendmail("a@example.com", ["b@example.com"], small)
            client.sendmail("a@example.com", ["b@example.com"], big)
        got = sink.wait_received(2)
        assert [e["size"] for e in got] == [len(small), len(big)]
        sink.stop()
    stored = sorted((p.read_bytes() for p in (maildir / "new").iterdir()), key=len)
    assert stored == [small, big]


def test_empty_message_and_overlong_line(sink: SinkProcess) -> None:
    with socket.create_connection((sink.host, sink.port), timeout=10) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO client.test\r\n")
        read_replies(sock, 1)
        sock.sendall(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 3)] == ["250", "250", "354"]
        sock.sendall(b".\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 4)] == ["250", "250", "250", "354"]
        sock.sendall(b"x" * 2000 + b"\r\n.\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(sock, 2)] == ["500", "221"]
    [entry] = sink.wait_received(1)
    assert entry["size"] == 0
    assert entry["message_id"] is None


def test_plus_550_recipient_is_refused_at_rcpt(sink: SinkProcess) -> None:
    with connect(sink) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
            client.sendmail("a@example.com", ["gone+550@example.com"], message("<r@x>"))
        assert info.value.recipients == {"gone+550@example.com": (550, b"5.1.1 user unknown")}
        refused = client.sendmail(
            "a@example.com", ["gone+550@example.com", "ok@example.com"], message("<r2@x>")
        )
        assert refused == {"gone+550@example.com": (550, b"5.1.1 user unknown")}
    [entry] = sink.wait_received(1)
    assert entry["rcpt_tos"] == ["ok@example.com"]


def test_plus_451_recipient_is_deferred(sink: SinkProcess) -> None:
    with connect(sink) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        assert client.rcpt("later+451@example.com") == (451, b"4.3.0 try again")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_prints_one_summary_and_exits_0(tmp_path: Path, signum: int) -> None:
    with SinkProcess(workdir=tmp_path / "sink") as sink:
        with connect(sink) as client:
            client.sendmail("a@example.com", ["b@example.com"], message("<s1@x>"))
            client.sendmail("a@example.com", ["b@example.com"], message("<s1@x>"))
        # A connection still open at shutdown must not prevent a clean exit.
        idle = connect(sink)
        assert sink.process is not None
        sink.process.send_signal(signum)
        assert sink.process.wait(10) == 0
        idle.close()
        summary = sink.stop()
        stdout = sink.stdout_file.read_text().splitlines()
        assert [line for line in stdout if line.startswith("sink summary:")] == [summary]
        assert summary.startswith(
            "sink summary: received=2 unique=1 duplicates=1 bytes="
            f"{2 * len(message('<s1@x>'))} connections=2 elapsed="
        )
        # At exit the log is flushed and the stats are final.
        assert len(sink.received()) == 2
        assert sink.stats()["received"] == 2


def run_sink_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SINK_COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=REPO_ROOT,
        check=False,
    )


def test_bad_bind_is_a_usage_error() -> None:
    done = run_sink_cli("--bind", "nonsense")
    assert done.returncode == 2
    assert "--bind must look like HOST:PORT" in done.stderr


def test_port_in_use_fails_with_a_clear_error(sink: SinkProcess) -> None:
    done = run_sink_cli("--bind", f"127.0.0.1:{sink.port}", "--quiet")
    assert done.returncode == 1
    assert done.stderr.startswith("sink: ")
    assert done.stdout == ""


def test_start_failure_reports_stderr(tmp_path: Path) -> None:
    bad = SinkProcess(workdir=tmp_path, extra_args=["--no-such-flag"])
    with pytest.raises(SinkError, match="no-such-flag"):
        bad.start()
    bad.close()


def test_sink_command_is_the_engine_cli(sink: SinkProcess) -> None:
    assert (sys.executable, "-m", "engine", "sink") == SINK_COMMAND
