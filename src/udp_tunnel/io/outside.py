"""The outside agent's I/O: one UDP socket for clients and tunnels.

A datagram from a source with a route (`core.routes`) that the core's rule
does not claim is forwarded here with one lookup; everything else goes to the
core (`receive`), whose output is sent at once.

Two paths, chosen at start by class (`outside_loop()`):
- `PlainOutsideLoop`: epoll and `recvfrom_into` / `sendto`, on any system;
- `FastOutsideLoop` (fastio, Linux): blocks in the receive on its one socket (no
  poller; SO_RCVTIMEO bounds the wait by the core's timer), one datagram per
  wakeup while they come one by one, a recvmmsg batch while the socket stays
  busy, sent on in place with sendmmsg (runs of equal size to one tunnel as
  one GSO message).
"""

from __future__ import annotations

import errno
import socket
import time
from functools import partial

from udp_tunnel.core.outside import OutsideCore
from udp_tunnel.io import fastio
from udp_tunnel.io.datapath import Datapath, OutsideKernel, outside_describe
from udp_tunnel.io.loop import BATCH, Loop, ReceiveInterruptedError, bufsizes
from udp_tunnel.ops.log import Log
from udp_tunnel.wire import statefile

STATE_SAVE = 2.0  # seconds between looks at whether the state file needs writing
WAIT_CAP = 0.2  # longest blocking receive: bounds a signal's or a status request's wait
ADDR_CACHE = 8192  # raw sockaddrs remembered by the fast path
NAME = fastio.NAME


class OutsideLoop(Loop):
    """What both outside paths share: sending the core's output, the state file. `socks`: one
    socket per endpoint of the core, the tunnel port first."""

    def __init__(self, core: OutsideCore, socks: list[socket.socket] | socket.socket, log: Log,
                 state_path: str | None = None, datapath: Datapath | None = None, **kw) -> None:
        super().__init__(core, log, datapath, **kw)
        self.socks = [socks] if isinstance(socks, socket.socket) else list(socks)
        self.sock = self.socks[0]
        for s in self.socks:
            bufsizes(s)
        self.routes = core.routes
        self.state_path = state_path
        self.saved = b""
        self.next_save = 0.0
        self.kernel: OutsideKernel | None = None
        if self.datapath.kp is not None:  # the map follows the route table from now on
            self.kernel = OutsideKernel(self.datapath.kp, core.routes, lambda via: self.socks[via].getsockname(),
                                        lambda via: core.rules[via])
            self.datapath.describe = outside_describe
            core.routes.listener = self.kernel
            self.kernel.sync()

    def tick(self, now: float) -> None:
        super().tick(now)
        if self.state_path and now >= self.next_save:
            self.next_save = now + STATE_SAVE
            self.save_state()

    def after_core(self, now: float) -> None:
        self.flush()

    def save_state(self) -> None:
        data = statefile.dump(self.core.saved_tunnels(), self.core.saved_initiations())
        if data != self.saved:
            try:
                statefile.save(self.state_path, data)
                self.saved = data
            except OSError as e:
                self.log.limited("state", f"cannot write the state file {self.state_path}: {e.strerror or e}")

    def shutdown(self, now: float) -> None:
        if self.state_path:
            self.save_state()

    def flush(self) -> None:
        socks = self.socks
        for data, addr, via in self.core.take():
            try:
                socks[via].sendto(data, addr)
            except OSError as e:
                self.net_error("send", e)
            except AttributeError:  # (its endpoint was closed by a reload)
                pass

    can_add_ports = False  # a new configuration with more ports needs a restart of this loop

    def add_socket(self, sock: socket.socket) -> int:
        raise NotImplementedError

    def remove_socket(self, via: int) -> None:
        raise NotImplementedError

    def to_core(self, data: bytes, addr: tuple, now: float, via: int = 0) -> None:
        self.core.receive(data, addr, now, via)
        if self.core.has_output():
            self.flush()

    def close(self) -> None:
        self.core.routes.listener = None
        super().close()
        for s in self.socks:
            if s is not None:
                s.close()


class PlainOutsideLoop(OutsideLoop):
    """epoll over the endpoints' sockets, Python's own socket calls: any system, any number of
    endpoints."""

    def __init__(self, core: OutsideCore, socks: list[socket.socket] | socket.socket, log: Log, **kw) -> None:
        super().__init__(core, socks, log, **kw)
        for via, s in enumerate(self.socks):
            s.setblocking(False)
            self.watch(s.fileno(), partial(self._on_udp, via))

    can_add_ports = True

    def add_socket(self, sock: socket.socket) -> int:
        """A new endpoint's socket (its index is the core's for it)."""
        bufsizes(sock)
        sock.setblocking(False)
        self.socks.append(sock)
        via = len(self.socks) - 1
        self.watch(sock.fileno(), partial(self._on_udp, via))
        return via

    def remove_socket(self, via: int) -> None:
        s = self.socks[via]
        if s is not None:
            self.unwatch(s.fileno())
            s.close()
            self.socks[via] = None

    def _on_udp(self, via: int, now: float) -> None:
        recv = self.socks[via].recvfrom_into
        socks, buf, mv = self.socks, self.buf, self.mv
        rule = self.core.rules[via]
        lengths = rule.lengths
        route_get = self.routes.gets[via]
        for _ in range(BATCH):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                return
            except OSError as e:
                self.net_error("receive", e)
                continue
            f = route_get(addr)
            if f is not None and (n not in lengths or not rule.core_sees(mv[:n])):
                try:
                    socks[f.via].sendto(mv[:n], f.dst)
                except OSError as e:
                    self.net_error("send", e)
                f.pkts += 1
                f.bytes += n
            else:
                self.to_core(bytes(mv[:n]), addr, now, via)


class FastOutsideLoop(OutsideLoop):
    def __init__(self, core: OutsideCore, sock: socket.socket, log: Log, lib, **kw) -> None:
        super().__init__(core, sock, log, **kw)
        sock.setblocking(True)  # the one socket is waited on in its receive, not in epoll
        self.fd = sock.fileno()
        self.ring = fastio.Ring(lib, names=True)
        fastio.enable_gro(sock)
        self.gso_max = fastio.SLOT  # runs go as GSO messages up to this segment size (0: none)
        self.alen = 28 if sock.family == socket.AF_INET6 else 16  # sockaddr length on this socket
        self.addrs: dict[bytes, tuple] = {}  # raw sockaddr -> address as recvfrom gives it
        self.flows: dict[bytes, tuple] = {}  # raw sockaddr -> _flow_entry, while routes don't change
        self.routes_seen = self.routes.version
        self.rcvtimeo = WAIT_CAP
        fastio.set_recv_timeout(sock, WAIT_CAP)
        self.switch = fastio.Switch(*fastio.OUTSIDE_SWITCH)
        self.last_rx = 0.0

    @property
    def batched(self) -> bool:
        return self.switch.batched

    def wait(self, timeout: float) -> float:
        """Blocking receives (together at most `timeout`, each at most WAIT_CAP) and what they
        bring: single receives in a loop of their own while they only need forwarding, or a
        recvmmsg batch while the socket stays busy."""
        if self.pending_signals:
            return time.monotonic()
        flags = self._receive_timeout(timeout)
        if self.switch.batched:
            return self._recv_batch(flags)
        return self._recv_singles(flags, timeout)

    def _receive_timeout(self, timeout: float) -> int:
        """The flags of the next receive, its SO_RCVTIMEO set for `timeout` (capped at WAIT_CAP)."""
        if timeout <= 0.0:
            return fastio.MSG_DONTWAIT
        t = min(timeout, WAIT_CAP)
        if t < self.rcvtimeo - 0.01 or (t == WAIT_CAP and self.rcvtimeo != WAIT_CAP):
            t = max(t, 0.001)
            fastio.set_recv_timeout(self.sock, t)
            self.rcvtimeo = t
        return fastio.MSG_WAITFORONE if self.switch.batched else 0

    def _recv_singles(self, flags: int, timeout: float) -> float:  # long: the hot loop, inlined on purpose
        """One datagram per receive through Python's own call (a ctypes call costs more on a cold
        wakeup), in a loop of its own while the receives only forward; it goes on only while a
        receive that waits its longest still ends in time for the core's timer."""
        deadline = time.monotonic() + timeout - self.rcvtimeo
        recv, send, route_get = self.sock.recvmsg_into, self.sock.sendto, self.routes.get
        rule = self.core.rule  # (a reload may change it: read where each run of receives starts)
        bufs, mv, lengths, monotonic = self.bufs, self.mv, rule.lengths, time.monotonic
        core_sees, single = rule.core_sees, self.switch.single
        last = self.last_rx
        while True:
            try:
                self.in_recv = True
                n, anc, _, addr = recv(bufs, fastio.ANC_SPACE, flags)
                self.in_recv = False
            except (ReceiveInterruptedError, BlockingIOError):  # a signal; SO_RCVTIMEO: the timer is due
                self.in_recv = False
                now = monotonic()
                break
            except OSError as e:
                self.in_recv = False
                self.net_error("receive", e)
                now = monotonic()
                break
            now = monotonic()
            single(now - last < fastio.BUSY_GAP)
            last = now
            f = route_get(addr)
            if f is not None and not anc and (n not in lengths or not core_sees(mv[:n])):
                try:
                    send(mv[:n], f.dst)
                except OSError as e:
                    self.net_error("send", e)
                f.pkts += 1
                f.bytes += n
            else:
                self._one_slow(n, anc, addr, f, now)
            if flags or now >= deadline or self.switch.batched or self.pending_signals or self.want_publish:
                break
        self.last_rx = last
        return now

    def _one_slow(self, n: int, anc: list, addr: tuple, f, now: float) -> None:
        """A datagram of the single-receive path that is not plain forwarding: a GRO run (sent on
        as one GSO message), or the core's."""
        seg = fastio.gro_segment(anc)
        if f is not None and seg and not self.core.rule.run_may_hold(n, seg):
            try:
                if seg < n:
                    self.sock.sendmsg([self.mv[:n]], fastio.gso_ancillary(seg), 0, f.dst)
                else:
                    self.sock.sendto(self.mv[:n], f.dst)
            except OSError:
                for v in fastio.segments(self.mv, n, seg):
                    self._send_one(v, f.dst)
            f.pkts += -(-n // seg)
            f.bytes += n
            return
        for v in fastio.segments(self.mv, n, seg):
            self.core.receive(bytes(v), addr, now)
        if self.core.has_output():
            self.flush()

    def _recv_batch(self, flags: int) -> float:
        ring = self.ring
        n = ring.recv(self.fd, flags)
        now = time.monotonic()
        if n <= 0:
            if n < 0 and n not in (-errno.EAGAIN, -errno.EINTR):
                self.net_errno("receive", -n)
            return now
        self.switch.batch(n)
        self._forward_batch(n, now)
        return now

    def _routes_moved(self) -> None:
        if self.routes.version != self.routes_seen:
            self.flows.clear()
            self.routes_seen = self.routes.version

    def _forward_batch(self, n: int, now: float) -> None:  # long: the per-datagram hot loop, inlined on purpose
        """A recvmmsg batch, sent on in place: each slot to its flow's destination, runs of
        equal-size datagrams to one place as one GSO message, in as few sendmmsg as the order
        allows; what the core must see goes to it in between, in order."""
        ring = self.ring
        self._routes_moved()
        flow_get = self.flows.get
        raw = ring.senders(n)
        rule = self.core.rule
        alen, lengths, core_sees = self.alen, rule.lengths, rule.core_sees
        lens, runs, views = ring.lengths(n), ring.runs(n), ring.views
        run_max = self.gso_max
        start = end = 0  # slots start..end-1 hold messages ready to go, one each
        head, head_e, head_ln, head_n = -1, None, 0, 0  # the last message, while later slots may join it
        for i in range(n):
            o = NAME * i
            e = flow_get(raw[o:o + alen])
            if e is None:
                e = self._flow_entry(raw[o:o + alen])
            ln = lens[i]
            if e is None or runs[i] or ln in lengths and core_sees(views[i][:ln]):
                if e is not None and self._gro_run(i, ln, e):
                    if i != end:
                        self._send_slots(start, end)
                        start = i
                    end, head_e = i + 1, None
                    continue
                # the core's: control, a datagram from an unknown source, a GRO run of such
                if end > start:
                    self._send_slots(start, end)
                start = end = i + 1
                head_e = None
                self._to_core(i, ln, now)
                self._routes_moved()
                continue
            f = e[0]
            f.pkts += 1
            f.bytes += ln
            if (e is head_e and ln == head_ln and head_n < fastio.GSO_MAX_SEGS
                    and (head_n + 1) * ln <= fastio.GSO_MAX_BYTES):
                if head_n == 1:
                    ring.join(head, ln)
                ring.grow(head, i, ln)
                head_n += 1
                continue
            if i != end:  # slots joined the message before: send up to it, go on from here
                self._send_slots(start, end)
                start = i
            ring.forward(i, e[1], ln)
            end = i + 1
            if 0 < ln <= run_max:  # (an empty datagram is a GSO segment of no size: never in a run)
                head, head_e, head_ln, head_n = i, e, ln, 1
            else:
                head_e = None
        if end > start:
            self._send_slots(start, end)

    def _flow_entry(self, raw: bytes) -> tuple | None:
        """(flow, address of the raw destination, the raw destination) for a sender with a
        route, remembered until routes change."""
        addr = self._addr_of(raw)
        f = self.routes.get(addr)
        if f is None:
            return None
        host = f.dst[0].split("%", 1)[0]
        dst = fastio.dest((host, *f.dst[1:]), self.sock.family)
        e = (f, dst[1], dst[0])  # the last keeps the raw sockaddr the pointer points into alive
        if len(self.flows) >= ADDR_CACHE:
            self.flows.clear()
        self.flows[raw] = e
        return e

    def _gro_run(self, i: int, ln: int, e: tuple) -> bool:
        """Slot i holds a GRO run from a known flow: make it a GSO message to the flow's
        destination, unless a segment may be one the core must see (then False)."""
        seg = self.ring.segment(i)
        if not seg or self.core.rule.run_may_hold(ln, seg):
            return False
        self.ring.forward_run(i, e[1], ln, seg)
        f = e[0]
        f.pkts += -(-ln // seg)
        f.bytes += ln
        return True

    def _to_core(self, i: int, ln: int, now: float) -> None:
        ring = self.ring
        addr = self._addr_of(ring.name(i))
        for v in fastio.segments(ring.views[i], ln, ring.segment(i)):
            self.core.receive(bytes(v), addr, now)
        if self.core.has_output():
            self.flush()

    def _send_slots(self, start: int, end: int) -> None:
        """Send the messages of slots start..end-1 (a failed one is counted and skipped; a GSO
        message the kernel refuses goes as its datagrams, and runs stop or shrink)."""
        ring = self.ring
        for i, err in ring.send(self.fd, start, end):
            seg = ring.sent_segment(i)
            if seg and err in fastio.GSO_REFUSED:
                self.gso_max = fastio.gso_limit(self.gso_max, seg, err)
                dst = self._addr_of(ring.sent_dest(i, self.alen))
                for v in ring.parts(i, ring.sent_count(i), seg):
                    self._send_one(v, dst)
            else:
                self.net_errno("send", err)

    def _send_one(self, data: memoryview, dst: tuple) -> None:
        try:
            self.sock.sendto(data, dst)
        except OSError as e:
            self.net_error("send", e)

    def _addr_of(self, raw: bytes) -> tuple:
        """The address tuple recvfrom would give for the raw sockaddr `raw` (remembered)."""
        addr = self.addrs.get(raw)
        if addr is None:
            addr = fastio.address(raw)
            if len(self.addrs) >= ADDR_CACHE:
                self.addrs.clear()
            self.addrs[raw] = addr
        return addr


def outside_loop(core: OutsideCore, socks: list[socket.socket] | socket.socket, log: Log, plain: bool = False,
                 **kw) -> OutsideLoop:
    """The fast path where fastio works and there is one socket (clients and tunnels on one port,
    as -l PORT), else the plain one."""
    socks = [socks] if isinstance(socks, socket.socket) else socks
    lib = None if plain or len(socks) > 1 else fastio.load()
    if lib is None:
        return PlainOutsideLoop(core, socks, log, **kw)
    return FastOutsideLoop(core, socks[0], log, lib, **kw)
