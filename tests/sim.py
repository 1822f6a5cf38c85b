"""Both cores joined by a simulated network, a NAT and a fake clock.

Each inside tunnel socket gets a public address (as a NAT would give it);
datagrams from the outside core go to a tunnel, a client or an attacker by
address. Everything sent is recorded on `wire` so tests can replay it.
"""

from __future__ import annotations

import io
import itertools
import socket

from udp_tunnel import proto
from udp_tunnel.inside import ACTIVE, InsideCore
from udp_tunnel.log import DEBUG, Log
from udp_tunnel.outside import OutsideCore


def v6(ip: str, port: int) -> tuple:
    return (("::ffff:" + ip) if "." in ip else ip, port, 0, 0)


class Sim:
    def __init__(self, key: bytes = b"secret", keepalive: float = 25.0, timeout: float = 60.0,
                 spares: int = 2, max_clients: int = 100, legacy: bool = False,
                 inside_key: bytes | None = None, now: float = 10_000.0, wireguard=None) -> None:
        self.now = now
        self.key, self.keepalive, self.legacy = key, keepalive, legacy
        self.max_clients = max_clients
        self.log = io.StringIO()
        self.wall_offset = 1.7e9  # wall clock = now + offset, settable per side
        self.wireguard = wireguard  # a function making a wireguard.Gate for each outside core, or None
        self.outside = self.new_outside()
        self.inside = InsideCore(secret=inside_key if inside_key is not None else key, keepalive=keepalive,
                                 timeout=timeout, spares=spares, max_clients=max_clients, now=now,
                                 log=Log(DEBUG, self.log), legacy=legacy,
                                 wall=lambda: self.now + self.wall_offset)
        self.ports = itertools.count(40000)
        self.public: dict[int, tuple] = {}  # tunnel id -> its public address (the NAT's mapping)
        self.by_public: dict[tuple, int] = {}
        self.service_socket: set[int] = set()  # tunnels with a service socket
        self.service_rx: list[tuple[int, bytes]] = []
        self.received: dict[tuple, list[bytes]] = {}  # datagrams from the outside core, by address
        self.wire: list[tuple[bytes, tuple, str]] = []  # (data, address, "up"|"down")
        self.resolves = 0  # times the inside asked to look the outside's name up again
        self.up = True  # False: the network between the agents drops everything
        self.inside.start(now)
        self.pump()

    def new_outside(self, **kw) -> OutsideCore:
        return OutsideCore(secret=kw.pop("key", self.key), keepalive=self.keepalive,
                           max_clients=self.max_clients, family=socket.AF_INET6, now=self.now,
                           log=Log(DEBUG, self.log), legacy=self.legacy,
                           wall=lambda: self.now + self.wall_offset,
                           wireguard=self.wireguard() if self.wireguard else None, **kw)

    def restart_outside(self) -> None:
        self.outside = self.new_outside()

    def rebind(self, tid: int) -> tuple:
        """The NAT forgets tunnel tid's mapping; its next datagram gets a new public port."""
        old = self.public.pop(tid)
        del self.by_public[old]
        return old

    def _public(self, tid: int) -> tuple:
        if tid not in self.public:
            addr = v6("203.0.113.7", next(self.ports))
            self.public[tid], self.by_public[addr] = addr, tid
        return self.public[tid]

    def pump(self) -> None:
        for _ in range(1000):
            acts, self.inside.actions = self.inside.actions, []
            out, self.outside.out = self.outside.out, []
            if not acts and not out:
                return
            for a in acts:
                if a[0] == "send":
                    addr = self._public(a[1])
                    self.wire.append((a[2], addr, "up"))
                    if self.up:
                        self.outside.handle(a[2], addr, self.now)
                elif a[0] == "service":
                    self.service_socket.add(a[1])
                elif a[0] == "to_service":
                    self.service_rx.append((a[1], a[2]))
                elif a[0] == "close":
                    self.service_socket.discard(a[1])
                elif a[0] == "resolve":
                    self.resolves += 1
            for data, addr in out:
                self.wire.append((data, addr, "down"))
                tid = self.by_public.get(addr)
                if tid is None or tid not in self.inside.tunnels:
                    self.received.setdefault(addr, []).append(data)
                elif self.up:
                    self.deliver_to_inside(tid, data)
        raise AssertionError("the cores keep talking without end")

    def deliver_to_inside(self, tid: int, data: bytes) -> None:
        """What the inside loop does with a datagram on tunnel tid's socket."""
        t = self.inside.tunnels[tid]
        if not self.legacy and proto.is_control(data):
            self.inside.on_control(tid, data, self.now)
        elif tid in self.service_socket and t.state == ACTIVE:
            self.service_rx.append((tid, data))
            t.rx += 1
            t.rx_bytes += len(data)
        else:
            self.inside.on_spare_data(tid, data, self.now)

    def send(self, data: bytes, src: tuple) -> None:
        """A datagram arrives at the outside agent from src (client or attacker)."""
        self.outside.handle(data, src, self.now)
        self.pump()

    def reply(self, tid: int, data: bytes) -> None:
        """The service answers on tunnel tid's service socket."""
        t = self.inside.tunnels[tid]
        t.tx += 1
        self.send(data, self._public(tid))

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            if self.now >= self.inside.next_timer():
                self.inside.on_timer(self.now)
            if self.now >= self.outside.next_timer():
                self.outside.on_timer(self.now)
            self.pump()

    def registered_spares(self) -> int:
        return len(self.outside.spares)
