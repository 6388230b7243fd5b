"""The agent serves ciliate-cni's REST contract (docs/k8s.md) on its own app outside dev mode or
when asked (CILIATE_CNI=1), with the stack's bearer token, and not otherwise."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ciliate.api import make_app
from ciliate.config import Settings
from ciliate.runner import ServiceContext
from services.datapath.service import AgentConfig, default_pod_cidr, mount_cni

TOKEN = "t0ken"


def _config(tmp_path: Path, *, dev_mode: bool, **extra: str) -> AgentConfig:
    settings = Settings(nats_url="nats://127.0.0.1:1", node="node-3", state_dir=tmp_path,
                        dev_mode=dev_mode, extra=extra)
    return AgentConfig.from_context(cast(ServiceContext, SimpleNamespace(settings=settings)))


def test_cni_is_served_outside_dev_mode_and_on_request(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CILIATE_CNI", raising=False)
    assert _config(tmp_path, dev_mode=False).cni
    assert not _config(tmp_path, dev_mode=True).cni
    assert _config(tmp_path, dev_mode=True, cni="1").cni
    monkeypatch.setenv("CILIATE_CNI", "1")
    assert _config(tmp_path, dev_mode=True).cni
    assert default_pod_cidr("node-3") == "10.244.3.0/24"
    assert _config(tmp_path, dev_mode=False, pod_cidr="10.9.0.0/24").pod_cidr == "10.9.0.0/24"


async def test_mounted_cni_routes_keep_the_rest_contract(tmp_path: Path) -> None:
    app = make_app("datapath", token=TOKEN)
    assert mount_cni(app, _config(tmp_path, dev_mode=True, cni="0"), None) is None
    assert mount_cni(app, _config(tmp_path, dev_mode=False), None) is not None
    auth = {"Authorization": f"Bearer {TOKEN}"}
    args: dict[str, Any] = {"containerID": "c0ffee", "netns": "/var/run/netns/none",
                            "ifName": "eth0", "podNamespace": "default", "podName": "p"}
    async with TestClient(TestServer(app)) as client:
        unauth = await client.post("/v1/cni/del", json=args)
        assert unauth.status == 401
        deleted = await client.post("/v1/cni/del", json=args, headers=auth)
        assert deleted.status == 200 and await deleted.json() == {"deleted": False}
        check = await client.get("/v1/cni/check", params=args, headers=auth)
        assert check.status == 404
        assert (await check.json())["errors"][0]["field"] == "containerID"
        bad = await client.post("/v1/cni/add", json={"netns": "x"}, headers=auth)
        assert bad.status in (400, 422)
