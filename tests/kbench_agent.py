"""A stand-in pair of agents for measuring the kernel data path alone, with the
perf harness (../shared/perf/bench.py), until the real agents use it.

It speaks no tunnel protocol: the inside opens --spares tunnel sockets
connected to the outside and sends b"REG" from each; the outside hands one
to every new client. The first datagram of a client goes through both
stand-ins in user space, as with the real agents; each then installs its
flows in the kernel (KernelPath.outside_bind / inside_pipe), and everything
after that is relayed by the kernel. Run inside a network namespace of its
own (tests/kbench.py does), since it attaches to lo and may turn on lo's
settings.

    kbench_agent.py outside --listen 127.0.0.1:PORT
    kbench_agent.py inside --outside 127.0.0.1:PORT --service 127.0.0.1:PORT --spares K
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from udp_tunnel.io.kernel import KernelPath  # noqa: E402

REG = b"REG"
SO_RCVBUFFORCE = 33


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def outside(listen: tuple[str, int]) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)  # a thousand registrations at once
    s.bind(listen)
    kp = KernelPath.open(ifaces=["lo"])
    spares: list[tuple] = []
    peer: dict[tuple, tuple] = {}  # client -> tunnel and tunnel -> client
    tunnels: set[tuple] = set()
    while True:
        data, src = s.recvfrom(65536)
        if data == REG:
            tunnels.add(src)
            spares.append(src)
            continue
        dst = peer.get(src)
        if dst is None and src not in tunnels and spares:
            dst = spares.pop(0)
            peer[src], peer[dst] = dst, src
            kp.outside_bind(listen, src, dst)
        if dst is not None:
            s.sendto(data, dst)


def inside(out: tuple[str, int], service: tuple[str, int], spares: int) -> None:
    kp = KernelPath.open(ifaces=["lo"])
    ep = select.epoll()
    tunnels: dict[int, socket.socket] = {}
    services: dict[int, tuple[socket.socket, socket.socket]] = {}  # service fd -> (service sock, tunnel sock)
    piped: dict[int, socket.socket] = {}
    for _ in range(spares):
        t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        t.connect(out)
        t.setblocking(False)
        tunnels[t.fileno()] = t
        ep.register(t.fileno(), select.EPOLLIN)
        t.send(REG)
        time.sleep(0.0002)
    while True:
        for fd, _ in ep.poll():
            if fd in tunnels:
                t = tunnels[fd]
                try:
                    data = t.recv(65536)
                except BlockingIOError:
                    continue
                sv = piped.get(fd)
                if sv is None:
                    sv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sv.connect(service)
                    sv.setblocking(False)
                    piped[fd] = sv
                    services[sv.fileno()] = (sv, t)
                    ep.register(sv.fileno(), select.EPOLLIN)
                    kp.inside_pipe(t.getsockname(), out, sv.getsockname(), service)
                sv.send(data)
            elif fd in services:
                sv, t = services[fd]
                try:
                    t.send(sv.recv(65536))
                except BlockingIOError:
                    continue


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("outside", "inside"))
    ap.add_argument("--listen")
    ap.add_argument("--outside")
    ap.add_argument("--service")
    ap.add_argument("--spares", type=int, default=1)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if a.role == "outside":
        outside(hostport(a.listen))
    else:
        inside(hostport(a.outside), hostport(a.service), a.spares)


if __name__ == "__main__":
    main()
