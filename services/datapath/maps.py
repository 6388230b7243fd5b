"""The BPF maps' byte layouts (ctypes, one definition each, mirroring bpf/datapath.c) and
access to the pinned maps through the bpf(2) syscall, so the CLI can read them without bcc.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ciliate.flows.tables import PolicyMatchType, TrafficDirection

from .core.model import (
    POLICY_KEY_BITS,
    CTEntry,
    EndpointFlag,
    EndpointValue,
    IPCacheKey,
    PolicyKey,
    PolicyValue,
)

PIN_ROOT = Path("/sys/fs/bpf/ciliate")


class IPCacheKeyC(ctypes.Structure):
    _fields_ = (("prefixlen", ctypes.c_uint32), ("ip", ctypes.c_uint8 * 4))


class IPCacheValC(ctypes.Structure):
    _fields_ = (("identity", ctypes.c_uint32), ("flags", ctypes.c_uint32))


class EndpointKeyC(ctypes.Structure):
    _fields_ = (("ip", ctypes.c_uint8 * 4),)


class EndpointValC(ctypes.Structure):
    _fields_ = (
        ("endpoint_id", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    )


class PolicyKeyC(ctypes.Structure):
    _fields_ = (
        ("prefixlen", ctypes.c_uint32),
        ("local_identity", ctypes.c_uint32),
        ("peer", ctypes.c_uint32),
        ("direction", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),  # network order
    )


class PolicyValC(ctypes.Structure):
    _fields_ = (
        ("deny", ctypes.c_uint8),
        ("match_type", ctypes.c_uint8),
        ("proxy_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint32),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    )


class CTKeyC(ctypes.Structure):
    _fields_ = (
        ("saddr", ctypes.c_uint8 * 4),
        ("daddr", ctypes.c_uint8 * 4),
        ("sport", ctypes.c_uint16),  # network order
        ("dport", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
    )


class CTValC(ctypes.Structure):
    _fields_ = (
        ("last_seen_ns", ctypes.c_uint64),
        ("created_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("local_identity", ctypes.c_uint32),
        ("peer_identity", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


MAP_NAMES = ("cil_ipcache", "cil_lxc", "cil_policy", "cil_ct_tcp", "cil_ct_any")


def _ip_bytes(ip: str) -> Any:
    return (ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(ip).packed)


def _ip_str(raw: Any) -> str:
    return str(ipaddress.IPv4Address(bytes(raw)))


# --- conversions between the core's frozen data and the C layouts -----------------------------

def ipcache_key_c(k: IPCacheKey) -> IPCacheKeyC:
    return IPCacheKeyC(k.prefixlen, _ip_bytes(k.ip))


def ipcache_key_py(c: IPCacheKeyC) -> IPCacheKey:
    return IPCacheKey(_ip_str(c.ip), int(c.prefixlen))


def endpoint_val_c(v: EndpointValue) -> EndpointValC:
    return EndpointValC(v.endpoint_id, v.identity, int(v.flags))


def endpoint_val_py(c: EndpointValC) -> EndpointValue:
    return EndpointValue(int(c.endpoint_id), int(c.identity), EndpointFlag(int(c.flags)))


def policy_key_c(k: PolicyKey) -> PolicyKeyC:
    return PolicyKeyC(k.lpm_prefixlen, k.local_identity, k.peer, int(k.direction), k.proto,
                      socket.htons(k.port))


def policy_key_py(c: PolicyKeyC) -> PolicyKey:
    plen = max(0, int(c.prefixlen) - (POLICY_KEY_BITS - 16))
    return PolicyKey(int(c.local_identity), TrafficDirection(int(c.direction)), int(c.peer),
                     int(c.proto), socket.ntohs(int(c.dport)), plen)


def policy_val_c(v: PolicyValue) -> PolicyValC:
    return PolicyValC(int(v.deny), int(v.match_type), v.proxy_port, 0, 0, 0)


def policy_val_py(c: PolicyValC) -> PolicyValue:
    return PolicyValue(bool(c.deny), int(c.proxy_port), PolicyMatchType(int(c.match_type)))


def ct_entry_py(k: CTKeyC, v: CTValC) -> CTEntry:
    return CTEntry(
        saddr=_ip_str(k.saddr), daddr=_ip_str(k.daddr), sport=socket.ntohs(int(k.sport)),
        dport=socket.ntohs(int(k.dport)), proto=int(k.proto),
        direction=TrafficDirection(int(k.direction)), last_seen_ns=int(v.last_seen_ns),
        created_ns=int(v.created_ns), packets=int(v.packets), bytes=int(v.bytes),
        local_identity=int(v.local_identity), peer_identity=int(v.peer_identity),
        flags=int(v.flags),
    )


# --- the bpf(2) syscall ----------------------------------------------------------------------

_NR_BPF = 321  # x86_64
_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_GET_NEXT_KEY = 4
_BPF_OBJ_GET = 7

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MapElemAttr(ctypes.Structure):
    _fields_ = (
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    )


class _ObjAttr(ctypes.Structure):
    _fields_ = (
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    )


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = int(_libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def obj_get(path: Path) -> int:
    """Open a pinned map; returns a file descriptor the caller closes."""
    raw = ctypes.create_string_buffer(str(path).encode())
    return _bpf(_BPF_OBJ_GET, _ObjAttr(ctypes.addressof(raw), 0, 0))


K = TypeVar("K", bound=ctypes.Structure)
V = TypeVar("V", bound=ctypes.Structure)


@dataclass
class PinnedMap(Generic[K, V]):
    """A pinned map opened by path, keyed and valued by the ctypes layouts above."""

    path: Path
    key_type: type[K]
    val_type: type[V]
    fd: int = -1

    def __post_init__(self) -> None:
        self.fd = obj_get(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PinnedMap[K, V]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _attr(self, key: ctypes.Structure, value: ctypes.Structure | None, flags: int = 0) -> Any:
        return _MapElemAttr(self.fd, 0, ctypes.addressof(key),
                            ctypes.addressof(value) if value is not None else 0, flags)

    def get(self, key: K) -> V | None:
        val = self.val_type()
        try:
            _bpf(_BPF_MAP_LOOKUP_ELEM, self._attr(key, val))
        except FileNotFoundError:
            return None
        return val

    def put(self, key: K, value: V) -> None:
        _bpf(_BPF_MAP_UPDATE_ELEM, self._attr(key, value))

    def delete(self, key: K) -> bool:
        try:
            _bpf(_BPF_MAP_DELETE_ELEM, self._attr(key, None))
        except FileNotFoundError:
            return False
        return True

    def keys(self) -> Iterator[K]:
        cur: K | None = None
        while True:
            nxt = self.key_type()
            attr = _MapElemAttr(self.fd, 0, ctypes.addressof(cur) if cur is not None else 0,
                                ctypes.addressof(nxt), 0)
            try:
                _bpf(_BPF_MAP_GET_NEXT_KEY, attr)
            except FileNotFoundError:
                return
            yield nxt
            cur = nxt

    def items(self) -> Iterator[tuple[K, V]]:
        for k in list(self.keys()):
            v = self.get(k)
            if v is not None:
                yield k, v


@dataclass
class NodeMaps:
    """The five pinned maps of one node, opened by path."""

    ipcache: PinnedMap[IPCacheKeyC, IPCacheValC]
    endpoints: PinnedMap[EndpointKeyC, EndpointValC]
    policy: PinnedMap[PolicyKeyC, PolicyValC]
    ct_tcp: PinnedMap[CTKeyC, CTValC]
    ct_any: PinnedMap[CTKeyC, CTValC]

    @classmethod
    def open(cls, pin_dir: Path) -> NodeMaps:
        return cls(
            ipcache=PinnedMap(pin_dir / "cil_ipcache", IPCacheKeyC, IPCacheValC),
            endpoints=PinnedMap(pin_dir / "cil_lxc", EndpointKeyC, EndpointValC),
            policy=PinnedMap(pin_dir / "cil_policy", PolicyKeyC, PolicyValC),
            ct_tcp=PinnedMap(pin_dir / "cil_ct_tcp", CTKeyC, CTValC),
            ct_any=PinnedMap(pin_dir / "cil_ct_any", CTKeyC, CTValC),
        )

    def close(self) -> None:
        for m in (self.ipcache, self.endpoints, self.policy, self.ct_tcp, self.ct_any):
            m.close()

    def ct_entries(self) -> list[tuple[CTKeyC, CTEntry]]:
        out: list[tuple[CTKeyC, CTEntry]] = []
        for m in (self.ct_tcp, self.ct_any):
            out.extend((k, ct_entry_py(k, v)) for k, v in m.items())
        return out

    def ipcache_entries(self) -> dict[IPCacheKey, int]:
        return {ipcache_key_py(k): int(v.identity) for k, v in self.ipcache.items()}

    def endpoint_entries(self) -> dict[str, EndpointValue]:
        return {_ip_str(k.ip): endpoint_val_py(v) for k, v in self.endpoints.items()}

    def policy_entries(self) -> list[tuple[PolicyKey, PolicyValue, int, int]]:
        """(key, value, packets, bytes) per entry."""
        return [(policy_key_py(k), policy_val_py(v), int(v.packets), int(v.bytes))
                for k, v in self.policy.items()]


def pin_dir(node: str, root: Path = PIN_ROOT) -> Path:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in node)
    return root / safe
