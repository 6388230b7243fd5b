"""Numeric security identities: which id a new label set may take, and when an id may go.

Cilium allocates cluster identities in 256..65535 and local CIDR identities in the 1<<24
scope. Ids are picked at random among the free ones (as Cilium's id pool does) so that several
replicas choosing at the same moment rarely collide; the SQL primary key settles the rare
collision. An identity whose reference count drops to zero is kept, with its id, for a grace
period: a pod that comes back inside it gets the same id, and no other label set can take the
id while consumers may still hold it in their caches.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from enum import Enum

from ciliate.labels import (
    CIDR_IDENTITY_BASE,
    CLUSTER_IDENTITY_MAX,
    CLUSTER_IDENTITY_MIN,
    RESERVED,
    LabelSet,
)
from services.identity.core.cidr import is_cidr_label_set

CIDR_IDENTITY_MIN = CIDR_IDENTITY_BASE + 1
CIDR_IDENTITY_MAX = CIDR_IDENTITY_BASE + (1 << 24) - 1
DEFAULT_GRACE_SECONDS = 300.0
"""How long an unreferenced identity keeps its id (Cilium's identity GC interval is minutes)."""


class Scope(Enum):
    """Where an identity's number comes from: (lowest, highest) id, both inclusive."""

    CLUSTER = (CLUSTER_IDENTITY_MIN, CLUSTER_IDENTITY_MAX)
    CIDR = (CIDR_IDENTITY_MIN, CIDR_IDENTITY_MAX)

    @property
    def low(self) -> int:
        return self.value[0]

    @property
    def high(self) -> int:
        return self.value[1]

    def contains(self, ident: int) -> bool:
        return self.low <= ident <= self.high


class PoolExhausted(RuntimeError):
    """Every id of a scope is in use or still inside its grace period."""


def scope_of(labels: LabelSet) -> Scope:
    """``cidr:`` label sets (``reserved:world`` may ride along) get local CIDR identities;
    everything else a cluster identity."""
    if is_cidr_label_set(labels):
        return Scope.CIDR
    return Scope.CLUSTER


def reserved_identities() -> dict[int, list[str]]:
    """Reserved id -> its one ``reserved:`` label, as ``cilium-dbg identity list`` shows them."""
    return {int(ident): [ident.label] for ident in RESERVED}


def reserved_id_for(labels: LabelSet) -> int | None:
    """A label set that is exactly one reserved label maps to that reserved identity."""
    if len(labels) != 1:
        return None
    (label,) = tuple(labels)
    if label.source != "reserved":
        return None
    for ident in RESERVED:
        if ident.label_name == label.key:
            return int(ident)
    return None


@dataclass
class IdPool:
    """The ids of one scope that this allocator believes taken.

    ``taken`` is a cache of the table: it may miss ids another replica took a moment ago, which
    the database's primary key then rejects; call :meth:`mark_taken` and choose again.
    """

    scope: Scope = Scope.CLUSTER
    taken: set[int] = field(default_factory=set)
    rng: random.Random = field(default_factory=random.Random)

    @property
    def capacity(self) -> int:
        return self.scope.high - self.scope.low + 1

    def mark_taken(self, ids: Iterable[int]) -> None:
        self.taken.update(i for i in ids if self.scope.contains(i))

    def mark_free(self, ids: Iterable[int]) -> None:
        self.taken.difference_update(ids)

    def candidates(self, count: int, exclude: Collection[int] = ()) -> list[int]:
        """``count`` distinct free ids, at random; raises PoolExhausted if there are too few."""
        if count <= 0:
            return []
        free_count = self.capacity - len(self.taken) - len(exclude)
        if free_count < count:
            raise PoolExhausted(f"{self.scope.name.lower()} identities exhausted")
        chosen: set[int] = set()
        if free_count >= 4 * count and free_count * 4 >= self.capacity:
            # Sparse pool: rejection sampling costs O(count).
            while len(chosen) < count:
                ident = self.rng.randint(self.scope.low, self.scope.high)
                if ident not in self.taken and ident not in exclude:
                    chosen.add(ident)
            return sorted(chosen)
        free = [
            i
            for i in range(self.scope.low, self.scope.high + 1)
            if i not in self.taken and i not in exclude
        ]
        if len(free) < count:
            raise PoolExhausted(f"{self.scope.name.lower()} identities exhausted")
        return sorted(self.rng.sample(free, count))


@dataclass(frozen=True)
class RefState:
    """An identity's reference count and when it last dropped to zero (None while referenced)."""

    refcount: int
    released_at: float | None = None


def acquire(state: RefState, count: int = 1) -> RefState:
    """A new reference revives an identity inside its grace period."""
    return RefState(state.refcount + count, None)


def release(state: RefState, now: float, count: int = 1) -> RefState:
    """Drop references; never below zero. The grace period starts when the count reaches zero."""
    refcount = max(0, state.refcount - count)
    if refcount > 0:
        return RefState(refcount, None)
    return RefState(0, state.released_at if state.refcount == 0 else now)


def gc_due(state: RefState, now: float, grace: float = DEFAULT_GRACE_SECONDS) -> bool:
    """An identity may be deleted once it has been unreferenced for the whole grace period."""
    return (
        state.refcount == 0 and state.released_at is not None and now - state.released_at >= grace
    )


def gc_cutoff(now: float, grace: float = DEFAULT_GRACE_SECONDS) -> float:
    """Identities released at or before this time are due (the SQL form of :func:`gc_due`)."""
    return now - grace


class ParsedLabelSet(LabelSet):
    """A label set that computes its canonical key once (requests repeat the same sets)."""

    _canonical: str | None = None

    def canonical(self) -> str:
        if self._canonical is None:
            self._canonical = super().canonical()
        return self._canonical


@dataclass
class LabelSetParser:
    """Label strings as sent -> parsed set, remembered (bounded) so repeat requests skip the
    parsing and sorting that dominate a cached lookup."""

    limit: int = 200_000
    cache: dict[tuple[str, ...], ParsedLabelSet] = field(default_factory=dict)

    def parse(self, labels: Iterable[str]) -> ParsedLabelSet:
        raw = tuple(labels)
        parsed = self.cache.get(raw)
        if parsed is None:
            if len(self.cache) >= self.limit:
                self.cache.clear()
            parsed = self.cache[raw] = ParsedLabelSet(LabelSet.from_strings(raw))
        return parsed
