"""Which API server to talk to and how to authenticate, from a kubeconfig or the pod's
service account. Pure: the caller reads the files and passes their text."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeConfigError(ValueError):
    """The kubeconfig does not name a usable cluster and user."""


@dataclass(frozen=True)
class ClusterAccess:
    server: str
    ca_file: str = ""
    ca_data: str = ""
    """PEM text."""
    insecure: bool = False
    token: str = ""
    token_file: str = ""
    """Re-read before requests: projected service-account tokens rotate."""
    client_cert_data: bytes = b""
    client_key_data: bytes = b""
    client_cert_file: str = ""
    client_key_file: str = ""
    namespace: str = "default"


def _named(entries: Any, name: str, what: str) -> dict[str, Any]:
    for entry in entries or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            body = entry.get(what)
            if isinstance(body, dict):
                return body
    raise KubeConfigError(f"kubeconfig has no {what} named {name!r}")


def _b64(value: Any, field: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise KubeConfigError(f"{field} is not base64") from None


def from_kubeconfig(doc: Mapping[str, Any], context: str | None = None) -> ClusterAccess:
    """Resolve ``context`` (default: ``current-context``) to a server and credentials."""
    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError("kubeconfig has no current-context; pass one")
    ctx = _named(doc.get("contexts"), str(name), "context")
    cluster = _named(doc.get("clusters"), str(ctx.get("cluster", "")), "cluster")
    user = _named(doc.get("users"), str(ctx.get("user", "")), "user") if ctx.get("user") else {}
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("http://", "https://")):
        raise KubeConfigError(f"cluster {ctx.get('cluster')!r} has no http(s) server")
    if "exec" in user or "auth-provider" in user:
        raise KubeConfigError("exec and auth-provider credentials are not supported; "
                              "use a token, a token file or a client certificate")
    ca_data = cluster.get("certificate-authority-data")
    return ClusterAccess(
        server=server.rstrip("/"),
        ca_file=str(cluster.get("certificate-authority") or ""),
        ca_data=_b64(ca_data, "certificate-authority-data").decode() if ca_data else "",
        insecure=bool(cluster.get("insecure-skip-tls-verify", False)),
        token=str(user.get("token") or ""),
        token_file=str(user.get("tokenFile") or ""),
        client_cert_data=_b64(user["client-certificate-data"], "client-certificate-data")
        if user.get("client-certificate-data") else b"",
        client_key_data=_b64(user["client-key-data"], "client-key-data")
        if user.get("client-key-data") else b"",
        client_cert_file=str(user.get("client-certificate") or ""),
        client_key_file=str(user.get("client-key") or ""),
        namespace=str(ctx.get("namespace") or "default"),
    )


def in_cluster(env: Mapping[str, str], namespace: str = "default",
               account_dir: str = SERVICE_ACCOUNT_DIR) -> ClusterAccess:
    """The API server as a pod sees it: ``KUBERNETES_SERVICE_HOST``/``PORT`` and the mounted
    service-account token and CA."""
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeConfigError("not in a cluster: KUBERNETES_SERVICE_HOST is unset")
    if ":" in host:
        host = f"[{host}]"
    return ClusterAccess(server=f"https://{host}:{port}", ca_file=f"{account_dir}/ca.crt",
                         token_file=f"{account_dir}/token", namespace=namespace)
