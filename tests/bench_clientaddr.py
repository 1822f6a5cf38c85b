"""What --client-address costs, measured in a network namespace of its own (root only).

    sudo python3 tests/bench_clientaddr.py [N]

Prints, per operation, the median of 5 runs of N (default 2000):
- opening a service socket per client: plain (socket + connect, as `off` does) against
  transparent (socket + IP_TRANSPARENT + SO_REUSEADDR + bind to the client + connect), and closing;
- the policy routing at start and stop: rtnetlink (Routing.install/remove) against the same
  through the `ip` command;
- a round trip to a local UDP echo service from a plain socket and from a transparent
  one (the answer goes through the policy rule and the local table);
- a datagram sent with a PROXY v2 header (sendmsg of header + payload) against a plain send.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from udp_tunnel.io import transparent  # noqa: E402
from udp_tunnel.io.proxied import EVERY, ProxyFraming  # noqa: E402

SERVICE = ("127.0.0.1", 7000)
TABLE = 21844


def median_us(fn, n: int, runs: int = 5) -> float:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(n)
        out.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(out)


def client_ip(i: int) -> str:
    """The i-th address of 100.64.0.0/10 (bound to, never sent to)."""
    return str(ipaddress.IPv4Address(0x64400001 + i))


def open_plain(n: int) -> None:
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        s.connect(SERVICE)
        socks.append(s)
    for s in socks:
        s.close()


def open_transparent(n: int) -> None:
    socks = []
    for i in range(n):
        socks.append(transparent.open_socket((client_ip(i // 50000), 1024 + i % 50000), SERVICE).sock)
    for s in socks:
        s.close()


def same_port(n: int) -> list[float]:
    """Clients on one port from n addresses (a game's fixed client port): us per open for
    each tenth of n, as the sockets bound to that port add up."""
    socks, out = [], []
    step = max(1, n // 10)
    for k in range(0, n, step):
        t0 = time.perf_counter()
        for i in range(k, min(n, k + step)):
            socks.append(transparent.open_socket((client_ip(i), 27005), SERVICE).sock)
        out.append((time.perf_counter() - t0) / step * 1e6)
    for s in socks:
        s.close()
    return out


def routing_netlink(n: int) -> None:
    for _ in range(n):
        r = transparent.Routing([SERVICE], table=TABLE)
        r.install()
        r.remove()
        r.close()


def routing_ip(n: int) -> None:
    r = transparent.Routing([SERVICE], table=TABLE)
    add = r.commands()
    delete = [c.replace(" add ", " del ") for c in add]
    for _ in range(n):
        for c in add + delete:
            subprocess.run(c.split(), check=True)


def echo_server() -> int:
    pid = os.fork()
    if pid == 0:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(SERVICE)
        while True:
            data, addr = s.recvfrom(2048)
            s.sendto(data, addr)
    time.sleep(0.3)
    return pid


def round_trips(s: socket.socket):
    s.setblocking(True)
    payload = bytes(100)

    def run(n: int) -> None:
        for _ in range(n):
            s.send(payload)
            s.recv(2048)
    return run


def sends(s: socket.socket, framing: ProxyFraming | None):
    payload = bytes(1200)

    def run(n: int) -> None:
        if framing is None:
            for _ in range(n):
                s.send(payload)
        else:
            for _ in range(n):
                s.sendmsg(framing.frame(payload))
    return run


def inner(n: int) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    print(f"per operation, median of 5 runs of {n}:")
    print(f"  open+close a plain service socket        {median_us(open_plain, n):8.1f} us")
    print(f"  open+close a transparent service socket  {median_us(open_transparent, n):8.1f} us")
    tenths = same_port(n * 5)
    print(f"  open a transparent socket, {n * 5} clients on one port: {tenths[0]:.1f} us for the first tenth, "
          f"{tenths[-1]:.1f} us for the last")
    k = max(1, n // 100)
    print(f"  policy routing install+remove, netlink   {median_us(routing_netlink, k):8.1f} us")
    print(f"  policy routing install+remove, ip (x4)   {median_us(routing_ip, k):8.1f} us")
    pid = echo_server()
    try:
        r = transparent.Routing([SERVICE], table=TABLE)
        r.install()
        plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        plain.connect(SERVICE)
        tr = transparent.open_socket(("198.51.100.7", 40000), SERVICE).sock
        a, b = [], []
        for _ in range(7):  # alternated: the machine's load changes between runs
            a.append(median_us(round_trips(plain), n, runs=1))
            b.append(median_us(round_trips(tr), n, runs=1))
        print(f"  round trip, plain socket                 {statistics.median(a):8.1f} us  (7 alternated runs)")
        print(f"  round trip, transparent socket           {statistics.median(b):8.1f} us")
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.bind(("127.0.0.1", 7009))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # full: the kernel drops, sends don't block
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        out.connect(("127.0.0.1", 7009))
        f = ProxyFraming(EVERY, ("198.51.100.7", 40000), ("127.0.0.1", 7009))
        print(f"  send 1200 bytes                          {median_us(sends(out, None), n * 10):8.2f} us")
        print(f"  send 1200 bytes after a PROXY v2 header  {median_us(sends(out, f), n * 10):8.2f} us")
        r.remove()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2000
    if "--inner" in sys.argv:
        inner(n)
        return 0
    if os.geteuid() != 0:
        print("bench_clientaddr.py needs root (a network namespace, IP_TRANSPARENT)", file=sys.stderr)
        return 1
    ns = f"utbench{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), str(n),
                               "--inner"]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns])


if __name__ == "__main__":
    sys.exit(main())
