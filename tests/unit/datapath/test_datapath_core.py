"""The datapath's pure core: ordered map plans, deny precedence as BPF looks it up, conntrack
lifetimes, and the event record codec."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliate.flows.tables import TrafficDirection
from services.datapath.core.conntrack import CTFlag, ct_expired, ct_lifetime_s
from services.datapath.core.events import EVENT_SIZE, EventDecoder, decode_event, encode_event
from services.datapath.core.model import EndpointFlag, EnforcementMode, PolicyKey
from services.datapath.core.plan import (
    DesiredState,
    MapName,
    desired_state,
    lookup_verdict,
    plan,
    policy_entries,
)

S = 1_000_000_000


def _entry(peer: int, proto: int, port: int, plen: int, deny: bool) -> dict[str, Any]:
    return {"peer": peer, "direction": "ingress", "proto": proto, "port": port,
            "port_prefixlen": plen, "deny": deny, "proxy_port": 0, "cookies": []}


def _world(entries: list[dict[str, Any]], node: str = "n1") -> DesiredState:
    return desired_state(
        node=node,
        endpoints=[{"id": 1, "identity": 300, "ips": ["10.0.0.1"], "node": "n1"},
                   {"id": 2, "identity": 301, "ips": ["10.0.0.2"], "node": "n2"}],
        ipcache=[{"prefix": "10.0.0.1/32", "identity": 300}, {"prefix": "10.0.0.2/32",
                                                              "identity": 301}],
        policies={300: {"identity": 300, "enforce": {"ingress": True, "egress": False},
                        "entries": entries}},
    )


def test_plan_writes_ipcache_then_policy_then_endpoints_and_removes_in_reverse() -> None:
    new = _world([_entry(301, 6, 80, 16, False)])
    ops = plan(DesiredState(), new)
    assert [op.map for op in ops] == sorted(op.map for op in ops)
    assert {op.map for op in ops} == set(MapName)
    gone = plan(new, DesiredState())
    assert all(op.is_delete for op in gone)
    assert [op.map for op in gone] == sorted((op.map for op in gone), reverse=True)
    assert plan(new, new) == []


def test_only_local_endpoints_get_endpoint_and_policy_entries() -> None:
    state = _world([_entry(301, 6, 80, 16, False)], node="n2")
    assert set(state.endpoints) == {"10.0.0.2"}
    assert state.policy == {}  # identity 301 has no policy; 300 lives elsewhere
    assert len(state.ipcache) == 2


def test_enforcement_modes() -> None:
    from services.datapath.core.plan import endpoint_flags

    assert endpoint_flags(None, EnforcementMode.DEFAULT, False) == EndpointFlag.NONE
    assert endpoint_flags({"ingress": True}, EnforcementMode.DEFAULT, False) == \
        EndpointFlag.ENFORCE_INGRESS
    assert endpoint_flags(None, EnforcementMode.ALWAYS, False) == \
        EndpointFlag.ENFORCE_INGRESS | EndpointFlag.ENFORCE_EGRESS
    assert endpoint_flags({"ingress": True}, EnforcementMode.NEVER, True) == EndpointFlag.AUDIT


def test_deny_rule_beats_a_more_specific_allow_of_the_same_peer() -> None:
    entries = policy_entries({"identity": 300, "entries": [
        _entry(301, 0, 0, 0, True), _entry(301, 6, 80, 16, False), _entry(0, 6, 80, 16, False)]})
    v = lookup_verdict(entries, 300, TrafficDirection.INGRESS, 301, 6, 80)
    assert v is not None and v.deny
    v = lookup_verdict(entries, 300, TrafficDirection.INGRESS, 302, 6, 80)
    assert v is not None and not v.deny
    assert lookup_verdict(entries, 300, TrafficDirection.INGRESS, 302, 6, 81) is None


def test_port_without_protocol_expands_to_port_protocols() -> None:
    entries = policy_entries({"identity": 300, "entries": [_entry(0, 0, 53, 16, False)]})
    assert {k.proto for k in entries} == {6, 17, 132}


entry_st = st.builds(
    _entry,
    peer=st.sampled_from([0, 301, 302]),
    proto=st.sampled_from([0, 6, 17]),
    port=st.integers(0, 127),
    plen=st.sampled_from([0, 10, 12, 14, 15, 16]),
    deny=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(entry_st, max_size=8), st.sampled_from([301, 302, 303]),
       st.sampled_from([6, 17]), st.integers(0, 127))
def test_two_lpm_lookups_equal_the_brute_force_meaning(
    raw: list[dict[str, Any]], peer: int, proto: int, port: int
) -> None:
    """Deny if any matching rule denies, else allow if any allows, else no match."""
    entries = policy_entries({"identity": 300, "entries": raw})
    got = lookup_verdict(entries, 300, TrafficDirection.INGRESS, peer, proto, port)
    matching = []
    for e in raw:
        plen = e["port_prefixlen"]
        k = PolicyKey(300, TrafficDirection.INGRESS, e["peer"], e["proto"],
                      e["port"] if plen else 0, plen)
        if e["peer"] in (0, peer) and e["proto"] in (0, proto) and (
            (e["proto"] == 0 and plen == 0) or k.covers_port(port)
        ):
            matching.append(e)
    if any(e["deny"] for e in matching):
        assert got is not None and got.deny
    elif matching:
        assert got is not None and not got.deny
    else:
        assert got is None


def test_conntrack_lifetimes_follow_cilium() -> None:
    assert ct_lifetime_s(6, CTFlag.NONE) == 60  # SYN only
    assert ct_lifetime_s(6, CTFlag.SEEN_REPLY) == 8000
    assert ct_lifetime_s(6, CTFlag.SEEN_REPLY | CTFlag.TX_CLOSING | CTFlag.RX_CLOSING) == 10
    assert ct_lifetime_s(6, CTFlag.SEEN_REPLY | CTFlag.RST) == 10
    assert ct_lifetime_s(17, CTFlag.SEEN_REPLY) == 60
    assert not ct_expired(6, CTFlag.SEEN_REPLY, 0, 7999 * S)
    assert ct_expired(6, CTFlag.SEEN_REPLY, 0, 8001 * S)
    assert ct_expired(17, 0, 0, 61 * S) and not ct_expired(17, 0, 0, 59 * S)


def test_event_roundtrip_and_short_records_counted() -> None:
    raw = encode_event(src_identity=300, dst_identity=301, src_ip="10.0.0.1",
                       dst_ip="10.0.0.2", src_port=40000, dst_port=80, drop_reason=181,
                       tcp_flags=0x02)
    assert len(raw) == EVENT_SIZE
    flow = decode_event(raw)
    assert flow["verdict"] == "DROPPED" and flow["drop_reason_desc"] == "POLICY_DENY"
    assert (flow["src_ip"], flow["dst_ip"], flow["dst_port"]) == ("10.0.0.1", "10.0.0.2", 80)
    assert flow["tcp_flags"] == ["SYN"] and flow["traffic_direction"] == "INGRESS"
    dec = EventDecoder()
    dec.feed(raw)
    dec.feed(raw[:10])
    assert len(dec.drain()) == 1 and dec.errors == 1
