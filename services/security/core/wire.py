"""Decode the records the BPF programs write (layout defined in bpf/common.h), sans-io."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

PATH_LEN = 256
ARGS_LEN = 512
CWD_LEN = 256
TP_MAX_ARGS = 5
TP_STR_LEN = 256
EXEC_TRUNC_ARGS = 1
EXEC_TRUNC_CWD = 2

_HDR = struct.Struct("<IIIIQQIIIIQ")
HDR_SIZE = _HDR.size  # 56
_EXEC_LENS = struct.Struct("<HHHH")  # binary_len, args_len, cwd_len, flags
EXEC_FIXED_SIZE = HDR_SIZE + _EXEC_LENS.size
"""An exec record is this plus the used bytes of binary, args and cwd (variable size)."""
EXEC_MAX_SIZE = EXEC_FIXED_SIZE + PATH_LEN + ARGS_LEN + CWD_LEN
TP_SIZE = HDR_SIZE + 8 * TP_MAX_ARGS + TP_MAX_ARGS * TP_STR_LEN


class EventKind(IntEnum):
    EXEC = 1
    EXIT = 2
    FORK = 3
    TRACEPOINT = 4


class Header(NamedTuple):
    """A tuple, not a dataclass: one is built per record, so construction cost matters."""

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
    flags: int = 0  # EXEC_TRUNC_*


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


_KINDS = {k.value: k for k in EventKind}
_unpack_hdr = _HDR.unpack_from
_unpack_lens = _EXEC_LENS.unpack_from


def decode(data: bytes) -> Record:
    if len(data) < HDR_SIZE:
        raise WireError(f"record of {len(data)} bytes is shorter than the header")
    fields = _unpack_hdr(data, 0)
    kind = _KINDS.get(fields[0])
    if kind is None:
        raise WireError(f"unknown record kind {fields[0]}")
    header = Header(kind, *fields[1:])
    if kind is EventKind.EXEC:
        if len(data) < EXEC_FIXED_SIZE:
            raise WireError(f"exec record of {len(data)} bytes, expected {EXEC_FIXED_SIZE}+")
        binary_len, args_len, cwd_len, flags = _unpack_lens(data, HDR_SIZE)
        end = EXEC_FIXED_SIZE + binary_len + args_len + cwd_len
        if len(data) < end:
            raise WireError(f"exec record of {len(data)} bytes, its lengths need {end}")
        pos = EXEC_FIXED_SIZE
        binary = data[pos : pos + binary_len].decode(errors="replace")
        pos += binary_len
        args = data[pos : pos + args_len].decode(errors="replace").split("\0")
        if args and args[-1] == "":
            args.pop()
        pos += args_len
        cwd = data[pos : pos + cwd_len].decode(errors="replace") or "/"
        return ExecRecord(header, binary, args, cwd, flags)
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


def decode_batch(raws: list[bytes]) -> tuple[list[Record], int]:
    """Decode what one poll read; returns the records and how many were undecodable."""
    out: list[Record] = []
    bad = 0
    for raw in raws:
        try:
            out.append(decode(raw))
        except WireError:
            bad += 1
    return out, bad
