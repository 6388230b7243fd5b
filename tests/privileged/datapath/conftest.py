"""Fixtures for the datapath's privileged tests: a salted two-node dev cluster and one
Datapath per node, torn down (netns, links, cgroups, processes, pinned maps) even on failure."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

if os.geteuid() != 0:
    pytest.skip("needs root (network namespaces, BPF)", allow_module_level=True)

from services.datapath.loader import Datapath, MapSizes, unpin
from services.datapath.maps import PIN_ROOT, pin_dir
from services.datapath.sandbox import DevCluster

SMALL = MapSizes(ct_tcp=4096, ct_any=4096, ipcache=1024, endpoints=256, policy=8192,
                 events_pages=16)


@pytest.fixture
def map_sizes() -> MapSizes:
    return SMALL


@pytest.fixture
def salt() -> str:
    return "t" + secrets.token_hex(3)


@pytest.fixture
def pin_root(salt: str) -> Iterator[Path]:
    root = PIN_ROOT / f"test-{salt}"
    try:
        yield root
    finally:
        if root.exists():
            for d in root.iterdir():
                unpin(d)
            root.rmdir()


@pytest.fixture
def cluster(salt: str, tmp_path: Path) -> Iterator[DevCluster]:
    c = DevCluster(salt=salt, state_dir=tmp_path / "state")
    try:
        c.add_node("n1")
        c.add_node("n2")
        yield c
    finally:
        c.destroy()


@pytest.fixture
def datapaths(cluster: DevCluster, pin_root: Path) -> Iterator[dict[str, Datapath]]:
    dps: dict[str, Datapath] = {}
    try:
        for name in cluster.nodes:
            dps[name] = Datapath(name, sizes=SMALL, pin_root=pin_root)
        yield dps
    finally:
        for dp in dps.values():
            dp.close()
        for name in cluster.nodes:
            unpin(pin_dir(name, pin_root))
