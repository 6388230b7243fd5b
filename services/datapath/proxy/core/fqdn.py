"""The FQDN cache: which names each IP answered for, until when.

Allowed DNS answers teach it (name, IPs, TTL); each IP then stands for the set of names that
currently resolve to it, and that set is what the IP's identity is labelled with
(``fqdn:<name>`` beside ``cidr:<ip>/32`` and ``reserved:world``). A toFQDNs selector in policy
selects identities whose ``fqdn:`` labels match its matchName/matchPattern. When a record's TTL
(raised to ``min_ttl``) passes, the name drops out of the IP's set; an IP with no names left
loses its identity and ipcache entry.

Every mutation returns the IPs whose name set changed, so the caller re-allocates only those.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.datapath.proxy.core.rules import normalize_name

FQDN_SOURCE = "fqdn"
DEFAULT_MIN_TTL = 3600
"""Cilium's ``tofqdns-min-ttl`` default (one hour): short DNS TTLs (often 0-60 s) would
otherwise make a pod's allowed IPs flap while its connections to them are still open."""


@dataclass
class FQDNCache:
    min_ttl: int = 0
    """0 here (pure tests); the agent passes ``CILIATE_TOFQDNS_MIN_TTL`` (default
    :data:`DEFAULT_MIN_TTL`)."""
    _expiry: dict[str, dict[str, float]] = field(default_factory=dict)  # ip -> name -> expiry

    def learn(self, name: str, ips: Iterable[str], ttl: int, now: float) -> set[str]:
        """Record an answer; returns the IPs whose name set changed."""
        name = normalize_name(name)
        until = now + max(int(ttl), self.min_ttl)
        changed: set[str] = set()
        for ip in ips:
            ip = str(ipaddress.ip_address(ip))
            names = self._expiry.setdefault(ip, {})
            if name not in names:
                changed.add(ip)
            names[name] = max(names.get(name, 0.0), until)
        return changed

    def expire(self, now: float) -> set[str]:
        """Drop records whose time passed; returns the IPs whose name set changed."""
        changed: set[str] = set()
        for ip in list(self._expiry):
            names = self._expiry[ip]
            for name in [n for n, until in names.items() if until <= now]:
                del names[name]
                changed.add(ip)
            if not names:
                del self._expiry[ip]
        return changed

    def next_expiry(self) -> float | None:
        times = [t for names in self._expiry.values() for t in names.values()]
        return min(times) if times else None

    def names(self, ip: str) -> frozenset[str]:
        return frozenset(self._expiry.get(ip, {}))

    def ips(self) -> list[str]:
        return sorted(self._expiry)

    def lookup(self, name: str) -> list[str]:
        name = normalize_name(name)
        return sorted(ip for ip, names in self._expiry.items() if name in names)


def prefix_of(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    return f"{addr}/{addr.max_prefixlen}"


def identity_labels(ip: str, names: Iterable[str]) -> list[str]:
    """The label set of an FQDN-learned IP (names without the trailing dot, as Cilium shows)."""
    labels = [f"cidr:{prefix_of(ip)}", "reserved:world"]
    labels += [f"{FQDN_SOURCE}:{n.rstrip('.')}" for n in sorted(names)]
    return sorted(labels)
