"""A seeded synthetic cluster for the policy benchmark and scale tests (pure, no I/O).

1,000 identities (100 namespaces x 10 apps). Each identity carries a ``tier`` label (50 values,
so a tier selects ~2% of identities) and a ``group`` label (20 values, ~5%). Policies are
CiliumClusterwideNetworkPolicies whose subject is one tier and whose peers are one group, with a
seeded mix of single ports, port ranges, CIDR peers and deny rules.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ciliate.labels import CLUSTER_IDENTITY_MIN, LabelSet
from ciliate.labels.k8s import endpoint_labels

NAMESPACES = 100
APPS = 10
TIERS = 50
GROUPS = 20
POLICIES = 500


@dataclass(frozen=True)
class Synthetic:
    identities: dict[int, LabelSet]
    policy_docs: list[dict[str, Any]]


def pod_labels(ns: int, app: int) -> dict[str, str]:
    index = ns * APPS + app
    return {
        "app": f"app-{app}",
        "tier": f"t{(index * 7 + ns) % TIERS}",
        "group": f"g{(index * 3 + app) % GROUPS}",
    }


def identity_labels(ns: int, app: int) -> LabelSet:
    namespace = f"ns-{ns:03d}"
    return endpoint_labels(pod_labels(ns, app), namespace,
                           {"kubernetes.io/metadata.name": namespace})


def identities(namespaces: int = NAMESPACES, apps: int = APPS) -> dict[int, LabelSet]:
    out: dict[int, LabelSet] = {}
    for ns in range(namespaces):
        for app in range(apps):
            out[CLUSTER_IDENTITY_MIN + ns * apps + app] = identity_labels(ns, app)
    return out


def _ports(rng: random.Random) -> list[dict[str, Any]]:
    kind = rng.random()
    proto = rng.choice(["TCP", "TCP", "UDP"])
    if kind < 0.6:
        return [{"port": str(rng.choice([80, 443, 8080, 5432, 6379, 9090])), "protocol": proto}]
    if kind < 0.9:
        start = rng.randrange(1024, 60000)
        return [{"port": str(start), "endPort": start + rng.randrange(1, 200), "protocol": proto}]
    return [{"port": str(rng.randrange(1, 65535)), "protocol": proto},
            {"port": str(rng.randrange(1, 65535)), "protocol": proto}]


def policy(index: int, rng: random.Random) -> dict[str, Any]:
    tier = rng.randrange(TIERS)
    group = rng.randrange(GROUPS)
    peer = {"matchLabels": {"k8s:group": f"g{group}"}}
    rule: dict[str, Any] = {"endpointSelector": {"matchLabels": {"k8s:tier": f"t{tier}"}}}
    roll = rng.random()
    if roll < 0.45:
        rule["ingress"] = [{"fromEndpoints": [peer], "toPorts": [{"ports": _ports(rng)}]}]
    elif roll < 0.75:
        rule["egress"] = [{"toEndpoints": [peer], "toPorts": [{"ports": _ports(rng)}]}]
    elif roll < 0.9:
        net = f"10.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
        cidr: dict[str, Any] = {"cidr": net}
        if rng.random() < 0.5:
            cidr["except"] = [net.replace(".0/24", ".128/25")]
        rule["egress"] = [{"toCIDRSet": [cidr], "toPorts": [{"ports": _ports(rng)}]}]
    else:
        rule["ingressDeny"] = [{"fromEndpoints": [peer], "toPorts": [{"ports": _ports(rng)}]}]
        rule["ingress"] = [{"fromEndpoints": [{"matchLabels": {"k8s:tier": f"t{tier}"}}]}]
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumClusterwideNetworkPolicy",
        "metadata": {"name": f"bench-{index:04d}"},
        "spec": rule,
    }


def generate(seed: int = 1, count: int = POLICIES) -> Synthetic:
    rng = random.Random(seed)
    return Synthetic(identities(), [policy(i, rng) for i in range(count)])
