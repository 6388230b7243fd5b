"""A label is ``source:key=value``; identities are functions of sorted label sets."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

DEFAULT_SOURCE = "k8s"
KNOWN_SOURCES = frozenset({"k8s", "reserved", "cidr", "fqdn", "unspec", "any", "container"})


@dataclass(frozen=True, order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        tail = f"={self.value}" if self.value != "" else ""
        return f"{self.source}:{self.key}{tail}"


def parse_label(text: str, default_source: str = DEFAULT_SOURCE) -> Label:
    """Parse ``k8s:app=web``, ``reserved:host`` or ``app=web`` (source defaulted).

    A key may itself contain ``:`` only after a known source prefix, so ``a:b=c`` with an
    unknown ``a`` is read as the key ``a:b`` under the default source.
    """
    source = default_source
    rest = text
    head, sep, tail = text.partition(":")
    if sep and head in KNOWN_SOURCES:
        source, rest = head, tail
    key, _, value = rest.partition("=")
    return Label(source, key, value)


class LabelSet(frozenset[Label]):
    """An immutable set of labels with a canonical, order-independent string form."""

    @classmethod
    def from_strings(cls, labels: Iterable[str]) -> LabelSet:
        return cls(parse_label(s) for s in labels)

    @classmethod
    def from_k8s(cls, labels: Mapping[str, str], source: str = DEFAULT_SOURCE) -> LabelSet:
        return cls(Label(source, k, v) for k, v in labels.items())

    def sorted_strings(self) -> list[str]:
        return [str(label) for label in sorted(self)]

    def canonical(self) -> str:
        """The key the identity allocator stores: sorted labels joined by ``;``."""
        return ";".join(self.sorted_strings())

    def as_dict(self) -> dict[str, str]:
        """Key -> value, ignoring sources (what selectors match against)."""
        return {label.key: label.value for label in self}
