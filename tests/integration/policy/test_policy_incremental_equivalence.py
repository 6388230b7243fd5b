"""Incremental updates (new/removed identities, replaced policies, named ports) leave every map
exactly as a full compile from scratch would: the service publishes only these deltas."""

from __future__ import annotations

import random

from ciliate.resources.registry import parse_resource
from services.policy.core.compile import IdentityWorld, PolicyEngine
from services.policy.core.spec import PolicySet, normalize
from services.policy.core.synthetic import generate, identities
from services.policy.core.world import SequentialCIDRAllocator, reserved_identities


def _policies(count: int, seed: int) -> PolicySet:
    docs = generate(seed=seed, count=count).policy_docs
    return normalize([parse_resource(d) for d in docs])  # type: ignore[misc]


def _maps(engine: PolicyEngine) -> dict[int, object]:
    return {i: (p.enforce, p.entries) for i, p in engine.compiled.items()}


def _full(policies: PolicySet, idents: dict[int, object], alloc: SequentialCIDRAllocator
          ) -> PolicyEngine:
    engine = PolicyEngine(policies, IdentityWorld(dict(idents)), allocate_cidr=alloc)  # type: ignore[arg-type]
    engine.compile_all()
    return engine


def test_adding_and_removing_identities_matches_a_full_compile() -> None:
    rng = random.Random(7)
    world = {**reserved_identities(), **identities(namespaces=20)}
    policies = _policies(120, seed=3)
    alloc = SequentialCIDRAllocator()
    late = rng.sample(sorted(i for i in world if i >= 256), 25)
    engine = _full(policies, {i: v for i, v in world.items() if i not in late}, alloc)
    for ident in late:
        engine.add_identity(ident, world[ident])
    full = _maps(_full(policies, world, alloc))
    assert _maps(engine) == full
    engine.compile_all()  # every map again, from the rules' cached (extended) contributions
    assert _maps(engine) == full
    gone = late[:10]
    for ident in gone:
        engine.remove_identity(ident)
    rest = {i: v for i, v in world.items() if i not in gone}
    assert _maps(engine) == _maps(_full(policies, rest, alloc))


def test_replacing_policies_matches_a_full_compile() -> None:
    world = {**reserved_identities(), **identities(namespaces=20)}
    alloc = SequentialCIDRAllocator()
    before, after = _policies(80, seed=5), _policies(120, seed=5)
    engine = _full(before, world, alloc)
    engine.replace_policies(after, alloc)
    expected = _full(after, {**world, **{i: ls for i, ls in engine.cache.identities.items()
                                         if i >= 1 << 24}}, alloc)
    assert _maps(engine) == _maps(expected)
    engine.replace_policies(before, alloc)
    assert _maps(engine) == _maps(_full(before, engine.cache.identities, alloc))
