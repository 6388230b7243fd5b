"""The message bus: NATS core subjects, request/reply and JetStream KV, msgpack-encoded."""

from ciliate.bus.batch import BatchPublisher
from ciliate.bus.client import Bus
from ciliate.bus.errors import BadRequest, BusError, RequestFailed
from ciliate.bus.kv import KV, KVEntry, KVEvent, KVMirror, RevisionConflict
from ciliate.bus.subjects import Bucket

__all__ = [
    "KV",
    "BadRequest",
    "BatchPublisher",
    "Bucket",
    "Bus",
    "BusError",
    "KVEntry",
    "KVEvent",
    "KVMirror",
    "RequestFailed",
    "RevisionConflict",
]
