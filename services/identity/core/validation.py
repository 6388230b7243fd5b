"""Kubernetes' rules for label keys and values, so bad labels fail at the edge with a path."""

from __future__ import annotations

import re
from collections.abc import Mapping

from ciliate.resources.base import FieldError

_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
NAME_MAX = 63
PREFIX_MAX = 253


def label_key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid label key (``[prefix/]name``), or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "prefix part must be non-empty"
    if slash and (len(prefix) > PREFIX_MAX or not _DNS_SUBDOMAIN.match(prefix)):
        return "prefix part must be a lowercase DNS subdomain of at most 253 characters"
    if not name:
        return "name part must be non-empty"
    if len(name) > NAME_MAX:
        return "name part must be no more than 63 characters"
    if not _NAME.match(name):
        return (
            "name part must consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character"
        )
    return None


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a valid label value (empty is fine), or None."""
    if value == "":
        return None
    if len(value) > NAME_MAX:
        return "must be no more than 63 characters"
    if not _NAME.match(value):
        return (
            "must consist of alphanumeric characters, '-', '_' or '.', "
            "and must start and end with an alphanumeric character"
        )
    return None


def label_errors(labels: Mapping[str, str], path: str = "metadata.labels") -> list[FieldError]:
    """Every invalid key or value, each with its path (``metadata.labels.app``)."""
    errors: list[FieldError] = []
    for key, value in labels.items():
        where = f"{path}.{key}"
        if (problem := label_key_problem(key)) is not None:
            errors.append(FieldError(where, f"invalid label key {key!r}: {problem}"))
        if not isinstance(value, str):
            errors.append(FieldError(where, "label value must be a string"))
        elif (problem := label_value_problem(value)) is not None:
            errors.append(FieldError(where, f"invalid label value {value!r}: {problem}"))
    return errors
