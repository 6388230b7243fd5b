"""The bus against a real nats-server: request/reply errors, KV revisions, watches, restarts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ciliate.bus import BadRequest, Bucket, Bus, KVMirror, RequestFailed, RevisionConflict
from ciliate.bus.batch import BatchPublisher
from ciliate.stack.nats import NatsServer


async def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` to hold, failing at the deadline (no fixed sleeps)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


async def test_request_reply_carries_field_errors(bus: Bus) -> None:
    async def handler(payload: Any) -> Any:
        if not isinstance(payload, dict) or "labels" not in payload:
            raise BadRequest("labels", "required")
        return {"ids": [256 for _ in payload["labels"]]}

    await bus.serve("test.allocate", handler, queue="q")
    assert await bus.request("test.allocate", {"labels": [["a"], ["b"]]}) == {"ids": [256, 256]}
    with pytest.raises(RequestFailed) as err:
        await bus.request("test.allocate", {"nope": 1})
    assert (err.value.code, err.value.field) == (422, "labels")


async def test_undecodable_request_gets_a_400_reply(bus: Bus) -> None:
    async def handler(payload: Any) -> Any:
        return payload

    await bus.serve("test.echo", handler)
    msg = await bus.nc.request("test.echo", b"\xc1", timeout=2)
    from ciliate.bus import codec

    assert codec.unpack(msg.data)["error"]["code"] == 400


async def test_no_responder_is_a_503(bus: Bus) -> None:
    with pytest.raises(RequestFailed) as err:
        await bus.request("test.nobody", {}, timeout=1)
    assert err.value.code in (503, 504)


async def test_kv_expected_revision_loses_races_loudly(bus: Bus) -> None:
    kv = await bus.kv(Bucket.POLICY)
    rev = await kv.put("256", {"entries": []}, expected_revision=0)
    with pytest.raises(RevisionConflict):
        await kv.put("256", {"entries": [1]}, expected_revision=0)
    rev2 = await kv.put("256", {"entries": [2]}, expected_revision=rev)
    with pytest.raises(RevisionConflict):
        await kv.put("256", {"entries": [3]}, expected_revision=rev)
    entry = await kv.get("256")
    assert entry is not None and entry.value == {"entries": [2]} and entry.revision == rev2


async def test_watch_yields_current_values_then_updates(bus: Bus) -> None:
    kv = await bus.kv(Bucket.IDENTITIES)
    await kv.put("256", {"id": 256})
    await kv.put("257", {"id": 257})
    events = []
    watch = kv.watch()
    async for ev in watch:
        events.append(ev)
        if ev.initial_done:
            break
    assert [e.key for e in events if e.key] == ["256", "257"]
    await kv.delete("256")
    ev = await anext(watch)
    assert ev.key == "256" and ev.deleted
    await watch.aclose()


async def test_mirror_resyncs_after_nats_restart(nats_server: NatsServer) -> None:
    writer = await Bus.connect(nats_server.url, name="writer")
    reader = await Bus.connect(nats_server.url, name="reader")
    try:
        kv = await writer.kv(Bucket.ENDPOINTS)
        await kv.put("x.a", {"id": 1})
        await kv.put("x.b", {"id": 2})
        changes: list[tuple[str, Any]] = []

        async def on_change(key: str, _old: Any, new: Any) -> None:
            changes.append((key, new))

        mirror = KVMirror(await reader.kv(Bucket.ENDPOINTS), on_change)
        task = asyncio.create_task(mirror.run())
        await asyncio.wait_for(mirror.synced.wait(), 10)
        assert set(mirror.values) == {"x.a", "x.b"}

        nats_server.restart()
        await until(lambda: writer.reconnects >= 1 and reader.reconnects >= 1, 20)
        await (await writer.kv(Bucket.ENDPOINTS)).put("x.c", {"id": 3})
        await (await writer.kv(Bucket.ENDPOINTS)).delete("x.a")
        await until(lambda: set(mirror.values) == {"x.b", "x.c"}, 20)
        assert ("x.a", None) in changes
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        await writer.close()
        await reader.close()


async def test_batch_publisher_counts_what_it_drops(bus: Bus) -> None:
    received: list[Any] = []

    async def on_batch(payload: Any) -> None:
        received.append(payload)

    await bus.subscribe("flows.node-1", on_batch)
    pub = BatchPublisher(bus, "flows.node-1", max_batch=10, max_pending=25, source="node-1")
    for i in range(30):
        pub.add({"n": i})
    pub.lost(7)
    await pub.flush()
    await bus.nc.flush()
    await until(lambda: sum(len(b["items"]) for b in received) == 25)
    assert sum(b["lost"] for b in received) == 5 + 7
    assert pub.lost_total == 12


async def test_snapshots_are_whole_while_the_loop_is_busy(bus: Bus) -> None:
    """nats-py may say a watch's snapshot is over before handling any of it (the server had
    sent everything); many snapshots at once on one busy loop make that happen."""
    kv = await bus.kv(Bucket.ENDPOINTS)
    await asyncio.gather(*(kv.put(f"ns.pod{i}", {"i": i}) for i in range(300)))
    snapshots = await asyncio.gather(*(kv.items() for _ in range(30)))
    assert [len(s) for s in snapshots] == [300] * 30
    assert await (await bus.kv(Bucket.POLICY)).items() == {}  # an empty bucket still ends
