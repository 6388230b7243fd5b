"""Fast building blocks for Maglev: a NumPy MurmurHash3 and a compiled table fill.

Kept apart from ``maglev.py`` so the public module reads as the algorithm and this one as
the machinery that makes it fast. Everything here must give bit-identical results to the
plain-Python reference in ``maglev.py``; the unit tests check that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
F = TypeVar("F", bound=Callable[..., Any])

#: Marks a slot not yet filled; backend ids must stay below it (Cilium uses the same value).
EMPTY_SLOT = 0xFFFF_FFFF

_C1 = np.uint64(0x87C37B91114253D5)
_C2 = np.uint64(0x4CF5AD432745937F)
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_N1 = np.uint64(0x52DCE729)
_N2 = np.uint64(0x38495AB5)
_FIVE = np.uint64(5)
_S33 = np.uint64(33)
# The two 64-bit lanes (k1, k2) of a block are mixed alike with swapped constants and
# rotations, so they are processed together as rows of one (2, N) array.
_LANE_MUL_IN = np.array([[_C1], [_C2]], dtype=np.uint64)
_LANE_MUL_OUT = np.array([[_C2], [_C1]], dtype=np.uint64)
_LANE_ROT = np.array([[31], [33]], dtype=np.uint64)
_LANE_ROT_BACK = np.uint64(64) - _LANE_ROT


_ROT = {r: (np.uint64(r), np.uint64(64 - r)) for r in (27, 31)}


def _rotl(x: U64, r: int) -> U64:
    left, right = _ROT[r]
    return (x << left) | (x >> right)


def _mix_lanes(k: U64) -> U64:
    """k1 = rotl(k1 * c1, 31) * c2 and k2 = rotl(k2 * c2, 33) * c1 on a (2, N) array."""
    k = k * _LANE_MUL_IN
    k = (k << _LANE_ROT) | (k >> _LANE_ROT_BACK)
    return k * _LANE_MUL_OUT


def _fmix(k: U64) -> U64:
    k = k ^ (k >> _S33)
    k = k * _FMIX1
    k = k ^ (k >> _S33)
    k = k * _FMIX2
    return k ^ (k >> _S33)


def murmur3_x64_128(keys: Sequence[bytes], seed: int) -> tuple[U64, U64]:
    """MurmurHash3 x64 128-bit of every key at once, as ``(h1, h2)`` uint64 arrays.

    Keys are zero-padded into one byte matrix read as little-endian 64-bit words, so the
    whole batch runs as a few dozen array operations (uint64 arrays wrap on overflow, as
    the reference C code does). Rows with fewer 16-byte blocks keep their state through
    the extra rounds by masking; the tail needs no mask because an all-zero tail word
    mixes to zero and XORs in nothing.
    """
    count = len(keys)
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=count)
    width = (int(lengths.max(initial=0)) // 16 + 1) * 16
    matrix = np.frombuffer(b"".join(k.ljust(width, b"\0") for k in keys), dtype=np.uint8)
    # (2, count, blocks + 1): lane 0 holds the first word of every block, lane 1 the second.
    words = matrix.view("<u8").astype(np.uint64).reshape(count, width // 16, 2).transpose(2, 0, 1)
    blocks = lengths // 16
    all_rows_from = int(blocks.min(initial=0))

    h1 = np.full(count, seed, dtype=np.uint64)
    h2 = h1.copy()
    for b in range(int(blocks.max(initial=0))):
        k1, k2 = _mix_lanes(words[:, :, b])
        n1 = (_rotl(h1 ^ k1, 27) + h2) * _FIVE + _N1
        n2 = (_rotl(h2 ^ k2, 31) + n1) * _FIVE + _N2
        if b < all_rows_from:
            h1, h2 = n1, n2
        else:
            live = blocks > b
            h1 = np.where(live, n1, h1)
            h2 = np.where(live, n2, h2)

    t1, t2 = _mix_lanes(words[:, np.arange(count), blocks])
    ulen = lengths.astype(np.uint64)
    h1 = h1 ^ t1 ^ ulen
    h2 = h2 ^ t2 ^ ulen
    h1 = h1 + h2
    h2 = h2 + h1
    h1, h2 = _fmix(np.stack((h1, h2)))
    h1 = h1 + h2
    h2 = h2 + h1
    return h1, h2


def offsets_and_skips(keys: Sequence[bytes], m: int, seed: int) -> tuple[I64, I64]:
    """Each key's permutation start and stride: ``h1 % m`` and ``h2 % (m - 1) + 1``."""
    h1, h2 = murmur3_x64_128(keys, seed)
    offsets = (h1 % np.uint64(m)).astype(np.int64)
    skips = (h2 % np.uint64(m - 1)).astype(np.int64) + 1
    return offsets, skips


def _fill_table_py(
    offsets: I64,
    skips: I64,
    weights: I64,
    ids: U32,
    m: int,
    weights_used: bool,
    weight_sum: int,
) -> U32:
    """Cilium's fill loop, walking each permutation on the fly (no M x N matrix).

    ``cursor[i]`` is backend i's next permutation entry ``(offset + j * skip) % m``;
    stepping it by ``skip`` with one conditional subtraction replaces the modulo.
    Turn-taking with weights follows Cilium: a backend whose counter is ahead of
    ``(n + 1) * weight`` passes its turn to the next one. Probing reads a one-byte
    "taken" map rather than the uint32 table so the hot loop stays in L1/L2 cache.
    """
    count = offsets.shape[0]
    entry = np.full(m, EMPTY_SLOT, dtype=np.uint32)
    taken = np.zeros(m, dtype=np.uint8)  # 1 byte a slot keeps the probe loop in L1/L2
    cursor = offsets.copy()
    counter = weights.astype(np.float64) / count
    turn = 0  # n % count without a division per slot
    for n in range(m):
        i = turn
        turn += 1
        if turn == count:
            turn = 0
        while True:
            if weights_used:
                if (n + 1) * weights[i] < np.int64(counter[i]):
                    i += 1
                    if i == count:
                        i = 0
                    continue
                counter[i] += weight_sum
            break
        c = cursor[i]
        step = skips[i]
        while taken[c]:
            c += step
            if c >= m:
                c -= m
        taken[c] = 1
        entry[c] = ids[i]
        c += step
        if c >= m:
            c -= m
        cursor[i] = c
    return entry


def _compile(func: F) -> F:
    """``numba.njit`` with an on-disk cache when a cache location is writable, else without.

    Numba refuses ``cache=True`` at decoration time when neither the source folder nor
    its user cache folder is writable (a read-only install); the kernel then compiles on
    first use in each process instead of failing to import.
    """
    from numba import njit

    try:
        compiled = njit(cache=True, nogil=True)(func)
    except RuntimeError:
        compiled = njit(cache=False, nogil=True)(func)
    return cast(F, compiled)


fill_table = _compile(_fill_table_py)
