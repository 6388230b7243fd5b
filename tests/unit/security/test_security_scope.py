"""Which cgroup subtree a node's security agent acts in: in a dev cluster, exactly the one the
datapath agent on that node puts its pods in (their names carry the cluster's salt)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ciliate.config import Settings
from services.datapath.sandbox import node_cgroup
from services.datapath.service import AgentConfig
from services.security.service import CGROUP_ROOT, agent_subtree


def datapath_node_subtree(settings: Settings) -> Path:
    ctx: Any = SimpleNamespace(settings=settings)
    return node_cgroup(AgentConfig.from_context(ctx).cluster, settings.node)


def test_dev_mode_scope_is_the_datapath_nodes_subtree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CILIATE_DEV_CLUSTER", raising=False)
    s = Settings(node="node-1", state_dir=tmp_path, dev_mode=True)
    assert agent_subtree(s, {}) == datapath_node_subtree(s) != CGROUP_ROOT / "node-1"
    other = Settings(node="node-1", state_dir=tmp_path / "other", dev_mode=True)
    assert agent_subtree(other, {}) != agent_subtree(s, {})  # two stacks on one host
    named = Settings(node="node-2", state_dir=tmp_path, dev_mode=True,
                     extra={"dev_cluster": "abc"})
    assert agent_subtree(named, {}) == datapath_node_subtree(named) == CGROUP_ROOT / "abcnode-2"


def test_outside_dev_mode_and_with_an_explicit_root(tmp_path: Path) -> None:
    s = Settings(node="node-1", state_dir=tmp_path)
    assert agent_subtree(s, {}) == CGROUP_ROOT / "node-1"
    root = {"CILIATE_SECURITY_CGROUP_ROOT": str(tmp_path)}
    assert agent_subtree(s, root) == tmp_path / "node-1"
    dev = Settings(node="node-1", state_dir=tmp_path, dev_mode=True)
    assert agent_subtree(dev, root) == tmp_path / "node-1"
