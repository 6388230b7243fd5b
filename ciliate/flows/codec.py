"""Batch codecs for flow records on ``flows.<node>``.

Two shapes travel on the bus:

* the envelope the datapath publishes (``pack_envelope``, ``BatchPublisher(encode=...)``):
  ``{"source": str, "items": [wire, ...], "lost": n, "lt": [[label, ...], ...]}``. Label lists
  (``sl``/``dl``, ``TABLE_KEYS``) repeat per endpoint and are most of a flow's bytes, so each
  distinct list is sent once per batch in ``lt`` and a flow's ``sl``/``dl`` is its index there;
  ``resolve_tables`` puts the lists back (one shared object per distinct list), so a consumer
  decodes each label string once per batch. An envelope without ``lt`` carries the lists
  inline (the earlier form; still accepted);
* a bare msgpack array of wire dicts (``encode_batch``), labels inline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import msgpack

from ciliate.flows.model import Flow, LostEvent, Wire

TABLE_KEYS = ("sl", "dl")
"""Wire keys whose value is an index into the envelope's ``lt`` table when it has one."""

TABLE = "lt"
"""The envelope key of the per-batch label table."""


def encode_batch(records: Iterable[Wire | Flow | LostEvent]) -> bytes:
    """Pack records (wire dicts, or Flow/LostEvent objects) as one msgpack array."""
    wires = [r if isinstance(r, dict) else r.to_wire() for r in records]
    return cast(bytes, msgpack.packb(wires, use_bin_type=True))


def decode_batch(data: bytes) -> list[Wire]:
    """Unpack a batch to wire dicts: a bare array, a single dict (a batch of one), or an
    envelope (its label table resolved; its ``lost`` count is not a record here)."""
    obj: Any = msgpack.unpackb(data, raw=False, use_list=True)
    if isinstance(obj, dict) and "items" not in obj:
        return [obj]
    return envelope_items(obj)


def pack_envelope(source: str, items: Sequence[Wire], lost: int) -> bytes:
    """The ``flows.<node>`` envelope with each distinct label list once, in ``lt``.

    ``items`` are not modified: a flow with labels is copied with indices in their place.
    """
    index: dict[tuple[str, ...], int] = {}
    table: list[Sequence[str]] = []
    out: list[Wire] = []
    for w in items:
        sl, dl = w.get("sl"), w.get("dl")
        if sl is not None or dl is not None:
            w = dict(w)
            for key, labels in (("sl", sl), ("dl", dl)):
                if labels is None:
                    continue
                k = tuple(labels)
                i = index.get(k)
                if i is None:
                    i = index[k] = len(table)
                    table.append(labels)
                w[key] = i
        out.append(w)
    payload: dict[str, Any] = {"source": source, "items": out, "lost": lost}
    if table:
        payload[TABLE] = table
    return cast(bytes, msgpack.packb(payload, use_bin_type=True))


def resolve_tables(items: Sequence[Wire], table: Any) -> None:
    """Replace each flow's ``sl``/``dl`` index by its list from ``table`` (in place).

    Raises ``ValueError`` naming the field for a table that is not an array of string arrays
    or an index that is not one of its positions; ``items`` may then be partly resolved.
    """
    if not isinstance(table, (list, tuple)):
        raise ValueError(f"{TABLE}: expected an array of label arrays")
    for entry in table:
        if not isinstance(entry, (list, tuple)) or not all(type(s) is str for s in entry):
            raise ValueError(f"{TABLE}: every entry must be an array of strings")
    lookup = dict(enumerate(table))  # a dict: only 0..n-1 resolve (no negative indices)
    try:
        for w in items:
            if "sl" in w:
                w["sl"] = lookup[w["sl"]]
            if "dl" in w:
                w["dl"] = lookup[w["dl"]]
    except (KeyError, TypeError):
        raise ValueError(f"sl/dl: not an index into {TABLE} (of {len(table)})") from None


def envelope_items(payload: Any) -> list[Wire]:
    """The flows of an already decoded ``flows.<node>`` message (an envelope, its label table
    resolved, or a bare array); ``ValueError`` if it is neither or its table does not resolve."""
    if isinstance(payload, dict) and "items" in payload:
        items = payload["items"]
        if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
            raise ValueError("items must be an array of maps")
        if payload.get(TABLE) is not None:
            resolve_tables(items, payload[TABLE])
        return cast(list[Wire], items)
    if isinstance(payload, list) and all(isinstance(r, dict) for r in payload):
        return cast(list[Wire], payload)
    raise ValueError("expected an envelope {items, lost, lt} or an array of maps")
