"""msgpack encoding of bus payloads, in one place.

Payloads are plain data (dicts, lists, str, int, float, bool, None, bytes). Decoding never
executes anything and refuses oversize or non-UTF-8 strings with :class:`DecodeError`.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_PAYLOAD = 8 * 1024 * 1024


class DecodeError(ValueError):
    """A message on the bus was not valid msgpack of the expected shape."""


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    if len(data) > MAX_PAYLOAD:
        raise DecodeError(f"payload of {len(data)} bytes exceeds {MAX_PAYLOAD}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise DecodeError(f"invalid msgpack: {exc}") from None
    except Exception as exc:  # msgpack raises assorted types on hostile input
        raise DecodeError(f"invalid msgpack: {type(exc).__name__}") from None
