"""rules.dns and toFQDNs: validation, matchPattern semantics, compile, incremental selection."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.labels import CIDR_IDENTITY_BASE, LabelSet
from ciliate.matchpattern import check_match_pattern, normalize_name, pattern_matches
from ciliate.policymap import iter_entries
from ciliate.resources import ResourceError, parse_resource
from ciliate.resources.ciliumpolicy import CiliumNetworkPolicy
from services.datapath.proxy.core.policy import IdentityEntries
from services.policy.core.compile import (
    DNS_PROXY_PORT,
    EntryKey,
    IdentityWorld,
    PolicyEngine,
    Verdict,
    lookup,
)
from services.policy.core.kv import encode_policy
from services.policy.core.spec import Direction, from_cilium_policy

NS = "k8s:io.kubernetes.pod.namespace=default"
CLIENT, DNSPOD, OTHER = 256, 257, 258
KUBE_DNS = "k8s:io.kubernetes.pod.namespace=kube-system"


def cnp(egress: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "fqdn", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": egress},
    }  # fmt: skip


DNS_EGRESS = {
    "toEndpoints": [{"matchLabels": {"k8s-app": "kube-dns",
                                     "io.kubernetes.pod.namespace": "kube-system"}}],
    "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                 "rules": {"dns": [{"matchPattern": "*.ciliate.test"}]}}],
}
FQDN_EGRESS = {
    "toFQDNs": [{"matchName": "allowed.ciliate.test"}, {"matchPattern": "api-*.ciliate.test"}],
    "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}],
}


def errors(doc: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ResourceError) as info:
        parse_resource(doc)
    return {e.path: e.message for e in info.value.errors}


# -- validation at the edge (ResourceError is the API's 422 with these paths) ---------------


@pytest.mark.parametrize(("egress", "path", "fragment"), [
    ({"toFQDNs": [{"matchPattern": "a[b].test"}]}, "spec.egress[0].toFQDNs[0].matchPattern",
     "invalid characters"),
    ({"toFQDNs": [{"matchPattern": "**.test"}]}, "spec.egress[0].toFQDNs[0].matchPattern", "**"),
    ({"toFQDNs": [{"matchName": "a b.test"}]}, "spec.egress[0].toFQDNs[0].matchName",
     "invalid characters"),
    ({"toFQDNs": [{"matchName": "*.test"}]}, "spec.egress[0].toFQDNs[0].matchName",
     "invalid characters"),
    ({"toFQDNs": [{"matchName": "a..test"}]}, "spec.egress[0].toFQDNs[0].matchName",
     "empty label"),
    ({"toFQDNs": [{"matchName": "a.test", "matchPattern": "*.test"}]},
     "spec.egress[0].toFQDNs[0]", "only one of"),
    ({"toFQDNs": [{}]}, "spec.egress[0].toFQDNs[0]", "required"),
    ({"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}],
                   "rules": {"dns": [{"matchPattern": "bad/pattern"}]}}]},
     "spec.egress[0].toPorts[0].rules.dns[0].matchPattern", "invalid characters"),
    ({"toPorts": [{"ports": [{"port": "53"}],
                   "rules": {"dns": [{"matchName": "a.test"}], "http": [{"path": "/"}]}}]},
     "spec.egress[0].toPorts[0].rules", "multiple L7"),
    ({"toFQDNs": [{"matchName": "a.test"}], "toEndpoints": [{}]}, "spec.egress[0]",
     "combining toFQDNs"),
])  # fmt: skip
def test_bad_fqdn_fields_are_refused_with_their_path(
    egress: dict[str, Any], path: str, fragment: str
) -> None:
    found = errors(cnp([egress]))
    assert path in found, found
    assert fragment in found[path]


def test_deny_rules_cannot_select_fqdns() -> None:
    doc = cnp([])
    doc["spec"]["egressDeny"] = [{"toFQDNs": [{"matchName": "a.test"}]}]
    assert "spec.egressDeny[0]" in errors(doc)


# -- matchPattern semantics (Cilium's matchpattern package) ----------------------------------

label_st = st.text("abcxyz019-_", min_size=1, max_size=6)
name_st = st.lists(label_st, min_size=1, max_size=4).map(".".join)
# A pattern label: literal pieces joined by '*' (never '**').
pattern_label_st = st.lists(st.text("abcxyz019-_", max_size=3), min_size=1, max_size=3).map(
    "*".join).filter(lambda s: s != "" and "**" not in s)
pattern_st = st.lists(pattern_label_st, min_size=1, max_size=4).map(".".join)


def reference(pattern: str, name: str) -> bool:
    """A label-by-label reading: same number of labels; in each, '*' is any run of DNS chars."""
    if pattern.strip() == "*":
        return True
    plabels = pattern.lower().rstrip(".").split(".")
    nlabels = name.lower().rstrip(".").split(".")
    if len(plabels) != len(nlabels):
        return False
    for p, n in zip(plabels, nlabels, strict=True):
        rx = "".join("[-a-z0-9_]*" if c == "*" else re.escape(c) for c in p)
        if not re.fullmatch(rx, n):
            return False
    return True


@given(pattern_st, name_st, st.booleans(), st.booleans())
def test_match_pattern_is_a_per_label_glob(
    pattern: str, name: str, upper: bool, dot: bool
) -> None:
    check_match_pattern(pattern)
    asked = (name.upper() if upper else name) + ("." if dot else "")
    assert pattern_matches(pattern, asked) is reference(pattern, name)


@given(name_st)
def test_star_alone_matches_every_name_and_a_literal_only_itself(name: str) -> None:
    assert pattern_matches("*", name)
    assert pattern_matches("*", ".")
    assert pattern_matches(name, name.upper() + ".")
    assert not pattern_matches(name, "x" + name.split(".", 1)[0] + ".zz")
    # '*' never crosses a dot: '*.<rest>' does not match one more label in front.
    assert not pattern_matches("*." + name, "a.b." + name)
    assert pattern_matches("*." + name, "a." + name)
    assert normalize_name(name + "..") == normalize_name(name)


# -- compile ---------------------------------------------------------------------------------


def fqdn_labels(ip: str, *names: str) -> LabelSet:
    return LabelSet.from_strings(
        [f"cidr:{ip}/32", "reserved:world", *(f"fqdn:{n}" for n in names)])


def engine(extra: dict[int, LabelSet] | None = None) -> PolicyEngine:
    world = {
        CLIENT: LabelSet.from_strings(["k8s:app=client", NS]),
        DNSPOD: LabelSet.from_strings(["k8s:k8s-app=kube-dns", KUBE_DNS]),
        OTHER: LabelSet.from_strings(["k8s:app=other", NS]),
        **(extra or {}),
    }
    doc = CiliumNetworkPolicy.model_validate(cnp([DNS_EGRESS, FQDN_EGRESS]))
    eng = PolicyEngine(from_cilium_policy(doc), IdentityWorld(world),
                       allocate_cidr=lambda p: CIDR_IDENTITY_BASE + 999)
    eng.compile_all()
    return eng


def test_rules_dns_redirects_dns_to_the_dns_proxy_with_the_names() -> None:
    eng = engine()
    policy = eng.compiled[CLIENT]
    res = lookup(policy, DNSPOD, Direction.EGRESS, 17, 53)
    assert res.verdict is Verdict.REDIRECTED and res.proxy_port == DNS_PROXY_PORT
    assert lookup(policy, DNSPOD, Direction.EGRESS, 6, 53).verdict is not Verdict.ALLOWED
    value = encode_policy(policy, None)
    l7 = [e.l7 for e in iter_entries(value) if e.proxy_port]
    assert l7 == [{"http": [], "wildcard": False, "dns": [{"matchPattern": "*.ciliate.test"}]}]
    # ... which the proxy reads as DNS rules
    entries = IdentityEntries.from_kv(value)
    entry = entries.lookup(DNSPOD, "egress", 17, 53)
    assert entry is not None and entry.proxy_port == DNS_PROXY_PORT
    assert entry.rules.allows_dns("a.ciliate.test.")
    assert not entry.rules.allows_dns("a.other.test.")


def test_to_fqdns_selects_only_matching_fqdn_identities() -> None:
    ok1, ok2, other, plain = (CIDR_IDENTITY_BASE + n for n in (1, 2, 3, 4))
    eng = engine({
        ok1: fqdn_labels("10.9.0.1", "allowed.ciliate.test"),
        ok2: fqdn_labels("10.9.0.2", "other.test", "api-7.ciliate.test"),
        other: fqdn_labels("10.9.0.3", "denied.ciliate.test"),
        plain: LabelSet.from_strings(["cidr:10.9.0.4/32", "reserved:world"]),
    })
    policy = eng.compiled[CLIENT]
    for ident, want in ((ok1, True), (ok2, True), (other, False), (plain, False)):
        verdict = lookup(policy, ident, Direction.EGRESS, 6, 80).verdict
        assert (verdict is Verdict.ALLOWED) is want, (ident, verdict)
        assert lookup(policy, ident, Direction.EGRESS, 6, 81).verdict is not Verdict.ALLOWED


def test_learned_ips_are_selected_incrementally_and_leave_on_release() -> None:
    eng = engine()
    ident = CIDR_IDENTITY_BASE + 7
    labels = fqdn_labels("10.9.0.7", "allowed.ciliate.test")
    key = EntryKey(ident, Direction.EGRESS, 6, 80, 16)
    deltas = eng.add_identity(ident, labels)
    assert CLIENT in deltas and key in deltas[CLIENT].added
    assert lookup(eng.compiled[CLIENT], ident, Direction.EGRESS, 6, 80).verdict is (
        Verdict.ALLOWED)
    # the incremental result is what a full compile gives
    fresh = engine({ident: labels})
    assert eng.compiled[CLIENT].entries == fresh.compiled[CLIENT].entries
    # a name outside every selector touches no map
    assert not eng.add_identity(CIDR_IDENTITY_BASE + 8, fqdn_labels("10.9.0.8", "x.example"))
    deltas = eng.remove_identity(ident)
    assert key in deltas[CLIENT].removed
    assert key not in eng.compiled[CLIENT].entries


def test_fqdn_identity_is_not_reused_for_a_policy_cidr() -> None:
    ident = CIDR_IDENTITY_BASE + 7
    world = {CLIENT: LabelSet.from_strings(["k8s:app=client", NS]),
             ident: fqdn_labels("10.9.0.7", "allowed.ciliate.test")}
    doc = CiliumNetworkPolicy.model_validate(cnp([{"toCIDR": ["10.9.0.7/32"]}]))
    eng = PolicyEngine(from_cilium_policy(doc), IdentityWorld(world),
                       allocate_cidr=lambda p: CIDR_IDENTITY_BASE + 50)
    assert eng.ipcache == {"10.9.0.7/32": CIDR_IDENTITY_BASE + 50}
