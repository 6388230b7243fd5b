"""Labels with their source (``k8s:app=web``) and Cilium's reserved identities, defined once."""

from ciliate.labels.filter import DEFAULT_FILTER, FilterRule, LabelFilter
from ciliate.labels.k8s import endpoint_labels
from ciliate.labels.model import Label, LabelSet, parse_label
from ciliate.labels.reserved import (
    CIDR_IDENTITY_BASE,
    CLUSTER_IDENTITY_MAX,
    CLUSTER_IDENTITY_MIN,
    RESERVED,
    ReservedIdentity,
    reserved_by_name,
)

__all__ = [
    "CIDR_IDENTITY_BASE",
    "CLUSTER_IDENTITY_MAX",
    "CLUSTER_IDENTITY_MIN",
    "DEFAULT_FILTER",
    "RESERVED",
    "FilterRule",
    "Label",
    "LabelFilter",
    "LabelSet",
    "ReservedIdentity",
    "endpoint_labels",
    "parse_label",
    "reserved_by_name",
]
