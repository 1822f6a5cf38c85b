"""The event loop both agents share: epoll, signals, the core's timer, the
snapshots that `status` and the metrics read, systemd notifications.

The roles' loops (outside.py, inside.py) add their sockets and data paths; each
has a plain path (epoll and Python's socket calls, any system) and a fast path
(fastio: recvmmsg/sendmmsg, GRO/GSO), chosen at start by class.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable

from udp_tunnel.core import counters
from udp_tunnel.io.datapath import Datapath, InsideKernel, OutsideKernel, choose
from udp_tunnel.ops import systemd
from udp_tunnel.ops.log import Log

BATCH = 64  # datagrams read from one socket before the others get a turn
BUFSIZE = 65536
SOCKBUF = 4 << 20
STATUS_EVERY = 5.0  # seconds between systemd STATUS= lines


def bufsizes(s: socket.socket) -> None:
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
        except OSError:
            pass


class ReceiveInterruptedError(Exception):
    """Raised by the signal handler to end a blocking receive at once."""


class Loop:
    """What both agents share: epoll, signals, the timer, status publishing."""

    kernel: OutsideKernel | InsideKernel | None = None  # the kernel path's glue, when a role's loop runs it

    def __init__(self, core, log: Log, datapath: Datapath | None = None) -> None:
        self.core = core
        self.log = log
        self.datapath = datapath or choose("user")
        self.on_reload: Callable[[float], None] | None = None  # SIGHUP: the agent's configuration again
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
        self.in_recv = False  # in a blocking receive that a signal must end

    def watch(self, fd: int, handler: Callable[[float], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, select.EPOLLIN)

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def internal_error(self, where: str, e: Exception) -> None:
        """A bug met a datagram or event: count it, log it (the traceback once), serve everyone else."""
        name = counters.INTERNAL + type(e).__name__
        first = self.errors[name] == 0
        self.errors[name] += 1
        text = "".join(traceback.format_exception(e)).rstrip() if first else str(e)
        self.log.limited(f"{where}-{name}", f"internal error in {where} (going on): {text}", prio=3)

    def net_error(self, site: str, e: OSError) -> None:
        """A network error at `site` (one of counters.ERROR_SITES): counted, logged at a limited rate."""
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        key = counters.error(site, name)
        self.errors[key] += 1
        self.log.limited(key, f"{counters.ERROR_SITES[site][1]}: {e.strerror or e} ({name}); going on")

    def net_errno(self, site: str, err: int) -> None:
        self.net_error(site, OSError(err, os.strerror(err)))

    # --- signals ---

    def _handle_signal(self, signum, frame) -> None:
        self.pending_signals.append(signum)
        if self.in_recv:  # Python would retry the interrupted receive (PEP 475): end it instead
            self.in_recv = False
            raise ReceiveInterruptedError

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
        if self.on_reload is None:
            self.log.info("SIGHUP: nothing to read again")
            return
        now = time.monotonic()
        self.on_reload(now)
        self.after_core(now)

    # --- running ---

    def kernel_sync(self, now: float, refresh: bool = True) -> None:
        """The kernel path's counts into the core's meters (before the core's timer or a status
        snapshot looks at them), and with `refresh` now and then a look at new interfaces, routes
        and NAT rules. A bpf() call that fails here is counted and logged, and the timer or the
        snapshot goes on all the same."""
        try:
            self.kernel.count()
            if refresh:
                self.datapath.refresh(now, self.log)
        except OSError as e:
            self.internal_error("kernel path", e)

    def tick(self, now: float) -> None:
        """Called when the core's timer is due."""
        if self.kernel is not None:
            self.kernel_sync(now)
        self.core.on_timer(now)
        self.after_core(now)

    def after_core(self, now: float) -> None:
        """Carry out what the core asked for (its output), after it was called."""

    def shutdown(self, now: float) -> None:
        """Called once when the agent stops, before the sockets close."""

    def publish(self, now: float) -> None:
        if self.kernel is not None:
            self.kernel_sync(now, refresh=False)
        self.info["datapath"] = self.datapath.snapshot()
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

    def run(self) -> int:  # long: the main loop reads best in one piece
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
            self.after_core(now)  # what the core asked for before the loop ran
            self._publish(now)
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
                if self.want_publish or now >= next_status:
                    self._publish(now)
                if now >= next_status:
                    next_status = now + STATUS_EVERY
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

    def _publish(self, now: float) -> None:
        try:
            self.publish(now)
        except Exception as e:  # noqa: BLE001 - contained: one status answer lost, not the agent
            self.internal_error("status", e)
            self.want_publish = False  # the readers get the snapshot before
            self._fresh.set()

    def status_line(self) -> str:
        s = self._snapshot
        return f"{s.get('clients', 0)} client(s), {s.get('spares', 0)} spare tunnel(s)"

    def close(self) -> None:
        self.datapath.close()
        self.ep.close()
        self._sig_r.close()
        self._sig_w.close()
