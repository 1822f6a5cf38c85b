"""The few rtnetlink requests the transparent mode and io/hostnat.py need, on a raw NETLINK_ROUTE socket.

Policy rules (list, add, delete), routes of one table (list, add, delete) and a
route lookup (what `ip route get` asks). Linux only, standard library only:
messages are packed with struct as <linux/netlink.h>, <linux/rtnetlink.h> and
<linux/fib_rules.h> lay them out. Reading needs no privileges; changing needs
CAP_NET_ADMIN (EPERM otherwise).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP = 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400

RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 32, 33, 34

RTN_UNICAST, RTN_LOCAL = 1, 2
RT_SCOPE_UNIVERSE, RT_SCOPE_HOST = 0, 254
RT_TABLE_UNSPEC = 0
RTM_F_LOOKUP_TABLE = 0x1000  # route get: say which table the route came from
FR_ACT_TO_TBL = 1

RTA_DST, RTA_SRC, RTA_OIF, RTA_PREFSRC, RTA_TABLE = 1, 2, 4, 7, 15
RTA_IP_PROTO, RTA_SPORT = 27, 28
FRA_SRC, FRA_IIFNAME, FRA_PRIORITY, FRA_TABLE = 2, 3, 6, 15
FRA_PROTOCOL, FRA_IP_PROTO, FRA_SPORT_RANGE = 21, 22, 23

_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
# struct fib_rule_hdr has the same shape: family, dst_len, src_len, tos, table, res1, res2, action, flags
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_PORTS = struct.Struct("=HH")  # struct fib_rule_port_range, host order
_BE16 = struct.Struct("!H")


def _full(family: int) -> int:
    return 32 if family == socket.AF_INET else 128


def _attr(kind: int, value: bytes) -> bytes:
    n = _NLA.size + len(value)
    return _NLA.pack(n, kind) + value + bytes(-n % 4)


def _attrs(buf: bytes, off: int, end: int) -> dict[int, bytes]:
    out = {}
    while off + _NLA.size <= end:
        n, kind = _NLA.unpack_from(buf, off)
        if n < _NLA.size or off + n > end:
            break
        out[kind & 0x3FFF] = buf[off + _NLA.size:off + n]
        off += (n + 3) & ~3
    return out


def _ip(family: int, b: bytes | None) -> str | None:
    return socket.inet_ntop(family, b) if b else None


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy rule that sends to a table (action FR_ACT_TO_TBL)."""
    family: int
    table: int
    src: str | None = None  # None: from all
    src_len: int = 0
    iifname: str | None = None
    ip_proto: int = 0  # 0: any
    sport: tuple[int, int] | None = None  # (first, last)
    protocol: int = 0  # who added it (rtm_protocol numbers)
    priority: int | None = None

    def selector(self) -> tuple:
        """What it matches and where it sends: two rules equal in this are the same rule."""
        return (self.family, self.table, self.src, self.src_len, self.iifname, self.ip_proto, self.sport)

    def ip_command(self) -> str:
        v6 = "-6 " if self.family == socket.AF_INET6 else ""
        frm = f"{self.src}/{self.src_len}" if self.src else "all"
        if self.src and self.src_len == _full(self.family):
            frm = self.src
        parts = [f"ip {v6}rule add"]
        if self.priority is not None:
            parts.append(f"priority {self.priority}")
        parts.append(f"from {frm}")
        if self.iifname:
            parts.append(f"iif {self.iifname}")
        if self.ip_proto:
            parts.append("ipproto udp" if self.ip_proto == socket.IPPROTO_UDP else f"ipproto {self.ip_proto}")
        if self.sport:
            a, b = self.sport
            parts.append(f"sport {a}" if a == b else f"sport {a}-{b}")
        parts.append(f"lookup {self.table}")
        if self.protocol:
            parts.append(f"proto {self.protocol}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Route:
    family: int
    table: int
    type: int  # RTN_*
    dst: str | None = None  # None: the default route (dst_len 0)
    dst_len: int = 0
    oif: int | None = None
    protocol: int = 0
    scope: int = RT_SCOPE_UNIVERSE
    prefsrc: str | None = None

    def ip_command(self, lo: str = "lo") -> str:
        v6 = "-6 " if self.family == socket.AF_INET6 else ""
        dst = f"{self.dst or ('::' if v6 else '0.0.0.0')}/{self.dst_len}"
        kind = "local " if self.type == RTN_LOCAL else ""
        proto = f" proto {self.protocol}" if self.protocol else ""
        return f"ip {v6}route add {kind}{dst} dev {lo} table {self.table}{proto}"


class Netlink:
    """One NETLINK_ROUTE socket; requests are answered in order (one at a time)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            self.sock.bind((0, 0))
            self.sock.settimeout(5.0)  # the kernel answers at once; a bound for the unexpected
            try:  # dumps filtered by the kernel (by table), and requests checked strictly (Linux 4.20)
                self.sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            except OSError:
                pass
        except OSError:
            self.sock.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; the messages of the answer as (type, payload). A dump ends
        with NLMSG_DONE, anything else with the ACK (or the first message, for a GET)."""
        self.seq += 1
        seq = self.seq
        self.sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body)
        out: list[tuple[int, bytes]] = []
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        while True:
            data = self.sock.recv(1 << 17)
            off = 0
            while off + _NLMSG.size <= len(data):
                n, mtype, mflags, mseq, _ = _NLMSG.unpack_from(data, off)
                if n < _NLMSG.size:
                    raise OSError(errno.EPROTO, "malformed netlink answer")
                payload = data[off + _NLMSG.size:off + n]
                off += (n + 3) & ~3
                if mseq != seq:
                    continue  # the answer to an earlier request that timed out
                if mtype == NLMSG_DONE:
                    return out
                if mtype == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", payload)
                    if err:
                        raise OSError(-err, f"{_names.get(kind, kind)}: {errno.errorcode.get(-err, -err)}")
                    return out
                out.append((mtype, payload))
                if not dump and not flags & NLM_F_ACK:
                    return out

    # --- rules ---

    def rules(self, family: int) -> list[Rule]:
        out = []
        for _, p in self._request(RTM_GETRULE, NLM_F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, _dst_len, src_len, _tos, table, _r1, _r2, action, _flags = _RTMSG.unpack_from(p)
            if action != FR_ACT_TO_TBL:
                continue
            a = _attrs(p, _RTMSG.size, len(p))
            sport = _PORTS.unpack(a[FRA_SPORT_RANGE]) if FRA_SPORT_RANGE in a else None
            out.append(Rule(
                family=fam, table=_U32.unpack(a[FRA_TABLE])[0] if FRA_TABLE in a else table,
                src=_ip(fam, a.get(FRA_SRC)), src_len=src_len,
                iifname=a[FRA_IIFNAME].rstrip(b"\0").decode() if FRA_IIFNAME in a else None,
                ip_proto=a[FRA_IP_PROTO][0] if FRA_IP_PROTO in a else 0, sport=sport,
                protocol=a[FRA_PROTOCOL][0] if FRA_PROTOCOL in a else 0,
                priority=_U32.unpack(a[FRA_PRIORITY])[0] if FRA_PRIORITY in a else 0))
        return out

    def _rule_msg(self, r: Rule) -> bytes:
        body = _RTMSG.pack(r.family, 0, r.src_len if r.src else 0, 0, r.table if r.table < 256 else RT_TABLE_UNSPEC,
                           0, 0, FR_ACT_TO_TBL, 0)
        body += _attr(FRA_TABLE, _U32.pack(r.table))
        if r.src:
            body += _attr(FRA_SRC, socket.inet_pton(r.family, r.src))
        if r.iifname:
            body += _attr(FRA_IIFNAME, r.iifname.encode() + b"\0")
        if r.ip_proto:
            body += _attr(FRA_IP_PROTO, bytes([r.ip_proto]))
        if r.sport:
            body += _attr(FRA_SPORT_RANGE, _PORTS.pack(*r.sport))
        if r.protocol:
            body += _attr(FRA_PROTOCOL, bytes([r.protocol]))
        if r.priority is not None:
            body += _attr(FRA_PRIORITY, _U32.pack(r.priority))
        return body

    def add_rule(self, r: Rule) -> None:
        self._request(RTM_NEWRULE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, self._rule_msg(r))

    def delete_rule(self, r: Rule) -> None:
        self._request(RTM_DELRULE, NLM_F_ACK, self._rule_msg(r))

    # --- routes ---

    def _route(self, p: bytes) -> Route:
        fam, dst_len, _src_len, _tos, table, protocol, scope, rtype, _flags = _RTMSG.unpack_from(p)
        a = _attrs(p, _RTMSG.size, len(p))
        return Route(family=fam, table=_U32.unpack(a[RTA_TABLE])[0] if RTA_TABLE in a else table, type=rtype,
                     dst=_ip(fam, a.get(RTA_DST)), dst_len=dst_len,
                     oif=_U32.unpack(a[RTA_OIF])[0] if RTA_OIF in a else None,
                     protocol=protocol, scope=scope, prefsrc=_ip(fam, a.get(RTA_PREFSRC)))

    def routes(self, family: int, table: int) -> list[Route]:
        body = _RTMSG.pack(family, 0, 0, 0, table if table < 256 else RT_TABLE_UNSPEC, 0, 0, 0, 0)
        body += _attr(RTA_TABLE, _U32.pack(table))
        return [r for r in (self._route(p) for _, p in self._request(RTM_GETROUTE, NLM_F_DUMP, body))
                if r.table == table]  # the kernel filters only with strict checking

    def _route_msg(self, r: Route) -> bytes:
        body = _RTMSG.pack(r.family, r.dst_len, 0, 0, r.table if r.table < 256 else RT_TABLE_UNSPEC,
                           r.protocol, r.scope, r.type, 0)
        body += _attr(RTA_TABLE, _U32.pack(r.table))
        if r.dst:
            body += _attr(RTA_DST, socket.inet_pton(r.family, r.dst))
        if r.oif is not None:
            body += _attr(RTA_OIF, _U32.pack(r.oif))
        return body

    def add_route(self, r: Route) -> None:
        self._request(RTM_NEWROUTE, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, self._route_msg(r))

    def delete_route(self, r: Route) -> None:
        self._request(RTM_DELROUTE, NLM_F_ACK, self._route_msg(r))

    def route_get(self, family: int, dst: str, src: str | None = None, ip_proto: int = 0,
                  sport: int = 0) -> Route:
        """The route the kernel picks for a packet this host sends to dst (from src, from
        UDP port sport): its type (RTN_LOCAL: delivered here), table, device, source."""
        full = _full(family)
        flags = RTM_F_LOOKUP_TABLE if family == socket.AF_INET else 0  # IPv6 says its table anyway
        body = _RTMSG.pack(family, full, full if src else 0, 0, 0, 0, 0, 0, flags)
        body += _attr(RTA_DST, socket.inet_pton(family, dst))
        if src:
            body += _attr(RTA_SRC, socket.inet_pton(family, src))
        if ip_proto:
            body += _attr(RTA_IP_PROTO, bytes([ip_proto]))
        if sport:
            body += _attr(RTA_SPORT, _BE16.pack(sport))
        msgs = self._request(RTM_GETROUTE, 0, body)
        if not msgs:
            raise OSError(errno.EPROTO, "RTM_GETROUTE: no answer")
        return self._route(msgs[0][1])


_names = {RTM_NEWROUTE: "RTM_NEWROUTE", RTM_DELROUTE: "RTM_DELROUTE", RTM_GETROUTE: "RTM_GETROUTE",
          RTM_NEWRULE: "RTM_NEWRULE", RTM_DELRULE: "RTM_DELRULE", RTM_GETRULE: "RTM_GETRULE"}
