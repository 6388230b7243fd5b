"""Sans-io DNS message codec (RFC 1035): enough for a policy proxy and a test server.

Parses the header, questions and answer records (A, AAAA, CNAME decoded; others kept raw),
follows name compression with a loop guard, and builds queries and responses. Malformed
input raises ``DNSError`` and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from enum import IntEnum

HEADER = struct.Struct("!HHHHHH")
MAX_POINTER_HOPS = 32


class DNSError(ValueError):
    pass


class RRType(IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    ANY = 255


class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5


QR = 0x8000
AA = 0x0400
RD = 0x0100
RA = 0x0080


@dataclass(frozen=True)
class Question:
    name: str  # lower-case, dot-terminated
    qtype: int
    qclass: int = 1


@dataclass(frozen=True)
class Record:
    name: str
    rtype: int
    ttl: int
    data: str  # an address for A/AAAA, a name for CNAME, hex otherwise
    rclass: int = 1


@dataclass
class Message:
    id: int
    flags: int
    questions: list[Question] = field(default_factory=list)
    answers: list[Record] = field(default_factory=list)

    @property
    def is_response(self) -> bool:
        return bool(self.flags & QR)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def ips(self) -> list[str]:
        return [r.data for r in self.answers if r.rtype in (RRType.A, RRType.AAAA)]

    def type_name(self, rtype: int) -> str:
        try:
            return RRType(rtype).name
        except ValueError:
            return f"TYPE{rtype}"


def _read_name(buf: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    end: int | None = None
    hops = 0
    total = 0
    while True:
        if offset >= len(buf):
            raise DNSError("name runs past the message")
        length = buf[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(buf):
                raise DNSError("truncated compression pointer")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise DNSError("compression loop")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | buf[offset + 1]
            continue
        if length & 0xC0:
            raise DNSError("unsupported label type")
        offset += 1
        if length == 0:
            break
        label = buf[offset:offset + length]
        if len(label) != length:
            raise DNSError("label runs past the message")
        total += length + 1
        if total > 255:
            raise DNSError("name longer than 255 octets")
        labels.append(label.decode("ascii", "replace").lower())
        offset += length
    return ".".join(labels) + ".", (end if end is not None else offset)


def _encode_name(name: str) -> bytes:
    out = bytearray()
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise DNSError(f"bad label in {name!r}")
        out += bytes([len(raw)]) + raw
    return bytes(out) + b"\x00"


def decode(buf: bytes) -> Message:
    if len(buf) < HEADER.size:
        raise DNSError("shorter than a DNS header")
    ident, flags, qd, an, _ns, _ar = HEADER.unpack_from(buf)
    msg = Message(ident, flags)
    offset = HEADER.size
    for _ in range(qd):
        name, offset = _read_name(buf, offset)
        if offset + 4 > len(buf):
            raise DNSError("truncated question")
        qtype, qclass = struct.unpack_from("!HH", buf, offset)
        offset += 4
        msg.questions.append(Question(name, qtype, qclass))
    for _ in range(an):
        name, offset = _read_name(buf, offset)
        if offset + 10 > len(buf):
            raise DNSError("truncated record")
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", buf, offset)
        offset += 10
        rdata = buf[offset:offset + rdlen]
        if len(rdata) != rdlen:
            raise DNSError("record data runs past the message")
        if rtype == RRType.A and rdlen == 4:
            data = str(ipaddress.IPv4Address(rdata))
        elif rtype == RRType.AAAA and rdlen == 16:
            data = str(ipaddress.IPv6Address(rdata))
        elif rtype == RRType.CNAME:
            data, _ = _read_name(buf, offset)
        else:
            data = rdata.hex()
        offset += rdlen
        msg.answers.append(Record(name, rtype, ttl, data, rclass))
    return msg


def encode(msg: Message) -> bytes:
    out = bytearray(HEADER.pack(msg.id, msg.flags, len(msg.questions), len(msg.answers), 0, 0))
    for q in msg.questions:
        out += _encode_name(q.name) + struct.pack("!HH", q.qtype, q.qclass)
    for r in msg.answers:
        if r.rtype == RRType.A:
            rdata = ipaddress.IPv4Address(r.data).packed
        elif r.rtype == RRType.AAAA:
            rdata = ipaddress.IPv6Address(r.data).packed
        elif r.rtype == RRType.CNAME:
            rdata = _encode_name(r.data)
        else:
            rdata = bytes.fromhex(r.data)
        out += _encode_name(r.name) + struct.pack("!HHIH", r.rtype, r.rclass, r.ttl, len(rdata))
        out += rdata
    return bytes(out)


def query(ident: int, name: str, qtype: int = RRType.A) -> bytes:
    return encode(Message(ident, RD, [Question(name.lower().rstrip(".") + ".", qtype)]))


def response(request: Message, rcode: int, answers: list[Record] | None = None) -> Message:
    """A reply to ``request`` echoing its id, RD bit and questions."""
    flags = QR | RA | (request.flags & RD) | (rcode & 0xF)
    return Message(request.id, flags, list(request.questions), list(answers or []))


def refused(raw_query: bytes) -> bytes | None:
    """The REFUSED answer the proxy sends for a denied query; None if it cannot be parsed."""
    try:
        req = decode(raw_query)
    except DNSError:
        if len(raw_query) < 2:
            return None
        ident = struct.unpack_from("!H", raw_query)[0]
        return HEADER.pack(ident, QR | Rcode.FORMERR, 0, 0, 0, 0)
    return encode(response(req, Rcode.REFUSED))
