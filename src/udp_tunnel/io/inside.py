"""The inside agent's I/O: per tunnel a socket connected to the outside agent
and, once a client uses it, a socket connected to the service (a `Pipe`).

A datagram on an active tunnel goes to the service socket, and back, without
the core: the socket is the flow. Control messages (the core's rule) and data
on a tunnel without a service socket go to the core, whose actions (open,
send, close, resolve) are carried out here.

Two paths, chosen at start by class (`inside_loop()`):
- `PlainInsideLoop`: epoll and `recv_into` / `send`, on any system;
- `FastInsideLoop` (fastio, Linux): tunnel sockets take GRO runs; a socket is
  read one datagram (or run) per wakeup while it is quiet (level-triggered epoll
  says again if there is more), in recvmmsg batches while it stays busy (the
  fastio.Switch), and batches go on with sendmmsg, runs of equal size as GSO.
"""

from __future__ import annotations

import errno
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from udp_tunnel.addr import AddrError, resolve, show
from udp_tunnel.core.inside import Close, InsideCore, MoveService, OpenService, OpenTunnel, Resolve, Send, ToService
from udp_tunnel.io import fastio
from udp_tunnel.io.datapath import Datapath, InsideKernel, inside_describe
from udp_tunnel.io.loop import BATCH, Loop, bufsizes
from udp_tunnel.io.services import ServiceError, ServiceTarget
from udp_tunnel.ops.log import Log

# Where an action's socket error is counted (counters.ERROR_SITES).
ACTION_SITE = {Send: "tunnel", ToService: "service", OpenTunnel: "open_tunnel", OpenService: "open_service",
               MoveService: "open_service"}
DRAIN = 2.0  # s a client's old service socket (it moved) still takes the service's answers to it


class Pipe:
    """The sockets of one inside tunnel, and the meters the data paths count into."""

    __slots__ = ("tid", "rx", "tx", "tsock", "ssock", "t_switch", "t_wake", "s_switch", "s_wake",
                 "target", "conn", "client", "framing", "retired")

    def __init__(self, a: OpenTunnel, tsock: socket.socket) -> None:
        self.tid, self.rx, self.tx, self.tsock = a.tid, a.rx, a.tx, tsock
        self.ssock: socket.socket | None = None
        self.target: ServiceTarget | None = None  # its client's service, once announced
        self.conn = None  # services.Conn: the service socket and its PROXY v2 framing
        self.client: tuple | None = None
        self.framing = None  # PROXY v2: a header before (some of) what goes to the service
        self.retired: list[socket.socket] = []  # service sockets of the client's old address, draining
        # the fast path: read the tunnel / service socket in batches or not, and the wakeup that
        # last found it readable
        self.t_switch = fastio.Switch(*fastio.INSIDE_SWITCH)
        self.s_switch = fastio.Switch(*fastio.INSIDE_SWITCH)
        self.t_wake = self.s_wake = -2


class InsideLoop(Loop):
    """What both inside paths share: the pipes, the core's actions, looking the outside up again."""

    def __init__(self, core: InsideCore, outside: tuple[str, int], outside_addr: tuple[int, tuple],
                 services: dict[str, ServiceTarget] | tuple[int, tuple], log: Log, family: int = socket.AF_UNSPEC,
                 datapath: Datapath | None = None, **kw) -> None:
        super().__init__(core, log, datapath, **kw)
        self.kernel: InsideKernel | None = None
        if self.datapath.kp is not None:
            self.kernel = InsideKernel(self.datapath.kp, core.rule)
            self.datapath.describe = inside_describe
        self.outside_name = outside
        self.outside_family, self.outside_addr = outside_addr
        if isinstance(services, tuple):  # one service, as the command line's: (family, address)
            fam, addr = services
            services = {"default": ServiceTarget("default", fam, addr[0], addr[1])}
        self.services = services
        self.replaced: list[ServiceTarget] = []  # services a SIGHUP replaced or removed: stopped at close
        self.draining: dict[int, tuple[socket.socket, float]] = {}  # fd -> (old PROXY v2 socket, until)
        self.family = family
        self.rule = core.rule
        self.pipes: dict[int, Pipe] = {}
        self.resolver = ThreadPoolExecutor(1, thread_name_prefix="resolve")
        self.resolving: Future | None = None

    def tick(self, now: float) -> None:
        if self.resolving is not None and self.resolving.done():
            self._resolved(now)
        super().tick(now)
        self._drained(now)

    def publish(self, now: float) -> None:
        if self.kernel is not None:
            self.datapath.services = {
                name: f"client_address {t.mode}: the agent handles each datagram (the kernel path relays "
                      "services with client_address \"off\" only)"
                for name, t in self.services.items() if t.mode != "off"}
        super().publish(now)

    def _kernel_pipe(self, p: Pipe) -> None:
        """The pair to the kernel, where its service sees the agent (client_address "off")."""
        if self.kernel is not None and p.ssock is not None and p.framing is None and p.target is not None \
                and p.target.mode == "off":
            self.kernel.pipe(p.tid, p.tsock, p.ssock, p.rx, p.tx)

    def _kernel_unpipe(self, p: Pipe) -> None:
        if self.kernel is not None and p.tid in self.kernel.piped:
            self.kernel.unpipe(p.tid)

    def after_core(self, now: float) -> None:
        while self.core.has_output():
            for a in self.core.take():
                self._apply(a)

    def tunnel_socket(self) -> socket.socket:
        s = socket.socket(self.outside_family, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            bufsizes(s)
            s.connect(self.outside_addr)
        except OSError:
            s.close()
            raise
        return s

    def _apply(self, a) -> None:
        kind = type(a)
        p = self.pipes.get(a.tid) if kind is not Resolve else None
        try:
            if kind is Send:
                if p is not None:
                    p.tsock.send(a.data)
            elif kind is ToService:
                if p is not None and p.ssock is not None:
                    self.to_service(p, a.data)
            elif kind is OpenTunnel:
                s = self.tunnel_socket()
                p = self.pipes[a.tid] = Pipe(a, s)
                self.watch(s.fileno(), partial(self.on_tunnel, p))
            elif kind is OpenService:
                if p is not None:
                    self._open_service(p, a)
            elif kind is MoveService:
                if p is not None and p.conn is not None:
                    self._move_service(p, a.client)
            elif kind is Close:
                if p is not None:
                    self._close_pipe(p)
            elif kind is Resolve:
                if self.resolving is None:
                    host, port = self.outside_name
                    self.resolving = self.resolver.submit(resolve, host, port, "--outside", self.family)
        except OSError as e:
            self.net_error(ACTION_SITE[kind], e)
            if kind in (OpenTunnel, OpenService):
                self._lost_socket(a.tid)

    def _open_service(self, p: Pipe, a: OpenService) -> None:
        target = self.services.get(a.service)
        if target is None:
            raise OSError(0, f"no service {a.service!r} here")
        try:
            p.conn = target.open(a.offset, a.client, a.reached)
        except ServiceError as e:
            raise OSError(0, str(e)) from None
        p.target, p.client, p.ssock, p.framing = target, a.client, p.conn.sock, p.conn.framing
        bufsizes(p.ssock)
        self.watch(p.ssock.fileno(), partial(self.on_service, p))
        self._kernel_pipe(p)

    def _move_service(self, p: Pipe, client: tuple) -> None:
        """The client moved: the service sees its new address (a new socket where the mode needs
        one; the old one still takes answers for a while, going up the same tunnel)."""
        now = time.monotonic()
        new = p.target.move(p.conn, p.client, client, now)
        p.client = client
        if new is None:
            return
        old = p.ssock
        self.unwatch(old.fileno())
        self.watch(old.fileno(), partial(self._on_old_service, p, old))
        p.retired.append(old)
        if p.framing is not None:
            self.draining[old.fileno()] = (old, now + DRAIN)
        bufsizes(new)
        p.ssock = p.conn.sock = new
        self.watch(new.fileno(), partial(self.on_service, p))

    def _on_old_service(self, p: Pipe, s: socket.socket, now: float) -> None:
        """An answer to the client's old address: up the same tunnel."""
        try:
            data = s.recv(65536)
        except OSError:
            return
        if s.fileno() in self.draining:
            self.draining[s.fileno()] = (s, now + DRAIN)
        else:
            p.target.seen(s.fileno(), now)
        self.plain_send(p.tsock, data, "tunnel")
        p.tx.pkts += 1
        p.tx.bytes += len(data)

    def _drained(self, now: float) -> None:
        """Old service sockets that have been quiet long enough: closed."""
        done = [s for s, until in self.draining.values() if now >= until]
        for t in (*self.services.values(), *self.replaced):
            done += t.expired(now)
        for s in done:
            self.draining.pop(s.fileno(), None)
            for p in self.pipes.values():
                if s in p.retired:
                    p.retired.remove(s)
            self._close_socket(s)

    def _close_socket(self, s: socket.socket) -> None:
        if s.fileno() >= 0:
            self.unwatch(s.fileno())
            s.close()

    def to_service(self, p: Pipe, data: bytes | memoryview) -> None:
        """A datagram to the service (with its PROXY v2 header, when the service has one)."""
        try:
            if p.framing is None:
                p.ssock.send(data)
            else:
                p.ssock.sendmsg(p.framing.frame(data))
        except OSError as e:
            self.net_error("service", e)

    def _lost_socket(self, tid: int) -> None:
        """No socket for tunnel tid (EMFILE, no route...): the core forgets it, the pool refills later."""
        p = self.pipes.get(tid)
        if p is not None:
            self._close_pipe(p)
        self.core.socket_failed(tid)

    def _close_pipe(self, p: Pipe) -> None:
        self._kernel_unpipe(p)
        del self.pipes[p.tid]
        for s in (p.tsock, p.ssock, *p.retired):
            if s is not None:
                self.draining.pop(s.fileno(), None)
                self._close_socket(s)
        p.ssock = None
        p.retired.clear()

    def _resolved(self, now: float) -> None:
        fut, self.resolving = self.resolving, None
        try:
            fam, addr = fut.result()
        except AddrError as e:
            self.log.limited("resolve", str(e))
            return
        changed = (fam, addr) != (self.outside_family, self.outside_addr)
        if changed:
            self.log.warning(f"outside agent address changed from {show(self.outside_addr)} to {show(addr)}")
            self.outside_family, self.outside_addr = fam, addr
            for p in list(self.pipes.values()):
                self._reconnect(p)
        self.core.on_resolved(changed, now)
        self.after_core(now)

    def _reconnect(self, p: Pipe) -> None:
        self._kernel_unpipe(p)
        self.unwatch(p.tsock.fileno())
        p.tsock.close()
        try:
            p.tsock = self.tunnel_socket()
        except OSError as e:  # as when a tunnel socket can't be opened
            self.net_error("open_tunnel", e)
            self._lost_socket(p.tid)
            return
        self.watch(p.tsock.fileno(), partial(self.on_tunnel, p))
        self._kernel_pipe(p)

    def shutdown(self, now: float) -> None:
        self.core.shutdown(now)
        self.after_core(now)

    def to_core(self, p: Pipe, data: bytes, now: float) -> bool:
        """A datagram of tunnel p for the core; False when the pipe is gone after it."""
        self.core.receive(p.tid, data, now)
        self.after_core(now)
        return p.tid in self.pipes

    def plain_send(self, s: socket.socket, v: memoryview, site: str) -> None:
        try:
            s.send(v)
        except OSError as e:
            self.net_error(site, e)

    def on_tunnel(self, p: Pipe, now: float) -> None:
        raise NotImplementedError

    def on_service(self, p: Pipe, now: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        for p in list(self.pipes.values()):
            self._close_pipe(p)
        for t in (*self.services.values(), *self.replaced):
            socks, said = t.stop()
            for s in socks:
                s.close()
            for line in said:
                self.log.info(line)
        self.resolver.shutdown(wait=False, cancel_futures=True)
        super().close()


class PlainInsideLoop(InsideLoop):
    def on_tunnel(self, p: Pipe, now: float) -> None:
        recv = p.tsock.recv_into
        buf, mv, m = self.buf, self.mv, p.rx
        lengths, core_sees = self.rule.lengths, self.rule.core_sees
        for _ in range(BATCH):
            try:
                n = recv(buf)
            except BlockingIOError:
                return
            except OSError as e:  # ICMP: the outside agent's port is closed, or no route
                self.net_error("tunnel", e)
                return
            if p.ssock is None or n in lengths and core_sees(mv[:n]):
                if not self.to_core(p, bytes(mv[:n]), now):
                    return
                continue
            if p.framing is None:
                try:
                    p.ssock.send(mv[:n])
                except OSError as e:
                    self.net_error("service", e)
            else:
                self.to_service(p, mv[:n])
            m.pkts += 1
            m.bytes += n

    def on_service(self, p: Pipe, now: float) -> None:
        recv, send = p.ssock.recv_into, p.tsock.send
        buf, mv, m = self.buf, self.mv, p.tx
        for _ in range(BATCH):
            try:
                n = recv(buf)
            except BlockingIOError:
                return
            except OSError as e:  # ICMP port unreachable: the service is not running
                self.net_error("service", e)
                return
            try:
                send(mv[:n])
            except OSError as e:
                self.net_error("tunnel", e)
            m.pkts += 1
            m.bytes += n


class FastInsideLoop(InsideLoop):
    def __init__(self, *args, lib, **kw) -> None:
        super().__init__(*args, **kw)
        self.ring = fastio.Ring(lib, names=False)
        self.batch = fastio.Batch(lib, gso=True)
        self.gro = True  # until the kernel refuses UDP_GRO

    def tunnel_socket(self) -> socket.socket:
        s = super().tunnel_socket()
        if self.gro:
            self.gro = fastio.enable_gro(s)  # runs from the outside arrive as one
        return s

    def on_tunnel(self, p: Pipe, now: float) -> None:
        if p.t_switch.batched:
            self._tunnel_batch(p, now)
            return
        # one datagram (or GRO run) per wakeup through Python's own call: level-triggered
        # epoll says again if there is more, and no read fails
        try:
            n, anc, _, _ = p.tsock.recvmsg_into(self.bufs, fastio.ANC_SPACE)
        except BlockingIOError:
            return
        except OSError as e:  # ICMP: the outside agent's port is closed, or no route
            self.net_error("tunnel", e)
            return
        p.t_switch.single(p.t_wake == self.wakes - 1)
        p.t_wake = self.wakes
        seg = fastio.gro_segment(anc) if anc else 0
        mv, rule = self.mv, self.rule
        if p.ssock is not None and not (rule.run_may_hold(n, seg) if seg else
                                        n in rule.lengths and rule.core_sees(mv[:n])):
            self._to_service_run(p, n, seg)
            return
        for v in fastio.segments(mv, n, seg):
            if p.ssock is None or self.rule.core_sees(v):
                if not self.to_core(p, bytes(v), now):
                    return
            else:
                self.to_service(p, v)
                p.rx.pkts += 1
                p.rx.bytes += len(v)

    def _to_service_run(self, p: Pipe, n: int, seg: int) -> None:
        """A datagram, or a GRO run of data in seg-byte segments, to the service (runs as GSO)."""
        mv = self.mv
        if p.framing is not None:  # a header before each datagram: one by one
            for v in fastio.segments(mv, n, seg):
                self.to_service(p, v)
            p.rx.pkts += -(-n // seg) if seg else 1
            p.rx.bytes += n
            return
        try:
            if seg and seg < n:
                p.ssock.sendmsg([mv[:n]], fastio.gso_ancillary(seg))
            else:
                p.ssock.send(mv[:n])
        except OSError as e:
            if not seg:
                self.net_error("service", e)
            else:
                for v in fastio.segments(mv, n, seg):
                    self.plain_send(p.ssock, v, "service")
        p.rx.pkts += -(-n // seg) if seg else 1
        p.rx.bytes += n

    def _tunnel_batch(self, p: Pipe, now: float) -> None:  # long: the per-datagram hot loop, inlined on purpose
        ring = self.ring
        n = ring.recv(p.tsock.fileno(), fastio.MSG_DONTWAIT)
        if n <= 0:
            if n < 0 and n != -errno.EAGAIN:  # ICMP: the outside agent's port is closed, or no route
                self.net_errno("tunnel", -n)
            return
        p.t_switch.batch(n)
        lens, runs, views = ring.lengths(n), ring.runs(n), ring.views
        m, batch, add = p.rx, self.batch, self.batch.add
        lengths, core_sees, run_may_hold = self.rule.lengths, self.rule.core_sees, self.rule.run_may_hold
        pkts = nbytes = 0
        for i in range(n):
            ln = lens[i]
            seg = ring.segment(i) if runs[i] else 0
            if seg:
                data = not run_may_hold(ln, seg)
            else:
                data = ln not in lengths or not core_sees(views[i][:ln])
            if data and p.ssock is not None and p.framing is None:
                add(ring, i, ln, seg, None)
                pkts += -(-ln // seg) if seg else 1
                nbytes += ln
                continue
            # control, or data on a tunnel without its client yet: the core's, one datagram at a time
            if batch.nmsg:
                self._send_service(p)
            m.pkts += pkts
            m.bytes += nbytes
            pkts = nbytes = 0
            for v in fastio.segments(views[i], ln, seg):
                if p.ssock is None or core_sees(v):
                    if not self.to_core(p, bytes(v), now):
                        batch.clear()
                        return
                else:
                    self.to_service(p, v)
                    m.pkts += 1
                    m.bytes += len(v)
        if batch.nmsg:
            self._send_service(p)
        m.pkts += pkts
        m.bytes += nbytes

    def _send_service(self, p: Pipe) -> None:
        self.batch.send(p.ssock.fileno(), lambda e: self.net_error("service", e),
                        lambda v, dst: self.plain_send(p.ssock, v, "service"))

    def on_service(self, p: Pipe, now: float) -> None:
        if p.s_switch.batched:
            self._service_batch(p)
            return
        # one datagram per wakeup: epoll says again if there is more, and a read never fails
        try:
            n = p.ssock.recv_into(self.buf)
        except BlockingIOError:
            return
        except OSError as e:  # ICMP port unreachable: the service is not running
            self.net_error("service", e)
            return
        try:
            p.tsock.send(self.mv[:n])
        except OSError as e:
            self.net_error("tunnel", e)
        m = p.tx
        m.pkts += 1
        m.bytes += n
        p.s_switch.single(p.s_wake == self.wakes - 1)
        p.s_wake = self.wakes

    def _service_batch(self, p: Pipe) -> None:
        ring = self.ring
        n = ring.recv(p.ssock.fileno(), fastio.MSG_DONTWAIT)
        if n <= 0:
            if n < 0 and n != -errno.EAGAIN:
                self.net_errno("service", -n)
            return
        p.s_switch.batch(n)
        batch = self.batch
        nbytes, failed = ring.send_runs(p.tsock.fileno(), n, batch.gso_max)
        for i, count, seg, err in failed:
            if count > 1 and err in fastio.GSO_REFUSED:
                batch.gso_max = fastio.gso_limit(batch.gso_max, seg, err)
                for v in ring.parts(i, count, 0):
                    self.plain_send(p.tsock, v, "tunnel")
            else:
                self.net_errno("tunnel", err)
        m = p.tx
        m.pkts += n
        m.bytes += nbytes


def inside_loop(core: InsideCore, *args, plain: bool = False, **kw) -> InsideLoop:
    """The fast path where fastio works, else the plain one."""
    lib = None if plain else fastio.load()
    if lib is None:
        return PlainInsideLoop(core, *args, **kw)
    return FastInsideLoop(core, *args, lib=lib, **kw)
