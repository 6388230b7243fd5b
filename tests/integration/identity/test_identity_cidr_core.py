"""Pure parts behind CIDR identities and the request parser (no service needed)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ciliate.labels import LabelSet
from services.identity.core.allocator import LabelSetParser, Scope, scope_of
from services.identity.core.cidr import (
    PrefixError,
    cidr_owner,
    identity_of_owner,
    parse_prefix,
    prefix_of,
)


@pytest.mark.parametrize(
    ("labels", "scope"),
    [
        (["cidr:10.0.0.0/8"], Scope.CIDR),
        (["cidr:10.0.0.0/8", "reserved:world"], Scope.CIDR),
        (["cidr:10.0.0.0/8", "cidr:10.0.0.0/7", "reserved:world"], Scope.CIDR),
        (["reserved:world"], Scope.CLUSTER),
        (["cidr:10.0.0.0/8", "k8s:app=x"], Scope.CLUSTER),
        (["k8s:app=x"], Scope.CLUSTER),
    ],
)
def test_cidr_label_sets_take_the_local_scope(labels: list[str], scope: Scope) -> None:
    assert scope_of(LabelSet.from_strings(labels)) is scope


def test_prefix_of_is_the_most_specific_cidr_label() -> None:
    labels = ["cidr:10.0.0.0/8", "cidr:10.1.0.0/16", "cidr:0.0.0.0/0", "reserved:world"]
    assert prefix_of(LabelSet.from_strings(labels)) == "10.1.0.0/16"
    assert prefix_of(LabelSet.from_strings(["cidr:f00d--/16"])) == "f00d::/16"
    assert prefix_of(LabelSet.from_strings(["k8s:app=x"])) is None


def test_parse_prefix_refuses_host_bits_and_nonsense() -> None:
    assert parse_prefix("10.0.0.0/8") == "10.0.0.0/8"
    assert parse_prefix("192.168.1.7") == "192.168.1.7/32"
    with pytest.raises(PrefixError, match="host bits"):
        parse_prefix("10.1.2.3/8")
    with pytest.raises(PrefixError):
        parse_prefix("ten/8")


@given(st.ip_addresses(v=4), st.integers(0, 32))
def test_any_network_round_trips(addr: ipaddress.IPv4Address, length: int) -> None:
    net = ipaddress.ip_network(f"{addr}/{length}", strict=False)
    assert parse_prefix(str(net)) == str(net)
    assert prefix_of(LabelSet.from_strings([f"cidr:{net}", "reserved:world"])) == str(net)


@given(st.integers(1, 2**40))
def test_owner_round_trips(ident: int) -> None:
    assert identity_of_owner(cidr_owner(ident)) == ident
    assert identity_of_owner(f"ns/pod{ident}") is None


label_text = st.builds(
    lambda source, key, value: f"{source}{key}={value}",
    st.sampled_from(["", "k8s:", "reserved:", "cidr:", "unknown:"]),
    st.from_regex(r"[a-z][a-z0-9./-]{0,8}", fullmatch=True),
    st.from_regex(r"[a-z0-9]{0,5}", fullmatch=True),
)


@given(st.lists(label_text, max_size=6))
def test_parser_cache_agrees_with_labelset(labels: list[str]) -> None:
    """The cached parse is the same set, the same canonical key, order of sending aside."""
    parser = LabelSetParser(limit=3)
    direct = LabelSet.from_strings(labels)
    for attempt in (labels, list(reversed(labels)), labels):
        parsed = parser.parse(attempt)
        assert parsed == direct and hash(parsed) == hash(direct)
        assert parsed.canonical() == direct.canonical()
    assert len(parser.cache) <= 3


def test_addresses_learned_from_dns_are_cidr_identities() -> None:
    from ciliate.labels import LabelSet
    from services.identity.core.cidr import is_cidr_label_set

    learned = LabelSet.from_strings(["cidr:1.2.3.4/32", "reserved:world", "fqdn:api.ciliate.test"])
    assert is_cidr_label_set(learned)
    assert not is_cidr_label_set(LabelSet.from_strings(["fqdn:api.ciliate.test", "k8s:app=x"]))
