"""Benchmark of the kernel data path alone (stand-in agents, tests/kbench_agent.py),
side by side with no relay at all (--direct), the C tool (C_TOOL) and our
user-space agents (./udp-tunnel), with the perf harness (../shared/perf or
PERF_DIR), all in one network namespace of its own (the stand-ins attach to its
lo). Labels alternate within each repeat, so that all see the same noise.
Prints a table (medians over the repeats); asserts nothing. Root only.

    python3 tests/kbench.py [--clients 1,100,1000] [--repeat 3] [--labels direct,kernel,ctool,ours]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERF = os.environ.get("PERF_DIR") or next(
    (p for p in (os.path.join(os.path.dirname(ROOT), "shared", "perf"),
                 os.path.join(os.path.dirname(os.path.dirname(ROOT)), "shared", "perf")) if os.path.isdir(p)),
    os.path.join(os.path.dirname(ROOT), "shared", "perf"))
AGENT = os.path.join(ROOT, "tests", "kbench_agent.py")
OURS = os.path.join(ROOT, "udp-tunnel")


def templates(label: str) -> list[str]:
    py = sys.executable
    if label == "direct":
        return ["--direct"]
    if label == "kernel":
        return ["--outside", f"{py} {AGENT} outside --listen 127.0.0.1:{{LPORT}}",
                "--inside", f"{py} {AGENT} inside --outside 127.0.0.1:{{LPORT}} --service 127.0.0.1:{{SPORT}} "
                            "--spares {K}"]
    if label == "ctool":
        c = os.environ["C_TOOL"]
        return ["--outside", f"{c} -l {{LPORT}} -k k",
                "--inside", f"{c} -s 127.0.0.1:{{SPORT}} -o 127.0.0.1:{{LPORT}} -k k"]
    common = "-k k --max-clients 2000 -q"
    return ["--outside", f"{OURS} -l 127.0.0.1:{{LPORT}} {common} --max-clients-per-source 2000",
            "--inside", f"{OURS} -s 127.0.0.1:{{SPORT}} -o 127.0.0.1:{{LPORT}} {common}"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="1,100,1000")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--labels", default="direct,kernel,ctool,ours")
    ap.add_argument("--out", default=None, help="keep the harness's JSON lines here")
    a = ap.parse_args()
    labels = [x for x in a.labels.split(",") if x != "ctool" or os.environ.get("C_TOOL")]
    labels = [x for x in labels if x != "ours" or os.path.exists(OURS)]
    out = a.out or tempfile.mktemp(suffix=".jsonl")
    ns = f"utkb{os.getpid() % 100000}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # unwind: the namespace goes, the harness ends its own
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        for rep in range(a.repeat):
            for label in labels:
                print(f"-- {label}, repeat {rep + 1}/{a.repeat}", flush=True)
                subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.join(PERF, "bench.py"),
                                "--label", label, "--out", out, "-K", a.clients, "-S", "64", "--repeat", "1",
                                *templates(label)], check=False, timeout=900)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    report(out, labels, [int(k) for k in a.clients.split(",")])
    if a.out is None:
        os.unlink(out)


def report(path: str, labels: list[str], clients: list[int]) -> None:
    rows: dict[tuple, dict[str, list]] = {}
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if d["phase"] == "warmup":
                continue
            r = rows.setdefault((d["label"], d["K"]), {"rt": [], "box": [], "p50": [], "other": [], "lost": [],
                                                       "procs": []})
            if d["phase"] == "max":
                r["rt"].append(d["pps"])
                # the CPU of the four processes (load generator, echo, both agents) per round trip: kernel
                # work done in their context (a loopback send runs the receive side too) counts, others' not
                r["procs"].append(sum(v["ns"] for v in d["cpu"].values()) / d["recv"] / 1000 if d["recv"] else
                                  float("nan"))
                r["box"].append(d.get("box_us_per_rt") or float("nan"))
                r["other"].append(d.get("other_util", 0))
                r["lost"].append(d["lost"])
            else:
                r["p50"].append(d["rtt_us"]["p50"])

    def med(x: list) -> float:
        return statistics.median(x) if x else float("nan")

    print("\n| path | clients | round trips/s | box CPU us/rt | overhead (box minus direct) | "
          "processes' CPU us/rt | overhead (processes minus direct) | RTT p50 at 2000/s (us) | runs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k in clients:
        direct = rows.get(("direct", k))
        floor = med(direct["box"]) if direct else float("nan")
        pfloor = med(direct["procs"]) if direct else float("nan")
        for label in labels:
            r = rows.get((label, k))
            if not r:
                continue
            box, procs = med(r["box"]), med(r["procs"])
            print(f"| {label} | {k} | {med(r['rt']):,.0f} | {box:.1f} | {box - floor:.1f} | {procs:.1f} | "
                  f"{procs - pfloor:.1f} | {med(r['p50']):.1f} | {len(r['rt'])} |")
    print("\nspread (min-max) of round trips/s:")
    for (label, k), r in sorted(rows.items(), key=lambda x: (x[0][1], labels.index(x[0][0]))):
        if r["rt"]:
            print(f"  {label:7s} K={k:5d}: {min(r['rt']):,.0f} - {max(r['rt']):,.0f};  box us/rt "
                  f"{min(r['box']):.1f} - {max(r['box']):.1f};  other load {min(r['other']):.2f} - "
                  f"{max(r['other']):.2f}")


if __name__ == "__main__":
    main()
