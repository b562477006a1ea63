"""The SMTP sink, driven as a real subprocess through fixtures.sink (smtplib and raw sockets)."""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from email._header_value_parser import get_angle_addr
from pathlib import Path

import pytest

from engine.embedded import SINK_COMMAND, ChildError, SinkProcess
from engine.errors import ConfigError
from engine.sink.cli import add_arguments, options_from_args
from engine.sink.faults import (
    ACCEPT,
    NO_FAULTS,
    NO_STORAGE,
    SHUTTING_DOWN,
    TOO_BIG,
    TRY_AGAIN,
    USER_UNKNOWN,
    DataVerdict,
    FaultOptions,
    Reply,
    decide_data,
    decide_rcpt,
)
from engine.sink.headers import scan_ids
from engine.sink.protocol import DATA_LINE_LIMIT, fast_addr, read_data_lines, unstuff
from fixtures.engine import REPO_ROOT
from fixtures.sink import tagged


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


def test_decide_rcpt_refusals() -> None:
    assert decide_rcpt("user@example.com") is None
    assert decide_rcpt("user+tag@example.com") is None
    assert str(decide_rcpt("user+550@example.com")) == "550 5.1.1 user unknown"
    assert str(decide_rcpt("user+x+451@example.com")) == "451 4.3.0 try again"
    assert str(decide_rcpt("user+421@example.com")) == "421 4.3.2 service shutting down"
    assert SHUTTING_DOWN.closes
    assert not USER_UNKNOWN.closes
    assert not TRY_AGAIN.closes
    # The first refusal wins; a refused recipient's end-of-DATA tags never apply.
    assert decide_rcpt("u+451+550@x") is TRY_AGAIN
    assert decide_rcpt("u+slow2s+451@x") is TRY_AGAIN
    assert decide_rcpt("u+drop+421@x") is SHUTTING_DOWN
    # A "+" in the domain is not a tag; an address without a domain is all local part.
    assert decide_rcpt("u@a+550.example") is None
    assert decide_rcpt("postmaster+550") is USER_UNKNOWN


@pytest.mark.parametrize(
    ("address", "verdict"),
    [
        ("u+slow2s@x", DataVerdict(delay_s=2.0)),
        ("u+slow250ms@x", DataVerdict(delay_s=0.25)),
        ("u+SLOW1S@x", DataVerdict(delay_s=1.0)),
        ("u+slow1.5s@x", DataVerdict(delay_s=1.5)),
        ("u+drop@x", DataVerdict(drop=True)),
        ("u+DROP@x", DataVerdict(drop=True)),
        ("u+552@x", DataVerdict(reply=TOO_BIG)),
        ("u+452@x", DataVerdict(reply=NO_STORAGE)),
        ("u+slow2s+552@x", DataVerdict(delay_s=2.0, reply=TOO_BIG)),
        ("u+452+552@x", DataVerdict(reply=NO_STORAGE)),
        ("u+slow1s+slow3s@x", DataVerdict(delay_s=3.0)),
        ("u+slow100ms+drop+tag@x", DataVerdict(delay_s=0.1, drop=True)),
    ],
)
def test_decide_rcpt_end_of_data_tags(address: str, verdict: DataVerdict) -> None:
    assert decide_rcpt(address) == verdict


@pytest.mark.parametrize("address", ["u+slow@x", "u+slowms@x", "u+slow2m@x", "u+slow-1s@x"])
def test_decide_rcpt_ignores_malformed_tags(address: str) -> None:
    assert decide_rcpt(address) is None


def test_data_verdicts_merge_across_recipients() -> None:
    slow = DataVerdict(delay_s=1.0)
    assert slow.merge(DataVerdict(delay_s=0.5, reply=TOO_BIG)) == DataVerdict(1.0, False, TOO_BIG)
    assert DataVerdict(reply=NO_STORAGE).merge(DataVerdict(reply=TOO_BIG)).reply is NO_STORAGE
    assert ACCEPT.merge(DataVerdict(drop=True)) == DataVerdict(drop=True)


def test_decide_data_without_flags_only_follows_tags() -> None:
    assert not NO_FAULTS.active
    assert not NO_FAULTS.draws
    assert decide_data(None, NO_FAULTS) == ACCEPT
    tagged_verdict = DataVerdict(delay_s=0.2, reply=TOO_BIG)
    assert decide_data(tagged_verdict, NO_FAULTS, drop_draw=0.0, fail_draw=0.0) == tagged_verdict


def test_decide_data_delay_flag_is_the_floor_of_every_delay() -> None:
    options = FaultOptions(delay_ms=300)
    assert options.active
    assert not options.draws
    assert decide_data(None, options) == DataVerdict(delay_s=0.3)
    assert decide_data(DataVerdict(delay_s=2.0), options) == DataVerdict(delay_s=2.0)
    assert decide_data(DataVerdict(drop=True), options) == DataVerdict(delay_s=0.3, drop=True)


def test_decide_data_ratios_follow_the_draws() -> None:
    options = FaultOptions(fail_ratio=0.25, drop_ratio=0.1)
    assert options.active
    assert options.draws
    fail = Reply(451, "4.3.0 injected failure")
    assert decide_data(None, options, drop_draw=0.5, fail_draw=0.5) == ACCEPT
    assert decide_data(None, options, drop_draw=0.5, fail_draw=0.25) == ACCEPT
    assert decide_data(None, options, drop_draw=0.5, fail_draw=0.2) == DataVerdict(reply=fail)
    assert decide_data(None, options, drop_draw=0.05, fail_draw=0.2) == DataVerdict(drop=True)
    # Tags win over ratios; a tagged delay still applies.
    slow = DataVerdict(delay_s=1.0)
    assert decide_data(slow, options, drop_draw=0.5, fail_draw=0.0) == DataVerdict(1.0, False, fail)
    too_big = DataVerdict(reply=TOO_BIG)
    assert decide_data(too_big, options, drop_draw=0.0, fail_draw=0.0) == too_big


def test_fail_code_picks_the_failure_class() -> None:
    assert str(FaultOptions(fail_code=550).fail_reply) == "550 5.3.0 injected failure"
    assert str(FaultOptions().fail_reply) == "451 4.3.0 injected failure"
    assert FaultOptions(fail_code=421).fail_reply.closes
    always = FaultOptions(fail_ratio=1.0, fail_code=554)
    assert decide_data(None, always, fail_draw=0.999).reply == Reply(554, "5.3.0 injected failure")


def parse_sink_args(*argv: str) -> FaultOptions:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return options_from_args(parser.parse_args(argv)).faults


def test_fault_flags_become_fault_options() -> None:
    assert parse_sink_args() == NO_FAULTS
    flags = "--fail-ratio 0.5 --fail-code 550 --seed 7 --delay-ms 20 --drop-ratio 0.1"
    assert parse_sink_args(*flags.split()) == FaultOptions(
        fail_ratio=0.5, fail_code=550, drop_ratio=0.1, delay_ms=20, seed=7
    )


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--fail-ratio", "1.5"], "--fail-ratio must be between 0 and 1"),
        (["--drop-ratio", "-0.1"], "--drop-ratio must be between 0 and 1"),
        (["--fail-ratio", "nan"], "--fail-ratio must be between 0 and 1"),
        (["--fail-code", "250"], "--fail-code must be a 4xx or 5xx code"),
        (["--fail-code", "600"], "--fail-code must be a 4xx or 5xx code"),
        (["--delay-ms", "-1"], "--delay-ms must not be negative"),
    ],
)
def test_bad_fault_flags_are_config_errors(argv: list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_sink_args(*argv)


def test_tagged_builds_fault_addresses() -> None:
    assert tagged("u@example.com", "slow2s", "552") == "u+slow2s+552@example.com"
    assert decide_rcpt(tagged("u@x", "drop")) == DataVerdict(drop=True)


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
    assert f"sink listening on 127.0.0.1:{sink.port}" in sink.output()


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
        assert sink.child.popen is not None
        sink.child.popen.send_signal(signum)
        assert sink.child.popen.wait(10) == 0
        idle.close()
        summary = sink.stop()
        stdout = sink.output().splitlines()
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
    with pytest.raises(ChildError, match="no-such-flag"):
        bad.start()
    bad.close()


def test_sink_command_is_the_engine_cli(sink: SinkProcess) -> None:
    assert (sys.executable, "-m", "engine", "sink") == SINK_COMMAND


# --- fault injection, against the process -------------------------------------------------


# libuv's timers have millisecond resolution and a cached clock: they may fire a bit early.
TIMER_SLACK_S = 0.01


def session(sink: SinkProcess) -> socket.socket:
    """A raw connection past the greeting and EHLO."""
    sock = socket.create_connection((sink.host, sink.port), timeout=10)
    read_replies(sock, 1)
    sock.sendall(b"EHLO client.test\r\n")
    read_replies(sock, 1)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the sink sends until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def envelope(*rcpts: str) -> bytes:
    return b"MAIL FROM:<a@example.com>\r\n" + b"".join(
        f"RCPT TO:<{rcpt}>\r\n".encode() for rcpt in rcpts
    )


def maildir_count(maildir: Path) -> int:
    return len(list((maildir / "new").iterdir()))


def test_clean_run_has_empty_fault_counters(sink: SinkProcess) -> None:
    with connect(sink) as client:
        client.sendmail("a@example.com", ["b@example.com"], message("<clean@x>"))
    stats = sink.wait_stats(received=1)
    assert (stats["refused"], stats["dropped"], stats["rcpt_refused"]) == ({}, 0, {})
    assert "refused=" not in sink.stop()


def test_plus_421_replies_then_closes_the_connection(sink: SinkProcess) -> None:
    with session(sink) as sock:
        # Pipelined: what follows the 421 is never answered.
        sock.sendall(envelope(tagged("bye@example.com", "421"), "b@example.com") + b"DATA\r\n")
        assert read_until_closed(sock) == b"250 OK\r\n421 4.3.2 service shutting down\r\n"
    with connect(sink) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        assert client.rcpt(tagged("bye@example.com", "421")) == (
            421,
            b"4.3.2 service shutting down",
        )
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    # The sink itself keeps serving.
    with connect(sink) as client:
        client.sendmail("a@example.com", ["b@example.com"], message("<after421@x>"))
    [entry] = sink.wait_received(1)
    assert entry["message_id"] == "<after421@x>"
    sink.wait_stats(received=1, rcpt_refused={"421": 2}, connections=3)


def test_plus_drop_closes_mid_data_without_a_reply_or_a_record(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    with SinkProcess(workdir=tmp_path / "sink", maildir=maildir) as sink:
        with session(sink) as sock:
            sock.sendall(envelope(tagged("cut@example.com", "drop"), "b@example.com") + b"DATA\r\n")
            assert [r[:3] for r in read_replies(sock, 4)] == ["250", "250", "250", "354"]
            # The content, its end and a pipelined next command: no reply to any of them.
            sock.sendall(message("<dropped@x>") + b".\r\nMAIL FROM:<a@example.com>\r\n")
            assert read_until_closed(sock) == b""
        # smtplib sees a lost connection.
        with connect(sink) as client, pytest.raises(smtplib.SMTPServerDisconnected):
            client.sendmail(
                "a@example.com", [tagged("cut@example.com", "DROP")], message("<dropped2@x>")
            )
        with connect(sink) as client:
            client.sendmail("a@example.com", ["b@example.com"], message("<kept@x>"))
        # Messages are logged in order: a recorded drop would come first.
        assert [e["message_id"] for e in sink.wait_received(1)] == ["<kept@x>"]
        sink.wait_stats(received=1, dropped=2, refused={})
        summary = sink.stop()
        assert [e["message_id"] for e in sink.received()] == ["<kept@x>"]
    assert " received=1 " in summary
    assert summary.endswith(" refused=0 dropped=2")
    assert maildir_count(maildir) == 1


def test_plus_slow_delays_the_final_reply_then_accepts(sink: SinkProcess) -> None:
    with session(sink) as sock:
        sock.sendall(envelope(tagged("b@example.com", "slow1s")) + b"DATA\r\n")
        assert [r[:3] for r in read_replies(sock, 3)] == ["250", "250", "354"]
        started = time.monotonic()
        sock.sendall(message("<slow-s@x>") + b".\r\n")
        assert read_replies(sock, 1) == ["250 OK"]
        assert time.monotonic() - started >= 1.0 - TIMER_SLACK_S
    with connect(sink) as client:
        started = time.monotonic()
        client.sendmail(
            "a@example.com",
            ["b@example.com", tagged("c@example.com", "Slow250ms")],
            message("<slow-ms@x>"),
        )
        assert time.monotonic() - started >= 0.25 - TIMER_SLACK_S
    got = sink.wait_received(2)
    assert [e["message_id"] for e in got] == ["<slow-s@x>", "<slow-ms@x>"]
    assert got[1]["rcpt_tos"] == ["b@example.com", "c+Slow250ms@example.com"]


@pytest.mark.parametrize(
    ("tag", "code", "text"),
    [("552", 552, b"5.3.4 message too big"), ("452", 452, b"4.3.1 insufficient storage")],
)
def test_plus_552_and_452_refuse_the_message_after_its_content(
    tmp_path: Path, tag: str, code: int, text: bytes
) -> None:
    maildir = tmp_path / "Maildir"
    with SinkProcess(workdir=tmp_path / "sink", maildir=maildir) as sink:
        with connect(sink) as client:
            # One tagged accepted recipient refuses the whole transaction.
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.sendmail(
                    "a@example.com",
                    ["ok@example.com", tagged("x@example.com", tag)],
                    message("<r@x>"),
                )
            assert (info.value.smtp_code, info.value.smtp_error) == (code, text)
            # The connection stays usable.
            client.sendmail("a@example.com", ["ok@example.com"], message("<fine@x>"))
        assert [e["message_id"] for e in sink.wait_received(1)] == ["<fine@x>"]
        sink.wait_stats(received=1, refused={tag: 1}, dropped=0)
        sink.stop()
        assert len(sink.received()) == 1
    assert maildir_count(maildir) == 1


def test_mixed_recipients_deliver_to_the_plain_one_only(tmp_path: Path) -> None:
    maildir = tmp_path / "Maildir"
    with SinkProcess(workdir=tmp_path / "sink", maildir=maildir) as sink:
        with connect(sink) as client:
            refused = client.sendmail(
                "a@example.com",
                [tagged("gone@example.com", "550"), "ok@example.com", tagged("later@x.org", "451")],
                message("<mixed@x>"),
            )
        assert refused == {
            "gone+550@example.com": (550, b"5.1.1 user unknown"),
            "later+451@x.org": (451, b"4.3.0 try again"),
        }
        [entry] = sink.wait_received(1)
        assert entry["rcpt_tos"] == ["ok@example.com"]
        sink.wait_stats(received=1, rcpt_refused={"550": 1, "451": 1}, refused={})
        sink.stop()
    [stored] = (maildir / "new").iterdir()
    assert b"Message-ID: <mixed@x>" in stored.read_bytes()


@pytest.mark.parametrize(
    ("flags", "code", "text"),
    [
        (["--fail-ratio", "1"], 451, b"4.3.0 injected failure"),
        (["--fail-ratio", "1", "--fail-code", "550"], 550, b"5.3.0 injected failure"),
    ],
)
def test_fail_ratio_replaces_the_final_reply(
    tmp_path: Path, flags: list[str], code: int, text: bytes
) -> None:
    with SinkProcess(workdir=tmp_path / "sink", extra_args=flags) as sink:
        with connect(sink) as client:
            for i in range(2):
                with pytest.raises(smtplib.SMTPDataError) as info:
                    client.sendmail("a@example.com", ["b@example.com"], message(f"<f{i}@x>"))
                assert (info.value.smtp_code, info.value.smtp_error) == (code, text)
        sink.wait_stats(refused={str(code): 2}, received=0)
        summary = sink.stop()
        assert sink.received() == []
    assert summary.endswith(" refused=2 dropped=0")


def test_fail_code_421_closes_after_the_final_reply(tmp_path: Path) -> None:
    flags = ["--fail-ratio", "1", "--fail-code", "421"]
    with SinkProcess(workdir=tmp_path / "sink", extra_args=flags) as sink:
        with session(sink) as sock:
            sock.sendall(envelope("b@example.com") + b"DATA\r\n")
            assert [r[:3] for r in read_replies(sock, 3)] == ["250", "250", "354"]
            sock.sendall(message("<f@x>") + b".\r\nQUIT\r\n")
            assert read_until_closed(sock) == b"421 4.3.0 injected failure\r\n"
        sink.wait_stats(refused={"421": 1}, received=0)


def test_drop_ratio_one_drops_every_message(tmp_path: Path) -> None:
    with SinkProcess(workdir=tmp_path / "sink", extra_args=["--drop-ratio", "1"]) as sink:
        for i in range(2):
            with connect(sink) as client, pytest.raises(smtplib.SMTPServerDisconnected):
                client.sendmail("a@example.com", ["b@example.com"], message(f"<d{i}@x>"))
        sink.wait_stats(dropped=2, received=0, connections=2)
        sink.stop()
        assert sink.received() == []


def test_delay_ms_delays_every_final_reply(tmp_path: Path) -> None:
    with SinkProcess(workdir=tmp_path / "sink", extra_args=["--delay-ms", "300"]) as sink:
        with connect(sink) as client:
            client.ehlo("client.test")
            for i in range(2):
                started = time.monotonic()
                client.sendmail("a@example.com", ["b@example.com"], message(f"<w{i}@x>"))
                assert time.monotonic() - started >= 0.3 - TIMER_SLACK_S
        assert len(sink.wait_received(2)) == 2


def fates(workdir: Path, seed: int, count: int = 40) -> list[str]:
    """Send ``count`` messages one by one; return each one's fate: a code or "drop"."""
    flags = ["--fail-ratio", "0.3", "--drop-ratio", "0.2", "--seed", str(seed)]
    outcomes: list[str] = []
    with SinkProcess(workdir=workdir, extra_args=flags) as sink:
        client: smtplib.SMTP | None = None
        for i in range(count):
            client = client or connect(sink)
            try:
                client.sendmail("a@example.com", ["b@example.com"], message(f"<n{i}@x>"))
                outcomes.append("250")
            except smtplib.SMTPDataError as exc:
                outcomes.append(str(exc.smtp_code))
            except smtplib.SMTPServerDisconnected:
                outcomes.append("drop")
                client = None
        if client is not None:
            client.quit()
        sink.stop()
        accepted = [e["message_id"] for e in sink.received()]
        stats = sink.stats()
    assert accepted == [f"<n{i}@x>" for i, fate in enumerate(outcomes) if fate == "250"]
    assert stats["received"] == outcomes.count("250")
    assert stats["dropped"] == outcomes.count("drop")
    assert sum(stats["refused"].values()) == outcomes.count("451")
    return outcomes


def test_ratios_with_a_seed_are_reproducible(tmp_path: Path) -> None:
    first = fates(tmp_path / "a", seed=7)
    assert set(first) == {"250", "451", "drop"}
    assert fates(tmp_path / "b", seed=7) == first
    assert fates(tmp_path / "c", seed=8) != first


def test_help_describes_every_tag_and_fault_flag() -> None:
    done = run_sink_cli("--help")
    assert done.returncode == 0
    for word in [
        "+550", "+451", "+421", "+slowNs", "+slowNms", "+drop", "+552", "+452",
        "--fail-ratio", "--fail-code", "--seed", "--delay-ms", "--drop-ratio",
    ]:  # fmt: skip
        assert word in done.stdout


def test_bad_fault_flag_is_a_usage_error() -> None:
    done = run_sink_cli("--fail-ratio", "2")
    assert done.returncode == 2
    assert "sink: --fail-ratio must be between 0 and 1, got 2.0" in done.stderr
