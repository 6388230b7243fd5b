"""Batch codec for flow records on ``flows.<node>``: one msgpack array of wire dicts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import msgpack

from ciliate.flows.model import Flow, LostEvent, Wire


def encode_batch(records: Iterable[Wire | Flow | LostEvent]) -> bytes:
    """Pack records (wire dicts, or Flow/LostEvent objects) as one msgpack array."""
    wires = [r if isinstance(r, dict) else r.to_wire() for r in records]
    return cast(bytes, msgpack.packb(wires, use_bin_type=True))


def decode_batch(data: bytes) -> list[Wire]:
    """Unpack a batch to wire dicts; a single packed dict is accepted as a batch of one."""
    obj: Any = msgpack.unpackb(data, raw=False, use_list=True)
    if isinstance(obj, dict):
        return [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise ValueError("flow batch must be a msgpack array of maps")
    return cast(list[Wire], obj)
