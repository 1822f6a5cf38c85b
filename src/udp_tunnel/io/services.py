"""The inside agent's services: where each client's datagrams go, and how the service sees
the client (--client-address, per service).

- `off`: a socket connected to the service; the service sees the inside agent.
- `transparent`: a socket bound to the client's own address (io/transparent.py), so the
  service sees the client itself; answers come back through a policy route set up at start.
- `proxy-v2` / `proxy-v2-first`: a PROXY v2 header (io/proxied.py) before every datagram, or
  before the first of each client, for a service behind a PROXY-protocol front.

A service with a port range (`host:27000-27100`) sends a client of the outside's port
first+k to port first+k here.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from udp_tunnel.addr import family, show, unmapped
from udp_tunnel.io.proxied import ProxyFraming
from udp_tunnel.io.transparent import ClientAddressError, TransparentClients, service_addresses, udp_listeners


class ServiceError(Exception):
    """A client that this service cannot take (an offset outside its range)."""


@dataclass
class Conn:
    """A client's service socket: `framing` (PROXY v2) puts a header before what is sent."""
    sock: socket.socket
    port: int
    framing: ProxyFraming | None = None


@dataclass
class ServiceTarget:
    name: str
    family: int
    host: str  # resolved
    first: int
    size: int = 1
    mode: str = "off"
    warn: object = None  # a function taking one line: warnings (transparent mode)
    table: int | None = None  # transparent mode: the policy routing table (None: the default)
    manage_routing: bool = True
    transparent: dict[int, TransparentClients] = field(default_factory=dict)  # by service port
    fronts: dict[int, str] = field(default_factory=dict)  # PROXY v2: the front's host per client family (start)

    def address(self, offset: int) -> tuple:
        if not 0 <= offset < self.size:
            raise ServiceError(f"{self.name}: no port at offset {offset} (its range has {self.size})")
        return (self.host, self.first + offset)

    def start(self) -> list[str]:
        """Transparent mode: check the privileges and set up the policy routing of the first port
        (raises transparent.TransparentError: one line). What to log.
        PROXY v2: the front's loopback address of each family it listens on (see _front)."""
        if self.mode.startswith("proxy-v2"):
            self.fronts = {f: a[0] for f, a in service_addresses((self.host, self.first),
                                                                 udp_listeners(self.first)).items()}
        if self.mode != "transparent":
            return []
        return self._clients(self.first).start()

    def _front(self, addr: tuple, client: tuple) -> tuple:
        """PROXY v2: where a client's datagrams go: for a front on a loopback address that
        listens on the other family's loopback too, the one of the client's family.
        go-mmproxy dials the service in the family of the datagrams' sender, from the
        header's source: an IPv6 client sent to it over IPv4 fails, and the other way round."""
        fam = family(unmapped(client[0]))
        host = self.fronts.get(fam)
        return (host, addr[1]) if host else addr

    def _clients(self, port: int) -> TransparentClients:
        tc = self.transparent.get(port)
        if tc is None:
            kw = {"table": self.table} if self.table is not None else {}
            tc = TransparentClients((self.host, port), manage_routing=self.manage_routing,
                                    warn=self.warn or (lambda msg: None), **kw)
            self.transparent[port] = tc
            if port != self.first:  # a range: each port's routing when its first client comes
                tc.start()
        return tc

    def open(self, offset: int, client: tuple | None, reached: tuple | None) -> Conn:
        """The service socket for a new client (raises ServiceError, OSError)."""
        addr = self.address(offset)
        if client is not None and self.mode == "transparent":
            try:
                return Conn(self._clients(addr[1]).announce(client), addr[1])
            except ClientAddressError as e:  # the service sees the agent, as without the mode
                if self.warn:
                    self.warn(f"{self.name}: {e}")
        framing = None
        if client is not None and self.mode.startswith("proxy-v2"):
            addr = self._front(addr, client)
            framing = ProxyFraming(self.mode, client, addr, reached)
        return Conn(self.plain(addr), addr[1], framing)

    def plain(self, addr: tuple) -> socket.socket:
        s = socket.socket(self.family if addr[0] == self.host else family(addr[0]), socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            s.connect(addr)
        except OSError:
            s.close()
            raise
        return s

    def move(self, conn: Conn, old: tuple | None, new: tuple, now: float) -> socket.socket | None:
        """The client now sends from `new`: a new socket to send from (the old one drains
        answers until `expired` gives it back), or None when the socket stays."""
        if self.mode == "transparent" and old is not None and conn.port in self.transparent:
            try:
                return self._clients(conn.port).move(conn.sock, old, new, now)
            except ClientAddressError as e:
                if self.warn:
                    self.warn(f"{self.name}: {e}")
                return None
        if conn.framing is not None:
            front = self._front((self.host, conn.port), new)
            if conn.framing.moved(new) or front[0] != conn.sock.getpeername()[0]:  # proxy-v2-first, or a new family
                return self.plain(front)
        return None

    def seen(self, fd: int, now: float) -> None:
        for tc in self.transparent.values():
            tc.seen(fd, now)

    def expired(self, now: float) -> list[socket.socket]:
        return [s for tc in self.transparent.values() for s in tc.expired(now)]

    def stop(self) -> tuple[list[socket.socket], list[str]]:
        socks, said = [], []
        for tc in self.transparent.values():
            s, removed = tc.stop()
            socks += s
            said += [f"policy routing removed: {c}" for c in removed]
        return socks, said

    def __str__(self) -> str:
        last = self.first + self.size - 1
        return show((self.host, self.first)) + (f"-{last}" if last != self.first else "")
