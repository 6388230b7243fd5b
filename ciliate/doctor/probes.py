"""Kernel BPF feature probes through the bpf(2) and perf_event_open(2) syscalls, from ctypes.

Why not bcc: probing must be fast and must work before bcc and the headers are in place. Each
probe loads the smallest program or map that exercises one feature; attach probes attach for
real, because on some kernels a program type loads but cannot be attached (kprobes here).
Results are cached per process; ``require`` turns a missing feature into a clear error.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from ciliate.doctor.btf import VMLINUX_BTF, BtfError, BtfKind, find_type_id

TRACEFS = Path("/sys/kernel/tracing")
KPROBE_PMU_TYPE = Path("/sys/bus/event_source/devices/kprobe/type")

# x86_64 syscall numbers; other architectures are not supported by this project.
_SYS_BPF = 321
_SYS_PERF_EVENT_OPEN = 298
_ENOTSUPP = 524  # kernel-internal "operation not supported", seen by user space as 524


class Cmd(IntEnum):
    MAP_CREATE = 0
    PROG_LOAD = 5
    RAW_TRACEPOINT_OPEN = 17


class ProgType(IntEnum):
    """The program types the project cares about (include/uapi/linux/bpf.h numbers)."""

    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    TRACEPOINT = 5
    XDP = 6
    CGROUP_SKB = 8
    RAW_TRACEPOINT = 17
    CGROUP_SOCK_ADDR = 18
    TRACING = 26
    LSM = 29


class MapType(IntEnum):
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    LRU_HASH = 9
    LPM_TRIE = 11
    RINGBUF = 27


class AttachType(IntEnum):
    CGROUP_INET4_CONNECT = 10
    TRACE_FENTRY = 24
    LSM_MAC = 27


class Helper(IntEnum):
    """Helper function ids, with the program type each is probed from."""

    BPF_OVERRIDE_RETURN = 58
    BPF_FIB_LOOKUP = 69
    BPF_GET_CURRENT_CGROUP_ID = 80
    BPF_SEND_SIGNAL = 109
    BPF_PROBE_READ_KERNEL = 113
    BPF_SK_ASSIGN = 124
    BPF_RINGBUF_OUTPUT = 130
    BPF_RINGBUF_RESERVE = 131
    BPF_REDIRECT_NEIGH = 152
    BPF_REDIRECT_PEER = 155


# Names as shown to users, defined once: the probe tables below are keyed by these.
PROG_TYPES: dict[str, ProgType] = {
    "socket_filter": ProgType.SOCKET_FILTER,
    "kprobe": ProgType.KPROBE,
    "sched_cls": ProgType.SCHED_CLS,
    "tracepoint": ProgType.TRACEPOINT,
    "xdp": ProgType.XDP,
    "cgroup_skb": ProgType.CGROUP_SKB,
    "raw_tracepoint": ProgType.RAW_TRACEPOINT,
    "cgroup_sock_addr": ProgType.CGROUP_SOCK_ADDR,
    "tracing": ProgType.TRACING,
    "lsm": ProgType.LSM,
}

# (map type, key size, value size, max entries, flags)
MAP_TYPES: dict[str, tuple[MapType, int, int, int, int]] = {
    "hash": (MapType.HASH, 4, 4, 1, 0),
    "array": (MapType.ARRAY, 4, 4, 1, 0),
    "prog_array": (MapType.PROG_ARRAY, 4, 4, 1, 0),
    "perf_event_array": (MapType.PERF_EVENT_ARRAY, 4, 4, 1, 0),
    "percpu_hash": (MapType.PERCPU_HASH, 4, 4, 1, 0),
    "lru_hash": (MapType.LRU_HASH, 4, 4, 1, 0),
    "lpm_trie": (MapType.LPM_TRIE, 8, 4, 1, 1),  # BPF_F_NO_PREALLOC is mandatory
    "ringbuf": (MapType.RINGBUF, 0, 0, 4096, 0),
}

HELPERS: dict[str, tuple[Helper, ProgType]] = {
    "bpf_override_return": (Helper.BPF_OVERRIDE_RETURN, ProgType.KPROBE),
    "bpf_fib_lookup": (Helper.BPF_FIB_LOOKUP, ProgType.SCHED_CLS),
    "bpf_get_current_cgroup_id": (Helper.BPF_GET_CURRENT_CGROUP_ID, ProgType.TRACEPOINT),
    "bpf_send_signal": (Helper.BPF_SEND_SIGNAL, ProgType.TRACEPOINT),
    "bpf_probe_read_kernel": (Helper.BPF_PROBE_READ_KERNEL, ProgType.TRACEPOINT),
    "bpf_sk_assign": (Helper.BPF_SK_ASSIGN, ProgType.SCHED_CLS),
    "bpf_ringbuf_output": (Helper.BPF_RINGBUF_OUTPUT, ProgType.TRACEPOINT),
    "bpf_ringbuf_reserve": (Helper.BPF_RINGBUF_RESERVE, ProgType.SCHED_CLS),
    "bpf_redirect_neigh": (Helper.BPF_REDIRECT_NEIGH, ProgType.SCHED_CLS),
    "bpf_redirect_peer": (Helper.BPF_REDIRECT_PEER, ProgType.SCHED_CLS),
}

ATTACH_KINDS = ("tracepoint", "raw_tracepoint", "kprobe", "fentry", "lsm")

# Capabilities that policies ask for by name; each is derived from the detailed probes.
CAPABILITIES: dict[str, str] = {
    "kprobe": "attach kprobes (kprobe program type and a kprobe attach point)",
    "lsm": "BPF LSM programs (lsm program type attached to an LSM hook)",
    "fentry": "fentry/fexit programs (tracing program type with BPF trampolines)",
    "override_return": "bpf_override_return from an attached kprobe",
    "send_signal": "bpf_send_signal from a tracepoint program",
    "sk_assign": "bpf_sk_assign from a tc program",
    "ringbuf": "BPF ring buffer maps and bpf_ringbuf_output",
    "lpm_trie": "LPM trie maps",
    "lru_hash": "LRU hash maps",
    "tc": "tc (sched_cls) programs",
    "xdp": "XDP programs",
    "cgroup_sock_addr": "cgroup socket-address hooks (connect4/sendmsg4/recvmsg4)",
    "tracepoint": "tracepoint programs attached through perf events",
    "raw_tracepoint": "raw tracepoint programs",
    "btf": "kernel BTF at /sys/kernel/btf/vmlinux",
}

_LOG_SIZE = 64 * 1024
_LICENSE = b"GPL\0"


class _ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD arm of ``union bpf_attr`` up to ``attach_btf_id`` and one spare word."""

    _fields_ = (
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class _MapCreateAttr(ctypes.Structure):
    _fields_ = (
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * 16),
        ("_pad", ctypes.c_uint32 * 5),
    )


class _RawTracepointAttr(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_uint64),
        ("prog_fd", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    )


class _PerfEventAttr(ctypes.Structure):
    """``struct perf_event_attr`` (PERF_ATTR_SIZE_VER5 layout, 112 bytes)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("_reserved", ctypes.c_uint16),
    )


_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8
_PERF_EVENT_IOC_SET_BPF = 0x40042408

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.restype = ctypes.c_int
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)


class ProbeFailed(OSError):
    """A syscall refused; ``log`` holds the verifier's words when there are any."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        super().__init__(err, f"{what}: {_strerror(err)}")
        self.log = log


def _strerror(err: int) -> str:
    if err == _ENOTSUPP:
        return "ENOTSUPP (not supported by this kernel)"
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _bpf(cmd: Cmd, attr: ctypes.Structure) -> int:
    ret = int(
        _libc.syscall(
            ctypes.c_long(_SYS_BPF),
            ctypes.c_int(cmd),
            ctypes.byref(attr),
            ctypes.c_uint(ctypes.sizeof(attr)),
        )
    )
    if ret < 0:
        raise ProbeFailed(ctypes.get_errno(), f"bpf({cmd.name})")
    return ret


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_MOV64_IMM = 0xB7
_CALL = 0x85
_EXIT = 0x95


def _return(value: int) -> bytes:
    return _insn(_MOV64_IMM, dst=0, imm=value) + _insn(_EXIT)


def load_program(
    prog_type: ProgType,
    insns: bytes,
    *,
    expected_attach_type: int = 0,
    attach_btf_id: int = 0,
) -> int:
    """Load ``insns`` and return the program fd; raises ProbeFailed with the verifier log."""
    log = ctypes.create_string_buffer(_LOG_SIZE)
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(_LICENSE, len(_LICENSE))
    attr = _ProgLoadAttr(
        prog_type=prog_type,
        insn_cnt=len(insns) // 8,
        insns=ctypes.addressof(code),
        license=ctypes.addressof(lic),
        log_level=1,
        log_size=_LOG_SIZE,
        log_buf=ctypes.addressof(log),
        expected_attach_type=expected_attach_type,
        attach_btf_id=attach_btf_id,
    )
    try:
        return _bpf(Cmd.PROG_LOAD, attr)
    except ProbeFailed as exc:
        text = log.value.decode(errors="replace")
        raise ProbeFailed(exc.errno or 0, f"load {prog_type.name.lower()}", text) from None


def create_map(map_type: MapType, key: int, value: int, entries: int, flags: int) -> int:
    attr = _MapCreateAttr(
        map_type=map_type, key_size=key, value_size=value, max_entries=entries, map_flags=flags
    )
    return _bpf(Cmd.MAP_CREATE, attr)


def _raw_tracepoint_open(prog_fd: int, name: bytes | None) -> int:
    buf = ctypes.create_string_buffer(name) if name is not None else None
    attr = _RawTracepointAttr(name=ctypes.addressof(buf) if buf is not None else 0, prog_fd=prog_fd)
    return _bpf(Cmd.RAW_TRACEPOINT_OPEN, attr)


def _perf_event_open(attr: _PerfEventAttr) -> int:
    attr.size = ctypes.sizeof(attr)
    fd = int(
        _libc.syscall(
            ctypes.c_long(_SYS_PERF_EVENT_OPEN),
            ctypes.byref(attr),
            ctypes.c_int(-1),
            ctypes.c_int(0),
            ctypes.c_int(-1),
            ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC),
        )
    )
    if fd < 0:
        raise ProbeFailed(ctypes.get_errno(), "perf_event_open")
    return fd


def _attach_perf(perf_fd: int, prog_fd: int) -> None:
    if _libc.ioctl(perf_fd, _PERF_EVENT_IOC_SET_BPF, prog_fd) < 0:
        raise ProbeFailed(ctypes.get_errno(), "PERF_EVENT_IOC_SET_BPF")


def _closing(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Individual probes: each returns None on success or a one-line reason on failure.

_PROG_RETURN = {ProgType.CGROUP_SOCK_ADDR: 1, ProgType.CGROUP_SKB: 1}
_PROG_ATTACH_TYPE = {
    ProgType.CGROUP_SOCK_ADDR: AttachType.CGROUP_INET4_CONNECT,
    ProgType.TRACING: AttachType.TRACE_FENTRY,
    ProgType.LSM: AttachType.LSM_MAC,
}
# The BTF function each BTF-attached type is probed against.
_BTF_TARGET = {ProgType.TRACING: "bpf_fentry_test1", ProgType.LSM: "bpf_lsm_file_open"}


def _btf_target(prog_type: ProgType) -> int:
    name = _BTF_TARGET.get(prog_type)
    if name is None:
        return 0
    try:
        type_id = find_type_id(BtfKind.FUNC, name)
    except (OSError, BtfError) as exc:
        raise ProbeFailed(errno.ENOENT, f"kernel BTF unreadable ({exc})") from None
    if type_id is None:
        raise ProbeFailed(errno.ENOENT, f"{name} not in kernel BTF")
    return type_id


def _load_trivial(prog_type: ProgType, body: bytes = b"") -> int:
    return load_program(
        prog_type,
        body + _return(_PROG_RETURN.get(prog_type, 0)),
        expected_attach_type=_PROG_ATTACH_TYPE.get(prog_type, 0),
        attach_btf_id=_btf_target(prog_type),
    )


def probe_prog_type(prog_type: ProgType) -> str | None:
    try:
        fd = _load_trivial(prog_type)
    except ProbeFailed as exc:
        return str(exc)
    _closing(fd)
    return None


def probe_map_type(name: str) -> str | None:
    map_type, key, value, entries, flags = MAP_TYPES[name]
    try:
        fd = create_map(map_type, key, value, entries, flags)
    except ProbeFailed as exc:
        return str(exc)
    _closing(fd)
    return None


_HELPER_MISSING = ("invalid func ", "unknown func ", "cannot use helper", "program of this type")


def probe_helper(helper: Helper, prog_type: ProgType) -> str | None:
    """Load a program that calls ``helper`` with arbitrary arguments, as libbpf does.

    Argument type errors from the verifier mean the helper exists; only the verifier's
    "unknown/invalid func" words mean it is missing for this program type.
    """
    try:
        fd = _load_trivial(prog_type, _insn(_CALL, imm=helper))
    except ProbeFailed as exc:
        said = [line for line in exc.log.splitlines() if any(w in line for w in _HELPER_MISSING)]
        if said:
            return f"{helper.name.lower()} from {prog_type.name.lower()}: {said[0].strip()}"
        if exc.errno == errno.EPERM:
            return str(exc)
        return None
    _closing(fd)
    return None


def _tracepoint_id(category: str, event: str) -> int:
    return int((TRACEFS / "events" / category / event / "id").read_text())


def probe_attach(kind: str) -> str | None:
    """Attach a trivial program for real and detach it at once."""
    try:
        if kind == "tracepoint":
            perf_attr = _PerfEventAttr(
                type=_PERF_TYPE_TRACEPOINT, config=_tracepoint_id("syscalls", "sys_enter_getpid")
            )
            perf_attr.sample_period = 1
            prog = _load_trivial(ProgType.TRACEPOINT)
            try:
                perf = _perf_event_open(perf_attr)
                try:
                    _attach_perf(perf, prog)
                finally:
                    _closing(perf)
            finally:
                _closing(prog)
        elif kind == "raw_tracepoint":
            prog = _load_trivial(ProgType.RAW_TRACEPOINT)
            try:
                _closing(_raw_tracepoint_open(prog, b"sys_enter"))
            finally:
                _closing(prog)
        elif kind == "kprobe":
            return _probe_kprobe_attach()
        elif kind in ("fentry", "lsm"):
            prog = _load_trivial(ProgType.TRACING if kind == "fentry" else ProgType.LSM)
            try:
                _closing(_raw_tracepoint_open(prog, None))
            finally:
                _closing(prog)
        else:
            raise ValueError(f"unknown attach kind {kind!r}")
    except ProbeFailed as exc:
        return str(exc)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _probe_kprobe_attach() -> str | None:
    """kprobes attach through the kprobe PMU or tracefs ``kprobe_events``; try the PMU for real."""
    if KPROBE_PMU_TYPE.exists():
        perf_attr = _PerfEventAttr(type=int(KPROBE_PMU_TYPE.read_text()))
        func = ctypes.create_string_buffer(b"do_sys_openat2")
        perf_attr.config1 = ctypes.addressof(func)
        perf_attr.sample_period = 1
        prog = _load_trivial(ProgType.KPROBE)
        try:
            perf = _perf_event_open(perf_attr)
            try:
                _attach_perf(perf, prog)
            finally:
                _closing(perf)
        finally:
            _closing(prog)
        return None
    if (TRACEFS / "kprobe_events").exists():
        return None
    return "no kprobe PMU and no kprobe_events in tracefs (kernel built without CONFIG_KPROBES)"


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelFeatures:
    """What the running kernel lets this process do with BPF; a missing entry has a reason."""

    kernel_release: str
    privileged: bool
    btf: bool
    prog_types: Mapping[str, bool]
    map_types: Mapping[str, bool]
    helpers: Mapping[str, bool]
    attach: Mapping[str, bool]
    reasons: Mapping[str, str] = field(default_factory=dict)

    @property
    def capabilities(self) -> dict[str, bool]:
        """The coarse features policies ask for, derived from the detailed probes."""
        return {
            "kprobe": self.prog_types.get("kprobe", False) and self.attach.get("kprobe", False),
            "lsm": self.attach.get("lsm", False),
            "fentry": self.attach.get("fentry", False),
            "override_return": self.helpers.get("bpf_override_return", False)
            and self.attach.get("kprobe", False),
            "send_signal": self.helpers.get("bpf_send_signal", False),
            "sk_assign": self.helpers.get("bpf_sk_assign", False),
            "ringbuf": self.map_types.get("ringbuf", False)
            and self.helpers.get("bpf_ringbuf_output", False),
            "lpm_trie": self.map_types.get("lpm_trie", False),
            "lru_hash": self.map_types.get("lru_hash", False),
            "tc": self.prog_types.get("sched_cls", False),
            "xdp": self.prog_types.get("xdp", False),
            "cgroup_sock_addr": self.prog_types.get("cgroup_sock_addr", False),
            "tracepoint": self.attach.get("tracepoint", False),
            "raw_tracepoint": self.attach.get("raw_tracepoint", False),
            "btf": self.btf,
        }

    def flat(self) -> dict[str, bool]:
        """Every feature under one name: capabilities bare, details as ``group:name``."""
        out = dict(self.capabilities)
        for group, table in (
            ("prog_type", self.prog_types),
            ("map_type", self.map_types),
            ("helper", self.helpers),
            ("attach", self.attach),
        ):
            out.update({f"{group}:{name}": ok for name, ok in table.items()})
        return out

    def has(self, name: str) -> bool:
        flat = self.flat()
        if name not in flat:
            raise KeyError(f"unknown kernel feature {name!r}; known: {', '.join(sorted(flat))}")
        return flat[name]

    def reason(self, name: str) -> str:
        """Why ``name`` is missing, as far as the probes could tell."""
        if name in self.reasons:
            return self.reasons[name]
        related = {
            "kprobe": "attach:kprobe",
            "lsm": "attach:lsm",
            "fentry": "attach:fentry",
            "override_return": "attach:kprobe",
            "send_signal": "helper:bpf_send_signal",
            "sk_assign": "helper:bpf_sk_assign",
            "ringbuf": "map_type:ringbuf",
            "lpm_trie": "map_type:lpm_trie",
            "lru_hash": "map_type:lru_hash",
            "tc": "prog_type:sched_cls",
            "xdp": "prog_type:xdp",
            "cgroup_sock_addr": "prog_type:cgroup_sock_addr",
            "tracepoint": "attach:tracepoint",
            "raw_tracepoint": "attach:raw_tracepoint",
        }.get(name)
        if related and related in self.reasons:
            return self.reasons[related]
        return "not offered by this kernel"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kernel_release": self.kernel_release,
            "privileged": self.privileged,
            "btf": self.btf,
            "capabilities": self.capabilities,
            "prog_types": dict(self.prog_types),
            "map_types": dict(self.map_types),
            "helpers": dict(self.helpers),
            "attach": dict(self.attach),
            "reasons": dict(self.reasons),
        }


class MissingKernelFeature(RuntimeError):
    """A policy or component needs a kernel feature this host does not offer."""

    def __init__(self, name: str, reason: str = "") -> None:
        description = CAPABILITIES.get(name, name)
        message = f"kernel feature {name!r} ({description}) is not available on this host"
        if reason:
            message += f": {reason}"
        super().__init__(message)
        self.name = name
        self.reason = reason


def _run_table(
    names: Mapping[str, Any], probe: Callable[[str], str | None], group: str
) -> tuple[dict[str, bool], dict[str, str]]:
    results: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    for name in names:
        reason = probe(name)
        results[name] = reason is None
        if reason is not None:
            reasons[f"{group}:{name}"] = reason
    return results, reasons


def probe_kernel() -> KernelFeatures:
    """Run every probe now (uncached); about a few tens of milliseconds as root."""
    reasons: dict[str, str] = {}
    prog_types, r = _run_table(PROG_TYPES, lambda n: probe_prog_type(PROG_TYPES[n]), "prog_type")
    reasons.update(r)
    map_types, r = _run_table(MAP_TYPES, probe_map_type, "map_type")
    reasons.update(r)
    helpers, r = _run_table(HELPERS, lambda n: probe_helper(*HELPERS[n]), "helper")
    reasons.update(r)
    attach, r = _run_table(dict.fromkeys(ATTACH_KINDS), probe_attach, "attach")
    reasons.update(r)
    btf = VMLINUX_BTF.is_file()
    if not btf:
        reasons["btf"] = f"{VMLINUX_BTF} missing (kernel built without CONFIG_DEBUG_INFO_BTF)"
    return KernelFeatures(
        kernel_release=platform.release(),
        privileged=os.geteuid() == 0,
        btf=btf,
        prog_types=prog_types,
        map_types=map_types,
        helpers=helpers,
        attach=attach,
        reasons=reasons,
    )


@functools.cache
def kernel_features() -> KernelFeatures:
    """The probe results for this process, computed once."""
    return probe_kernel()


def require(name: str, features: KernelFeatures | None = None) -> None:
    """Raise MissingKernelFeature unless ``name`` (see ``KernelFeatures.flat``) is available."""
    found = features if features is not None else kernel_features()
    if not found.has(name):
        raise MissingKernelFeature(name, found.reason(name))
