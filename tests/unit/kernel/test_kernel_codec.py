"""The bus codec: plain data round-trips; hostile bytes raise DecodeError and nothing else."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.bus import codec

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)


@given(plain)
def test_plain_data_round_trips(value: object) -> None:
    assert codec.unpack(codec.pack(value)) == value


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    with contextlib.suppress(codec.DecodeError):
        codec.unpack(data)


def test_truncated_message_is_a_decode_error() -> None:
    data = codec.pack({"items": list(range(100))})
    with pytest.raises(codec.DecodeError):
        codec.unpack(data[:-3])


def test_oversized_payload_is_refused_before_decoding() -> None:
    with pytest.raises(codec.DecodeError, match="exceeds"):
        codec.unpack(b"\x00" * (codec.MAX_PAYLOAD + 1))
