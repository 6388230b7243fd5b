"""Decode the records the BPF programs write (layout defined in bpf/common.h), sans-io."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

PATH_LEN = 256
ARGS_LEN = 512
CWD_DEPTH = 16
NAME_LEN = 64
TP_MAX_ARGS = 5
TP_STR_LEN = 256

_HDR = struct.Struct("<IIIIQQIIIIQ")
HDR_SIZE = _HDR.size  # 56
EXEC_SIZE = HDR_SIZE + PATH_LEN + ARGS_LEN + CWD_DEPTH * NAME_LEN
TP_SIZE = HDR_SIZE + 8 * TP_MAX_ARGS + TP_MAX_ARGS * TP_STR_LEN


class EventKind(IntEnum):
    EXEC = 1
    EXIT = 2
    FORK = 3
    TRACEPOINT = 4


@dataclass(frozen=True)
class Header:
    kind: EventKind
    pid: int
    tid: int
    ppid: int
    ktime: int
    cgroup_id: int
    uid: int
    aux0: int
    aux1: int
    aux2: int
    exec_ktime: int


@dataclass(frozen=True)
class ExecRecord:
    header: Header
    binary: str
    args: list[str]  # argv, argv[0] included
    cwd: str


@dataclass(frozen=True)
class ExitRecord:
    header: Header

    @property
    def code(self) -> int:
        return self.header.aux0

    @property
    def signal(self) -> int:
        return self.header.aux1


@dataclass(frozen=True)
class ForkRecord:
    header: Header


@dataclass(frozen=True)
class TracepointRecord:
    header: Header
    ints: tuple[int, ...]
    strs: tuple[str, ...]

    @property
    def policy_id(self) -> int:
        return self.header.aux0

    @property
    def hook_index(self) -> int:
        return self.header.aux1 >> 8

    @property
    def selector_index(self) -> int:
        return self.header.aux1 & 0xFF

    @property
    def action_code(self) -> int:
        return self.header.aux2


Record = ExecRecord | ExitRecord | ForkRecord | TracepointRecord


class WireError(ValueError):
    """A record too short for its kind: a layout mismatch between C and Python."""


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def cwd_from_components(components: list[str]) -> str:
    """Components come leaf first from the kernel; an empty list is the root."""
    parts = [c for c in components if c and c != "/"]
    return "/" + "/".join(reversed(parts))


def decode(data: bytes) -> Record:
    if len(data) < HDR_SIZE:
        raise WireError(f"record of {len(data)} bytes is shorter than the header")
    fields = _HDR.unpack_from(data, 0)
    try:
        kind = EventKind(fields[0])
    except ValueError:
        raise WireError(f"unknown record kind {fields[0]}") from None
    header = Header(kind, *fields[1:])
    if kind is EventKind.EXEC:
        if len(data) < EXEC_SIZE:
            raise WireError(f"exec record of {len(data)} bytes, expected {EXEC_SIZE}")
        pos = HDR_SIZE
        binary = _cstr(data[pos : pos + PATH_LEN])
        pos += PATH_LEN
        arg_bytes = data[pos : pos + min(header.aux2, ARGS_LEN)]
        args = [a.decode(errors="replace") for a in arg_bytes.split(b"\0")]
        if args and args[-1] == "":
            args.pop()
        pos += ARGS_LEN
        components: list[str] = []
        for i in range(CWD_DEPTH):
            name = _cstr(data[pos + i * NAME_LEN : pos + (i + 1) * NAME_LEN])
            if not name:
                break
            components.append(name)
        return ExecRecord(header, binary, args, cwd_from_components(components))
    if kind is EventKind.EXIT:
        return ExitRecord(header)
    if kind is EventKind.FORK:
        return ForkRecord(header)
    if len(data) < TP_SIZE:
        raise WireError(f"tracepoint record of {len(data)} bytes, expected {TP_SIZE}")
    ints = struct.unpack_from(f"<{TP_MAX_ARGS}Q", data, HDR_SIZE)
    base = HDR_SIZE + 8 * TP_MAX_ARGS
    strs = tuple(
        _cstr(data[base + i * TP_STR_LEN : base + (i + 1) * TP_STR_LEN])
        for i in range(TP_MAX_ARGS)
    )
    return TracepointRecord(header, ints, strs)
