"""CIDR identities: label sets that name an address prefix (``cidr:10.0.0.0/8``, usually with
``reserved:world``) get a local identity in the 1<<24 scope and an ipcache entry for the prefix,
so the datapath can map a peer address outside the cluster to the identity a policy named.

The policy service sends the prefixes with the label sets; when it does not, the prefix is the
most specific ``cidr:`` label (Cilium may add every enclosing prefix as a label too).
"""

from __future__ import annotations

import ipaddress

from ciliate.labels import LabelSet

CIDR_SOURCE = "cidr"
CIDR_SCOPE_SOURCES = frozenset({CIDR_SOURCE, "reserved", "fqdn"})
"""A label set of only these sources, with at least one ``cidr:`` label, is a CIDR identity.

``fqdn:`` labels ride along on addresses learned from DNS answers (toFQDNs), as in Cilium."""


class PrefixError(ValueError):
    """Not a usable prefix; the message says why."""


def is_cidr_label_set(labels: LabelSet) -> bool:
    return any(label.source == CIDR_SOURCE for label in labels) and all(
        label.source in CIDR_SCOPE_SOURCES for label in labels
    )


def parse_prefix(text: str) -> str:
    """The canonical text of a network prefix; a bare address is its host prefix.

    Host bits set (``10.1.2.3/8``) is an error rather than silently widened. Cilium writes
    IPv6 ``:`` as ``-`` inside labels; both spellings are accepted.
    """
    candidate = text if ":" in text or "-" not in text else text.replace("-", ":")
    try:
        return str(ipaddress.ip_network(candidate, strict=True))
    except ValueError as exc:
        raise PrefixError(f"{text!r} is not a network prefix: {exc}") from None


def prefix_of(labels: LabelSet) -> str | None:
    """The most specific prefix among a label set's ``cidr:`` labels, or None."""
    best: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    for label in labels:
        if label.source != CIDR_SOURCE:
            continue
        try:
            net = ipaddress.ip_network(parse_prefix(label.key))
        except (PrefixError, ValueError):
            continue
        if best is None or net.prefixlen > best.prefixlen:
            best = net
    return None if best is None else str(best)


def cidr_owner(ident: int) -> str:
    """The holder recorded for a prefix: its identity (pods are ``<namespace>/<name>``)."""
    return f"cidr:{ident}"


def identity_of_owner(owner: str) -> int | None:
    head, _, tail = owner.partition(":")
    return int(tail) if head == CIDR_SOURCE and tail.isdigit() else None
