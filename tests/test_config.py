"""Settings precedence: defaults < TOML file < environment < flags; errors name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import Settings, load_settings, parse_hostport
from engine.errors import ConfigError


def test_defaults() -> None:
    s = load_settings(environ={})
    assert s == Settings()
    assert s.redis.url is None and s.smtp.url is None and s.http.bind == "127.0.0.1:8080"


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "engine.toml"
    f.write_text('[sender]\nsenders = 4\nrate_per_s = 10.0\n[http]\nbind = "127.0.0.1:9000"\n')
    s = load_settings(
        config_file=f,
        environ={
            "ENGINE_SENDERS": "6",
            "ENGINE_QUEUE__LEASE_S": "15",
            "ENGINE_SMTP_URL": "smtp://h:25",
        },
        overrides={"sender": {"senders": 8}},
    )
    assert s.sender.senders == 8  # flag beats env beats file
    assert s.sender.rate_per_s == 10.0  # from the file
    assert s.queue.lease_s == 15.0  # env, generic form, converted from a string
    assert s.smtp.url == "smtp://h:25"
    assert s.http.bind == "127.0.0.1:9000"


@pytest.mark.parametrize(
    ("environ", "needle"),
    [
        ({"ENGINE_SENDERS": "0"}, "senders"),
        ({"ENGINE_SENDERS": "many"}, "senders"),
        ({"ENGINE_BIND": "nope"}, "http.bind"),
        ({"ENGINE_QUEUE__HEARTBEAT_S": "20"}, "heartbeat_s"),
        ({"ENGINE_SMTP__STARTTLS": "maybe"}, "starttls"),
        ({"ENGINE_QUEUE__NO_SUCH": "1"}, "no_such"),
    ],
)
def test_bad_settings_are_named(environ: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_settings(environ=environ)


def test_unreadable_file() -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(config_file="/nonexistent/engine.toml", environ={})


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_hostport("[::1]:8080") == ("::1", 8080)
    with pytest.raises(ConfigError):
        parse_hostport("localhost")
