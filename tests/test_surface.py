"""Pin the public surface: CLI verbs and flags, key names, Lua scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from engine.cli import build_parser
from engine.keys import Keys
from engine.queue import SCRIPT_NAMES, load_script_sources
from fixtures.auth import AUTH_ENV

ROOT = Path(__file__).resolve().parent.parent


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return {opt for action in sub.choices[command]._actions for opt in action.option_strings}  # type: ignore[attr-defined]


def test_cli_verbs_and_flags() -> None:
    assert {
        "--redis-url",
        "--smtp-url",
        "--bind",
        "--senders",
        "--rate",
        "--config",
        "--role",
    } <= _flags("serve")
    assert {"--bind", "--maildir"} <= _flags("sink")
    assert {"--to", "--subject", "--text", "--html", "--url"} <= _flags("send")
    assert {"--dsn", "--config"} <= _flags("db")  # engine db migrate|status


@pytest.mark.parametrize("verb", ["serve", "sink", "send", "db"])
def test_help_explains(verb: str) -> None:
    out = subprocess.run([sys.executable, "-m", "engine", verb, "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout  # fmt: skip
    assert "usage: engine " + verb in out


def test_bad_setting_exits_2_with_a_message() -> None:
    out = subprocess.run([sys.executable, "-m", "engine", "serve", "--bind", "nowhere"],
                         capture_output=True, text=True, check=False, cwd=ROOT)  # fmt: skip
    assert out.returncode == 2 and "http.bind must look like HOST:PORT" in out.stderr


def test_key_names() -> None:
    k = Keys("mail", 0)
    assert k.job("abc") == "{mail:0}:job:abc"
    assert k.ready() == "{mail:0}:ready:normal:default"
    assert k.ready("high", "acme") == "{mail:0}:ready:high:acme"
    assert k.ring("low") == "{mail:0}:ring:low"
    assert k.processing("i1") == "{mail:0}:processing:i1"
    assert (k.leases, k.instances, k.delayed, k.dead, k.events, k.stats) == (
        "{mail:0}:leases", "{mail:0}:instances", "{mail:0}:delayed", "{mail:0}:dead",
        "{mail:0}:events", "{mail:0}:stats",
    )  # fmt: skip
    assert k.idem("x") == "{mail:0}:idem:x"


def test_every_script_has_a_keys_argv_header() -> None:
    sources = load_script_sources()
    assert set(sources) == set(SCRIPT_NAMES)
    lua = resources.files("engine.queue") / "lua"
    shipped = {f.name.removesuffix(".lua") for f in lua.iterdir() if f.name.endswith(".lua")}
    assert shipped - {"_lib"} == set(SCRIPT_NAMES), "a Lua file outside the registry"
    lib = (lua / "_lib.lua").read_text()
    for name, full in sources.items():
        assert full.startswith(lib), f"{name}: the shared functions are not prepended"
        src = full.removeprefix(lib)
        head = src.split("\n", 6)
        assert head[0].startswith(f"-- {name}:"), name
        assert "KEYS[1]" in src.split("local", 1)[0] and "ARGV[1]" in src.split("local", 1)[0], name


def test_busy_port_is_a_clear_error(redis_server: object, tmp_path: Path) -> None:
    import socket

    from engine.embedded import RedisServer

    assert isinstance(redis_server, RedisServer)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "engine", "serve", "--redis-url", redis_server.url,
             "--smtp-url", "smtp://127.0.0.1:9", "--bind", f"127.0.0.1:{port}"],
            capture_output=True, text=True, check=False, cwd=ROOT, timeout=60,
            env={**os.environ, **AUTH_ENV},  # no first-start key file in the checkout
        )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert "address already in use" in out.stderr and "Traceback" not in out.stderr
