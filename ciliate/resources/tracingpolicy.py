"""Tetragon's TracingPolicy and TracingPolicyNamespaced (cilium.io/v1alpha1).

Validation here is structural: the shapes, enums and limits of Tetragon's CRD, with field paths
in errors. Whether this kernel can run a hook (kprobes, LSM) is the security service's question,
asked when the policy is loaded, so such policies still parse here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator, model_validator

from ciliate.resources.base import Model, Resource, raise_field_errors
from ciliate.resources.core import metadata_problems
from ciliate.resources.selectors import LabelSelector

MAX_SELECTORS_PER_HOOK = 5
"""Tetragon loads at most this many selectors for one hook."""
MAX_MATCH_ARGS_PER_SELECTOR = 5
"""Tetragon filters on at most this many arguments in one selector."""

ARG_TYPES: frozenset[str] = frozenset(
    [
        "auto",
        "int",
        "sint8",
        "int8",
        "uint8",
        "sint16",
        "int16",
        "uint16",
        "int32",
        "sint32",
        "uint32",
        "int64",
        "sint64",
        "uint64",
        "char_buf",
        "char_iovec",
        "size_t",
        "skb",
        "sock",
        "sockaddr",
        "socket",
        "string",
        "fd",
        "file",
        "filename",
        "path",
        "nop",
        "bpf_attr",
        "perf_event",
        "bpf_map",
        "user_namespace",
        "capability",
        "kiocb",
        "iov_iter",
        "cred",
        "load_info",
        "module",
        "syscall64",
        "kernel_cap_t",
        "cap_inheritable",
        "cap_permitted",
        "cap_effective",
        "linux_binprm",
        "data_loc",
        "net_device",
        "bpf_cmd",
        "dentry",
    ]
)
"""Argument types Tetragon's CRD accepts for kprobe, tracepoint, uprobe and LSM arguments."""

ARG_OPERATORS: frozenset[str] = frozenset(
    [
        "Equal",
        "NotEqual",
        "Prefix",
        "NotPrefix",
        "Postfix",
        "NotPostfix",
        "GreaterThan",
        "LessThan",
        "GT",
        "LT",
        "Mask",
        "SPort",
        "NotSPort",
        "SPortPriv",
        "NotSportPriv",
        "NotSPortPriv",
        "DPort",
        "NotDPort",
        "DPortPriv",
        "NotDPortPriv",
        "SAddr",
        "NotSAddr",
        "DAddr",
        "NotDAddr",
        "Protocol",
        "Family",
        "State",
        "InMap",
        "NotInMap",
    ]
)
"""matchArgs / matchReturnArgs operators."""

BINARY_OPERATORS: frozenset[str] = frozenset(
    ["In", "NotIn", "Prefix", "NotPrefix", "Postfix", "NotPostfix"]
)
SET_OPERATORS: frozenset[str] = frozenset({"In", "NotIn"})
NAMESPACE_TYPES: frozenset[str] = frozenset(
    [
        "Uts",
        "Ipc",
        "Mnt",
        "Pid",
        "PidForChildren",
        "Net",
        "Time",
        "TimeForChildren",
        "Cgroup",
        "User",
    ]
)
ACTIONS: frozenset[str] = frozenset(
    [
        "Post",
        "NoPost",
        "FollowFD",
        "UnfollowFD",
        "CopyFD",
        "Sigkill",
        "Signal",
        "Override",
        "GetUrl",
        "DnsLookup",
        "TrackSock",
        "UntrackSock",
        "NotifyEnforcer",
        "CleanupEnforcerNotification",
        "Set",
    ]
)
RETURN_ARG_ACTIONS: frozenset[str] = frozenset({"Post", "TrackSock", "UntrackSock"})

_RATE_LIMIT = re.compile(r"^[0-9]+[smh]?$")


def _one_of(allowed: frozenset[str], what: str) -> Callable[[str], str]:
    """A field validator refusing values outside ``allowed``, listing the choices."""

    def check(value: str) -> str:
        if value not in allowed:
            choices = ", ".join(sorted(allowed))
            raise ValueError(f"unknown {what} {value!r}; expected one of {choices}")
        return value

    return check


Uint32 = Annotated[StrictInt, Field(ge=0, le=2**32 - 1)]


class KProbeArg(Model):
    index: Uint32
    type: str
    sizeArgIndex: Uint32 | None = None
    returnCopy: StrictBool = False
    maxData: StrictBool = False
    label: str | None = None

    _type = field_validator("type")(_one_of(ARG_TYPES, "argument type"))


class ArgSelector(Model):
    index: Uint32 = 0
    operator: str
    values: list[str] = Field(default_factory=list)
    args: list[Uint32] = Field(default_factory=list)

    _operator = field_validator("operator")(_one_of(ARG_OPERATORS, "operator"))

    @field_validator("values", mode="before")
    @classmethod
    def _values_as_strings(cls, value: Any) -> Any:
        """Tetragon's values are strings; YAML users write ``values: [0, 1]`` for numbers."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        return value


class BinarySelector(Model):
    operator: str
    values: list[str] = Field(min_length=1)
    followChildren: StrictBool = False

    _operator = field_validator("operator")(_one_of(BINARY_OPERATORS, "operator"))


class PIDSelector(Model):
    operator: str
    values: list[Uint32] = Field(min_length=1)
    isNamespacePID: StrictBool = False
    followForks: StrictBool = False

    _operator = field_validator("operator")(_one_of(SET_OPERATORS, "operator"))


class NamespaceSelector(Model):
    namespace: str
    operator: str
    values: list[str] = Field(min_length=1)

    _namespace = field_validator("namespace")(_one_of(NAMESPACE_TYPES, "namespace type"))
    _operator = field_validator("operator")(_one_of(SET_OPERATORS, "operator"))


class NamespaceChangesSelector(Model):
    operator: str
    values: list[str] = Field(min_length=1)

    _operator = field_validator("operator")(_one_of(SET_OPERATORS, "operator"))


class CapabilitiesSelector(Model):
    type: Literal["Effective", "Inheritable", "Permitted"] = "Effective"
    operator: str
    isNamespaceCapability: StrictBool = False
    values: list[str] = Field(min_length=1)

    _operator = field_validator("operator")(_one_of(SET_OPERATORS, "operator"))


class ActionSelector(Model):
    action: str
    argFd: Uint32 | None = None
    argName: Uint32 | None = None
    argUrl: str | None = None
    argFqdn: str | None = None
    argError: Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    argSig: Annotated[StrictInt, Field(ge=1, le=64)] | None = None
    argSock: Uint32 | None = None
    rateLimit: str | None = None
    rateLimitScope: Literal["thread", "process", "global"] | None = None

    _action = field_validator("action")(_one_of(ACTIONS, "action"))

    @field_validator("rateLimit", mode="before")
    @classmethod
    def _rate_limit(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not _RATE_LIMIT.match(value):
            raise ValueError(f"{value!r} is not a duration like 10, 30s, 5m or 1h")
        return value

    @model_validator(mode="after")
    def _required_arguments(self) -> ActionSelector:
        """Actions that need an argument name it, as Tetragon refuses them otherwise."""
        needs = {
            "Signal": "argSig",
            "Override": "argError",
            "GetUrl": "argUrl",
            "DnsLookup": "argFqdn",
        }
        field = needs.get(self.action)
        if field and getattr(self, field) is None:
            raise_field_errors(
                "ActionSelector", [((field,), f"required for action {self.action}", None)]
            )
        return self


class KProbeSelector(Model):
    matchPIDs: list[PIDSelector] = Field(default_factory=list)
    matchArgs: list[ArgSelector] = Field(default_factory=list)
    matchReturnArgs: list[ArgSelector] = Field(default_factory=list)
    matchActions: list[ActionSelector] = Field(default_factory=list)
    matchReturnActions: list[ActionSelector] = Field(default_factory=list)
    matchBinaries: list[BinarySelector] = Field(default_factory=list)
    matchParentBinaries: list[BinarySelector] = Field(default_factory=list)
    matchNamespaces: list[NamespaceSelector] = Field(default_factory=list)
    matchNamespaceChanges: list[NamespaceChangesSelector] = Field(default_factory=list)
    matchCapabilities: list[CapabilitiesSelector] = Field(default_factory=list)
    matchCapabilityChanges: list[CapabilitiesSelector] = Field(default_factory=list)

    @field_validator("matchArgs")
    @classmethod
    def _arg_limit(cls, value: list[ArgSelector]) -> list[ArgSelector]:
        if len(value) > MAX_MATCH_ARGS_PER_SELECTOR:
            raise ValueError(
                f"{len(value)} matchArgs; Tetragon allows at most "
                f"{MAX_MATCH_ARGS_PER_SELECTOR} per selector"
            )
        return value


def _selector_limit(value: list[KProbeSelector]) -> list[KProbeSelector]:
    if len(value) > MAX_SELECTORS_PER_HOOK:
        raise ValueError(
            f"{len(value)} selectors; Tetragon allows at most {MAX_SELECTORS_PER_HOOK} per hook"
        )
    return value


Selectors = Annotated[list[KProbeSelector], Field(default_factory=list)]


class _Hook(Model):
    args: list[KProbeArg] = Field(default_factory=list)
    selectors: Selectors
    tags: list[str] = Field(default_factory=list)
    message: str | None = None

    _selectors = field_validator("selectors")(_selector_limit)


class KProbeSpec(_Hook):
    call: str = Field(min_length=1)
    syscall: StrictBool = True
    return_: StrictBool = Field(default=False, alias="return")
    returnArg: KProbeArg | None = None
    returnArgAction: str | None = None

    @field_validator("returnArgAction")
    @classmethod
    def _return_action(cls, value: str | None) -> str | None:
        if value is not None:
            _one_of(RETURN_ARG_ACTIONS, "return argument action")(value)
        return value


class TracepointSpec(_Hook):
    subsystem: str = Field(min_length=1)
    event: str = Field(min_length=1)
    raw: StrictBool = False


class UProbeSpec(_Hook):
    path: str = Field(min_length=1)
    symbols: list[str] = Field(default_factory=list)
    symbol: str | None = None
    offsets: list[Uint32] = Field(default_factory=list)


class LsmHookSpec(_Hook):
    hook: str = Field(min_length=1)


class OptionSpec(Model):
    name: str = Field(min_length=1)
    value: str

    @field_validator("value", mode="before")
    @classmethod
    def _scalar_as_string(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value) if isinstance(value, int | float) else value


class ListSpec(Model):
    name: str = Field(min_length=1)
    values: list[str] = Field(default_factory=list)
    type: Literal["syscalls", "generated_syscalls", "generated_ftrace"] | None = None
    pattern: str | None = None


class TracingPolicySpec(Model):
    kprobes: list[KProbeSpec] = Field(default_factory=list)
    tracepoints: list[TracepointSpec] = Field(default_factory=list)
    uprobes: list[UProbeSpec] = Field(default_factory=list)
    lsmhooks: list[LsmHookSpec] = Field(default_factory=list)
    loader: StrictBool = False
    podSelector: LabelSelector | None = None
    containerSelector: LabelSelector | None = None
    lists: list[ListSpec] = Field(default_factory=list)
    options: list[OptionSpec] = Field(default_factory=list)

    @property
    def hooks(self) -> list[tuple[str, _Hook]]:
        """Every hook with the spec field it came from, e.g. ``("tracepoints", hook)``."""
        groups: list[tuple[str, list[Any]]] = [
            ("kprobes", self.kprobes),
            ("tracepoints", self.tracepoints),
            ("uprobes", self.uprobes),
            ("lsmhooks", self.lsmhooks),
        ]
        return [(name, hook) for name, hooks in groups for hook in hooks]


class _TracingPolicyBase(Resource):
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("cilium.io/v1alpha1",)
    OWNER: ClassVar[str] = "security"

    apiVersion: Literal["cilium.io/v1alpha1"] = "cilium.io/v1alpha1"
    spec: TracingPolicySpec = Field(default_factory=TracingPolicySpec)

    @model_validator(mode="after")
    def _check(self) -> _TracingPolicyBase:
        problems = metadata_problems(self)
        if not self.spec.hooks:
            problems.append(
                (("spec",), "needs at least one of kprobes, tracepoints, uprobes, lsmhooks", None)
            )
        raise_field_errors(self.KIND, problems)
        return self


class TracingPolicy(_TracingPolicyBase):
    """A cluster-scoped tracing policy: applies to every process (or the pods it selects)."""

    KIND: ClassVar[str] = "TracingPolicy"
    NAMESPACED: ClassVar[bool] = False

    kind: Literal["TracingPolicy"] = "TracingPolicy"


class TracingPolicyNamespaced(_TracingPolicyBase):
    """A tracing policy that applies only to pods of its namespace."""

    KIND: ClassVar[str] = "TracingPolicyNamespaced"
    NAMESPACED: ClassVar[bool] = True

    kind: Literal["TracingPolicyNamespaced"] = "TracingPolicyNamespaced"
