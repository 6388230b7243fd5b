"""Every supported kind, found by ``kind`` and checked against its apiVersions.

The one place that knows which class models a kind and which service owns it; the loader, the
CLI (``apply -f``) and the REST edge dispatch through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ciliate.resources.base import FieldError, Resource, ResourceError, validate_model
from ciliate.resources.ciliumpolicy import CiliumClusterwideNetworkPolicy, CiliumNetworkPolicy
from ciliate.resources.core import EndpointSlice, Namespace, Pod, Service
from ciliate.resources.networkpolicy import NetworkPolicy
from ciliate.resources.tracingpolicy import TracingPolicy, TracingPolicyNamespaced

KINDS: dict[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (
        Namespace,
        Pod,
        Service,
        EndpointSlice,
        NetworkPolicy,
        CiliumNetworkPolicy,
        CiliumClusterwideNetworkPolicy,
        TracingPolicy,
        TracingPolicyNamespaced,
    )
}
"""Kind name -> model class, for every kind Ciliate stores."""


def resource_class(kind: Any, api_version: Any = None) -> type[Resource]:
    """The class for ``kind``; with ``api_version``, also checks the pair is one we serve."""
    if not isinstance(kind, str) or not kind:
        raise ResourceError([FieldError("kind", "required (a string naming the resource kind)")])
    cls = KINDS.get(kind)
    if cls is None:
        raise ResourceError(
            [FieldError("kind", f"unknown kind {kind!r}; supported: {', '.join(sorted(KINDS))}")]
        )
    if api_version is not None and api_version not in cls.API_VERSIONS:
        raise ResourceError(
            [
                FieldError(
                    "apiVersion",
                    f"{kind} is served as {' or '.join(cls.API_VERSIONS)}, not {api_version!r}",
                )
            ]
        )
    return cls


def parse_resource(doc: Mapping[str, Any]) -> Resource:
    """Validate one decoded document into its typed resource, or raise :class:`ResourceError`."""
    if not isinstance(doc, Mapping):
        raise ResourceError([FieldError("", f"expected a mapping, got {type(doc).__name__}")])
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    missing = [
        FieldError(field, f"required (for example {example})")
        for field, value, example in (("apiVersion", api_version, "v1"), ("kind", kind, "Pod"))
        if not isinstance(value, str) or not value
    ]
    if missing:
        raise ResourceError(missing)
    cls = resource_class(kind, api_version)
    return validate_model(cls, doc)


def owner_of(kind: str) -> str:
    """The service that stores and serves ``kind`` (``identity``, ``policy``, ``lb``, ...)."""
    return resource_class(kind).OWNER
