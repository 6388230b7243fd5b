"""The chunked ring behaves exactly as a plain list of the newest ``capacity`` records, whatever
the batch sizes that were appended, and holding batches as bus bytes changes no answer."""

from __future__ import annotations

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from ciliate.flows import pack_envelope
from services.events.core.filters import FilterSet, FlowFilter
from services.events.core.query import FlowQuery
from services.events.core.ring import Ring
from services.events.observer import Stream, fill_node

batches_st = st.lists(st.integers(0, 40), max_size=30)


def _fill(capacity: int, sizes: list[int]) -> tuple[Ring, list[dict[str, int]]]:
    ring = Ring(capacity)
    everything: list[dict[str, int]] = []
    for size in sizes:
        batch = [{"t": len(everything) + i} for i in range(size)]
        everything.extend(batch)
        ring.extend(batch)
    return ring, everything


@given(st.integers(1, 6).map(lambda n: 2**n - 1), batches_st, st.integers(0, 80))
def test_chunked_ring_matches_a_list_model(capacity: int, sizes: list[int], n: int) -> None:
    ring, everything = _fill(capacity, sizes)
    model = everything[-capacity:]
    assert [w["t"] for w in ring] == [w["t"] for w in model]
    assert len(ring) == len(model)
    assert ring.written == len(everything)
    assert ring.overwritten == len(everything) - len(model)
    assert [w["t"] for w in ring.last(n)] == [w["t"] for w in (model[-n:] if n else [])]


@given(st.integers(1, 6).map(lambda n: 2**n - 1), batches_st, st.integers(0, 600),
       st.one_of(st.none(), st.integers(0, 50)))
def test_read_from_any_sequence_counts_what_was_overwritten(
        capacity: int, sizes: list[int], seq: int, limit: int | None) -> None:
    ring, everything = _fill(capacity, sizes)
    result = ring.read_from(seq, limit)
    oldest = len(everything) - len(ring)
    start = max(seq, oldest)
    expected = everything[start:] if limit is None else everything[start:start + limit]
    assert [w["t"] for w in result.records] == [w["t"] for w in expected]
    assert result.lost == max(0, oldest - seq)
    written = len(everything)
    assert result.next_seq == (written if limit is None else min(written, start + limit))


def test_stream_holding_raw_batches_answers_history_like_one_holding_records() -> None:
    flows = [{"t": t, "v": 1 + t % 2, "sl": ["k8s:app=a"]} for t in range(10)]
    batches = [msgpack.packb({"source": "n1", "items": flows[i:i + 3], "lost": i % 2},
                             use_bin_type=True) for i in range(0, 10, 3)]
    raw = Stream("flows", 7, 100, fill_node, use_list=False, keep_raw=True)
    decoded = Stream("flows", 7, 100, fill_node, use_list=False)
    for stream in (raw, decoded):
        for data in batches:
            stream.ingest_bytes("n1", data)
    everything = FlowQuery(number=100, first=True)

    def untimed(records: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{k: v for k, v in w.items() if k != "t" or "k" not in w} for w in records]

    assert untimed(raw.query(everything)) == untimed(decoded.query(everything))
    held = [w for w in raw.query(FlowQuery()) if "k" not in w]
    assert [w["t"] for w in held] == [5, 6, 7, 8, 9]
    assert {w["n"] for w in held} == {"n1"}  # the node of the subject, filled in again
    assert raw.rings["n1"].overwritten == decoded.rings["n1"].overwritten == 5


def test_label_table_envelope_ingests_like_inline_labels_and_a_bad_table_is_counted() -> None:
    flows = [{"t": t, "v": 1 + t % 2, "sl": [f"k8s:app={'ab'[t % 2]}"], "dl": ["k8s:x=1"]}
             for t in range(10)]
    inline = [msgpack.packb({"source": "n1", "items": flows[i:i + 4], "lost": 0})
              for i in range(0, 10, 4)]
    tabled = [pack_envelope("n1", flows[i:i + 4], 0) for i in range(0, 10, 4)]
    label_b = FlowQuery(FilterSet([FlowFilter.from_json({"source_label": ["app=b"]})]))
    results = []
    for batches in (inline, tabled):
        stream = Stream("flows", 15, 100, fill_node, use_list=False, keep_raw=True)
        follower = stream.hub.add(label_b)
        for data in batches:
            stream.ingest_bytes("n1", data)
        live = follower.drain()
        assert [w["t"] for w in live] == [1, 3, 5, 7, 9]
        results.append((live, stream.query(FlowQuery(number=100))))
    assert results[0] == results[1]
    assert results[1][1][0]["sl"] == ("k8s:app=a",) and results[1][1][0]["dl"] == ("k8s:x=1",)

    stream = Stream("flows", 15, 100, fill_node, use_list=False, keep_raw=True)
    for bad in ({"items": [{"t": 1, "sl": 3}], "lost": 0, "lt": [["k8s:app=a"]]},
                {"items": [{"t": 1, "sl": 0}], "lost": 0, "lt": [[7]]},
                {"items": [{"t": 1, "sl": -1}], "lost": 0, "lt": [["a"]]}):
        assert stream.ingest_bytes("n1", msgpack.packb(bad)) == 0
    assert stream.bad_batches_total == 3 and stream.received_total == 0
