"""WireGuard through the namespace lab (netlab.py: double NAT at home, NAT at work), both
agents with --datapath user, then --datapath kernel, alternating: bulk TCP from home to the
WireGuard client at work (iperf3 when installed, else the lab's tcpfetch), and the relays' CPU
during each run: each agent's own (user + system time of its process) and the whole box's busy
CPU (everything: wireguard-go, iperf3, the routers' NAT and the kernel's relaying, which no
process is charged for). The throughput is bound by wireguard-go (user-space WireGuard) on
both ends here: the figure to compare is the relays' CPU. Root only. Prints a table, with
where datagrams were dropped (UDP receive buffers per namespace, qdiscs on the path, the
program's counters in each JSON line) and the CPUs' softirq and idle time.

Two lab settings that are not the relays' (docs/kernel-path.md says what they change):
--rcvbuf BYTES gives wireguard-go's UDP sockets a bigger receive buffer (this wireguard-go
asks for none, and a namespace cannot raise its own net.core.rmem_default here), and
--rps MASK turns receive packet steering on for every interface on the path, so that the
namespaces' forwarding no longer runs as one softirq chain on the sending CPU.

    python3 tests/lab/wgbench.py [--seconds 10] [--repeat 3] [--rcvbuf 4194304] [--rps 3]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from netlab import PORT, Lab  # noqa: E402
from test_lab import WG_PORT, Net, wg_ping, wireguard  # noqa: E402

from flood import cpu_seconds  # noqa: E402


def box_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = v[3] + v[4]
    return (sum(v) - idle) / tick, sum(v) / tick


SYS_PIDFD_GETFD = 438  # the same number on every architecture
SO_RCVBUFFORCE = 33
WG_NAMESPACES = ("home", "work1")  # where wireguard-go runs
QDISC_NAMESPACES = ("home", "hrouter", "carrier", "inet", "vps", "wrouter", "work1")  # on the path


def per_cpu() -> list[list[float]]:
    """Per CPU, seconds so far of [user (and nice), system, irq and softirq, idle (and iowait)]."""
    tick, out = os.sysconf("SC_CLK_TCK"), []
    with open("/proc/stat") as f:
        for line in f:
            w = line.split()
            if w[0].startswith("cpu") and w[0] != "cpu":
                v = [int(x) for x in w[1:]]
                out.append([(v[0] + v[1]) / tick, v[2] / tick, (v[5] + v[6]) / tick, (v[3] + v[4]) / tick])
    return out


def udp_drops(lab: Lab) -> dict[str, int]:
    """UDP datagrams dropped for a full receive buffer, per namespace that runs wireguard-go or an agent."""
    out = {}
    for ns in ("home", "work1", "vps"):
        lines = [x.split() for x in lab.sh(ns, "cat /proc/net/snmp").stdout.splitlines() if x.startswith("Udp:")]
        out[ns] = int(dict(zip(lines[0], lines[1], strict=True))["RcvbufErrors"])
    return out


def qdisc_drops(lab: Lab) -> dict[str, int]:
    """Packets the qdiscs dropped so far, summed per namespace on the path (tc -s qdisc)."""
    out = {}
    for ns in QDISC_NAMESPACES:
        text = lab.sh(ns, "tc -s qdisc show").stdout
        out[ns] = sum(int(w[i + 1].rstrip(",")) for w in (x.split() for x in text.splitlines())
                      for i, t in enumerate(w[:-1]) if t == "dropped")
    return out


def wg_pids(lab: Lab) -> dict[str, int]:
    """The process id of wireguard-go per namespace (`ip netns exec` execs it: the spawned process)."""
    return {ns: p.pid for log, p in lab.procs for ns in WG_NAMESPACES if log == f"wireguard-{ns}.log"}


def set_rcvbuf(lab: Lab, size: int) -> None:
    """Give each UDP socket of wireguard-go (home, work1) a receive buffer of size bytes.

    This wireguard-go asks for none, so its sockets get net.core.rmem_default, which a network
    namespace other than the first can only read on this kernel (and the first one is the
    machine's). So: take a copy of each socket from the process (pidfd_getfd(2)) and set
    SO_RCVBUFFORCE on it (root: past rmem_max); the socket is the same, the copy is closed."""
    libc = ctypes.CDLL(None, use_errno=True)
    for ns, pid in wg_pids(lab).items():
        inodes = set()
        for table in ("udp", "udp6"):
            with open(f"/proc/{pid}/net/{table}") as f:
                inodes |= {x.split()[9] for x in f.read().splitlines()[1:]}
        pidfd = os.pidfd_open(pid)
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except FileNotFoundError:
                    continue
                if not (target.startswith("socket:[") and target[8:-1] in inodes):
                    continue
                copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
                if copy < 0:
                    raise OSError(ctypes.get_errno(), f"pidfd_getfd of {ns}'s wireguard-go fd {fd}")
                try:
                    sock = socket.socket(fileno=copy)
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                finally:
                    sock.close()
        finally:
            os.close(pidfd)
    got = wg_rcvbuf(lab)
    assert all(rbs and all(rb == 2 * size for rb in rbs) for rbs in got.values()), got  # the kernel doubles it


def set_rps(lab: Lab, mask: str) -> None:
    """Receive packet steering on every interface of the namespaces on the path: each veth hands
    what it receives to the backlog of a CPU of mask (by flow hash), instead of the sending
    CPU going on with the next namespace's forwarding in the same softirq."""
    for ns in QDISC_NAMESPACES:
        for dev in lab.sh(ns, "ls /sys/class/net").stdout.split():
            if dev != "lo":
                path = f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"
                if lab.sh(ns, f"test -e {path}", check=False).returncode == 0:
                    lab.sh(ns, f"echo {mask} > {path}")


def wg_rcvbuf(lab: Lab) -> dict[str, list[int]]:
    """The receive buffer (ss's rb, bytes) of each wireguard-go UDP socket, per namespace."""
    out = {}
    for ns in WG_NAMESPACES:
        text = lab.sh(ns, "ss -uamnp").stdout
        rbs, wg = [], False
        for line in text.splitlines():
            if line.startswith(("UNCONN", "ESTAB")):
                wg = "wireguard-go" in line
            elif wg and "skmem:" in line:
                rbs.append(int(line.split("rb", 1)[1].split(",")[0]))
        out[ns] = rbs
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
        cpu0, box0, drops0, q0 = [cpu_seconds(a["proc"].pid) for a in (out, ins)], box_busy(), udp_drops(lab), \
            qdisc_drops(lab)
        pc0, wg0 = per_cpu(), {ns: cpu_seconds(pid) for ns, pid in wg_pids(lab).items()}
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
        pc1, wg1 = per_cpu(), {ns: cpu_seconds(pid) for ns, pid in wg_pids(lab).items()}
        cpu1, box1, drops1, q1 = [cpu_seconds(a["proc"].pid) for a in (out, ins)], box_busy(), udp_drops(lab), \
            qdisc_drops(lab)
        lab.stop(server)
        kernel = [net.status(a)["datapath"] for a in (out, ins)]
        return {"datapath": datapath, "mbit_s": round(mbit, 1), "seconds": round(wall, 2),
                "outside_cpu": round(cpu1[0] - cpu0[0], 3), "inside_cpu": round(cpu1[1] - cpu0[1], 3),
                "box_busy": round(box1[0] - box0[0], 2), "paths": [k["path"] for k in kernel],
                "relayed": [k.get("program", {}).get("relayed", 0) + k.get("program", {}).get("local", 0)
                            for k in kernel], "tool": "iperf3" if iperf else "tcpfetch", "retransmits": retrans,
                "udp_rcvbuf_drops": {k: drops1[k] - drops0[k] for k in drops0},
                "qdisc_drops": {k: q1[k] - q0[k] for k in q0 if q1[k] - q0[k]}, "wg_rb": wg_rcvbuf(lab),
                "wireguard_go_cpu": {ns: round(wg1[ns] - wg0[ns], 2) for ns in wg0},
                "cpus_user_sys_softirq_idle": [[round(y - x, 1) for x, y in zip(c0, c1, strict=True)]
                                               for c0, c1 in zip(pc0, pc1, strict=True)],
                "program": [{n: v for n, v in k.get("program", {}).items() if v} for k in kernel]}
    finally:
        net.stop_agents()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rcvbuf", type=int, default=0, metavar="BYTES",
                    help="SO_RCVBUF of wireguard-go's UDP sockets at home and work1 (set from outside: "
                         "it asks for none); 0 (the default): net.core.rmem_default, as the lab does")
    ap.add_argument("--rps", default="", metavar="MASK",
                    help="rps_cpus of every interface on the path (hex CPU mask); default: none, as the lab does")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="wgbench.")
    lab = Lab(tmp)
    results = []
    try:
        lab.build()
        wireguard(lab, tmp)
        if a.rcvbuf:
            set_rcvbuf(lab, a.rcvbuf)
        if a.rps:
            set_rps(lab, a.rps)
        rcvbuf = wg_rcvbuf(lab)
        print(f"wireguard-go's receive buffers (ss rb, bytes): {json.dumps(rcvbuf)}", flush=True)
        for r in range(a.repeat):
            for datapath in ("user", "kernel"):
                res = one(lab, os.path.join(tmp, f"{datapath}{r}"), datapath, a.seconds)
                print(json.dumps(res), flush=True)
                results.append(res)
    finally:
        lab.close()
        shutil.rmtree(tmp, ignore_errors=True)
    buf = (f"SO_RCVBUF {a.rcvbuf}" if a.rcvbuf else "net.core.rmem_default") + \
        (f", rps_cpus {a.rps} on every interface on the path" if a.rps else "")
    print(f"\nWireGuard (wireguard-go at both ends) through the lab's double NAT, bulk TCP home -> work "
          f"({results[0]['tool']}, {a.seconds} s), medians of {a.repeat}; wireguard-go's receive buffers: "
          f"{buf} (ss rb {json.dumps(rcvbuf)}):\n")
    print("| data path | Mbit/s | outside agent CPU s | inside agent CPU s | agents' CPU per MB | box busy CPU s "
          "| softirq / idle CPU s | wireguard-go CPU s home / work1 | UDP rcvbuf drops home / work1 / vps "
          "| qdisc drops | TCP retransmits |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for datapath in ("user", "kernel"):
        rs = [x for x in results if x["datapath"] == datapath]

        def m(k: str, rs: list = rs) -> float:
            return statistics.median(x[k] for x in rs)
        mb = m("mbit_s") * m("seconds") / 8
        drops = " / ".join(f"{statistics.median(x['udp_rcvbuf_drops'][ns] for x in rs):.0f}"
                           for ns in ("home", "work1", "vps"))
        qdisc = statistics.median(sum(x["qdisc_drops"].values()) for x in rs)
        retrans = statistics.median(x["retransmits"] or 0 for x in rs)
        softirq, idle = (statistics.median(sum(c[i] for c in x["cpus_user_sys_softirq_idle"]) for x in rs)
                         for i in (2, 3))
        wg = " / ".join(f"{statistics.median(x['wireguard_go_cpu'][ns] for x in rs):.1f}" for ns in WG_NAMESPACES)
        print(f"| {datapath} | {m('mbit_s'):.0f} | {m('outside_cpu'):.2f} | {m('inside_cpu'):.2f} | "
              f"{(m('outside_cpu') + m('inside_cpu')) / mb * 1000:.2f} ms | {m('box_busy'):.1f} | "
              f"{softirq:.1f} / {idle:.1f} | {wg} | {drops} | {qdisc:.0f} | {retrans:.0f} |")


if __name__ == "__main__":
    main()
