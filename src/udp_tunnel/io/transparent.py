"""Transparent service sockets: the service sees each client's own address (Linux).

For `--client-address transparent` the inside agent gives every client a service
socket bound to the client's real address and port (IP_TRANSPARENT for IPv4,
IPV6_TRANSPARENT for IPv6, which also allow binding an address that is not
local, so IP_FREEBIND is not needed), connected to the service. The service
receives the client's datagrams from the client's address and answers to it;
a policy rule brings those answers back to the agent's socket instead of the
default route:

    ip rule add from SERVICE_ADDR iif lo ipproto udp sport SERVICE_PORT lookup TABLE proto 85
    ip route add local 0.0.0.0/0 dev lo table TABLE proto 85          (and -6 with ::/0)

This is go-mmproxy's set-up (`from 127.0.0.1/8 iif lo`) made narrower: only
UDP from the service's own address and port. With the service on a LAN
address, the broad rule would also loop back everything else the host sends
from that address (the agent's own tunnels to the outside among it).
`Routing` adds them through rtnetlink at start and removes them at stop:
no `ip` binary needed, exact errors (EEXIST, EPERM), and the agent knows the
service address and port the rule must name; rules and routes it adds carry
the protocol number RTPROT (85), so that it never removes what it did not add.

What the inside's I/O layer calls is in docs/client-address.md.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
from dataclasses import dataclass, field

from udp_tunnel.addr import family, show, unmapped
from udp_tunnel.io.rtnl import RT_SCOPE_HOST, RTN_LOCAL, Netlink, Route, Rule

IP_TRANSPARENT = 19  # <linux/in.h>
IPV6_TRANSPARENT = 75  # <linux/in6.h>
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
DEFAULT_TABLE = 21844  # 0x5554, "UT"; TransparentClients(table=) takes another (no option sets it)
RTPROT = 85  # rtm_protocol / FRA_PROTOCOL of what the agent adds (not in /etc/iproute2/rt_protos)
DRAIN = 2.0  # seconds a moved client's old socket stays open after its last answer
DRAIN_MAX = 30.0  # and at most, after the move


class TransparentError(Exception):
    """Something the user must change; str() is one line for the log."""


class PrivilegeError(TransparentError):
    pass


class RoutingError(TransparentError):
    pass


class ClientAddressError(TransparentError):
    pass


# --- privileges ---

def effective_capabilities(status: str = "/proc/self/status") -> int:
    """The CapEff bit mask of this process (0 if it can't be read)."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def privilege_problem(caps: int, manage_routing: bool = True) -> str | None:
    """The one line to print at start when the capabilities `caps` (a CapEff mask) are
    not enough: IP_TRANSPARENT takes CAP_NET_ADMIN or CAP_NET_RAW, the policy routing
    CAP_NET_ADMIN."""
    admin, raw = caps >> CAP_NET_ADMIN & 1, caps >> CAP_NET_RAW & 1
    if manage_routing and not admin:
        have = " (it has CAP_NET_RAW only)" if raw else ""
        return ("--client-address transparent needs CAP_NET_ADMIN, to bind service sockets to the clients' "
                f"addresses and to set up the policy routing{have}: run the inside agent as root, or give it "
                "AmbientCapabilities=CAP_NET_ADMIN in its systemd unit")
    if not (admin or raw):
        return ("--client-address transparent needs CAP_NET_ADMIN or CAP_NET_RAW, to bind service sockets to "
                "the clients' addresses: run the inside agent as root, or give it "
                "AmbientCapabilities=CAP_NET_RAW in its systemd unit")
    return None


def check_privileges(manage_routing: bool = True, families: tuple[int, ...] = (socket.AF_INET,)) -> str | None:
    """privilege_problem() for this process, then a real IP_TRANSPARENT on a throwaway
    socket per family (a container, an LSM or a user namespace may still say no)."""
    msg = privilege_problem(effective_capabilities(), manage_routing)
    if msg:
        return msg
    for fam in families:
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                _set_transparent(s, fam)
        except PermissionError:
            return privilege_problem(0, manage_routing)
        except OSError as e:
            name = "IPV6_TRANSPARENT" if fam == socket.AF_INET6 else "IP_TRANSPARENT"
            return f"--client-address transparent: this kernel refuses {name}: {e.strerror}"
    return None


def _set_transparent(s: socket.socket, fam: int) -> None:
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)


# --- the sockets ---

def client_problem(client: tuple) -> str | None:
    """Why a service socket must not be bound to this client address, or None: the
    outside only announces addresses it saw on the Internet, so anything else is a bug
    or a hostile announcement, refused rather than bound."""
    host, port = unmapped(client[0]), client[1]
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return f"client address {host!r} is not an IP address"
    if not 0 < port < 65536:
        return f"client {show(client)}: port {port}"
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback or ip.is_link_local or ip == ipaddress.ip_address(
            "255.255.255.255"):
        return f"client {show(client)}: not an address a service socket can be bound to"
    return None


@dataclass(slots=True)
class Opened:
    sock: socket.socket
    bound: tuple[str, int]  # the address the service sees: the client's, or its IP with another port
    exact: bool  # False: the client's port was taken here (see open_socket)


def open_socket(client: tuple, service: tuple, exact_only: bool = False) -> Opened:
    """A non-blocking UDP socket bound to the client's address and port, connected to
    the service (same family: an IPv4 client needs an IPv4 service address).

    SO_REUSEADDR lets the same client address be bound once per service (two agents on
    one host, two services): connected sockets are told apart by their peer. A local
    socket bound to *all* addresses on the client's port (0.0.0.0:P, [::]:P: often the
    service itself, as a WireGuard peer with ListenPort = the server's) makes the exact
    bind fail (EADDRINUSE, whatever the options); then the socket is bound to the
    client's IP with a port the kernel picks (exact=False), unless exact_only."""
    host = unmapped(client[0])
    fam = family(service[0])
    if family(host) != fam:
        v = 4 if fam == socket.AF_INET6 else 6  # the client's
        raise ClientAddressError(
            f"client {show(client)}: an IPv{v} client needs an IPv{v} address of the service (it has {show(service)})")
    problem = client_problem((host, client[1]))
    if problem:
        raise ClientAddressError(problem)
    s = socket.socket(fam, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        try:
            _set_transparent(s, fam)
        except PermissionError:
            raise PrivilegeError(privilege_problem(0, False)) from None
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        exact = True
        try:
            s.bind((host, client[1]))
        except OSError as e:
            if e.errno != errno.EADDRINUSE or exact_only:
                raise
            s.bind((host, 0))
            exact = False
        s.connect(service)
        bound = s.getsockname()[:2]
    except BaseException:
        s.close()
        raise
    return Opened(s, (bound[0], bound[1]), exact)


def port_taken_warning(client: tuple, opened: Opened) -> str:
    """The log line when open_socket could not keep the client's port."""
    return (f"client {show(client)}: UDP port {client[1]} is taken on this host by a socket bound to all "
            f"addresses (the service itself?); the service sees {show(opened.bound)}: the client's address, "
            f"another port")


@dataclass
class _Retired:
    sock: socket.socket
    key: tuple
    since: float  # when it was retired
    last: float  # last answer read from it


@dataclass
class Retiring:
    """The old sockets of clients that moved. After a move, datagrams the service already
    sent to the old address (and any it sends until it learns the new one from the
    client's next datagram) arrive at the old socket: the I/O layer keeps it registered
    and forwards what it reads up the same tunnel, calls seen() when it does, and closes
    what expired() returns. A client that moves back gets its old socket again (revive)."""
    drain: float = DRAIN
    drain_max: float = DRAIN_MAX
    _by_fd: dict[int, _Retired] = field(default_factory=dict)

    def retire(self, sock: socket.socket, key: tuple, now: float) -> None:
        """key: (client address, service address) of the socket, for revive()."""
        self._by_fd[sock.fileno()] = _Retired(sock, key, now, now)

    def seen(self, fd: int, now: float) -> None:
        r = self._by_fd.get(fd)
        if r is not None:
            r.last = now

    def revive(self, key: tuple) -> socket.socket | None:
        for fd, r in self._by_fd.items():
            if r.key == key:
                del self._by_fd[fd]
                return r.sock
        return None

    def expired(self, now: float) -> list[socket.socket]:
        """The sockets to unregister and close now (not closed here: the I/O layer
        unregisters them first)."""
        out = [fd for fd, r in self._by_fd.items()
               if now - r.last >= self.drain or now - r.since >= self.drain_max]
        return [self._by_fd.pop(fd).sock for fd in out]

    def all(self) -> list[socket.socket]:
        """Every retired socket (at stop)."""
        out = [r.sock for r in self._by_fd.values()]
        self._by_fd.clear()
        return out

    def __len__(self) -> int:
        return len(self._by_fd)


# --- the service's addresses ---

def _udp_sockets(port: int, proc: str) -> list[tuple[str, int]]:
    """(bound address, inode) of the unconnected UDP sockets of this network namespace on
    `port` (0.0.0.0 and :: for sockets bound to all addresses)."""
    out = []
    for name, fam in (("udp", socket.AF_INET), ("udp6", socket.AF_INET6)):
        try:
            with open(os.path.join(proc, name)) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 4 or cols[3] != "07":  # 07: TCP_CLOSE, what an unconnected UDP socket shows
                continue
            addr, _, p = cols[1].partition(":")
            if int(p, 16) != port:
                continue
            raw = b"".join(int(addr[i:i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(addr), 8))
            out.append((socket.inet_ntop(fam, raw), int(cols[9]) if len(cols) > 9 else 0))
    return out


def udp_listeners(port: int, proc: str = "/proc/net") -> list[str]:
    """The addresses that unconnected UDP sockets of this network namespace are bound to
    on `port` (0.0.0.0 and :: for sockets bound to all addresses)."""
    return [a for a, _ in _udp_sockets(port, proc)]


# programs whose UDP sockets answer from the address a datagram was sent to (IP_PKTINFO), so
# that a socket on all addresses is no mistake: WireGuard in the kernel (no process holds its
# socket) and wireguard-go (its Linux bind keeps each peer's source; seen in tests/lab)
ANSWERS_FROM_REACHED = ("kernel", "wireguard-go")


def socket_owner(inode: int, proc: str = "/proc") -> str | None:
    """The command name of the process holding the socket, "kernel" when no process holds
    it (every process's fds could be read), None when unknown."""
    want = f"socket:[{inode}]"
    complete = True
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fds = os.path.join(proc, pid, "fd")
        try:
            names = os.listdir(fds)
        except FileNotFoundError:
            continue
        except PermissionError:
            complete = False
            continue
        for fd in names:
            try:
                if os.readlink(os.path.join(fds, fd)) == want:
                    with open(os.path.join(proc, pid, "comm")) as f:
                        return f.read().strip()
            except OSError:
                continue
    return "kernel" if complete else None


def wildcard_owner(service: tuple, proc_net: str = "/proc/net", proc: str = "/proc") -> str | None:
    """Who holds the socket on all addresses at the service's port (socket_owner), or None."""
    wild = ("0.0.0.0", "::") if family(unmapped(service[0])) == socket.AF_INET else ("::",)
    for addr, inode in _udp_sockets(service[1], proc_net):
        if addr in wild and inode:
            return socket_owner(inode, proc)
    return None


def service_addresses(service: tuple, listeners: list[str]) -> dict[int, tuple[str, int]]:
    """The service address for each client family. The configured one, and for a
    loopback service the other family's loopback when the service listens there too
    (bound to it or to all addresses): 127.0.0.1:P gets [::1]:P and the other way round,
    so that IPv4 and IPv6 clients both keep their address."""
    host, port = unmapped(service[0]), service[1]
    out = {family(host): (host, port)}
    if host == "127.0.0.1" and ("::" in listeners or "::1" in listeners):
        out[socket.AF_INET6] = ("::1", port)
    elif host == "::1" and ("0.0.0.0" in listeners or "127.0.0.1" in listeners or "::" in listeners):
        out[socket.AF_INET] = ("127.0.0.1", port)
    return out


# --- policy routing ---

class Routing:
    """The policy routing that brings the service's answers back to the transparent
    sockets: for each service address, a rule (UDP from that address and port, sent by
    this host, looks up `table`) and the table's one route (every destination is local,
    on lo). install() is idempotent; remove() removes only what carries RTPROT and
    leaves the table's route while another rule still points to the table (a second
    agent on this host). A table that holds any other route is refused, never changed."""

    def __init__(self, services: list[tuple] | tuple, table: int = DEFAULT_TABLE, priority: int | None = None,
                 netlink: Netlink | None = None) -> None:
        if not 0 < table < 2 ** 32 or table in (253, 254, 255):
            raise RoutingError(f"routing table {table}: pick a number from 1 to 4294967295 but 253-255 "
                               "(default, main, local)")
        self.services = [(unmapped(s[0]), s[1]) for s in services]
        self.table, self.priority = table, priority
        self._nl = netlink
        self.lo = socket.if_nametoindex("lo")

    def _netlink(self) -> Netlink:
        if self._nl is None:
            self._nl = Netlink()
        return self._nl

    def close(self) -> None:
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    def rule(self, service: tuple) -> Rule:
        fam = family(service[0])
        return Rule(fam, self.table, service[0], 32 if fam == socket.AF_INET else 128, "lo",
                    socket.IPPROTO_UDP, (service[1], service[1]), RTPROT, self.priority)

    def route(self, fam: int) -> Route:
        return Route(fam, self.table, RTN_LOCAL, oif=self.lo, protocol=RTPROT, scope=RT_SCOPE_HOST)

    def families(self) -> list[int]:
        return sorted({family(s[0]) for s in self.services})

    def commands(self) -> list[str]:
        """The same set-up as `ip` commands (for a unit's ExecStartPre, or by hand)."""
        return [self.rule(s).ip_command() for s in self.services] + \
               [self.route(f).ip_command() for f in self.families()]

    @staticmethod
    def _same_route(r: Route, want: Route) -> bool:
        return (r.type, r.dst, r.dst_len, r.oif) == (want.type, None, 0, want.oif)

    def _check_table(self, fam: int) -> Route | None:
        """The table's local default route if it has one; RoutingError if it holds others."""
        nl = self._netlink()
        want = self.route(fam)
        found = None
        for r in nl.routes(fam, self.table):
            if self._same_route(r, want):
                found = r
            else:
                dst = f"{r.dst or ('::' if fam == socket.AF_INET6 else '0.0.0.0')}/{r.dst_len}"
                raise RoutingError(
                    f"routing table {self.table} already holds routes that udp-tunnel did not add "
                    f"(such as {dst}): --client-address transparent needs it for its own route alone; "
                    "move those routes to another table")
        return found

    def _have_rule(self, want: Rule) -> Rule | None:
        for r in self._netlink().rules(want.family):
            if r.selector() == want.selector():
                return r
        return None

    def missing(self) -> list[str]:
        """The `ip` commands of what is not in place (needs no privileges: for an agent
        that only checks what its unit or the administrator set up)."""
        out = []
        for fam in self.families():
            if self._check_table(fam) is None:
                out.append(self.route(fam).ip_command())
        for s in self.services:
            if self._have_rule(self.rule(s)) is None:
                out.append(self.rule(s).ip_command())
        return out

    def install(self) -> list[str]:
        """Add what is missing; the `ip` commands of what was added (for the log)."""
        nl = self._netlink()
        added = []
        try:
            for fam in self.families():
                if self._check_table(fam) is None:
                    r = self.route(fam)
                    try:
                        nl.add_route(r)
                        added.append(r.ip_command())
                    except FileExistsError:  # another agent, just now
                        pass
            for s in self.services:
                want = self.rule(s)
                if self._have_rule(want) is None:
                    nl.add_rule(want)
                    added.append(want.ip_command())
        except PermissionError:
            raise RoutingError(privilege_problem(0, True)) from None
        except OSError as e:
            raise RoutingError(f"policy routing for --client-address transparent: {e.strerror or e}") from None
        return added

    def remove(self) -> list[str]:
        """Remove this agent's rules, then the table's route if no rule uses the table any
        more; only what carries RTPROT. The `ip` commands that would add back what went."""
        nl = self._netlink()
        removed = []
        try:
            for s in self.services:
                want = self.rule(s)
                for r in nl.rules(want.family):
                    if r.selector() == want.selector() and r.protocol == RTPROT:
                        nl.delete_rule(r)
                        removed.append(r.ip_command())
            for fam in self.families():
                if any(r.table == self.table for r in nl.rules(fam)):
                    continue
                for r in nl.routes(fam, self.table):
                    if self._same_route(r, self.route(fam)) and r.protocol == RTPROT:
                        nl.delete_route(r)
                        removed.append(self.route(fam).ip_command())
        except FileNotFoundError:  # removed by someone else meanwhile
            pass
        except OSError as e:
            raise RoutingError(f"removing the policy routing of --client-address transparent: "
                               f"{e.strerror or e}") from None
        return removed

    def answers_come_back(self, service: tuple, client: tuple) -> bool:
        """Whether an answer from the service's address and port to this client address
        would be delivered on this host (through the table), as the kernel says now."""
        fam = family(service[0])
        try:
            r = self._netlink().route_get(fam, unmapped(client[0]), unmapped(service[0]),
                                          socket.IPPROTO_UDP, service[1])
        except OSError:  # EINVAL: no route from that source at all
            return False
        return r.type == RTN_LOCAL


# --- the common mistakes ---

def path_warning(service: tuple, client: tuple, local: bool, listeners: list[str],
                 source: str | None, device: str | None, owner: str | None = None) -> str | None:
    """The warning for a service whose answers will not come back to the agent, or None.

    service: where the agent sends; client: a client address; local: whether the
    service address is an address of this host; listeners: what UDP sockets on the
    service port are bound to (udp_listeners); source, device: the source address and
    interface this host picks for the client's address (its route); owner: who holds the
    socket on all addresses (wildcard_owner): no warning for ANSWERS_FROM_REACHED."""
    host, port = unmapped(service[0]), service[1]
    if not local:
        return (f"--client-address transparent: the service {show(service)} is not on this host: it will "
                f"answer the clients' real addresses through its own default route, not through this agent. "
                f"Run the service on this host, or route its answers to clients through this host")
    # a socket on [::] takes IPv4 too (unless IPV6_V6ONLY, which /proc does not show)
    wild = [w for w in (("0.0.0.0", "::") if family(host) == socket.AF_INET else ("::",)) if w in listeners]
    if host in listeners or not wild or source is None or source == host or owner in ANSWERS_FROM_REACHED:
        return None
    wildcard = wild[0]
    where = f" on {device}" if device else ""
    return (f"--client-address transparent: the service listens on {show((wildcard, port))} (all addresses) "
            f"and the agent sends to it at {show(service)}: unless it answers from the address it was reached "
            f"at (as WireGuard does), it answers a client such as {show(client)} from {source}{where}, and "
            f"those answers leave{where} for the client's real address instead of coming back to the agent. "
            f"Bind the service to {show(service)}")


def service_path_warning(service: tuple, client: tuple, netlink: Netlink | None = None,
                         proc: str = "/proc/net") -> str | None:
    """path_warning() with the facts of this host (one route lookup, /proc/net/udp):
    for the first client of each family."""
    fam = family(service[0])
    own = netlink is None
    nl = netlink or Netlink()
    try:
        try:
            local = nl.route_get(fam, unmapped(service[0])).type == RTN_LOCAL
        except OSError:
            local = False
        source = device = None
        try:
            r = nl.route_get(fam, unmapped(client[0]))
            source = r.prefsrc
            device = socket.if_indextoname(r.oif) if r.oif else None
        except OSError:
            pass
    finally:
        if own:
            nl.close()
    listeners = udp_listeners(service[1], proc)
    owner = wildcard_owner(service, proc) if local else None
    return path_warning(service, client, local, listeners, source, device, owner)


# --- what the inside agent's I/O layer calls ---

class TransparentClients:
    """--client-address transparent for one inside agent: all of the above behind the
    calls the I/O layer makes.

        start()                    at start, before any tunnel: privileges, routing (one line on error)
        announce(client)           a client's first announcement -> its service socket
        move(sock, old, new, now)  the client moved -> its new socket (the old one drains)
        seen(fd, now)              an answer was read from a socket that is not a client's current one
        expired(now)               on the timer -> old sockets to unregister and close
        stop()                     at stop -> retired sockets to unregister and close; routing removed

    Warnings (a client's port taken here, a service whose answers will not come back)
    go to `warn`, once per cause."""

    def __init__(self, service: tuple, table: int = DEFAULT_TABLE, manage_routing: bool = True,
                 warn=lambda msg: None, drain: float = DRAIN) -> None:
        self.service = (unmapped(service[0]), service[1])
        self.table, self.manage = table, manage_routing
        self.warn = warn
        self.retiring = Retiring(drain=drain)
        self.services: dict[int, tuple[str, int]] = {}
        self.routing: Routing | None = None
        self._checked: set[int] = set()  # families whose service path was checked
        self._taken: set[int] = set()  # ports already warned about

    def start(self) -> list[str]:
        """Raises TransparentError (str: the line to print before exiting 1). Returns what
        to log: the policy routing it added (as `ip` commands)."""
        self.services = service_addresses(self.service, udp_listeners(self.service[1]))
        msg = check_privileges(self.manage, tuple(self.services))
        if msg:
            raise PrivilegeError(msg)
        self.routing = Routing(list(self.services.values()), self.table)
        if self.manage:
            return [f"policy routing: {c}" for c in self.routing.install()]
        missing = self.routing.missing()
        if missing:
            raise RoutingError("--client-address transparent: the policy routing is not set up; as root: "
                               + "; ".join(missing))
        return []

    def _open(self, client: tuple) -> socket.socket:
        host = unmapped(client[0])
        fam = family(host)
        service = self.services.get(fam)
        if service is None:
            v = 6 if fam == socket.AF_INET6 else 4
            raise ClientAddressError(f"client {show(client)}: the service has no IPv{v} address "
                                     f"({show(self.service)}): it sees this client as the agent")
        if fam not in self._checked:
            self._checked.add(fam)
            w = service_path_warning(service, (host, client[1]))
            if w:
                self.warn(w)
        o = open_socket((host, client[1]), service)
        if not o.exact and client[1] not in self._taken:
            self._taken.add(client[1])
            self.warn(port_taken_warning(client, o))
        return o.sock

    def announce(self, client: tuple) -> socket.socket:
        """The client's service socket, not yet registered. Raises ClientAddressError (log it:
        the I/O layer may then give the client a plain socket) or OSError (EMFILE...)."""
        return self._open(client)

    def move(self, sock: socket.socket, old: tuple, new: tuple, now: float) -> socket.socket:
        """The socket for the client's new address (its own old one if it moves back within
        the drain); `sock` stays registered and forwards answers up the same tunnel until
        expired() returns it."""
        new_sock = self.retiring.revive(((unmapped(new[0]), new[1]),))
        if new_sock is None:
            new_sock = self._open(new)
        self.retiring.retire(sock, ((unmapped(old[0]), old[1]),), now)
        return new_sock

    def seen(self, fd: int, now: float) -> None:
        self.retiring.seen(fd, now)

    def expired(self, now: float) -> list[socket.socket]:
        return self.retiring.expired(now)

    def stop(self) -> tuple[list[socket.socket], list[str]]:
        """(retired sockets to unregister and close, the policy routing removed)."""
        removed = []
        if self.routing is not None:
            if self.manage:
                try:
                    removed = self.routing.remove()
                except RoutingError as e:
                    self.warn(str(e))
            self.routing.close()
            self.routing = None
        return self.retiring.all(), removed
