"""Measure the sink's ceiling: one raw-socket pipelined SMTP client feeding it directly.

Usage: python -m scripts.sink_ceiling [--seconds N] [--size BYTES] [--no-log]
Prints one JSON line {"sink_direct_msgs_per_s": ..., "sent": ...}; exits 1 if the
sink's final statistics disagree with what was sent.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

from engine.embedded import SinkProcess

ENVELOPE = b"MAIL FROM:<bench@example.com>\r\nRCPT TO:<sink@example.com>\r\nDATA\r\n"


class PipelinedClient:
    """Just enough SMTP over a blocking socket: counts replies, checks their codes."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def replies(self, expected: bytes) -> None:
        """Read one reply per byte of ``expected`` (its first digit) and check each."""
        got: list[bytes] = []
        while len(got) < len(expected):
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"sink closed the connection after {got}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":  # the last line of a (multi-line) reply
                got.append(line)
        for want, line in zip(expected, got, strict=True):
            if line[0] != want:
                raise RuntimeError(f"unexpected reply {line!r}, wanted {chr(want)}xx")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def make_message(size: int, seq: int) -> bytes:
    head = (
        f"From: bench@example.com\r\nTo: sink@example.com\r\nSubject: ceiling {seq}\r\n"
        f"Message-ID: <ceiling-{seq}@bench.local>\r\nX-Engine-Job-Id: job-{seq}\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines + b".\r\n"


def feed(host: str, port: int, *, seconds: float, size: int) -> tuple[int, float]:
    """Send messages for ``seconds``; return (messages acknowledged, elapsed seconds)."""
    client = PipelinedClient(host, port)
    client.replies(b"2")  # greeting
    client.send(b"EHLO ceiling.local\r\n")
    client.replies(b"2")
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds
    # One round trip per message: the end of data opens the next pipelined group
    # (RFC 2920): body + "." + MAIL + RCPT + DATA, then 250 250 250 354 come back.
    client.send(ENVELOPE)
    client.replies(b"223")
    while True:
        body = make_message(size, sent)
        if time.perf_counter() >= deadline:
            client.send(body + b"QUIT\r\n")
            client.replies(b"22")
            sent += 1
            break
        client.send(body + ENVELOPE)
        client.replies(b"2223")
        sent += 1
    elapsed = time.perf_counter() - started
    client.sock.close()
    return sent, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to feed")
    parser.add_argument("--size", type=int, default=1024, help="approximate message bytes")
    parser.add_argument("--no-log", action="store_true", help="run the sink without --log")
    args = parser.parse_args(argv)

    with SinkProcess(log=not args.no_log) as sink:
        sent, elapsed = feed(sink.host, sink.port, seconds=args.seconds, size=args.size)
        summary = sink.stop()
        stats = sink.stats()
    agree = (
        stats["received"] == sent
        and stats["unique_message_ids"] == sent
        and stats["duplicates"] == 0
    )
    print(
        json.dumps(
            {
                "sink_direct_msgs_per_s": round(sent / elapsed, 1),
                "sent": sent,
                "seconds": round(elapsed, 3),
                "message_bytes": len(make_message(args.size, 0)) - 3,
                "sink_log": not args.no_log,
                "stats_agree": agree,
            }
        ),
        flush=True,
    )
    if not agree:
        print(f"sink stats {stats} disagree with sent={sent}; {summary}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
