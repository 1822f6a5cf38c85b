"""Both cores joined by a simulated network, a NAT and a fake clock.

Each inside tunnel socket gets a public address (as a NAT would give it);
datagrams from the outside core go to a tunnel, a client or an attacker by
address. Everything sent is recorded on `wire` so tests can replay it.

With `kernel=True` the outside agent has the kernel data path: the route
table's listener (io/datapath.py OutsideKernel) writes a dict-backed map
(io/kernel.py FlowTable over a DictMap) as the real one does, and the
simulated host relays a datagram whose source and destination are a key of
that map itself, as the eBPF program would (counting into the map, never
into the flow's meter), unless the entry's rule says the agent must see it;
the loop adds the map's counters into the meters before the core's timer.
After every step the map must hold exactly the route table's flows.
"""

from __future__ import annotations

import io
import ipaddress
import itertools
import os
import random
import socket

from udp_tunnel.core.inside import ACTIVE, Close, InsideCore, OpenService, OpenTunnel, Resolve, Send, ToService
from udp_tunnel.core.outside import OutsideCore
from udp_tunnel.io.datapath import OutsideKernel, flags_of
from udp_tunnel.io.kernel import F_CTRL, F_LEN40, F_SRC_IS_DST, F_TO_AGENT, F_WG, KEY, VALUE, DictMap, FlowTable, addr
from udp_tunnel.ops.log import DEBUG, Log
from udp_tunnel.wire import proto

LISTEN = ("::", 9999, 0, 0)  # the outside agent's one endpoint: every address (dual-stack)


def program_claims(flags: int, data: bytes) -> bool:
    """What the eBPF program leaves to the agent of a known flow's datagram, by the entry's rule flags
    (bpf/relay.bpf.c special())."""
    n = len(data)
    return bool((flags & F_CTRL and n == proto.CTRL_LEN and data[:4] == proto.MAGIC)
                or (flags & F_LEN40 and n == proto.LEGACY_LEN) or (flags & F_WG and n in (92, 148)))


def address_of(raw: bytes, port: bytes) -> tuple:
    """A map's 16-byte address and port as the agent's dual-stack socket names it."""
    ip = ipaddress.IPv6Address(raw)
    host = f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped else str(ip)
    return (host, int.from_bytes(port, "big"), 0, 0)


def v6(ip: str, port: int) -> tuple:
    return (("::ffff:" + ip) if "." in ip else ip, port, 0, 0)


class Sim:
    def __init__(self, key: bytes = b"secret", keepalive: float = 25.0, timeout: float = 60.0,
                 spares: int = 2, max_clients: int = 100, legacy: bool = False,
                 inside_key: bytes | None = None, now: float = 10_000.0, nat_timeout: float | None = None,
                 seed: int | None = None, wireguard=None, kernel: bool = False) -> None:
        # ids and secrets from a seeded generator when the test must be repeatable
        self.random_bytes = random.Random(seed).randbytes if seed is not None else os.urandom
        self.now = now
        self.key, self.keepalive, self.legacy = key, keepalive, legacy
        self.max_clients = max_clients
        self.log = io.StringIO()
        self.wall_offset = 1.7e9  # wall clock = now + offset, settable per side
        self.wireguard = wireguard  # a function making a wireguard.Gate for each outside core, or None
        self.kernel = kernel
        self.flows: DictMap | None = None  # the kernel path's map (kernel=True), new with each outside agent
        self.listener: OutsideKernel | None = None
        self.kernel_relayed = 0  # datagrams the simulated program relayed
        self.outside = self.new_outside()
        self.new_inside = lambda: InsideCore(
            secret=inside_key if inside_key is not None else key, keepalive=keepalive, timeout=timeout,
            spares=spares, max_clients=max_clients, now=self.now, log=Log(DEBUG, self.log), legacy=legacy,
            random_bytes=self.random_bytes, wall=lambda: self.now + self.wall_offset)
        self.inside = self.new_inside()
        self.ports = itertools.count(40000)
        self.public: dict[int, tuple] = {}  # tunnel id -> its public address (the NAT's mapping)
        self.by_public: dict[tuple, int] = {}
        self.service_socket: set[int] = set()  # tunnels with a service socket
        self.service_rx: list[tuple[int, bytes]] = []
        self.received: dict[tuple, list[bytes]] = {}  # datagrams from the outside core, by address
        self.wire: list[tuple[bytes, tuple, str]] = []  # (data, address, "up"|"down")
        self.forwarded: list[tuple[bytes, tuple, int]] = []  # what the outside loop forwarded itself
        self.checks = True  # check both cores' invariants after every step (off only for long soaks)
        self.resolves = 0  # times the inside asked to look the outside's name up again
        self.up = True  # False: the network between the agents drops everything
        self.lose_up: set[int] = set()  # tunnels whose datagrams to the outside are lost
        self.nat_timeout = nat_timeout  # the NAT forgets a mapping idle this long (None: never)
        self.last_use: dict[int, float] = {}
        self.route_seen: tuple = (None, 0, {})  # the outside core, its routes' version and flows, last looked at
        self.inside.start(now)
        self.pump()

    def new_outside(self, **kw) -> OutsideCore:
        core = OutsideCore(secret=kw.pop("key", self.key), keepalive=self.keepalive,
                           max_clients=self.max_clients, family=socket.AF_INET6, now=self.now,
                           log=Log(DEBUG, self.log), legacy=self.legacy, random_bytes=self.random_bytes,
                           wall=lambda: self.now + self.wall_offset,
                           wireguard=self.wireguard() if self.wireguard else None, **kw)
        if self.kernel:  # a new process: a new program and map, the listener set before any route
            self.flows = DictMap()
            self.listener = OutsideKernel(FlowTable(self.flows), core.routes, lambda via: LISTEN,
                                          lambda via: core.rules[via])
            core.routes.listener = self.listener
        return core

    def _check_kernel_map(self) -> None:
        """The map holds exactly the route table's flows: per source, the key (source, any local
        address, the port) -> the flow's destination, from the port, by the endpoint's rule, marked
        as going to an agent when it goes up (client -> tunnel)."""
        o = self.outside
        want = {}
        lis = addr(LISTEN)
        for via, a, f in o.routes.items():
            src, dst = addr(a), addr(f.dst)
            flags = flags_of(o.rules[via]) | (F_TO_AGENT if f.up else 0)
            want[KEY.pack(src.raw, lis.raw, src.port, lis.port)] = (dst.raw, dst.port, lis.port, flags)
        have = {}
        for k, v in self.flows.items():
            _, new_dst, new_sport, new_dport, flags, *_ = VALUE.unpack(v)
            assert flags & F_SRC_IS_DST, "a wildcard listener's flows take the destination as their source"
            have[k] = (new_dst, new_dport, new_sport, flags & (F_CTRL | F_LEN40 | F_WG | F_TO_AGENT))
        if have != want:
            raise AssertionError(f"the kernel map is not the route table: {len(have)} entries, {len(want)} routes, "
                                 f"{len(set(have) ^ set(want))} keys differ")
        assert not self.listener.table.kept, self.listener.table.kept

    def restart_outside(self, remember: bool = False) -> None:
        """A new outside agent; with `remember`, it read its predecessor's state file."""
        saved, seen = self.outside.saved_tunnels(), self.outside.saved_initiations()
        self.outside = self.new_outside()
        if remember:
            self.outside.remember_initiations(seen)
            self.outside.remembered(saved, self.now)
            self.pump()

    def restart_inside(self) -> None:
        """The inside agent stops (telling the outside, which forgets its tunnels) and starts
        again: a new session, new tunnels."""
        self.inside.shutdown(self.now)
        self.pump()
        self.service_socket.clear()
        self.inside = self.new_inside()
        self.inside.start(self.now)
        self.pump()

    def rebind(self, tid: int) -> tuple:
        """The NAT forgets tunnel tid's mapping; its next datagram gets a new public port."""
        old = self.public.pop(tid)
        del self.by_public[old]
        return old

    def _expire(self, tid: int) -> bool:
        """The NAT forgets tid's mapping if it idled longer than its timeout."""
        if self.nat_timeout is not None and tid in self.public and \
                self.now - self.last_use.get(tid, self.now) > self.nat_timeout:
            self.rebind(tid)
            return True
        return False

    def _public(self, tid: int) -> tuple:
        if tid not in self.public:
            addr = v6("203.0.113.7", next(self.ports))
            self.public[tid], self.by_public[addr] = addr, tid
        return self.public[tid]

    def _check_route_version(self) -> None:
        """The loop caches routes until their version moves: any change must move it."""
        o = self.outside
        fp = {(v, a): (id(f), f.dst, f.via) for v, a, f in o.routes.items()}
        core, seen, old = self.route_seen
        if core is o and fp != old and o.routes.version == seen:
            raise AssertionError("routes changed without a new version")
        self.route_seen = (o, o.routes.version, fp)

    def pump(self) -> None:
        for _ in range(1000):
            acts, out = self.inside.take(), self.outside.take()
            if not acts and not out and not self.forwarded:
                return
            for a in acts:
                kind = type(a)
                if kind is Send:
                    self._expire(a.tid)
                    addr = self._public(a.tid)
                    self.last_use[a.tid] = self.now
                    self.wire.append((a.data, addr, "up"))
                    if self.up and a.tid not in self.lose_up:
                        self.to_outside(a.data, addr)
                elif kind is OpenService:
                    self.service_socket.add(a.tid)
                elif kind is ToService:
                    self.service_rx.append((a.tid, a.data))
                elif kind is Close:
                    self.service_socket.discard(a.tid)
                elif kind is Resolve:
                    self.resolves += 1
            if self.checks:
                self.outside.check_invariants()
                self.inside.check_invariants(self.service_socket)
                self._check_route_version()
                if self.kernel:
                    self._check_kernel_map()
            for data, addr, _ in out + self.forwarded:
                self._down(data, addr)
            self.forwarded.clear()
        raise AssertionError("the cores keep talking without end")

    def _down(self, data: bytes, addr: tuple) -> None:
        """A datagram the outside agent sends to addr."""
        self.wire.append((data, addr, "down"))
        tid = self.by_public.get(addr)
        if tid is not None and self._expire(tid):
            return  # the mapping is gone: lost
        if tid is not None:
            self.last_use[tid] = self.now
        if tid is None or tid not in self.inside.tunnels:
            self.received.setdefault(addr, []).append(data)
        elif self.up:
            self.deliver_to_inside(tid, data)

    def to_outside(self, data: bytes, src: tuple) -> None:
        """What the outside loop does with a datagram from src: a known flow's data it forwards
        itself (counting into the flow), everything else goes to the core."""
        o = self.outside
        if self.kernel and self._program(data, src):
            return
        f = o.routes.get(src)
        if f is not None and not o.rule.core_sees(data):
            f.pkts += 1
            f.bytes += len(data)
            self.forwarded.append((data, f.dst, f.via))
        else:
            o.receive(data, src, self.now)

    def _program(self, data: bytes, src: tuple) -> bool:
        """The eBPF program on a datagram from src to the outside's port: True when it relayed it."""
        s, lis = addr(src), addr(LISTEN)
        key = KEY.pack(s.raw, lis.raw, s.port, lis.port)
        raw = self.flows.lookup(key)
        if raw is None:
            return False
        _, new_dst, _, new_dport, flags, packets, nbytes, _ = VALUE.unpack(raw)
        claims = program_claims(flags, data)
        assert claims == self.outside.rule.core_sees(data), "the program and the core's rule disagree"
        if claims:
            return False
        fields = list(VALUE.unpack(raw))
        fields[5:] = packets + 1, nbytes + len(data), int(self.now * 1e9)
        self.flows.update(key, VALUE.pack(*fields))
        self.kernel_relayed += 1
        self.forwarded.append((data, address_of(new_dst, new_dport), 0))
        return True

    def deliver_to_inside(self, tid: int, data: bytes) -> None:
        """What the inside loop does with a datagram on tunnel tid's socket."""
        t = self.inside.tunnels[tid]
        if tid in self.service_socket and t.state == ACTIVE and not self.inside.rule.core_sees(data):
            self.service_rx.append((tid, data))
            t.rx.pkts += 1
            t.rx.bytes += len(data)
        else:
            self.inside.receive(tid, data, self.now)

    def send(self, data: bytes, src: tuple) -> None:
        """A datagram arrives at the outside agent from src (client or attacker)."""
        self.to_outside(data, src)
        self.pump()

    def reply(self, tid: int, data: bytes) -> None:
        """The service answers on tunnel tid's service socket."""
        t = self.inside.tunnels[tid]
        t.tx.pkts += 1
        t.tx.bytes += len(data)
        self.send(data, self._public(tid))

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            if self.now >= self.inside.next_timer():
                self.inside.on_timer(self.now)
            if self.now >= self.outside.next_timer():
                if self.listener is not None:
                    self.listener.count()  # the loop: the map's counters into the meters, first
                self.outside.on_timer(self.now)
            self.pump()

    def registered_spares(self) -> int:
        return len(self.outside.spares)


def register_tunnel(outside: OutsideCore, addr: tuple, now: float, key: bytes = b"k") -> InsideCore:
    """An inside core whose first tunnel registers at `outside` from public address `addr`
    through the real protocol (keepalive, challenge, answer); its other tunnels' datagrams are
    lost. The tunnel is then the outside's freshest spare."""
    inside = InsideCore(secret=key, keepalive=outside.keepalive, timeout=60, spares=1, max_clients=10,
                        now=now, log=Log(DEBUG, io.StringIO()))
    inside.start(now)
    tid = None
    for _ in range(20):
        for a in inside.take():
            if type(a) is OpenTunnel and tid is None:
                tid = a.tid
            elif type(a) is Send and a.tid == tid:
                outside.receive(a.data, addr, now)
        for data, dst, _ in outside.take():
            if dst == addr:
                inside.receive(tid, data, now)
        if inside.tunnels[tid].registered:
            return inside
    raise AssertionError("the tunnel did not register")
