"""CiliumEndpoint write-back: each Kubernetes pod's endpoint state, as Cilium publishes it.

Inputs are the KV ``endpoints`` bucket (written by the identity service) and the Pods the sync
sees in the cluster; a pod that is in both gets a ``cilium.io/v2`` CiliumEndpoint named like
the pod and owned by it (so Kubernetes garbage-collects it with the pod). Work is keyed by pod
and coalesced, so a burst of changes to one pod costs one write.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from ciliate.bus import KVMirror
from services.k8ssync.core.convert import ciliumendpoint
from services.k8ssync.core.kinds import CILIUM_ENDPOINT, ApiKind
from services.k8ssync.core.watchstream import EventType
from services.k8ssync.kubeapi import KubeApiError, KubeClient

log = logging.getLogger("ciliate.k8s-sync")


def _kv_key(namespace: str, name: str) -> str:
    return f"{namespace}.{name}"


class EndpointWriter:
    def __init__(self, kube: KubeClient) -> None:
        self.kube = kube
        self.pods: dict[str, str] = {}
        """KV key (``ns.name``) -> pod uid, for pods that exist in the cluster."""
        self.endpoints: dict[str, Any] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self.written = 0
        self.errors = 0

    def _enqueue(self, key: str) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def observe(self, how: EventType, kind: ApiKind, obj: dict[str, Any]) -> None:
        """Reflector observer for Pods."""
        if kind.kind != "Pod":
            return
        meta = obj.get("metadata") or {}
        key = _kv_key(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
        if how is EventType.DELETED:
            self.pods.pop(key, None)
        else:
            self.pods[key] = str(meta.get("uid") or "")
        self._enqueue(key)

    async def on_endpoint(self, key: str, _old: Any, new: Any) -> None:
        """KVMirror callback for the ``endpoints`` bucket."""
        if new is None:
            self.endpoints.pop(key, None)
        else:
            self.endpoints[key] = new
        self._enqueue(key)

    async def run(self, mirror: KVMirror) -> None:
        worker = asyncio.create_task(self._work())
        try:
            await mirror.run()
        finally:
            worker.cancel()

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._queued.discard(key)
            try:
                await self.reconcile(key)
            except (KubeApiError, aiohttp.ClientError, OSError) as exc:
                self.errors += 1
                log.warning("CiliumEndpoint %s not written: %s; retrying", key, exc)
                await asyncio.sleep(1.0)
                self._enqueue(key)

    async def reconcile(self, key: str) -> None:
        value = self.endpoints.get(key)
        uid = self.pods.get(key)
        if value is None:
            namespace, _, name = key.partition(".")
        else:
            namespace, name = str(value["namespace"]), str(value["name"])
        desired = ciliumendpoint(value, uid) if value is not None and uid is not None else None
        try:
            current = await self.kube.get(CILIUM_ENDPOINT, namespace, name)
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            current = None
        if desired is None:
            if current is not None:
                try:
                    await self.kube.delete(CILIUM_ENDPOINT, namespace, name)
                except KubeApiError as exc:
                    if exc.status != 404:
                        raise
            return
        if current is None:
            await self.kube.create(CILIUM_ENDPOINT, desired)
        elif current.get("status") != desired["status"]:
            desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            await self.kube.replace(CILIUM_ENDPOINT, desired)
        else:
            return
        self.written += 1
