"""Ring-buffer records decoded in batches give exactly what one-by-one decoding gives, so the
agent's cheaper reader changes no flow a user sees."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.datapath.core.events import (
    EVENT_SIZE,
    EventDecoder,
    decode_batch,
    decode_event,
    encode_event,
)

_records = st.builds(
    lambda ts, src, dst, sport, dport, etype, verdict, reason, direction, proto, flags, match:
    encode_event(ts_ns=ts, src_identity=src, dst_identity=dst, src_ip="10.0.0.1",
                 dst_ip="10.244.3.200", src_port=sport, dst_port=dport, type=etype,
                 verdict=verdict, drop_reason=reason, direction=direction, proto=proto,
                 tcp_flags=flags, match_type=match),
    st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
    st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 255), st.integers(0, 255),
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
    st.integers(0, 255))


@given(st.lists(_records, max_size=40))
def test_batch_decode_equals_one_by_one(records: list[bytes]) -> None:
    assert decode_batch(b"".join(records)) == [decode_event(r) for r in records]


def test_decoder_batches_and_counts_short_records() -> None:
    dec = EventDecoder()
    good = encode_event(src_ip="10.0.0.2", dst_ip="10.0.0.1", dst_port=80, tcp_flags=0x02)
    dec.feed(good)
    dec.feed(good[:10])
    dec.feed(good + b"\0" * 8)  # a longer record (newer layout) keeps its known prefix
    flows = dec.drain()
    assert [f["dst_port"] for f in flows] == [80, 80] and flows[0]["tcp_flags"] == ["SYN"]
    assert dec.errors == 1 and dec.drain() == []
    assert len(good) == EVENT_SIZE
