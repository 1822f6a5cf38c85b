"""The event loops: sockets, epoll and the data fast path around a core.

Per wakeup, each readable socket is drained in a batch (one epoll call per
batch, not per datagram). A datagram of a known flow costs one dict lookup
(outside) or nothing (inside: the socket is the flow) and one send call;
everything else goes to the core, whose actions are applied here.
"""

from __future__ import annotations

import errno
import select
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from udp_tunnel import proto, systemd, wireguard
from udp_tunnel.addr import AddrError, resolve, show
from udp_tunnel.inside import ACTIVE, InsideCore
from udp_tunnel.log import Log
from udp_tunnel.outside import OutsideCore

BATCH = 64  # datagrams read from one socket before the others get a turn
BUFSIZE = 65536
SOCKBUF = 4 << 20


def _bufsizes(s: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        except OSError:
            pass


class Loop:
    """What both agents share: epoll, signals, the timer, status publishing."""

    def __init__(self, core, log: Log, reload_key: Callable[[], bytes] | None = None) -> None:
        self.core = core
        self.log = log
        self.reload_key = reload_key
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[float], None]] = {}
        self.buf = bytearray(BUFSIZE)
        self.mv = memoryview(self.buf)
        self.errors: Counter[str] = Counter()
        self.stopping = False
        self.snapshot: dict = {}
        self.info: dict = {}  # fixed facts (version, addresses, key set) shown with every snapshot
        self.snapshot_lock = threading.Lock()
        self.next_publish = 0.0
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self.watch(self._sig_r.fileno(), self._on_signal)
        self.pending_signals: list[int] = []

    def watch(self, fd: int, handler: Callable[[float], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def net_error(self, where: str, e: OSError) -> None:
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self.errors[f"{where}_{name}"] += 1
        self.log.limited(f"neterr-{where}-{name}", f"{where}: {e.strerror or e} ({name}); going on")

    # --- signals ---

    def _handle_signal(self, signum, frame) -> None:
        self.pending_signals.append(signum)

    def _on_signal(self, now: float) -> None:
        try:
            while self._sig_r.recv(64):
                pass
        except BlockingIOError:
            pass
        while self.pending_signals:
            signum = self.pending_signals.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.log.info(f"{signal.Signals(signum).name}: stopping")
                self.stopping = True
            elif signum == signal.SIGHUP:
                self._reload()

    def _reload(self) -> None:
        if self.reload_key is None:
            self.log.info("SIGHUP: no key file to read again")
            return
        try:
            secret = self.reload_key()
        except (OSError, ValueError) as e:
            self.log.error(f"SIGHUP: key not changed: {e}")
            return
        self.core.password = secret
        self.core.codec = proto.Codec(secret)
        self.log.info("SIGHUP: key file read again")

    # --- running ---

    def tick(self, now: float) -> None:
        """Called when the core's timer is due."""

    def shutdown(self, now: float) -> None:
        """Called once when the agent stops, before the sockets close."""

    def publish(self, now: float) -> None:
        snap = self.core.snapshot(now)
        snap["stats"].update(self.errors)
        snap.update(self.info)
        with self.snapshot_lock:
            self.snapshot = snap

    def run(self) -> int:
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        old_fd = signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        watchdog = systemd.watchdog_interval()
        next_dog = 0.0
        try:
            now = time.monotonic()
            self.publish(now)
            systemd.notify("READY=1\nSTATUS=" + self.status_line())
            while not self.stopping:
                timeout = max(0.0, min(self.core.next_timer(), self.next_publish) - now)
                events = self.ep.poll(timeout)
                now = time.monotonic()
                for fd, _ in events:
                    h = self.handlers.get(fd)
                    if h is not None:
                        h(now)
                if now >= self.core.next_timer():
                    self.tick(now)
                if now >= self.next_publish:
                    self.next_publish = now + 1.0
                    self.publish(now)
                    systemd.notify("STATUS=" + self.status_line())
                    if watchdog and now >= next_dog:
                        systemd.notify("WATCHDOG=1")
                        next_dog = now + watchdog / 2
            systemd.notify("STOPPING=1")
            self.shutdown(now)
            return 0
        finally:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
            self.close()

    def status_line(self) -> str:
        s = self.snapshot
        return f"{s.get('clients', 0)} client(s), {s.get('spares', 0)} spare tunnel(s)"

    def close(self) -> None:
        self.ep.close()
        self._sig_r.close()
        self._sig_w.close()


class OutsideLoop(Loop):
    def __init__(self, core: OutsideCore, sock: socket.socket, log: Log, **kw) -> None:
        super().__init__(core, log, **kw)
        self.sock = sock
        sock.setblocking(False)
        _bufsizes(sock)
        self.ctrl_len = proto.LEGACY_LEN if core.legacy else proto.CTRL_LEN
        # WireGuard hook (issue 9): with --wireguard-key, datagrams of these two lengths (handshake
        # response / initiation, which transport data never has) go through the core, which
        # records the sessions they name; otherwise -1, which no datagram has.
        self.wg_lens = wireguard.DOWN_LENS if core.wg is not None else (-1, -1)
        self.watch(sock.fileno(), self._on_udp)

    def tick(self, now: float) -> None:
        self.core.on_timer(now)
        self.flush()

    def flush(self) -> None:
        out = self.core.out
        send = self.sock.sendto
        for data, addr in out:
            try:
                send(data, addr)
            except OSError as e:
                self.net_error("send", e)
        out.clear()

    def _on_udp(self, now: float) -> None:
        recv, send = self.sock.recvfrom_into, self.sock.sendto
        buf, mv, ctrl = self.buf, self.mv, self.ctrl_len
        wg_a, wg_b = self.wg_lens
        route_get = self.core.route.get
        for _ in range(BATCH):
            try:
                n, addr = recv(buf)
            except BlockingIOError:
                return
            except OSError as e:
                self.net_error("receive", e)
                continue
            f = route_get(addr)
            if f is not None and n != ctrl and n != wg_a and n != wg_b:
                try:
                    send(mv[:n], f.dst)
                except OSError as e:
                    self.net_error("send", e)
                f.pkts += 1
                f.bytes += n
            else:
                self.core.handle(bytes(mv[:n]), addr, now)
                if self.core.out:
                    self.flush()

    def close(self) -> None:
        super().close()
        self.sock.close()


class Pipe:
    """The sockets of one inside tunnel."""

    __slots__ = ("tid", "t", "tsock", "ssock")

    def __init__(self, tid: int, t, tsock: socket.socket) -> None:
        self.tid, self.t, self.tsock = tid, t, tsock
        self.ssock: socket.socket | None = None


class InsideLoop(Loop):
    def __init__(self, core: InsideCore, outside: tuple[str, int], outside_addr: tuple[int, tuple],
                 service: tuple[int, tuple], log: Log, family: int = socket.AF_UNSPEC, **kw) -> None:
        super().__init__(core, log, **kw)
        self.outside_name = outside
        self.outside_family, self.outside_addr = outside_addr
        self.service_family, self.service_addr = service
        self.family = family
        self.pipes: dict[int, Pipe] = {}
        self.resolver = ThreadPoolExecutor(1, thread_name_prefix="resolve")
        self.resolving: Future | None = None
        self.apply(time.monotonic())

    def tick(self, now: float) -> None:
        if self.resolving is not None and self.resolving.done():
            self._resolved(now)
        self.core.on_timer(now)
        self.apply(now)

    def _tunnel_socket(self) -> socket.socket:
        s = socket.socket(self.outside_family, socket.SOCK_DGRAM)
        s.setblocking(False)
        _bufsizes(s)
        s.connect(self.outside_addr)
        return s

    def apply(self, now: float) -> None:
        while self.core.actions:
            actions, self.core.actions = self.core.actions, []
            for a in actions:
                self._apply(a)

    def _apply(self, a: tuple) -> None:
        kind, tid = a[0], a[1] if len(a) > 1 else None
        p = self.pipes.get(tid)
        try:
            if kind == "open":
                s = self._tunnel_socket()
                p = self.pipes[tid] = Pipe(tid, self.core.tunnels[tid], s)
                self.watch(s.fileno(), lambda now, p=p: self._on_tunnel(p, now))
            elif kind == "service" and p is not None:
                s = socket.socket(self.service_family, socket.SOCK_DGRAM)
                s.setblocking(False)
                _bufsizes(s)
                s.connect(self.service_addr)
                p.ssock = s
                self.watch(s.fileno(), lambda now, p=p: self._on_service(p, now))
            elif kind == "send" and p is not None:
                p.tsock.send(a[2])
            elif kind == "to_service" and p is not None and p.ssock is not None:
                p.ssock.send(a[2])
            elif kind == "close" and p is not None:
                self._close_pipe(p)
            elif kind == "resolve" and self.resolving is None:
                host, port = self.outside_name
                self.resolving = self.resolver.submit(resolve, host, port, "--outside", self.family)
        except OSError as e:
            self.net_error(kind, e)
            if kind in ("open", "service") and tid in self.core.tunnels:
                # no socket (EMFILE, ...): the core forgets the tunnel, the pool refills later
                if p is not None:
                    self._close_pipe(p)
                self.core.forget(tid)

    def _close_pipe(self, p: Pipe) -> None:
        del self.pipes[p.tid]
        for s in (p.tsock, p.ssock):
            if s is not None:
                self.unwatch(s.fileno())
                s.close()
        p.ssock = None

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
                self.unwatch(p.tsock.fileno())
                p.tsock.close()
                p.tsock = self._tunnel_socket()
                self.watch(p.tsock.fileno(), lambda now, p=p: self._on_tunnel(p, now))
        self.core.on_resolved(changed, now)
        self.apply(now)

    def shutdown(self, now: float) -> None:
        self.core.shutdown(now)
        self.apply(now)

    def _on_tunnel(self, p: Pipe, now: float) -> None:
        recv = p.tsock.recv_into
        buf, mv, t = self.buf, self.mv, p.t
        legacy = self.core.legacy
        for _ in range(BATCH):
            try:
                n = recv(buf)
            except BlockingIOError:
                return
            except OSError as e:  # ICMP: the outside agent's port is closed, or no route
                self.net_error("tunnel", e)
                return
            if n == proto.CTRL_LEN and not legacy and buf[:4] == proto.MAGIC:
                self.core.on_control(p.tid, bytes(mv[:n]), now)
            elif p.ssock is None or t.state != ACTIVE:
                self.core.on_spare_data(p.tid, bytes(mv[:n]), now)
            else:
                try:
                    p.ssock.send(mv[:n])
                except OSError as e:
                    self.net_error("service", e)
                t.rx += 1
                t.rx_bytes += n
                continue
            self.apply(now)
            if p.tid not in self.pipes:
                return

    def _on_service(self, p: Pipe, now: float) -> None:
        recv, send = p.ssock.recv_into, p.tsock.send
        buf, mv, t = self.buf, self.mv, p.t
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
            t.tx += 1
            t.tx_bytes += n

    def close(self) -> None:
        for p in list(self.pipes.values()):
            self._close_pipe(p)
        self.resolver.shutdown(wait=False, cancel_futures=True)
        super().close()
