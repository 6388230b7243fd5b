"""Typed resources (Kubernetes, Cilium and Tetragon kinds), their validation, and the YAML loader.

Most callers need only ``load_resources`` (a file to typed objects), ``parse_resource`` (one
decoded object) and ``owner_of`` (which service stores a kind).
"""

from ciliate.resources.base import FieldError, ObjectMeta, Resource, ResourceError, validate_model
from ciliate.resources.core import EndpointSlice, LbAlgorithm, Namespace, Pod, Service, ServiceType
from ciliate.resources.loader import load_documents, load_resources
from ciliate.resources.registry import KINDS, owner_of, parse_resource, resource_class
from ciliate.resources.tracingpolicy import TracingPolicy, TracingPolicyNamespaced

__all__ = [
    "KINDS",
    "EndpointSlice",
    "FieldError",
    "LbAlgorithm",
    "Namespace",
    "ObjectMeta",
    "Pod",
    "Resource",
    "ResourceError",
    "Service",
    "ServiceType",
    "TracingPolicy",
    "TracingPolicyNamespaced",
    "load_documents",
    "load_resources",
    "owner_of",
    "parse_resource",
    "resource_class",
    "validate_model",
]
