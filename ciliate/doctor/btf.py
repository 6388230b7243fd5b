"""A minimal reader of the kernel's BTF blob: enough to find a type's id by kind and name.

The fentry and LSM probes need the BTF id of a kernel function to load at all; bpftool and
libbpf are not importable from Python, and the format is simple enough to walk directly.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F


class BtfKind(IntEnum):
    """BTF type kinds (include/uapi/linux/btf.h)."""

    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Bytes that follow the 12-byte common header: (fixed, per vlen entry).
_TRAILER: dict[int, tuple[int, int]] = {
    BtfKind.INT: (4, 0),
    BtfKind.ARRAY: (12, 0),
    BtfKind.STRUCT: (0, 12),
    BtfKind.UNION: (0, 12),
    BtfKind.ENUM: (0, 8),
    BtfKind.FUNC_PROTO: (0, 8),
    BtfKind.VAR: (4, 0),
    BtfKind.DATASEC: (0, 12),
    BtfKind.DECL_TAG: (4, 0),
    BtfKind.ENUM64: (0, 12),
}


class BtfError(ValueError):
    """The blob is not BTF this reader understands."""


def find_type_id(kind: BtfKind, name: str, path: Path = VMLINUX_BTF) -> int | None:
    """The id of the first type of ``kind`` called ``name``, or None when there is none."""
    data = path.read_bytes()
    if len(data) < 24:
        raise BtfError(f"{path}: too short for a BTF header")
    magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
    if magic != BTF_MAGIC:
        raise BtfError(f"{path}: bad magic {magic:#x}")
    type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
    strings_start = hdr_len + str_off
    strings = data[strings_start : strings_start + str_len]
    needle = b"\0" + name.encode() + b"\0"
    found = strings.find(needle)
    if found < 0:
        return None
    name_off = found + 1
    pos = hdr_len + type_off
    end = pos + type_len
    type_id = 1
    unpack = struct.Struct("<III").unpack_from
    while pos < end:
        t_name_off, info, _size = unpack(data, pos)
        t_kind = (info >> 24) & 0x1F
        if t_kind == kind and t_name_off == name_off:
            return type_id
        fixed, per_entry = _TRAILER.get(t_kind, (0, 0))
        pos += 12 + fixed + per_entry * (info & 0xFFFF)
        type_id += 1
    return None
