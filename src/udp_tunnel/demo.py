"""`udp-tunnel demo`: both agents, a UDP echo service and three clients on loopback, and which
data path carried the datagrams (the kernel's eBPF program where it can run, as root on Linux
6.6+ with the program built by `make`; else the agents themselves, and why)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import udp_tunnel

PRIO = {"3": "error", "4": "warning", "6": "info", "7": "debug"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_command() -> list[str]:
    """This very udp-tunnel (zipapp, checkout or installed package) as a command."""
    path = os.path.dirname(os.path.dirname(os.path.abspath(udp_tunnel.__file__)))
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {path!r}); "
            "from udp_tunnel.cli import main; sys.exit(main())"]


def start_agent(name: str, args: list[str], env: dict, paths: dict[str, str]) -> subprocess.Popen:
    """Start an agent and relay its log; return once it said it started (or after 5 s). `paths`:
    the agent's name -> its start line's data path ("kernel (...)" or "user space (...)")."""
    p = subprocess.Popen(agent_command() + args, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = threading.Event()

    def relay() -> None:
        for line in p.stderr:
            line = line.rstrip("\n")
            if line[:1] == "<" and line[2:3] == ">":
                line = f"{PRIO.get(line[1], '?')}: {line[3:]}"
            if ", datapath " in line and name not in paths:
                paths[name] = line.split(", datapath ", 1)[1].split(", status on ", 1)[0]
            try:
                print(f"  [{name}] {line}", flush=True)
            except (BrokenPipeError, ValueError):  # the reader of our output is gone
                break
            started.set()
        started.set()

    threading.Thread(target=relay, daemon=True).start()
    started.wait(5)
    return p


def echo_service(sock: socket.socket, seen: set, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            continue
        seen.add(addr)
        sock.sendto(data, addr)


def run_clients(oport: int, clients_n: int, per_client: int) -> tuple[int, int, list[float]]:
    """The clients talk through the tunnel: datagrams that came back intact, sent, round trips."""
    ok = sent = 0
    rtts: list[float] = []
    clients = []
    for _ in range(clients_n):
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.connect(("127.0.0.1", oport))
        c.settimeout(3.0)  # the first datagram waits at the outside until a tunnel is ready
        clients.append(c)
    deadline = time.monotonic() + 8
    try:
        for i, c in enumerate(clients, 1):
            for m in range(1, per_client + 1):
                msg = f"client {i} datagram {m}".encode()
                reply, tries, rtt = exchange(c, msg, deadline)
                sent += tries
                rtts.append(rtt)
                good = reply == msg
                ok += good
                if m in (1, per_client):
                    print(f"client {i} {c.getsockname()[1]} -> {msg.decode()!r} came back "
                          f"{'intact' if good else 'CHANGED'} in {rtt * 1000:.2f} ms")
        time.sleep(1.2)  # let the agents log a keepalive round
    except TimeoutError as e:
        print(f"demo failed: {e}")
    finally:
        for c in clients:
            c.close()
    return ok, sent, rtts


def exchange(c: socket.socket, msg: bytes, deadline: float) -> tuple[bytes, int, float]:
    """Send msg until an answer comes (the first waits until a spare tunnel is registered):
    the answer, the datagrams sent, the last round trip."""
    tries = 0
    while True:
        t0 = time.perf_counter()
        c.send(msg)
        tries += 1
        try:
            return c.recv(2048), tries, time.perf_counter() - t0
        except (TimeoutError, ConnectionRefusedError):
            if time.monotonic() > deadline:
                raise TimeoutError("no answer through the tunnel") from None
            time.sleep(0.1)


def stop_agents(agents: list[subprocess.Popen]) -> None:
    for p in agents:
        p.send_signal(signal.SIGTERM)
    for p in agents:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()


def demo(argv: list[str]) -> int:
    if argv:
        print("udp-tunnel: demo takes no arguments (see udp-tunnel --help)", file=sys.stderr)
        return 2
    clients_n, per_client = 3, 5
    # the demo's flows are all on loopback: its agents' programs go on lo, not on the host's other interfaces
    env = dict(os.environ, UDP_TUNNEL_KEY=secrets.token_hex(16), UDP_TUNNEL_BPF_IFACES="lo")
    service = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    service.bind(("127.0.0.1", 0))
    sport, oport = service.getsockname()[1], free_port()
    print(f"udp-tunnel {udp_tunnel.__version__} demo, all on loopback:")
    print(f"  UDP echo service on 127.0.0.1:{sport} (stands for the WireGuard server at home)")
    print(f"  outside agent:  udp-tunnel -l 127.0.0.1:{oport} -t 1   (key from UDP_TUNNEL_KEY)")
    print(f"  inside agent:   udp-tunnel -s 127.0.0.1:{sport} -o 127.0.0.1:{oport} -t 1")
    print(f"  {clients_n} clients send {per_client} datagrams each to the outside agent")
    print("  both agents with --datapath auto: the kernel relays known flows where it can, else the agents\n")
    seen: set = set()
    stop = threading.Event()
    threading.Thread(target=echo_service, args=(service, seen, stop), daemon=True).start()
    quiet = ["--control", "none"]  # the demo leaves nothing behind for `udp-tunnel status`
    paths: dict[str, str] = {}
    agents = [start_agent("outside", ["-l", f"127.0.0.1:{oport}", "-t", "1", *quiet], env, paths),
              start_agent("inside", ["-s", f"127.0.0.1:{sport}", "-o", f"127.0.0.1:{oport}", "-t", "1", *quiet],
                          env, paths)]
    try:
        ok, sent, rtts = run_clients(oport, clients_n, per_client)
    finally:
        stop_agents(agents)
        stop.set()
    total = clients_n * per_client
    print(f"\nsummary: {ok}/{total} datagrams came back intact ({sent - total} resent while the "
          f"tunnel came up); the service saw {len(seen)} distinct source port(s), one per client: "
          f"to it the inside agent is the client")
    if rtts:
        print(f"round trip through both agents: median {sorted(rtts)[len(rtts) // 2] * 1000:.2f} ms")
    print(datapath_summary(paths))
    good = ok == total and len(seen) == clients_n and all(p.returncode == 0 for p in agents)
    print("demo OK" if good else "demo FAILED")
    return 0 if good else 1


def datapath_summary(paths: dict[str, str]) -> str:
    """Which data path carried the clients' datagrams, from the agents' start lines."""
    said = [paths.get(name, "") for name in ("outside", "inside")]
    if all(p.startswith("kernel") for p in said):
        return (f"data path: the kernel ({said[0].split('(', 1)[-1].rstrip(')')}): after each client's first "
                "datagram, both agents' eBPF programs relayed its datagrams without waking the agents")
    if said[0] and said[0] == said[1]:
        return f"data path: the agents themselves, in user space ({said[0].split('(', 1)[-1].rstrip(')')})"
    return "data path: " + "; ".join(f"{name} agent {p or 'unknown'}" for name, p in zip(("outside", "inside"), said,
                                                                                          strict=True))
