"""The event loops: sockets, epoll and the data fast path around a core.

A datagram of a known flow costs one dict lookup (outside) or nothing (inside:
the socket is the flow) and its share of a send call; everything else goes to
the core, whose actions are applied here.

With `fastio` (Linux): the outside agent blocks in recvmmsg on its one socket
(no poller; SO_RCVTIMEO bounds the wait by the core's timer) and sends each
batch with one sendmmsg, runs of equal-size datagrams to one tunnel as one GSO
message. The inside agent's tunnel sockets take GRO runs and are read a batch
per wakeup; a service socket is read one datagram per wakeup (epoll is level
triggered: no read that fails) until it stays busy, then in batches. Without
it (another system, UDP_TUNNEL_PLAIN=1): epoll and plain socket calls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from udp_tunnel.addr import AddrError, resolve, show
from udp_tunnel.core import wireguard
from udp_tunnel.core.inside import Close, InsideCore, OpenService, OpenTunnel, Resolve, Send, ToService
from udp_tunnel.core.outside import OutsideCore
from udp_tunnel.io import fastio
from udp_tunnel.ops import systemd
from udp_tunnel.ops.log import Log
from udp_tunnel.wire import proto, statefile

STATE_SAVE = 2.0  # seconds between looks at whether the state file needs writing
KEY_GRACE = 600.0  # seconds an old key stays accepted after SIGHUP brought a new one
BATCH = 64  # datagrams read from one socket before the others get a turn
BUFSIZE = 65536
SOCKBUF = 4 << 20
WAIT_CAP = 0.2  # longest blocking receive on the outside: bounds a signal's or a status request's wait
STATUS_EVERY = 5.0  # seconds between systemd STATUS= lines
BUSY_GAP = 100e-6  # datagrams closer than this, BUSY_RUN times in a row: read the outside socket in batches
BUSY_RUN = 8
ADDR_CACHE = 8192  # raw sockaddrs remembered by the outside's fast path
NAME = fastio.NAME


def _bufsizes(s: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        except OSError:
            pass


class _ReceiveInterruptedError(Exception):
    """Raised by the signal handler to end a blocking receive at once."""


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
        self.bufs = [self.buf]  # for recvmsg_into
        self.errors: Counter[str] = Counter()
        self.stopping = False
        self._snapshot: dict = {}
        self.info: dict = {}  # fixed facts (version, addresses, key set) shown with every snapshot
        self.snapshot_lock = threading.Lock()  # held by the readers (status, metrics) while they ask
        self.want_publish = False
        self._fresh = threading.Event()
        self._loop_thread: int | None = None  # set while run() runs
        self.wakes = 0
        self._sig_r, self._sig_w = socket.socketpair()
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        self.watch(self._sig_r.fileno(), self._on_signal)
        self.pending_signals: list[int] = []
        self.keys = core.secrets  # the key file's keys, for SIGHUP
        self.forget_old_at = 0.0
        self.in_recv = False  # in a blocking receive that a signal must end

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
        if self.in_recv:  # Python would retry the interrupted receive (PEP 475): end it instead
            self.in_recv = False
            raise _ReceiveInterruptedError

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
        self._snapshot = snap
        self.want_publish = False
        self._fresh.set()

    @property
    def snapshot(self) -> dict:
        """The agent's state, made fresh at the reader's request (status and metrics threads)
        rather than every second: the loop publishes at its next wakeup."""
        if self._loop_thread is None or threading.get_ident() == self._loop_thread:
            return self._snapshot
        self._fresh.clear()
        self.want_publish = True
        self.poke()
        self._fresh.wait(1.0)
        return self._snapshot

    def poke(self) -> None:
        """Wake the loop from another thread (epoll loops watch the signal socket)."""
        try:
            self._sig_w.send(b"\0")
        except OSError:
            pass

    def wait(self, timeout: float) -> float:
        """Wait up to `timeout` s for events and handle them; the time after."""
        events = self.ep.poll(timeout)
        now = time.monotonic()
        self.wakes += 1
        handlers = self.handlers
        for fd, _ in events:
            h = handlers.get(fd)
            if h is not None:
                h(now)
        return now

    def run(self) -> int:
        # The wake-up descriptor first: a signal caught by our handler must always wake the poll.
        old_fd = signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        watchdog = systemd.watchdog_interval()
        never = float("inf")
        next_dog = 0.0 if watchdog else never
        # under systemd a STATUS= line now and then; the status and metrics threads ask for theirs
        next_status = 0.0 if os.environ.get("NOTIFY_SOCKET") else never
        try:
            now = time.monotonic()
            self.publish(now)
            systemd.notify("READY=1\nSTATUS=" + self.status_line())
            self._loop_thread = threading.get_ident()
            wait, core = self.wait, self.core
            while not self.stopping:
                timeout = max(0.0, min(core.next_timer(), next_status, next_dog) - now)
                try:
                    now = wait(timeout)
                except Exception as e:  # noqa: BLE001 - contained: one event lost, not the agent
                    now = time.monotonic()
                    self.internal_error("datagram handling", e)
                if self.pending_signals:
                    self._on_signal(now)
                if now >= core.next_timer():
                    try:
                        self.tick(now)
                    except Exception as e:  # noqa: BLE001
                        self.internal_error("timer", e)
                if self.forget_old_at and now >= self.forget_old_at:
                    self._forget_old_key()
                if self.want_publish:
                    self.publish(now)
                if now >= next_status:
                    next_status = now + STATUS_EVERY
                    self.publish(now)
                    systemd.notify("STATUS=" + self.status_line())
                if now >= next_dog:
                    systemd.notify("WATCHDOG=1")
                    next_dog = now + watchdog / 2
            systemd.notify("STOPPING=1")
            self.shutdown(now)
            return 0
        finally:
            self._loop_thread = None
            self._fresh.set()
            for s, h in old.items():
                signal.signal(s, h)
            signal.set_wakeup_fd(old_fd)
            self.close()

    def status_line(self) -> str:
        s = self._snapshot
        return f"{s.get('clients', 0)} client(s), {s.get('spares', 0)} spare tunnel(s)"

    def close(self) -> None:
        self.ep.close()
        self._sig_r.close()
        self._sig_w.close()


class OutsideLoop(Loop):
    def __init__(self, core: OutsideCore, sock: socket.socket, log: Log, state_path: str | None = None,
                 plain: bool = False, **kw) -> None:
        super().__init__(core, log, **kw)
        self.sock = sock
        _bufsizes(sock)
        self.ctrl_len = proto.LEGACY_LEN if core.legacy else proto.CTRL_LEN
        # WireGuard hook (issue 9): with --wireguard-key, datagrams of these two lengths (handshake
        # response / initiation, which transport data never has) go through the core, which
        # records the sessions they name; otherwise -1, which no datagram has.
        self.wg_lens = wireguard.DOWN_LENS if core.wg is not None else (-1, -1)
        lib = None if plain else fastio.load()
        self.fast = lib is not None
        if self.fast:
            sock.setblocking(True)  # the one socket is waited on in recvmmsg, not in epoll
            self.fd = sock.fileno()
            self.ring = fastio.Ring(lib, names=True)
            fastio.enable_gro(sock)
            self.gso_max = fastio.SLOT  # runs go as GSO messages up to this segment size (0: none)
            self.alen = 28 if sock.family == socket.AF_INET6 else 16  # sockaddr length on this socket
            # the lengths of datagrams the core must see (control, WireGuard handshakes)
            self.special = frozenset(x for x in (self.ctrl_len, *self.wg_lens) if x > 0)
            self.addrs: dict[bytes, tuple] = {}  # raw sockaddr -> address as recvfrom gives it
            self.flows: dict[bytes, tuple] = {}  # raw sockaddr -> _flow_entry, while routes don't change
            self.routes_seen = core.routes_changed
            self.rcvtimeo = WAIT_CAP
            fastio.set_recv_timeout(sock, WAIT_CAP)
            self.batched = False  # reading with recvmmsg (busy) rather than recvmsg_into (one per wakeup)
            self.streak = 0
            self.last_rx = 0.0
            self.wait = self._wait_fast
        else:
            sock.setblocking(False)
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
                self.core.receive(bytes(mv[:n]), addr, now)
                if self.core.out:
                    self.flush()

    # --- the fast path (fastio) ---

    def _wait_fast(self, timeout: float) -> float:
        """Blocking receives (together at most `timeout`, each at most WAIT_CAP) and what they
        bring: one datagram at a time through Python's own call when they come one by one (a
        ctypes call costs more on a cold wakeup), in a loop of its own while they only need
        forwarding; a recvmmsg batch while the socket stays busy."""
        if self.pending_signals:
            return time.monotonic()
        if timeout <= 0.0:
            flags = fastio.MSG_DONTWAIT
        else:
            flags = fastio.MSG_WAITFORONE if self.batched else 0
            t = min(timeout, WAIT_CAP)
            if t < self.rcvtimeo - 0.01 or (t == WAIT_CAP and self.rcvtimeo != WAIT_CAP):
                t = max(t, 0.001)
                fastio.set_recv_timeout(self.sock, t)
                self.rcvtimeo = t
        if self.batched:
            return self._recv_batch(flags)
        # go on receiving only while a receive that waits its longest still ends in time
        deadline = time.monotonic() + timeout - self.rcvtimeo
        recv, send, route_get = self.sock.recvmsg_into, self.sock.sendto, self.core.route.get
        bufs, mv, special, monotonic = self.bufs, self.mv, self.special, time.monotonic
        last, streak = self.last_rx, self.streak
        while True:
            try:
                self.in_recv = True
                n, anc, _, addr = recv(bufs, 64, flags)
                self.in_recv = False
            except _ReceiveInterruptedError:
                now = monotonic()
                break
            except BlockingIOError:  # SO_RCVTIMEO: the timer is due
                self.in_recv = False
                now = monotonic()
                break
            except OSError as e:
                self.in_recv = False
                self.net_error("receive", e)
                now = monotonic()
                break
            now = monotonic()
            if now - last < BUSY_GAP:
                streak += 1
                if streak >= BUSY_RUN:
                    self.batched, streak = True, 0
            else:
                streak = 0
            last = now
            f = route_get(addr)
            if f is not None and not anc and n not in special:
                try:
                    send(mv[:n], f.dst)
                except OSError as e:
                    self.net_error("send", e)
                f.pkts += 1
                f.bytes += n
            else:
                self._one_slow(n, anc, addr, f, now)
            if flags or now >= deadline or self.batched or self.pending_signals or self.want_publish:
                break
        self.last_rx, self.streak = last, streak
        return now

    def _one_slow(self, n: int, anc: list, addr: tuple, f, now: float) -> None:
        """A datagram of the single-receive path that is not plain forwarding: a GRO run (sent on
        as one GSO message), or the core's."""
        seg = int.from_bytes(anc[0][2][:4], sys.byteorder) if anc else 0
        special = self.special
        if f is not None and seg and n not in special and seg not in special and n % seg not in special:
            try:
                if seg < n:
                    gso = [(fastio.SOL_UDP, fastio.UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))]
                    self.sock.sendmsg([self.mv[:n]], gso, 0, f.dst)
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
        if self.core.out:
            self.flush()

    def _recv_batch(self, flags: int) -> float:
        """A recvmmsg batch, sent on in place: each slot to its flow's destination, runs of
        equal-size datagrams to one place as one GSO message, in as few sendmmsg as the order
        allows; what the core must see goes to it in between, in order."""
        ring = self.ring
        n = ring.recv(self.fd, flags)
        now = time.monotonic()
        if n <= 0:
            if n < 0 and n not in (-errno.EAGAIN, -errno.EINTR):
                self.net_error("receive", OSError(-n, os.strerror(-n)))
            return now
        if n == 1:
            self.streak += 1
            if self.streak >= BUSY_RUN:  # batches of one: back to Python's own receive
                self.batched, self.streak = False, 0
        else:
            self.streak = 0
        core = self.core
        if core.routes_changed != self.routes_seen:
            self.flows.clear()
            self.routes_seen = core.routes_changed
        flow_get = self.flows.get
        m32, m64, iov64 = ring.m32, ring.m64, ring.iov64
        raw = bytes(ring.names_mv[:NAME * n])
        alen, special = self.alen, self.special
        run_max = self.gso_max
        start = end = 0  # slots start..end-1 hold messages ready to go, one each
        head, head_e, head_ln, head_n = -1, None, 0, 0  # the last message, while later slots may join it
        for i in range(n):
            o = NAME * i
            e = flow_get(raw[o:o + alen])
            if e is None:
                e = self._flow_entry(raw[o:o + alen])
            ln = m32[16 * i + 14]
            if e is None or ln in special or m64[8 * i + 5]:
                if e is not None and ln not in special and self._gro_run(i, ln, e):
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
                if core.routes_changed != self.routes_seen:
                    self.flows.clear()
                    self.routes_seen = core.routes_changed
                continue
            f = e[0]
            f.pkts += 1
            f.bytes += ln
            iov64[2 * i + 1] = ln
            if (e is head_e and ln == head_ln and head_n < fastio.GSO_MAX_SEGS
                    and (head_n + 1) * ln <= fastio.GSO_MAX_BYTES):
                if head_n == 1:
                    ring.join(head, ln)
                ring.grow(head)
                head_n += 1
                continue
            if i != end:  # slots joined the message before: send up to it, go on from here
                self._send_slots(start, end)
                start = i
            m64[8 * i] = e[1]  # msg_name: the destination (recv puts the slot's own back)
            end = i + 1
            if 0 < ln <= run_max:  # (an empty datagram is a GSO segment of no size: never in a run)
                head, head_e, head_ln, head_n = i, e, ln, 1
            else:
                head_e = None
        if end > start:
            self._send_slots(start, end)
        return now

    def _flow_entry(self, raw: bytes) -> tuple | None:
        """(flow, address of the raw destination, the raw destination) for a sender with a
        route, remembered until routes change."""
        addr = self._addr_of(raw)
        f = self.core.route.get(addr)
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
        destination, unless a segment is one the core must see (then False)."""
        ring = self.ring
        seg = ring.segment(i)
        special = self.special
        if not seg or seg in special or ln % seg in special:
            return False
        ring.m64[fastio.MSG_WORDS * i] = e[1]
        ring.iov64[2 * i + 1] = ln
        if seg < ln:
            ring.join(i, seg)
        else:
            ring.m64[fastio.MSG_WORDS * i + 5] = 0
        f = e[0]
        f.pkts += -(-ln // seg)
        f.bytes += ln
        return True

    def _to_core(self, i: int, ln: int, now: float) -> None:
        ring = self.ring
        raw = ring.name(i)
        addr = self._addr_of(raw)
        for v in fastio.segments(ring.views[i], ln, ring.segment(i)):
            self.core.receive(bytes(v), addr, now)
        if self.core.out:
            self.flush()

    def _send_slots(self, start: int, end: int) -> None:
        """Send the messages of slots start..end-1 (a failed one is counted and skipped; a GSO
        message the kernel refuses goes as its datagrams, and runs stop or shrink)."""
        ring = self.ring
        for i, err in ring.send(self.fd, start, end):
            w = fastio.MSG_WORDS * i
            seg = ring.ctrl_i32[fastio.CTRL // 4 * i + 4] & 0xFFFF if ring.m64[w + 5] else 0
            if seg and err in fastio.GSO_REFUSED:
                self.gso_max = fastio.gso_limit(self.gso_max, seg, err)
                dst = self._addr_of(ctypes.string_at(ring.m64[w], self.alen))
                for v in ring.parts(i, ring.m64[w + 3], seg):
                    self._send_one(v, dst)
            else:
                self.net_error("send", OSError(err, os.strerror(err)))

    def _send_one(self, data: memoryview, dst: tuple) -> None:
        try:
            self.sock.sendto(data, dst)
        except OSError as e:
            self.net_error("send", e)

    def _addr_of(self, raw: bytes) -> tuple:
        """The address tuple recvfrom would give for the raw sockaddr `raw` (remembered)."""
        addr = self.addrs.get(raw)
        if addr is not None:
            return addr
        fam = int.from_bytes(raw[:2], sys.byteorder)
        port = int.from_bytes(raw[2:4], "big")
        if fam == socket.AF_INET6:
            host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            flow, scope = int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[24:28], sys.byteorder)
            if scope and host.lower().startswith(("fe8", "fe9", "fea", "feb", "ff02")):
                try:
                    host += "%" + socket.if_indextoname(scope)
                except OSError:
                    host += f"%{scope}"
            addr = (host, port, flow, scope)
        else:
            addr = (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        if len(self.addrs) >= ADDR_CACHE:
            self.addrs.clear()
        self.addrs[raw] = addr
        return addr

    def close(self) -> None:
        super().close()
        self.sock.close()


class Pipe:
    """The sockets of one inside tunnel, and the meters the fast path counts into."""

    __slots__ = ("tid", "rx", "tx", "tsock", "ssock", "batched", "last_wake", "streak",
                 "t_batched", "t_last_wake", "t_streak")

    def __init__(self, a: OpenTunnel, tsock: socket.socket) -> None:
        self.tid, self.rx, self.tx, self.tsock = a.tid, a.rx, a.tx, tsock
        self.ssock: socket.socket | None = None
        self.batched = False  # the service socket is read in batches (it stays busy)
        self.last_wake = -2  # the wakeup that last found the service socket readable
        self.streak = 0  # consecutive wakeups with it readable (single reads) or with batches of one
        self.t_batched, self.t_last_wake, self.t_streak = False, -2, 0  # the same for the tunnel socket


class InsideLoop(Loop):
    def __init__(self, core: InsideCore, outside: tuple[str, int], outside_addr: tuple[int, tuple],
                 service: tuple[int, tuple], log: Log, family: int = socket.AF_UNSPEC, plain: bool = False,
                 **kw) -> None:
        super().__init__(core, log, **kw)
        self.outside_name = outside
        self.outside_family, self.outside_addr = outside_addr
        self.service_family, self.service_addr = service
        self.family = family
        self.pipes: dict[int, Pipe] = {}
        self.ctrl_len = -1 if core.legacy else proto.CTRL_LEN  # a tunnel datagram this long may be control
        self.resolver = ThreadPoolExecutor(1, thread_name_prefix="resolve")
        self.resolving: Future | None = None
        lib = None if plain else fastio.load()
        self.fast = lib is not None
        if self.fast:
            self.ring = fastio.Ring(lib, names=False)
            self.batch = fastio.Batch(lib, gso=True)
            self.gro = True  # until the kernel refuses UDP_GRO
            self._on_tunnel = self._on_tunnel_fast
            self._on_service = self._on_service_fast
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
        if self.fast and self.gro:
            self.gro = fastio.enable_gro(s)  # runs from the outside arrive as one (tunnels are read in batches)
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
                self.watch(s.fileno(), partial(self._on_tunnel, p))
            elif kind is OpenService:
                if p is not None:
                    s = socket.socket(self.service_family, socket.SOCK_DGRAM)
                    p.ssock = s
                    s.setblocking(False)
                    _bufsizes(s)
                    s.connect(self.service_addr)
                    self.watch(s.fileno(), partial(self._on_service, p))
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
                self.watch(p.tsock.fileno(), partial(self._on_tunnel, p))
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

    # --- the fast path (fastio) ---

    def _on_tunnel_fast(self, p: Pipe, now: float) -> None:
        wakes = self.wakes
        if not p.t_batched:
            # one datagram (or GRO run) per wakeup through Python's own call: level-triggered
            # epoll says again if there is more, and no read fails
            try:
                n, anc, _, _ = p.tsock.recvmsg_into(self.bufs, 64)
            except BlockingIOError:
                return
            except OSError as e:  # ICMP: the outside agent's port is closed, or no route
                self.net_error("tunnel", e)
                return
            if p.t_last_wake == wakes - 1:
                p.t_streak += 1
                if p.t_streak >= 2:  # readable three wakeups in a row: busy, read it in batches
                    p.t_batched, p.t_streak = True, 0
            else:
                p.t_streak = 0
            p.t_last_wake = wakes
            seg = int.from_bytes(anc[0][2][:4], sys.byteorder) if anc else 0
            m, mv = p.rx, self.mv
            ctrl = self.ctrl_len
            if (p.ssock is not None and (n != ctrl or mv[:4] != proto.MAGIC)
                    and (not seg or (seg != ctrl and n % seg != ctrl))):
                try:
                    if seg and seg < n:
                        gso = [(fastio.SOL_UDP, fastio.UDP_SEGMENT, seg.to_bytes(2, sys.byteorder))]
                        p.ssock.sendmsg([mv[:n]], gso)
                    else:
                        p.ssock.send(mv[:n])
                except OSError as e:
                    if not seg:
                        self.net_error("service", e)
                    else:
                        for v in fastio.segments(mv, n, seg):
                            self._plain_send(p.ssock, v, "service")
                m.pkts += -(-n // seg) if seg else 1
                m.bytes += n
                return
            for v in fastio.segments(mv, n, seg):
                data = bytes(v)
                if p.ssock is None or len(data) == ctrl and data[:4] == proto.MAGIC:
                    self.core.receive(p.tid, data, now)
                else:
                    self._plain_send(p.ssock, data, "service")
                    m.pkts += 1
                    m.bytes += len(data)
                    continue
                self.apply(now)
                if p.tid not in self.pipes:
                    return
            return
        ring = self.ring
        n = ring.recv(p.tsock.fileno(), fastio.MSG_DONTWAIT)
        if n <= 0:
            if n < 0 and n != -errno.EAGAIN:  # ICMP: the outside agent's port is closed, or no route
                self.net_error("tunnel", OSError(-n, os.strerror(-n)))
            return
        if n == 1:
            p.t_streak += 1
            if p.t_streak >= 4:  # batches of one: back to single reads
                p.t_batched, p.t_streak = False, 0
        else:
            p.t_streak = 0
        m32, m64, ci32, views = ring.m32, ring.m64, ring.ctrl_i32, ring.views
        m, batch, add = p.rx, self.batch, self.batch.add
        ctrl = self.ctrl_len
        magic = proto.MAGIC
        pkts = nbytes = 0
        for i in range(n):
            ln = m32[16 * i + 14]
            seg = ci32[8 * i + 4] if m64[8 * i + 5] else 0
            if (p.ssock is not None
                    and (ln != ctrl or views[i][:4] != magic)
                    and (not seg or (seg != ctrl and ln % seg != ctrl))):
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
                if p.ssock is None or len(v) == ctrl and v[:4] == magic:
                    self.core.receive(p.tid, bytes(v), now)
                else:
                    try:
                        p.ssock.send(v)
                    except OSError as e:
                        self.net_error("service", e)
                    m.pkts += 1
                    m.bytes += len(v)
                    continue
                self.apply(now)
                if p.tid not in self.pipes:
                    batch.clear()
                    return
        if batch.nmsg:
            self._send_service(p)
        m.pkts += pkts
        m.bytes += nbytes

    def _send_service(self, p: Pipe) -> None:
        self.batch.send(p.ssock.fileno(), lambda e: self.net_error("service", e),
                        lambda v, dst: self._plain_send(p.ssock, v, "service"))

    def _plain_send(self, s: socket.socket, v: memoryview, where: str) -> None:
        try:
            s.send(v)
        except OSError as e:
            self.net_error(where, e)

    def _on_service_fast(self, p: Pipe, now: float) -> None:
        wakes = self.wakes
        if not p.batched:
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
            if p.last_wake == wakes - 1:
                p.streak += 1
                if p.streak >= 2:  # readable three wakeups in a row: busy, read it in batches
                    p.batched = True
                    p.streak = 0
            else:
                p.streak = 0
            p.last_wake = wakes
            return
        ring = self.ring
        n = ring.recv(p.ssock.fileno(), fastio.MSG_DONTWAIT)
        if n <= 0:
            if n < 0 and n != -errno.EAGAIN:
                self.net_error("service", OSError(-n, os.strerror(-n)))
            return
        if n == 1:
            p.streak += 1
            if p.streak >= 4:  # batches of one: back to single reads
                p.batched = False
                p.streak = 0
        else:
            p.streak = 0
        batch = self.batch
        nbytes, failed = ring.send_runs(p.tsock.fileno(), n, batch.gso_max)
        for i, count, seg, err in failed:
            if count > 1 and err in fastio.GSO_REFUSED:
                batch.gso_max = fastio.gso_limit(batch.gso_max, seg, err)
                for v in ring.parts(i, count, 0):
                    self._plain_send(p.tsock, v, "tunnel")
            else:
                self.net_error("tunnel", OSError(err, os.strerror(err)))
        m = p.tx
        m.pkts += n
        m.bytes += nbytes

    def close(self) -> None:
        for p in list(self.pipes.values()):
            self._close_pipe(p)
        self.resolver.shutdown(wait=False, cancel_futures=True)
        super().close()
