"""JetStream KV helpers: decoded puts with expected revisions, and watches that survive restarts.

A watch yields the current value of every key, then a marker (``initial_done``), then updates.
After a reconnect it starts over with a fresh snapshot (``resync`` marker first), so a consumer
that keeps a mirror (see :class:`KVMirror`) learns about deletions made while it was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from ciliate.bus import codec
from ciliate.bus.subjects import Bucket

if TYPE_CHECKING:
    from ciliate.bus.client import Bus

log = logging.getLogger("ciliate.bus.kv")


class RevisionConflict(Exception):
    """A put with an expected revision lost a race with another writer."""


@dataclass(frozen=True)
class KVEvent:
    key: str = ""
    value: Any = None
    revision: int = 0
    deleted: bool = False
    initial_done: bool = False
    resync: bool = False


@dataclass(frozen=True)
class KVEntry:
    key: str
    value: Any
    revision: int


class KV:
    def __init__(self, bus: Bus, bucket: Bucket, store: KeyValue) -> None:
        self.bus = bus
        self.bucket = bucket
        self.store = store

    async def put(
        self,
        key: str,
        value: Any,
        *,
        expected_revision: int | None = None,
        retry_for: float = 15.0,
    ) -> int:
        """Write ``value``; with ``expected_revision`` (0 = must not exist) lose races loudly.

        While NATS restarts, the write is retried for ``retry_for`` seconds. A conditional write
        whose first attempt landed before its reply was lost is recognised by its value.
        """
        data = codec.pack(value)
        deadline = asyncio.get_running_loop().time() + retry_for
        attempt = 0
        while True:
            try:
                return await self._put_once(key, data, expected_revision)
            except RevisionConflict:
                if attempt > 0:
                    current = await self.get(key)
                    if current is not None and codec.pack(current.value) == data:
                        return current.revision
                raise
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError,
                    nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError
                    ) as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                attempt += 1
                log.debug("kv %s: put %s failed (%s); retrying", self.bucket, key, exc)
                await asyncio.sleep(min(1.0, 0.05 * 2**attempt))

    async def _put_once(self, key: str, data: bytes, expected_revision: int | None) -> int:
        try:
            if expected_revision is None:
                return int(await self.store.put(key, data))
            if expected_revision == 0:
                return int(await self.store.create(key, data))
            return int(await self.store.update(key, data, last=expected_revision))
        except KeyWrongLastSequenceError:
            raise RevisionConflict(f"{self.bucket}/{key}: revision moved") from None
        except nats.js.errors.APIError as exc:
            if exc.err_code == 10071:  # wrong last sequence
                raise RevisionConflict(f"{self.bucket}/{key}: revision moved") from None
            raise

    async def put_raw(self, key: str, data: bytes) -> int:
        return int(await self.store.put(key, data))

    async def get(self, key: str) -> KVEntry | None:
        try:
            entry = await self.store.get(key)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.operation in (KV_DEL, KV_PURGE):
            return None
        return KVEntry(key, codec.unpack(entry.value), int(entry.revision or 0))

    async def delete(self, key: str) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self.store.delete(key)

    async def items(self) -> dict[str, Any]:
        """A snapshot of every key (for CLIs and tests; long-lived readers should watch)."""
        out: dict[str, Any] = {}
        async for ev in self.watch():
            if ev.initial_done:
                return out
            if not ev.resync and not ev.deleted:
                out[ev.key] = ev.value
        return out

    async def watch(self, keys: str = ">", *, poll: float = 1.0) -> AsyncIterator[KVEvent]:
        """Current values, ``initial_done``, then updates; restarts with ``resync`` on reconnect."""
        while True:
            generation = self.bus.reconnects
            try:
                watcher = await self.store.watch(keys)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("kv %s: watch failed (%s); retrying", self.bucket, exc)
                await asyncio.sleep(poll / 4)
                continue
            yield KVEvent(resync=True)
            initial = seen = False
            try:
                while True:
                    try:
                        entry = await watcher.updates(timeout=poll)  # type: ignore[no-untyped-call]
                    except nats.errors.TimeoutError:
                        if self.bus.reconnects != generation:
                            break
                        continue
                    if entry is None:
                        # nats-py's end-of-snapshot marker can come before the snapshot: it is
                        # sent when the server has delivered everything but the client has not
                        # handled any of it yet. Only an empty consumer makes it true; otherwise
                        # the entry with nothing pending after it ends the snapshot.
                        if not initial and not seen and await self._nothing_delivered(watcher):
                            initial = True
                            yield KVEvent(initial_done=True)
                        continue
                    seen = True
                    yield self._event(entry)
                    if not initial and not entry.delta:
                        initial = True
                        yield KVEvent(initial_done=True)
            finally:
                with contextlib.suppress(nats.errors.Error, TimeoutError, AttributeError):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    @staticmethod
    async def _nothing_delivered(watcher: Any) -> bool:
        try:
            info = await watcher._sub.consumer_info()
        except (nats.errors.Error, TimeoutError):
            return True  # cannot tell: trust the marker, as nats-py does
        return int(info.delivered.consumer_seq or 0) == 0 and int(info.num_pending or 0) == 0

    def _event(self, entry: KeyValue.Entry) -> KVEvent:
        revision = int(entry.revision or 0)
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            return KVEvent(entry.key, None, revision, deleted=True)
        try:
            value = codec.unpack(entry.value)
        except codec.DecodeError as exc:
            log.warning("kv %s: undecodable value for %s: %s", self.bucket, entry.key, exc)
            return KVEvent(entry.key, None, revision, deleted=True)
        return KVEvent(entry.key, value, revision)


ChangeCallback = Callable[[str, Any, Any], Awaitable[None]]


class KVMirror:
    """Keeps a local dict equal to a bucket and reports each change as (key, old, new).

    ``new`` is None for a deletion. ``synced`` is set once the first snapshot is complete.
    """

    def __init__(self, kv: KV, on_change: ChangeCallback | None = None) -> None:
        self.kv = kv
        self.values: dict[str, Any] = {}
        self.synced = asyncio.Event()
        self.revision = 0
        self._on_change = on_change

    async def _change(self, key: str, old: Any, new: Any) -> None:
        if self._on_change is not None:
            await self._on_change(key, old, new)

    async def run(self) -> None:
        snapshot: set[str] | None = None
        async for ev in self.kv.watch():
            if ev.resync:
                snapshot = set()
                continue
            if ev.initial_done:
                if snapshot is not None:
                    for key in sorted(set(self.values) - snapshot):
                        await self._change(key, self.values.pop(key), None)
                snapshot = None
                self.synced.set()
                continue
            self.revision = max(self.revision, ev.revision)
            old = self.values.get(ev.key)
            if ev.deleted:
                if ev.key in self.values:
                    del self.values[ev.key]
                    await self._change(ev.key, old, None)
                continue
            if snapshot is not None:
                snapshot.add(ev.key)
            if old != ev.value:
                self.values[ev.key] = ev.value
                await self._change(ev.key, old, ev.value)
