"""docker-compose.yml: valid against the Compose Specification, and in step with the
loopback cluster (loadtest.cluster) -- same replicas, same balancer settings, Redis with
AOF, and only environment variables the engine really reads.

Docker is not needed: the file is checked against the official JSON schema, vendored as
tests/data/compose-spec.json (compose-spec/compose-spec, schema/compose-spec.json at
commit 00655e2222608fa6eaecdf12ac5195889ca2244a).
"""

from __future__ import annotations

import argparse
import inspect
import ipaddress
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.config import ENV_ALIASES, Settings, load_settings
from engine.sink.cli import add_arguments, options_from_args
from loadtest.cluster import Cluster
from loadtest.haproxy import (
    COMPOSE_ENGINE_PORT,
    COMPOSE_LB_ADDRESS,
    COMPOSE_LB_PORT,
    COMPOSE_REPLICAS,
    COMPOSE_SUBNET,
    compose_settings,
    engine_toml,
    find_haproxy,
    render,
)

yaml = pytest.importorskip("yaml", reason="pyyaml is needed to read docker-compose.yml")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema validates the compose file")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
LB_CONFIG = ROOT / "deploy" / "haproxy.cfg"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def engines(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if n.startswith("engine")}


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    """The vendored schema is the real one: it refuses what Compose would refuse."""
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["engine1"]["enviroment"] = {"X": "1"}  # typo
    broken["services"]["redis"]["ports"] = "6379"  # must be a list
    assert len(list(jsonschema.Draft7Validator(schema).iter_errors(broken))) == 2


def test_replicas_match_the_cluster(compose: dict[str, Any]) -> None:
    default_replicas = inspect.signature(Cluster).parameters["replicas"].default
    assert sorted(engines(compose)) == list(COMPOSE_REPLICAS)
    assert len(COMPOSE_REPLICAS) == default_replicas
    assert set(compose["services"]) == {
        "redis", "postgres", "sink", "haproxy", *COMPOSE_REPLICAS
    }  # fmt: skip
    for name, service in engines(compose).items():
        env = service["environment"]
        assert env["ENGINE_INSTANCE"] == name  # stable identity, as in the cluster
        assert env["ENGINE_BIND"] == f"0.0.0.0:{COMPOSE_ENGINE_PORT}"
        assert env["ENGINE_REDIS_URL"] == "redis://redis:6379/0"
        assert env["ENGINE_SMTP_URL"] == "smtp://sink:2525"
        assert service["depends_on"]["redis"] == {"condition": "service_healthy"}
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert env["ENGINE_HISTORY_DSN"].startswith("postgresql://engine:")


def test_balancer_config_is_the_generated_one(compose: dict[str, Any]) -> None:
    assert LB_CONFIG.read_text() == render(compose_settings()), (
        "deploy/haproxy.cfg is stale: python -m loadtest.haproxy --compose > deploy/haproxy.cfg"
    )
    lb = compose["services"]["haproxy"]
    assert lb["image"].startswith("haproxy:")
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert f"{COMPOSE_LB_PORT}:{COMPOSE_LB_PORT}" in lb["ports"]
    assert sorted(lb["depends_on"]) == list(COMPOSE_REPLICAS)
    assert lb["networks"]["mail"]["ipv4_address"] == COMPOSE_LB_ADDRESS
    subnet = compose["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert subnet == COMPOSE_SUBNET
    assert ipaddress.ip_address(COMPOSE_LB_ADDRESS) in ipaddress.ip_network(subnet)
    assert [s.split()[1] for s in re.findall(r"^ +server .*$", LB_CONFIG.read_text(), re.M)] == [
        *COMPOSE_REPLICAS
    ]


def _without_addresses(config: str) -> list[str]:
    """The balancer's settings minus what differs by place: addresses, server lines,
    the resolver, maxconn."""
    skip = re.compile(r"^\s*(bind|server|maxconn|nameserver|hold|resolvers)\b")
    return [line for line in config.splitlines() if line.strip() and not skip.match(line)]


def test_cluster_and_compose_balancers_share_their_settings(tmp_path: Path) -> None:
    cluster_config = render(Cluster(tmp_path / "run", replicas=2).lb_settings())
    assert _without_addresses(cluster_config) == _without_addresses(render(compose_settings()))
    for setting in (
        "balance roundrobin",
        "http-check send meth GET uri /readyz",
        "inter 500ms",
        "fall 2 rise 2",
        "timeout tunnel 1h",
        "option forwardfor",
        "retry-on conn-failure",
        "option redispatch 1",
    ):
        assert setting in cluster_config


@pytest.mark.skipif(find_haproxy() is None, reason="haproxy is not installed")
def test_haproxy_accepts_the_compose_config() -> None:
    haproxy = find_haproxy()
    assert haproxy is not None
    done = subprocess.run(
        [haproxy, "-c", "-f", str(LB_CONFIG)], capture_output=True, text=True, check=False
    )
    # Valid; outside Docker the service names do not resolve (a warning, not an error).
    assert done.returncode == 0, done.stdout + done.stderr


def test_redis_runs_with_aof(compose: dict[str, Any]) -> None:
    command = compose["services"]["redis"]["command"]
    flags = dict(zip(command[1::2], command[2::2], strict=True))
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction"
    assert "redis-data:/data" in compose["services"]["redis"]["volumes"]


def _known_env(name: str) -> bool:
    if name in ENV_ALIASES:
        return True
    section, _, field = name.removeprefix("ENGINE_").lower().partition("__")
    sub = Settings.__struct_fields__
    if section not in sub or not field:
        return False
    return field in getattr(Settings(), section).__struct_fields__


def test_engines_read_every_variable_and_their_settings_file(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    content = compose["configs"]["engine-config"]["content"]
    assert content == engine_toml([COMPOSE_LB_ADDRESS])
    settings_file = tmp_path / "engine.toml"
    settings_file.write_text(content)
    for name, service in engines(compose).items():
        assert service["command"] == ["serve", "--config", "/etc/engine/engine.toml"]
        assert service["configs"] == [
            {"source": "engine-config", "target": "/etc/engine/engine.toml"}
        ]
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = [k for k in env if not _known_env(k)]
        assert unknown == [], f"{name}: the engine reads no {unknown}"
        settings = load_settings(config_file=settings_file, environ=env)
        assert settings.instance == name
        assert settings.redis.url == "redis://redis:6379/0"
        assert settings.smtp.url == "smtp://sink:2525"
        assert settings.http.bind == f"0.0.0.0:{COMPOSE_ENGINE_PORT}"
        assert settings.sender.senders == 16
        assert settings.ingest.trusted_proxies == [COMPOSE_LB_ADDRESS]


def test_known_env_rejects_misspelled_variables() -> None:
    assert _known_env("ENGINE_QUEUE__LEASE_S")
    assert _known_env("ENGINE_REDIS_URL")
    assert not _known_env("ENGINE_REDIS__URLS")
    assert not _known_env("ENGINE_REDISURL")
    assert not _known_env("ENGINE_NOPE__X")


def test_sink_command_is_a_valid_sink_invocation(compose: dict[str, Any]) -> None:
    command = compose["services"]["sink"]["command"]
    assert command[0] == "sink"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = options_from_args(parser.parse_args(command[1:]))
    assert (options.host, options.port) == ("0.0.0.0", 2525)
    assert options.log is not None and options.control is not None
    assert str(options.control).startswith("/mail/")  # on the volume, reachable by exec
