"""Kernel struct member offsets from ``bpftool btf dump ... format raw`` text, sans-io.

The installed kernel headers are older than the running kernel, so the BPF C text never takes a
struct layout from them: every kernel field the programs read is at an offset looked up here in
the running kernel's BTF and filled into the C text as a number.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_TYPE_RE = re.compile(r"^\[(?P<id>\d+)\] (?P<kind>[A-Z_0-9]+) '(?P<name>[^']*)'(?P<rest>.*)$")
_MEMBER_RE = re.compile(
    r"^\s+'(?P<name>[^']*)' type_id=(?P<type>\d+) bits_offset=(?P<bits>\d+)"
)
_REF_RE = re.compile(r"\btype_id=(\d+)")
_PASS_THROUGH = {"TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"}


class BtfLookupError(KeyError):
    """A struct or member the programs need is not in this kernel's BTF."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "BTF lookup failed"


@dataclass
class BtfIndex:
    kinds: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    refs: dict[int, int] = field(default_factory=dict)
    members: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)
    structs: dict[str, int] = field(default_factory=dict)

    def _resolve(self, type_id: int) -> int:
        seen = 0
        while self.kinds.get(type_id) in _PASS_THROUGH and seen < 32:
            type_id = self.refs[type_id]
            seen += 1
        return type_id

    def _find(self, type_id: int, name: str) -> int | None:
        """Bit offset of ``name`` in a struct/union, searching anonymous members too."""
        for mname, _mtype, bits in self.members.get(type_id, []):
            if mname == name:
                return bits
        for mname, mtype, bits in self.members.get(type_id, []):
            if mname == "(anon)":
                inner = self._find(self._resolve(mtype), name)
                if inner is not None:
                    return bits + inner
        return None

    def _member_type(self, type_id: int, name: str) -> int | None:
        for mname, mtype, _bits in self.members.get(type_id, []):
            if mname == name:
                return self._resolve(mtype)
        for mname, mtype, _bits in self.members.get(type_id, []):
            if mname == "(anon)":
                found = self._member_type(self._resolve(mtype), name)
                if found is not None:
                    return found
        return None

    def offset(self, path: str) -> int:
        """Byte offset of ``struct.member[.member...]`` (members embedded, not pointed to)."""
        struct_name, _, rest = path.partition(".")
        if struct_name not in self.structs:
            raise BtfLookupError(f"struct {struct_name} is not in the kernel's BTF")
        type_id = self.structs[struct_name]
        total = 0
        for part in rest.split("."):
            bits = self._find(type_id, part)
            if bits is None:
                raise BtfLookupError(f"{path}: no member {part!r} in the kernel's BTF")
            if bits % 8:
                raise BtfLookupError(f"{path}: {part!r} is a bit field")
            total += bits // 8
            next_type = self._member_type(type_id, part)
            type_id = next_type if next_type is not None else 0
        return total


def parse_btf(text: str, only: Iterable[str] | None = None) -> BtfIndex:
    """Index the raw dump; ``only`` (struct names) limits which named structs are kept by name."""
    wanted = set(only) if only is not None else None
    index = BtfIndex()
    current: int | None = None
    for line in text.splitlines():
        if line.startswith("["):
            m = _TYPE_RE.match(line)
            current = None
            if not m:
                continue
            type_id, kind, name = int(m["id"]), m["kind"], m["name"]
            index.kinds[type_id] = kind
            if kind in _PASS_THROUGH:
                ref = _REF_RE.search(m["rest"])
                if ref:
                    index.refs[type_id] = int(ref.group(1))
            elif kind in ("STRUCT", "UNION"):
                current = type_id
                index.members[type_id] = []
                if name != "(anon)" and name not in index.structs and (
                    wanted is None or name in wanted
                ):
                    index.structs[name] = type_id
        elif current is not None:
            mm = _MEMBER_RE.match(line)
            if mm:
                index.members[current].append((mm["name"], int(mm["type"]), int(mm["bits"])))
    return index


def resolve_offsets(text: str, paths: Iterable[str]) -> dict[str, int]:
    """``{"task_struct.real_parent": 1280, ...}`` for every requested path, or BtfLookupError."""
    wanted = list(paths)
    index = parse_btf(text, only={p.partition(".")[0] for p in wanted})
    return {p: index.offset(p) for p in wanted}
