"""Which pod labels become security labels: Cilium's label filter, rules as data.

Cilium keeps identity-relevant labels and drops labels that change per pod (pod-template-hash,
controller-uid, ...) or belong to Kubernetes itself, so that replicas share one identity.
A rule is a regular expression searched in the label key (as Cilium does, unanchored); when
several rules match a key, the longest pattern wins, so a specific include such as
``io\\.kubernetes\\.pod\\.namespace`` beats the broad exclude ``io\\.kubernetes``. Labels with the
``reserved`` source are always kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ciliate.labels.model import Label


@dataclass(frozen=True)
class FilterRule:
    """One pattern; ``include=False`` drops matching keys. Written ``!pattern`` in config."""

    pattern: str
    include: bool = True
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    @classmethod
    def parse(cls, text: str) -> FilterRule:
        """``app`` includes keys containing ``app``; ``!foo`` excludes them."""
        if text.startswith("!"):
            return cls(text[1:], include=False)
        return cls(text, include=True)

    def matches(self, key: str) -> bool:
        return self.regex.search(key) is not None

    def __str__(self) -> str:
        return self.pattern if self.include else f"!{self.pattern}"


DEFAULT_RULES: tuple[FilterRule, ...] = tuple(
    FilterRule.parse(text)
    for text in (
        # Labels Cilium derives itself: always part of the identity.
        r"io\.kubernetes\.pod\.namespace",
        r"io\.cilium\.k8s\.namespace\.labels",
        r"io\.cilium\.k8s\.policy",
        r"app\.kubernetes\.io",
        # Kubernetes' own and per-pod labels: never part of the identity.
        r"!io\.kubernetes",
        r"!kubernetes\.io",
        r"!.*beta\.kubernetes\.io",
        r"!k8s\.io",
        r"!statefulset\.kubernetes\.io/pod-name",
        r"!apps\.kubernetes\.io/pod-index",
        r"!batch\.kubernetes\.io/job-completion-index",
        r"!batch\.kubernetes\.io/controller-uid",
        r"!pod-template-generation",
        r"!pod-template-hash",
        r"!controller-revision-hash",
        r"!controller-uid",
        r"!annotation.*",
        r"!etcd_node",
    )
)
"""Cilium's default label prefixes (``--label-prefix-file`` unset)."""


@dataclass(frozen=True)
class LabelFilter:
    """Decides which labels are security-relevant.

    ``only_included``: when the user configured include patterns of their own, a label that no
    rule matches is dropped (Cilium's behaviour); otherwise it is kept.
    """

    rules: tuple[FilterRule, ...] = DEFAULT_RULES
    only_included: bool = False

    @classmethod
    def default(cls) -> LabelFilter:
        return cls()

    @classmethod
    def from_patterns(cls, patterns: Sequence[str], *, keep_defaults: bool = True) -> LabelFilter:
        """Build a filter from Cilium-style patterns (``app``, ``!team``) plus the defaults."""
        user = tuple(FilterRule.parse(p) for p in patterns)
        only_included = any(rule.include for rule in user)
        rules = user + (DEFAULT_RULES if keep_defaults else ())
        return cls(rules=rules, only_included=only_included)

    def keep(self, label: Label) -> bool:
        if label.source == "reserved":
            return True
        best: FilterRule | None = None
        for rule in self.rules:
            if rule.matches(label.key) and (best is None or len(rule.pattern) > len(best.pattern)):
                best = rule
        if best is None:
            return not self.only_included
        return best.include

    def keep_key(self, key: str, source: str = "k8s") -> bool:
        return self.keep(Label(source, key))

    def filter(self, labels: Iterable[Label]) -> list[Label]:
        return [label for label in labels if self.keep(label)]


DEFAULT_FILTER = LabelFilter()
