"""Names the dev cluster's agents share without importing one another: the cluster's salt and
each node's cgroup v2 subtree. The datapath agent makes a node's subtree and puts every pod's
cgroup below it; the security agent on that node scopes itself to the same subtree."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ciliate.config import Settings

CGROUP_ROOT = Path("/sys/fs/cgroup/unified/ciliate")


def short_hash(*parts: str, length: int = 10) -> str:
    return hashlib.sha256("/".join(parts).encode()).hexdigest()[:length]


def cluster_salt(settings: Settings) -> str:
    """``DEV_CLUSTER`` (settings extra, else ``CILIATE_DEV_CLUSTER``), else a hash of the state
    directory: every service of one ``ciliate up`` shares it, two stacks on a host differ."""
    return (settings.extra.get("dev_cluster") or os.environ.get("CILIATE_DEV_CLUSTER")
            or short_hash(str(settings.state_dir.resolve()), length=6))


def node_cgroup(salt: str, node: str) -> Path:
    """Node ``node``'s cgroup v2 subtree: every pod's cgroup lives below it, so programs
    attached here (the socket LB) see all of the node's pods."""
    return CGROUP_ROOT / (salt + node)
