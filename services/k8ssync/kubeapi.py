"""A small Kubernetes API client on aiohttp: paginated list, streaming watch, writes.

Written against the API's documented protocol rather than a client library, so resumption,
bookmarks and 410 handling are ours to test: ``list`` pages with ``limit``/``continue`` and
returns the list's resourceVersion; ``watch`` streams events from a resourceVersion with
``allowWatchBookmarks``; a 410 (on the request or as an ``ERROR`` event) raises :class:`Gone`.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from services.k8ssync.core.kinds import ApiKind
from services.k8ssync.core.kubeconfig import (
    SERVICE_ACCOUNT_DIR,
    ClusterAccess,
    KubeConfigError,
    from_kubeconfig,
    in_cluster,
)
from services.k8ssync.core.watchstream import WatchEvent, WatchStreamParser

LIST_PAGE = 500
WATCH_TIMEOUT_SECONDS = 300
"""The server ends each watch after this long (jittered by the server); we watch again from the
last resourceVersion seen, so a long-lived connection never silently stalls."""


class KubeApiError(RuntimeError):
    def __init__(self, status: int, body: Any, what: str) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{what}: {status} {message}")


class Gone(KubeApiError):
    """The resourceVersion (or continue token) is older than the server keeps: relist."""


def load_access(kubeconfig: str | None = None, context: str | None = None,
                env: Mapping[str, str] | None = None) -> ClusterAccess:
    """A kubeconfig file (the argument, else ``$KUBECONFIG``'s first file), else in-cluster."""
    env = os.environ if env is None else env
    path = kubeconfig or (env.get("KUBECONFIG", "").split(os.pathsep)[0] or None)
    if path:
        doc = yaml.safe_load(Path(path).read_text())
        if not isinstance(doc, dict):
            raise KubeConfigError(f"{path} is not a kubeconfig")
        access = from_kubeconfig(doc, context)
        base = Path(path).parent
        return _relative_to(access, base)
    namespace_file = Path(SERVICE_ACCOUNT_DIR) / "namespace"
    namespace = namespace_file.read_text().strip() if namespace_file.exists() else "default"
    return in_cluster(env, namespace)


def _relative_to(access: ClusterAccess, base: Path) -> ClusterAccess:
    """kubeconfig file paths are relative to the kubeconfig's own folder."""
    def fix(p: str) -> str:
        return str(base / p) if p and not os.path.isabs(p) else p

    return replace(access, ca_file=fix(access.ca_file), token_file=fix(access.token_file),
                   client_cert_file=fix(access.client_cert_file),
                   client_key_file=fix(access.client_key_file))


def ssl_context(access: ClusterAccess) -> ssl.SSLContext | bool:
    if not access.server.startswith("https://"):
        return False
    if access.insecure:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(cafile=access.ca_file or None,
                                         cadata=access.ca_data or None)
    if access.client_cert_file:
        ctx.load_cert_chain(access.client_cert_file, access.client_key_file or None)
    elif access.client_cert_data:
        with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain reads only files
            cert, key = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
            for path, data in ((cert, access.client_cert_data), (key, access.client_key_data)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
            ctx.load_cert_chain(str(cert), str(key) if access.client_key_data else None)
    return ctx


class KubeClient:
    def __init__(self, access: ClusterAccess) -> None:
        self.access = access
        self._session = aiohttp.ClientSession(
            base_url=access.server,
            connector=aiohttp.TCPConnector(ssl=ssl_context(access)),
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10),
        )

    async def close(self) -> None:
        await self._session.close()

    def _headers(self, content_type: str = "application/json") -> dict[str, str]:
        token = self.access.token
        if self.access.token_file:
            token = Path(self.access.token_file).read_text().strip()
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    @staticmethod
    async def _body(resp: aiohttp.ClientResponse) -> Any:
        try:
            return await resp.json(content_type=None)
        except ValueError:
            return await resp.text()

    async def request(self, method: str, path: str, *, body: Any = None,
                      params: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> Any:
        async with self._session.request(
            method, path, json=body, params=params, headers=self._headers(content_type),
            timeout=aiohttp.ClientTimeout(total=60),
        ) as resp:
            data = await self._body(resp)
            if resp.status == 410:
                raise Gone(resp.status, data, f"{method} {path}")
            if resp.status >= 400:
                raise KubeApiError(resp.status, data, f"{method} {path}")
            return data

    async def list(self, kind: ApiKind, page: int = LIST_PAGE
                   ) -> tuple[list[dict[str, Any]], str]:
        """Every object of ``kind`` and the resourceVersion to watch from (all pages belong
        to one snapshot; an expired continue token raises :class:`Gone`)."""
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"limit": str(page)}
            if token:
                params["continue"] = token
            data = await self.request("GET", kind.collection_path(), params=params)
            items.extend(data.get("items") or [])
            meta = data.get("metadata") or {}
            token = str(meta.get("continue") or "")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    async def watch(self, kind: ApiKind, resource_version: str,
                    timeout_seconds: int = WATCH_TIMEOUT_SECONDS) -> AsyncIterator[WatchEvent]:
        """Events after ``resource_version`` until the server ends the stream."""
        params = {"watch": "1", "allowWatchBookmarks": "true",
                  "timeoutSeconds": str(timeout_seconds)}
        if resource_version:
            params["resourceVersion"] = resource_version
        parser = WatchStreamParser()
        async with self._session.get(
            kind.collection_path(), params=params, headers=self._headers(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10,
                                          sock_read=timeout_seconds + 30),
        ) as resp:
            if resp.status >= 400:
                data = await self._body(resp)
                error = Gone if resp.status == 410 else KubeApiError
                raise error(resp.status, data, f"watch {kind.plural}")
            async for chunk in resp.content.iter_any():
                for event in parser.feed(chunk):
                    yield event
            for event in parser.close():
                yield event

    # --- writes --------------------------------------------------------------------------

    async def get(self, kind: ApiKind, namespace: str | None, name: str) -> Any:
        return await self.request("GET", kind.object_path(namespace, name))

    async def create(self, kind: ApiKind, obj: dict[str, Any]) -> Any:
        namespace = (obj.get("metadata") or {}).get("namespace")
        return await self.request("POST", kind.collection_path(namespace), body=obj)

    async def replace(self, kind: ApiKind, obj: dict[str, Any]) -> Any:
        meta = obj.get("metadata") or {}
        return await self.request("PUT", kind.object_path(meta.get("namespace"), meta["name"]),
                                  body=obj)

    async def delete(self, kind: ApiKind, namespace: str | None, name: str) -> Any:
        return await self.request("DELETE", kind.object_path(namespace, name))

    async def merge_patch(self, kind: ApiKind, namespace: str | None, name: str,
                          patch: dict[str, Any], subresource: str = "") -> Any:
        path = kind.object_path(namespace, name) + (f"/{subresource}" if subresource else "")
        return await self.request("PATCH", path, body=patch,
                                  content_type="application/merge-patch+json")
