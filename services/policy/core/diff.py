"""Reachability diff for ``apply --dry-run``: which endpoints gain or lose which peers and ports.

Both sides are judged by the same lookup the datapath does (egress at the source's map, ingress
at the destination's). Probed ports are the ones the changed maps name (exact ports, the first
port of each range block, the endpoints' container ports) plus "any port" for L3-only entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.policy.core.compile import IdentityPolicy, lookup
from services.policy.core.spec import PROTOCOL_NUMBERS, Direction

PROTOCOL_NAMES = {v: k for k, v in PROTOCOL_NUMBERS.items() if v}


@dataclass(frozen=True)
class Actor:
    """A traffic end: a pod (``ns/name``, a local identity with a map) or a CIDR (no map)."""

    name: str
    identity: int
    local: bool


Probe = tuple[int, int]
"""(protocol, port); port 0 = any port."""


def _allowed(
    policies: Mapping[int, IdentityPolicy], src: Actor, dst: Actor, proto: int, port: int
) -> bool:
    if src.local:
        eg = lookup(policies.get(src.identity), dst.identity, Direction.EGRESS, proto, port)
        if not eg.allowed:
            return False
    if dst.local:
        ig = lookup(policies.get(dst.identity), src.identity, Direction.INGRESS, proto, port)
        if not ig.allowed:
            return False
    return True


def changed_identities(
    before: Mapping[int, IdentityPolicy], after: Mapping[int, IdentityPolicy]
) -> set[int]:
    out = set()
    for ident in set(before) | set(after):
        b, a = before.get(ident), after.get(ident)
        if b is None or a is None or b.entries != a.entries or b.enforce != a.enforce:
            out.add(ident)
    return out


def probes_for(
    policies: Iterable[IdentityPolicy], extra: Iterable[Probe] = ()
) -> list[Probe]:
    found: set[Probe] = set(extra)
    for pol in policies:
        for key in pol.entries:
            if key.proto:
                found.add((key.proto, key.port))
    if not found:
        found.add((PROTOCOL_NUMBERS["TCP"], 0))
    return sorted(found)


def probe_text(proto: int, port: int) -> str:
    name = PROTOCOL_NAMES.get(proto, str(proto))
    return f"{port if port else 'any'}/{name}"


def reachability_diff(
    before: Mapping[int, IdentityPolicy],
    after: Mapping[int, IdentityPolicy],
    actors: Iterable[Actor],
    extra_probes: Iterable[Probe] = (),
    limit: int = 1000,
) -> list[str]:
    """``+ src -> dst PORT/PROTO`` for pairs that become allowed, ``-`` for ones that stop."""
    changed = changed_identities(before, after)
    if not changed:
        return []
    everyone = sorted(actors, key=lambda a: a.name)
    probes = probes_for(
        [p for i in changed for p in (before.get(i), after.get(i)) if p is not None],
        extra_probes,
    )
    lines: list[str] = []
    for src in everyone:
        for dst in everyone:
            if src.name == dst.name or not (src.local or dst.local):
                continue
            if not ((src.local and src.identity in changed) or
                    (dst.local and dst.identity in changed)):
                continue
            for proto, port in probes:
                was = _allowed(before, src, dst, proto, port)
                now = _allowed(after, src, dst, proto, port)
                if was != now:
                    sign = "+" if now else "-"
                    lines.append(f"{sign} {src.name} -> {dst.name} {probe_text(proto, port)}")
                    if len(lines) >= limit:
                        lines.append(f"... (stopped after {limit} changes)")
                        return lines
    return lines
