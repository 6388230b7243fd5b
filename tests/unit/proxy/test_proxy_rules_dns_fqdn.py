"""Rule matching (HTTP, DNS names), the DNS codec, the FQDN cache and the policy view."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.datapath.proxy.core import dns
from services.datapath.proxy.core.fqdn import FQDNCache, identity_labels
from services.datapath.proxy.core.http import Head, Parser
from services.datapath.proxy.core.policy import PolicyView
from services.datapath.proxy.core.rules import DNSRule, HTTPRule, L7Rules


def head(raw: bytes) -> Head:
    ev = Parser().feed(raw)[0]
    assert isinstance(ev, Head)
    return ev


def test_http_rule_fields_are_anchored_regexes() -> None:
    rule = HTTPRule(method="POST", path="/v1/request-landing")
    assert rule.matches(head(b"POST /v1/request-landing HTTP/1.1\r\n\r\n"))
    assert not rule.matches(head(b"POST /v1/request-landing/x HTTP/1.1\r\n\r\n"))
    assert not rule.matches(head(b"PUT /v1/request-landing HTTP/1.1\r\n\r\n"))
    assert not rule.matches(head(b"POST /x/v1/request-landing HTTP/1.1\r\n\r\n"))
    assert HTTPRule(path="/public/.*").matches(head(b"GET /public/a/b HTTP/1.1\r\n\r\n"))
    assert HTTPRule(method="GET|HEAD").matches(head(b"HEAD / HTTP/1.1\r\n\r\n"))


def test_http_rule_host_and_headers() -> None:
    rule = HTTPRule(host="api\\.example\\.com", headers=("X-Token: s3cret", "X-Trace"))
    ok = head(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nx-token: s3cret\r\nX-Trace: 1\r\n\r\n")
    assert rule.matches(ok)
    assert not rule.matches(head(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Token: no\r\n"
                                 b"X-Trace: 1\r\n\r\n"))
    assert not rule.matches(head(b"GET / HTTP/1.1\r\nHost: api.example.com\r\nX-Token: s3cret"
                                 b"\r\n\r\n"))


def test_l7_rules_from_kv_entry_and_wildcard() -> None:
    rules = L7Rules.from_entry({"l7": {"http": [{"method": "GET", "path": "/ok"}]}})
    assert rules.allows_http(head(b"GET /ok HTTP/1.1\r\n\r\n"))
    assert rules.allows_http(head(b"GET /no HTTP/1.1\r\n\r\n")) is None
    wild = L7Rules.from_entry({"l7": {"http": [{"path": "/ok"}], "wildcard": True}})
    assert wild.allows_http(head(b"GET /no HTTP/1.1\r\n\r\n"))


@pytest.mark.parametrize(("rule", "name", "expected"), [
    (DNSRule(match_name="api.ciliate.test"), "API.ciliate.test.", True),
    (DNSRule(match_name="api.ciliate.test"), "x.api.ciliate.test", False),
    (DNSRule(match_pattern="*.ciliate.test"), "a.ciliate.test", True),
    (DNSRule(match_pattern="*.ciliate.test"), "ciliate.test", False),
    (DNSRule(match_pattern="*.ciliate.test"), "a.b.ciliate.test", False),
    (DNSRule(match_pattern="*.ciliate.test"), "a.ciliate.test.evil", False),
    (DNSRule(match_pattern="*"), "anything.at.all", True),
    (DNSRule(match_pattern="api*.ciliate.test"), "api-2.ciliate.test", True),
])
def test_dns_patterns_like_cilium(rule: DNSRule, name: str, expected: bool) -> None:
    assert rule.matches(name) is expected


def test_dns_roundtrip_and_refused() -> None:
    q = dns.query(0x1234, "a.ciliate.test")
    msg = dns.decode(q)
    assert msg.questions[0].name == "a.ciliate.test." and not msg.is_response
    answer = dns.response(msg, dns.Rcode.NOERROR, [
        dns.Record("a.ciliate.test.", dns.RRType.CNAME, 30, "b.ciliate.test."),
        dns.Record("b.ciliate.test.", dns.RRType.A, 5, "10.99.0.7"),
    ])
    back = dns.decode(dns.encode(answer))
    assert back.id == 0x1234 and back.is_response and back.ips == ["10.99.0.7"]
    assert back.answers[0].data == "b.ciliate.test."
    refused = dns.decode(dns.refused(q) or b"")
    assert refused.rcode == dns.Rcode.REFUSED and refused.id == 0x1234


def test_dns_compression_pointers_and_loops() -> None:
    q = bytearray(dns.query(1, "a.b"))
    # An answer whose name points back at the question name (offset 12).
    q[6:8] = b"\x00\x01"
    q += b"\xc0\x0c" + b"\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04" + bytes([1, 2, 3, 4])
    assert dns.decode(bytes(q)).answers[0].name == "a.b."
    loop = bytearray(dns.query(1, "a"))
    loop[12:] = b"\xc0\x0c" + b"\x00\x01\x00\x01"
    with pytest.raises(dns.DNSError):
        dns.decode(bytes(loop))


@given(st.binary(max_size=300))
def test_dns_fuzz_only_dns_error(data: bytes) -> None:
    with contextlib.suppress(dns.DNSError):
        dns.decode(data)


def test_fqdn_cache_ttl_min_ttl_and_expiry() -> None:
    cache = FQDNCache(min_ttl=2)
    assert cache.learn("a.ciliate.test", ["10.0.0.1", "10.0.0.2"], 1, now=100.0) == {
        "10.0.0.1", "10.0.0.2"}
    assert cache.learn("b.ciliate.test.", ["10.0.0.1"], 10, now=100.0) == {"10.0.0.1"}
    assert cache.learn("a.ciliate.test", ["10.0.0.1"], 1, now=100.5) == set()  # refresh only
    assert cache.expire(101.5) == set()  # min TTL 2 s holds the records
    assert cache.expire(102.6) == {"10.0.0.1", "10.0.0.2"}
    assert cache.names("10.0.0.1") == frozenset({"b.ciliate.test."})
    assert cache.ips() == ["10.0.0.1"]
    assert cache.expire(111.0) == {"10.0.0.1"} and cache.ips() == []


def test_fqdn_identity_labels() -> None:
    assert identity_labels("10.0.0.1", ["b.x.", "a.x."]) == [
        "cidr:10.0.0.1/32", "fqdn:a.x", "fqdn:b.x", "reserved:world"]


def policy_value(entries: list[dict[str, object]]) -> dict[str, object]:
    return {"identity": 1000, "revision": 1, "enforce": {"ingress": True, "egress": False},
            "entries": entries}


def entry(peer: int, port: int, proxy: int = 0, deny: bool = False, plen: int = 16,
          l7: dict[str, object] | None = None) -> dict[str, object]:
    e: dict[str, object] = {"peer": peer, "direction": "ingress", "proto": 6, "port": port,
                            "port_prefixlen": plen, "deny": deny, "proxy_port": proxy,
                            "cookies": ["c"]}
    if l7:
        e["l7"] = l7
    return e


def test_policy_view_finds_ingress_redirects_like_the_datapath() -> None:
    view = PolicyView(node="n1")
    view.set_endpoint("default.deathstar", {"identity": 1000, "ips": ["10.0.1.5"], "node": "n1",
                                            "namespace": "default", "name": "deathstar"})
    view.set_ipcache("10.0.1.9_32", {"prefix": "10.0.1.9/32", "identity": 1001})
    view.set_ipcache("10.0.2.0_24", {"prefix": "10.0.2.0/24", "identity": 1002})
    view.set_policy("1000", policy_value([
        entry(1001, 80, proxy=15001, l7={"http": [{"method": "POST"}]}),
        entry(1002, 80, deny=True),
        entry(0, 8080, proxy=15001, plen=13),
    ]))
    got = view.redirects("10.0.1.9", "10.0.1.5", 6, 80)
    assert [(r.direction, r.peer_identity, r.proxy_port) for r in got] == [("ingress", 1001, 15001)]
    assert got[0].rules.http[0].method == "POST"
    assert view.redirects("10.0.2.3", "10.0.1.5", 6, 80) == []  # deny wins
    assert len(view.redirects("10.0.3.3", "10.0.1.5", 6, 8083)) == 1  # any peer, port block
    assert view.redirects("10.0.3.3", "10.0.1.5", 6, 9000) == []
    view.set_endpoint("default.deathstar", None)
    assert view.redirects("10.0.1.9", "10.0.1.5", 6, 80) == []
