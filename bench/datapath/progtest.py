"""Per-packet cost of a loaded program through ``BPF_PROG_TEST_RUN`` (bpf(2) from ctypes), and
the crafted Ethernet/IPv4/TCP frames it is fed.

The kernel runs the program ``repeat`` times on a copy of the frame and reports the mean time
per run in nanoseconds (``duration``) and the last return code (``retval``: 0 TC_ACT_OK,
2 TC_ACT_SHOT for a tc program).
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from dataclasses import dataclass

NR_BPF = 321  # x86_64
BPF_PROG_TEST_RUN = 10
TC_ACT_OK = 0
TC_ACT_SHOT = 2

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class ProgTestRunAttr(ctypes.Structure):
    """``union bpf_attr``'s ``test`` member."""

    _fields_ = (
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


@dataclass(frozen=True)
class RunResult:
    retval: int
    ns_per_run: int


def prog_test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> RunResult:
    """Run the program ``repeat`` times on ``frame``."""
    data_in = ctypes.create_string_buffer(frame, len(frame))
    data_out = ctypes.create_string_buffer(len(frame) + 256)
    attr = ProgTestRunAttr(prog_fd=prog_fd, data_size_in=len(frame),
                       data_size_out=ctypes.sizeof(data_out),
                       data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out),
                       repeat=repeat)
    ret = int(_libc.syscall(NR_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return RunResult(int(attr.retval), int(attr.duration))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def tcp_frame(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    """A minimal valid Ethernet + IPv4 + TCP frame (no payload, checksums filled)."""
    saddr, daddr = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1 if flags & TCP_ACK else 0, 5 << 4, flags,
                      64240, 0, 0)
    pseudo = saddr + daddr + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, saddr, daddr)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    eth = bytes.fromhex("020000000002" "020000000001") + struct.pack("!H", 0x0800)
    return eth + ip + tcp
