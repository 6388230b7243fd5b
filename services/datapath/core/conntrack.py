"""Conntrack garbage collection by Cilium's lifetimes; LRU eviction alone does not honour them."""

from __future__ import annotations

from enum import IntFlag

from .model import Proto


class CTFlag(IntFlag):
    """Bits of a conntrack entry's ``flags`` (same numbers in the C)."""

    NONE = 0
    SEEN_REPLY = 1
    TX_CLOSING = 2  # FIN seen from the original sender
    RX_CLOSING = 4  # FIN seen from the replier
    RST = 8


NS_PER_S = 1_000_000_000
CT_LIFETIME_TCP_S = 8000
CT_LIFETIME_NONTCP_S = 60
CT_SYN_TIMEOUT_S = 60
CT_CLOSE_TIMEOUT_S = 10


def ct_lifetime_s(proto: int, flags: int) -> int:
    """Seconds an idle entry lives: closing TCP 10, established TCP 8000, SYN 60, non-TCP 60."""
    if proto != Proto.TCP:
        return CT_LIFETIME_NONTCP_S
    f = CTFlag(flags)
    if CTFlag.RST in f or (CTFlag.TX_CLOSING in f and CTFlag.RX_CLOSING in f):
        return CT_CLOSE_TIMEOUT_S
    if CTFlag.SEEN_REPLY in f:
        return CT_LIFETIME_TCP_S
    return CT_SYN_TIMEOUT_S


def ct_expired(proto: int, flags: int, last_seen_ns: int, now_ns: int) -> bool:
    """True when the entry has been idle longer than its lifetime (clock: bpf_ktime_get_ns)."""
    return now_ns - last_seen_ns > ct_lifetime_s(proto, flags) * NS_PER_S
