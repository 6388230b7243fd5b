"""Kubernetes label selectors: the model users write, validated, and a compiled matcher.

Keys may carry a Cilium label source (``k8s:app``, ``reserved:host``, ``any:app``); a key with no
source, or with ``any:``, matches a label of any source. Validation follows Kubernetes' rules for
qualified names and label values and names the offending field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import Field, model_validator

from ciliate.labels.model import KNOWN_SOURCES, Label
from ciliate.resources.base import FieldError, Model, ResourceError

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_NAME_RE = re.compile(rf"^{_NAME}$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
ANY_SOURCE = "any"


class Operator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


def split_source(key: str) -> tuple[str | None, str]:
    """``k8s:app`` -> ("k8s", "app"); ``app`` and ``any:app`` -> (None, "app")."""
    head, sep, tail = key.partition(":")
    if sep and head in KNOWN_SOURCES:
        return (None if head == ANY_SOURCE else head), tail
    return None, key


def label_key_error(key: str) -> str | None:
    """Why ``key`` is not a valid (optionally source-prefixed) label key, or None."""
    source, bare = split_source(key)
    if source == "reserved" or source == "cidr":
        return None if bare else "must not be empty"
    prefix, sep, name = bare.rpartition("/")
    if sep:
        if not prefix:
            return "prefix part must be non-empty"
        if len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix):
            return f"prefix part {prefix!r} must be a DNS subdomain (lowercase, at most 253 chars)"
    if not name:
        return "name part must be non-empty"
    if len(name) > 63:
        return "name part must be no more than 63 characters"
    if not _NAME_RE.match(name):
        return (
            f"name part {name!r} must consist of alphanumerics, '-', '_' or '.', "
            "and start and end with an alphanumeric"
        )
    return None


def label_value_error(value: str) -> str | None:
    if value == "":
        return None
    if len(value) > 63:
        return "must be no more than 63 characters"
    if not _NAME_RE.match(value):
        return (
            f"{value!r} must consist of alphanumerics, '-', '_' or '.', "
            "and start and end with an alphanumeric"
        )
    return None


class LabelSelectorRequirement(Model):
    key: str
    operator: Operator
    values: list[str] = Field(default_factory=list)


class LabelSelector(Model):
    """``matchLabels`` and ``matchExpressions`` ANDed; an empty selector selects everything."""

    matchLabels: dict[str, str] = Field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_empty(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, dict):
            data = dict(data)
            for name in ("matchLabels", "matchExpressions"):
                if name in data and data[name] is None:
                    del data[name]
        return data

    def field_errors(self, path: str = "") -> list[FieldError]:
        """Kubernetes validation of every key, value and operator/values pairing."""
        base = f"{path}." if path else ""
        errors: list[FieldError] = []
        for key, value in self.matchLabels.items():
            if (why := label_key_error(key)) is not None:
                errors.append(FieldError(f"{base}matchLabels.{key}", f"invalid label key: {why}"))
            if (why := label_value_error(value)) is not None:
                errors.append(FieldError(f"{base}matchLabels.{key}", f"invalid label value: {why}"))
        for i, req in enumerate(self.matchExpressions):
            where = f"{base}matchExpressions[{i}]"
            if (why := label_key_error(req.key)) is not None:
                errors.append(FieldError(f"{where}.key", f"invalid label key: {why}"))
            if req.operator in (Operator.IN, Operator.NOT_IN) and not req.values:
                errors.append(
                    FieldError(f"{where}.values", f"must be non-empty for operator {req.operator}")
                )
            if req.operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and req.values:
                errors.append(
                    FieldError(f"{where}.values", f"must be empty for operator {req.operator}")
                )
            for j, value in enumerate(req.values):
                if (why := label_value_error(value)) is not None:
                    errors.append(FieldError(f"{where}.values[{j}]", f"invalid label value: {why}"))
        return errors

    def validate_or_raise(self, path: str = "") -> None:
        if errors := self.field_errors(path):
            raise ResourceError(errors)

    def compile(self) -> CompiledSelector:
        reqs: list[Requirement] = []
        for key, value in self.matchLabels.items():
            source, bare = split_source(key)
            reqs.append(Requirement(source, bare, Operator.IN, frozenset({value})))
        for expr in self.matchExpressions:
            source, bare = split_source(expr.key)
            reqs.append(Requirement(source, bare, expr.operator, frozenset(expr.values)))
        return CompiledSelector(tuple(sorted(reqs)))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self.compile().matches(labels)


@dataclass(frozen=True)
class Requirement:
    source: str | None
    key: str
    operator: Operator
    values: frozenset[str]

    def __lt__(self, other: object) -> bool:  # deterministic order for canonical selectors
        if not isinstance(other, Requirement):
            return NotImplemented
        return self._sort_key() < other._sort_key()

    def _sort_key(self) -> tuple[str, str, str, tuple[str, ...]]:
        return (self.source or "", self.key, self.operator.value, tuple(sorted(self.values)))

    def holds(self, present: bool, value: str | None) -> bool:
        if self.operator is Operator.EXISTS:
            return present
        if self.operator is Operator.DOES_NOT_EXIST:
            return not present
        if self.operator is Operator.IN:
            return present and value in self.values
        return not present or value not in self.values

    def __str__(self) -> str:
        key = f"{self.source}:{self.key}" if self.source else self.key
        if self.operator is Operator.IN and len(self.values) == 1:
            return f"{key}={next(iter(self.values))}"
        if self.operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
            return f"{key} {self.operator}"
        return f"{key} {self.operator} ({','.join(sorted(self.values))})"


@dataclass(frozen=True)
class CompiledSelector:
    """A hashable, canonical selector: equal selectors compare equal (the selector-cache key)."""

    requirements: tuple[Requirement, ...] = ()

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    def with_requirement(self, req: Requirement) -> CompiledSelector:
        return CompiledSelector(tuple(sorted({*self.requirements, req})))

    def and_(self, other: CompiledSelector) -> CompiledSelector:
        return CompiledSelector(tuple(sorted({*self.requirements, *other.requirements})))

    def mentions(self, key: str) -> bool:
        return any(req.key == key for req in self.requirements)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Match plain ``key -> value`` labels; keys may also be written ``source:key``."""
        for req in self.requirements:
            value: str | None = labels.get(req.key)
            if value is None and req.source is not None:
                value = labels.get(f"{req.source}:{req.key}")
            if not req.holds(value is not None, value):
                return False
        return True

    def matches_labels(self, labels: Iterable[Label]) -> bool:
        """Match a security label set, honouring each requirement's source."""
        index: dict[str, list[Label]] = {}
        for label in labels:
            index.setdefault(label.key, []).append(label)
        for req in self.requirements:
            found = [
                lbl
                for lbl in index.get(req.key, ())
                if req.source is None or lbl.source == req.source
            ]
            if req.operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
                ok = req.holds(bool(found), None)
            elif req.operator is Operator.IN:
                ok = any(lbl.value in req.values for lbl in found)
            else:
                ok = not any(lbl.value in req.values for lbl in found)
            if not ok:
                return False
        return True

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"


class ValidatedLabelSelector(LabelSelector):
    """A selector whose keys and values are checked by Kubernetes' rules while parsing."""

    @model_validator(mode="after")
    def _kubernetes_rules(self) -> ValidatedLabelSelector:
        errors = self.field_errors()
        if errors:
            raise ValueError("; ".join(str(e) for e in errors))
        return self
