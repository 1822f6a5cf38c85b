"""WireGuard through the namespace lab (netlab.py: double NAT at home, NAT at work), both
agents with --datapath user, then --datapath kernel, alternating: bulk TCP from home to the
WireGuard client at work (iperf3 when installed, else the lab's tcpfetch), and the relays' CPU
during each run: each agent's own (user + system time of its process) and the whole box's busy
CPU (everything: wireguard-go, iperf3, the routers' NAT and the kernel's relaying, which no
process is charged for). The throughput is bound by wireguard-go (user-space WireGuard) on
both ends here: the figure to compare is the relays' CPU. Root only. Prints a table.

    python3 tests/lab/wgbench.py [--seconds 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netlab import PORT, Lab  # noqa: E402
from test_lab import WG_PORT, Net, cpu_seconds, wg_ping, wireguard  # noqa: E402


def box_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = v[3] + v[4]
    return (sum(v) - idle) / tick, sum(v) / tick


def udp_drops(lab: Lab) -> dict[str, int]:
    """UDP datagrams dropped for a full receive buffer, per namespace that runs wireguard-go or an agent."""
    out = {}
    for ns in ("home", "work1", "vps"):
        lines = [x.split() for x in lab.sh(ns, "cat /proc/net/snmp").stdout.splitlines() if x.startswith("Udp:")]
        out[ns] = int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])
    return out


def one(lab: Lab, tmp: str, datapath: str, seconds: int) -> dict:
    os.makedirs(tmp, exist_ok=True)
    net = Net(lab, tmp)
    try:
        out, ins = net.pair(f"127.0.0.1:{WG_PORT}", PORT, datapath=datapath)
        assert wg_ping(lab), "no ping across WireGuard"
        iperf = shutil.which("iperf3")
        server = lab.spawn("home", ["iperf3", "-s", "-1", "-B", "100.100.0.1"], "iperf-s.log") if iperf else \
            lab.spawn_tool("home", "tcpserve.log", "tcpserve", "100.100.0.1", "8080", str(400 << 20))
        time.sleep(0.5)
        cpu0, box0, drops0 = [cpu_seconds(a["proc"].pid) for a in (out, ins)], box_busy(), udp_drops(lab)
        if iperf:  # -R: home sends to work, as a file download from home would
            r = lab.sh("work1", f"iperf3 -c 100.100.0.1 -R -t {seconds} -J", check=False, timeout=seconds + 30)
            res = json.loads(r.stdout)
            mbit = res["end"]["sum_received"]["bits_per_second"] / 1e6
            wall = res["end"]["sum_received"]["seconds"]
            retrans = res["end"]["sum_sent"].get("retransmits")
        else:
            r = lab.tool("work1", "tcpfetch", "100.100.0.1", "8080", str(400 << 20), timeout=300)
            res = json.loads(r.stdout)
            mbit, wall, retrans = res["mbit_s"], res["seconds"], None
        cpu1, box1, drops1 = [cpu_seconds(a["proc"].pid) for a in (out, ins)], box_busy(), udp_drops(lab)
        lab.stop(server)
        kernel = [net.status(a)["datapath"] for a in (out, ins)]
        return {"datapath": datapath, "mbit_s": round(mbit, 1), "seconds": round(wall, 2),
                "outside_cpu": round(cpu1[0] - cpu0[0], 3), "inside_cpu": round(cpu1[1] - cpu0[1], 3),
                "box_busy": round(box1[0] - box0[0], 2), "paths": [k["path"] for k in kernel],
                "relayed": [k.get("program", {}).get("relayed", 0) + k.get("program", {}).get("local", 0)
                            for k in kernel], "tool": "iperf3" if iperf else "tcpfetch", "retransmits": retrans,
                "udp_rcvbuf_drops": {k: drops1[k] - drops0[k] for k in drops0},
                "program": [{n: v for n, v in k.get("program", {}).items() if v} for k in kernel]}
    finally:
        net.stop_agents()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="wgbench.")
    lab = Lab(tmp)
    results = []
    try:
        lab.build()
        wireguard(lab, tmp)
        for r in range(a.repeat):
            for datapath in ("user", "kernel"):
                res = one(lab, os.path.join(tmp, f"{datapath}{r}"), datapath, a.seconds)
                print(json.dumps(res), flush=True)
                results.append(res)
    finally:
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nWireGuard (wireguard-go at both ends) through the lab's double NAT, bulk TCP home -> work "
          f"({results[0]['tool']}, {a.seconds} s), medians of {a.repeat}:\n")
    print("| data path | Mbit/s | outside agent CPU s | inside agent CPU s | agents' CPU per MB | box busy CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for datapath in ("user", "kernel"):
        rs = [x for x in results if x["datapath"] == datapath]

        def m(k: str, rs: list = rs) -> float:
            return statistics.median(x[k] for x in rs)
        mb = m("mbit_s") * m("seconds") / 8
        print(f"| {datapath} | {m('mbit_s'):.0f} | {m('outside_cpu'):.2f} | {m('inside_cpu'):.2f} | "
              f"{(m('outside_cpu') + m('inside_cpu')) / mb * 1000:.2f} ms | {m('box_busy'):.1f} |")


if __name__ == "__main__":
    main()
