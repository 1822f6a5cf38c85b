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
    # outside agent, where it binds a client to a tunnel (and on every change of either address):
    kp.outside_bind(listen, client, tunnel)  -> (up, down): which directions the kernel now relays
    kp.outside_unbind(client, tunnel)
    # inside agent, once a tunnel has its service socket:
    kp.inside_pipe(tunnel_local, outside, service_local, service) -> (rx, tx)
    kp.inside_unpipe(tunnel_local, service_local)
    kp.deltas()    # {flow key: (packets, bytes, last seen)} moved since the previous call
    kp.counters()  # {flow key: (packets, bytes, last seen)} since the flow was installed
    kp.stats()     # {reason: packets}: what the program did with everything it saw
    kp.refresh()   # new interfaces, changed addresses, routes or NAT rules
    kp.kept        # {flow key: why the agent relays it itself}; kp.notes: what open() changed
    kp.close()

How the loops use it. The core stays the only source of truth; the loop
mirrors its route table into the map where it changes its own route cache:
- outside: for each client bound to a tunnel, outside_bind(listen socket's
  address, client, tunnel address), again whenever either address changes
  (rebinding, roaming: the old partner's flow goes by itself), and
  outside_unbind when the tunnel loses its client (unbind, expiry, close).
  open(legacy=core.legacy, wireguard=core.wg is not None, max_flows=2 *
  max_clients + 64 or more).
- inside: inside_pipe(tunnel socket's getsockname(), its getpeername(),
  service socket's getsockname(), service address) once the service socket
  is open (the first datagram went through the core as before), again if the
  outside's address changes; inside_unpipe when the pair closes.
- before each core timer: for each (key, (packets, bytes, _)) in deltas(),
  add them to the meter of that flow (outside: core.route[key]; inside: the
  tunnel's rx meter for its tunnel_local, its tx meter for its
  service_local), so that expiry, status and metrics see the kernel's
  traffic as if the loop had counted it.
- refresh() now and then (a minute), stats() and kept for `status`.

Addresses are tuples as the agent's sockets give them (IPv4 clients of a
dual-stack socket as ("::ffff:a.b.c.d", port, 0, 0)); a listen address of
"", "0.0.0.0" or "::" means any local address. Flow keys are the tuples passed
in: at the outside the source of the flow (client or tunnel: the keys of the
core's route table); at the inside the local socket the flow arrives at
(tunnel_local: outside -> service, service_local: service -> outside). The
counters count UDP payload bytes, as the user-space path's meters do; a GSO
or GRO packet counts as the datagrams it holds. `last seen` is on the
time.monotonic() clock (bpf_ktime_get_ns is CLOCK_MONOTONIC); None if never.

A direction is not installed (and the agent goes on relaying it itself) when
its two ends differ in address family, or when it would leave through an
interface on which this host source-NATs that traffic (io/hostnat.py): the
program sends packets out past netfilter. Everything the program does not
relay reaches the agent's sockets exactly as without it (see the program's
header for the list).

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
They stay on after the agent exits: another agent may rely on them.
"""

from __future__ import annotations

import fcntl
import importlib.resources
import ipaddress
import os
import platform
import socket
import struct
from typing import NamedTuple

from udp_tunnel.io import bpf
from udp_tunnel.io.bpf import BpfError
from udp_tunnel.io.hostnat import NatRules, Route, route_get

OBJECT_NAME = "relay.bpf.o"
PROGRAM = "udpt_relay"
STATS = ("relayed", "local", "not_ip", "not_udp", "fragment", "ip_options", "malformed", "control", "wireguard",
         "unknown", "family", "ttl", "no_route", "mtu", "fwd_disabled", "error", "otherhost")
CFG_LEGACY, CFG_WIREGUARD, CFG_WILDCARD, CFG_AGENT_BEFORE = 1, 2, 4, 8
F_V4, F_SRC_IS_DST, F_LOCAL = 1, 2, 4
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
    new_src: Addr  # raw zero: the packet's destination (F_SRC_IS_DST)
    new_dst: Addr
    flags: int


class KernelPath:
    def __init__(self, prog_fd: int, maps: dict[str, int], max_flows: int, ifaces: list[str] | None,
                 notes: list[str]) -> None:
        self.prog_fd = prog_fd
        self.maps = maps
        self.max_flows = max_flows
        self.ifaces = ifaces
        self.notes = notes  # what open()/refresh() changed or could not do, for the log
        self.links: dict[int, tuple[str, int]] = {}  # ifindex -> (name, link fd)
        self.entries: dict[tuple, Entry] = {}  # flow key (as the agent gave it) -> what is in the map
        self.by_key: dict[bytes, tuple] = {}  # map key -> flow key
        self.last: dict[tuple, tuple[int, int]] = {}  # flow key -> counters at the previous deltas()
        self.kept: dict[tuple, str] = {}  # flow key -> why that direction stays with the agent
        self.routes: dict[tuple, Route | None] = {}
        self.nat = NatRules([], None)
        self.wanted: dict[tuple, Entry] = {}  # flow key -> what the agent asked for (installed or kept)
        self.partners: dict[tuple, tuple] = {}  # outside: client -> its tunnel, tunnel -> its client
        self.sysctls: dict[str, str | None] = {}  # lo's settings checked: None (on), or why it cannot be
        self.ncpus = bpf.possible_cpus()
        self.config = 0

    # --- setting up ---

    @classmethod
    def open(cls, *, ifaces: list[str] | None = None, legacy: bool = False, wireguard: bool = False,
             max_flows: int = 8192, debug: bool = False) -> KernelPath:
        """Load the program and attach it (to `ifaces`, or every suitable interface); KernelUnavailable if
        that cannot be done here. With `debug`, a verifier refusal carries the verifier's first lines."""
        if platform.system() != "Linux":
            raise KernelUnavailable("needs Linux")
        if platform.machine() not in bpf.SYS_BPF:
            raise KernelUnavailable(f"the bpf() system call number is not known here for {platform.machine()}")
        if kernel_version() < (6, 6):
            raise KernelUnavailable(f"needs Linux 6.6 or later for tcx links (this is {platform.release()})")
        problem = capability_problem()
        if problem:
            raise KernelUnavailable(problem)
        try:
            obj = bpf.parse_object(find_object())
        except ValueError as e:
            raise KernelUnavailable(f"the compiled eBPF program is unusable: {e}") from None
        maps: dict[str, int] = {}
        prog_fd = -1
        try:
            for name, m in obj.maps.items():
                size = max_flows if name == "flows" else m.max_entries
                maps[name] = bpf.map_create(m.kind, m.key_size, m.value_size, size, name=f"udpt_{name}",
                                            flags=m.flags)
            prog_fd = bpf.prog_load(bpf.PROG_SCHED_CLS, bpf.patch(obj, maps), obj.license, PROGRAM)
        except BpfError as e:
            for fd in maps.values():
                os.close(fd)
            if e.errno in (1, 13) and not e.log:  # EPERM, EACCES
                raise KernelUnavailable(f"the kernel refused to load the eBPF program ({e.strerror}): "
                                        "needs root or CAP_BPF and CAP_NET_ADMIN") from None
            if e.log:
                reason = "the kernel's verifier refused the eBPF program"
                if debug:
                    lines = [x for x in e.log.splitlines() if x.strip()]
                    reason += ": " + " | ".join(lines[:VERIFIER_LINES])
                else:
                    reason += " (run with debug logging to see why)"
                raise KernelUnavailable(reason) from None
            raise KernelUnavailable(f"loading the eBPF program: {e}") from None
        except ValueError as e:
            raise KernelUnavailable(f"the compiled eBPF program is unusable: {e}") from None
        self = cls(prog_fd, maps, max_flows, ifaces, [])
        try:
            self.config = (CFG_LEGACY if legacy else 0) | (CFG_WIREGUARD if wireguard else 0)
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
        bpf.map_update(self.maps["config"], struct.pack("<I", 0), struct.pack("<I", self.config))

    def _sysctl_on(self, name: str, why: str) -> str | None:
        """Turn a sysctl of lo on if it is off (saying so in `notes`); None, or why it cannot be done."""
        if name not in self.sysctls:
            path = "/proc/sys/" + name
            try:
                with open(path) as f:
                    on = f.read().strip() != "0"
                if not on:
                    with open(path, "w") as f:
                        f.write("1")
                    self.notes.append(f"turned on {name.replace('/', '.')} ({why})")
                self.sysctls[name] = None
            except OSError as e:
                self.sysctls[name] = f"{name.replace('/', '.')} is off and cannot be turned on ({e.strerror})"
        return self.sysctls[name]

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
                ids = bpf.prog_query(LOOPBACK_IFINDEX).prog_ids
                before = me not in ids or any(bpf.prog_name_by_id(i) == PROGRAM for i in ids[:ids.index(me)])
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
        self.sysctls.clear()
        self.nat = NatRules.load()
        self.routes.clear()
        for fkey, e in list(self.wanted.items()):
            self._install(fkey, e)
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

    # --- the flow table ---

    def _route(self, dst: Addr, src: Addr) -> Route | None:
        k = (dst.ip, src.ip)
        if k not in self.routes:
            try:
                self.routes[k] = route_get(dst.ip, src.ip)
            except OSError:
                self.routes[k] = None
        return self.routes[k]

    def _install(self, fkey: tuple, want: Entry) -> bool:
        """Put one direction in the map (keeping its counters), or take it out and say why in `kept`."""
        key, new_src, new_dst, flags = want
        if new_dst.ip is None:
            raise ValueError("a flow goes to an address, not to any address")
        self.wanted[fkey] = want
        r = self._route(new_dst, new_src)
        if r is not None and r.local:
            flags |= F_LOCAL
            # IPv4 into lo without the route a local sender's packet carries: the input route lookup takes a
            # local source, and 127/8, for martians unless lo accepts them (lo only: what arrives on lo was
            # sent by this host)
            why = None
            if new_dst.v4:
                why = self._sysctl_on(ACCEPT_LOCAL, "lets relayed datagrams from a local address in")
                if new_dst.ip.is_loopback:
                    why = why or self._sysctl_on(ROUTE_LOCALNET, "lets relayed datagrams to 127.0.0.0/8 in")
        else:
            src = new_src.ip if new_src.ip is not None else (r.prefsrc if r else None)
            why = self.nat.applies(src, r.oif if r else None)
            why = f"this host NATs it ({why})" if why else None
            # bpf_fib_lookup answers only where forwarding is on; looking up from lo, as the stack does for
            # local senders, needs it on lo alone, which makes nothing forwarded (nothing arrives on lo to be)
            why = why or self._sysctl_on(FORWARDING[4 if new_dst.v4 else 6], "lets the program look up routes")
        if why:
            self._uninstall(fkey)
            self.kept[fkey] = why
            return False
        old = self.entries.get(fkey)
        packets = nbytes = last = 0
        if old is not None:
            raw = bpf.map_lookup(self.maps["flows"], old.key, VALUE.size)
            if raw is not None:
                packets, nbytes, last = VALUE.unpack(raw)[5:]
            if old.key != key:
                bpf.map_delete(self.maps["flows"], old.key)
                self.by_key.pop(old.key, None)
        value = VALUE.pack(new_src.raw, new_dst.raw, new_src.port, new_dst.port, flags, packets, nbytes, last)
        try:
            if flags & F_SRC_IS_DST and not self.config & CFG_WILDCARD:
                self.config |= CFG_WILDCARD  # from now on, a miss is looked up again with any destination address
                self._configure()
            bpf.map_update(self.maps["flows"], key, value)
        except BpfError as e:  # the table is full (E2BIG), or out of memory: the agent relays this one
            self.entries.pop(fkey, None)
            self.last.pop(fkey, None)
            self.by_key.pop(key, None)
            try:
                bpf.map_delete(self.maps["flows"], key)
            except BpfError:
                pass
            self.kept[fkey] = f"the kernel's flow table refused it: {e.strerror}"
            return False
        self.entries[fkey] = Entry(key, new_src, new_dst, flags)
        self.by_key[key] = fkey
        self.kept.pop(fkey, None)
        return True

    def _uninstall(self, fkey: tuple) -> None:
        e = self.entries.pop(fkey, None)
        self.last.pop(fkey, None)
        if e is not None:
            bpf.map_delete(self.maps["flows"], e.key)
            self.by_key.pop(e.key, None)

    def _remove(self, fkey: tuple) -> None:
        self._uninstall(fkey)
        self.wanted.pop(fkey, None)
        self.kept.pop(fkey, None)

    def outside_bind(self, listen: tuple, client: tuple, tunnel: tuple) -> tuple[bool, bool]:
        """The kernel relays client -> listen port to the tunnel and tunnel -> listen port to the client,
        from the listen address (the one each datagram was sent to, for a wildcard listener).
        Returns which of (up, down) it now relays."""
        lis, c, t = addr(listen), addr(client), addr(tunnel)
        if c.v4 != t.v4 or (lis.ip is not None and lis.v4 != c.v4):
            for k in (client, tunnel):
                self._remove(k)
                self.kept[k] = "client and tunnel differ in address family"
            return False, False
        flags = (F_V4 if c.v4 else 0) | (0 if lis.ip is not None else F_SRC_IS_DST)
        # a client that moved to another tunnel, or a tunnel that carries another client now (roaming):
        # the flow of the old partner goes, as it goes from the core's route table
        for me, partner in ((client, tunnel), (tunnel, client)):
            old = self.partners.get(me)
            if old is not None and old != partner and self.partners.get(old) == me:
                self._remove(old)
                del self.partners[old]
            self.partners[me] = partner
        up = self._install(client, Entry(KEY.pack(c.raw, lis.raw, c.port, lis.port), lis, t, flags))
        down = self._install(tunnel, Entry(KEY.pack(t.raw, lis.raw, t.port, lis.port), lis, c, flags))
        return up, down

    def outside_unbind(self, client: tuple, tunnel: tuple) -> None:
        for k in (client, tunnel):
            self._remove(k)
            self.partners.pop(k, None)

    def inside_pipe(self, tunnel_local: tuple, outside: tuple, service_local: tuple,
                    service: tuple) -> tuple[bool, bool]:
        """The kernel relays outside -> tunnel socket as service socket -> service, and service -> service
        socket as tunnel socket -> outside. Returns which of (rx, tx) it now relays."""
        tl, o, sl, s = addr(tunnel_local), addr(outside), addr(service_local), addr(service)
        if not (tl.v4 == o.v4 == sl.v4 == s.v4):
            for k in (tunnel_local, service_local):
                self._remove(k)
                self.kept[k] = "tunnel and service differ in address family"
            return False, False
        flags = F_V4 if tl.v4 else 0
        rx = self._install(tunnel_local, Entry(KEY.pack(o.raw, tl.raw, o.port, tl.port), sl, s, flags))
        tx = self._install(service_local, Entry(KEY.pack(s.raw, sl.raw, s.port, sl.port), tl, o, flags))
        return rx, tx

    def inside_unpipe(self, tunnel_local: tuple, service_local: tuple) -> None:
        self._remove(tunnel_local)
        self._remove(service_local)

    # --- reading back ---

    def counters(self) -> dict[tuple, tuple[int, int, float | None]]:
        """Every installed flow: (packets, bytes, last seen on the time.monotonic() clock or None)."""
        out = {}
        for key, raw in bpf.map_items(self.maps["flows"], KEY.size, VALUE.size):
            fkey = self.by_key.get(key)
            if fkey is None:
                continue
            packets, nbytes, last = VALUE.unpack(raw)[5:]
            out[fkey] = (packets, nbytes, last / 1e9 if last else None)
        return out

    def deltas(self) -> dict[tuple, tuple[int, int, float | None]]:
        """The flows that moved since the previous call: (new packets, new bytes, last seen)."""
        out = {}
        for fkey, (packets, nbytes, last) in self.counters().items():
            p0, b0 = self.last.get(fkey, (0, 0))
            if packets != p0:
                out[fkey] = (packets - p0, nbytes - b0, last)
                self.last[fkey] = (packets, nbytes)
        return out

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
