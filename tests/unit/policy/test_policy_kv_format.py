"""The packed KV ``policy`` value: what the policy service writes is what every reader reads."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliate.bus import codec
from ciliate.labels.k8s import endpoint_labels
from ciliate.policymap import (
    ENTRY,
    Entry,
    encode_value,
    entry_count,
    iter_entries,
    readable,
    unpack_entries,
)
from ciliate.resources.registry import parse_resource
from services.datapath.core.plan import policy_entries
from services.datapath.proxy.core.policy import IdentityEntries
from services.policy.core.compile import IdentityWorld, PolicyEngine
from services.policy.core.kv import decode_policy, encode_policy
from services.policy.core.spec import normalize
from services.policy.core.synthetic import identities, policy
from services.policy.core.world import SequentialCIDRAllocator, reserved_identities

L7 = {"http": [{"method": "GET", "path": "/x", "host": "", "headers": []}], "wildcard": False}

entry_st = st.builds(
    lambda peer, direction, proto, port, plen, deny, proxy, cookies, l7: Entry(
        peer, direction, proto, port, plen, deny, 0 if deny else proxy, tuple(cookies),
        L7 if l7 and proxy and not deny else None),
    st.sampled_from([0, 1, 2, 256, 300, 1 << 24 | 5]), st.sampled_from(["ingress", "egress"]),
    st.sampled_from([0, 1, 6, 17, 132]), st.integers(0, 65535), st.integers(0, 16),
    st.booleans(), st.sampled_from([0, 15001]),
    st.lists(st.sampled_from(["a/ingress[0]", "b/egress[1]", "default-allow"]), max_size=2,
             unique=True),
    st.booleans(),
)  # fmt: skip


def _unique(entries: list[Entry]) -> list[Entry]:
    by_key = {e[:5]: e for e in entries}
    return list(by_key.values())


def _canon(entries: list[Entry]) -> list[Entry]:
    return sorted(e._replace(cookies=tuple(sorted(e.cookies))) for e in entries)


@settings(max_examples=80, deadline=None)
@given(st.lists(entry_st, max_size=40), st.randoms(use_true_random=False))
def test_packed_value_round_trips_and_is_deterministic(raw: list[Entry], rnd: random.Random
                                                       ) -> None:
    entries = _unique(raw)
    value = encode_value(300, {"ingress": True}, entries, revision=4)
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    again = encode_value(300, {"ingress": True}, shuffled, revision=4)
    assert codec.pack(again) == codec.pack(value)  # equal maps, equal bytes (no spurious puts)
    back = codec.unpack(codec.pack(value))  # through the bus codec, as a watcher gets it
    assert len(back["entries"]) == ENTRY.size * len(entries) == ENTRY.size * entry_count(back)
    assert _canon(list(iter_entries(back))) == _canon(entries)
    legacy = readable(back)  # the older list form reads back to the same entries
    assert _canon(list(iter_entries(legacy))) == _canon(entries)


def test_records_are_sixteen_bytes_in_the_documented_order() -> None:
    value = encode_value(300, {}, [Entry(1001, "egress", 6, 8080, 16, True, 0, ("c",))])
    assert value["entries"] == ENTRY.pack(1001, 1, 6, 8080, 16, 1, 0, 0)
    rec = unpack_entries(value["entries"])[0]
    assert (int(rec["peer"]), int(rec["direction"]), int(rec["port"])) == (1001, 1, 8080)
    assert value["cookies"] == [["c"]] and "l7" not in value


def test_bad_values_are_refused() -> None:
    value = encode_value(300, {}, [Entry(1, "ingress", 6, 80, 16)])
    with pytest.raises(ValueError, match="whole number"):
        list(iter_entries({**value, "entries": value["entries"][:-1]}))
    with pytest.raises(ValueError, match="layout"):
        list(iter_entries({**value, "layout": 99}))
    with pytest.raises(ValueError, match="cookie set"):
        list(iter_entries({**value, "cookies": []}))


def _engine(count: int = 80) -> PolicyEngine:
    rng = random.Random(7)
    docs = [policy(i, rng) for i in range(count)]
    world = IdentityWorld({**reserved_identities(), **identities(8, 5)})
    return PolicyEngine(normalize([parse_resource(d) for d in docs]),  # type: ignore[misc]
                        world, allocate_cidr=SequentialCIDRAllocator())


def test_readers_see_the_same_map_packed_or_as_dicts() -> None:
    engine = _engine()
    engine.compile_all()
    checked = 0
    for ident, pol in engine.compiled.items():
        packed = codec.unpack(codec.pack(encode_policy(pol, 1)))
        legacy = readable(packed)
        assert isinstance(legacy["entries"], list)
        assert decode_policy(packed).entries == pol.entries
        assert policy_entries(packed) == policy_entries(legacy)
        assert IdentityEntries.from_kv(packed) == IdentityEntries.from_kv(legacy)
        checked += bool(pol.entries)
        assert packed["identity"] == ident
    assert checked > 5


def test_l7_rules_reach_the_proxy_from_the_packed_value() -> None:
    value = codec.unpack(codec.pack(encode_value(1000, {"ingress": True}, [
        Entry(0, "ingress", 6, 80, 16, False, 15001, ("r",), L7),
        Entry(7, "ingress", 6, 81, 16, False, 0, ("s",)),
    ])))
    view = IdentityEntries.from_kv(value)
    redirect = view.lookup(9, "ingress", 6, 80)
    assert redirect is not None and redirect.proxy_port == 15001
    assert [r.path for r in redirect.rules.http] == ["/x"]
    plain = view.lookup(7, "ingress", 6, 81)
    assert plain is not None and not plain.rules.http and plain.cookies == ("s",)


def test_own_map_first_then_peers_in_parts_equals_a_full_compile() -> None:
    engine = _engine()
    engine.compile_all()
    new_id = 5000
    ns = "ns-new"
    labels = endpoint_labels({"app": "new", "tier": "t3", "group": "g1"}, ns,
                             {"kubernetes.io/metadata.name": ns})
    _, work = engine.admit_identity(new_id, labels)
    assert new_id in engine.compiled
    assert work.locals, "the new identity is a peer of some locals"
    for start in range(0, len(work.locals), 3):
        part = type(work)(work.ident, work.locals[start:start + 3], work.required)
        engine.propagate_identity(part)
    full = _engine()
    full.cache.add(new_id, labels)
    full.compile_all()
    assert set(full.compiled) == set(engine.compiled)
    for ident, pol in full.compiled.items():
        assert engine.compiled[ident].entries == pol.entries, ident


def test_propagation_of_a_removed_identity_is_dropped() -> None:
    engine = _engine()
    engine.compile_all()
    ns = "ns-gone"
    labels = endpoint_labels({"app": "x", "tier": "t3", "group": "g1"}, ns,
                             {"kubernetes.io/metadata.name": ns})
    _, work = engine.admit_identity(5001, labels)
    before = {i: dict(p.entries) for i, p in engine.compiled.items() if i != 5001}
    engine.remove_identity(5001)
    assert engine.propagate_identity(work) == {}
    after = {i: p.entries for i, p in engine.compiled.items()}
    assert after == before
