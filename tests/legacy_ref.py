"""The C udp-tunnel 1.3, as ../shared/PROTOCOL.md section 1 describes it,
rewritten independently of our package so interop tests have a peer:
40-byte keepalives (u64 LE nonce = wall-clock ms, SHA-256(password || nonce)),
one global nonce counter, no replies, spares, linked-list-like tables."""

from __future__ import annotations

import hashlib
import selectors
import socket
import struct
import threading
import time


def keepalive(password: bytes) -> bytes:
    n = struct.pack("<Q", int(time.time() * 1000))
    return n + hashlib.sha256(password + n).digest()


class LegacyOutside(threading.Thread):
    def __init__(self, port: int, password: bytes, keepalive_s: float) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.password, self.expiry = password, keepalive_s + 10
        self.last_nonce = 0
        self.tunnels: dict[tuple, dict] = {}  # address -> {"last": t, "client": addr|None}
        self.clients: dict[tuple, tuple] = {}  # client -> tunnel address
        self.stopping = False
        self.start()

    def run(self) -> None:
        next_expiry = time.monotonic() + 1
        while not self.stopping:
            try:
                data, src = self.sock.recvfrom(65536)
            except TimeoutError:
                data = None
            now = time.monotonic()
            if now >= next_expiry:
                next_expiry = now + 1
                for a, t in list(self.tunnels.items()):
                    if now - t["last"] > self.expiry:
                        del self.tunnels[a]
                        if t["client"]:
                            self.clients.pop(t["client"], None)
            if data is None:
                continue
            if len(data) == 40 and hashlib.sha256(self.password + data[:8]).digest() == data[8:]:
                nonce = struct.unpack("<Q", data[:8])[0]
                if nonce > self.last_nonce:
                    self.last_nonce = nonce
                    self.tunnels.setdefault(src, {"client": None})["last"] = now
                    continue
            if src in self.tunnels:
                if self.tunnels[src]["client"]:
                    self.sock.sendto(data, self.tunnels[src]["client"])
                continue
            tun = self.clients.get(src)
            if tun is None:
                spare = next((a for a, t in self.tunnels.items() if t["client"] is None), None)
                if spare is None:
                    continue
                self.tunnels[spare]["client"] = src
                self.clients[src] = tun = spare
            self.sock.sendto(data, tun)

    def close(self) -> None:
        self.stopping = True
        self.join(2)
        self.sock.close()


class LegacyInside(threading.Thread):
    def __init__(self, outside: tuple, service: tuple, password: bytes, keepalive_s: float) -> None:
        super().__init__(daemon=True)
        self.outside, self.service, self.password, self.interval = outside, service, password, keepalive_s
        self.sel = selectors.DefaultSelector()
        self.pairs: dict[socket.socket, dict] = {}
        self.stopping = False
        self._spare()
        self.start()

    def _spare(self) -> None:
        t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t.sendto(keepalive(self.password), self.outside)
        self.pairs[t] = {"svc": None, "next": time.monotonic() + self.interval}
        self.sel.register(t, selectors.EVENT_READ, ("tunnel", t))

    def run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.1):
                kind, t = key.data
                if kind == "tunnel":
                    data = t.recv(65536)
                    p = self.pairs[t]
                    if p["svc"] is None:
                        p["svc"] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        p["svc"].connect(self.service)
                        self.sel.register(p["svc"], selectors.EVENT_READ, ("service", t))
                        self._spare()
                    p["svc"].send(data)
                else:
                    t.sendto(self.pairs[t]["svc"].recv(65536), self.outside)
            now = time.monotonic()
            for t, p in list(self.pairs.items()):
                if now >= p["next"]:  # at most one keepalive per loop iteration
                    t.sendto(keepalive(self.password), self.outside)
                    p["next"] = now + self.interval
                    break

    def close(self) -> None:
        self.stopping = True
        self.join(2)
        for t, p in self.pairs.items():
            t.close()
            if p["svc"]:
                p["svc"].close()
