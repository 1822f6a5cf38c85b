"""The kernel data path (issue 19): datagrams of known flows relayed by an eBPF
program at tc ingress, never waking the agent.

The program is bpf/relay.bpf.c (compiled by `make` when clang is there, and
put into the zipapp); this module loads it with the raw bpf(2) system call
(io/bpf.py, standard library only), one instance per agent, with maps of its
own, and attaches it through tcx links (BPF_LINK_CREATE, BPF_TCX_INGRESS) to
every interface with an Ethernet-style header (loopback included; others, such
as WireGuard, tun or PPP devices, have no MAC header and are left alone),
whether up or not, so an interface that comes up later is covered; one created
later is attached by `refresh()`. A link is a file descriptor: when the
agent exits, however it exits, the kernel detaches the program and frees it
and its maps.

    kp = KernelPath.open(ifaces=None, legacy=False, wireguard=False, max_flows=8192, debug=False)
    # (KernelUnavailable(reason), one line, if it cannot run here; available() -> reason or None)
    # outside agent, where the route table binds a client to a tunnel (and on every change of either address):
    kp.outside_bind(listen, client, tunnel, client_listen=None, keys=None, up_rule=None, down_rule=None)
        -> (up, down): which directions the kernel now relays
    kp.outside_unbind(client, tunnel, keys=None) -> {key: (packets, bytes, last)} not yet in deltas()
    # inside agent, once a tunnel has its service socket:
    kp.inside_pipe(tunnel_local, outside, service_local, service, keys=None, rx_rule=None, tx_rule=None)
        -> (rx, tx)
    kp.inside_unpipe(tunnel_local, service_local, keys=None) -> {key: (packets, bytes, last)}
    kp.deltas()    # {flow key: (packets, bytes, last seen)} moved since the previous call
    kp.counters()  # {flow key: (packets, bytes, last seen)} since the flow was installed
    kp.stats()     # {reason: packets}: what the program did with everything it saw
    kp.refresh()   # new interfaces, changed addresses, routes or NAT rules
    kp.kept        # {flow key: why the agent relays it itself}; kp.notes: what open() changed
    kp.close()

`FlowTable` is the part that keeps the map as the agent asked for it (the
entries, their counters, what is kept and why), with the map and the host's
answers (routes, NAT, settings) behind a few methods: `KernelPath` is a
FlowTable over the real map and host; the tests' simulator runs one over a
dict (`DictMap`). io/datapath.py connects either to the agents' loops.

Where the loops call it (io/datapath.py does it for them):
- outside: the route table's listener (core/routes.py). A client's datagrams
  arrive on its service's endpoint (`client_listen`) and go up from the tunnel
  port's (`listen`); the tunnel's arrive on the tunnel port and go down from
  the client's endpoint. Each direction carries the rule (`rule_flags` of
  core/classify.py's Classifier) of the endpoint its datagrams arrive on. The
  keys are the route table's: (endpoint, source address).
- inside: inside_pipe(tunnel socket's getsockname(), its getpeername(),
  service socket's getsockname(), service address) once the service socket
  is open (the first datagram went through the core as before), again after a
  reconnect to a new outside address; inside_unpipe when the pair closes.
- before each core timer (and before a status snapshot): for each (key,
  (packets, bytes, _)) in deltas(), add them to the meter of that flow; and
  what outside_unbind / inside_unpipe return, to the meters of the flow that
  goes, so that expiry, status and metrics see the kernel's traffic as if the
  loop had counted it.
- refresh() now and then (a minute), stats() and kept for `status`.

Addresses are tuples as the agent's sockets give them (IPv4 clients of a
dual-stack socket as ("::ffff:a.b.c.d", port, 0, 0)); a listen address of
"", "0.0.0.0" or "::" means any local address. Flow keys are the tuples passed
in `keys` (by default: at the outside the source of the flow, client or
tunnel; at the inside the local socket the flow arrives at, tunnel_local:
outside -> service, service_local: service -> outside). The counters count
UDP payload bytes, as the user-space path's meters do; a GSO or GRO packet
counts as the datagrams it holds. `last seen` is on the time.monotonic()
clock (bpf_ktime_get_ns is CLOCK_MONOTONIC); None if never.

A direction is not installed (and the agent goes on relaying it itself) when
its two ends differ in address family, when its rule is one the program
cannot apply, or when it would leave through an interface on which this host
source-NATs that traffic (io/hostnat.py): the program sends packets out past
netfilter. Everything the program does not relay reaches the agent's sockets
exactly as without it (see the program's header for the list).

Settings of lo are turned on when a flow needs them, and the change is said
in `notes` (a flow that needs one that cannot be set stays with the agent,
the reason in `kept`):
- net.ipv4/ipv6.conf.lo.forwarding, for flows to other hosts: the program
  looks routes up with bpf_fib_lookup from lo, as the stack does for what
  local sockets send, and the helper answers only where forwarding is on;
  on lo this forwards nothing, since nothing arrives on lo to be forwarded;
- net.ipv4.conf.lo.accept_local, for IPv4 flows to this host, and
  net.ipv4.conf.lo.route_localnet for those to 127.0.0.0/8: the packet
  enters lo without the route a local sender's packet carries, and the
  input route lookup takes a local source address (a relayed datagram
  always has one) and 127/8 for martians otherwise. Only what arrives on lo
  is concerned, and only this host sends there. (IPv6 needs neither.)
io/losettings.py sets them back when the last agent that relies on them stops (an agent
killed with SIGKILL leaves what it turned on on).
"""

from __future__ import annotations

import fcntl
import importlib.resources
import ipaddress
import os
import platform
import socket
import struct
from collections.abc import Hashable
from typing import NamedTuple, Protocol

from udp_tunnel.core.classify import Kind, outside_rule
from udp_tunnel.core.wireguard import DOWN_LENS
from udp_tunnel.io import bpf
from udp_tunnel.io.bpf import BpfError
from udp_tunnel.io.hostnat import NatRules, Route, route_get
from udp_tunnel.io.losettings import LoSettings
from udp_tunnel.wire import proto

OBJECT_NAME = "relay.bpf.o"
PROGRAM = "udpt_relay"
STATS = ("relayed", "local", "not_ip", "not_udp", "fragment", "ip_options", "malformed", "control", "wireguard",
         "unknown", "family", "ttl", "no_route", "mtu", "fwd_disabled", "error", "otherhost")
CFG_WILDCARD, CFG_AGENT_BEFORE = 4, 8
F_V4, F_SRC_IS_DST, F_LOCAL = 1, 2, 4
F_CTRL, F_LEN40, F_WG = 8, 16, 32  # the flow's rule: which of its datagrams the agent must see
F_TO_AGENT = 64  # the new destination is an agent (tunnel, outside agent): another agent here may relay it on
NO_RULE = 1 << 16  # (not the program's) a rule the program cannot apply: the direction stays with the agent
CTRL_LEN, LEGACY_LEN, WG_LENS = proto.CTRL_LEN, proto.LEGACY_LEN, DOWN_LENS  # (the program is told CTRL_LEN)
MAGIC = proto.MAGIC  # (the program's own, as a number: "UDPT")
CONFIG = struct.Struct("<II")  # struct config: flags, the length of a control message
KEY = struct.Struct("<16s16s2s2s")
VALUE = struct.Struct("<16s16s2s2sIQQQ")
ZERO16 = bytes(16)
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
SIOCGIFHWADDR = 0x8927
LOOPBACK_IFINDEX = 1
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
FORWARDING = {4: "net/ipv4/conf/lo/forwarding", 6: "net/ipv6/conf/lo/forwarding"}
ACCEPT_LOCAL, ROUTE_LOCALNET = "net/ipv4/conf/lo/accept_local", "net/ipv4/conf/lo/route_localnet"
VERIFIER_LINES = 12

Counts = dict[Hashable, tuple[int, int, "float | None"]]


class KernelUnavailable(Exception):  # noqa: N818 (the name the issue gives it)
    """The kernel path cannot run here; str() is the reason, one line."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Addr(NamedTuple):
    raw: bytes  # 16 bytes, IPv4 as ::ffff:a.b.c.d; all zero for any address
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None  # None: any local address
    port: bytes  # network order
    v4: bool


def addr(a: tuple) -> Addr:
    """An address as a socket gives it, for the map; ValueError if it is not one."""
    host, port = a[0], int(a[1])
    if not 0 <= port < 65536:
        raise ValueError(f"port {port}")
    host = host.split("%", 1)[0]
    if host in ("", "0.0.0.0", "::"):
        return Addr(ZERO16, None, struct.pack("!H", port), host == "0.0.0.0")
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return Addr(b"\0" * 10 + b"\xff\xff" + ip.packed, ip, struct.pack("!H", port), True)
    return Addr(ip.packed, ip, struct.pack("!H", port), False)


def rule_flags(rule) -> int | None:
    """The program's flags for a core/classify.py Classifier (the datagrams of a flow the agent must
    see), or None when the program cannot apply that rule. Asked through the rule's own `lengths`
    and `kind`, so that the two can't drift apart unnoticed."""
    flags = 0
    lengths = set(rule.lengths)

    def kind(n: int, head: bytes = b"") -> Kind:
        return rule.kind(head + bytes(n - len(head)))

    if CTRL_LEN in lengths:
        if kind(CTRL_LEN) is not Kind.DATA or kind(CTRL_LEN, MAGIC) is not Kind.CONTROL:
            return None
        flags |= F_CTRL
    if LEGACY_LEN in lengths:
        if kind(LEGACY_LEN) is not Kind.CONTROL:
            return None
        flags |= F_LEN40
    wg = [n for n in WG_LENS if n in lengths]
    if wg:
        if len(wg) != len(WG_LENS) or any(kind(n) is not Kind.HANDSHAKE for n in WG_LENS):
            return None
        flags |= F_WG
    if lengths - {CTRL_LEN, LEGACY_LEN, *WG_LENS}:
        return None
    return flags


def find_object() -> bytes:
    """The compiled program: $UDP_TUNNEL_BPF_OBJECT, the package (zipapp), or the source tree's bpf/."""
    path = os.environ.get("UDP_TUNNEL_BPF_OBJECT")
    if path:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise KernelUnavailable(f"UDP_TUNNEL_BPF_OBJECT={path}: {e.strerror}") from None
    try:
        return importlib.resources.files("udp_tunnel.io").joinpath(OBJECT_NAME).read_bytes()
    except (OSError, ModuleNotFoundError):
        pass
    tree = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "bpf", OBJECT_NAME)
    try:
        with open(tree, "rb") as f:
            return f.read()
    except OSError:
        pass
    raise KernelUnavailable("no compiled eBPF program (built by `make` when clang is installed; "
                            "or set UDP_TUNNEL_BPF_OBJECT)")


def capability_problem() -> str | None:
    """Why this process may not load and attach a tc program, or None."""
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("CapEff:"))
        caps = int(line.split()[1], 16)
    except (OSError, StopIteration, ValueError):
        return None  # can't tell: let the system calls say
    missing = []
    if not caps & (1 << CAP_NET_ADMIN):
        missing.append("CAP_NET_ADMIN")
    if not caps & ((1 << CAP_BPF) | (1 << CAP_SYS_ADMIN)):
        missing.append("CAP_BPF")
    if missing:
        return f"needs root or {' and '.join(missing)}"
    return None


def kernel_version() -> tuple[int, int]:
    try:
        major, minor = platform.release().split(".")[:2]
        return int(major), int("".join(c for c in minor if c.isdigit()) or 0)
    except ValueError:
        return 0, 0


def interfaces() -> dict[int, str]:
    """The interfaces the program can run on: Ethernet-style header (and loopback), by index.
    (Asked through a socket, not /sys: sysfs shows the namespace it was mounted in.)"""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for index, name in socket.if_nameindex():
            try:
                ifr = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("16s24x", name.encode()))
            except OSError:
                continue
            if struct.unpack_from("=H", ifr, 16)[0] in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
                out[index] = name
    return out


def available(debug: bool = False) -> str | None:
    """None if the kernel path can run here (loads the program and attaches it to lo for a moment),
    else the reason, in one line."""
    try:
        KernelPath.open(ifaces=["lo"], debug=debug).close()
    except KernelUnavailable as e:
        return e.reason
    return None


class Entry(NamedTuple):
    key: bytes
    new_src: Addr  # raw zero: the packet's destination address (F_SRC_IS_DST); the port is always new_src's
    new_dst: Addr
    flags: int


# --- the map ---

class FlowMap(Protocol):
    """The program's flow map, by its raw keys and values (KEY, VALUE)."""

    def update(self, key: bytes, value: bytes) -> None: ...
    def lookup(self, key: bytes) -> bytes | None: ...
    def pop(self, key: bytes) -> bytes | None: ...
    def items(self) -> list[tuple[bytes, bytes]]: ...


class BpfFlowMap:
    """The real map, through bpf(2)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def update(self, key: bytes, value: bytes) -> None:
        bpf.map_update(self.fd, key, value)

    def lookup(self, key: bytes) -> bytes | None:
        return bpf.map_lookup(self.fd, key, VALUE.size)

    def pop(self, key: bytes) -> bytes | None:
        """The entry's value as it was when it went (nothing counted in between is lost)."""
        return bpf.map_pop(self.fd, key, VALUE.size)

    def items(self) -> list[tuple[bytes, bytes]]:
        return bpf.map_items(self.fd, KEY.size, VALUE.size)


class DictMap:
    """A map in a dict, for tests and the simulator: `size` entries at most, as the kernel's."""

    def __init__(self, size: int = 8192) -> None:
        self.data: dict[bytes, bytes] = {}
        self.size = size

    def update(self, key: bytes, value: bytes) -> None:
        if key not in self.data and len(self.data) >= self.size:
            raise BpfError(7, "updating a map entry")  # E2BIG, as the kernel says it
        self.data[key] = value

    def lookup(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def pop(self, key: bytes) -> bytes | None:
        return self.data.pop(key, None)

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.data.items())


def counts_of(raw: bytes) -> tuple[int, int, int]:
    """(packets, bytes, last seen in ns) of a raw map value."""
    return VALUE.unpack(raw)[5:]


class FlowTable:
    """The flow map as the agent asked for it: what is installed (`entries`), what was asked for
    (`wanted`), what stays with the agent and why (`kept`), and the counters read back. The host's
    answers come from the methods `_route`, `_sysctl_on`, `_nat` and `_wildcard` (none here:
    every destination is another host's, reached without NAT); KernelPath answers them for real."""

    def __init__(self, flows: FlowMap, default_rule: int = F_CTRL) -> None:
        self.flows = flows
        self.default_rule = default_rule  # for a direction given no rule of its own
        self.entries: dict[Hashable, Entry] = {}  # flow key (as the agent gave it) -> what is in the map
        self.by_key: dict[bytes, Hashable] = {}  # map key -> flow key
        self.last: dict[Hashable, tuple[int, int]] = {}  # flow key -> counters at the previous deltas()
        self.kept: dict[Hashable, str] = {}  # flow key -> why that direction stays with the agent
        self.wanted: dict[Hashable, Entry] = {}  # flow key -> what the agent asked for (installed or kept)
        self.partners: dict[Hashable, Hashable] = {}  # outside: client -> its tunnel, tunnel -> its client
        self.notes: list[str] = []  # what was changed or could not be done, for the log
        self.pending: Counts = {}  # counted by directions that went back to the agent, for the next deltas()

    # --- the host (KernelPath answers for real) ---

    def _route(self, dst: Addr, src: Addr) -> Route | None:
        return None

    def _sysctl_on(self, name: str, why: str) -> str | None:
        return None

    def _nat(self, src, oif: str | None) -> str | None:
        return None

    def _wildcard(self) -> None:
        """A flow with any local address as its destination is in the map from now on."""

    # --- installing ---

    def _why_kept(self, want: Entry) -> tuple[int, str | None]:
        """The flags the route adds (F_LOCAL), and why the direction must stay with the agent (or None)."""
        _, new_src, new_dst, flags = want
        if new_dst.ip is None:
            raise ValueError("a flow goes to an address, not to any address")
        r = self._route(new_dst, new_src)
        if r is not None and r.local:
            # IPv4 into lo without the route a local sender's packet carries: the input route lookup takes a
            # local source, and 127/8, for martians unless lo accepts them (lo only: what arrives on lo was
            # sent by this host)
            why = None
            if new_dst.v4:
                why = self._sysctl_on(ACCEPT_LOCAL, "lets relayed datagrams from a local address in")
                if new_dst.ip.is_loopback:
                    why = why or self._sysctl_on(ROUTE_LOCALNET, "lets relayed datagrams to 127.0.0.0/8 in")
            return F_LOCAL, why
        src = new_src.ip if new_src.ip is not None else (r.prefsrc if r else None)
        why = self._nat(src, r.oif if r else None)
        why = f"this host NATs it ({why})" if why else None
        # bpf_fib_lookup answers only where forwarding is on; looking up from lo, as the stack does for
        # local senders, needs it on lo alone, which makes nothing forwarded (nothing arrives on lo to be)
        why = why or self._sysctl_on(FORWARDING[4 if new_dst.v4 else 6], "lets the program look up routes")
        return 0, why

    def _install(self, fkey: Hashable, want: Entry) -> bool:
        """Put one direction in the map (keeping its counters), or take it out and say why in `kept`."""
        self.wanted[fkey] = want
        more, why = 0, "its rule of the datagrams the agent must see is not one the program knows"
        if not want.flags & NO_RULE:
            more, why = self._why_kept(want)
        if why:
            self._keep(fkey, why)
            return False
        entry = want._replace(flags=want.flags | more)
        if self.entries.get(fkey) == entry:
            return True  # as it is (its counters go on)
        if entry.flags & F_SRC_IS_DST:
            self._wildcard()
        try:
            self.flows.update(entry.key, self._value(fkey, entry))
        except BpfError as e:  # the table is full (E2BIG), or out of memory: the agent relays this one
            self._keep(fkey, f"the kernel's flow table refused it: {e.strerror}")
            return False
        self.entries[fkey] = entry
        self.by_key[entry.key] = fkey
        self.kept.pop(fkey, None)
        return True

    def _value(self, fkey: Hashable, entry: Entry) -> bytes:
        """The map value for entry, with the counters of what was installed for fkey before (a new
        address of the same flow keeps them)."""
        packets = nbytes = last = 0
        old = self.entries.get(fkey)
        if old is not None:
            raw = self.flows.pop(old.key) if old.key != entry.key else self.flows.lookup(old.key)
            if raw is not None:
                packets, nbytes, last = counts_of(raw)
            if old.key != entry.key:
                self.by_key.pop(old.key, None)
                self.entries.pop(fkey)
        new_src, new_dst = entry.new_src, entry.new_dst
        return VALUE.pack(new_src.raw, new_dst.raw, new_src.port, new_dst.port, entry.flags, packets, nbytes, last)

    def _keep(self, fkey: Hashable, why: str) -> None:
        """The agent relays fkey's direction from now on; what the kernel counted for it goes to deltas()."""
        self._pend(fkey, self._uninstall(fkey))
        self.kept[fkey] = why

    def _pend(self, fkey: Hashable, final: tuple[int, int, float | None] | None) -> None:
        """What a direction counted before it left the map: for the next deltas()."""
        if final is not None and final[0]:
            p, b, _ = self.pending.get(fkey, (0, 0, None))
            self.pending[fkey] = (p + final[0], b + final[1], final[2])

    def _uninstall(self, fkey: Hashable) -> tuple[int, int, float | None] | None:
        """Take fkey's entry out of the map: what it counted since the previous deltas(), or None."""
        e = self.entries.pop(fkey, None)
        p0, b0 = self.last.pop(fkey, (0, 0))
        if e is None:
            return None
        self.by_key.pop(e.key, None)
        raw = self.flows.pop(e.key)
        if raw is None:
            return None
        packets, nbytes, last = counts_of(raw)
        return packets - p0, nbytes - b0, last / 1e9 if last else None

    def _remove(self, fkey: Hashable) -> tuple[int, int, float | None] | None:
        self.wanted.pop(fkey, None)
        self.kept.pop(fkey, None)
        return self._uninstall(fkey)

    def _rule(self, rule: int | None) -> int:
        """A direction's rule flags: as given (NO_RULE: one the program cannot apply), or open()'s."""
        return self.default_rule if rule is None else rule

    # --- the two roles ---

    def outside_bind(self, listen: tuple, client: tuple, tunnel: tuple, client_listen: tuple | None = None,
                     keys: tuple[Hashable, Hashable] | None = None, up_rule: int | None = None,
                     down_rule: int | None = None) -> tuple[bool, bool]:
        """The kernel relays client -> client_listen (its service's port; default: listen) to the tunnel
        from listen (the tunnel port), and tunnel -> listen to the client from client_listen. A wildcard
        listen address sends from the address the datagram was sent to. `keys`: the flow keys of the up
        and the down direction (default: client, tunnel); the rules: rule_flags() of the rule of the
        endpoint each direction arrives on (default: open()'s). Returns which of (up, down) it now relays."""
        client_listen = listen if client_listen is None else client_listen
        ku, kd = keys if keys is not None else (client, tunnel)
        lis, clis, c, t = addr(listen), addr(client_listen), addr(client), addr(tunnel)
        if c.v4 != t.v4 or any(x.ip is not None and x.v4 != c.v4 for x in (lis, clis)):
            for k in (ku, kd):
                self._remove(k)
                self.kept[k] = "client and tunnel differ in address family"
            return False, False
        flags = F_V4 if c.v4 else 0
        # a client that moved to another tunnel, or a tunnel that carries another client now (roaming):
        # the flow of the old partner goes, as it goes from the core's route table
        for me, partner in ((ku, kd), (kd, ku)):
            old = self.partners.get(me)
            if old is not None and old != partner and self.partners.get(old) == me:
                self._pend(old, self._remove(old))
                del self.partners[old]
            self.partners[me] = partner
        up = self._install(ku, Entry(KEY.pack(c.raw, clis.raw, c.port, clis.port), lis, t,
                                     flags | _wild(lis) | self._rule(up_rule) | F_TO_AGENT))
        down = self._install(kd, Entry(KEY.pack(t.raw, lis.raw, t.port, lis.port), clis, c,
                                       flags | _wild(clis) | self._rule(down_rule)))
        return up, down

    def outside_unbind(self, client: tuple, tunnel: tuple, keys: tuple[Hashable, Hashable] | None = None) -> Counts:
        """Both directions go back to the agent. Returns what they counted since the previous deltas()."""
        out = {}
        for k in keys if keys is not None else (client, tunnel):
            final = self._remove(k)
            self.partners.pop(k, None)
            if final is not None and final[0]:
                out[k] = final
        return out

    def inside_pipe(self, tunnel_local: tuple, outside: tuple, service_local: tuple, service: tuple,
                    keys: tuple[Hashable, Hashable] | None = None, rx_rule: int | None = None,
                    tx_rule: int | None = None) -> tuple[bool, bool]:
        """The kernel relays outside -> tunnel socket as service socket -> service, and service -> service
        socket as tunnel socket -> outside. Returns which of (rx, tx) it now relays."""
        kr, kt = keys if keys is not None else (tunnel_local, service_local)
        tl, o, sl, s = addr(tunnel_local), addr(outside), addr(service_local), addr(service)
        if not (tl.v4 == o.v4 == sl.v4 == s.v4):
            for k in (kr, kt):
                self._remove(k)
                self.kept[k] = "tunnel and service differ in address family"
            return False, False
        flags = F_V4 if tl.v4 else 0
        rx = self._install(kr, Entry(KEY.pack(o.raw, tl.raw, o.port, tl.port), sl, s, flags | self._rule(rx_rule)))
        tx = self._install(kt, Entry(KEY.pack(s.raw, sl.raw, s.port, sl.port), tl, o,
                                     flags | self._rule(tx_rule) | F_TO_AGENT))
        return rx, tx

    def inside_unpipe(self, tunnel_local: tuple, service_local: tuple,
                      keys: tuple[Hashable, Hashable] | None = None) -> Counts:
        out = {}
        for k in keys if keys is not None else (tunnel_local, service_local):
            final = self._remove(k)
            if final is not None and final[0]:
                out[k] = final
        return out

    def reinstall(self) -> None:
        """Every direction asked for, put right with what the host says now."""
        for fkey, e in list(self.wanted.items()):
            self._install(fkey, e)

    # --- reading back ---

    def counters(self) -> Counts:
        """Every installed flow: (packets, bytes, last seen on the time.monotonic() clock or None)."""
        out = {}
        for key, raw in self.flows.items():
            fkey = self.by_key.get(key)
            if fkey is None:
                continue
            packets, nbytes, last = counts_of(raw)
            out[fkey] = (packets, nbytes, last / 1e9 if last else None)
        return out

    def deltas(self) -> Counts:
        """The flows that moved since the previous call: (new packets, new bytes, last seen)."""
        out, self.pending = self.pending, {}
        for fkey, (packets, nbytes, last) in self.counters().items():
            p0, b0 = self.last.get(fkey, (0, 0))
            if packets != p0:
                p, b, _ = out.get(fkey, (0, 0, None))
                out[fkey] = (p + packets - p0, b + nbytes - b0, last)
                self.last[fkey] = (packets, nbytes)
        return out


def _wild(a: Addr) -> int:
    """F_SRC_IS_DST for a wildcard address: the new source is where the datagram was sent."""
    return F_SRC_IS_DST if a.ip is None else 0


# --- the program on this host ---

class KernelPath(FlowTable):
    def __init__(self, prog_fd: int, maps: dict[str, int], ifaces: list[str] | None,
                 default_rule: int = F_CTRL) -> None:
        super().__init__(BpfFlowMap(maps["flows"]), default_rule)
        self.prog_fd = prog_fd
        self.maps = maps
        self.ifaces = ifaces
        self.links: dict[int, tuple[str, int]] = {}  # ifindex -> (name, link fd)
        self.routes: dict[tuple, Route | None] = {}
        self.nat = NatRules([], None)
        self.lo = LoSettings()  # lo's settings turned on, set back at close
        self.ncpus = bpf.possible_cpus()
        self.config = 0

    # --- setting up ---

    @classmethod
    def open(cls, *, ifaces: list[str] | None = None, legacy: bool = False, wireguard: bool = False,
             max_flows: int = 8192, debug: bool = False) -> KernelPath:
        """Load the program and attach it (to `ifaces`, else those of $UDP_TUNNEL_BPF_IFACES, comma-separated,
        else every suitable interface); KernelUnavailable if that cannot be done here. With `debug`, a verifier
        refusal carries the verifier's first lines. `legacy` and `wireguard`: the rule of directions given none
        (as core/classify.py's outside rule)."""
        if ifaces is None and os.environ.get("UDP_TUNNEL_BPF_IFACES"):
            ifaces = [name for name in os.environ["UDP_TUNNEL_BPF_IFACES"].split(",") if name]
        _check_system()
        prog_fd, maps = _load(max_flows, debug)
        rule = rule_flags(outside_rule(legacy, wireguard))
        try:
            self = cls(prog_fd, maps, ifaces, rule)
        except BaseException:
            _close(prog_fd, *maps.values())
            raise
        try:
            self._configure()
            self.nat = NatRules.load()
            self._attach(first=True)
        except BpfError as e:
            self.close()
            raise KernelUnavailable(str(e)) from None
        except BaseException:
            self.close()
            raise
        return self

    def _configure(self) -> None:
        bpf.map_update(self.maps["config"], struct.pack("<I", 0), CONFIG.pack(self.config, CTRL_LEN))

    def _wildcard(self) -> None:
        if not self.config & CFG_WILDCARD:
            self.config |= CFG_WILDCARD  # from now on, a miss is looked up again with any destination address
            self._configure()

    def _sysctl_on(self, name: str, why: str) -> str | None:
        """Turn a setting of lo on if it is off (saying so in `notes`); None, or why it cannot be done."""
        return self.lo.turn_on(name, why, self.notes)

    def _nat(self, src, oif: str | None) -> str | None:
        return self.nat.applies(src, oif)

    def _route(self, dst: Addr, src: Addr) -> Route | None:
        k = (dst.ip, src.ip)
        if k not in self.routes:
            self.routes[k] = route_get(dst.ip, src.ip)  # None when the kernel does not answer
        return self.routes[k]

    def _wanted(self) -> dict[int, str]:
        if self.ifaces is None:
            found = interfaces()
            others = sorted(name for _, name in socket.if_nameindex() if name not in found.values())
            note = f"not attached to {', '.join(others)} (no MAC header: their traffic stays with the agent)"
            if others and note not in self.notes:
                self.notes.append(note)
            return found
        out = {}
        for name in self.ifaces:
            try:
                out[socket.if_nametoindex(name)] = name
            except OSError:
                raise KernelUnavailable(f"no interface '{name}'") from None
        return out

    def _attach(self, first: bool = False) -> list[str]:
        wanted = self._wanted()
        for index in [i for i in self.links if i not in wanted]:
            os.close(self.links.pop(index)[1])
        added = []
        for index, name in wanted.items():
            if index in self.links:
                continue
            try:
                self.links[index] = (name, bpf.link_create(self.prog_fd, index, bpf.TCX_INGRESS))
                added.append(name)
            except BpfError as e:
                if first and e.errno == 22 and not self.links:  # EINVAL on the first: no tcx here
                    raise KernelUnavailable(f"the kernel ({platform.release()}) cannot attach through tcx "
                                            f"links: {e.strerror}") from None
                if first and e.errno in (1, 13):
                    raise KernelUnavailable("attaching the eBPF program needs root or CAP_NET_ADMIN") from None
                if e.errno == 19:  # ENODEV: gone meanwhile
                    continue
                self.notes.append(f"not attached to {name}: {e.strerror}")
        if first and not self.links:
            raise KernelUnavailable("no interface to attach to")
        self._order_on_lo()
        return added

    def _order_on_lo(self) -> None:
        """Tell the program whether another agent's program runs before it on lo (then a rewritten packet
        for a local socket must go round lo again for that one to see it; else it just goes on)."""
        before = False
        if LOOPBACK_IFINDEX in self.links:
            try:
                me = bpf.prog_id(self.prog_fd)
                ids = bpf.prog_ids(LOOPBACK_IFINDEX)
                # (a program's name takes CAP_SYS_ADMIN to read: without it, any program before counts)
                before = me not in ids or any(_name(i) in (PROGRAM, None) for i in ids[:ids.index(me)])
            except BpfError:
                before = True  # can't tell: the round through lo is always right
        config = (self.config | CFG_AGENT_BEFORE) if before else (self.config & ~CFG_AGENT_BEFORE)
        if config != self.config:
            self.config = config
            self._configure()

    def refresh(self) -> list[str]:
        """Attach to interfaces that appeared, let go of vanished ones, look again at addresses, routes and
        NAT rules, and put every installed flow right with them. Returns the interfaces newly attached."""
        added = self._attach()
        self.lo.checked.clear()
        self.nat = NatRules.load()
        self.routes.clear()
        self.reinstall()
        return added

    @property
    def attached(self) -> dict[str, int]:
        return {name: index for index, (name, _) in self.links.items()}

    def close(self) -> None:
        for _, fd in self.links.values():
            os.close(fd)
        self.links.clear()
        if self.prog_fd >= 0:
            os.close(self.prog_fd)
            self.prog_fd = -1
        for fd in self.maps.values():
            os.close(fd)
        self.maps = {}
        self.entries.clear()
        self.wanted.clear()
        self.partners.clear()
        self.by_key.clear()
        self.lo.close()

    # --- reading back ---

    def stats(self) -> dict[str, int]:
        """What the program did with the packets it saw, by reason, summed over the CPUs."""
        out = {}
        for i, name in enumerate(STATS):
            raw = bpf.map_lookup(self.maps["stats"], struct.pack("<I", i), 8 * self.ncpus)
            out[name] = sum(struct.unpack(f"<{self.ncpus}Q", raw)) if raw else 0
        return out

    def test_run(self, packet: bytes, ctx: bytes = b"", flags: int = 0) -> bpf.TestRun:
        """Run the program once on a packet (BPF_PROG_TEST_RUN), for tests."""
        return bpf.prog_test_run(self.prog_fd, packet, ctx, flags)


def _check_system() -> None:
    """KernelUnavailable if this system or process cannot run the program at all."""
    if platform.system() != "Linux":
        raise KernelUnavailable("needs Linux")
    if platform.machine() not in bpf.SYS_BPF:
        raise KernelUnavailable(f"the bpf() system call number is not known here for {platform.machine()}")
    if kernel_version() < (6, 6):
        raise KernelUnavailable(f"needs Linux 6.6 or later for tcx links (this is {platform.release()})")
    problem = capability_problem()
    if problem:
        raise KernelUnavailable(problem)


def _load(max_flows: int, debug: bool) -> tuple[int, dict[str, int]]:
    """The program loaded with maps of its own: (its fd, map name -> fd); KernelUnavailable (one line)."""
    try:
        obj = bpf.parse_object(find_object())
    except ValueError as e:
        raise KernelUnavailable(f"the compiled eBPF program is unusable: {e}") from None
    maps: dict[str, int] = {}
    try:
        for name, m in obj.maps.items():
            size = max_flows if name == "flows" else m.max_entries
            maps[name] = bpf.map_create(m.kind, m.key_size, m.value_size, size, name=f"udpt_{name}", flags=m.flags)
        return bpf.prog_load(bpf.PROG_SCHED_CLS, bpf.patch(obj, maps), obj.license, PROGRAM), maps
    except BpfError as e:
        _close(*maps.values())
        raise KernelUnavailable(_load_refused(e, debug)) from None
    except ValueError as e:
        _close(*maps.values())
        raise KernelUnavailable(f"the compiled eBPF program is unusable: {e}") from None


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _load_refused(e: BpfError, debug: bool) -> str:
    """Why the kernel refused to load the program, in one line."""
    if e.errno in (1, 13) and not e.log:  # EPERM, EACCES
        return f"the kernel refused to load the eBPF program ({e.strerror}): needs root or CAP_BPF and CAP_NET_ADMIN"
    if e.log:
        reason = "the kernel's verifier refused the eBPF program"
        if debug:
            lines = [x for x in e.log.splitlines() if x.strip()]
            return reason + ": " + " | ".join(lines[:VERIFIER_LINES])
        return reason + " (run with debug logging to see why)"
    return f"loading the eBPF program: {e}"


def _name(prog_id: int) -> str | None:
    """A program's name, "" if it is gone, None if this process may not know (no CAP_SYS_ADMIN)."""
    try:
        return bpf.prog_name_by_id(prog_id) or ""
    except BpfError:
        return None
