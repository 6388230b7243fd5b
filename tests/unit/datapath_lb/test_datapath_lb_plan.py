"""KV `lb` -> LB map contents, and the ordered diff between two contents."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.datapath.lb.core.model import (
    BackendFlag,
    BackendState,
    LbMap,
    SvcFlag,
    SvcKey,
    apply_ops,
    dangling,
    desired_state,
    plan,
    table_id,
)

M = 251


def table(ids: list[int]) -> dict[str, Any]:
    return {"m": M, "backend_ids": sorted(ids),
            "table": struct.pack(f"<{M}I", *(ids[i % len(ids)] for i in range(M)))}


def svc(name: str, vip: str, backends: list[tuple[int, str, str, str]], *,
        algorithm: str = "maglev", scope: str = "cluster", affinity: int = 0,
        table_key: str | None = "auto", nodeport: bool = False) -> dict[str, dict[str, Any]]:
    """One Service (one TCP port "http") plus its table: backends are (id, ip, node, state)."""
    bes = [{"id": i, "address": ip, "port": 8080, "protocol": "TCP", "state": state,
            "node": node, "weight": 100, "port_name": "http"} for i, ip, node, state in backends]
    active = [i for i, _ip, _n, state in backends if state == "active"
              and (scope == "cluster" or _n == "n1")]
    out: dict[str, dict[str, Any]] = {}
    tkey = table_key
    if table_key == "auto":
        tkey = f"tbl.{'-'.join(map(str, sorted(active)))}" if active else None
    if tkey is not None and active:
        out[tkey] = table(sorted(active))  # one key, one content: the lb service's tables are
        # keyed by their members, so two Services with the same members share identical bytes
    fes = [{"id": 100 + sum(map(ord, name)) % 800, "address": vip, "port": 80,
            "protocol": "TCP", "type": "ClusterIP", "scope": scope, "port_name": "http"}]
    if nodeport:
        fes.append({"id": 900 + sum(map(ord, name)) % 90, "address": "0.0.0.0", "port": 30080,
                    "protocol": "TCP", "type": "NodePort", "scope": scope, "port_name": "http"})
    tables_field: dict[str, Any] = {"http": tkey if scope == "cluster" else None}
    local_tables: dict[str, Any] = {"http": {"n1": tkey}} if scope == "local" and tkey else {}
    out[f"svc.default.{name}"] = {
        "namespace": "default", "name": name, "type": "NodePort" if nodeport else "ClusterIP",
        "algorithm": algorithm, "affinity_timeout": affinity, "frontends": fes,
        "backends": bes, "tables": tables_field, "local_tables": local_tables}
    return out


def test_maglev_service_points_at_its_table_and_counts_active_backends() -> None:
    kv = svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "active"),
                                  (2, "10.0.0.2", "n2", "active"),
                                  (3, "10.0.0.3", "n2", "terminating")], affinity=30)
    state, warnings = desired_state(kv, "n1", maglev_m=M)
    assert warnings == []
    master = state.services[SvcKey("10.96.0.1", 80, 6)]
    assert master.count == 2 and master.table_id == table_id("tbl.1-2")
    assert master.flags == SvcFlag.CLUSTER_IP | SvcFlag.MAGLEV | SvcFlag.AFFINITY
    assert master.affinity_timeout == 30
    assert {state.services[SvcKey("10.96.0.1", 80, 6, s)].backend_id for s in (1, 2)} == {1, 2}
    # The terminating backend stays in the backends map for its established connections.
    assert state.backends[3].state is BackendState.TERMINATING
    assert state.backends[2].flags is BackendFlag.REMOTE
    assert state.backends[1].flags is BackendFlag.NONE
    assert state.revnat[master.rev_nat].address == "10.96.0.1"


def test_null_table_means_no_backend() -> None:
    kv = svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "terminating")])
    state, _ = desired_state(kv, "n1", maglev_m=M)
    assert state.services[SvcKey("10.96.0.1", 80, 6)].count == 0
    assert state.maglev == {}


def test_random_falls_back_to_terminating_backends() -> None:
    kv = svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "terminating"),
                                  (2, "10.0.0.2", "n1", "maintenance")], algorithm="random")
    state, _ = desired_state(kv, "n1")
    assert state.services[SvcKey("10.96.0.1", 80, 6)].count == 1
    assert state.services[SvcKey("10.96.0.1", 80, 6, 1)].backend_id == 1


def test_local_scope_uses_only_this_nodes_backends() -> None:
    kv = svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "active"),
                                  (2, "10.0.0.2", "n2", "active")], scope="local")
    state, _ = desired_state(kv, "n1", maglev_m=M)
    master = state.services[SvcKey("10.96.0.1", 80, 6)]
    assert master.count == 1 and master.flags & SvcFlag.LOCAL_SCOPE
    assert state.services[SvcKey("10.96.0.1", 80, 6, 1)].backend_id == 1
    on_n3, _ = desired_state(kv, "n3", maglev_m=M)
    assert on_n3.services[SvcKey("10.96.0.1", 80, 6)].count == 0


def test_table_of_another_size_falls_back_to_slots_with_a_warning() -> None:
    kv = svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "active")])
    state, warnings = desired_state(kv, "n1", maglev_m=1021)
    master = state.services[SvcKey("10.96.0.1", 80, 6)]
    assert master.count == 1 and not master.flags & SvcFlag.MAGLEV and warnings


def test_nodeport_frontend_is_the_surrogate_address() -> None:
    kv = svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "active")], nodeport=True)
    state, _ = desired_state(kv, "n1", maglev_m=M)
    assert state.services[SvcKey("0.0.0.0", 30080, 6)].flags & SvcFlag.NODEPORT


def test_plan_orders_puts_before_deletes_and_backends_last() -> None:
    before, _ = desired_state(svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "active"),
                                                      (2, "10.0.0.2", "n1", "active")]),
                              "n1", maglev_m=M)
    after, _ = desired_state(svc("web", "10.96.0.1", [(1, "10.0.0.1", "n1", "active"),
                                                     (3, "10.0.0.3", "n1", "active")]),
                             "n1", maglev_m=M)
    ops = plan(before, after)
    kinds = [(o.map, o.value is None) for o in ops]
    assert kinds.index((LbMap.BACKENDS, False)) < kinds.index((LbMap.SERVICES, False))
    assert kinds[-1] == (LbMap.BACKENDS, True) and ops[-1].key == 2
    assert apply_ops(before, ops) == after
    assert plan(after, after) == []


backend_sets = st.lists(st.integers(1, 12), max_size=6, unique=True)
service_specs = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d"]),
    st.tuples(backend_sets, st.sampled_from(["maglev", "random"]),
              st.sampled_from(["cluster", "local"]), st.booleans()),
    max_size=4)
worlds = st.tuples(service_specs, st.dictionaries(
    st.integers(1, 12), st.sampled_from(["active", "terminating", "maintenance"])))


def build(world: tuple[dict[str, Any], dict[int, str]]) -> dict[str, dict[str, Any]]:
    """A bucket where a backend id means one address, node and state everywhere (as the lb
    allocates them) and a Service keeps its VIP."""
    specs, states = world
    kv: dict[str, dict[str, Any]] = {}
    for name, (bes, algo, scope, np) in sorted(specs.items()):
        kv |= svc(name, f"10.96.0.{ord(name)}",
                  [(b, f"10.0.0.{b}", f"n{1 + b % 2}", states.get(b, "active")) for b in bes],
                  algorithm=algo, scope=scope, nodeport=np and name == "a")
    return kv


@settings(max_examples=200, deadline=None)
@given(worlds, worlds)
@example(({"a": ([2, 4], "maglev", "local", False)}, {}),
         ({"a": ([4, 2], "maglev", "local", False)}, {}))  # same members listed in another order
def test_every_step_of_a_plan_leaves_no_dangling_reference(a: Any, b: Any) -> None:
    cur, _ = desired_state(build(a), "n1", maglev_m=M)
    want, _ = desired_state(build(b), "n1", maglev_m=M)
    assert dangling(cur) == [] and dangling(want) == []
    ops = plan(cur, want)
    state = cur
    for op in ops:
        state = apply_ops(state, [op])
        assert dangling(state) == [], op
    assert state == want
    assert plan(state, want) == []


@settings(max_examples=150, deadline=None)
@given(st.lists(worlds, min_size=1, max_size=4))
def test_incremental_updates_reach_the_same_maps_as_a_full_derivation(
        steps: list[Any]) -> None:
    from services.datapath.lb.core.model import LbIndex, LbState

    index = LbIndex("n1", maglev_m=M)
    maps = LbState()
    kv: dict[str, dict[str, Any]] = {}
    for world in steps:
        new = build(world)
        # The lb service's publication order: tables, Services, then deletions (a table only
        # once no Service points at it).
        events = ([(k, v) for k, v in new.items() if k.startswith("tbl.") and kv.get(k) != v]
                  + [(k, v) for k, v in new.items() if k.startswith("svc.") and kv.get(k) != v]
                  + [(k, None) for k in sorted(kv, key=lambda k: k.startswith("tbl."))
                     if k not in new])
        for k, v in events:
            ops = index.update(k, v)
            for op in ops:
                maps = apply_ops(maps, [op])
                assert dangling(maps) == [], (k, op)
        kv = new
        full, _ = desired_state(kv, "n1", maglev_m=M)
        assert maps == full == index.state


def test_index_update_work_stays_with_the_touched_service() -> None:
    """A Service's table users are indexed both ways: dropping or replacing a Service does not
    scan every table (it did: 5-14 ms per change at 10,000 Services), and re-publishing a table
    with the same content re-derives nobody."""
    from services.datapath.lb.core.model import LbIndex

    index = LbIndex("n1", maglev_m=M)
    a = svc("a", "10.96.0.1", [(1, "10.244.1.1", "n1", "active")])
    b = svc("b", "10.96.0.2", [(1, "10.244.1.1", "n1", "active")])
    index.load(a | b)
    assert index.users == {"tbl.1": {"svc.default.a", "svc.default.b"}}
    assert index.uses["svc.default.a"] == {"tbl.1"}
    assert index.update("tbl.1", dict(a["tbl.1"])) == []  # same content: no ops, no work
    ops = index.update("svc.default.a", None)
    assert ops and all(op.map is LbMap.SERVICES or op.map is LbMap.REVNAT for op in ops)
    assert index.users == {"tbl.1": {"svc.default.b"}} and "svc.default.a" not in index.uses
    index.update("svc.default.b", None)
    assert index.users == {} and index.uses == {}
