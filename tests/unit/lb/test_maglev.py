"""Maglev tables: Cilium's algorithm, the fast build equal to the plain one, and the
consistency properties the load balancer relies on (even shares, small disruption)."""

from __future__ import annotations

import base64
import itertools
import random
from collections.abc import Callable, Iterator

import mmh3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.lb.core.maglev import (
    DEFAULT_HASH_SEED,
    DEFAULT_TABLE_SIZE,
    SUPPORTED_SIZES,
    MaglevBackend,
    Table,
    backend_hash_key,
    build_table,
    build_table_reference,
    murmur_seed,
    pick_random,
    table_bytes,
    table_from_bytes,
)
from services.lb.core.maglev_kernel import murmur3_x64_128

SMALL_SIZES = (251, 509, 1021)


@pytest.fixture(scope="module", autouse=True)
def compiled_kernel() -> Iterator[None]:
    """Compile (or load from cache) the fill once, so no example pays for it."""
    build_table([MaglevBackend(0, "warm-up")], 251)
    yield


def pod_backends(count: int, port: int = 8080) -> list[MaglevBackend]:
    return [
        MaglevBackend(i, backend_hash_key(f"10.244.{i // 250}.{i % 250 + 1}", port))
        for i in range(count)
    ]


@st.composite
def backend_sets(draw: st.DrawFn, max_size: int = 20) -> list[MaglevBackend]:
    keys = draw(
        st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=max_size, unique=True)
    )
    weights = draw(
        st.lists(st.integers(min_value=0, max_value=300), min_size=len(keys), max_size=len(keys))
    )
    if not any(weights):
        weights[0] = 1
    ids = draw(st.permutations(range(len(keys))))
    return [MaglevBackend(i, k, w) for i, k, w in zip(ids, keys, weights, strict=True)]


# --- Cilium's constants and key format ------------------------------------------------


def test_default_seed_is_cilium_default_and_uses_first_four_bytes_big_endian() -> None:
    assert DEFAULT_HASH_SEED == "JLfvgnHc2kaSUFaI"
    assert DEFAULT_TABLE_SIZE == 16381
    assert murmur_seed() == 0x24B7EF82
    assert SUPPORTED_SIZES[0] == 251 and SUPPORTED_SIZES[-1] == 131071


@pytest.mark.parametrize("seed", ["not base64!", base64.b64encode(b"short").decode()])
def test_bad_seed_is_refused(seed: str) -> None:
    with pytest.raises(ValueError, match="seed"):
        build_table(pod_backends(3), 251, seed)


def test_hash_key_matches_cilium_backend_string() -> None:
    assert backend_hash_key("10.0.0.1", 80) == "[10.0.0.1:80/TCP,State:active]"
    assert backend_hash_key("fd00::0001", 53, "udp") == "[[fd00::1]:53/UDP,State:active]"
    assert (
        backend_hash_key("10.0.0.1", 80, internal=True, cluster_id=3)
        == "[10.0.0.1@3:80/TCP/i,State:active]"
    )


@given(data=st.binary(max_size=80), seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_vectorized_murmur3_equals_mmh3(data: bytes, seed: int) -> None:
    batch = [data, data[:7], data + b"x" * 17, b""]
    h1, h2 = murmur3_x64_128(batch, seed)
    for key, a, b in zip(batch, h1, h2, strict=True):
        assert (int(a), int(b)) == mmh3.hash64(key, seed, signed=False)


# Cilium's pkg/maglev TestReproducible: M=251, default seed, backends 0.0.0.{1,3,4,5} on
# ports 1,3,4,5/TCP with weights 2/13/111/10 and ids 0..3; the table run-length encoded.
CILIUM_REPRODUCIBLE_251 = (
    "2(5),3(1),2(3),1(1),2(2),0(1),2(1),3(1),2(1),3(1),2(1),1(1),2(7),1(1),2(14),3(1),2(1),"
    "1(2),2(12),3(1),2(3),1(1),2(4),3(1),2(8),3(1),2(2),1(1),2(16),1(2),2(3),3(1),2(11),1(2),"
    "2(4),3(1),2(3),1(1),2(4),3(1),2(1),0(1),1(1),2(8),1(1),2(7),1(1),2(4),3(1),2(1),3(1),2(9),"
    "1(2),2(5),1(1),2(7),3(1),2(1),3(1),1(1),2(8),1(1),2(4),0(1),2(1),1(1),2(5),3(1),2(3),1(1),"
    "2(4),3(1),2(3),1(1),2(12),0(1),3(1),2(3),3(1),2(4),3(1),2(2),1(1),2(7)"
)


@pytest.mark.parametrize("build", [build_table, build_table_reference])
def test_table_is_bit_identical_to_cilium_reproducible_table(
    build: Callable[..., Table],
) -> None:
    weights = {1: 2, 3: 13, 4: 111, 5: 10}
    backends = [
        MaglevBackend(i, backend_hash_key(f"0.0.0.{a}", a), w)
        for i, (a, w) in enumerate(weights.items())
    ]
    table = build(backends, 251)
    runs = ",".join(f"{i}({len(list(g))})" for i, g in itertools.groupby(table.tolist()))
    assert runs == CILIUM_REPRODUCIBLE_251


def test_weighted_counts_match_cilium_test_suite() -> None:
    """Cilium's TestWeightedBackendWithRemoval: weights 2/13/111/10 at M=1021."""
    weights = {"one": 2, "three": 13, "two": 111, "tzwe": 10}
    backends = [MaglevBackend(i, key, w) for i, (key, w) in enumerate(weights.items())]
    before = build_table(backends, 1021)
    assert np.bincount(before).tolist() == [16, 98, 832, 75]

    after = build_table(backends[1:], 1021)
    kept = before != 0
    assert 0 not in after
    assert (after[kept] != before[kept]).sum() / 1021 < 0.01


# --- the fast build is the plain algorithm --------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    backends=backend_sets(),
    m=st.sampled_from(SMALL_SIZES),
    seed=st.one_of(
        st.integers(min_value=0, max_value=2**32 - 1),
        st.binary(min_size=12, max_size=12).map(lambda b: base64.b64encode(b).decode()),
    ),
)
def test_fast_build_equals_reference(
    backends: list[MaglevBackend], m: int, seed: int | str
) -> None:
    fast = build_table(backends, m, seed)
    assert fast.dtype == np.uint32 and fast.shape == (m,)
    assert table_bytes(fast) == table_bytes(build_table_reference(backends, m, seed))


@settings(max_examples=30, deadline=None)
@given(backends=backend_sets(), data=st.data())
def test_input_order_does_not_matter(backends: list[MaglevBackend], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(backends))
    assert table_bytes(build_table(backends, 1021)) == table_bytes(build_table(shuffled, 1021))


def test_table_bytes_are_little_endian_u32_and_round_trip() -> None:
    table = build_table(pod_backends(5), 251)
    raw = table_bytes(table)
    assert len(raw) == 4 * 251
    assert int.from_bytes(raw[:4], "little") == table[0]
    assert np.array_equal(table_from_bytes(raw), table)


def test_weight_zero_backends_never_appear() -> None:
    backends = [*pod_backends(4), MaglevBackend(99, "drained", 0)]
    table = build_table(backends, 509)
    assert 99 not in table
    assert set(table.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("backends", "m", "field"),
    [
        (pod_backends(2), 1000, "m"),
        ([MaglevBackend(0, "a"), MaglevBackend(1, "a")], 251, "share a key"),
        ([MaglevBackend(0, "a"), MaglevBackend(0, "b")], 251, "share an id"),
        ([MaglevBackend(0, "a", 0)], 251, "no backend"),
        ([], 251, "no backend"),
    ],
)
def test_bad_input_is_refused(backends: list[MaglevBackend], m: int, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_table(backends, m)


# --- consistency properties -----------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=80),
    salt=st.integers(min_value=0, max_value=10**6),
)
def test_each_share_is_within_one_percent_of_its_weight_share(
    weights: list[int], salt: int
) -> None:
    m = min(size for size in SUPPORTED_SIZES if size >= 100 * len(weights))
    backends = [MaglevBackend(i, f"b{salt}-{i}", w) for i, w in enumerate(weights)]
    counts = np.bincount(build_table(backends, m), minlength=len(weights))
    total = sum(weights)
    for backend in backends:
        assert abs(counts[backend.id] / m - backend.weight / total) <= 0.01


@settings(max_examples=20, deadline=None)
@given(count=st.integers(min_value=1, max_value=300))
def test_equal_weights_split_the_table_evenly(count: int) -> None:
    m = min(size for size in SUPPORTED_SIZES if size >= 100 * count)
    counts = np.bincount(build_table(pod_backends(count), m), minlength=count)
    assert set(counts.tolist()) <= {m // count, m // count + 1}


@pytest.mark.parametrize(("m", "max_moved"), [(16381, 0.02), (65521, 0.01)])
def test_removing_one_of_100_moves_few_other_slots_and_adding_back_restores(
    m: int, max_moved: float
) -> None:
    backends = pod_backends(100)
    before = build_table(backends, m)
    for removed in random.Random(m).sample(range(100), 5):
        after = build_table([b for b in backends if b.id != removed], m)
        assert removed not in after
        others = before != removed
        assert (after[others] != before[others]).mean() <= max_moved
        restored = build_table([*backends[removed:], *backends[:removed]], m)
        assert table_bytes(restored) == table_bytes(before)


# --- random selection -----------------------------------------------------------------


def test_pick_random_covers_every_live_backend_and_skips_weight_zero() -> None:
    backends = [*pod_backends(3), MaglevBackend(7, "drained", 0)]
    rng = random.Random(5)
    picked = {pick_random(backends, rng).id for _ in range(200)}
    assert picked == {0, 1, 2}
    with pytest.raises(ValueError, match="no backend"):
        pick_random([MaglevBackend(7, "drained", 0)], rng)
