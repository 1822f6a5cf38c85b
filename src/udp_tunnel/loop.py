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
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from udp_tunnel import proto, statefile, systemd
from udp_tunnel.addr import AddrError, resolve, show
from udp_tunnel.inside import Close, InsideCore, OpenService, OpenTunnel, Resolve, Send, ToService
from udp_tunnel.log import Log
from udp_tunnel.outside import OutsideCore

STATE_SAVE = 2.0  # seconds between looks at whether the state file needs writing
KEY_GRACE = 600.0  # seconds an old key stays accepted after SIGHUP brought a new one
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
        self.keys = core.secrets  # the key file's keys, for SIGHUP
        self.forget_old_at = 0.0

    def watch(self, fd: int, handler: Callable[[float], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def internal_error(self, where: str, e: Exception) -> None:
        """A bug met a datagram or event: count it, log it (the traceback once), serve everyone else."""
        name = type(e).__name__
        first = self.errors[f"internal_{name}"] == 0
        self.errors[f"internal_{name}"] += 1
        text = "".join(traceback.format_exception(e)).rstrip() if first else str(e)
        self.log.limited(f"internal-{where}-{name}", f"internal error in {where} (going on): {text}", prio=3)

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
        keys = proto.key_list(secret)
        old = [k for k in self.keys if k not in keys]
        now = time.monotonic()
        # the key it replaces stays accepted for a while, so the other end can be reloaded later
        self.core.rekey(keys + old[:1], now)
        self.keys, self.forget_old_at = keys, now + KEY_GRACE if old else 0.0
        self.log.info("SIGHUP: key file read again" + (f"; the old key is accepted for {KEY_GRACE:g} s more"
                                                         if old else ""))

    def _forget_old_key(self) -> None:
        self.forget_old_at = 0.0
        self.core.rekey(self.keys, time.monotonic(), reregister=False)
        self.log.info("the old key is no longer accepted")

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
        # The wake-up descriptor first: a signal caught by our handler must always wake the poll.
        old_fd = signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
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
                        try:
                            h(now)
                        except Exception as e:  # noqa: BLE001 - contained: one event lost, not the agent
                            self.internal_error("datagram handling", e)
                if now >= self.core.next_timer():
                    try:
                        self.tick(now)
                    except Exception as e:  # noqa: BLE001
                        self.internal_error("timer", e)
                if self.forget_old_at and now >= self.forget_old_at:
                    self._forget_old_key()
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
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_fd)
            self.close()

    def status_line(self) -> str:
        s = self.snapshot
        return f"{s.get('clients', 0)} client(s), {s.get('spares', 0)} spare tunnel(s)"

    def close(self) -> None:
        self.ep.close()
        self._sig_r.close()
        self._sig_w.close()


class OutsideLoop(Loop):
    def __init__(self, core: OutsideCore, sock: socket.socket, log: Log, state_path: str | None = None,
                 **kw) -> None:
        super().__init__(core, log, **kw)
        self.sock = sock
        sock.setblocking(False)
        _bufsizes(sock)
        self.ctrl_len = proto.LEGACY_LEN if core.legacy else proto.CTRL_LEN
        self.watch(sock.fileno(), self._on_udp)
        self.state_path = state_path
        self.saved = b""
        self.next_save = 0.0
        if state_path:
            try:
                entries = statefile.load(state_path)
            except ValueError as e:
                log.warning(f"{e}: tunnels register again at their next keepalive")
                entries = []
            if entries:
                log.info(f"asking the {len(entries)} tunnel(s) of the previous run to register again")
                core.remembered(entries, time.monotonic())
                self.flush()

    def tick(self, now: float) -> None:
        self.core.on_timer(now)
        self.flush()
        if self.state_path and now >= self.next_save:
            self.next_save = now + STATE_SAVE
            self.save_state()

    def save_state(self) -> None:
        data = statefile.dump(self.core.saved_tunnels())
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
        send = self.sock.sendto
        for data, addr in self.core.take():
            try:
                send(data, addr)
            except OSError as e:
                self.net_error("send", e)

    def _on_udp(self, now: float) -> None:
        recv, send = self.sock.recvfrom_into, self.sock.sendto
        buf, mv, ctrl = self.buf, self.mv, self.ctrl_len
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
            if f is not None and n != ctrl:
                try:
                    send(mv[:n], f.dst)
                except OSError as e:
                    self.net_error("send", e)
                f.pkts += 1
                f.bytes += n
            else:
                self.core.receive(bytes(mv[:n]), addr, now)
                if self.core.out:
                    self.flush()

    def close(self) -> None:
        super().close()
        self.sock.close()


class Pipe:
    """The sockets of one inside tunnel, and the meters the fast path counts into."""

    __slots__ = ("tid", "rx", "tx", "tsock", "ssock")

    def __init__(self, a: OpenTunnel, tsock: socket.socket) -> None:
        self.tid, self.rx, self.tx, self.tsock = a.tid, a.rx, a.tx, tsock
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
        try:
            s.setblocking(False)
            _bufsizes(s)
            s.connect(self.outside_addr)
        except OSError:
            s.close()
            raise
        return s

    def apply(self, now: float) -> None:
        while self.core.actions:
            for a in self.core.take():
                self._apply(a)

    def _apply(self, a) -> None:
        kind = type(a)
        p = self.pipes.get(a.tid) if kind is not Resolve else None
        try:
            if kind is Send:
                if p is not None:
                    p.tsock.send(a.data)
            elif kind is ToService:
                if p is not None and p.ssock is not None:
                    p.ssock.send(a.data)
            elif kind is OpenTunnel:
                s = self._tunnel_socket()
                p = self.pipes[a.tid] = Pipe(a, s)
                self.watch(s.fileno(), lambda now, p=p: self._on_tunnel(p, now))
            elif kind is OpenService:
                if p is not None:
                    s = socket.socket(self.service_family, socket.SOCK_DGRAM)
                    p.ssock = s
                    s.setblocking(False)
                    _bufsizes(s)
                    s.connect(self.service_addr)
                    self.watch(s.fileno(), lambda now, p=p: self._on_service(p, now))
            elif kind is Close:
                if p is not None:
                    self._close_pipe(p)
            elif kind is Resolve:
                if self.resolving is None:
                    host, port = self.outside_name
                    self.resolving = self.resolver.submit(resolve, host, port, "--outside", self.family)
        except OSError as e:
            self.net_error(kind.__name__, e)
            if kind in (OpenTunnel, OpenService):
                self._lost_socket(a.tid)

    def _lost_socket(self, tid: int) -> None:
        """No socket for tunnel tid (EMFILE, no route...): the core forgets it, the pool refills later."""
        p = self.pipes.get(tid)
        if p is not None:
            self._close_pipe(p)
        self.core.socket_failed(tid)

    def _close_pipe(self, p: Pipe) -> None:
        del self.pipes[p.tid]
        for s in (p.tsock, p.ssock):
            if s is not None and s.fileno() >= 0:
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
                try:
                    p.tsock = self._tunnel_socket()
                except OSError as e:  # as when a tunnel socket can't be opened
                    self.net_error("OpenTunnel", e)
                    self._lost_socket(p.tid)
                    continue
                self.watch(p.tsock.fileno(), lambda now, p=p: self._on_tunnel(p, now))
        self.core.on_resolved(changed, now)
        self.apply(now)

    def shutdown(self, now: float) -> None:
        self.core.shutdown(now)
        self.apply(now)

    def _on_tunnel(self, p: Pipe, now: float) -> None:
        recv = p.tsock.recv_into
        buf, mv, m = self.buf, self.mv, p.rx
        legacy = self.core.legacy
        for _ in range(BATCH):
            try:
                n = recv(buf)
            except BlockingIOError:
                return
            except OSError as e:  # ICMP: the outside agent's port is closed, or no route
                self.net_error("tunnel", e)
                return
            if p.ssock is None or n == proto.CTRL_LEN and not legacy and buf[:4] == proto.MAGIC:
                self.core.receive(p.tid, bytes(mv[:n]), now)
            else:
                try:
                    p.ssock.send(mv[:n])
                except OSError as e:
                    self.net_error("service", e)
                m.pkts += 1
                m.bytes += n
                continue
            self.apply(now)
            if p.tid not in self.pipes:
                return

    def _on_service(self, p: Pipe, now: float) -> None:
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

    def close(self) -> None:
        for p in list(self.pipes.values()):
            self._close_pipe(p)
        self.resolver.shutdown(wait=False, cancel_futures=True)
        super().close()
