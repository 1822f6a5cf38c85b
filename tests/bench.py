"""Benchmark: our agents in user space (--datapath user), our agents with the kernel data path
(--datapath kernel, root only), no relay at all (--direct: the load generator talks to the echo
service, the floor) and, when C_TOOL points at a build of the C udp-tunnel
(github.com/prof7bit/udp-reverse-tunnel), the C tool, side by side in one run, with the harness
in ../shared/perf (C load generator and echo service). As root everything runs in a network
namespace of its own (only lo: the kernel path attaches to every interface it finds), the
same for every label. Labels alternate within each repeat, so that all see the same noise.

Prints: the issue-19 table (round trips/s at max load, the whole box's busy CPU per round
trip, the relay's overhead = box minus direct, RTT p50 at 2000 round trips/s), the agents' own
CPU per forwarded datagram (at max load and at 2000/s), then a GSO-sending client of
1400-byte datagrams (as wireguard-go sends). Asserts nothing.

    make bench [C_TOOL=/path/to/udp-tunnel] [REPEAT=3] [CLIENTS=1,100,1000] [LABELS=direct,kernel,ours,ctool]
               [CHURN=1]

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
PERF = os.environ.get("PERF_DIR") or next(
    (p for p in (os.path.join(os.path.dirname(ROOT), "shared", "perf"),
                 os.path.join(os.path.dirname(os.path.dirname(ROOT)), "shared", "perf")) if os.path.isdir(p)),
    os.path.join(os.path.dirname(ROOT), "shared", "perf"))
OURS = os.path.join(ROOT, "udp-tunnel")
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104


def templates(label: str) -> tuple[str, str]:
    if label in ("ours", "kernel"):
        common = f"-k k --max-clients 2000 -q --datapath {'kernel' if label == 'kernel' else 'user'}"
        # every client of the load generator comes from 127.0.0.1: one source holds them all
        return (f"{OURS} -l 127.0.0.1:{{LPORT}} {common} --max-clients-per-source 2000",
                f"{OURS} -s 127.0.0.1:{{SPORT}} -o 127.0.0.1:{{LPORT}} {common}")
    c = os.environ["C_TOOL"]
    return f"{c} -l {{LPORT}} -k k", f"{c} -s 127.0.0.1:{{SPORT}} -o 127.0.0.1:{{LPORT}} -k k"


def harness(label: str, clients: str, out: str, ns: list[str]) -> None:
    if label == "direct":
        agents = ["--direct"]
    else:
        o, i = templates(label)
        agents = ["--outside", o, "--inside", i]
    subprocess.run([*ns, sys.executable, os.path.join(PERF, "bench.py"), "--label", label, "--out", out,
                    "-K", clients, "-S", "64", "--repeat", "1", *agents],
                   check=False, timeout=900, stdout=subprocess.DEVNULL)


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
    v = [x for x in (f(r) for r in rows if r.get("label") == label and r["K"] == k and r["phase"] == phase
                     and r.get("us_per_dgram")) if x is not None]
    return statistics.median(v) if v else float("nan")


def kernel_why_not(ns: list[str]) -> str | None:
    """Why the kernel label cannot run here, or None (asked in the run's namespace)."""
    if os.geteuid() != 0:
        return "needs root (a network namespace of its own, bpf)"
    if not os.path.exists(OURS):
        return "no ./udp-tunnel (make)"
    code = "import sys; sys.path.insert(0, sys.argv[1]); from udp_tunnel.io.kernel import available; " \
           "print(available() or '')"
    r = subprocess.run([*ns, sys.executable, "-c", code, os.path.join(ROOT, "src")], capture_output=True, text=True,
                       timeout=60)
    return r.stdout.strip() or None


def namespace() -> tuple[list[str], object]:
    """As root: a network namespace with lo only, and the command prefix that runs in it; else none."""
    if os.geteuid() != 0 or subprocess.run(["ip", "-V"], capture_output=True).returncode:
        return [], lambda: None
    name = f"utbench{os.getpid() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    return ["ip", "netns", "exec", name], lambda: subprocess.run(["ip", "netns", "del", name], check=False)


def gso_in(ns: list[str], label: str) -> dict | None:
    r = subprocess.run([*ns, sys.executable, os.path.abspath(__file__), "--gso", label], capture_output=True,
                       text=True, timeout=120)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        print(f"  GSO run of {label} failed: {r.stderr.strip()[-300:]}", flush=True)
        return None


def issue_table(rows: list[dict], labels: list[str], clients: list[int]) -> None:
    """The issue-19 table: round trips/s, box CPU per round trip, overhead (minus direct), RTT p50."""
    names = {"direct": "direct, no relay (the floor)", "kernel": "ours, kernel path", "ours": "ours, user space",
             "ctool": "C tool"}
    fig = {}
    print("\n| path | clients | round trips/s | box CPU per round trip | relay overhead (minus direct) | "
          "RTT p50 at 2000/s | runs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in clients:
        floor = med(rows, "direct", k, "max", lambda r: r.get("box_us_per_rt"))
        for lab in labels:
            rt = med(rows, lab, k, "max", lambda r: r["pps"])
            box = med(rows, lab, k, "max", lambda r: r.get("box_us_per_rt"))
            p50 = med(rows, lab, k, "rate", lambda r: r["rtt_us"]["p50"])
            n = sum(1 for r in rows if r.get("label") == lab and r["K"] == k and r["phase"] == "max")
            fig[lab, k] = (rt, box - floor, p50)
            print(f"| {names[lab]} | {k} | {rt:,.0f} | {box:.1f} us | {box - floor:.1f} us | {p50:.0f} us | {n} |")
    if "kernel" in labels and "ctool" in labels:
        print("\nthe kernel path against the issue's marks (C tool and direct of the same run):\n")
        print("| clients | overhead kernel / C tool (<= 0.2) | round trips/s kernel / C tool (>= 3) | "
              "kernel / direct (>= 0.6 at 100) | RTT p50 kernel minus direct (<= +15 us) | C tool minus direct |")
        print("|---:|---:|---:|---:|---:|---:|")
        for k in clients:
            kr, c, d = fig.get(("kernel", k)), fig.get(("ctool", k)), fig.get(("direct", k))
            if kr and c and d:
                print(f"| {k} | {kr[1] / c[1]:.2f}x | {kr[0] / c[0]:.2f}x | {kr[0] / d[0]:.2f}x | "
                      f"{kr[2] - d[2]:+.0f} us | {c[2] - d[2]:+.0f} us |")


def main() -> None:
    reps = int(os.environ.get("REPEAT", "3"))
    clients = os.environ.get("CLIENTS", "1,100,1000")
    wanted = os.environ.get("LABELS", "direct,kernel,ours,ctool").split(",")
    if not os.path.exists(os.path.join(PERF, "bench.py")):
        sys.exit(f"no harness at {PERF} (set PERF_DIR)")
    labels = [x for x in wanted if x != "ctool" or os.environ.get("C_TOOL")]
    ns, cleanup = namespace()
    try:
        if "kernel" in labels:
            why = kernel_why_not(ns)
            if why:
                print(f"(no kernel path in this run: {why})")
                labels.remove("kernel")
        out = tempfile.NamedTemporaryFile(prefix="udp-tunnel-bench.", suffix=".jsonl", delete=False).name
        print(f"udp-tunnel benchmark: loopback{' in a network namespace of its own' if ns else ''}, 64-byte "
              f"datagrams, {reps} alternating repeats of {', '.join(labels)}, medians; results in {out}", flush=True)
        gso: list[dict] = []
        for r in range(reps):
            for label in labels:
                print(f"  repeat {r + 1}/{reps}: {label}", flush=True)
                harness(label, clients, out, ns)
                if label != "direct":
                    g = gso_in(ns, label)
                    if g:
                        gso.append(g)
    finally:
        cleanup()
    rows = [json.loads(line) for line in open(out) if line.strip()]
    ks = list(map(int, clients.split(",")))
    issue_table(rows, labels, ks)
    agents_table(rows, [x for x in labels if x != "direct"], ks)
    gso_table(gso, [x for x in labels if x != "direct"])
    if os.environ.get("CHURN"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import churn
        print(flush=True)
        churn.main([])


def agents_table(rows: list[dict], labels: list[str], clients: list[int]) -> None:
    print("\nThe agents' own CPU us per forwarded datagram (outside / inside; with the kernel path the kernel's")
    print("work is in the box figure above, not here), round trips/s, at max load (64 in flight) and at")
    print("2000 datagrams/s (one wakeup each), round-trip p50 at 2000/s:\n")
    print("| clients | impl | max: out us | in us | round trips/s | 2000/s: out us | in us | rtt p50 us |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    fields = [("max", lambda r: r["us_per_dgram"]["outside"]), ("max", lambda r: r["us_per_dgram"]["inside"]),
              ("max", lambda r: r["pps"]), ("rate", lambda r: r["us_per_dgram"]["outside"]),
              ("rate", lambda r: r["us_per_dgram"]["inside"]), ("rate", lambda r: r["rtt_us"]["p50"])]
    for k in clients:
        vals = {lab: [med(rows, lab, k, ph, f) for ph, f in fields] for lab in labels}
        for lab in labels:
            v = vals[lab]
            print(f"| {k} | {lab} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.0f} | {v[3]:.2f} | {v[4]:.2f} | {v[5]:.0f} |")
        if "ctool" in vals and "ours" in vals:
            o, c = vals["ours"], vals["ctool"]
            print(f"| {k} | ours/C | {o[0] / c[0]:.2f}x | {o[1] / c[1]:.2f}x | {o[2] / c[2]:.2f}x | "
                  f"{o[3] / c[3]:.2f}x | {o[4] / c[4]:.2f}x | {o[5] - c[5]:+.0f} |")


def gso_table(gso: list[dict], labels: list[str]) -> None:
    print("\nA GSO-sending client (bursts of 16 x 1400-byte datagrams in one sendmsg, 20000 datagrams/s),")
    print("the agents' CPU us per forwarded datagram:\n")
    print("| impl | out us | in us | datagrams/s |")
    print("|---|---:|---:|---:|")
    g = {lab: [statistics.median(r[k] for r in gso if r["label"] == lab) for k in ("out", "in", "pps")]
         for lab in labels if any(r["label"] == lab for r in gso)}
    for lab, v in g.items():
        print(f"| {lab} | {v[0]:.2f} | {v[1]:.2f} | {v[2]:.0f} |")
    if "ctool" in g and "ours" in g:
        o, c = g["ours"], g["ctool"]
        print(f"| ours/C | {o[0] / c[0]:.2f}x | {o[1] / c[1]:.2f}x | {o[2] / c[2]:.2f}x |")


if __name__ == "__main__":
    random.seed()
    if sys.argv[1:2] == ["--gso"]:
        print(json.dumps(gso_run(sys.argv[2])))
    else:
        main()
