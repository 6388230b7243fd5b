"""Splicing one peer's records into a packed KV ``policy`` value gives the very bytes a whole
encode gives (so digests, replicas and readers cannot tell the difference)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliate.bus import codec
from ciliate.labels.k8s import endpoint_labels
from ciliate.policymap import Entry, encode_value, splice_peer
from ciliate.resources.registry import parse_resource
from services.policy.core.compile import IdentityWorld, PolicyEngine
from services.policy.core.kv import _rows, encode_policy, splice_policy
from services.policy.core.spec import normalize
from services.policy.core.synthetic import generate
from services.policy.core.world import SequentialCIDRAllocator, reserved_identities

L7 = {"http": [{"method": "GET", "path": "/x", "host": "", "headers": []}], "wildcard": False}
PEERS = [0, 1, 2, 256, 300, 301, 1 << 24 | 5]

entry_st = st.builds(
    lambda peer, direction, proto, port, plen, deny, proxy, cookies, l7: Entry(
        peer, direction, proto, port, plen, deny, 0 if deny else proxy, tuple(sorted(cookies)),
        L7 if l7 and proxy and not deny else None),
    st.sampled_from(PEERS), st.sampled_from(["ingress", "egress"]),
    st.sampled_from([0, 6, 17]), st.integers(0, 40), st.sampled_from([0, 12, 16]),
    st.booleans(), st.sampled_from([0, 15001]),
    st.lists(st.sampled_from(["a", "b", "c", "default-allow"]), max_size=2, unique=True),
    st.booleans(),
)  # fmt: skip


def _unique(entries: list[Entry]) -> list[Entry]:
    return list({e[:5]: e for e in entries}.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(entry_st, max_size=30), st.lists(entry_st, max_size=8), st.sampled_from(PEERS))
def test_splicing_a_peer_equals_encoding_the_whole_map(
        before: list[Entry], fresh: list[Entry], peer: int) -> None:
    old = _unique(before)
    new = _unique([e._replace(peer=peer) for e in fresh])
    after = [e for e in old if e.peer != peer] + new
    value = encode_value(300, {"ingress": True}, old)
    rows = []
    l7 = {}
    for e in new:
        direction = 0 if e.direction == "ingress" else 1
        rows.append((e.peer, direction, e.proto, e.port, e.prefixlen, int(e.deny),
                     e.proxy_port, e.cookies))
        if e.l7 is not None:
            l7[(e.peer, direction, e.proto, e.port, e.prefixlen)] = e.l7
    spliced = splice_peer(value, peer, rows, l7)
    whole = encode_value(300, {"ingress": True}, after)
    assert spliced == whole
    assert codec.pack(spliced) == codec.pack(whole)  # the digest the publisher compares


def test_splice_refuses_rows_of_another_peer() -> None:
    value = encode_value(300, {"ingress": True}, [Entry(7, "ingress", 6, 80, 16)])
    try:
        splice_peer(value, 8, [(9, 0, 6, 80, 16, 0, 0, ())])
    except ValueError:
        return
    raise AssertionError("a row of another peer was spliced in")


def test_new_identity_spliced_into_peer_maps_equals_whole_encodes() -> None:
    synthetic = generate(1, count=120)
    world = IdentityWorld({**reserved_identities(), **synthetic.identities})
    engine = PolicyEngine(normalize([parse_resource(d) for d in synthetic.policy_docs]),  # type: ignore[misc]
                          world, allocate_cidr=SequentialCIDRAllocator())
    engine.compile_all()
    before = {i: encode_policy(p, None) for i, p in engine.compiled.items()}
    spliced = 0
    for n, new_id in enumerate((5000, 5001, 5002)):
        ns = f"ns-new-{n}"
        labels = endpoint_labels({"app": "new", "tier": f"t{n + 3}", "group": f"g{n + 1}"}, ns,
                                 {"kubernetes.io/metadata.name": ns})
        _, work = engine.admit_identity(new_id, labels)
        deltas = engine.propagate_identity(work)
        for local in deltas:
            value = splice_policy(engine.compiled[local], before[local], {new_id})
            assert value == encode_policy(engine.compiled[local], None), local
            before[local] = value
            spliced += 1
        before[new_id] = encode_policy(engine.compiled[new_id], None)
    assert spliced > 20, "the new identities are peers of some locals"


def test_splice_policy_falls_back_when_enforcement_changed() -> None:
    synthetic = generate(1, count=40)
    world = IdentityWorld({**reserved_identities(), **synthetic.identities})
    engine = PolicyEngine(normalize([parse_resource(d) for d in synthetic.policy_docs]),  # type: ignore[misc]
                          world, allocate_cidr=SequentialCIDRAllocator())
    engine.compile_all()
    pol = next(p for p in engine.compiled.values() if p.entries)
    stale = dict(encode_policy(pol, None))
    stale["enforce"] = {"ingress": False, "egress": False}
    assert splice_policy(pol, stale, {next(iter(pol.entries)).peer}) == encode_policy(pol, None)
    assert _rows(pol, [])[0] == []
