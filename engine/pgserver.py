"""A local PostgreSQL server as a child process (``PostgresServer``): Debian's
``postgresql`` binaries, a data dir of its own, loopback only, a free port. What
``engine serve`` starts for ``history.dsn = "local"`` (data under ./var/postgres), and
what tests, benchmarks and the chaos harness start in a temporary dir.

Synchronous (subprocess, files, sockets), like ``engine.embedded``: used before and
after a Trio loop, never in one. PostgreSQL refuses to run as root: as root, initdb and
the server run as the ``postgres`` user (setpriv), the data dir owned by it.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from engine.embedded import Child, ChildError, free_port
from engine.errors import ConfigError

log = logging.getLogger(__name__)

# Where Debian's postgresql package puts its binaries (not on PATH); newest first.
_DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
# The server's settings for a child of ours: loopback TCP only (no unix socket dir to
# own), and enough connections for a few engine replicas' pools.
_BASE_SETTINGS: tuple[tuple[str, str], ...] = (
    ("listen_addresses", "127.0.0.1"),
    ("unix_socket_directories", ""),
    ("max_connections", "200"),
    ("logging_collector", "off"),
    ("log_min_messages", "warning"),
)
# Tests trade durability for speed (their data dies with them); never an operator's.
FAST_UNSAFE: tuple[tuple[str, str], ...] = (
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
)


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: on PATH, else Debian's
    newest /usr/lib/postgresql/N/bin; None when PostgreSQL is not installed."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("postgres"):
        return Path(on_path).resolve().parent
    found = sorted(
        glob.glob(_DEBIAN_BIN_GLOB), key=lambda p: int(Path(p).parent.name or 0), reverse=True
    )
    for d in found:
        if (Path(d) / "initdb").exists() and (Path(d) / "postgres").exists():
            return Path(d)
    return None


def _run_as() -> list[str]:
    """The prefix that drops root (PostgreSQL will not run as root); [] when not root.
    ``--pdeathsig TERM``: the server still stops when we die, though its credentials
    changed (which clears the parent-death signal the Child set)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise ConfigError("running as root: PostgreSQL needs setpriv (util-linux) to drop root")
    return [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", "--pdeathsig=TERM"]


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ConfigError(
            "running as root and there is no 'postgres' user: install Debian's postgresql "
            "package (apt-get install -y postgresql), which makes it"
        ) from None
    for p in (path, *path.rglob("*")):
        with contextlib.suppress(FileNotFoundError):
            os.chown(p, user.pw_uid, user.pw_gid)


def _check_reachable(path: Path) -> None:
    """As root, the server runs as "postgres": every directory above its data must let
    others through (x), or initdb fails with a bare "Permission denied"."""
    if os.geteuid() != 0:
        return
    for parent in path.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise ConfigError(
                f"PostgreSQL runs as the 'postgres' user (not as root), which cannot enter "
                f"{parent} (mode {os.stat(parent).st_mode & 0o777:o}); put history.data_dir "
                "elsewhere, or chmod o+x that directory"
            )


class PostgresServer:
    """``with PostgresServer() as pg: pg.dsn`` -- a PostgreSQL cluster in ``data_dir``
    (a temporary one by default), made with initdb on first start (trust auth: loopback
    only), its database ``database`` created. Restartable: ``stop()``/``start()`` keep the
    data; ``kill()`` is a crash (WAL replay at the next start)."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int = 0,
        database: str = "engine",
        settings: tuple[tuple[str, str], ...] = (),
        log: Path | None = None,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="engine-pg-")
            data_dir = self._tmp.name
        self.root = Path(data_dir).resolve()
        self.data_dir = self.root / "data"
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.database = database
        self.user = "postgres"
        bin_dir = find_pg_bin()
        if bin_dir is None:
            raise ConfigError(
                "PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin): "
                "apt-get install -y postgresql"
            )
        self.bin_dir = bin_dir
        opts: list[str] = []
        for name, value in (*_BASE_SETTINGS, ("port", str(self.port)), *settings):
            opts += ["-c", f"{name}={value}"]
        argv = [*_run_as(), str(bin_dir / "postgres"), "-D", str(self.data_dir), *opts]
        self.child = Child("postgres", argv, log or self.root / "server.log", port=self.port)

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/postgres"

    def _initdb(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        _chown_to_postgres(self.root)
        _check_reachable(self.root)
        os.chmod(self.data_dir, 0o700)
        argv = [
            *_run_as(), str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions",
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise ChildError(f"initdb failed ({done.returncode}):\n{done.stderr[-2000:]}")

    def ping(self) -> bool | None:
        """True once the server takes connections (pg_isready's check: a startup packet)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0):
                pass
        except OSError:
            return None
        ready = subprocess.run(
            [str(self.bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        return True if ready.returncode == 0 else None

    def start(self, timeout_s: float = 60.0) -> PostgresServer:
        """Start it (initdb first when the data dir is new), wait until it takes
        connections, and make sure its database exists."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self.child.spawn()
        try:
            self.child.wait_until("taking connections", self.ping, timeout_s)
        except ChildError:
            self.child.kill()
            raise
        self._create_database()
        log.info("pgserver.started dsn=%s dir=%s", self.dsn, self.data_dir)
        return self

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [self.database]
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def stop(self, timeout_s: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions are cut, everything committed is kept)."""
        self.child.stop(signal.SIGINT, timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash would; the next start replays its WAL."""
        self.child.kill()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
