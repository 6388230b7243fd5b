"""TracingPolicy structure: Tetragon's enums and limits, refused with field paths."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from ciliate.resources import ResourceError, TracingPolicy, TracingPolicyNamespaced, parse_resource
from ciliate.resources.tracingpolicy import MAX_MATCH_ARGS_PER_SELECTOR, MAX_SELECTORS_PER_HOOK

BASE: dict[str, Any] = {
    "apiVersion": "cilium.io/v1alpha1",
    "kind": "TracingPolicy",
    "metadata": {"name": "tp"},
    "spec": {
        "tracepoints": [
            {
                "subsystem": "syscalls",
                "event": "sys_enter_execve",
                "args": [{"index": 5, "type": "string"}],
                "selectors": [
                    {
                        "matchArgs": [{"index": 5, "operator": "Prefix", "values": ["/tmp/"]}],
                        "matchBinaries": [{"operator": "In", "values": ["/bin/sh"]}],
                        "matchPIDs": [{"operator": "NotIn", "values": [1], "followForks": True}],
                        "matchNamespaces": [
                            {"namespace": "Pid", "operator": "In", "values": ["host_ns"]}
                        ],
                        "matchActions": [
                            {"action": "Sigkill"},
                            {"action": "Post", "rateLimit": "1m"},
                        ],
                    }
                ],
            }
        ],
        "podSelector": {"matchLabels": {"app": "web"}},
        "options": [{"name": "disable-kprobe-multi", "value": "1"}],
    },
}


def policy(**edits: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for dotted, value in edits.items():
        target: Any = doc
        parts = dotted.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if part.isdigit() else target[part]
        last = parts[-1]
        target[int(last) if last.isdigit() else last] = value
    return doc


def error_paths(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ResourceError) as info:
        parse_resource(doc)
    return {e.path: e.message for e in info.value.errors}


HOOK = "spec.tracepoints[0]"
SEL = f"{HOOK}.selectors[0]"


def test_full_policy_parses() -> None:
    tp = parse_resource(BASE)
    assert isinstance(tp, TracingPolicy) and not tp.NAMESPACED
    ((_, hook),) = tp.spec.hooks
    assert hook.selectors[0].matchActions[1].rateLimit == "1m"
    assert tp.spec.podSelector is not None
    assert tp.spec.podSelector.matchLabels == {"app": "web"}
    assert tp.spec.options[0].value == "1"


def test_namespaced_variant() -> None:
    doc = policy(kind="TracingPolicyNamespaced", metadata={"name": "tp", "namespace": "x"})
    tp = parse_resource(doc)
    assert isinstance(tp, TracingPolicyNamespaced) and tp.NAMESPACED and tp.OWNER == "security"


def test_kprobes_uprobes_lsmhooks() -> None:
    spec = {
        "kprobes": [
            {
                "call": "fd_install",
                "syscall": False,
                "return": True,
                "args": [{"index": 0, "type": "int"}],
                "returnArg": {"index": 0, "type": "int"},
            }
        ],
        "uprobes": [{"path": "/bin/bash", "symbols": ["readline"]}],
        "lsmhooks": [{"hook": "file_open", "args": [{"index": 0, "type": "file"}]}],
    }
    tp = parse_resource(policy(spec=spec))
    assert isinstance(tp, TracingPolicy)
    assert [g for g, _ in tp.spec.hooks] == ["kprobes", "uprobes", "lsmhooks"]
    assert tp.spec.kprobes[0].return_ is True


@pytest.mark.parametrize(
    ("edits", "path", "fragment"),
    [
        (
            {"spec__tracepoints__0__selectors__0__matchArgs__0__operator": "Like"},
            f"{SEL}.matchArgs[0].operator",
            "unknown operator 'Like'",
        ),
        (
            {"spec__tracepoints__0__selectors__0__matchBinaries__0__operator": "Equal"},
            f"{SEL}.matchBinaries[0].operator",
            "unknown operator",
        ),
        (
            {"spec__tracepoints__0__selectors__0__matchActions__0__action": "Explode"},
            f"{SEL}.matchActions[0].action",
            "unknown action",
        ),
        (
            {"spec__tracepoints__0__selectors__0__matchActions__0": {"action": "Signal"}},
            f"{SEL}.matchActions[0].argSig",
            "required for action Signal",
        ),
        (
            {"spec__tracepoints__0__selectors__0__matchActions__0": {"action": "Override"}},
            f"{SEL}.matchActions[0].argError",
            "required for action Override",
        ),
        (
            {"spec__tracepoints__0__selectors__0__matchActions__1__rateLimit": "soon"},
            f"{SEL}.matchActions[1].rateLimit",
            "duration",
        ),
        (
            {"spec__tracepoints__0__selectors__0__matchPIDs__0__values": [-1]},
            f"{SEL}.matchPIDs[0].values[0]",
            "",
        ),
        (
            {"spec__tracepoints__0__selectors__0__matchNamespaces__0__namespace": "Disk"},
            f"{SEL}.matchNamespaces[0].namespace",
            "namespace type",
        ),
        ({"spec__tracepoints__0__args__0__type": "blob"}, f"{HOOK}.args[0].type", "argument type"),
        ({"spec__tracepoints__0__args__0__index": -1}, f"{HOOK}.args[0].index", ""),
        ({"spec__tracepoints__0__event": ""}, f"{HOOK}.event", ""),
        ({"spec": {}}, "spec", "at least one"),
        ({"apiVersion": "cilium.io/v2"}, "apiVersion", "cilium.io/v1alpha1"),
    ],
)
def test_field_errors(edits: dict[str, Any], path: str, fragment: str) -> None:
    errors = error_paths(policy(**edits))
    assert path in errors, errors
    assert fragment in errors[path]


def test_selector_limits() -> None:
    selector = {"matchArgs": [{"index": 5, "operator": "Equal", "values": ["x"]}]}
    at_limit = policy(spec__tracepoints__0__selectors=[selector] * MAX_SELECTORS_PER_HOOK)
    assert parse_resource(at_limit)
    over = policy(spec__tracepoints__0__selectors=[selector] * (MAX_SELECTORS_PER_HOOK + 1))
    assert "at most 5" in error_paths(over)[f"{HOOK}.selectors"]

    arg = {"index": 5, "operator": "Equal", "values": ["x"]}
    ok = policy(
        spec__tracepoints__0__selectors=[{"matchArgs": [arg] * MAX_MATCH_ARGS_PER_SELECTOR}]
    )
    assert parse_resource(ok)
    too_many = policy(
        spec__tracepoints__0__selectors=[{"matchArgs": [arg] * (MAX_MATCH_ARGS_PER_SELECTOR + 1)}]
    )
    assert "at most 5" in error_paths(too_many)[f"{SEL}.matchArgs"]
