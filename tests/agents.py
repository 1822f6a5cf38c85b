"""Helpers for end-to-end tests: real agents in subprocesses, an echo
service, many clients, and a user-space NAT that records what crosses it."""

from __future__ import annotations

import atexit
import ctypes
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")


_KERNEL_WHY_NOT: list[str | None] = []


def kernel_why_not() -> str | None:
    """Why the agents cannot run the kernel data path here (checked once, in the calling thread's
    network namespace), or None."""
    if not _KERNEL_WHY_NOT:
        why = None
        if os.geteuid() != 0:
            why = "needs root (a network namespace of its own, bpf)"
        elif shutil.which("ip") is None:
            why = "needs iproute2 (ip) for a network namespace"
        else:
            from udp_tunnel.io.kernel import available
            why = available()
        _KERNEL_WHY_NOT.append(why)
    return _KERNEL_WHY_NOT[0]


def free_port(family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "udp_tunnel", *args]


# Agents started without --control put their socket in $XDG_RUNTIME_DIR/udp-tunnel: here, not /run.
RUNTIME = tempfile.mkdtemp(prefix="udpt-run-")
atexit.register(shutil.rmtree, RUNTIME, True)


def _no_capabilities() -> None:
    """In a child about to exec: root without any capability (none kept across the exec either)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    header = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0))  # _LINUX_CAPABILITY_VERSION_3
    if libc.capset(header, ctypes.create_string_buffer(24)) != 0:
        os._exit(99)


def without_capabilities() -> Callable[[], None] | None:
    """A preexec_fn that runs a root child without any capability (None when not root: it has none)."""
    return _no_capabilities if os.geteuid() == 0 else None


def env(**extra: str) -> dict:
    e = dict(os.environ, PYTHONPATH=SRC, XDG_RUNTIME_DIR=RUNTIME)
    e.pop("NOTIFY_SOCKET", None)
    e.update(extra)
    return e


class Agent:
    """A running udp-tunnel process whose log goes to a file."""

    def __init__(self, name: str, args: list[str], tmp, key: str | None = "test-key", max_fds: int = 0,
                 control: str | None = None, preexec=None, **envextra: str) -> None:
        """control: the control socket a configuration file names (then not on the command line);
        preexec: called in the child before the agent runs (after the descriptor limit)."""
        self.name = name
        self.max_fds = max_fds
        self.preexec = preexec
        self.control = control or str(tmp / f"{name}.sock")
        self.logpath = tmp / f"{name}.log"
        extra = dict(envextra)
        if key is not None:
            extra["UDP_TUNNEL_KEY"] = key
        self.args = args if control else args + ["--control", self.control]
        if "--config" not in args and "--datapath" not in args:
            # user space unless the test asks: as root `auto` would attach the kernel path to every interface
            # of this host (the kernel path's tests run in network namespaces of their own: conftest.datapath)
            self.args = self.args + ["--datapath", "user"]
        self.env = env(**extra)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.log_file = open(self.logpath, "a")
        def limit() -> None:
            if self.max_fds:
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_fds, self.max_fds))
            if self.preexec:
                self.preexec()
        self.proc = subprocess.Popen(command(*self.args), env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT, preexec_fn=limit)
        self.wait_status(lambda s: True)

    def status(self) -> dict:
        from udp_tunnel.ops.status import query
        return query(self.control, timeout=2.0)

    def wait_status(self, cond, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        last_err = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                s = self.status()
                if s and cond(s):
                    return s
            except (OSError, ValueError) as e:
                last_err = e
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: condition not met in {timeout} s ({last_err}):\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.logpath.read_text()
        except OSError:
            return ""


class EchoService:
    """A UDP service that sends every datagram back and records who sent what."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.addr = hostport(host, self.sock.getsockname()[1])
        self.seen: list[tuple[tuple, bytes]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append((addr, data))
            self.sock.sendto(data, addr)

    def sources_by_client(self) -> dict[bytes, set]:
        """client id (first word of the payload) -> service-side source addresses it came from."""
        out: dict[bytes, set] = {}
        for addr, data in self.seen:
            out.setdefault(data.split(b" ", 1)[0], set()).add(addr)
        return out

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.sock.close()


def converse(target: tuple[str, int], n_clients: int, per_client: int, timeout: float = 60.0,
             retry: float = 0.3, size: int = 64) -> dict:
    """n_clients sockets, each sends per_client datagrams in turn and waits for
    each echo (resending after `retry`). Returns counts; every reply is checked
    byte for byte against what that very client sent."""
    fam = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    sel = selectors.DefaultSelector()
    state = {}
    for i in range(n_clients):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.connect(target)
        s.setblocking(False)
        state[s] = {"id": i, "seq": 0, "sent_at": 0.0, "msg": b"", "sent": set()}
        sel.register(s, selectors.EVENT_READ)
    wrong = dups = resent = done = 0
    deadline = time.monotonic() + timeout

    def message(st) -> bytes:
        head = b"c%04d seq%04d " % (st["id"], st["seq"])
        return head + bytes((st["id"] + st["seq"] + k) % 251 for k in range(size - len(head)))

    try:
        for s, st in state.items():
            st["msg"] = message(st)
            st["sent"].add(st["msg"])
            s.send(st["msg"])
            st["sent_at"] = time.monotonic()
        while done < n_clients and time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                s, st = key.fileobj, state[key.fileobj]
                try:
                    data = s.recv(65536)
                except OSError:
                    continue
                if data != st["msg"]:
                    if data in st["sent"]:
                        dups += 1  # an echo of a datagram this client sent again
                    else:
                        wrong += 1  # someone else's datagram
                    continue
                st["seq"] += 1
                if st["seq"] == per_client:
                    done += 1
                    sel.unregister(s)
                    continue
                st["msg"] = message(st)
                st["sent"].add(st["msg"])
                s.send(st["msg"])
                st["sent_at"] = time.monotonic()
            now = time.monotonic()
            for s, st in state.items():
                if st["seq"] < per_client and now - st["sent_at"] > retry:
                    s.send(st["msg"])
                    st["sent_at"] = now
                    resent += 1
    finally:
        for s in state:
            s.close()
        sel.close()
    return {"done": done, "wrong": wrong, "dups": dups, "resent": resent,
            "complete": sum(min(st["seq"], per_client) for st in state.values())}


def burst(target: tuple[str, int], n: int, wait: float = 3.0) -> dict:
    """n new clients at once, each sending ONE datagram (never resent) and waiting up to
    `wait` s for its echo: how many were answered, byte-exact, and how fast."""
    fam = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.connect(target)
            s.setblocking(False)
            socks.append(s)
        sel = selectors.DefaultSelector()
        msgs, sent, took = {}, {}, []
        for i, s in enumerate(socks):
            msgs[s] = b"burst %04d " % i + bytes((i + k) % 251 for k in range(48))
            sel.register(s, selectors.EVENT_READ)
        for s in socks:
            s.send(msgs[s])
            sent[s] = time.monotonic()
        answered = wrong = 0
        deadline = time.monotonic() + wait
        while answered < n and time.monotonic() < deadline:
            for key, _ in sel.select(0.05):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except OSError:
                    continue
                if data == msgs[s]:
                    answered += 1
                    took.append(time.monotonic() - sent[s])
                    sel.unregister(s)
                else:
                    wrong += 1
        sel.close()
    finally:
        for s in socks:
            s.close()
    took.sort()
    return {"clients": n, "answered": answered, "wrong": wrong,
            "p50_ms": round(took[len(took) // 2] * 1000, 1) if took else None,
            "max_ms": round(took[-1] * 1000, 1) if took else None}


def flow(target: tuple[str, int], keep_going, on_echo, period: float) -> None:
    """One client that sends a numbered datagram every `period` seconds while
    keep_going() holds, calling on_echo() for each one that comes back intact."""
    fam = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.connect(target)
        s.settimeout(period)
        i = 0
        while keep_going():
            i += 1
            msg = b"flow %d" % i
            s.send(msg)
            t0 = time.monotonic()
            while time.monotonic() - t0 < period:
                try:
                    if s.recv(2048) == msg:
                        on_echo()
                        time.sleep(max(0.0, period - (time.monotonic() - t0)))
                        break
                except (TimeoutError, ConnectionRefusedError):
                    pass


class UdpNat:
    """A user-space NAT between the inside agent and the outside agent: one
    upstream socket (one public port) per inside socket. Records every
    datagram going up, and can forget mappings (NAT rebinding)."""

    def __init__(self, outside: tuple[str, int]) -> None:
        self.outside = outside
        fam = socket.AF_INET6 if ":" in outside[0] else socket.AF_INET
        self.fam = fam
        self.front = socket.socket(fam, socket.SOCK_DGRAM)
        self.front.bind((outside[0], 0))
        self.port = self.front.getsockname()[1]
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.front, selectors.EVENT_READ, None)
        self.up: dict[tuple, socket.socket] = {}
        self.captured: list[bytes] = []
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def forget_all(self) -> None:
        with self.lock:
            for s in self.up.values():
                self.sel.unregister(s)
                s.close()
            self.up.clear()

    def _run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.1):
                try:
                    if key.data is None:
                        data, src = self.front.recvfrom(65536)
                        with self.lock:
                            s = self.up.get(src)
                            if s is None:
                                s = self.up[src] = socket.socket(self.fam, socket.SOCK_DGRAM)
                                s.connect(self.outside)
                                self.sel.register(s, selectors.EVENT_READ, src)
                        self.captured.append(data)
                        s.send(data)
                    else:
                        data = key.fileobj.recv(65536)
                        self.front.sendto(data, key.data)
                except (OSError, KeyError, ValueError):
                    continue

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.forget_all()
        self.front.close()
