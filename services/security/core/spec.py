"""A TracingPolicy validated into a typed spec of its hooks, selectors and actions.

Input is the policy as plain data (a parsed YAML document or a model's ``model_dump``); tracepoint
argument types come from the tracepoint's format file, passed in as text by the caller (sans-io).
Every error names the field it is about, with the path a user sees in their YAML, and nothing is
compiled or loaded from a policy with any error. Limits are Tetragon's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from ciliate.resources.base import FieldError, ResourceError, validate_model
from ciliate.resources.tracingpolicy import TracingPolicy, TracingPolicyNamespaced
from services.security.core.tracefmt import FieldKind, FormatError, TracepointFormat, parse_format

MAX_SELECTORS_PER_HOOK = 5
MAX_MATCH_ARGS = 5
MAX_MATCH_VALUES = 8
MAX_STRING_VALUE = 127
"""Longest string a selector compares (the BPF program reads 256 bytes of an argument)."""

_E = TypeVar("_E", bound=StrEnum)

FormatSource = Callable[[str, str], str | None]
"""(subsystem, event) -> the tracefs format text, or None when the kernel has no such event."""


class HookKind(StrEnum):
    TRACEPOINT = "tracepoints"
    KPROBE = "kprobes"
    LSM = "lsmhooks"
    UPROBE = "uprobes"


# The kernel capability (ciliate.doctor name) each hook kind needs before anything loads.
HOOK_FEATURES: dict[HookKind, str] = {
    HookKind.TRACEPOINT: "tracepoint",
    HookKind.KPROBE: "kprobe",
    HookKind.LSM: "lsm",
}


class ArgType(StrEnum):
    STRING = "string"
    INT = "int"


# Tetragon's argument type names, mapped to how this agent reads them.
ARG_TYPES: dict[str, ArgType] = {
    "string": ArgType.STRING,
    "char_buf": ArgType.STRING,
    "filename": ArgType.STRING,
    "int": ArgType.INT,
    "int8": ArgType.INT,
    "uint8": ArgType.INT,
    "int16": ArgType.INT,
    "uint16": ArgType.INT,
    "int32": ArgType.INT,
    "uint32": ArgType.INT,
    "int64": ArgType.INT,
    "uint64": ArgType.INT,
    "s32": ArgType.INT,
    "u32": ArgType.INT,
    "s64": ArgType.INT,
    "u64": ArgType.INT,
    "long": ArgType.INT,
    "size_t": ArgType.INT,
    "fd": ArgType.INT,
    # Kernel-object types exist only on kprobes/LSM hooks; kept so those policies parse.
    "file": ArgType.STRING,
    "path": ArgType.STRING,
    "sock": ArgType.INT,
    "skb": ArgType.INT,
    "cred": ArgType.INT,
}
KERNEL_OBJECT_TYPES = frozenset({"file", "path", "sock", "skb", "cred"})


class ArgOperator(StrEnum):
    EQUAL = "Equal"
    NOT_EQUAL = "NotEqual"
    PREFIX = "Prefix"
    POSTFIX = "Postfix"
    GT = "GT"
    LT = "LT"
    MASK = "Mask"


ARG_OPERATOR_TYPES: dict[ArgOperator, frozenset[ArgType]] = {
    ArgOperator.EQUAL: frozenset({ArgType.STRING, ArgType.INT}),
    ArgOperator.NOT_EQUAL: frozenset({ArgType.STRING, ArgType.INT}),
    ArgOperator.PREFIX: frozenset({ArgType.STRING}),
    ArgOperator.POSTFIX: frozenset({ArgType.STRING}),
    ArgOperator.GT: frozenset({ArgType.INT}),
    ArgOperator.LT: frozenset({ArgType.INT}),
    ArgOperator.MASK: frozenset({ArgType.INT}),
}


class BinaryOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    PREFIX = "Prefix"


class SetOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"


class Namespace(StrEnum):
    """Namespaces readable from ``task->nsproxy``; values are the nsproxy member names."""

    UTS = "Uts"
    IPC = "Ipc"
    MNT = "Mnt"
    NET = "Net"
    CGROUP = "Cgroup"
    PID_FOR_CHILDREN = "PidForChildren"


# (nsproxy member, struct holding the ns_common called `ns`)
NAMESPACE_FIELDS: dict[Namespace, tuple[str, str]] = {
    Namespace.UTS: ("uts_ns", "uts_namespace"),
    Namespace.IPC: ("ipc_ns", "ipc_namespace"),
    Namespace.MNT: ("mnt_ns", "mnt_namespace"),
    Namespace.NET: ("net_ns", "net"),
    Namespace.CGROUP: ("cgroup_ns", "cgroup_namespace"),
    Namespace.PID_FOR_CHILDREN: ("pid_ns_for_children", "pid_namespace"),
}


class ActionKind(StrEnum):
    POST = "Post"
    NO_POST = "NoPost"
    SIGKILL = "Sigkill"
    SIGNAL = "Signal"
    OVERRIDE = "Override"


# Tetragon's enum names for process_*.action, as its JSON prints them.
ACTION_ENUM: dict[ActionKind, str] = {
    ActionKind.POST: "KPROBE_ACTION_POST",
    ActionKind.NO_POST: "KPROBE_ACTION_NOPOST",
    ActionKind.SIGKILL: "KPROBE_ACTION_SIGKILL",
    ActionKind.SIGNAL: "KPROBE_ACTION_SIGNAL",
    ActionKind.OVERRIDE: "KPROBE_ACTION_OVERRIDE",
}
ACTION_CODES: dict[ActionKind, int] = {kind: i + 1 for i, kind in enumerate(ActionKind)}


@dataclass(frozen=True)
class ArgSpec:
    index: int
    type: ArgType
    type_name: str
    label: str = ""
    field_kind: FieldKind | None = None
    offset: int = 0
    size: int = 8
    signed: bool = False


@dataclass(frozen=True)
class MatchArg:
    index: int
    operator: ArgOperator
    values: tuple[str | int, ...]


@dataclass(frozen=True)
class MatchBinaries:
    operator: BinaryOperator
    values: tuple[str, ...]


@dataclass(frozen=True)
class MatchPIDs:
    operator: SetOperator
    values: tuple[int, ...]


@dataclass(frozen=True)
class MatchNamespace:
    namespace: Namespace
    operator: SetOperator
    values: tuple[int, ...]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    signal: int = 0
    rate_limit_ns: int = 0


@dataclass(frozen=True)
class Selector:
    match_args: tuple[MatchArg, ...] = ()
    match_binaries: tuple[MatchBinaries, ...] = ()
    match_pids: tuple[MatchPIDs, ...] = ()
    match_namespaces: tuple[MatchNamespace, ...] = ()
    actions: tuple[Action, ...] = (Action(ActionKind.POST),)

    @property
    def posts(self) -> bool:
        return not any(a.kind is ActionKind.NO_POST for a in self.actions)


@dataclass(frozen=True)
class Hook:
    kind: HookKind
    subsystem: str  # tracepoints: subsystem; kprobes/lsm: "" ; uprobes: path
    event: str  # tracepoints: event; kprobes: call; lsm: hook
    args: tuple[ArgSpec, ...]
    selectors: tuple[Selector, ...]
    format: TracepointFormat | None = None

    @property
    def name(self) -> str:
        return f"{self.subsystem}/{self.event}" if self.subsystem else self.event


@dataclass(frozen=True)
class PolicySpec:
    name: str
    namespace: str | None
    hooks: tuple[Hook, ...]
    pod_selector: Mapping[str, Any] | None = None
    required_features: tuple[str, ...] = field(default=())


_DURATION_RE = re.compile(r"^(?P<n>\d+)(?P<unit>ms|s|m|h)?$")
_UNIT_NS = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, None: 10**9}


class _Errors:
    """Collects every error of a policy so the user sees them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(FieldError(path, message))


def _as_list(value: Any, path: str, errors: _Errors) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        errors.add(path, "must be a list")
        return []
    return value


def _as_int(value: Any, path: str, errors: _Errors) -> int | None:
    if isinstance(value, bool):
        errors.add(path, f"{value!r} is not an integer")
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    errors.add(path, f"{value!r} is not an integer")
    return None


def _enum_field(item: Mapping[str, Any], key: str, enum: type[_E], path: str, errors: _Errors,
                what: str = "operator", verb: str = "unknown") -> _E | None:
    """``item[key]`` as a member of ``enum``, or None with an error naming the allowed values."""
    raw = item.get(key)
    try:
        return enum(str(raw))
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        errors.add(f"{path}.{key}", f"{verb} {what} {raw!r} (one of {allowed})")
        return None


def _int_values(item: Mapping[str, Any], path: str, errors: _Errors) -> tuple[int, ...]:
    """``item["values"]`` as integers; each bad value is an error naming its index."""
    raw = _as_list(item.get("values"), f"{path}.values", errors)
    parsed = [_as_int(v, f"{path}.values[{j}]", errors) for j, v in enumerate(raw)]
    return tuple(v for v in parsed if v is not None)


def _mappings(raw: list[Any], path: str, errors: _Errors) -> list[tuple[str, dict[str, Any]]]:
    """The list's items that are mappings, with their paths; any other item is an error."""
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, dict):
            out.append((f"{path}[{i}]", item))
        else:
            errors.add(f"{path}[{i}]", "must be a mapping")
    return out


def _parse_args(
    raw: list[Any], path: str, errors: _Errors, fmt: TracepointFormat | None
) -> tuple[ArgSpec, ...]:
    out: list[ArgSpec] = []
    for i, arg in enumerate(raw):
        apath = f"{path}[{i}]"
        if not isinstance(arg, dict):
            errors.add(apath, "must be a mapping with index and type")
            continue
        index = _as_int(arg.get("index"), f"{apath}.index", errors)
        type_name = str(arg.get("type", "auto" if fmt is not None else ""))
        if index is None:
            continue
        ffield = fmt.field(index) if fmt is not None else None
        if fmt is not None and ffield is None:
            errors.add(
                f"{apath}.index",
                f"index {index} is beyond the format of {fmt.subsystem}/{fmt.event} "
                f"({len(fmt.fields)} fields, 0..{len(fmt.fields) - 1})",
            )
            continue
        if type_name == "auto" and ffield is not None:
            arg_type = ArgType.STRING if ffield.is_string else ArgType.INT
        elif type_name in ARG_TYPES:
            arg_type = ARG_TYPES[type_name]
        else:
            errors.add(f"{apath}.type", f"unknown argument type {type_name!r}")
            continue
        if ffield is not None:
            if type_name in KERNEL_OBJECT_TYPES:
                errors.add(
                    f"{apath}.type", f"type {type_name!r} needs a kprobe; a tracepoint field is "
                    f"a plain value ({ffield.ctype} {ffield.name})"
                )
                continue
            if arg_type is ArgType.STRING and not ffield.is_string:
                errors.add(
                    f"{apath}.type",
                    f"field {index} ({ffield.ctype} {ffield.name}) is not a string",
                )
                continue
            if arg_type is ArgType.INT and ffield.is_string:
                errors.add(
                    f"{apath}.type",
                    f"field {index} ({ffield.ctype} {ffield.name}) is a string, not {type_name}",
                )
                continue
        out.append(
            ArgSpec(
                index=index,
                type=arg_type,
                type_name=type_name,
                label=str(arg.get("label", "")),
                field_kind=ffield.kind if ffield else None,
                offset=ffield.offset if ffield else 0,
                size=ffield.size if ffield else 8,
                signed=ffield.signed if ffield else False,
            )
        )
    return tuple(out)


def _parse_match_args(
    raw: list[Any], path: str, errors: _Errors, args: Sequence[ArgSpec]
) -> tuple[MatchArg, ...]:
    if len(raw) > MAX_MATCH_ARGS:
        errors.add(path, f"at most {MAX_MATCH_ARGS} matchArgs per selector, got {len(raw)}")
        return ()
    by_index = {a.index: a for a in args}
    out: list[MatchArg] = []
    for mpath, item in _mappings(raw, path, errors):
        index = _as_int(item.get("index"), f"{mpath}.index", errors)
        if index is None:
            continue
        arg = by_index.get(index)
        if arg is None:
            errors.add(
                f"{mpath}.index",
                f"index {index} is not one of the hook's args "
                f"({sorted(by_index) or 'none declared'})",
            )
            continue
        op = _enum_field(item, "operator", ArgOperator, mpath, errors)
        if op is None:
            continue
        if arg.type not in ARG_OPERATOR_TYPES[op]:
            errors.add(
                f"{mpath}.operator",
                f"{op.value} does not apply to a {arg.type.value} argument (index {index})",
            )
            continue
        values = _as_list(item.get("values"), f"{mpath}.values", errors)
        if not values:
            errors.add(f"{mpath}.values", "at least one value is required")
            continue
        if len(values) > MAX_MATCH_VALUES:
            errors.add(f"{mpath}.values", f"at most {MAX_MATCH_VALUES} values, got {len(values)}")
            continue
        parsed: list[str | int] = []
        for j, v in enumerate(values):
            vpath = f"{mpath}.values[{j}]"
            if arg.type is ArgType.STRING:
                text = str(v)
                if not text or len(text.encode()) > MAX_STRING_VALUE:
                    errors.add(vpath, f"string values must be 1..{MAX_STRING_VALUE} bytes")
                    continue
                parsed.append(text)
            else:
                number = _as_int(v, vpath, errors)
                if number is not None:
                    parsed.append(number)
        out.append(MatchArg(index=index, operator=op, values=tuple(parsed)))
    return tuple(out)


def _parse_binaries(raw: list[Any], path: str, errors: _Errors) -> tuple[MatchBinaries, ...]:
    out: list[MatchBinaries] = []
    for bpath, item in _mappings(raw, path, errors):
        op = _enum_field(item, "operator", BinaryOperator, bpath, errors)
        if op is None:
            continue
        values = [str(v) for v in _as_list(item.get("values"), f"{bpath}.values", errors)]
        if not values:
            errors.add(f"{bpath}.values", "at least one binary is required")
            continue
        too_long = [v for v in values if not v or len(v.encode()) > MAX_STRING_VALUE]
        if too_long:
            errors.add(f"{bpath}.values", f"binary paths must be 1..{MAX_STRING_VALUE} bytes")
            continue
        out.append(MatchBinaries(op, tuple(values)))
    return tuple(out)


def _parse_pids(raw: list[Any], path: str, errors: _Errors) -> tuple[MatchPIDs, ...]:
    out: list[MatchPIDs] = []
    for ppath, item in _mappings(raw, path, errors):
        op = _enum_field(item, "operator", SetOperator, ppath, errors)
        if op is None:
            continue
        if item.get("isNamespacePID"):
            errors.add(f"{ppath}.isNamespacePID", "only host PIDs are supported")
            continue
        if item.get("followForks"):
            errors.add(f"{ppath}.followForks", "followForks is not supported")
            continue
        pids = _int_values(item, ppath, errors)
        if not pids:
            errors.add(f"{ppath}.values", "at least one PID is required")
            continue
        out.append(MatchPIDs(op, pids))
    return tuple(out)


def _parse_namespaces(raw: list[Any], path: str, errors: _Errors) -> tuple[MatchNamespace, ...]:
    out: list[MatchNamespace] = []
    for npath, item in _mappings(raw, path, errors):
        ns = _enum_field(item, "namespace", Namespace, npath, errors, "namespace", "unsupported")
        if ns is None:
            continue
        op = _enum_field(item, "operator", SetOperator, npath, errors)
        if op is None:
            continue
        inums = _int_values(item, npath, errors)
        if not inums:
            errors.add(f"{npath}.values", "at least one namespace inode number is required")
            continue
        out.append(MatchNamespace(ns, op, inums))
    return tuple(out)


def parse_duration_ns(text: str) -> int | None:
    """Tetragon's rateLimit: "10", "10s", "1m", "1h" (plain numbers are seconds), or "500ms"."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        return None
    return int(m["n"]) * _UNIT_NS[m["unit"]]


def _parse_actions(
    raw: list[Any], path: str, errors: _Errors, kind: HookKind, features: set[str]
) -> tuple[Action, ...]:
    if not raw:
        return (Action(ActionKind.POST),)
    out: list[Action] = []
    for apath, item in _mappings(raw, path, errors):
        action = _enum_field(item, "action", ActionKind, apath, errors, "action", "unsupported")
        if action is None:
            continue
        signal = 0
        rate = 0
        if action is ActionKind.SIGNAL:
            number = _as_int(item.get("argSig"), f"{apath}.argSig", errors)
            if number is None:
                continue
            if not 1 <= number <= 64:
                errors.add(f"{apath}.argSig", f"signal {number} is not 1..64")
                continue
            signal = number
        elif action is ActionKind.SIGKILL:
            signal = 9
        elif action is ActionKind.OVERRIDE:
            if kind is HookKind.TRACEPOINT:
                errors.add(
                    f"{apath}.action",
                    "Override changes a function's return value and needs a kprobe hook with "
                    "bpf_override_return; tracepoints cannot override",
                )
                continue
            features.add("override_return")
        if action is ActionKind.POST and item.get("rateLimit") is not None:
            parsed = parse_duration_ns(str(item["rateLimit"]))
            if parsed is None or parsed <= 0:
                errors.add(f"{apath}.rateLimit", f"{item['rateLimit']!r} is not a duration")
                continue
            rate = parsed
        out.append(Action(action, signal, rate))
    return tuple(out)


def _parse_selectors(
    raw: list[Any],
    path: str,
    errors: _Errors,
    kind: HookKind,
    args: Sequence[ArgSpec],
    features: set[str],
) -> tuple[Selector, ...]:
    if len(raw) > MAX_SELECTORS_PER_HOOK:
        errors.add(path, f"at most {MAX_SELECTORS_PER_HOOK} selectors per hook, got {len(raw)}")
        return ()
    out: list[Selector] = []
    known = {"matchArgs", "matchBinaries", "matchPIDs", "matchNamespaces", "matchActions"}
    for i, sel in enumerate(raw):
        spath = f"{path}[{i}]"
        if not isinstance(sel, dict):
            errors.add(spath, "must be a mapping")
            continue
        for key, value in sel.items():
            if key not in known and value not in (None, [], {}):
                errors.add(f"{spath}.{key}", f"unsupported selector (supported: {sorted(known)})")
        out.append(
            Selector(
                match_args=_parse_match_args(
                    _as_list(sel.get("matchArgs"), f"{spath}.matchArgs", errors),
                    f"{spath}.matchArgs", errors, args,
                ),
                match_binaries=_parse_binaries(
                    _as_list(sel.get("matchBinaries"), f"{spath}.matchBinaries", errors),
                    f"{spath}.matchBinaries", errors,
                ),
                match_pids=_parse_pids(
                    _as_list(sel.get("matchPIDs"), f"{spath}.matchPIDs", errors),
                    f"{spath}.matchPIDs", errors,
                ),
                match_namespaces=_parse_namespaces(
                    _as_list(sel.get("matchNamespaces"), f"{spath}.matchNamespaces", errors),
                    f"{spath}.matchNamespaces", errors,
                ),
                actions=_parse_actions(
                    _as_list(sel.get("matchActions"), f"{spath}.matchActions", errors),
                    f"{spath}.matchActions", errors, kind, features,
                ),
            )
        )
    return tuple(out)


def _tracepoint_hook(
    tp: Any, path: str, errors: _Errors, formats: FormatSource, features: set[str]
) -> Hook | None:
    if not isinstance(tp, dict):
        errors.add(path, "must be a mapping")
        return None
    subsystem, event = tp.get("subsystem"), tp.get("event")
    if not isinstance(subsystem, str) or not subsystem:
        errors.add(f"{path}.subsystem", "required")
        return None
    if not isinstance(event, str) or not event:
        errors.add(f"{path}.event", "required")
        return None
    if "/" in subsystem or "/" in event or ".." in subsystem + event:
        errors.add(f"{path}.event", "must be a plain name")
        return None
    text = formats(subsystem, event)
    if text is None:
        errors.add(f"{path}.event", f"unknown tracepoint {subsystem}/{event} on this kernel")
        return None
    try:
        fmt = parse_format(text, subsystem, event)
    except FormatError as exc:
        errors.add(f"{path}.event", f"cannot read the format of {subsystem}/{event}: {exc}")
        return None
    args = _parse_args(_as_list(tp.get("args"), f"{path}.args", errors), f"{path}.args",
                       errors, fmt)
    selectors = _parse_selectors(
        _as_list(tp.get("selectors"), f"{path}.selectors", errors),
        f"{path}.selectors", errors, HookKind.TRACEPOINT, args, features,
    )
    return Hook(HookKind.TRACEPOINT, subsystem, event, args, selectors, fmt)


def _function_hook(
    raw: Any, path: str, errors: _Errors, kind: HookKind, features: set[str]
) -> Hook | None:
    if not isinstance(raw, dict):
        errors.add(path, "must be a mapping")
        return None
    key = "call" if kind is HookKind.KPROBE else "hook"
    name = raw.get(key)
    if not isinstance(name, str) or not name:
        errors.add(f"{path}.{key}", "required")
        return None
    args = _parse_args(_as_list(raw.get("args"), f"{path}.args", errors), f"{path}.args",
                       errors, None)
    selectors = _parse_selectors(
        _as_list(raw.get("selectors"), f"{path}.selectors", errors),
        f"{path}.selectors", errors, kind, args, features,
    )
    features.add(HOOK_FEATURES[kind])
    return Hook(kind, "", name, args, selectors)


def parse_policy(doc: Mapping[str, Any], formats: FormatSource) -> PolicySpec:
    """Validate a TracingPolicy(Namespaced) document into a PolicySpec, or raise ResourceError."""
    errors = _Errors()
    meta = doc.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        errors.add("metadata.name", "required")
        name = ""
    namespace = meta.get("namespace") if isinstance(meta, dict) else None
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ResourceError([*errors.items, FieldError("spec", "required")])
    features: set[str] = set()
    hooks: list[Hook] = []
    for i, tp in enumerate(_as_list(spec.get("tracepoints"), "spec.tracepoints", errors)):
        hook = _tracepoint_hook(tp, f"spec.tracepoints[{i}]", errors, formats, features)
        if hook is not None:
            hooks.append(hook)
    for kind in (HookKind.KPROBE, HookKind.LSM):
        for i, raw in enumerate(_as_list(spec.get(kind.value), f"spec.{kind.value}", errors)):
            hook = _function_hook(raw, f"spec.{kind.value}[{i}]", errors, kind, features)
            if hook is not None:
                hooks.append(hook)
    if _as_list(spec.get("uprobes"), "spec.uprobes", errors):
        errors.add("spec.uprobes", "uprobe hooks are recognized but not implemented by this agent")
    if spec.get("usdts"):
        errors.add("spec.usdts", "USDT hooks are not implemented by this agent")
    pod_selector = spec.get("podSelector")
    if pod_selector is not None and not isinstance(pod_selector, dict):
        errors.add("spec.podSelector", "must be a label selector mapping")
        pod_selector = None
    if not hooks and not errors.items:
        errors.add("spec", "no hooks: give at least one of tracepoints, kprobes, lsmhooks")
    if errors.items:
        raise ResourceError(errors.items)
    if any(h.kind is HookKind.TRACEPOINT for h in hooks):
        features.add("tracepoint")
    for hook in hooks:
        for sel in hook.selectors:
            if any(a.kind in (ActionKind.SIGKILL, ActionKind.SIGNAL) for a in sel.actions):
                features.add("send_signal")
    return PolicySpec(
        name=name,
        namespace=namespace if isinstance(namespace, str) else None,
        hooks=tuple(hooks),
        pod_selector=pod_selector,
        required_features=tuple(sorted(features)),
    )


def parse_resource(doc: Mapping[str, Any], formats: FormatSource) -> PolicySpec:
    """Validate the document with the shared TracingPolicy(Namespaced) model (the CRD's shape),
    then into a PolicySpec (what this agent and kernel can run)."""
    model_cls = (
        TracingPolicyNamespaced if doc.get("kind") == TracingPolicyNamespaced.KIND
        else TracingPolicy
    )
    model = validate_model(model_cls, dict(doc))
    return parse_policy(model.model_dump(mode="json", by_alias=True, exclude_none=True), formats)
