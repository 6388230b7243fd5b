"""Maglev consistent hashing computed exactly as Cilium computes it (pkg/maglev).

Every replica of the lb service, after any restart, must produce the same table bytes for
the same backends, and the tables must match what a Cilium agent with the same seed would
build, so the choices below copy Cilium's and must not drift:

* hash: MurmurHash3 x64 128-bit of the backend's key string, seeded with the first four
  bytes (big-endian) of the base64 cluster seed (``--bpf-lb-maglev-hash-seed``);
* ``offset = h1 % M``, ``skip = h2 % (M - 1) + 1``; permutation entry j is
  ``(offset + j * skip) % M``;
* backends sorted by key string (the same on every node, unlike node-local ids);
* round-robin fill with Cilium's weighted turn-taking (after Envoy's weighted Maglev).

``build_table`` is the fast path (NumPy hashing, compiled fill, no M x N matrix);
``build_table_reference`` is the same algorithm written plainly, used to check it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass

import mmh3
import numpy as np
import numpy.typing as npt

from services.lb.core.maglev_kernel import (
    EMPTY_SLOT,
    fill_table,
    offsets_and_skips,
)

#: Table sizes Cilium accepts for ``--bpf-lb-maglev-table-size`` (all prime).
SUPPORTED_SIZES: tuple[int, ...] = (
    251,
    509,
    1021,
    2039,
    4093,
    8191,
    16381,
    32749,
    65521,
    131071,
)
DEFAULT_TABLE_SIZE = 16381
#: Cilium's built-in default ``--bpf-lb-maglev-hash-seed`` (12 random bytes, base64).
DEFAULT_HASH_SEED = "JLfvgnHc2kaSUFaI"
#: Largest usable backend id: Cilium's BackendID is uint32 and all-ones marks an empty slot.
MAX_BACKEND_ID = EMPTY_SLOT - 1
#: Cilium keeps backend weights in a uint16.
MAX_WEIGHT = 0xFFFF

Table = npt.NDArray[np.uint32]


@dataclass(frozen=True)
class MaglevBackend:
    """One backend as Maglev sees it.

    ``id`` is what the table stores (node-local in Cilium, so it never influences the
    layout); ``key`` is what is hashed and sorted (see :func:`backend_hash_key`);
    ``weight`` 0 means "in the set but never picked" and keeps it out of the table.
    """

    id: int
    key: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.id <= MAX_BACKEND_ID:
            raise ValueError(f"id: {self.id} is outside 0..{MAX_BACKEND_ID}")
        if not self.key:
            raise ValueError("key: must not be empty")
        if not 0 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight: {self.weight} is outside 0..{MAX_WEIGHT}")


def backend_hash_key(
    address: str,
    port: int,
    protocol: str = "TCP",
    *,
    internal: bool = False,
    cluster_id: int = 0,
) -> str:
    """The string Cilium hashes and sorts a backend by (``BackendInfo.setHashString``).

    ``[10.0.0.1:80/TCP,State:active]``, IPv6 as ``[[fd00::1]:80/TCP,State:active]``, a
    ``/i`` after the protocol for the internal-traffic scope and ``@<id>`` after the address
    for a non-zero cluster id. Cilium froze this format so tables agree across upgrades;
    the state is always written as ``active`` whatever the backend's real state.
    """
    ip = ipaddress.ip_address(address)
    addr = str(ip) if cluster_id == 0 else f"{ip}@{cluster_id}"
    host = f"[{addr}]" if ip.version == 6 else addr
    scope = "/i" if internal else ""
    return f"[{host}:{port}/{protocol.upper()}{scope},State:active]"


def murmur_seed(hash_seed: str = DEFAULT_HASH_SEED) -> int:
    """The 32-bit murmur seed inside a base64 Maglev seed: its first 4 bytes, big-endian.

    The other 8 bytes seed the datapath's jhash of the 5-tuple, which is not ours.
    """
    try:
        raw = base64.b64decode(hash_seed, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"seed: cannot decode base64 Maglev hash seed {hash_seed!r}") from exc
    if len(raw) != 12:
        raise ValueError(f"seed: decoded hash seed is {len(raw)} bytes (not 12 bytes)")
    return int.from_bytes(raw[:4], "big")


def _seed_value(seed: str | int) -> int:
    if isinstance(seed, str):
        return murmur_seed(seed)
    if not 0 <= seed <= 0xFFFF_FFFF:
        raise ValueError(f"seed: {seed} is not a 32-bit murmur seed")
    return seed


def _prepare(backends: Sequence[MaglevBackend], m: int) -> list[MaglevBackend]:
    """Validate, drop weight-0 backends and sort by key: the order every replica agrees on."""
    if m not in SUPPORTED_SIZES:
        raise ValueError(f"m: {m} is not one of the supported sizes {SUPPORTED_SIZES}")
    keys = {b.key for b in backends}
    ids = {b.id for b in backends}
    if len(keys) != len(backends):
        raise ValueError("backends: two backends share a key")
    if len(ids) != len(backends):
        raise ValueError("backends: two backends share an id")
    chosen = sorted((b for b in backends if b.weight > 0), key=lambda b: b.key)
    if not chosen:
        raise ValueError("backends: no backend with a weight above 0")
    return chosen


def build_table(
    backends: Sequence[MaglevBackend],
    m: int = DEFAULT_TABLE_SIZE,
    seed: str | int = DEFAULT_HASH_SEED,
) -> Table:
    """The Maglev lookup table: ``m`` backend ids, the same for the same set in any order.

    ``seed`` is the base64 cluster seed (as Cilium's flag takes it) or the 32-bit murmur
    seed itself. Raises ``ValueError`` for an unsupported size, duplicate keys or ids, or
    when no backend has a weight above 0.
    """
    chosen = _prepare(backends, m)
    offsets, skips = offsets_and_skips([b.key.encode() for b in chosen], m, _seed_value(seed))
    weights = np.fromiter((b.weight for b in chosen), dtype=np.int64, count=len(chosen))
    ids = np.fromiter((b.id for b in chosen), dtype=np.uint32, count=len(chosen))
    weight_sum = int(weights.sum())
    weights_used = weight_sum // len(chosen) > 1
    return fill_table(offsets, skips, weights, ids, m, weights_used, weight_sum)


def build_table_reference(
    backends: Sequence[MaglevBackend],
    m: int = DEFAULT_TABLE_SIZE,
    seed: str | int = DEFAULT_HASH_SEED,
) -> Table:
    """The same table computed the plain way (mmh3, Python ints, lists) to check the fast one."""
    chosen = _prepare(backends, m)
    murmur = _seed_value(seed)
    count = len(chosen)
    permutation_start: list[int] = []
    permutation_skip: list[int] = []
    for backend in chosen:
        h1, h2 = mmh3.hash64(backend.key.encode(), murmur, signed=False)
        permutation_start.append(h1 % m)
        permutation_skip.append(h2 % (m - 1) + 1)

    weight_sum = sum(b.weight for b in chosen)
    weights_used = weight_sum // count > 1
    counter = [b.weight / count for b in chosen]
    taken = [0] * count
    entry = [EMPTY_SLOT] * m
    for n in range(m):
        i = n % count
        while True:
            if weights_used:
                if (n + 1) * chosen[i].weight < int(counter[i]):
                    i = (i + 1) % count
                    continue
                counter[i] += weight_sum
            slot = (permutation_start[i] + taken[i] * permutation_skip[i]) % m
            while entry[slot] != EMPTY_SLOT:
                taken[i] += 1
                slot = (permutation_start[i] + taken[i] * permutation_skip[i]) % m
            entry[slot] = chosen[i].id
            taken[i] += 1
            break
    return np.array(entry, dtype=np.uint32)


def table_bytes(table: Table) -> bytes:
    """The table as compact little-endian uint32s: 4 x M bytes, what the KV stores."""
    return np.ascontiguousarray(table, dtype="<u4").tobytes()


def table_from_bytes(data: bytes) -> Table:
    """The inverse of :func:`table_bytes`."""
    if len(data) % 4:
        raise ValueError("data: length is not a multiple of 4")
    return np.frombuffer(data, dtype="<u4").astype(np.uint32)


def pick_random(backends: Sequence[MaglevBackend], rng: random.Random) -> MaglevBackend:
    """The ``random`` algorithm: any backend with a weight above 0, uniformly.

    Like Cilium's random selection, weights beyond "0 = never" do not bias the pick.
    """
    candidates = [b for b in backends if b.weight > 0]
    if not candidates:
        raise ValueError("backends: no backend with a weight above 0")
    return candidates[rng.randrange(len(candidates))]
