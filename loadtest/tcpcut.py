"""A cuttable TCP proxy for chaos runs: forwards a loopback port to a target (Redis) and,
on request, resets every connection and refuses new ones until a deadline, then heals.

Its own process, one thread, epoll on non-blocking sockets (256 KiB reads, TCP_NODELAY):
    python -m loadtest.tcpcut --listen 127.0.0.1:P --target 127.0.0.1:R --control FILE
FILE holds ``{"cut_until": <unix seconds>}``; the proxy reads it when it changes (looked at
every 0.2 s) and at once on SIGUSR1 -- ``request_cut``/``request_heal`` do both. During a
cut an accepted connection is reset immediately (the client sees ECONNRESET, as from a
Redis that went away), so nothing hangs. Imports nothing from the engine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path

BUF_BYTES = 256 * 1024
CONTROL_POLL_S = 0.2
CONNECT_TIMEOUT_S = 2.0
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def request_cut(control: Path, pid: int | None, seconds: float) -> float:
    """Ask the proxy with control file ``control`` (and ``pid``) to cut for ``seconds``;
    return the unix time the cut ends. The proxy acts on SIGUSR1 at once, else within
    0.2 s."""
    until = time.time() + seconds
    write_atomic(control, json.dumps({"cut_until": until}).encode())
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    return until


def request_heal(control: Path, pid: int | None) -> None:
    """End a cut now."""
    write_atomic(control, json.dumps({"cut_until": 0}).encode())
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class _Pair:
    """One proxied connection: socks[0] the client, socks[1] the target. ``out[i]`` holds
    bytes still to be written to socks[i]; while it does, socks[1 - i] is not read."""

    __slots__ = ("out", "socks")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.socks = (client, upstream)
        self.out: list[memoryview | None] = [None, None]

    def mask(self, side: int) -> int:
        return (0 if self.out[1 - side] else _IN) | (_OUT if self.out[side] else 0)


class Proxy:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], control: Path | None):
        self.target = target
        self.control = control
        self.listener = socket.create_server(listen, backlog=1024)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), _IN)
        self.fds: dict[int, tuple[_Pair, int]] = {}
        self.cut_until = 0.0
        self._control_seen: tuple[int, int, int] | None = None
        self.stopping = False
        # Counters for the log lines.
        self.accepted = 0
        self.refused = 0
        self.reset = 0

    @property
    def address(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"{host}:{port}"

    # -- control ------------------------------------------------------------------------

    def check_control(self, now: float) -> None:
        if self.control is not None:
            try:
                st = os.stat(self.control)
                seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                seen = None
            if seen != self._control_seen:
                self._control_seen = seen
                until = 0.0
                if seen is not None:
                    try:
                        until = float(json.loads(self.control.read_bytes())["cut_until"])
                    except (OSError, ValueError, KeyError, TypeError) as exc:
                        _say(f"control file {self.control} ignored: {exc!r}")
                        until = self.cut_until
                if until > now and until != self.cut_until:
                    self.start_cut(until, now)
                elif until <= now < self.cut_until:
                    self.heal("on request")
        if self.cut_until and now >= self.cut_until:
            self.heal("deadline reached")

    def start_cut(self, until: float, now: float) -> None:
        self.cut_until = until
        pairs = {pair for pair, _ in self.fds.values()}
        for pair in pairs:
            self.close_pair(pair)
        self.reset += len(pairs)
        _say(f"cut for {until - now:.2f}s: reset {len(pairs)} connections")

    def heal(self, why: str) -> None:
        self.cut_until = 0.0
        _say(f"healed ({why}); refused {self.refused} connections so far")

    # -- connections --------------------------------------------------------------------

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave the backlog for later
                _say(f"accept failed: {exc!r}")
                return
            if self.cut_until:
                self.refused += 1
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT_S)
            except OSError:
                self.refused += 1
                _reset(client)
                continue
            self.accepted += 1
            pair = _Pair(client, upstream)
            for side, sock in enumerate(pair.socks):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.fds[sock.fileno()] = (pair, side)
                self.epoll.register(sock.fileno(), _IN)

    def close_pair(self, pair: _Pair) -> None:
        for sock in pair.socks:
            fd = sock.fileno()
            if fd >= 0 and self.fds.pop(fd, None) is not None:
                with contextlib.suppress(OSError):
                    self.epoll.unregister(fd)
        _reset(pair.socks[0])  # the client (engine) sees a reset, as from a dead server
        pair.socks[1].close()

    def _update(self, pair: _Pair) -> None:
        for side, sock in enumerate(pair.socks):
            self.epoll.modify(sock.fileno(), pair.mask(side))

    def readable(self, pair: _Pair, side: int) -> None:
        src, dst = pair.socks[side], pair.socks[1 - side]
        try:
            data = src.recv(BUF_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_pair(pair)
            return
        if not data:
            self.close_pair(pair)
            return
        try:
            sent = dst.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close_pair(pair)
            return
        if sent < len(data):
            pair.out[1 - side] = memoryview(data)[sent:]
            self._update(pair)

    def writable(self, pair: _Pair, side: int) -> None:
        pending = pair.out[side]
        if pending is None:
            return
        try:
            sent = pair.socks[side].send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_pair(pair)
            return
        rest = pending[sent:]
        pair.out[side] = rest if len(rest) else None
        if pair.out[side] is None:
            self._update(pair)

    # -- loop ---------------------------------------------------------------------------

    def serve(self, wakeup: int) -> None:
        self.epoll.register(wakeup, _IN)
        listener = self.listener.fileno()
        next_check = 0.0
        while not self.stopping:
            now = time.time()
            if now >= next_check:
                self.check_control(now)
                next_check = now + CONTROL_POLL_S
            timeout = max(0.0, next_check - now)
            if self.cut_until:
                timeout = min(timeout, max(0.0, self.cut_until - now))
            for fd, events in self.epoll.poll(timeout):
                if fd == listener:
                    self.accept()
                elif fd == wakeup:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wakeup, 512)
                    next_check = 0.0  # SIGUSR1 (or a stop signal): look at the control now
                else:
                    entry = self.fds.get(fd)
                    if entry is None:  # closed earlier in this batch
                        continue
                    pair, side = entry
                    if events & _OUT:
                        self.writable(pair, side)
                        if fd not in self.fds:
                            continue
                    if pair.out[1 - side] is not None:
                        # Not reading this side until its peer drained: only a hang-up
                        # (the client or Redis went away) matters now.
                        if events & (select.EPOLLHUP | select.EPOLLERR):
                            self.close_pair(pair)
                    elif events & (_IN | select.EPOLLHUP | select.EPOLLERR):
                        self.readable(pair, side)
        for pair in {pair for pair, _ in self.fds.values()}:
            self.close_pair(pair)
        self.listener.close()
        _say(
            f"stopped: {self.accepted} connections proxied, {self.reset} reset by cuts, "
            f"{self.refused} refused"
        )


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} tcpcut: {text}", flush=True)


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.tcpcut",
        description="TCP proxy whose connections can be cut for a while (chaos tests).",
    )
    parser.add_argument("--listen", type=_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--target", type=_hostport, required=True, metavar="HOST:PORT")
    parser.add_argument(
        "--control",
        type=Path,
        metavar="FILE",
        help='JSON {"cut_until": unix seconds}; re-read when it changes and on SIGUSR1',
    )
    parser.add_argument(
        "--ready-file", type=Path, metavar="FILE", help='write "host:port" once listening'
    )
    args = parser.parse_args(argv)
    proxy = Proxy(args.listen, args.target, args.control)
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def stop(signum: int, frame: object) -> None:
        proxy.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)  # wakes the loop up
    target = f"{args.target[0]}:{args.target[1]}"
    _say(f"listening on {proxy.address}, forwarding to {target}")
    if args.ready_file is not None:
        write_atomic(args.ready_file, proxy.address.encode())
    proxy.serve(read_end)
    return 0


if __name__ == "__main__":
    sys.exit(main())
