"""Compiled entries looked up as BPF does agree with a direct reading of the rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliate.bus import codec
from ciliate.labels import LabelSet
from ciliate.policymap import ENTRY, iter_entries
from ciliate.resources.base import ResourceError, validate_model
from ciliate.resources.ciliumpolicy import CiliumNetworkPolicy
from ciliate.resources.selectors import LabelSelector
from services.policy.core.compile import (
    EntryKey,
    IdentityWorld,
    PolicyEngine,
    Verdict,
    lookup,
    port_blocks,
)
from services.policy.core.kv import decode_policy, encode_policy
from services.policy.core.spec import (
    Direction,
    Enforcement,
    Peer,
    PeerKind,
    PolicySet,
    PortSpec,
    Rule,
)

APPS = ["a", "b", "c", "d"]


def ident_labels(app: str) -> LabelSet:
    return LabelSet.from_strings([f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=n"])


WORLD = {256 + i: ident_labels(app) for i, app in enumerate(APPS)}
sel_st = st.sampled_from([None, *APPS]).map(
    lambda app: LabelSelector.model_validate({"matchLabels": {"app": app}} if app else {}).compile()
)
port_st = st.one_of(
    st.just(PortSpec()),
    st.builds(lambda p: PortSpec(6, p), st.integers(78, 84)),
    st.builds(lambda p, n: PortSpec(6, p, p + n), st.integers(70, 84), st.integers(1, 20)),
    st.just(PortSpec(17, 0)),
)
rule_st = st.builds(
    lambda i, subj, direction, deny, peer, ports: Rule(
        f"r{i}", subj, direction, deny, (Peer(PeerKind.SELECTOR, selector=peer),), tuple(ports)
    ),
    st.integers(0, 1000), sel_st, st.sampled_from(list(Direction)), st.booleans(), sel_st,
    st.lists(port_st, max_size=2),
)  # fmt: skip


def port_matches(spec: PortSpec, proto: int, port: int) -> bool:
    if spec.proto == 0:
        return True
    if spec.proto != proto:
        return False
    assert isinstance(spec.port, int)
    if spec.port == 0:
        return True
    return spec.port <= port <= (spec.end_port or spec.port)


def direct(rules: list[Rule], local: int, peer: int, d: Direction, proto: int, port: int) -> bool:
    """The policy read plainly: deny wins, an allow allows, a selected direction denies."""
    labels = WORLD
    mine = [r for r in rules if r.direction is d and r.subject.matches_labels(labels[local])]
    if not mine:
        return True
    hits = [
        r
        for r in mine
        if any(p.selector is not None and p.selector.matches_labels(labels[peer]) for p in r.peers)
        and (not r.ports or any(port_matches(s, proto, port) for s in r.ports))
    ]
    if any(r.deny for r in hits):
        return False
    return any(not r.deny for r in hits)


@settings(max_examples=150, deadline=None)
@given(st.lists(rule_st, max_size=6), st.integers(70, 106), st.sampled_from([6, 17]))
def test_lookup_agrees_with_direct_evaluation(rules: list[Rule], port: int, proto: int) -> None:
    enf = tuple(Enforcement(r.cookie, r.subject, r.direction, True) for r in rules)
    engine = PolicyEngine(
        PolicySet(tuple(rules), enf), IdentityWorld(WORLD), allow_host_ingress=False
    )
    result = engine.compile_all()
    for local in WORLD:
        for peer in WORLD:
            for d in Direction:
                got = lookup(result.policies.get(local), peer, d, proto, port).allowed
                assert got == direct(rules, local, peer, d, proto, port), (local, peer, d)


@given(st.integers(1, 65535), st.integers(0, 2000))
def test_port_blocks_cover_exactly_the_range(start: int, extra: int) -> None:
    end = min(65535, start + extra)
    covered: list[int] = []
    for port, plen in port_blocks(start, end):
        size = 1 << (16 - plen)
        assert port % size == 0  # aligned, so an LPM lookup can find it
        covered += range(port, port + size)
    assert covered == list(range(start, end + 1))


def cnp(spec: dict[str, object]) -> CiliumNetworkPolicy:
    data = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "n"}, "spec": spec}  # fmt: skip
    return validate_model(CiliumNetworkPolicy, data)


def test_enable_default_deny_false_keeps_other_traffic_allowed_but_deny_applies() -> None:
    from services.policy.core.spec import normalize

    policy = cnp({
        "endpointSelector": {"matchLabels": {"app": "a"}},
        "enableDefaultDeny": {"ingress": False},
        "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "b"}}]}],
    })  # fmt: skip
    engine = PolicyEngine(normalize([policy]), IdentityWorld(WORLD))
    res = engine.compile_all()
    assert lookup(res.policies[256], 257, Direction.INGRESS, 6, 80).verdict is Verdict.DENIED
    assert lookup(res.policies[256], 258, Direction.INGRESS, 6, 80).allowed


def test_l7_rule_compiles_to_proxy_redirect() -> None:
    from services.policy.core.spec import normalize

    policy = cnp({
        "endpointSelector": {"matchLabels": {"app": "a"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "b"}}],
                     "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                  "rules": {"http": [{"method": "POST", "path": "/x"}]}}]}],
    })  # fmt: skip
    res = PolicyEngine(normalize([policy]), IdentityWorld(WORLD)).compile_all()
    got = lookup(res.policies[256], 257, Direction.INGRESS, 6, 80)
    assert got.verdict is Verdict.REDIRECTED and got.proxy_port > 0
    assert res.policies[256].l7


def test_overflow_is_reported_per_identity_never_truncated() -> None:
    rules = tuple(
        Rule(f"r{p}", LabelSelector().compile(), Direction.INGRESS, False,
             (Peer(PeerKind.WILDCARD),), (PortSpec(6, p),))
        for p in range(1, 40)
    )  # fmt: skip
    engine = PolicyEngine(PolicySet(rules), IdentityWorld(WORLD), capacity=10)
    result = engine.compile_all()
    assert not result.ok
    assert {o.identity for o in result.overflows} == set(WORLD)
    assert all(len(p.entries) == 39 for p in result.policies.values())


def test_incremental_add_matches_full_recompile() -> None:
    from services.policy.core.spec import normalize

    policy = cnp({
        "endpointSelector": {"matchLabels": {"app": "a"}},
        "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "e"}}]}],
    })  # fmt: skip
    engine = PolicyEngine(normalize([policy]), IdentityWorld(WORLD))
    engine.compile_all()
    deltas = engine.add_identity(300, ident_labels("e"))
    assert set(deltas) == {256, 300}
    assert EntryKey(300, Direction.INGRESS, 0, 0, 0) in deltas[256].added
    full = PolicyEngine(normalize([policy]), IdentityWorld({**WORLD, 300: ident_labels("e")}))
    assert full.compile_all().policies[256].entries == engine.compiled[256].entries


def test_kv_encoding_round_trips() -> None:
    from services.policy.core.spec import normalize

    policy = cnp({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [{"port": "80"}]}]}]})
    pol = PolicyEngine(normalize([policy]), IdentityWorld(WORLD)).compile_all().policies[256]
    encoded = encode_policy(pol, revision=3)
    assert encoded["enforce"] == {"ingress": True, "egress": False}
    assert {e.proto for e in iter_entries(encoded) if e.port == 80} == {6, 17, 132}
    assert len(encoded["entries"]) == ENTRY.size * len(pol.entries)
    back = decode_policy(codec.unpack(codec.pack(encoded)))
    assert back.entries == pol.entries


def _ports(**port: object) -> dict[str, object]:
    return {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [port]}]}]}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"endpointSelector": {}, "ingress": [{"fromEntities": ["wrld"]}]}, "fromEntities[0]"),
        ({"endpointSelector": {}, "egress": [{"toCIDR": ["10.0.0.0/40"]}]}, "toCIDR[0]"),
        (_ports(port="99999"), "port"),
        (_ports(port="80", endPort=70), "endPort"),
        (_ports(port="http", endPort=90), "endPort"),
        (_ports(port="80", protocol="GRE"), "protocol"),
    ],
)  # fmt: skip
def test_bad_cilium_input_names_the_field(spec: dict[str, object], field: str) -> None:
    with pytest.raises(ResourceError) as info:
        cnp(spec)
    assert any(e.path.endswith(field) for e in info.value.errors), info.value
