"""L7 rules as the proxy enforces them: HTTP (method, path, host, headers) and DNS names.

HTTP fields are regular expressions matched against the whole value, as Cilium hands them to
Envoy (``safe_regex`` full match; ``path`` against the request target, query included).
``headers`` entries are ``"Name"`` (present) or ``"Name: value"`` (present with that value).

DNS: ``matchName`` / ``matchPattern`` as :mod:`ciliate.matchpattern` defines them (the same
matcher the policy compiler uses for toFQDNs and the resources use for validation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ciliate.matchpattern import name_matches, normalize_name, pattern_matches, pattern_regex
from services.datapath.proxy.core.http import Head

__all__ = ["DNSRule", "HTTPRule", "L7Rules", "normalize_name", "pattern_regex"]


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@dataclass(frozen=True)
class HTTPRule:
    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[str, ...] = ()

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> HTTPRule:
        return cls(str(data.get("method") or ""), str(data.get("path") or ""),
                   str(data.get("host") or ""), tuple(data.get("headers") or ()))

    def validate(self) -> None:
        """Raise ``re.error`` for a field that is not a regular expression."""
        for value in (self.method, self.path, self.host):
            if value:
                _regex(value)

    def matches(self, head: Head) -> bool:
        if self.method and not _regex(self.method).fullmatch(head.method):
            return False
        if self.path and not _regex(self.path).fullmatch(head.target):
            return False
        if self.host and not _regex(self.host).fullmatch(head.header("host") or ""):
            return False
        for spec in self.headers:
            name, sep, want = spec.partition(":")
            have = head.header(name.strip())
            if have is None or (sep and have != want.strip()):
                return False
        return True

    def __str__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in (("method", self.method), ("path", self.path),
                                           ("host", self.host)) if v]
        parts += [f"header={h!r}" for h in self.headers]
        return "http{" + ", ".join(parts) + "}"


@dataclass(frozen=True)
class DNSRule:
    match_name: str = ""
    match_pattern: str = ""

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> DNSRule:
        return cls(str(data.get("matchName") or ""), str(data.get("matchPattern") or ""))

    def matches(self, name: str) -> bool:
        if self.match_name and name_matches(self.match_name, name):
            return True
        return bool(self.match_pattern) and pattern_matches(self.match_pattern, name)

    def __str__(self) -> str:
        if self.match_name:
            return f"matchName:{self.match_name}"
        return f"matchPattern:{self.match_pattern}"


@dataclass(frozen=True)
class L7Rules:
    """What one redirected policy entry allows at L7.

    ``wildcard``: another rule allows the same port without L7 rules, so every request passes
    (Cilium merges an L4-only allow with L7 rules into allow-all for that port).
    """

    http: tuple[HTTPRule, ...] = ()
    dns: tuple[DNSRule, ...] = ()
    wildcard: bool = False

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> L7Rules:
        l7 = entry.get("l7") or {}
        return cls(
            tuple(HTTPRule.from_data(r) for r in l7.get("http") or ()),
            tuple(DNSRule.from_data(r) for r in l7.get("dns") or ()),
            bool(l7.get("wildcard", False)),
        )

    def allows_http(self, head: Head) -> HTTPRule | bool | None:
        """The first matching rule, True when wildcarded, else None (deny)."""
        if self.wildcard or not (self.http or self.dns):
            return True
        for rule in self.http:
            if rule.matches(head):
                return rule
        return None

    def allows_dns(self, name: str) -> bool:
        if self.wildcard or not (self.http or self.dns):
            return True
        return any(rule.matches(name) for rule in self.dns)


def any_dns_match(rules: Iterable[DNSRule], name: str) -> bool:
    return any(r.matches(name) for r in rules)


def header_pairs(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers as flows carry them (names lower-cased, as Envoy reports them)."""
    return [(k.lower(), v) for k, v in headers]
