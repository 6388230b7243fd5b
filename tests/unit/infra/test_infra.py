"""The dev stack files agree with the code: compose runs real services, the image runs
`ciliate run`, and the committed NATS config is exactly what ACCESS renders to."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliate import natsconf
from ciliate.bus.subjects import ACCESS, SERVICES, Bucket

ROOT = Path(__file__).resolve().parents[3]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
DOCKERFILE = INFRA / "Dockerfile"
NATS_CONF = INFRA / "nats" / "nats-server.conf"
HOST_MOUNTS = {"/sys/fs/bpf", "/sys/kernel/tracing", "/sys/fs/cgroup", "/lib/modules", "/usr/src"}
NODE_SERVICES = {"datapath", "security"}
REPLICATED = {"identity", "policy", "lb"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def ciliate_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services built from the project's image, keyed by compose name."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("image") == "ciliate:dev" or "build" in svc
    }


def dockerfile_entrypoint() -> list[str]:
    entrypoints = re.findall(r"^ENTRYPOINT\s+(.+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert entrypoints, "Dockerfile has no ENTRYPOINT"
    parsed = json.loads(entrypoints[-1])
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def test_dockerfile_entrypoint_is_ciliate_run() -> None:
    assert dockerfile_entrypoint() == ["ciliate", "run"]


def test_dockerfile_installs_debian_bcc_and_puts_only_it_on_the_venv_path() -> None:
    text = DOCKERFILE.read_text()
    assert "python3-bpfcc" in text
    assert "ln -s /usr/lib/python3/dist-packages/bcc" in text
    assert "dist-packages >" not in text  # never the whole of dist-packages


def test_every_service_runs_once_under_its_own_name(compose: dict[str, Any]) -> None:
    runs: dict[str, str] = {}
    for name, svc in ciliate_services(compose).items():
        if "entrypoint" in svc:  # the migration step
            assert svc["entrypoint"] == ["ciliate", "db", "upgrade"], name
            continue
        command = svc["command"]
        assert len(command) == 1 and command[0] in SERVICES, f"{name}: {command}"
        assert command[0] not in runs, f"{command[0]} runs twice ({runs.get(command[0])}, {name})"
        runs[command[0]] = name
    assert set(runs) == set(SERVICES)
    assert all(runs[service] == service for service in SERVICES)


def test_images_are_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    for name, svc in ciliate_services(compose).items():
        build = svc["build"]
        dockerfile = (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile == DOCKERFILE, name


def test_migration_runs_before_services_that_use_the_database(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for service in SERVICES:
        depends = services[service]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", service
        assert depends["nats"]["condition"] == "service_healthy", service


def test_node_services_are_privileged_on_the_host(compose: dict[str, Any]) -> None:
    for service in NODE_SERVICES:
        svc = compose["services"][service]
        assert svc["privileged"] is True
        assert svc["network_mode"] == "host"
        assert svc["pid"] == "host"
        targets = {volume.split(":")[1] for volume in svc["volumes"]}
        assert targets >= HOST_MOUNTS, service
    for service in set(SERVICES) - NODE_SERVICES:
        svc = compose["services"][service]
        assert not svc.get("privileged"), service
        assert svc.get("network_mode") != "host", service


def test_stateless_services_have_replicas(compose: dict[str, Any]) -> None:
    for service in REPLICATED:
        assert compose["services"][service]["deploy"]["replicas"] >= 2, service


def test_each_service_connects_to_nats_as_its_own_user(compose: dict[str, Any]) -> None:
    for service in SERVICES:
        env = compose["services"][service]["environment"]
        assert env["CILIATE_NATS_USER"] == service
        assert f"CILIATE_NATS_PASSWORD_{service.upper()}" in env["CILIATE_NATS_PASSWORD"]
        host = "127.0.0.1" if service in NODE_SERVICES else "nats"  # host network: no compose DNS
        assert env["CILIATE_NATS_URL"] == f"nats://{host}:4222"


def test_nats_gets_the_committed_config_and_every_password(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    assert "./nats/nats-server.conf:/etc/nats/nats-server.conf:ro" in nats["volumes"]
    assert nats["command"] == ["-c", "/etc/nats/nats-server.conf"]
    for user in natsconf.users():
        assert natsconf.env_password(user).lstrip("$") in nats["environment"], user


def test_committed_nats_config_is_what_the_generator_renders() -> None:
    assert NATS_CONF.read_text() == natsconf.render(), (
        "infra/nats/nats-server.conf is stale: python -m ciliate.natsconf > "
        "infra/nats/nats-server.conf"
    )


def test_nats_server_accepts_the_committed_config() -> None:
    venv_server = Path(sys.executable).parent / "nats-server"
    server = str(venv_server) if venv_server.exists() else (shutil.which("nats-server") or "")
    if not server:
        pytest.skip("nats-server binary not installed")
    env = {**os.environ, **{natsconf.env_password(u)[1:]: f"pw-{u}" for u in natsconf.users()}}
    done = subprocess.run(
        [server, "-t", "-c", str(NATS_CONF)], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


_API_OR_KV = ("$JS.", "$KV.")


@pytest.mark.parametrize("service", sorted(ACCESS))
def test_permissions_cover_exactly_the_access_table(service: str) -> None:
    access = ACCESS[service]
    perms = natsconf.users()[service]
    plain_publish = {s for s in perms.publish if not s.startswith(_API_OR_KV)}
    plain_subscribe = set(perms.subscribe) - {natsconf.INBOX}
    assert plain_publish == set(access.publish)
    assert plain_subscribe == set(access.subscribe)
    assert natsconf.INBOX in perms.subscribe
    assert perms.allow_responses == bool(access.subscribe)

    touched = access.kv_read | access.kv_write | set(natsconf.SELF_KEYED_BUCKETS)
    for bucket in Bucket:
        mentions = {s for s in perms.publish if f"KV_{bucket.value}" in s or
                    s.startswith(f"$KV.{bucket.value}.")}
        writes_all = f"$KV.{bucket.value}.>" in perms.publish
        assert writes_all == (bucket in access.kv_write), bucket
        if bucket not in touched:
            assert not mentions, f"{service} may touch {bucket}: {sorted(mentions)}"
        else:
            assert f"$JS.API.STREAM.INFO.KV_{bucket.value}" in perms.publish
            assert f"$JS.API.CONSUMER.CREATE.KV_{bucket.value}.>" in perms.publish
    for bucket in natsconf.SELF_KEYED_BUCKETS:
        if bucket not in access.kv_write:
            assert f"$KV.{bucket.value}.{service}.>" in perms.publish


def test_cli_user_reads_everything_and_writes_nothing() -> None:
    perms = natsconf.users()[natsconf.CLI_USER]
    assert not [s for s in perms.publish if s.startswith("$KV.")]
    for bucket in Bucket:
        assert f"$JS.API.STREAM.INFO.KV_{bucket.value}" in perms.publish


def test_render_quotes_literal_passwords_and_keeps_references_bare() -> None:
    passwords = {user: f'p"w {user}' for user in natsconf.users()}
    passwords["cli"] = "$SOME_VAR"
    text = natsconf.render(passwords=passwords)
    assert 'password: "p\\"w identity"' in text
    assert "password: $SOME_VAR" in text
