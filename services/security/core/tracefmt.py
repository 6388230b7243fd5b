"""Parse a tracepoint's ``format`` file (tracefs text) into typed fields, sans-io.

Tetragon numbers tracepoint arguments by their position in this file, common fields included
(``common_type`` is index 0), so the parsed field list keeps that order. The caller reads the
text (``/sys/kernel/tracing/events/<subsystem>/<event>/format``) and passes it in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class FieldKind(StrEnum):
    """How the BPF program reads a field, decided from its C type."""

    INT = "int"
    USER_STRING = "user_string"  # a `char *` into user memory (syscall tracepoints)
    DATA_LOC_STRING = "data_loc_string"  # `__data_loc char[]`: offset/len into the record
    CHAR_ARRAY = "char_array"  # `char comm[16]`: bytes inside the record
    POINTER = "pointer"  # any other pointer: read as an integer address


@dataclass(frozen=True)
class FormatField:
    index: int
    name: str
    ctype: str
    offset: int
    size: int
    signed: bool
    kind: FieldKind
    array_len: int = 0

    @property
    def is_string(self) -> bool:
        return self.kind in (
            FieldKind.USER_STRING,
            FieldKind.DATA_LOC_STRING,
            FieldKind.CHAR_ARRAY,
        )


@dataclass(frozen=True)
class TracepointFormat:
    subsystem: str
    event: str
    tp_id: int
    fields: tuple[FormatField, ...]

    def field(self, index: int) -> FormatField | None:
        return self.fields[index] if 0 <= index < len(self.fields) else None


class FormatError(ValueError):
    """The text is not a tracefs format file."""


_FIELD_RE = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"\s*signed:(?P<signed>\d+);"
)
_DECL_RE = re.compile(r"^(?P<ctype>.*?)\s*(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*(\[(?P<len>\d*)\])?$")


def _classify(ctype: str, array_len: str | None) -> FieldKind:
    compact = ctype.replace(" ", "")
    if compact.startswith("__data_loc"):
        return FieldKind.DATA_LOC_STRING
    if array_len is not None and compact.endswith("char"):
        return FieldKind.CHAR_ARRAY
    if compact.endswith("char*"):
        return FieldKind.USER_STRING
    if "*" in compact:
        return FieldKind.POINTER
    return FieldKind.INT


def parse_format(text: str, subsystem: str = "", event: str = "") -> TracepointFormat:
    """All fields of a format file, in file order (Tetragon's tracepoint argument index)."""
    fields: list[FormatField] = []
    tp_id = 0
    name = event
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("name:"):
            name = stripped.split(":", 1)[1].strip()
        elif stripped.startswith("ID:"):
            tp_id = int(stripped.split(":", 1)[1])
        match = _FIELD_RE.match(line)
        if not match:
            continue
        decl = match["decl"].strip()
        if decl.startswith("__data_loc"):
            # "__data_loc char[] filename": the brackets belong to the type, not the name.
            ctype, _, fname = decl.rpartition(" ")
            array_len = None
        else:
            dm = _DECL_RE.match(decl)
            if not dm:
                raise FormatError(f"cannot read field declaration {decl!r}")
            ctype, fname, array_len = dm["ctype"], dm["name"], dm["len"]
        fields.append(
            FormatField(
                index=len(fields),
                name=fname,
                ctype=ctype.strip(),
                offset=int(match["offset"]),
                size=int(match["size"]),
                signed=match["signed"] == "1",
                kind=_classify(ctype, array_len),
                array_len=int(array_len) if array_len else 0,
            )
        )
    if not fields:
        raise FormatError("no fields found: not a tracepoint format file")
    return TracepointFormat(subsystem=subsystem, event=name, tp_id=tp_id, fields=tuple(fields))
