"""Benchmark: our agents and, when C_TOOL points at a build of the C udp-tunnel
(github.com/prof7bit/udp-reverse-tunnel), the C tool, side by side in one run,
with the harness in ../shared/perf (C load generator and echo service): CPU
time per forwarded datagram of each agent at max load and at 2000 datagrams/s,
round trips per second, round-trip p50; then a GSO-sending client of 1400-byte
datagrams (as wireguard-go sends). Prints tables; asserts nothing.

    make bench [C_TOOL=/path/to/udp-tunnel] [REPEAT=3] [CLIENTS=1,100,1000] [CHURN=1]

With CHURN=1 the churn table of tests/churn.py follows (RATES, SECONDS as for `make churn`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF = os.environ.get("PERF_DIR", os.path.join(os.path.dirname(ROOT), "shared", "perf"))
OURS = os.path.join(ROOT, "udp-tunnel")
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104


def templates(label: str) -> tuple[str, str]:
    if label == "ours":
        common = "-k k --max-clients 2000 -q"
        # every client of the load generator comes from 127.0.0.1: one source holds them all
        return (f"{OURS} -l 127.0.0.1:{{LPORT}} {common} --max-clients-per-source 2000",
                f"{OURS} -s 127.0.0.1:{{SPORT}} -o 127.0.0.1:{{LPORT}} {common}")
    c = os.environ["C_TOOL"]
    return f"{c} -l {{LPORT}} -k k", f"{c} -s 127.0.0.1:{{SPORT}} -o 127.0.0.1:{{LPORT}} -k k"


def harness(label: str, clients: str, out: str) -> None:
    o, i = templates(label)
    subprocess.run([sys.executable, os.path.join(PERF, "bench.py"), "--label", label, "--out", out,
                    "-K", clients, "-S", "64", "--repeat", "1", "--outside", o, "--inside", i],
                   check=False, timeout=600, stdout=subprocess.DEVNULL)


# --- the GSO client: bursts of 1400-byte datagrams in one sendmsg each, replies taken with GRO ---

def cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def gso_run(label: str, seconds: float = 3.0, size: int = 1400, burst: int = 16, rate: int = 20000) -> dict:
    binp = os.environ.get("PERF_BIN") or os.path.join(tempfile.gettempdir(), "udp-tunnel-perf-bin")
    lport, sport = free_port(), free_port()
    o, i = templates(label)
    fmt = dict(LPORT=lport, SPORT=sport)
    procs = [subprocess.Popen([os.path.join(binp, "echo"), str(sport)])]
    try:
        time.sleep(0.1)
        procs.append(subprocess.Popen(o.format(**fmt).split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.3)
        procs.append(subprocess.Popen(i.format(**fmt).split(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.7)
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        c.setsockopt(SOL_UDP, UDP_GRO, 1)
        c.connect(("127.0.0.1", lport))
        c.settimeout(0.3)
        for _ in range(50):  # the first datagram takes a tunnel
            c.send(b"x" * size)
            try:
                c.recv(65536)
                break
            except TimeoutError:
                pass
        c.setblocking(False)
        payload = bytes(size) * burst
        cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        got = sent = 0
        gap = burst / rate  # open loop: a burst every gap seconds, replies counted as they come
        c0 = [cpu_ns(p.pid) for p in procs[1:]]
        t0 = time.monotonic()
        end, due = t0 + seconds, t0
        while (now := time.monotonic()) < end:
            if now >= due:
                c.sendmsg([payload], cmsg)
                sent += burst
                due += gap
            for _ in range(256):
                try:
                    data, anc, _, _ = c.recvmsg(65536, 64)
                except BlockingIOError:
                    break
                seg = struct.unpack("=i", anc[0][2][:4])[0] if anc else len(data)
                got += -(-len(data) // seg)
            time.sleep(max(0.0, min(due, end) - time.monotonic()))
        wall = time.monotonic() - t0
        c1 = [cpu_ns(p.pid) for p in procs[1:]]
        c.close()
        fw = 2 * got  # each agent forwards every datagram there and back
        return {"label": label, "pps": got / wall, "lost": sent - got, "out": (c1[0] - c0[0]) / fw / 1000,
                "in": (c1[1] - c0[1]) / fw / 1000}
    finally:
        for p in reversed(procs):
            stop(p)


def med(rows: list[dict], label: str, k: int, phase: str, f) -> float:
    v = [f(r) for r in rows if r.get("label") == label and r["K"] == k and r["phase"] == phase
         and r.get("us_per_dgram")]
    return statistics.median(v) if v else float("nan")


def main() -> None:
    reps = int(os.environ.get("REPEAT", "3"))
    clients = os.environ.get("CLIENTS", "1,100,1000")
    labels = ["ours"] + (["ctool"] if os.environ.get("C_TOOL") else [])
    if not os.path.exists(os.path.join(PERF, "bench.py")):
        sys.exit(f"no harness at {PERF} (set PERF_DIR)")
    out = tempfile.NamedTemporaryFile(prefix="udp-tunnel-bench.", suffix=".jsonl", delete=False).name
    print(f"udp-tunnel benchmark: loopback, 64-byte datagrams, {reps} alternating repeats of "
          f"{' and '.join(labels)}, medians; results in {out}", flush=True)
    gso: list[dict] = []
    for r in range(reps):
        for label in labels:
            print(f"  repeat {r + 1}/{reps}: {label}", flush=True)
            harness(label, clients, out)
            gso.append(gso_run(label))
    rows = [json.loads(line) for line in open(out) if line.strip()]
    print("\nCPU us per forwarded datagram (outside / inside), round trips/s, at max load (64 in flight)")
    print("and at 2000 datagrams/s (one wakeup each), round-trip p50 at 2000/s:\n")
    print("| clients | impl | max: out us | in us | round trips/s | 2000/s: out us | in us | rtt p50 us |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    fields = [("max", lambda r: r["us_per_dgram"]["outside"]), ("max", lambda r: r["us_per_dgram"]["inside"]),
              ("max", lambda r: r["pps"]), ("rate", lambda r: r["us_per_dgram"]["outside"]),
              ("rate", lambda r: r["us_per_dgram"]["inside"]), ("rate", lambda r: r["rtt_us"]["p50"])]
    for k in map(int, clients.split(",")):
        vals = {lab: [med(rows, lab, k, ph, f) for ph, f in fields] for lab in labels}
        for lab in labels:
            v = vals[lab]
            print(f"| {k} | {lab} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.0f} | {v[3]:.2f} | {v[4]:.2f} | {v[5]:.0f} |")
        if "ctool" in vals:
            o, c = vals["ours"], vals["ctool"]
            print(f"| {k} | ours/C | {o[0] / c[0]:.2f}x | {o[1] / c[1]:.2f}x | {o[2] / c[2]:.2f}x | "
                  f"{o[3] / c[3]:.2f}x | {o[4] / c[4]:.2f}x | {o[5] - c[5]:+.0f} |")
    print("\nA GSO-sending client (bursts of 16 x 1400-byte datagrams in one sendmsg, 20000 datagrams/s),")
    print("CPU us per forwarded datagram:\n")
    print("| impl | out us | in us | datagrams/s |")
    print("|---|---:|---:|---:|")
    g = {lab: [statistics.median(r[k] for r in gso if r["label"] == lab) for k in ("out", "in", "pps")]
         for lab in labels}
    for lab in labels:
        print(f"| {lab} | {g[lab][0]:.2f} | {g[lab][1]:.2f} | {g[lab][2]:.0f} |")
    if "ctool" in g:
        o, c = g["ours"], g["ctool"]
        print(f"| ours/C | {o[0] / c[0]:.2f}x | {o[1] / c[1]:.2f}x | {o[2] / c[2]:.2f}x |")
    if os.environ.get("CHURN"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import churn
        print(flush=True)
        churn.main([])


if __name__ == "__main__":
    random.seed()
    main()
