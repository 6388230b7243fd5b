"""The REST edge of a real service (policy): auth on every route, problems that name fields,
size limits, and nothing stored when the input is bad."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from ciliate.config import Settings
from ciliate.testing import serving

TOKEN = "test-token"

POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "deny-all", "namespace": "x"},
    "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
}


@pytest.fixture
async def service(nats_url: str, sqlite_url: str, tmp_path: Any) -> AsyncIterator[str]:
    from ciliate.cli.plugins import service_specs

    spec = service_specs()["policy"].load()
    settings = Settings(nats_url=nats_url, db_url=sqlite_url, token=TOKEN, node="n1",
                        state_dir=tmp_path, replica="t1")
    async with serving(spec, settings) as base:
        yield base


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def test_every_route_but_health_needs_the_token(service: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(service + "/openapi.json", headers=_auth()) as resp:
            doc = await resp.json()
        routes = [(m, p) for p, ops in doc["paths"].items() for m in ops]
        assert len(routes) >= 8
        for method, path in routes:
            url = service + path.replace("{kind}", "NetworkPolicy").replace(
                "{namespace}", "x").replace("{name}", "n")
            async with session.request(method.upper(), url) as resp:
                if path in ("/healthz", "/readyz"):
                    assert resp.status == 200, path
                else:
                    assert resp.status == 401, (method, path)
                    assert resp.content_type == "application/problem+json"


async def _count(session: aiohttp.ClientSession, base: str) -> int:
    async with session.get(base + "/v1/resources/NetworkPolicy", headers=_auth()) as resp:
        assert resp.status == 200
        return len((await resp.json())["items"])


async def test_bad_field_is_a_422_naming_it_and_nothing_is_stored(service: str) -> None:
    bad = {**POLICY, "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}}
    async with aiohttp.ClientSession() as session:
        async with session.post(service + "/v1/resources", json=bad, headers=_auth()) as resp:
            assert resp.status == 422
            body = await resp.json()
        assert any(e["field"] == "spec.ingress[0].ports[0].port" for e in body["errors"])
        assert await _count(session, service) == 0


async def test_malformed_and_oversized_bodies_are_4xx(service: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(service + "/v1/resources", data=b"{not json",
                                headers={**_auth(), "Content-Type": "application/json"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["errors"][0]["field"] == "body"
        huge = b'{"a": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        async with session.post(service + "/v1/resources", data=io.BytesIO(huge),
                                headers={**_auth(), "Content-Type": "application/json"}) as resp:
            assert resp.status == 413
        async with session.post(service + "/v1/resources", json=[1, 2],
                                headers=_auth()) as resp:
            assert resp.status == 422
        async with session.post(service + "/v1/resources",
                                json={**POLICY, "kind": "Pod", "apiVersion": "v1"},
                                headers=_auth()) as resp:
            assert resp.status == 404
            assert (await resp.json())["errors"][0]["field"] == "kind"
        assert await _count(session, service) == 0


async def test_apply_get_delete_round_trip(service: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(service + "/v1/resources", json=POLICY, headers=_auth()) as resp:
            assert resp.status == 201
        async with session.post(service + "/v1/resources", json=POLICY, headers=_auth()) as resp:
            assert resp.status == 200
            assert (await resp.json())["changed"] is False
        url = service + "/v1/resources/NetworkPolicy/x/deny-all"
        async with session.get(url, headers=_auth()) as resp:
            doc = await resp.json()
        assert doc["spec"]["policyTypes"] == ["Ingress"]
        async with session.delete(url, headers=_auth()) as resp:
            assert resp.status == 200
        async with session.get(url, headers=_auth()) as resp:
            assert resp.status == 404
