"""Benchmark: CPU time per forwarded datagram of each agent, and round trips per
second through the whole path (client -> outside -> inside -> echo and back), on
loopback, at 1, 100 and 1000 clients. Prints a table; asserts nothing.

    make bench            (or: python tests/bench.py [SECONDS])
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from agents import Agent, converse, free_port  # noqa: E402

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0)); print(s.getsockname()[1], flush=True)
buf = bytearray(65536); mv = memoryview(buf)
while True:
    n, a = s.recvfrom_into(buf); s.sendto(mv[:n], a)
"""
IN_FLIGHT = 64  # datagrams kept in flight in all, spread over the clients


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, n: int, seconds: float, size: int = 64) -> int:
    """Keep IN_FLIGHT datagrams going over n clients for `seconds`; the number of round trips."""
    socks = []
    ep = select.epoll()
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
        ep.register(s.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): s for s in socks}
    payload = bytes(size)
    per = max(1, IN_FLIGHT // n)
    for s in socks:
        for _ in range(per):
            s.send(payload)
    done = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for fd, _ in ep.poll(0.2):
            s = by_fd[fd]
            while True:
                try:
                    s.recv(65536)
                except BlockingIOError:
                    break
                done += 1
                s.send(payload)
    for s in socks:
        s.close()
    ep.close()
    return done


def run(n: int, seconds: float, tmp) -> dict:
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    sport = int(echo.stdout.readline())
    port = free_port()
    common = ["-t", "25", "--max-clients", "2000", "-q"]
    out = Agent("outside", ["-l", f"127.0.0.1:{port}", *common], tmp)
    ins = Agent("inside", ["-s", f"127.0.0.1:{sport}", "-o", f"127.0.0.1:{port}", "--spares", "16", *common], tmp)
    try:
        out.wait_status(lambda s: s["spares"] >= 1)
        r = converse(("127.0.0.1", port), n, 1, timeout=120, retry=0.5)  # every client gets its tunnel
        assert r["done"] == n, r
        c0 = (cpu_seconds(out.proc.pid), cpu_seconds(ins.proc.pid))
        t0 = time.monotonic()
        trips = load(port, n, seconds)
        wall = time.monotonic() - t0
        c1 = (cpu_seconds(out.proc.pid), cpu_seconds(ins.proc.pid))
        forwarded = 2 * trips  # each agent forwards every round trip twice: there and back
        return {"clients": n, "trips_s": trips / wall,
                "out_us": (c1[0] - c0[0]) / forwarded * 1e6, "in_us": (c1[1] - c0[1]) / forwarded * 1e6}
    finally:
        out.stop()
        ins.stop()
        echo.kill()
        echo.wait()


def main() -> None:
    import pathlib
    import tempfile
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    print(f"udp-tunnel benchmark: loopback, 64-byte datagrams, {IN_FLIGHT} in flight, {seconds:g} s per row;")
    print("CPU time of each agent per datagram it forwarded (both directions counted). The load")
    print("generator and echo service share the same cores: read the figures as ratios.\n")
    print(f"{'clients':>8} {'round trips/s':>14} {'outside us/dgram':>17} {'inside us/dgram':>16}")
    with tempfile.TemporaryDirectory() as d:
        for n in (1, 100, 1000):
            r = run(n, seconds, pathlib.Path(d))
            print(f"{r['clients']:>8} {r['trips_s']:>14.0f} {r['out_us']:>17.2f} {r['in_us']:>16.2f}", flush=True)
    print("\nfor reference, ../shared/DESIGN.md: the C tool needs 2.3 / 2.7 us (1 client) and "
          "4.1 / 11.5 us (1000 clients), outside / inside")


if __name__ == "__main__":
    main()
