"""Faults under load against a stack on PostgreSQL with three identity replicas: the database
refusing connections, kill -9 of a replica, a NATS restart. Nothing desired may be lost, and
``ciliate status`` must say what is degraded and why."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from reliability_support import (
    Rest,
    children,
    cli,
    namespace,
    pids,
    pod,
    start_stack,
    status_json,
    wait_for,
)

from ciliate.bus import Bucket, Bus
from ciliate.stack.supervisor import Stack

PG = "postgresql://postgres@127.0.0.1:5432"


async def _pg_admin(*statements: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(f"{PG}/test", timeout=3)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    name = f"ciliate_rel_{secrets.token_hex(4)}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG}: {exc}")
    try:
        yield name
    finally:
        asyncio.run(_pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true',
                              f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, database: str) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("faults") / "state", replicas={"identity": 3},
                    db_url=f"{PG}/{database}")
    try:
        yield s
    finally:
        s.stop()


async def _bus(stack: Stack) -> Bus:
    return await Bus.connect(stack.nats.url, name="reliability-test", user="cli",
                             password=stack.nats_passwords["cli"])


async def kv_endpoints(stack: Stack) -> set[str]:
    bus = await _bus(stack)
    try:
        return set(await (await bus.kv(Bucket.ENDPOINTS)).items())
    finally:
        await bus.close()


async def sql_pods(rest: Rest, stack: Stack) -> set[str]:
    """Pods as stored in SQL, keyed as the endpoints bucket keys them."""
    status, body = await rest.call("GET", children(stack, "identity")[0].url + "/v1/pods")
    assert status == 200, body
    items = body["items"] if isinstance(body, dict) else body
    return {f"{p['metadata']['namespace']}.{p['metadata']['name']}" for p in items}


async def apply_with_failover(rest: Rest, stack: Stack, doc: dict[str, Any],
                              first: int = 0) -> tuple[int, Any]:
    """As the CLI does: try identity replicas in turn while one does not answer."""
    replicas = children(stack, "identity")
    last: tuple[int, Any] = (0, None)
    for i in range(len(replicas)):
        url = replicas[(first + i) % len(replicas)].url
        try:
            return await rest.call("POST", url + "/v1/resources", doc)
        except aiohttp.ClientConnectionError as exc:
            last = (0, repr(exc))
    return last


def _supervise_until_ready(stack: Stack, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.supervise_once()
        if all(stack.ready().values()):
            return
        time.sleep(0.1)
    raise AssertionError(f"not every replica came back: {stack.ready()}")


async def test_database_refusing_connections(stack: Stack, database: str) -> None:
    async with Rest(stack, timeout=60) as rest:
        assert (await rest.apply("identity", namespace("db")))[0] in (200, 201)
        assert (await rest.apply("identity", pod("db", "before")))[0] in (200, 201)
        await wait_for(lambda: _has(stack, "db.before"), 15, "db.before in KV")
        before = pids(stack)

        await _pg_admin(
            f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()")
        try:
            for replica in range(3):
                status, body = await rest.apply("identity", pod("db", f"during-{replica}"),
                                                replica)
                assert status == 503, (replica, status, body)
                assert body["status"] == 503 and body.get("title"), body
            status, body = await rest.apply("lb", {
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": "s",
                                                                     "namespace": "db"},
                "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}})
            assert status == 503, body
            # Derived state stays readable from KV while SQL is away.
            assert "db.before" in await kv_endpoints(stack)
            # `ciliate status` names the failing check.
            report = await wait_for(lambda: _degraded_by(stack, "database"), 15,
                                    "status naming the database check")
            assert not report["healthy"]
            text = cli(stack.state_dir, "status").stdout.decode()
            assert "Degraded" in text and "database check failing" in text, text
        finally:
            await _pg_admin(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')

        async def accepted() -> bool:
            status, _ = await rest.apply("identity", pod("db", "after"))
            return status in (200, 201)

        await wait_for(accepted, 30, "writes accepted again")
        assert pids(stack) == before, "a service had to be restarted"
        stored = await sql_pods(rest, stack)
        assert {"db.before", "db.after"} <= stored
        assert not {s for s in stored if s.startswith("db.during")}, stored
        await wait_for(lambda: _has(stack, "db.after"), 15, "db.after in KV")
        assert not {k for k in await kv_endpoints(stack) if k.startswith("db.during")}
        await wait_for(lambda: _healthy(stack), 20, "status healthy again")


async def _has(stack: Stack, key: str) -> bool:
    return key in await kv_endpoints(stack)


async def _healthy(stack: Stack) -> dict[str, Any] | None:
    report = await asyncio.to_thread(status_json, stack.state_dir)
    return report if report is not None and report["healthy"] else None


async def _degraded_by(stack: Stack, check: str) -> dict[str, Any] | None:
    report = await asyncio.to_thread(status_json, stack.state_dir)
    if report is None:
        return None
    for replica in report["services"]["identity"]["replicas"]:
        if f"{check} check failing" in replica["problems"]:
            return report
    return None


async def test_kill_9_of_a_replica_under_load(stack: Stack) -> None:
    victim = children(stack, "identity")[1]
    assert victim.proc is not None
    async with Rest(stack, timeout=60) as rest:
        assert (await rest.apply("identity", namespace("k9")))[0] in (200, 201)
        names = [f"p{i}" for i in range(60)]
        killed = asyncio.Event()

        async def load() -> list[tuple[str, int, Any]]:
            results = []
            for i, name in enumerate(names):
                if i == 20:
                    killed.set()
                status, body = await apply_with_failover(rest, stack, pod("k9", name), i % 3)
                results.append((name, status, body))
            return results

        async def kill() -> None:
            await killed.wait()
            os.kill(victim.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]

        results, _ = await asyncio.gather(load(), kill())
        refused = [r for r in results if r[1] not in (200, 201)]
        assert not refused, refused
        await asyncio.to_thread(_supervise_until_ready, stack, 60)
        assert victim.restarts == 1
        expected = {f"k9.{n}" for n in names}
        assert expected <= await sql_pods(rest, stack)

        async def converged() -> bool:
            return expected <= await kv_endpoints(stack)

        await wait_for(converged, 20, "every applied pod in KV endpoints")
        # The restarted replica serves again, and reads what was written while it was dead.
        status, body = await rest.call("GET", victim.url + "/v1/pods/k9/p59")
        assert status == 200, body
        await wait_for(lambda: _healthy(stack), 20, "status healthy with the restarted replica")


async def test_nats_restart_under_load(stack: Stack, tmp_path: Path) -> None:
    async with Rest(stack, timeout=60) as rest:
        assert (await rest.apply("identity", namespace("nr")))[0] in (200, 201)
        before = pids(stack)
        names = [f"p{i}" for i in range(40)]
        outage = asyncio.Event()

        async def load() -> list[tuple[str, int, Any]]:
            results = []
            for i, name in enumerate(names):
                if i == 10:
                    outage.set()
                results.append((name, *await apply_with_failover(rest, stack, pod("nr", name),
                                                                 i % 3)))
            return results

        async def restart() -> None:
            await outage.wait()
            stack.nats.kill()
            await asyncio.sleep(1.0)  # the outage itself, not synchronisation
            await asyncio.to_thread(stack.nats.start)

        results, _ = await asyncio.gather(load(), restart())
        failed = [r for r in results if r[1] not in (200, 201)]
        assert all(r[1] in (503, 504) for r in failed), failed
        for name, _, _ in failed:  # a refused apply is the client's to retry
            assert (await apply_with_failover(rest, stack, pod("nr", name)))[0] in (200, 201)
        assert pids(stack) == before, "a service had to be restarted"

        async def converged() -> bool:
            sql = {k for k in await sql_pods(rest, stack) if k.startswith("nr.")}
            kv = {k for k in await kv_endpoints(stack) if k.startswith("nr.")}
            return sql == kv == {f"nr.{n}" for n in names}

        await wait_for(converged, 30, "KV endpoints equal to SQL after the restart")
        # Watchers resumed: lb derives a Service's backends from KV endpoints it watches.
        status, body = await rest.apply("lb", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "nr"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]}})
        assert status in (200, 201), body

        async def backends() -> bool:
            bus = await _bus(stack)
            try:
                items = await (await bus.kv(Bucket.LB)).items()
            finally:
                await bus.close()
            return any("nr" in k and v for k, v in items.items())

        await wait_for(backends, 20, "lb entries for the Service after the restart")
        await wait_for(lambda: _healthy(stack), 30, "status healthy after the restart")
