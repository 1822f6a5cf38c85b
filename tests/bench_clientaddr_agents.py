"""What a client costs with each --client-address mode, through both real agents (root only).

    sudo python3 tests/bench_clientaddr_agents.py [NEW] [TRIPS] [ROUNDS]

Three network namespaces of its own, no NAT (only documentation addresses; deleted at the end):

    client (203.0.113.2) ── vps (203.0.113.1 | 192.0.2.1: the outside agent) ── home (192.0.2.2)

At home an echo on 127.0.0.1:7000 (it takes a PROXY v2 header off a datagram and echoes the
rest) and the inside agent with -s 127.0.0.1:7000 and each mode in turn: off, transparent,
proxy-v2, proxy-v2-first. For each mode, in each of ROUNDS rounds (modes alternated, as the
machine's load changes between runs), a fresh pair of agents, then:

- NEW new clients (default 1000), one after the other, each one datagram and its answer:
  the time to the first answer (through the ANNOUNCE and the new service socket), and the
  inside agent's CPU time (utime + stime, /proc) and resident memory per client;
- one client's TRIPS round trips of 100 bytes (default 20000): the round-trip time and the
  inside agent's CPU time per round trip (one datagram each way).

Prints the median of the rounds for each figure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from flood import cpu_seconds, rss_kb  # (tests/: this script's folder)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("off", "transparent", "proxy-v2", "proxy-v2-first")
PORT, SERVICE = 9999, ("127.0.0.1", 7000)


# --- programs run inside the namespaces ---

def echo() -> None:
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from udp_tunnel.wire import proxy
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(SERVICE)
    while True:
        data, addr = s.recvfrom(65536)
        if proxy.is_header(data):
            data = bytes(proxy.split(data)[1])
        s.sendto(data, addr)


def clients(host: str, new: str, trips: str) -> None:
    """NEW new clients one after the other, then TRIPS round trips of one more; JSON on stdout."""
    firsts, lost = [], 0
    socks = []
    for i in range(int(new)):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((host, PORT))
        s.settimeout(2.0)
        msg = b"new client %d" % i
        t0 = time.perf_counter()
        s.send(msg)
        try:
            ok = s.recv(2048) == msg
        except TimeoutError:
            ok = False
        if ok:
            firsts.append(time.perf_counter() - t0)
        else:
            lost += 1
        socks.append(s)
    print(json.dumps({"phase": "new", "firsts": firsts, "lost": lost}), flush=True)
    sys.stdin.readline()  # the driver has read the agent's counters
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((host, PORT))
    s.settimeout(2.0)
    payload = bytes(100)
    s.send(payload)
    s.recv(2048)  # the client is set up: what follows is the steady state
    print(json.dumps({"phase": "ready"}), flush=True)
    sys.stdin.readline()
    rtts, lost = [], 0
    for _ in range(int(trips)):
        t0 = time.perf_counter()
        s.send(payload)
        try:
            s.recv(2048)
            rtts.append(time.perf_counter() - t0)
        except TimeoutError:
            lost += 1
    print(json.dumps({"phase": "trips", "median_us": statistics.median(rtts) * 1e6, "lost": lost}), flush=True)


# --- the driver ---

class Bench:
    def __init__(self, tmp: str) -> None:
        self.prefix = f"utb{os.getpid() % 100000}"
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        with open(os.path.join(tmp, "key"), "w") as f:
            f.write("bench key, long and random in real life\n")

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def sh(self, name: str, cmd: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns(name), "sh", "-c", cmd], check=True)

    def build(self) -> None:
        for name in ("client", "vps", "home"):
            subprocess.run(["ip", "netns", "add", self.ns(name)], check=True)
            self.namespaces.append(self.ns(name))
            self.sh(name, "ip link set lo up")
        for i, (a, a_addr, b_addr) in enumerate((("client", "203.0.113.2/30", "203.0.113.1/30"),
                                                 ("home", "192.0.2.2/30", "192.0.2.1/30"))):
            ta, tb = f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            subprocess.run(["ip", "link", "add", ta, "netns", self.ns(a), "type", "veth", "peer", "name", tb,
                            "netns", self.ns("vps")], check=True)
            self.sh(a, f"ip link set {ta} name eth0; ip addr add {a_addr} dev eth0; ip link set eth0 up; "
                       f"ip route add default via {b_addr.split('/')[0]}")
            self.sh("vps", f"ip link set {tb} name {a}; ip addr add {b_addr} dev {a}; ip link set {a} up")

    def spawn(self, name: str, args: list[str], log: str, **kw) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        with open(os.path.join(self.tmp, log), "a") as f:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *args], stderr=f, env=env, **kw)
        self.procs.append(p)
        return p

    def agent(self, name: str, role: str, *args: str) -> tuple[subprocess.Popen, str]:
        ctl = os.path.join(self.tmp, f"{role}.sock")
        if os.path.exists(ctl):
            os.unlink(ctl)
        p = self.spawn(name, [sys.executable, "-m", "udp_tunnel", *args, "--key-file", os.path.join(self.tmp, "key"),
                              "--control", ctl, "--max-clients", "5000", "-q"], f"{role}.log",
                       stdout=subprocess.DEVNULL)
        return p, ctl

    def status(self, ctl: str) -> dict | None:
        sys.path.insert(0, os.path.join(ROOT, "src"))
        from udp_tunnel.ops.status import query
        try:
            return query(ctl)
        except (OSError, ValueError):
            return None

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and resident kB of process pid."""
    return cpu_seconds(pid), rss_kb(pid)["VmRSS"]


def one_run(b: Bench, mode: str, new: int, trips: int) -> dict:
    out, out_ctl = b.agent("vps", "outside", "-l", str(PORT), "--max-clients-per-source", "5000",
                           "--state-file", os.path.join(b.tmp, "outside.state"))
    ins, in_ctl = b.agent("home", "inside", "-s", f"{SERVICE[0]}:{SERVICE[1]}", "-o", f"192.0.2.1:{PORT}",
                          "--client-address", mode)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            st = b.status(out_ctl)
            if st and st["spares"] >= 2:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{mode}: the agents did not start\n" + open(os.path.join(b.tmp, "inside.log")).read())
        cpu0, rss0 = usage(ins.pid)
        c = b.spawn("client", [sys.executable, os.path.abspath(__file__), "--clients", "203.0.113.1", str(new),
                               str(trips)], "client.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        first = json.loads(c.stdout.readline())
        cpu1, rss1 = usage(ins.pid)
        c.stdin.write("\n")
        c.stdin.flush()
        json.loads(c.stdout.readline())  # ready
        cpu2, _ = usage(ins.pid)
        c.stdin.write("\n")
        c.stdin.flush()
        steady = json.loads(c.stdout.readline())
        cpu3, _ = usage(ins.pid)
        c.wait(30)
        firsts = sorted(first["firsts"])
        return {"first_ms": statistics.median(firsts) * 1e3, "first_p90_ms": firsts[int(0.9 * len(firsts))] * 1e3,
                "lost": first["lost"] + steady["lost"], "cpu_new_us": (cpu1 - cpu0) / new * 1e6,
                "rss_new_kb": (rss1 - rss0) / new, "rtt_us": steady["median_us"],
                "cpu_trip_us": (cpu3 - cpu2) / trips * 1e6}
    finally:
        b.stop(ins)
        b.stop(out)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        clients(*sys.argv[2:5])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        echo()
        return 0
    args = [int(a) for a in sys.argv[1:4]]
    new, trips, rounds = args + [1000, 20000, 3][len(args):]
    if os.geteuid() != 0:
        print("bench_clientaddr_agents.py needs root (network namespaces, IP_TRANSPARENT)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        b = Bench(tmp)
        try:
            b.build()
            b.spawn("home", [sys.executable, os.path.abspath(__file__), "--echo"], "echo.log")
            time.sleep(0.5)
            runs: dict[str, list[dict]] = {m: [] for m in MODES}
            for _ in range(rounds):
                for mode in MODES:
                    runs[mode].append(one_run(b, mode, new, trips))
        finally:
            b.close()
    print(f"{new} new clients one after the other, then one client's {trips} round trips of 100 bytes; "
          f"median of {rounds} rounds (each round's figures in brackets)")
    print(f"{'mode':16} {'first answer':>13} {'p90':>9} {'inside CPU':>12} {'inside RSS':>11} "
          f"{'round trip':>11} {'inside CPU':>11} {'lost':>5}")
    print(f"{'':16} {'(new client)':>13} {'':>9} {'/new client':>12} {'/new client':>11} "
          f"{'(steady)':>11} {'/round trip':>11}")
    for mode, rs in runs.items():
        def med(k: str, rs: list[dict] = rs) -> float:
            return statistics.median(r[k] for r in rs)
        print(f"{mode:16} {med('first_ms'):10.3f} ms {med('first_p90_ms'):6.3f} ms {med('cpu_new_us'):9.0f} us "
              f"{med('rss_new_kb'):8.1f} kB {med('rtt_us'):8.1f} us {med('cpu_trip_us'):8.1f} us "
              f"{sum(r['lost'] for r in rs):5d}")
        for k in ("first_ms", "cpu_new_us", "rtt_us", "cpu_trip_us"):
            print(f"    {k}: [{', '.join(f'{r[k]:.3f}' if k == 'first_ms' else f'{r[k]:.1f}' for r in rs)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
