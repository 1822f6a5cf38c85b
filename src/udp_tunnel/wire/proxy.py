"""PROXY protocol version 2 headers for UDP (HAProxy's proxy-protocol.txt, section 2.2).

The inside agent puts one before a client's datagram for a service behind a
PROXY-protocol front (go-mmproxy, HAProxy, game proxies), so that the front
knows the client's real address. The layout (all integers big-endian):

    0..11   signature     0D 0A 0D 0A 00 0D 0A 51 55 49 54 0A
    12      ver_cmd       0x2? : version 2 (high nibble); command LOCAL 0x0 or PROXY 0x1
    13      fam           address family (high nibble) | transport (low nibble):
                          0x12 UDP over IPv4, 0x22 UDP over IPv6, 0x00 UNSPEC (LOCAL)
    14..15  len           bytes that follow: 12 (IPv4), 36 (IPv6), 0 (LOCAL), + TLVs
    16..    addresses     source address, destination address, source port, destination port

Which addresses this module writes:

- source: the client, as the outside agent saw it (an IPv4-mapped IPv6 address
  counts as the IPv4 address it maps: a dual-stack socket's view of an IPv4 client);
- destination: what the service should see as the address the client reached.
  `destination()` picks the outside agent's public address and port when the
  outside told it (the address the client really sent to, which is what HAProxy
  puts there: its own listening address), else the service's own address (what
  the front really received on; never a wildcard).
- families: both IPv4 -> AF_INET (28 bytes). Otherwise AF_INET6 (52 bytes),
  the IPv4 one written as IPv4-mapped (::ffff:a.b.c.d), as HAProxy's own sender
  does for mixed families: the family byte covers both addresses, and an IPv6
  address has no IPv4 form. The client's family is never changed when the
  destination is the outside's address (the client reached it in its own family).

No TLVs are sent. The parser skips TLVs and returns them raw.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

SIGNATURE = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"
VERSION = 0x20  # high nibble of byte 12
LOCAL, PROXY = 0x0, 0x1  # low nibble of byte 12
FAM_UNSPEC, FAM_INET, FAM_INET6, FAM_UNIX = 0x00, 0x10, 0x20, 0x30  # high nibble of byte 13 (AF_UNIX: never ours)
TRANS_UNSPEC, TRANS_STREAM, TRANS_DGRAM = 0x0, 0x1, 0x2  # low nibble of byte 13
UDP4, UDP6 = FAM_INET | TRANS_DGRAM, FAM_INET6 | TRANS_DGRAM  # 0x12, 0x22

_FIXED = struct.Struct("!12sBBH")
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
FIXED_LEN = _FIXED.size  # 16
_ADDR_LEN = {FAM_INET: _INET.size, FAM_INET6: _INET6.size, FAM_UNIX: 216}
_MAPPED = bytes(10) + b"\xff\xff"


class ProxyHeaderError(ValueError):
    """Bytes that are not a valid PROXY v2 header; str() says what is wrong."""


def _packed(host: str) -> bytes:
    """4 bytes for an IPv4 address (also one written IPv4-mapped), 16 for IPv6."""
    host = host.partition("%")[0]
    try:
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        b = socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ProxyHeaderError(f"not an IP address: {host!r}") from None
    return b[12:] if b[:12] == _MAPPED else b


def _port(addr: tuple) -> int:
    port = addr[1]
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ProxyHeaderError(f"bad port {port!r}")
    return port


def encode(source: tuple, destination: tuple) -> bytes:
    """The PROXY command header for a UDP datagram from `source` to `destination`
    ((host, port, ...) tuples, as sockets give them): 28 bytes if both are IPv4, else 52."""
    src, dst = _packed(source[0]), _packed(destination[0])
    sport, dport = _port(source), _port(destination)
    if len(src) == len(dst) == 4:
        return _FIXED.pack(SIGNATURE, VERSION | PROXY, UDP4, _INET.size) + _INET.pack(src, dst, sport, dport)
    src = _MAPPED + src if len(src) == 4 else src
    dst = _MAPPED + dst if len(dst) == 4 else dst
    return _FIXED.pack(SIGNATURE, VERSION | PROXY, UDP6, _INET6.size) + _INET6.pack(src, dst, sport, dport)


def destination(reached: tuple | None, service: tuple) -> tuple:
    """The destination to write: the outside agent's address the client sent to, when
    known and not a wildcard, else the service's own address."""
    if reached and reached[0] and _packed(reached[0]) not in (bytes(4), bytes(16)):
        return reached
    return service


@dataclass(frozen=True, slots=True)
class Header:
    command: int  # LOCAL or PROXY
    family: int  # FAM_UNSPEC, FAM_INET, FAM_INET6 (or FAM_UNIX, whose addresses are not decoded)
    transport: int  # TRANS_UNSPEC, TRANS_STREAM, TRANS_DGRAM
    source: tuple[str, int] | None  # None for LOCAL, UNSPEC and AF_UNIX
    destination: tuple[str, int] | None
    length: int  # bytes of the whole header: 16 + the len field
    tlvs: bytes = b""  # what follows the address block inside the header, undecoded


def is_header(data: bytes | memoryview) -> bool:
    """Whether data starts like a v2 header: 16 bytes or more, the signature, version 2."""
    return len(data) >= FIXED_LEN and data[:12] == SIGNATURE and data[12] >> 4 == VERSION >> 4


def _host(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(b) == 4 else socket.AF_INET6, b)


def decode(data: bytes | memoryview) -> Header:
    """The header at the start of data, checked as the specification tells a receiver to."""
    if len(data) < FIXED_LEN:
        raise ProxyHeaderError(f"{len(data)} bytes: shorter than the 16-byte fixed part")
    sig, ver_cmd, fam, length = _FIXED.unpack_from(data)
    if sig != SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    if ver_cmd >> 4 != VERSION >> 4:
        raise ProxyHeaderError(f"version {ver_cmd >> 4}, not 2")
    command, family, transport = ver_cmd & 0xF, fam & 0xF0, fam & 0xF
    if command not in (LOCAL, PROXY):
        raise ProxyHeaderError(f"unassigned command {command:#x}")
    if family not in (FAM_UNSPEC, FAM_INET, FAM_INET6, FAM_UNIX) or transport > TRANS_DGRAM:
        raise ProxyHeaderError(f"unassigned family/transport byte {fam:#04x}")
    total = FIXED_LEN + length
    if len(data) < total:
        raise ProxyHeaderError(f"header says {total} bytes, the datagram has {len(data)}")
    need = _ADDR_LEN.get(family, 0)
    if command == PROXY and length < need:
        raise ProxyHeaderError(f"address block of {length} bytes, family {family >> 4} needs {need}")
    if command == LOCAL or family not in (FAM_INET, FAM_INET6) or transport == TRANS_UNSPEC:
        return Header(command, family, transport, None, None, total)  # addresses to ignore
    s = _INET if family == FAM_INET else _INET6
    a, b, sport, dport = s.unpack_from(data, FIXED_LEN)
    return Header(command, family, transport, (_host(a), sport), (_host(b), dport), total,
                  bytes(data[FIXED_LEN + s.size:total]))


def split(data: bytes | memoryview) -> tuple[Header, memoryview]:
    """(header, payload) of a datagram that starts with a header."""
    h = decode(data)
    return h, memoryview(data)[h.length:]
