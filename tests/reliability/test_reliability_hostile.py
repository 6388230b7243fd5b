"""Hostile input against a running stack: generated requests from each OpenAPI document, nasty
JSON and YAML, garbage msgpack on every subject a service listens to.

What must hold: no crash, no 5xx (503 excepted), a clear 4xx naming what is wrong, nothing
stored, bounded memory.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import (
    NON_AGENTS,
    Rest,
    children,
    cli,
    namespace,
    pod,
    rss_kib,
    start_stack,
    wait_for,
)

from ciliate.bus.subjects import (
    IDENTITY_ALLOCATE,
    IDENTITY_LOOKUP,
    IDENTITY_RELEASE,
    flows,
    process,
)
from ciliate.stack.supervisor import Stack

EXAMPLES_PER_OPERATION = 15
RSS_GROWTH_LIMIT_KIB = 64 * 1024
"""A service may grow by caches and allocator slack, never by the size of what it refused."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("hostile") / "state")
    try:
        yield s
    finally:
        s.stop()


def _openapi(base: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(base + "/openapi.json",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
    return doc


def _fuzz_service(base: str, token: str) -> list[str]:
    """Every operation, ``EXAMPLES_PER_OPERATION`` generated requests; the 5xx answers found."""
    import schemathesis

    schema = schemathesis.openapi.from_dict(_openapi(base, token))
    failures: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err raises, as it should
        if operation.path.startswith("/ui"):
            continue

        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case: Any) -> None:
            response = case.call(base_url=base, headers=headers, timeout=10)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append(f"{case.method} {case.formatted_path} -> "
                                f"{response.status_code}: {response.text[:200]}")

        run()
    return failures


@pytest.mark.parametrize("service", NON_AGENTS)
def test_generated_requests_never_get_a_5xx(stack: Stack, service: str) -> None:
    child = children(stack, service)[0]
    assert child.proc is not None
    failures = _fuzz_service(child.url, stack.token)
    assert not failures, "\n".join(failures[:10])
    assert child.proc.poll() is None


NASTY_JSON: dict[str, bytes] = {
    "deep array": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "deep labels": json.dumps(pod("x", "p")).replace(
        '"labels": {"app": "web"}', '"labels": {"app": ' + '{"a": ' * 3000 + "1"
        + "}" * 3000 + "}").encode(),
    "invalid utf-8": b'{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "\xff\xfe"}}',
    "not an object": b"[1, 2, 3]",
    "huge number": b'{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a"}, '
                   b'"spec": {"containers": [{"name": "c", "ports": [{"containerPort": 1'
                   + b"0" * 5000 + b"}]}]}}",
    "nan": b'{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": '
           b'{"x": NaN}}}',
    "wrong types": json.dumps({"apiVersion": "v1", "kind": "Pod",
                               "metadata": {"name": ["a"], "namespace": 7,
                                            "labels": "app=web"},
                               "spec": {"containers": "nginx"}}).encode(),
    "over the size limit": b'{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", '
                           b'"annotations": {"x": "' + b"A" * (2 << 20) + b'"}}}',
    "bad name": json.dumps(namespace("../../etc")).encode(),
    "null bytes": json.dumps(namespace("a\u0000b")).encode(),
}


async def _stored_pods_and_namespaces(rest: Rest, stack: Stack) -> tuple[Any, Any]:
    base = children(stack, "identity")[0].url
    _, pods = await rest.call("GET", base + "/v1/pods")
    _, namespaces = await rest.call("GET", base + "/v1/namespaces")
    return pods, namespaces


async def test_nasty_json_is_a_clear_4xx_and_stores_nothing(stack: Stack) -> None:
    identity = children(stack, "identity")[0]
    assert identity.proc is not None
    async with Rest(stack) as rest:
        before = await _stored_pods_and_namespaces(rest, stack)
        rss_before = rss_kib(identity.proc.pid)
        for _ in range(3):
            for what, body in NASTY_JSON.items():
                status, answer = await rest.call(
                    "POST", identity.url + "/v1/resources", data=body,
                    headers={"Content-Type": "application/json"})
                assert 400 <= status < 500, (what, status, answer)
                assert isinstance(answer, dict) and answer.get("title"), (what, answer)
        rss_after = rss_kib(identity.proc.pid)
        assert await _stored_pods_and_namespaces(rest, stack) == before
    assert identity.proc.poll() is None
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_KIB, (rss_before, rss_after)


def _alias_bomb(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    body = "\n".join("  " + line for line in lines)
    return ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bomb}\ndata:\n" + body
            + f"\n  all: *a{levels - 1}\n")


NASTY_YAML: dict[str, bytes] = {
    "alias bomb": _alias_bomb().replace("ConfigMap", "Namespace").encode(),
    "recursive alias": b"apiVersion: v1\nkind: Namespace\nmetadata: &m {name: a, x: *m}\n",
    "deep nesting": b"apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nspec: "
                    + b"[" * 10_000 + b"]" * 10_000 + b"\n",
    "huge document": b"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n  annotations:\n"
                     + b"".join(b"    k%d: v\n" % i for i in range(200_000)),
    "many documents": b"".join(b"---\napiVersion: v1\nkind: Namespace\nmetadata: {name: n%d}\n"
                               % i for i in range(1500)),
    "invalid utf-8": b"apiVersion: v1\nkind: Namespace\nmetadata: {name: \xc3\x28}\n",
    "wrong types": b"apiVersion: v1\nkind: Pod\nmetadata: {name: [a], namespace: 3}\n"
                   b"spec: {containers: nginx}\n",
    "binary and sets": b"apiVersion: v1\nkind: Namespace\nmetadata: {name: !!binary aGk=}\n"
                       b"spec: !!set {a, b}\n",
    "python tags": b"apiVersion: v1\nkind: Namespace\nmetadata:\n"
                   b"  name: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
    "duplicate keys": b"apiVersion: v1\nkind: Namespace\nmetadata: {name: a, name: b}\n",
    "good then bad": b"apiVersion: v1\nkind: Namespace\nmetadata: {name: fine-first}\n---\n"
                     b"apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: fine-first}\n"
                     b"spec: {containers: [{name: c, ports: [{containerPort: 99999}]}]}\n",
}


@pytest.mark.parametrize("what", sorted(NASTY_YAML))
def test_nasty_yaml_through_apply_is_refused_and_stores_nothing(
    stack: Stack, tmp_path: Path, what: str
) -> None:
    identity = children(stack, "identity")[0]
    assert identity.proc is not None
    rss_before = rss_kib(identity.proc.pid)
    path = tmp_path / "nasty.yaml"
    path.write_bytes(NASTY_YAML[what])
    result = cli(stack.state_dir, "apply", "-f", str(path), timeout=30)
    assert result.returncode == 1, (what, result.stdout, result.stderr)
    assert result.stderr.strip(), what
    assert b"Traceback" not in result.stderr, result.stderr.decode()[-2000:]
    listed = cli(stack.state_dir, "get", "ns", "-o", "json")
    names = [n["metadata"]["name"] for n in json.loads(listed.stdout)["items"]]
    assert not {"a", "fine-first", "n0", "bomb"} & set(names), names
    assert not Path("/tmp/pwned").exists()
    assert rss_kib(identity.proc.pid) - rss_before < RSS_GROWTH_LIMIT_KIB


GARBAGE = [b"", b"\xc1", b"\xff" * 64, b"\x92\x01", msgpack.packb({"labels": "x"}),
           msgpack.packb({"labels": [[1, 2], None]}), msgpack.packb({"ids": ["a", -1, 2**63]}),
           msgpack.packb([None] * 1000), msgpack.packb({"items": [{"x": 1}], "lost": "many"}),
           msgpack.packb({"source": 1, "items": "no", "lost": -5}),
           msgpack.packb({"items": [[1, 2, 3], "flow", None, {"time": "x"}]}),
           b"\xdd\xff\xff\xff\xff", b"\xc7\xff\x01" + b"\x00" * 10]
"""Undecodable bytes, truncated containers, valid msgpack of every wrong shape."""


async def _connect(stack: Stack, user: str) -> Any:
    return await nats.connect(stack.nats.url, user=user, password=stack.nats_passwords[user],
                              allow_reconnect=False)


async def test_garbage_msgpack_on_every_subject_leaves_services_answering(stack: Stack) -> None:
    """Sent by the users allowed to publish there: a compromised or buggy peer."""
    random_blobs = [bytes((i * 37 + j) % 256 for j in range(i)) for i in range(1, 200, 7)]
    as_policy = await _connect(stack, "policy")
    as_datapath = await _connect(stack, "datapath")
    as_security = await _connect(stack, "security")
    try:
        for payload in GARBAGE + random_blobs:
            for subject in (IDENTITY_ALLOCATE, IDENTITY_RELEASE, IDENTITY_LOOKUP):
                reply = await as_policy.request(subject, payload, timeout=5)
                answer = msgpack.unpackb(reply.data)
                assert isinstance(answer, dict), (subject, payload, answer)
                assert "error" in answer or not payload, (subject, payload, answer)
            for node in ("node-1", "nope"):
                await as_datapath.publish(flows(node), payload)
                await as_security.publish(process(node), payload)
        await as_datapath.flush()
        await as_security.flush()
        # A well-formed request after all that still gets a real answer.
        reply = await as_policy.request(
            IDENTITY_LOOKUP, msgpack.packb({"ids": [1, 2]}), timeout=5)
        assert "error" not in msgpack.unpackb(reply.data), reply.data
    finally:
        for nc in (as_policy, as_datapath, as_security):
            await nc.close()
    async with Rest(stack) as rest:
        for child in stack.children:
            assert child.proc is not None and child.proc.poll() is None, child.service

            async def ready(url: str = child.url) -> bool:
                status, body = await rest.call("GET", url + "/readyz")
                return status == 200 and bool(body["ready"])

            await wait_for(ready, 10, f"{child.service} ready after the garbage")
        events = children(stack, "events")[0].url
        status, _ = await rest.call("GET", events + "/v1/flows?number=5")
        assert status == 200


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(
    st.sampled_from(["apiVersion", "kind", "metadata", "spec", "status", "data", "x"]),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)))
def test_resource_validators_raise_only_resource_errors(doc: dict[str, Any]) -> None:
    from ciliate.resources.base import ResourceError
    from ciliate.resources.registry import parse_resource

    try:
        parse_resource(doc)
    except ResourceError as exc:
        assert exc.as_dicts()


KIND_DOCS = st.sampled_from([
    ("v1", "Pod"), ("v1", "Namespace"), ("v1", "Service"), ("discovery.k8s.io/v1", "EndpointSlice"),
    ("networking.k8s.io/v1", "NetworkPolicy"), ("cilium.io/v2", "CiliumNetworkPolicy"),
    ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"), ("cilium.io/v1alpha1", "TracingPolicy"),
])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "namespace", "labels", "selector", "podSelector", "ingress",
                         "egress", "ports", "port", "protocol", "containers", "endpointSelector",
                         "matchLabels", "fromEndpoints", "toPorts", "kprobes", "spec", "x"]),
        inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=KIND_DOCS, metadata=JSONISH, spec=JSONISH)
def test_every_kind_validator_raises_only_resource_errors(
    kind: tuple[str, str], metadata: Any, spec: Any
) -> None:
    from ciliate.resources.base import ResourceError
    from ciliate.resources.registry import parse_resource

    try:
        parse_resource({"apiVersion": kind[0], "kind": kind[1], "metadata": metadata,
                        "spec": spec})
    except ResourceError as exc:
        assert exc.as_dicts()


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-&*![]{}|>\n \t'\"#%@`,?0.\\x"))
                    , max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_yaml_loader_raises_only_resource_errors(text: str) -> None:
    from ciliate.resources.base import ResourceError
    from ciliate.resources.loader import load_resources

    for data in (text, text.encode("latin-1", "replace")):
        try:
            load_resources(data)
        except ResourceError as exc:
            assert exc.as_dicts()
