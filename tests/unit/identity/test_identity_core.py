"""The identity service's pure rules: id pools, reference counts, IPAM, KV payloads."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.labels import LabelSet, ReservedIdentity, endpoint_labels
from services.identity.core.allocator import (
    CIDR_IDENTITY_MIN,
    IdPool,
    PoolExhausted,
    RefState,
    Scope,
    acquire,
    gc_due,
    release,
    reserved_id_for,
    scope_of,
)
from services.identity.core.endpoints import (
    Endpoint,
    NamedPort,
    container_ports,
    ipcache_key,
    next_endpoint_id,
    reserved_identity_values,
)
from services.identity.core.ipam import Ipam, IpamError, parse_ip
from services.identity.core.validation import label_errors


def test_candidates_are_free_distinct_and_in_scope() -> None:
    pool = IdPool(Scope.CLUSTER, taken={256, 257, 300}, rng=random.Random(1))
    picks = pool.candidates(500)
    assert len(set(picks)) == 500
    assert all(256 <= p <= 65535 and p not in {256, 257, 300} for p in picks)


def test_dense_pool_still_finds_the_last_free_ids() -> None:
    pool = IdPool(Scope.CLUSTER, rng=random.Random(2))
    pool.mark_taken(range(256, 65534))
    assert pool.candidates(2) == [65534, 65535]
    with pytest.raises(PoolExhausted):
        pool.candidates(3)


def test_cidr_label_sets_use_the_local_scope() -> None:
    cidr = LabelSet.from_strings(["cidr:10.0.0.0/8"])
    assert scope_of(cidr) is Scope.CIDR
    assert scope_of(LabelSet.from_strings(["k8s:app=x"])) is Scope.CLUSTER
    picks = IdPool(Scope.CIDR, rng=random.Random(3)).candidates(10)
    assert all(p >= CIDR_IDENTITY_MIN and p & (1 << 24) for p in picks)


def test_reserved_label_set_maps_to_cilium_number() -> None:
    assert reserved_id_for(LabelSet.from_strings(["reserved:world"])) == 2
    assert reserved_id_for(LabelSet.from_strings(["reserved:remote-node"])) == 6
    assert reserved_id_for(LabelSet.from_strings(["k8s:app=x"])) is None


def test_refcount_grace_period_and_revival() -> None:
    state = acquire(acquire(RefState(0)))
    state = release(state, now=10.0)
    assert state == RefState(1, None)
    state = release(state, now=20.0)
    assert state == RefState(0, 20.0)
    assert not gc_due(state, now=50.0, grace=60.0)
    assert gc_due(state, now=80.0, grace=60.0)
    assert release(state, now=70.0) == RefState(0, 20.0)  # a double release keeps the start
    assert acquire(state) == RefState(1, None)


@given(
    st.dictionaries(
        st.sampled_from(["app", "tier", "team", "version"]), st.sampled_from(["a", "b"]), max_size=4
    ),
    st.dictionaries(
        st.sampled_from(["pod-template-hash", "controller-uid", "kubernetes.io/hostname"]),
        st.text(alphabet="abc123", min_size=1, max_size=5),
        max_size=3,
    ),
    st.randoms(),
)
def test_identity_key_is_a_function_of_filtered_labels(
    user: dict[str, str], noise: dict[str, str], rnd: random.Random
) -> None:
    """Order and filtered-out labels change nothing in the canonical key the allocator stores."""
    items = list((user | noise).items())
    rnd.shuffle(items)
    noisy = endpoint_labels(dict(items), "ns", {"ns": "ns"})
    clean = endpoint_labels(user, "ns", {"ns": "ns"})
    assert noisy.canonical() == clean.canonical()


def test_ipam_node_cidrs_and_next_address() -> None:
    ipam = Ipam()
    assert ipam.next_node_cidr(set()) == "10.244.0.0/24"
    assert ipam.next_node_cidr({"10.244.0.0/24"}) == "10.244.1.0/24"
    assert ipam.next_address("10.244.1.0/24", set()) == "10.244.1.2"
    assert ipam.next_address("10.244.1.0/24", {"10.244.1.2"}) == "10.244.1.3"
    assert ipam.next_address("10.244.1.0/24", set(), skip=1) == "10.244.1.3"
    assert ipam.node_cidr_of("10.244.3.30") == "10.244.3.0/24"
    assert ipam.node_cidr_of("192.168.0.1") is None
    full = {f"10.244.1.{i}" for i in range(2, 255)}
    with pytest.raises(IpamError):
        ipam.next_address("10.244.1.0/24", full)
    with pytest.raises(IpamError) as err:
        parse_ip("10.244.1.300")
    assert err.value.field == "status.podIP"


def test_ipam_is_configurable() -> None:
    ipam = Ipam("10.10.0.0/16", node_prefix=26)
    assert ipam.next_node_cidr({"10.10.0.0/26"}) == "10.10.0.64/26"
    with pytest.raises(ValueError):
        Ipam("10.10.0.0/16", node_prefix=16)


def test_endpoint_payloads_follow_the_contract() -> None:
    ports = container_ports(
        [
            {
                "ports": [
                    {"name": "http", "containerPort": 80},
                    {"containerPort": 53, "protocol": "udp"},
                ]
            }
        ]
    )
    assert ports == [NamedPort("http", 80, "TCP"), NamedPort("", 53, "UDP")]
    ep = Endpoint(
        7, "x", "a", ("k8s:pod=a",), 300, ("10.244.1.10",), "n1", tuple(ports), {"pod": "a"}
    )
    assert ep.key == "x.a"
    assert ep.kv_value() == {
        "id": 7,
        "namespace": "x",
        "name": "a",
        "labels": ["k8s:pod=a"],
        "identity": 300,
        "ips": ["10.244.1.10"],
        "node": "n1",
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "", "port": 53, "protocol": "UDP"},
        ],
        "pod_labels": {"pod": "a"},
        "ready": True,
        "images": [],
    }
    assert ep.ipcache_entries() == {
        "10.244.1.10": {"prefix": "10.244.1.10/32", "identity": 300, "node": "n1"}
    }
    assert ipcache_key("10.0.0.0/8") == "10.0.0.0_8"


def test_reserved_identities_are_published() -> None:
    values = reserved_identity_values()
    assert values["2"] == {"id": 2, "labels": ["reserved:world"]}
    assert len(values) == len(ReservedIdentity)


def test_next_endpoint_id() -> None:
    assert next_endpoint_id(set()) == 1
    assert next_endpoint_id({1, 2, 4}) == 3
    assert next_endpoint_id({1, 2, 4}, skip=1) == 5


def test_label_validation_names_the_path() -> None:
    errors = label_errors({"app": "ok", "bad key!": "x", "tier": "-no-", "example.com/x": "y"})
    assert [e.path for e in errors] == ["metadata.labels.bad key!", "metadata.labels.tier"]
    assert label_errors({"a" * 64: "x"})[0].message.startswith("invalid label key")
    assert label_errors({"Example.com/x": "y"})  # prefix must be lowercase


def test_next_endpoint_id_starts_at_the_known_floor() -> None:
    assert next_endpoint_id({1, 2, 3, 5}, start=4) == 4
    assert next_endpoint_id({1, 2, 3, 5}, start=5) == 6
    assert next_endpoint_id(set(), start=0) == 1
