"""Compile a PolicySpec into BPF C text (from the template) plus the contents of its maps.

Selectors become straight-line C with the policy's constants inlined, so a non-matching event
costs a few compares. Per event the hook first checks the node's cgroup subtree (and the pod
cgroups of a namespaced policy), then each selector's tests cheapest first: integer arguments
(loads from the tracepoint record), PIDs, string arguments, namespaces (the task is read only
then), binaries (the process map is looked up only then). A string compared with Equal, NotEqual
or Prefix is read from user memory into a small stack buffer of just the bytes the compare needs
(value length plus one) and compared eight bytes at a time; only Postfix, and a matching event
that posts, read whole strings into the per-CPU event. Sets that may be large (matchBinaries
In/NotIn) become hash maps whose contents the loader writes after loading. Kernel struct offsets
are parameters (from BTF); tracepoint field offsets come from the format file the spec was
validated against.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.security.core.spec import (
    ACTION_CODES,
    NAMESPACE_FIELDS,
    Action,
    ActionKind,
    ArgOperator,
    ArgSpec,
    ArgType,
    BinaryOperator,
    Hook,
    HookKind,
    MatchArg,
    PolicySpec,
    Selector,
    SetOperator,
)
from services.security.core.tracefmt import FieldKind

PATH_LEN = 256
TP_STR_LEN = 256
TP_MAX_ARGS = 5
RINGBUF_PAGES = 64
STACK_COMPARE_BYTES = 256
"""Stack budget of a hook for compare buffers; string slots beyond it compare in the per-CPU
event instead (same read size, one more check of the destination by the kernel)."""

# Kernel struct members the programs read; each must be resolved from the running kernel's BTF.
LIFECYCLE_OFFSETS: tuple[str, ...] = (
    "task_struct.real_parent",
    "task_struct.tgid",
    "task_struct.fs",
    "task_struct.mm",
    "fs_struct.pwd",
    "path.dentry",
    "path.mnt",
    "dentry.d_parent",
    "dentry.d_name",
    "qstr.name",
    "qstr.len",
    "vfsmount.mnt_root",
    "mount.mnt",
    "mount.mnt_parent",
    "mount.mnt_mountpoint",
    "mm_struct.arg_start",
    "mm_struct.arg_end",
)
NAMESPACE_OFFSETS: tuple[str, ...] = (
    "task_struct.nsproxy",
    "ns_common.inum",
    *(f"nsproxy.{member}" for member, _ in NAMESPACE_FIELDS.values()),
    *(f"{struct}.ns" for _, struct in NAMESPACE_FIELDS.values()),
)


class CompileError(ValueError):
    """The spec cannot be expressed in C (a bug or a missing offset), named by hook."""


@dataclass(frozen=True)
class Attachment:
    kind: HookKind
    target: str  # "syscalls:sys_enter_openat" for tracepoints, the call/hook otherwise
    function: str


@dataclass
class CompiledPolicy:
    name: str
    policy_id: int
    c_text: str
    attachments: list[Attachment]
    maps: dict[str, list[bytes]] = field(default_factory=dict)
    """Hash-set maps (value u8 1) by name: keys exactly as the C code looks them up."""
    restrict_cgroups: bool = False
    """When true, only tasks whose cgroup id is in the map ``allowed_cgroups`` are matched."""
    required_features: tuple[str, ...] = ()


def fill_template(template: str, values: Mapping[str, object]) -> str:
    """Replace every ``{{key}}``; a placeholder left unfilled is an error, never silent."""
    text = template
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    if "{{" in text:
        start = text.index("{{")
        raise CompileError(f"template placeholder left unfilled: {text[start:start + 60]!r}")
    return text


def binary_key(path: str) -> bytes:
    """How a binary path is stored in the binary-set maps: zero padded to PATH_LEN."""
    raw = path.encode()[: PATH_LEN - 1]
    return raw + b"\0" * (PATH_LEN - len(raw))


def _c_char(byte: int) -> str:
    return str(byte if byte < 128 else byte - 256)


def _bytes_equal(expr: str, data: bytes, start: str = "") -> str:
    """C conjunction comparing ``expr[start + k]`` with each byte of ``data``."""
    parts = []
    for k, byte in enumerate(data):
        index = f"(({start} + {k}) & {TP_STR_LEN - 1})" if start else str(k)
        parts.append(f"{expr}[{index}] == {_c_char(byte)}")
    return " && ".join(parts) if parts else "1"


def compare_bytes(op: ArgOperator, value: str | int) -> bytes:
    """The bytes a compare-buffer test checks: the value, and for Equal/NotEqual its NUL too."""
    data = str(value).encode()
    return data + b"\0" if op in (ArgOperator.EQUAL, ArgOperator.NOT_EQUAL) else data


def compare_read_size(op: ArgOperator, values: tuple[str | int, ...]) -> int:
    """How many bytes (NUL included) to read for these compares: one more than compared.

    ``bpf_probe_read_user_str(buf, n, src)`` copies at most n - 1 characters and a NUL. With n one
    more than the bytes compared, a longer string still shows a character where an Equal value
    has its NUL, and a shorter one shows its NUL where the value has a character: the compare
    of exactly those bytes is exact, whatever the buffer holds past the NUL.
    """
    return max(len(compare_bytes(op, v)) for v in values) + 1


def _words_equal(buf: str, data: bytes) -> str:
    """C conjunction comparing the u64 words ``buf[k]`` with ``data`` (masked in the last)."""
    parts = []
    for k in range(0, len(data), 8):
        chunk = data[k : k + 8]
        value = int.from_bytes(chunk.ljust(8, b"\0"), sys.byteorder)
        if len(chunk) == 8:
            parts.append(f"{buf}[{k // 8}] == {value:#x}ULL")
        else:
            mask = (1 << (8 * len(chunk))) - 1
            parts.append(f"({buf}[{k // 8}] & {mask:#x}ULL) == {value:#x}ULL")
    return " && ".join(parts)


def _compare_condition(op: ArgOperator, buf: str, values: tuple[str | int, ...]) -> str:
    """Equal, NotEqual or Prefix on a compare buffer (u64 words; see ``compare_read_size``)."""
    terms = [f"({_words_equal(buf, compare_bytes(op, v))})" for v in values]
    joined = " || ".join(terms)
    return f"!({joined})" if op is ArgOperator.NOT_EQUAL else f"({joined})"


def _postfix_condition(slot: int, values: tuple[str | int, ...]) -> str:
    """Postfix on the whole string read into the event (``slen{slot}`` is its length)."""
    buf = f"e->strs[{slot}]"
    length = f"slen{slot}"
    terms = []
    for value in values:
        data = str(value).encode()
        start = f"({length} - {len(data)})"
        terms.append(f"({length} >= {len(data)} && {_bytes_equal(buf, data, start)})")
    return "(" + " || ".join(terms) + ")"


def _int_condition(op: ArgOperator, slot: int, arg: ArgSpec, values: tuple[str | int, ...]) -> str:
    ctype = "s64" if arg.signed else "u64"
    value = f"(({ctype})a{slot})"
    nums = [int(v) for v in values]
    if op is ArgOperator.EQUAL:
        return "(" + " || ".join(f"{value} == ({ctype}){n}LL" for n in nums) + ")"
    if op is ArgOperator.NOT_EQUAL:
        return "(" + " && ".join(f"{value} != ({ctype}){n}LL" for n in nums) + ")"
    if op is ArgOperator.GT:
        return "(" + " || ".join(f"{value} > ({ctype}){n}LL" for n in nums) + ")"
    if op is ArgOperator.LT:
        return "(" + " || ".join(f"{value} < ({ctype}){n}LL" for n in nums) + ")"
    return "(" + " || ".join(f"(a{slot} & (u64){n}ULL) != 0" for n in nums) + ")"


def _read_int(arg: ArgSpec) -> str:
    width = {1: 8, 2: 16, 4: 32, 8: 64}.get(arg.size, 64)
    ctype = f"{'s' if arg.signed else 'u'}{width}"
    return f"(u64)(s64)*({ctype} *)((char *)ctx + {arg.offset})" if arg.signed else \
        f"(u64)*({ctype} *)((char *)ctx + {arg.offset})"


def _read_string_call(arg: ArgSpec, dst: str, size: int) -> str:
    """The C call copying string argument ``arg`` into ``dst`` (at most ``size`` bytes, NUL
    included); returns what the helper returns (bytes copied with the NUL, or < 0)."""
    if arg.field_kind is FieldKind.USER_STRING:
        src = f"(const void *)*(u64 *)((char *)ctx + {arg.offset})"
        return f"bpf_probe_read_user_str({dst}, {size}, {src})"
    if arg.field_kind is FieldKind.DATA_LOC_STRING:
        src = f"(char *)ctx + (*(u32 *)((char *)ctx + {arg.offset}) & 0xFFFF)"
        return f"bpf_probe_read_kernel_str({dst}, {size}, {src})"
    size = min(size, arg.size + 1)  # a char[] field: at most its own length and a NUL
    return f"bpf_probe_read_kernel_str({dst}, {size}, (char *)ctx + {arg.offset})"


def _read_string(arg: ArgSpec, slot: int) -> str:
    """The whole string into the event (what a posted event carries, and what Postfix needs)."""
    return f"slen{slot} = {_read_string_call(arg, f'e->strs[{slot}]', TP_STR_LEN)} - 1;"


def _namespace_inum(ns_member: str, ns_struct: str, offsets: Mapping[str, int]) -> str:
    return (
        "ns_inum(cur_task(), "
        f"{offsets[f'nsproxy.{ns_member}']}, "
        f"{offsets[f'{ns_struct}.ns'] + offsets['ns_common.inum']})"
    )


class _HookCompiler:
    def __init__(
        self,
        policy: PolicySpec,
        policy_id: int,
        hook_index: int,
        hook: Hook,
        offsets: Mapping[str, int],
        maps: dict[str, list[bytes]],
        declarations: list[str],
    ) -> None:
        self.policy = policy
        self.policy_id = policy_id
        self.hook_index = hook_index
        self.hook = hook
        self.offsets = offsets
        self.maps = maps
        self.declarations = declarations
        self.slots = {arg.index: slot for slot, arg in enumerate(hook.args[:TP_MAX_ARGS])}
        self.string_slots = [
            slot for slot, arg in enumerate(hook.args[:TP_MAX_ARGS]) if arg.type is ArgType.STRING
        ]
        self.compare_sizes = self._compare_sizes()
        self.needs_postfix = any(
            ma.operator is ArgOperator.POSTFIX for sel in hook.selectors for ma in sel.match_args
        )

    def _compare_sizes(self) -> dict[int, int]:
        """Per string slot compared by Equal/NotEqual/Prefix: the bytes to read for them all."""
        sizes: dict[int, int] = {}
        for sel in self.hook.selectors:
            for ma in sel.match_args:
                slot = self.slots.get(ma.index)
                if slot is None or slot not in self.string_slots or \
                        ma.operator is ArgOperator.POSTFIX:
                    continue
                size = compare_read_size(ma.operator, ma.values)
                sizes[slot] = max(sizes.get(slot, 0), size)
        return sizes

    def _binary_condition(self, sel_index: int, k: int, op: BinaryOperator,
                          values: tuple[str, ...]) -> str:
        if op is BinaryOperator.PREFIX:
            terms = [f"({_bytes_equal('pi->binary', v.encode())})" for v in values]
            return "(proc() && (" + " || ".join(terms) + "))"
        name = f"bins_{self.hook_index}_{sel_index}_{k}"
        self.declarations.append(f"BPF_HASH({name}, struct bin_key, u8, {max(len(values), 1)});")
        self.maps[name] = [binary_key(v) for v in values]
        found = f"(proc() && {name}.lookup((struct bin_key *)pi->binary))"
        return found if op is BinaryOperator.IN else f"!{found}"

    def _is_string(self, ma: MatchArg) -> bool:
        slot = self.slots.get(ma.index)
        return slot is not None and self.hook.args[slot].type is ArgType.STRING

    def _selector_condition(self, sel_index: int, sel: Selector) -> str:
        """The selector's tests ANDed, cheapest first: integer arguments (a load from the
        record), PIDs (one helper), strings compared in a stack buffer (one read of a few
        bytes), namespaces (task reads), binaries (map lookups), Postfix (a whole string)."""
        ints = [ma for ma in sel.match_args if not self._is_string(ma)]
        strings = [ma for ma in sel.match_args
                   if self._is_string(ma) and ma.operator is not ArgOperator.POSTFIX]
        postfix = [ma for ma in sel.match_args
                   if self._is_string(ma) and ma.operator is ArgOperator.POSTFIX]
        terms: list[str] = [self._arg_condition(ma) for ma in ints]
        for mp in sel.match_pids:
            any_of = " || ".join(f"tgid() == {p}" for p in mp.values)
            terms.append(f"({any_of})" if mp.operator is SetOperator.IN else f"!({any_of})")
        terms += [self._arg_condition(ma) for ma in strings]
        for mn in sel.match_namespaces:
            member, struct = NAMESPACE_FIELDS[mn.namespace]
            inum = _namespace_inum(member, struct, self.offsets)
            any_of = " || ".join(f"ns == {v}" for v in mn.values)
            body = f"({{ u32 ns = {inum}; ({any_of}); }})"
            terms.append(body if mn.operator is SetOperator.IN else f"!{body}")
        for k, mb in enumerate(sel.match_binaries):
            terms.append(self._binary_condition(sel_index, k, mb.operator, mb.values))
        terms += [self._arg_condition(ma) for ma in postfix]
        return " && ".join(terms) if terms else "1"

    def _int_prefilter(self) -> str:
        """When every selector tests an integer argument, those tests ORed over the selectors:
        an event none of them lets through leaves before the scope check (a helper call)."""
        per_selector = []
        for sel in self.hook.selectors:
            ints = [self._arg_condition(ma) for ma in sel.match_args if not self._is_string(ma)]
            if not ints:
                return ""
            per_selector.append("(" + " && ".join(ints) + ")")
        return " || ".join(per_selector)

    def _arg_condition(self, ma: MatchArg) -> str:
        slot = self.slots.get(ma.index)
        if slot is None:
            raise CompileError(
                f"hook {self.hook.name}: matchArgs index {ma.index} beyond the first "
                f"{TP_MAX_ARGS} args"
            )
        arg = self.hook.args[slot]
        if arg.type is ArgType.STRING:
            if ma.operator is ArgOperator.POSTFIX:
                return f"(read_strs() && {_postfix_condition(slot, ma.values)})"
            compare = _compare_condition(ma.operator, f"cmp{slot}", ma.values)
            return f"(cmp_read{slot}() && {compare})"
        return _int_condition(ma.operator, slot, arg, ma.values)

    def _actions(self, sel_index: int, actions: tuple[Action, ...]) -> list[str]:
        lines: list[str] = []
        code = ACTION_CODES[ActionKind.POST]
        post: Action | None = None
        for action in actions:
            if action.kind in (ActionKind.SIGKILL, ActionKind.SIGNAL):
                lines.append(f"bpf_send_signal({action.signal});")
                code = ACTION_CODES[action.kind]
            elif action.kind is ActionKind.POST:
                post = action
            elif action.kind is ActionKind.OVERRIDE:
                code = ACTION_CODES[action.kind]
                lines.append("/* Override: needs bpf_override_return (kprobes only) */")
        if any(a.kind is ActionKind.NO_POST for a in actions):
            return [*lines, "return 0;"]
        hook_sel = (self.hook_index << 8) | sel_index
        rate = post.rate_limit_ns if post is not None else 0
        guard = f"rate_ok(tgid(), {hook_sel}, {rate}ULL)" if rate else "1"
        fill_ints = [
            f"    e->ints[{slot}] = {'0' if arg.type is ArgType.STRING else f'a{slot}'};"
            for slot, arg in enumerate(self.hook.args[:TP_MAX_ARGS])
        ]
        lines += [
            f"if ({guard}) {{",
            "    e = tp_scratch.lookup(&zero);",
            "    if (!e)",
            "        return 0;",
            "    read_strs();",
            *fill_ints,
            "    fill_hdr(&e->h, proc());",
            f"    e->h.aux1 = {hook_sel};",
            f"    e->h.aux2 = {code};",
            "    if (events.ringbuf_output(e, sizeof(*e), 0))",
            "        count_lost();",
            "}",
            "return 0;",
        ]
        return lines

    def function_name(self) -> str:
        return f"hook_{self.hook_index}"

    def _compare_buffers(self) -> tuple[list[str], list[str]]:
        """Declarations of the compare buffers and their lazy reads (macros ``cmp_read{slot}``).

        Stack buffers (zeroed u64 words) up to STACK_COMPARE_BYTES per hook; a slot beyond that
        compares in its string of the per-CPU event, read with the same small size."""
        decls: list[str] = []
        undefs: list[str] = []
        stack = 0
        for slot, size in sorted(self.compare_sizes.items()):
            words = (size + 7) // 8
            if stack + 8 * words <= STACK_COMPARE_BYTES:
                stack += 8 * words
                decls.append(f"    u64 cmp{slot}[{words}] = {{}};")
            else:
                decls.append(f"    u64 *cmp{slot} = (u64 *)e->strs[{slot}];")
            call = _read_string_call(self.hook.args[slot], f"cmp{slot}", size)
            decls += [
                f"    int cmp{slot}_read = 0;",
                f"    #define cmp_read{slot}() ({{ if (!cmp{slot}_read) {{ {call}; "
                f"cmp{slot}_read = 1; }} 1; }})",
            ]
            undefs.append(f"    #undef cmp_read{slot}")
        return decls, undefs

    def compile(self, restrict: bool) -> str:
        hook = self.hook
        body: list[str] = [
            f"/* {hook.kind.value}: {hook.name} */",
            f"int {self.function_name()}(void *ctx) {{",
        ]
        for slot, arg in enumerate(hook.args[:TP_MAX_ARGS]):
            if arg.type is ArgType.INT:
                read = _read_int(arg) if hook.kind is HookKind.TRACEPOINT else "0"
                body.append(f"    u64 a{slot} = {read}; (void)a{slot};")
        prefilter = self._int_prefilter()
        if prefilter:  # loads from the record and compares: cheaper than the scope check
            body += [f"    if (!({prefilter}))", "        return 0;"]
        body += [
            "    if (node_cgroup.check_current_task(0) != 1)",
            "        return 0;",
        ]
        if restrict:
            body += [
                "    u64 cg = bpf_get_current_cgroup_id();",
                "    if (!allowed_cgroups.lookup(&cg))",
                "        return 0;",
            ]
        spills = sum(8 * ((size + 7) // 8) for size in self.compare_sizes.values()) > \
            STACK_COMPARE_BYTES
        body.append("    u32 zero = 0;")
        if self.needs_postfix or spills:  # the per-CPU event is needed before any match
            body += [
                "    struct ev_tp *e = tp_scratch.lookup(&zero);",
                "    if (!e)",
                "        return 0;",
            ]
        else:  # looked up only by a selector that posts
            body.append("    struct ev_tp *e = 0;")
        body += [
            "    u32 tgid_v = 0;",
            "    #define tgid() ({ if (!tgid_v) tgid_v = bpf_get_current_pid_tgid() >> 32; "
            "tgid_v; })",
            "    struct proc_info *pi = 0;",
            "    int pi_read = 0;",
            "    #define proc() ({ if (!pi_read) { pi = lookup_proc(tgid()); "
            "pi_read = 1; } pi; })",
        ]
        if any(s.match_namespaces for s in hook.selectors):  # only namespaces read the task
            body += [
                "    void *task_v = 0;",
                "    #define cur_task() ({ if (!task_v) "
                "task_v = (void *)bpf_get_current_task(); task_v; })",
            ]
        for slot in range(TP_MAX_ARGS):
            body.append(f"    int slen{slot} = 0; (void)slen{slot};")
        decls, undefs = self._compare_buffers()
        body += decls
        body.append("    int strs_read = 0;")
        reads = [_read_string(hook.args[s], s) for s in self.string_slots]
        body.append(
            "    #define read_strs() ({ if (!strs_read) { "
            + " ".join(reads)
            + " strs_read = 1; } 1; })"
        )
        selectors = hook.selectors or (Selector(),)
        for sel_index, sel in enumerate(selectors):
            cond = self._selector_condition(sel_index, sel)
            body.append(f"    if ({cond}) {{")
            body += ["        " + line for line in self._actions(sel_index, sel.actions)]
            body.append("    }")
        body += ["    #undef read_strs", *undefs, "    #undef proc", "    #undef tgid"]
        if any(s.match_namespaces for s in hook.selectors):
            body.append("    #undef cur_task")
        body += ["    return 0;", "}"]
        return "\n".join(body)


def required_offsets(policy: PolicySpec) -> tuple[str, ...]:
    """The BTF members this policy's C text needs (namespaces read through task->nsproxy)."""
    uses_ns = any(s.match_namespaces for h in policy.hooks for s in h.selectors)
    return NAMESPACE_OFFSETS if uses_ns else ()


def compile_policy(
    policy: PolicySpec,
    template: str,
    common: str,
    policy_id: int,
    offsets: Mapping[str, int] | None = None,
) -> CompiledPolicy:
    """The C text and map contents for one policy; nothing here touches the kernel."""
    offsets = dict(offsets or {})
    missing = [p for p in required_offsets(policy) if p not in offsets]
    if missing:
        raise CompileError(f"kernel offsets not resolved from BTF: {', '.join(missing)}")
    maps: dict[str, list[bytes]] = {}
    declarations: list[str] = [f"struct bin_key {{ char path[{PATH_LEN}]; }};"]
    restrict = policy.namespace is not None or policy.pod_selector is not None
    if restrict:
        declarations.append("BPF_HASH(allowed_cgroups, u64, u8, 4096);")
    if required_offsets(policy):
        declarations.append(
            "static __always_inline u32 ns_inum(void *task, u64 member, u64 inum_off) {\n"
            f"    void *nsproxy = kread_ptr(task, {offsets['task_struct.nsproxy']});\n"
            "    void *ns = kread_ptr(nsproxy, member);\n"
            "    u32 inum = 0;\n"
            "    bpf_probe_read_kernel(&inum, sizeof(inum), (char *)ns + inum_off);\n"
            "    return inum;\n"
            "}"
        )
    functions: list[str] = []
    attachments: list[Attachment] = []
    for hook_index, hook in enumerate(policy.hooks):
        hc = _HookCompiler(policy, policy_id, hook_index, hook, offsets, maps, declarations)
        functions.append(hc.compile(restrict))
        target = f"{hook.subsystem}:{hook.event}" if hook.kind is HookKind.TRACEPOINT else \
            hook.event
        attachments.append(Attachment(hook.kind, target, hc.function_name()))
    c_text = fill_template(
        template,
        {
            "COMMON": common,
            "RINGBUF_PAGES": RINGBUF_PAGES,
            "POLICY_ID": policy_id,
            "DECLARATIONS": "\n".join(declarations),
            "HOOKS": "\n\n".join(functions),
        },
    )
    return CompiledPolicy(
        name=policy.name,
        policy_id=policy_id,
        c_text=c_text,
        attachments=attachments,
        maps=maps,
        restrict_cgroups=restrict,
        required_features=policy.required_features,
    )


def compile_lifecycle(template: str, common: str, offsets: Mapping[str, int]) -> str:
    """The always-on lifecycle program's C text with kernel offsets filled in."""
    missing = [p for p in LIFECYCLE_OFFSETS if p not in offsets]
    if missing:
        raise CompileError(f"kernel offsets not resolved from BTF: {', '.join(missing)}")
    values: dict[str, object] = {"COMMON": common, "RINGBUF_PAGES": RINGBUF_PAGES * 4}
    values.update({p: offsets[p] for p in LIFECYCLE_OFFSETS})
    return fill_template(template, values)
