"""Pure parts of the agent wiring: pod association, policy scoping by namespace and podSelector,
export filters (Tetragon's allow/deny fields), the exporter's rotation, and which field a
missing kernel feature is blamed on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.security.core.features import feature_field
from services.security.core.filters import (
    AllowDeny,
    EventFilter,
    FilterError,
    from_flags,
    parse_filter_lines,
)
from services.security.core.pods import PodIndex, cgroup_path_in
from services.security.exporter import Exporter


def endpoint(ns: str, name: str, node: str = "n1", **labels: str) -> dict[str, Any]:
    return {"namespace": ns, "name": name, "node": node, "pod_labels": labels, "identity": 1}


def exec_event(binary: str, ns: str = "", pod: str = "", pid: int = 10) -> dict[str, Any]:
    proc: dict[str, Any] = {"binary": binary, "pid": pid}
    if pod:
        proc["pod"] = {"namespace": ns, "name": pod}
    return {"process_exec": {"process": proc}, "node_name": "n1"}


def test_pods_join_endpoints_of_this_node_with_their_cgroup_directories() -> None:
    index = PodIndex("n1")
    index.set_cgroups({"x.a": 100, "x.b": 101, "y.c": 102})
    index.set_endpoint("x.a", endpoint("x", "a", app="web"))
    index.set_endpoint("y.c", endpoint("y", "c", node="n2"))
    assert index.pod_of(100) == {"namespace": "x", "name": "a", "pod_labels": {"app": "web"}}
    assert index.pod_of(101) is None  # directory without an endpoint record
    assert index.pod_of(102) is None  # endpoint of another node
    index.set_endpoint("x.a", None)
    assert index.pod_of(100) is None


def test_a_pod_moving_to_another_node_leaves_this_index() -> None:
    index = PodIndex("n1")
    index.set_cgroups({"x.a": 100})
    assert index.set_endpoint("x.a", endpoint("x", "a"))
    assert index.set_endpoint("x.a", endpoint("x", "a", node="n2"))
    assert index.pod_of(100) is None
    assert not index.set_endpoint("x.a", endpoint("x", "a", node="n2"))


def test_allowed_cgroups_follow_namespace_and_pod_selector() -> None:
    index = PodIndex("n1")
    index.set_cgroups({"x.a": 1, "x.b": 2, "y.a": 3})
    index.set_endpoint("x.a", endpoint("x", "a", app="web"))
    index.set_endpoint("x.b", endpoint("x", "b", app="db"))
    index.set_endpoint("y.a", endpoint("y", "a", app="web"))
    assert index.allowed_cgroups("x", None) == {1, 2}
    assert index.allowed_cgroups("x", {"matchLabels": {"app": "web"}}) == {1}
    assert index.allowed_cgroups(None, {"matchLabels": {"app": "web"}}) == {1, 3}
    assert index.allowed_cgroups(None, {"matchExpressions": [
        {"key": "app", "operator": "NotIn", "values": ["web"]}]}) == {2}
    assert index.allowed_cgroups("z", None) == set()


def test_proc_cgroup_inside_subtree_is_a_path_prefix_not_a_string_prefix() -> None:
    assert cgroup_path_in("/ciliate/n1", "0::/ciliate/n1\n")
    assert cgroup_path_in("/ciliate/n1", "1:name=systemd:/x\n0::/ciliate/n1/x.a\n")
    assert not cgroup_path_in("/ciliate/n1", "0::/ciliate/n10/x.a\n")
    assert not cgroup_path_in("/ciliate/n1", "1:cpu:/ciliate/n1\n")


def test_filters_and_fields_or_values_like_tetragon() -> None:
    f = EventFilter.from_json({"namespace": ["x", "y"], "binary_regex": ["curl$"]})
    assert f.matches(exec_event("/usr/bin/curl", "x", "a"))
    assert f.matches(exec_event("/usr/bin/curl", "y", "a"))
    assert not f.matches(exec_event("/usr/bin/curl", "z", "a"))
    assert not f.matches(exec_event("/usr/bin/wget", "x", "a"))
    types = EventFilter.from_json({"event_set": ["PROCESS_EXIT"]})
    assert not types.matches(exec_event("/bin/true"))


def test_allow_then_deny() -> None:
    rules = AllowDeny(allow=parse_filter_lines('{"namespace": ["x"]}\n\n{"pid": [1]}'),
                      deny=parse_filter_lines('{"binary_regex": ["^/bin/sh$"]}'))
    assert rules.passes(exec_event("/bin/ls", "x", "a"))
    assert rules.passes(exec_event("/bin/ls", pid=1))
    assert not rules.passes(exec_event("/bin/sh", "x", "a"))
    assert not rules.passes(exec_event("/bin/ls", "y", "a"))
    assert AllowDeny().passes(exec_event("/bin/sh"))


def test_bad_filters_are_refused_with_the_line() -> None:
    with pytest.raises(FilterError, match="line 2: unknown filter field"):
        parse_filter_lines('{"pid": [1]}\n{"podname": ["x"]}')
    with pytest.raises(FilterError, match="event_set"):
        EventFilter.from_json({"event_set": ["PROCESS_FORK"]})
    with pytest.raises(FilterError, match="regular expression"):
        from_flags([], ["("], [], [])


def test_getevents_flags_build_one_allow_filter() -> None:
    rules = from_flags(["x"], [], [], ["kill-tmp-exec"])
    hit = {"process_tracepoint": {"process": {"pod": {"namespace": "x", "name": "a"}},
                                  "policy_name": "kill-tmp-exec"}}
    assert rules.passes(hit)
    assert not rules.passes(exec_event("/bin/ls", "x", "a"))
    assert from_flags([], [], [], []).passes(exec_event("/bin/ls"))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=60))
def test_exporter_rotation_keeps_every_line_within_size_and_backups(sizes: list[int]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.json"
        exporter = Exporter(path, max_bytes=1000, max_backups=3)
        for n, size in enumerate(sizes):
            exporter.write({"process_exec": {"process": {"binary": "x" * size, "pid": n}}})
        exporter.close()
        files = [path] + [exporter.backup(i) for i in (1, 2, 3)]
        lines = [json.loads(line) for f in reversed(files) if f.exists()
                 for line in f.read_text().splitlines()]
        assert not exporter.backup(4).exists()
        for f in files:
            if f.exists():
                assert f.stat().st_size <= max(1000, max(sizes) + 80)
        pids = [e["process_exec"]["process"]["pid"] for e in lines]
        assert pids == sorted(pids)  # oldest backup first, no reordering
        assert pids[-1] == len(sizes) - 1  # the newest line is always kept


def test_exporter_from_env_applies_filters(tmp_path: Path) -> None:
    assert Exporter.from_env({}) is None
    exporter = Exporter.from_env({
        "CILIATE_EXPORT_FILE": str(tmp_path / "out" / "events.json"),
        "CILIATE_EXPORT_DENYLIST": '{"binary_regex": ["sh$"]}',
    })
    assert exporter is not None
    assert exporter.write(exec_event("/bin/ls"))
    assert not exporter.write(exec_event("/bin/sh"))
    exporter.close()
    lines = (tmp_path / "out" / "events.json").read_text().splitlines()
    assert [json.loads(line)["process_exec"]["process"]["binary"] for line in lines] == ["/bin/ls"]


def test_missing_features_are_blamed_on_the_field_that_needs_them() -> None:
    doc = {"spec": {
        "kprobes": [{"call": "fd_install"}],
        "tracepoints": [{"selectors": [
            {"matchActions": [{"action": "Post"}]},
            {"matchActions": [{"action": "Post"}, {"action": "Sigkill"}]},
        ]}],
        "lsmhooks": [],
    }}
    assert feature_field(doc, "kprobe") == "spec.kprobes[0]"
    assert feature_field(doc, "lsm") == "spec.lsmhooks"
    assert feature_field(doc, "send_signal") == \
        "spec.tracepoints[0].selectors[1].matchActions[1].action"
    assert feature_field(doc, "override_return") == "spec"
