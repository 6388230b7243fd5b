"""A cluster stand-in, the real identity, policy and lb services, and the k8s-sync service,
all in-process on a private nats-server and a migrated SQLite database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from fake_apiserver import FakeApiServer
from k8ssync_harness import TOKEN, Cluster, wait_for, write_kubeconfig

from ciliate.config import Settings
from ciliate.runner import ServiceSpec, run_service
from ciliate.stack.ports import free_port
from services.identity.service import SPEC as IDENTITY
from services.k8ssync.service import SPEC as K8S_SYNC
from services.lb.service import SPEC as LB
from services.policy.service import SPEC as POLICY

KINDS = ("Namespace,Pod,Service,EndpointSlice,NetworkPolicy,CiliumNetworkPolicy,"
         "CiliumClusterwideNetworkPolicy")
"""TracingPolicy's owner (security) is a root-only node agent: covered by unit tests."""


@pytest.fixture
async def cluster(nats_url: str, sqlite_url: str, tmp_path: Path
                  ) -> AsyncIterator[Callable[[], Awaitable[Cluster]]]:
    """``await cluster()`` starts the sync; seed ``api`` objects before calling it."""
    api = FakeApiServer(bookmark_interval=0.2)
    await api.start()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    urls: dict[str, str] = {}
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"})

    async def start(spec: ServiceSpec, extra: dict[str, str] | None = None) -> None:
        port = free_port()
        settings = Settings(nats_url=nats_url, db_url=sqlite_url, token=TOKEN, node="node-1",
                            state_dir=tmp_path, http_port=port, replica=spec.name,
                            extra=extra or {})
        task = asyncio.create_task(run_service(spec, settings, stop))
        tasks.append(task)
        url = urls[spec.name] = f"http://127.0.0.1:{port}"

        async def up() -> bool:
            if task.done():
                task.result()
            try:
                async with http.get(f"{url}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(up, f"{spec.name} to serve HTTP")

    for spec in (IDENTITY, POLICY, LB):
        await start(spec)
    cluster = Cluster(api, urls, http)

    async def start_sync() -> Cluster:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url, api.token)
        services = ",".join(f"{name}={url}" for name, url in urls.items())
        await start(K8S_SYNC, {"kubeconfig": str(kubeconfig), "services": services,
                               "kinds": KINDS, "watch_timeout": "30"})
        return cluster

    try:
        yield start_sync
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await http.close()
        await api.stop()
