"""The LB maps' byte layouts (ctypes twins of ``bpf/lb.c``) and access to the pinned maps via
``bpf(2)``, so the CLI reads them without bcc. Maglev inner tables are created here too."""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..maps import PIN_ROOT, PinnedMap
from .core.model import (
    BackendFlag,
    BackendState,
    BackendValue,
    LbState,
    RevNatValue,
    SvcFlag,
    SvcKey,
    SvcValue,
)

MAP_NAMES = ("lb4_services", "lb4_backends", "lb4_reverse_nat", "lb4_reverse_sk",
             "lb4_affinity", "lb4_node_addrs", "lb4_ct", "lb4_maglev")


class SvcKeyC(ctypes.Structure):
    _fields_ = (("address", ctypes.c_uint8 * 4), ("dport", ctypes.c_uint16),
                ("backend_slot", ctypes.c_uint16), ("proto", ctypes.c_uint8),
                ("scope", ctypes.c_uint8), ("pad", ctypes.c_uint16))


class SvcValC(ctypes.Structure):
    _fields_ = (("backend_id", ctypes.c_uint32), ("affinity_timeout", ctypes.c_uint32),
                ("rev_nat_index", ctypes.c_uint32), ("count", ctypes.c_uint16),
                ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8),
                ("table_id", ctypes.c_uint64))


class BackendKeyC(ctypes.Structure):
    _fields_ = (("id", ctypes.c_uint32),)


class BackendValC(ctypes.Structure):
    _fields_ = (("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("state", ctypes.c_uint8), ("flags", ctypes.c_uint8),
                ("pad", ctypes.c_uint8 * 3))


class RevNatValC(ctypes.Structure):
    _fields_ = (("address", ctypes.c_uint8 * 4), ("port", ctypes.c_uint16),
                ("pad", ctypes.c_uint16))


class NodeAddrValC(ctypes.Structure):
    _fields_ = (("kind", ctypes.c_uint8),)


class AffinityKeyC(ctypes.Structure):
    _fields_ = (("client", ctypes.c_uint64), ("rev_nat_index", ctypes.c_uint32),
                ("netns", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3))


class AffinityValC(ctypes.Structure):
    _fields_ = (("last_used_ns", ctypes.c_uint64), ("backend_id", ctypes.c_uint32),
                ("pad", ctypes.c_uint32))


class CtKeyC(ctypes.Structure):
    _fields_ = (("saddr", ctypes.c_uint8 * 4), ("daddr", ctypes.c_uint8 * 4),
                ("sport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("dir", ctypes.c_uint8), ("pad", ctypes.c_uint16))


class CtValC(ctypes.Structure):
    _fields_ = (("backend_id", ctypes.c_uint32), ("rev_nat_index", ctypes.c_uint32),
                ("orig_addr", ctypes.c_uint8 * 4), ("client_addr", ctypes.c_uint8 * 4),
                ("orig_port", ctypes.c_uint16), ("client_port", ctypes.c_uint16),
                ("flags", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3),
                ("last_seen_ns", ctypes.c_uint64))


class U32C(ctypes.Structure):
    _fields_ = (("v", ctypes.c_uint32),)


class U64C(ctypes.Structure):
    _fields_ = (("v", ctypes.c_uint64),)


def ip_c(ip: str) -> Any:
    return (ctypes.c_uint8 * 4)(*ipaddress.IPv4Address(ip).packed)


def ip_py(raw: Any) -> str:
    return str(ipaddress.IPv4Address(bytes(raw)))


def svc_key_c(k: SvcKey) -> SvcKeyC:
    return SvcKeyC(ip_c(k.address), socket.htons(k.port), k.slot, k.proto, k.scope, 0)


def svc_key_py(c: SvcKeyC) -> SvcKey:
    return SvcKey(ip_py(c.address), socket.ntohs(int(c.dport)), int(c.proto),
                  int(c.backend_slot), int(c.scope))


def svc_val_c(v: SvcValue) -> SvcValC:
    return SvcValC(v.backend_id, v.affinity_timeout, v.rev_nat, v.count, int(v.flags), 0,
                   v.table_id)


def svc_val_py(c: SvcValC) -> SvcValue:
    return SvcValue(int(c.backend_id), int(c.count), int(c.rev_nat_index), SvcFlag(int(c.flags)),
                    int(c.affinity_timeout), int(c.table_id))


def backend_val_c(v: BackendValue) -> BackendValC:
    return BackendValC(ip_c(v.address), socket.htons(v.port), v.proto, int(v.state),
                       int(v.flags))


def backend_val_py(c: BackendValC) -> BackendValue:
    return BackendValue(ip_py(c.address), socket.ntohs(int(c.port)), int(c.proto),
                        BackendState(int(c.state)), BackendFlag(int(c.flags)))


def revnat_val_c(v: RevNatValue) -> RevNatValC:
    return RevNatValC(ip_c(v.address), socket.htons(v.port), 0)


def revnat_val_py(c: RevNatValC) -> RevNatValue:
    return RevNatValue(ip_py(c.address), socket.ntohs(int(c.port)))


# --- Maglev: a hash from table id to the whole table ------------------------------------------

def maglev_table_type(m: int) -> type[ctypes.Structure]:
    """The value layout for tables of ``m`` slots (``struct maglev_inner``)."""
    return type(f"MaglevTable{m}", (ctypes.Structure,),
                {"_fields_": (("backend_ids", ctypes.c_uint32 * m),)})


@dataclass
class LbMaps:
    """The pinned LB maps of one node, opened by path."""

    services: PinnedMap[SvcKeyC, SvcValC]
    backends: PinnedMap[BackendKeyC, BackendValC]
    revnat: PinnedMap[U32C, RevNatValC]
    affinity: PinnedMap[AffinityKeyC, AffinityValC]
    node_addrs: PinnedMap[U32C, NodeAddrValC]
    ct: PinnedMap[CtKeyC, CtValC]
    maglev: PinnedMap[U64C, Any]

    @classmethod
    def open(cls, pins: Path, maglev_m: int = 16381) -> LbMaps:
        return cls(
            services=PinnedMap(pins / "lb4_services", SvcKeyC, SvcValC),
            backends=PinnedMap(pins / "lb4_backends", BackendKeyC, BackendValC),
            revnat=PinnedMap(pins / "lb4_reverse_nat", U32C, RevNatValC),
            affinity=PinnedMap(pins / "lb4_affinity", AffinityKeyC, AffinityValC),
            node_addrs=PinnedMap(pins / "lb4_node_addrs", U32C, NodeAddrValC),
            ct=PinnedMap(pins / "lb4_ct", CtKeyC, CtValC),
            maglev=PinnedMap(pins / "lb4_maglev", U64C, maglev_table_type(maglev_m)),
        )

    def close(self) -> None:
        for m in (self.services, self.backends, self.revnat, self.affinity, self.node_addrs,
                  self.ct, self.maglev):
            m.close()

    def read_state(self, maglev_m: int, *, with_tables: bool = True) -> LbState:
        """What the maps hold now (table contents only when asked: ids are enough to diff)."""
        st = LbState(
            services={svc_key_py(k): svc_val_py(v) for k, v in self.services.items()},
            backends={int(k.id): backend_val_py(v) for k, v in self.backends.items()},
            revnat={int(k.v): revnat_val_py(v) for k, v in self.revnat.items()},
        )
        if with_tables:
            st.maglev = {int(k.v): bytes(v) for k, v in self.maglev.items()}
        else:
            st.maglev = {int(k.v): b"" for k in self.maglev.keys()}  # noqa: SIM118
        return st

    def maglev_table(self, table_id: int) -> bytes | None:
        v = self.maglev.get(U64C(table_id))
        return bytes(v) if v is not None else None


def lb_pin_dir(node: str, root: Path = PIN_ROOT) -> Path:
    """``/sys/fs/bpf/ciliate/<node>-lb``: a sibling of the policy datapath's pin directory
    (which holds only files and is removed file by file)."""
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in node)
    return root / f"{safe}-lb"
