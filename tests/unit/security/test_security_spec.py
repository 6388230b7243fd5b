"""TracingPolicy -> typed spec: Tetragon's tracepoint index rule, types from the format file,
limits, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from ciliate.resources.base import ResourceError
from services.security.core.spec import (
    ActionKind,
    ArgOperator,
    ArgType,
    HookKind,
    parse_policy,
)
from services.security.core.tracefmt import FieldKind, parse_format

EXECVE = """name: sys_enter_execve
ID: 862
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;
\tfield:const char * filename;\toffset:16;\tsize:8;\tsigned:0;
\tfield:const char *const * argv;\toffset:24;\tsize:8;\tsigned:0;
\tfield:const char *const * envp;\toffset:32;\tsize:8;\tsigned:0;

print fmt: "filename: 0x%08lx", ((unsigned long)(REC->filename))
"""

EXEC_SCHED = """name: sched_process_exec
ID: 365
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:char comm[16];\toffset:16;\tsize:16;\tsigned:0;
"""

FORMATS = {("syscalls", "sys_enter_execve"): EXECVE, ("sched", "sched_process_exec"): EXEC_SCHED}


def formats(subsystem: str, event: str) -> str | None:
    return FORMATS.get((subsystem, event))


def policy(tracepoint: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v1alpha1", "kind": "TracingPolicy",
            "metadata": {"name": "p"}, "spec": {"tracepoints": [tracepoint]}}


def execve(selectors: list[Any], args: list[Any] | None = None) -> dict[str, Any]:
    return policy({"subsystem": "syscalls", "event": "sys_enter_execve",
                   "args": args if args is not None else [{"index": 5, "type": "string"}],
                   "selectors": selectors})


def fields_of(exc: pytest.ExceptionInfo[ResourceError]) -> dict[str, str]:
    return {e.path: e.message for e in exc.value.errors}


def test_format_keeps_file_order_common_fields_first() -> None:
    fmt = parse_format(EXECVE, "syscalls", "sys_enter_execve")
    assert [f.name for f in fmt.fields][:6] == [
        "common_type", "common_flags", "common_preempt_count", "common_pid", "__syscall_nr",
        "filename"]
    assert fmt.fields[5].kind is FieldKind.USER_STRING and fmt.fields[5].offset == 16
    assert fmt.fields[6].kind is FieldKind.POINTER
    sched = parse_format(EXEC_SCHED)
    assert sched.fields[4].kind is FieldKind.DATA_LOC_STRING
    assert sched.fields[6].kind is FieldKind.CHAR_ARRAY and sched.fields[6].array_len == 16
    assert sched.tp_id == 365


def test_shared_example_parses_to_sigkill_on_prefix() -> None:
    spec = parse_policy(execve([{
        "matchArgs": [{"index": 5, "operator": "Prefix", "values": ["/tmp/"]}],
        "matchActions": [{"action": "Sigkill"}]}]), formats)
    hook = spec.hooks[0]
    assert hook.kind is HookKind.TRACEPOINT and hook.name == "syscalls/sys_enter_execve"
    assert hook.args[0].type is ArgType.STRING and hook.args[0].offset == 16
    sel = hook.selectors[0]
    assert sel.match_args[0].operator is ArgOperator.PREFIX
    assert sel.actions[0].kind is ActionKind.SIGKILL and sel.actions[0].signal == 9
    assert "send_signal" in spec.required_features


def test_index_beyond_the_format_names_the_field() -> None:
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([], args=[{"index": 8, "type": "string"}]), formats)
    assert "beyond the format" in fields_of(exc)["spec.tracepoints[0].args[0].index"]


def test_operator_that_does_not_fit_the_type_is_refused() -> None:
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([{"matchArgs": [{"index": 5, "operator": "GT", "values": ["1"]}]}]),
                     formats)
    message = fields_of(exc)["spec.tracepoints[0].selectors[0].matchArgs[0].operator"]
    assert "GT" in message and "string" in message


def test_string_type_on_an_integer_field_is_refused() -> None:
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([], args=[{"index": 4, "type": "string"}]), formats)
    assert "not a string" in fields_of(exc)["spec.tracepoints[0].args[0].type"]


def test_limits_five_selectors_and_five_match_args() -> None:
    sel = {"matchActions": [{"action": "Post"}]}
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([sel] * 6), formats)
    assert "at most 5 selectors" in fields_of(exc)["spec.tracepoints[0].selectors"]
    many = [{"index": 5, "operator": "Equal", "values": ["/x"]}] * 6
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([{"matchArgs": many}]), formats)
    assert "at most 5 matchArgs" in fields_of(exc)[
        "spec.tracepoints[0].selectors[0].matchArgs"]


def test_unknown_tracepoint_and_override_on_tracepoint() -> None:
    with pytest.raises(ResourceError) as exc:
        parse_policy(policy({"subsystem": "syscalls", "event": "nope"}), formats)
    assert "unknown tracepoint" in fields_of(exc)["spec.tracepoints[0].event"]
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([{"matchActions": [{"action": "Override"}]}]), formats)
    assert "bpf_override_return" in fields_of(exc)[
        "spec.tracepoints[0].selectors[0].matchActions[0].action"]


def test_kprobe_and_lsm_parse_but_require_their_kernel_features() -> None:
    doc = {"metadata": {"name": "k"}, "spec": {
        "kprobes": [{"call": "fd_install", "syscall": False,
                     "args": [{"index": 0, "type": "int"}, {"index": 1, "type": "file"}],
                     "selectors": [{"matchArgs": [{"index": 1, "operator": "Prefix",
                                                   "values": ["/etc/"]}],
                                    "matchActions": [{"action": "Override"}]}]}],
        "lsmhooks": [{"hook": "file_open"}]}}
    spec = parse_policy(doc, formats)
    assert {"kprobe", "lsm", "override_return"} <= set(spec.required_features)


def test_signal_rate_limit_pids_binaries_namespaces() -> None:
    spec = parse_policy(execve([{
        "matchPIDs": [{"operator": "NotIn", "values": [1, "2"]}],
        "matchBinaries": [{"operator": "In", "values": ["/bin/sh"]}],
        "matchNamespaces": [{"namespace": "Net", "operator": "In", "values": ["4026531840"]}],
        "matchActions": [{"action": "Signal", "argSig": 10},
                         {"action": "Post", "rateLimit": "1m"}]}]), formats)
    sel = spec.hooks[0].selectors[0]
    assert sel.match_pids[0].values == (1, 2)
    assert sel.match_namespaces[0].values == (4026531840,)
    assert sel.actions[0].signal == 10
    assert sel.actions[1].rate_limit_ns == 60 * 10**9


def test_all_errors_are_reported_together() -> None:
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([{
            "matchArgs": [{"index": 7, "operator": "Equal", "values": ["x"]}],
            "matchBinaries": [{"operator": "Like", "values": ["/bin/sh"]}],
            "matchActions": [{"action": "Explode"}]}]), formats)
    paths = set(fields_of(exc))
    base = "spec.tracepoints[0].selectors[0]"
    assert {f"{base}.matchArgs[0].index", f"{base}.matchBinaries[0].operator",
            f"{base}.matchActions[0].action"} <= paths


def test_enum_fields_and_values_are_named_with_what_is_allowed() -> None:
    """One helper checks every enum field (operators, namespace, action): each error names the
    field, the bad value and the allowed ones; bad list items and values name their index."""
    with pytest.raises(ResourceError) as exc:
        parse_policy(execve([{
            "matchPIDs": [{"operator": "Maybe", "values": [1]},
                          {"operator": "In", "values": [1, "x"]}, "not-a-mapping"],
            "matchNamespaces": [{"namespace": "Time", "operator": "In", "values": [1]},
                                {"namespace": "Net", "operator": "Out", "values": [1]}],
            "matchArgs": [{"index": 5, "operator": "Like", "values": ["/tmp/"]}],
            "matchActions": [{"action": "Explode"}]}]), formats)
    errors = fields_of(exc)
    base = "spec.tracepoints[0].selectors[0]"
    assert errors[f"{base}.matchPIDs[0].operator"] == "unknown operator 'Maybe' (one of In, NotIn)"
    assert "'x' is not an integer" in errors[f"{base}.matchPIDs[1].values[1]"]
    assert errors[f"{base}.matchPIDs[2]"] == "must be a mapping"
    assert errors[f"{base}.matchNamespaces[0].namespace"].startswith(
        "unsupported namespace 'Time' (one of Uts, Ipc,")
    assert errors[f"{base}.matchNamespaces[1].operator"] == \
        "unknown operator 'Out' (one of In, NotIn)"
    assert errors[f"{base}.matchArgs[0].operator"].startswith(
        "unknown operator 'Like' (one of Equal, NotEqual, Prefix")
    assert errors[f"{base}.matchActions[0].action"].startswith(
        "unsupported action 'Explode' (one of Post,")


def test_shared_examples_through_the_resource_model() -> None:
    from pathlib import Path

    import yaml

    from services.security.core.spec import parse_resource

    examples = Path("/work/shared/examples")
    if not examples.is_dir():
        pytest.skip("shared examples not present")
    kill = parse_resource(yaml.safe_load((examples / "tracingpolicy-kill-tmp-exec.yaml")
                                         .read_text()), formats)
    assert kill.hooks[0].selectors[0].actions[0].kind is ActionKind.SIGKILL
    fd = parse_resource(yaml.safe_load((examples / "tracingpolicy-fd-install.yaml")
                                       .read_text()), formats)
    assert fd.hooks[0].kind is HookKind.KPROBE and "kprobe" in fd.required_features
    with pytest.raises(ResourceError):
        parse_resource({"apiVersion": "cilium.io/v1alpha1", "kind": "TracingPolicy",
                        "metadata": {"name": "x"}, "spec": {"tracepoints": "nope"}}, formats)
