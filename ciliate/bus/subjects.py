"""Every NATS subject and JetStream KV bucket, named once.

The NATS server configuration in ``infra/`` and its test are derived from ``ACCESS``: when a
service starts using a subject, add it here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Bucket(StrEnum):
    """JetStream KV buckets: derived state, watched by whoever needs it."""

    ENDPOINTS = "endpoints"
    IDENTITIES = "identities"
    IPCACHE = "ipcache"
    POLICY = "policy"
    LB = "lb"
    TRACINGPOLICIES = "tracingpolicies"
    NODES = "nodes"
    HEARTBEATS = "heartbeats"


SERVICES = ("identity", "policy", "lb", "datapath", "security", "events")

# Request/reply between services.
IDENTITY_ALLOCATE = "identity.allocate"
IDENTITY_RELEASE = "identity.release"
IDENTITY_LOOKUP = "identity.lookup"

# High-volume event streams, one subject per node.
FLOWS_PREFIX = "flows"
PROCESS_PREFIX = "process"
FLOWS_ALL = f"{FLOWS_PREFIX}.*"
PROCESS_ALL = f"{PROCESS_PREFIX}.*"

# Queue groups: replicas of one service share the work of a request subject.
def queue_group(service: str) -> str:
    return f"ciliate-{service}"


def flows(node: str) -> str:
    return f"{FLOWS_PREFIX}.{node}"


def process(node: str) -> str:
    return f"{PROCESS_PREFIX}.{node}"


def kv_subject(bucket: Bucket, key: str = ">") -> str:
    """The subject a KV put on ``bucket`` publishes to (JetStream's `$KV.<bucket>.<key>`)."""
    return f"$KV.{bucket.value}.{key}"


@dataclass(frozen=True)
class Access:
    """What one service may publish, subscribe to, and which KV buckets it writes or reads."""

    publish: frozenset[str] = field(default_factory=frozenset)
    subscribe: frozenset[str] = field(default_factory=frozenset)
    kv_write: frozenset[Bucket] = field(default_factory=frozenset)
    kv_read: frozenset[Bucket] = field(default_factory=frozenset)


_ALL_READ = frozenset({Bucket.HEARTBEATS, Bucket.NODES})

ACCESS: dict[str, Access] = {
    "identity": Access(
        subscribe=frozenset({IDENTITY_ALLOCATE, IDENTITY_RELEASE, IDENTITY_LOOKUP}),
        kv_write=frozenset({Bucket.ENDPOINTS, Bucket.IDENTITIES, Bucket.IPCACHE}),
        kv_read=_ALL_READ | {Bucket.ENDPOINTS, Bucket.IDENTITIES, Bucket.IPCACHE},
    ),
    "policy": Access(
        publish=frozenset({IDENTITY_ALLOCATE, IDENTITY_RELEASE, IDENTITY_LOOKUP}),
        kv_write=frozenset({Bucket.POLICY}),
        kv_read=_ALL_READ | {Bucket.ENDPOINTS, Bucket.IDENTITIES, Bucket.IPCACHE, Bucket.POLICY},
    ),
    "lb": Access(
        kv_write=frozenset({Bucket.LB}),
        kv_read=_ALL_READ | {Bucket.ENDPOINTS, Bucket.LB},
    ),
    "datapath": Access(
        # The agent registers its node, and its DNS proxy turns answers into CIDR identities.
        publish=frozenset({FLOWS_ALL, IDENTITY_ALLOCATE, IDENTITY_RELEASE}),
        kv_write=frozenset({Bucket.NODES}),
        kv_read=_ALL_READ
        | {Bucket.ENDPOINTS, Bucket.IDENTITIES, Bucket.IPCACHE, Bucket.POLICY, Bucket.LB},
    ),
    "security": Access(
        publish=frozenset({PROCESS_ALL}),
        kv_write=frozenset({Bucket.TRACINGPOLICIES}),
        kv_read=_ALL_READ | {Bucket.ENDPOINTS, Bucket.TRACINGPOLICIES},
    ),
    "events": Access(
        subscribe=frozenset({FLOWS_ALL, PROCESS_ALL}),
        kv_read=_ALL_READ | {Bucket.ENDPOINTS, Bucket.IDENTITIES},
    ),
    "k8s-sync": Access(
        kv_read=_ALL_READ | {Bucket.ENDPOINTS},
    ),
}
"""Per-service permissions; every service also writes its own heartbeat and node entries."""
