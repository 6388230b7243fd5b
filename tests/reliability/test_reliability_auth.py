"""Authentication everywhere: every REST route needs the token, the context file is private,
and a service's NATS user can do only what ``ACCESS`` grants it."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from reliability_support import (
    NON_AGENTS,
    OPEN_ROUTES,
    UI_ROUTES,
    children,
    start_stack,
    walk_routes,
)

from ciliate.bus.subjects import IDENTITY_ALLOCATE, IDENTITY_LOOKUP, Bucket, flows, kv_subject
from ciliate.client.context import ClientContext
from ciliate.stack.supervisor import Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("auth") / "state")
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("service", NON_AGENTS)
async def test_every_route_but_health_needs_the_token(stack: Stack, service: str) -> None:
    allowed_open = OPEN_ROUTES | (UI_ROUTES if service == "events" else set())
    ops = await walk_routes(stack, service, allowed_open)
    assert ("POST", "/v1/resources") in ops or service == "events", ops


async def test_open_ui_route_serves_only_its_files(stack: Stack) -> None:
    base = children(stack, "events")[0].url
    async with aiohttp.ClientSession() as anonymous:
        for name in ("..%2fservice.py", "%2e%2e%2f%2e%2e%2fpyproject.toml", "service.py",
                     "..%2f..%2f..%2fstate%2ftoken"):
            async with anonymous.get(f"{base}/ui/{name}") as resp:
                assert resp.status == 404, (name, resp.status)
                assert stack.token not in await resp.text()


def test_client_context_and_token_are_private(stack: Stack) -> None:
    for path in (ClientContext.path_for(stack.state_dir), stack.state_dir / "token"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    context = ClientContext.load(stack.state_dir)
    assert context.token == stack.token and len(stack.token) >= 32
    assert context.nats_user == "cli" and context.nats_password


async def _connect(stack: Stack, user: str, errors: list[str]) -> Any:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(stack.nats.url, user=user, password=stack.nats_passwords[user],
                              error_cb=on_error, allow_reconnect=False)


async def _violations(errors: list[str], subject: str) -> bool:
    for _ in range(50):
        lowered = [e.lower() for e in errors]
        if any("permissions violation" in e and subject.lower() in e for e in lowered):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_datapath_user_cannot_touch_policy_subjects_or_bucket(stack: Stack) -> None:
    errors: list[str] = []
    nc = await _connect(stack, "datapath", errors)
    try:
        # What it may do works: read the policy bucket, publish its flows.
        kv = await nc.jetstream().key_value(Bucket.POLICY.value)
        assert await kv.status() is not None
        await nc.publish(flows("node-1"), b"\x90")
        await nc.flush()
        # Writing the policy bucket is refused by the server, not by our client code.
        with pytest.raises((NatsTimeout, NoRespondersError)):
            await nc.request(kv_subject(Bucket.POLICY, "1"), b"\x80", timeout=1)
        assert await _violations(errors, kv_subject(Bucket.POLICY, "1")), errors
        # Lookups and identity's bucket are refused; allocation (for the DNS proxy's CIDR
        # identities) and registering its node are allowed.
        for subject in (IDENTITY_LOOKUP, kv_subject(Bucket.IDENTITIES, "9")):
            await nc.publish(subject, b"\x80")
            await nc.flush()
            assert await _violations(errors, subject), (subject, errors)
        for subject in (IDENTITY_ALLOCATE, kv_subject(Bucket.NODES, "node-1")):
            await nc.publish(subject, b"\x80")
        await nc.flush()
        assert not any(
            s.lower() in e.lower()
            for e in errors
            for s in (flows("node-1"), IDENTITY_ALLOCATE, kv_subject(Bucket.NODES, "node-1"))
        ), errors
    finally:
        await nc.close()


async def test_policy_bucket_unchanged_after_the_attempts(stack: Stack) -> None:
    errors: list[str] = []
    nc = await _connect(stack, "cli", errors)
    try:
        kv = await nc.jetstream().key_value(Bucket.POLICY.value)
        with pytest.raises(Exception, match=r"not found|no keys"):
            await kv.get("1")
        with pytest.raises((NatsTimeout, NoRespondersError)):
            await nc.request(kv_subject(Bucket.POLICY, "2"), b"\x80", timeout=1)
    finally:
        await nc.close()


def test_wrong_password_is_refused(stack: Stack) -> None:
    """Spoken at the protocol level, so no client library retry hides the answer."""
    host, port = stack.nats.url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        assert sock.recv(4096).startswith(b"INFO ")
        connect = {"user": "policy", "pass": "guess", "verbose": False, "pedantic": False}
        sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        answer = sock.recv(4096)
    assert b"-ERR 'Authorization Violation'" in answer, answer


def test_state_dir_holds_no_world_readable_secret(stack: Stack) -> None:
    for path in Path(stack.state_dir).iterdir():
        if path.is_file() and path.suffix not in (".db", ".db-wal", ".db-shm"):
            text = path.read_bytes()
            if stack.token.encode() in text:
                assert path.stat().st_mode & 0o077 == 0, path
