"""Helpers for the kernel data path's tests: network namespaces entered from the
test process itself (setns, so that sockets and the program can be made in
any of them and the test reads like one program), and packets built and
checked byte by byte, checksums computed here.

Only documentation addresses are used; no namespace is linked to the host.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
ZERO_MAC = bytes(6)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Netns:
    """A named network namespace (ip netns), deleted by close()."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        self.sh("ip link set lo up")

    def sh(self, cmd: str) -> str:
        r = subprocess.run(["ip", "netns", "exec", self.name, "sh", "-c", cmd], capture_output=True, text=True,
                           timeout=30)
        if r.returncode:
            raise RuntimeError(f"[{self.name}] {cmd}: {r.stderr.strip()}")
        return r.stdout

    @contextmanager
    def entered(self):
        """Run the block in this namespace (the calling thread only), and come back."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(home)
        finally:
            os.close(home)
            os.close(target)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


def veth(a: Netns, a_if: str, a_addrs: list[str], b: Netns, b_if: str, b_addrs: list[str]) -> None:
    tmp = f"vt{os.getpid() % 100000}"
    subprocess.run(["ip", "link", "add", tmp + "a", "type", "veth", "peer", "name", tmp + "b"], check=True,
                   capture_output=True, timeout=10)
    for ns, name, ifname, addrs in ((a, tmp + "a", a_if, a_addrs), (b, tmp + "b", b_if, b_addrs)):
        subprocess.run(["ip", "link", "set", name, "netns", ns.name], check=True, capture_output=True, timeout=10)
        ns.sh(f"ip link set {name} name {ifname} && ip link set {ifname} up")
        for x in addrs:
            ns.sh(f"ip addr add {x} dev {ifname}" + (" nodad" if ":" in x else ""))


def mac_of(ifname: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        import fcntl
        ifr = fcntl.ioctl(s.fileno(), 0x8927, struct.pack("16s24x", ifname.encode()))
    return ifr[18:24]


# --- packets ---

def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _pseudo(src: bytes, dst: bytes, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, 17, length)
    return src + dst + struct.pack("!IxxxB", length, 17)


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes, zero_csum: bool = False) -> bytes:
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    s, d = socket.inet_pton(fam, src), socket.inet_pton(fam, dst)
    n = 8 + len(payload)
    seg = struct.pack("!HHHH", sport, dport, n, 0) + payload
    if zero_csum:
        return seg
    c = csum(_pseudo(s, d, n) + seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def ip4(src: str, dst: str, seg: bytes, ttl: int = 64, frag: int = 0, options: bytes = b"", proto: int = 17,
        ident: int = 0x1234, tos: int = 0) -> bytes:
    ihl = 5 + len(options) // 4
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, ihl * 4 + len(seg), ident, frag, ttl, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst)) + options
    return h[:10] + struct.pack("!H", csum(h)) + h[12:] + seg


def ip6(src: str, dst: str, seg: bytes, hop: int = 64, nexthdr: int = 17, flow: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | flow, len(seg), nexthdr, hop,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + seg


def eth(l3: bytes, dst: bytes = ZERO_MAC, src: bytes = b"\x02\0\0\0\0\x01") -> bytes:
    proto = 0x86DD if l3[0] >> 4 == 6 else 0x0800
    return dst + src + struct.pack("!H", proto) + l3


def datagram(src: tuple, dst: tuple, payload: bytes, **kw) -> bytes:
    """An Ethernet frame carrying one UDP datagram, checksums right."""
    zero = kw.pop("zero_csum", False)
    mac = kw.pop("mac", ZERO_MAC)
    src_mac = kw.pop("src_mac", b"\x02\0\0\0\0\x01")
    seg = udp(src[0], src[1], dst[0], dst[1], payload, zero)
    l3 = ip6(src[0], dst[0], seg, **kw) if ":" in src[0] else ip4(src[0], dst[0], seg, **kw)
    return eth(l3, dst=mac, src=src_mac)


class Parsed(dict):
    pass


def parse(frame: bytes) -> Parsed:
    """Fields of a frame carrying a UDP datagram, with both checksums verified here (an AssertionError if
    one is wrong; a zero IPv4 UDP checksum is reported as csum 0)."""
    p = Parsed(dst_mac=frame[:6], src_mac=frame[6:12])
    l3 = frame[14:]
    if l3[0] >> 4 == 4:
        ihl = (l3[0] & 15) * 4
        tot = struct.unpack("!H", l3[2:4])[0]
        assert csum(l3[:ihl]) == 0, "bad IPv4 header checksum"
        p.update(src=socket.inet_ntoa(l3[12:16]), dst=socket.inet_ntoa(l3[16:20]), ttl=l3[8], ident=l3[4:6],
                 tos=l3[1])
        seg = l3[ihl:tot]
        s, d = l3[12:16], l3[16:20]
    else:
        plen = struct.unpack("!H", l3[4:6])[0]
        p.update(src=socket.inet_ntop(socket.AF_INET6, l3[8:24]), dst=socket.inet_ntop(socket.AF_INET6, l3[24:40]),
                 ttl=l3[7], flow=l3[:4])
        seg = l3[40:40 + plen]
        s, d = l3[8:24], l3[24:40]
    sport, dport, n, c = struct.unpack("!HHHH", seg[:8])
    assert n == len(seg), "UDP length"
    if c or len(s) == 16:
        assert csum(_pseudo(s, d, n) + seg) == 0, "bad UDP checksum"
    p.update(sport=sport, dport=dport, csum=c, payload=seg[8:])
    return p


# struct __sk_buff for BPF_PROG_TEST_RUN's context: the fields a test may set
SKB_SIZE = 192


def skb_ctx(ifindex: int = 0, gso_size: int = 0, gso_segs: int = 0) -> bytes:
    b = bytearray(SKB_SIZE)
    struct.pack_into("=I", b, 40, ifindex)
    struct.pack_into("=I", b, 164, gso_segs)
    struct.pack_into("=I", b, 176, gso_size)
    return bytes(b)
