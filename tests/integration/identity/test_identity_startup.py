"""Start-up and the CLI against a live service: an unmigrated database stops the service with
a message that says what to run; ``ciliate identity|endpoint|ip`` print what the service holds."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from identity_live_support import TOKEN, StartIdentity

from ciliate.client.context import ClientContext
from ciliate.stack.ports import free_port
from services.identity.cli import endpoint, identity, ip

REPO = Path(__file__).resolve().parents[3]


def test_an_unmigrated_database_stops_the_service_with_a_clear_message(
    nats_url: str, tmp_path: Path
) -> None:
    env = dict(os.environ) | {
        "CILIATE_NATS_URL": nats_url,
        "CILIATE_DB_URL": f"sqlite:///{tmp_path / 'empty.db'}",
        "CILIATE_HTTP_PORT": str(free_port()),
        "CILIATE_TOKEN": TOKEN,
        "CILIATE_STATE_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.identity"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode != 0
    assert "run `ciliate db upgrade`" in done.stderr
    assert "identities" in done.stderr


@pytest.mark.parametrize("output", ["json", "table"])
async def test_cli_lists_identities_endpoints_and_the_ipcache(
    start_identity: StartIdentity,
    nats_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    output: str,
) -> None:
    live = await start_identity()
    await live.apply_ok({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    applied = await live.apply_ok({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
        "status": {"podIP": "10.244.1.10"},
    })
    ident = applied["endpoint"]["identity"]
    state = tmp_path / "cli-state"
    ClientContext(str(state), nats_url, TOKEN, services={"identity": [live.url]}).save()
    monkeypatch.setenv("CILIATE_STATE_DIR", str(state))

    def cli(group: object, *args: str) -> str:
        result = CliRunner().invoke(group, [*args, "-o", output])  # type: ignore[arg-type]
        assert result.exit_code == 0, result.output
        return result.output

    async def run(group: object, *args: str) -> str:
        return await asyncio.to_thread(cli, group, *args)

    listed = await run(identity, "list")
    one = await run(identity, "get", str(ident))
    endpoints = await run(endpoint, "list")
    ips = await run(ip, "list")
    if output == "json":
        idents = json.loads(listed)
        assert {"id": 2, "labels": ["reserved:world"]} in idents
        assert any(i["id"] == ident and "k8s:app=web" in i["labels"] for i in idents)
        assert json.loads(one)[0]["id"] == ident
        assert json.loads(endpoints)[0]["ips"] == ["10.244.1.10"]
        assert json.loads(ips) == [{"prefix": "10.244.1.10/32", "identity": ident,
                                    "node": "node-1"}]
    else:
        assert "reserved:world" in listed and "k8s:app=web" in listed
        assert str(ident) in one
        assert "x/a" in endpoints and "10.244.1.10" in endpoints
        assert "10.244.1.10/32" in ips and str(ident) in ips
