"""Kubernetes label-selector syntax over Cilium's source-prefixed labels, as Hubble's
``--label`` filter reads it: ``app=x``, ``k8s:app in (a,b)``, ``!canary``, comma = AND.

A key without a source (``app``) matches a label from any source; ``k8s:app`` only the k8s one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LabelIndex = dict[str, list[tuple[str, str]]]
"""key → [(source, value)] for one endpoint's labels."""

_REQ = re.compile(
    r"""\s*(?:
        (?P<notkey>!)\s*(?P<nk>[^\s,!=()]+)
      | (?P<key>[^\s,!=()]+)\s*(?:
            (?P<op>==|=|!=)\s*(?P<value>[^\s,()]*)
          | \s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\)
        )?
    )\s*(?:,|$)""",
    re.VERBOSE,
)


class SelectorError(ValueError):
    pass


def index_labels(labels: Sequence[str]) -> LabelIndex:
    """Index ``source:key=value`` labels by key."""
    out: LabelIndex = {}
    for text in labels:
        source, _, rest = text.partition(":") if ":" in text.split("=", 1)[0] else ("", "", text)
        key, _, value = rest.partition("=")
        out.setdefault(key, []).append((source, value))
    return out


@dataclass(frozen=True, slots=True)
class _Requirement:
    source: str
    key: str
    op: str  # exists, !exists, in, notin
    values: frozenset[str]

    def matches(self, idx: LabelIndex) -> bool:
        found = [v for s, v in idx.get(self.key, ()) if not self.source or s == self.source]
        if self.op == "exists":
            return bool(found)
        if self.op == "!exists":
            return not found
        if self.op == "in":
            return any(v in self.values for v in found)
        return not any(v in self.values for v in found)  # notin / != : absent key matches


def _split_key(key: str) -> tuple[str, str]:
    if ":" in key:
        source, _, name = key.partition(":")
        return ("" if source == "any" else source), name
    return "", key


def parse_selector(text: str) -> Callable[[LabelIndex], bool]:
    """Compile a selector to a predicate over an indexed label set."""
    reqs: list[_Requirement] = []
    pos = 0
    text = text.strip()
    if not text:
        raise SelectorError("empty label selector")
    while pos < len(text):
        m = _REQ.match(text, pos)
        if m is None or m.end() == pos:
            raise SelectorError(f"invalid label selector {text!r} at offset {pos}")
        pos = m.end()
        if m.group("notkey"):
            src, key = _split_key(m.group("nk"))
            reqs.append(_Requirement(src, key, "!exists", frozenset()))
            continue
        src, key = _split_key(m.group("key"))
        if m.group("op"):
            op = "notin" if m.group("op") == "!=" else "in"
            reqs.append(_Requirement(src, key, op, frozenset({m.group("value")})))
        elif m.group("setop"):
            values = frozenset(v.strip() for v in m.group("values").split(",") if v.strip())
            reqs.append(_Requirement(src, key, m.group("setop"), values))
        else:
            reqs.append(_Requirement(src, key, "exists", frozenset()))
    frozen = tuple(reqs)

    def match(idx: LabelIndex) -> bool:
        return all(r.matches(idx) for r in frozen)

    return match
