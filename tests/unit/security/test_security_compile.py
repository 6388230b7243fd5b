"""Spec -> C text: placeholders all filled, selector semantics as generated C (evaluated here by
a tiny interpreter for the string conditions), BTF offsets from raw dump text."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.security.core.btf import BtfLookupError, resolve_offsets
from services.security.core.compile import (
    LIFECYCLE_OFFSETS,
    CompileError,
    binary_key,
    compile_lifecycle,
    compile_policy,
    fill_template,
)
from services.security.core.spec import parse_policy

BPF = Path(__file__).resolve().parents[3] / "services" / "security" / "bpf"

BTF_TEXT = """[1] INT 'int' size=4 bits_offset=0 nr_bits=32 encoding=SIGNED
[2] STRUCT 'task_struct' size=64 vlen=3
\t'tgid' type_id=1 bits_offset=32
\t'real_parent' type_id=3 bits_offset=64
\t'(anon)' type_id=4 bits_offset=128
[3] PTR '(anon)' type_id=2
[4] UNION '(anon)' size=16 vlen=2
\t'fs' type_id=3 bits_offset=0
\t'inner' type_id=5 bits_offset=0
[5] TYPEDEF 'inner_t' type_id=6
[6] STRUCT 'inner' size=16 vlen=1
\t'deep' type_id=1 bits_offset=64
"""


def test_btf_offsets_through_anonymous_unions_and_typedefs() -> None:
    offsets = resolve_offsets(BTF_TEXT, ["task_struct.tgid", "task_struct.real_parent",
                                         "task_struct.fs", "task_struct.inner.deep"])
    assert offsets == {"task_struct.tgid": 4, "task_struct.real_parent": 8,
                       "task_struct.fs": 16, "task_struct.inner.deep": 24}
    with pytest.raises(BtfLookupError, match="cwd"):
        resolve_offsets(BTF_TEXT, ["task_struct.cwd"])


def test_fill_template_refuses_unfilled_placeholders() -> None:
    assert fill_template("a {{X}} b", {"X": 1}) == "a 1 b"
    with pytest.raises(CompileError, match="Y"):
        fill_template("{{X}} {{Y}}", {"X": 1})


def test_lifecycle_needs_every_offset_and_fills_them() -> None:
    template = (BPF / "lifecycle.c").read_text()
    common = (BPF / "common.h").read_text()
    with pytest.raises(CompileError, match=r"task_struct\.real_parent"):
        compile_lifecycle(template, common, {})
    offsets = {p: 1000 + i for i, p in enumerate(LIFECYCLE_OFFSETS)}
    text = compile_lifecycle(template, common, offsets)
    assert "{{" not in text and str(offsets["task_struct.real_parent"]) in text


FORMAT = """name: sys_enter_openat
ID: 782
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:int dfd;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char * filename;\toffset:24;\tsize:8;\tsigned:0;
\tfield:int flags;\toffset:32;\tsize:8;\tsigned:0;
\tfield:umode_t mode;\toffset:40;\tsize:8;\tsigned:0;
"""


def compiled(selector: dict[str, object], namespace: str | None = None) -> object:
    meta: dict[str, object] = {"name": "p"}
    if namespace:
        meta["namespace"] = namespace
    spec = parse_policy({"metadata": meta, "spec": {"tracepoints": [{
        "subsystem": "syscalls", "event": "sys_enter_openat",
        "args": [{"index": 6, "type": "string"}, {"index": 7, "type": "int"}],
        "selectors": [selector]}]}}, lambda s, e: FORMAT)
    return compile_policy(spec, (BPF / "policy.c").read_text(), (BPF / "common.h").read_text(), 7)


def test_policy_c_text_reads_args_at_format_offsets_and_signals() -> None:
    cp = compiled({"matchArgs": [{"index": 6, "operator": "Prefix", "values": ["/etc/"]},
                                 {"index": 7, "operator": "Mask", "values": ["0x40"]}],
                   "matchActions": [{"action": "Sigkill"}]})
    text = cp.c_text  # type: ignore[attr-defined]
    assert "{{" not in text
    assert "(char *)ctx + 24" in text and "(char *)ctx + 32" in text
    assert "bpf_send_signal(9);" in text
    assert "& (u64)64ULL" in text
    assert cp.attachments[0].target == "syscalls:sys_enter_openat"  # type: ignore[attr-defined]


def test_binary_sets_become_map_contents() -> None:
    cp = compiled({"matchBinaries": [{"operator": "NotIn", "values": ["/bin/sh", "/bin/ls"]}]})
    maps = cp.maps  # type: ignore[attr-defined]
    assert list(maps.values()) == [[binary_key("/bin/sh"), binary_key("/bin/ls")]]
    assert all(len(k) == 256 for k in next(iter(maps.values())))
    assert "!(proc() && bins_0_0_0.lookup" in cp.c_text  # type: ignore[attr-defined]


def test_a_non_matching_event_leaves_by_the_cheapest_check_first() -> None:
    """Integer args, scope, then string args, then binary; the process map is read only when a
    selector needs it, the path only as many bytes as the compare needs (into the stack), and
    the per-CPU event is looked up only by a selector that posts."""
    cp = compiled({"matchBinaries": [{"operator": "In", "values": ["/bin/cat"]}],
                   "matchArgs": [{"index": 6, "operator": "Prefix", "values": ["/etc/"]},
                                 {"index": 7, "operator": "Mask", "values": ["0x40"]}]})
    text = cp.c_text  # type: ignore[attr-defined]
    hook = text[text.index("int hook_0"):]
    prefilter, scope, args, binary = (hook.index("if (!((((a1 & (u64)64ULL) != 0))))"),
                                      hook.index("node_cgroup.check_current_task"),
                                      hook.index("(cmp_read0() &&"),
                                      hook.index("bins_0_0_0.lookup"))
    assert prefilter < scope < args < binary
    assert "ciliate_procs.lookup" not in hook
    lookups = [i for i in range(len(hook)) if hook.startswith("lookup_proc(", i)]
    assert len(lookups) == 1 and "#define proc()" in hook[lookups[0] - 80 : lookups[0]]
    assert "u64 cmp0[1] = {};" in hook and "bpf_probe_read_user_str(cmp0, 6," in hook
    only_args = compiled({"matchArgs": [{"index": 6, "operator": "Prefix",
                                         "values": ["/nonexistent/"]}]}).c_text  # type: ignore
    reject = only_args[only_args.index("int hook_0"):only_args.index("    if ((cmp_read0()")]
    condition = only_args[only_args.index("    if ((cmp_read0()"):].split("{", 1)[0]
    assert "proc()" not in condition and "tgid()" not in condition
    assert "tp_scratch.lookup" not in reject and "struct ev_tp *e = 0;" in reject
    assert "if (!(" not in reject  # no integer test to hoist


def test_postfix_reads_the_whole_string_into_the_event() -> None:
    text = compiled({"matchArgs": [{"index": 6, "operator": "Postfix",
                                    "values": [".so"]}]}).c_text  # type: ignore[attr-defined]
    hook = text[text.index("int hook_0"):]
    assert hook.index("tp_scratch.lookup") < hook.index("(read_strs() && ((slen0 >= 3")
    assert "cmp_read0" not in hook


def test_long_compares_beyond_the_stack_budget_use_the_event() -> None:
    long = ["/" + "x" * 120]
    cp = compiled({"matchArgs": [{"index": 6, "operator": "Equal", "values": long}]})
    hook = cp.c_text[cp.c_text.index("int hook_0"):]  # type: ignore[attr-defined]
    assert "u64 cmp0[16] = {};" in hook  # 121 bytes + NUL + 1: 123 bytes, 16 words
    spec = parse_policy({"metadata": {"name": "p"}, "spec": {"tracepoints": [{
        "subsystem": "syscalls", "event": "sys_enter_openat",
        "args": [{"index": 6, "type": "string"}, {"index": 5, "type": "int"}],
        "selectors": [{"matchArgs": [{"index": 6, "operator": "Equal", "values": long}]},
                      {"matchArgs": [{"index": 6, "operator": "Prefix", "values": long}]}]},
        {"subsystem": "syscalls", "event": "sys_enter_openat",
         "args": [{"index": 6, "type": "string"}],
         "selectors": [{"matchArgs": [{"index": 6, "operator": "Equal", "values": long}]}]}]}},
        lambda s, e: FORMAT)
    text = compile_policy(spec, (BPF / "policy.c").read_text(), (BPF / "common.h").read_text(),
                          7).c_text
    assert text.count("u64 cmp0[16] = {};") == 2  # one slot per hook, sized for both selectors


def test_namespaced_policy_is_restricted_to_allowed_cgroups() -> None:
    cp = compiled({}, namespace="default")
    assert cp.restrict_cgroups  # type: ignore[attr-defined]
    assert "allowed_cgroups.lookup(&cg)" in cp.c_text  # type: ignore[attr-defined]


def test_namespaces_need_btf_offsets() -> None:
    with pytest.raises(CompileError, match="nsproxy"):
        compiled({"matchNamespaces": [{"namespace": "Net", "operator": "In", "values": [1]}]})


def _eval_string_condition(condition: str, value: bytes, read_size: int, garbage: int) -> bool:
    """Evaluate the generated C for one string slot in Python, on a buffer filled as
    bpf_probe_read_user_str(buf, read_size, src) leaves it: at most read_size - 1 characters, a
    NUL, and whatever was there before past it (``garbage``)."""
    copied = value[: read_size - 1] + b"\0"
    raw = copied + bytes([garbage]) * (8 * 32 - len(copied))
    words = [int.from_bytes(raw[k : k + 8], sys.byteorder) for k in range(0, len(raw), 8)]
    expr = condition.replace("&&", " and ").replace("||", " or ").replace("!(", " not (")
    expr = expr.replace("ULL", "").replace("cmp0", "buf")
    return bool(eval(expr, {"buf": words}))


@given(st.binary(min_size=0, max_size=40).filter(lambda b: b"\0" not in b),
       st.sampled_from(["Equal", "NotEqual", "Prefix"]),
       st.lists(st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b),
                min_size=1, max_size=3),
       st.integers(min_value=0, max_value=255), st.integers(min_value=0, max_value=8))
def test_string_operators_match_tetragon_semantics(value: bytes, op: str, values: list[bytes],
                                                   garbage: int, extra: int) -> None:
    """The compare buffer holds only compare_read_size bytes (or more, when another selector
    on the same argument needs more): the result is exact either way, whatever lies past the
    NUL."""
    from services.security.core.compile import _compare_condition, compare_read_size
    from services.security.core.spec import ArgOperator

    texts = [v.decode("latin-1") for v in values]
    operator = ArgOperator(op)
    cond = _compare_condition(operator, "cmp0", tuple(texts))
    raw = [t.encode() for t in texts]
    expected = {
        "Equal": any(value == v for v in raw),
        "NotEqual": all(value != v for v in raw),
        "Prefix": any(value.startswith(v) for v in raw),
    }[op]
    size = compare_read_size(operator, tuple(texts)) + extra
    assert _eval_string_condition(cond, value, size, garbage) == expected


@given(st.binary(min_size=0, max_size=40).filter(lambda b: b"\0" not in b),
       st.lists(st.binary(min_size=1, max_size=8).filter(lambda b: b"\0" not in b),
                min_size=1, max_size=3))
def test_postfix_matches_tetragon_semantics(value: bytes, values: list[bytes]) -> None:
    from services.security.core.compile import _postfix_condition

    texts = [v.decode("latin-1") for v in values]
    cond = _postfix_condition(0, tuple(texts))
    buf = value + b"\0" * (256 - len(value))
    expr = cond.replace("&&", " and ").replace("||", " or ")
    expr = expr.replace("e->strs[0]", "buf").replace("slen0", str(len(value)))
    signed = [b if b < 128 else b - 256 for b in buf]
    assert bool(eval(expr, {"buf": signed})) == any(value.endswith(t.encode()) for t in texts)
