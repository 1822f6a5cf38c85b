"""The situation udp-tunnel exists for, rebuilt in Linux network namespaces.

    home ──lan── hrouter ──wan── carrier ──── inet ──── vps (outside agent)
    (service,     (NAT, IPv6    (CG-NAT,       │  ├──── wrouter (NAT) ──┬── work1
     inside        stateful     random ports,  │  │                     └── work2
     agent)        firewall)    UDP timeout    │  └──── attacker
                                20 s)

IPv6: home (2001:db8:1::2) is routed through hrouter's firewall and the carrier; work1
(2001:db8:8::2) is routed through wrouter (2001:db8:7::/64 towards inet, no NAT66); the
VPS is 2001:db8:5::10. work2 and the attacker are IPv4 only.

Only documentation ranges are used (192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24, 100.64.0.0/10, 2001:db8::/32). No namespace is linked to the
host's network. `close()` ends every process the lab started (by PID) and
deletes every namespace, and so its veths.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tests", "lab", "tool.py")

VPS4, VPS6, PORT = "198.51.100.10", "2001:db8:5::10", 9999
WORK_PUBLIC, WORK1_6 = "203.0.113.18", "2001:db8:8::2"  # work's NAT address; work1's IPv6 address (not NATed)
CARRIER_PUBLIC = "203.0.113.2"
HOME4 = "192.0.2.2"
CARRIER_UDP_TIMEOUT = 20

# (namespace a, interface in a, addresses in a, namespace b, interface in b, addresses in b)
LINKS = [
    ("home", "eth0", ["192.0.2.2/28", "2001:db8:1::2/64"], "hrouter", "lan", ["192.0.2.1/28", "2001:db8:1::1/64"]),
    ("hrouter", "wan", ["100.64.1.2/30", "2001:db8:3::2/64"], "carrier", "in", ["100.64.1.1/30", "2001:db8:3::1/64"]),
    ("carrier", "out", ["203.0.113.2/28", "2001:db8:2::2/64"],
     "inet", "to-cgn", ["203.0.113.1/28", "2001:db8:2::1/64"]),
    ("vps", "eth0", ["198.51.100.10/28", "2001:db8:5::10/64"],
     "inet", "to-vps", ["198.51.100.1/28", "2001:db8:5::1/64"]),
    ("wrouter", "wan", ["203.0.113.18/28", "2001:db8:7::2/64"],
     "inet", "to-work", ["203.0.113.17/28", "2001:db8:7::1/64"]),
    ("work1", "eth0", ["192.0.2.66/28", "2001:db8:8::2/64"], "wrouter", "lan1", ["192.0.2.65/28", "2001:db8:8::1/64"]),
    ("work2", "eth0", ["192.0.2.82/28"], "wrouter", "lan2", ["192.0.2.81/28"]),
    ("attacker", "eth0", ["203.0.113.34/28"], "inet", "to-atk", ["203.0.113.33/28"]),
]
ROUTES = {
    "home": ["default via 192.0.2.1", "-6 default via 2001:db8:1::1"],
    "hrouter": ["default via 100.64.1.1", "-6 default via 2001:db8:3::1"],
    "carrier": ["default via 203.0.113.1", "-6 default via 2001:db8:2::1", "-6 2001:db8:1::/64 via 2001:db8:3::2"],
    "inet": ["-6 2001:db8:1::/64 via 2001:db8:2::2", "-6 2001:db8:8::/64 via 2001:db8:7::2"],
    "vps": ["default via 198.51.100.1", "-6 default via 2001:db8:5::1"],
    "wrouter": ["default via 203.0.113.17", "-6 default via 2001:db8:7::1"],
    "work1": ["default via 192.0.2.65", "-6 default via 2001:db8:8::1"],
    "work2": ["default via 192.0.2.81"],
    "attacker": ["default via 203.0.113.33"],
}
ROUTERS = ["hrouter", "carrier", "inet", "wrouter"]
NFT = {
    # home router: NAT for IPv4; IPv6 is routed, but only answers to what home sent get in
    "hrouter": """
table ip nat {
  chain post { type nat hook postrouting priority srcnat; oifname "wan" masquerade; }
}
table ip6 fw {
  chain inbound {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" accept
  }
}
""",
    # carrier-grade NAT: random public ports, as large CGNs allocate them
    "carrier": """
table ip nat {
  chain post {
    type nat hook postrouting priority srcnat;
    oifname "out" ip saddr 100.64.0.0/10 masquerade fully-random
  }
}
""",
    "wrouter": """
table ip nat {
  chain post { type nat hook postrouting priority srcnat; oifname "wan" masquerade; }
}
""",
}


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


class Lab:
    def __init__(self, tmpdir: str) -> None:
        self.prefix = f"ut{os.getpid() % 100000}"
        self.tmp = tmpdir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.namespaces: list[str] = []
        self.etc_dirs: list[str] = []
        atexit.register(self.close)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # killed by CI's time limit or by hand: unwind, so the fixtures clean up
            signal.signal(signal.SIGTERM, _interrupt)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def sh(self, name: str, cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        r = subprocess.run(["ip", "netns", "exec", self.ns(name), "sh", "-c", cmd],
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"[{name}] {cmd}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def spawn(self, name: str, args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        f = open(os.path.join(self.tmp, log), "a")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *args], stdout=f, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env or os.environ.copy())
        f.close()
        self.procs.append((log, p))
        return p

    def tool(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        return subprocess.run(["ip", "netns", "exec", self.ns(name), "python3", TOOL, *args],
                              capture_output=True, text=True, timeout=timeout, env=env)

    def spawn_tool(self, name: str, log: str, *args: str) -> subprocess.Popen:
        return self.spawn(name, ["python3", TOOL, *args], log,
                          env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")))

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def hosts(self, name: str, text: str) -> None:
        """/etc/hosts as processes started later in namespace `name` see it (ip netns exec
        bind-mounts /etc/netns/NS/hosts); rewritten in place, running ones see changes too."""
        if not os.path.isdir("/etc/netns"):
            self.etc_dirs.append("/etc/netns")  # made by the lab: removed again at the end
        d = f"/etc/netns/{self.ns(name)}"
        os.makedirs(d, exist_ok=True)
        self.etc_dirs.append(d)
        with open(f"{d}/hosts", "w") as f:
            f.write(text)

    def build(self) -> None:
        for name in sorted({x for link in LINKS for x in (link[0], link[3])}):
            subprocess.run(["ip", "netns", "add", self.ns(name)], check=True)
            self.namespaces.append(self.ns(name))
            self.sh(name, "ip link set lo up; sysctl -qw net.ipv6.conf.all.accept_dad=0 "
                          "net.ipv6.conf.default.accept_dad=0")
        for i, (a, ia, addrs_a, b, ib, addrs_b) in enumerate(LINKS):
            tmp_a, tmp_b = f"{self.prefix}a{i}", f"{self.prefix}b{i}"
            subprocess.run(["ip", "link", "add", tmp_a, "netns", self.ns(a), "type", "veth",
                            "peer", "name", tmp_b, "netns", self.ns(b)], check=True)
            for name, tmpname, ifname, addrs in ((a, tmp_a, ia, addrs_a), (b, tmp_b, ib, addrs_b)):
                cmds = [f"ip link set {tmpname} name {ifname}"]
                cmds += [f"ip addr add {ad} dev {ifname}" + (" nodad" if ":" in ad else "") for ad in addrs]
                cmds.append(f"ip link set {ifname} up")
                self.sh(name, "; ".join(cmds))
        for name, routes in ROUTES.items():
            for r in routes:
                fam = "-6 " if r.startswith("-6 ") else ""
                self.sh(name, f"ip {fam}route add {r.removeprefix('-6 ')}")
        for name in ROUTERS:
            self.sh(name, "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
        for name, rules in NFT.items():
            path = os.path.join(self.tmp, f"{name}.nft")
            with open(path, "w") as f:
                f.write(rules)
            self.sh(name, f"nft -f {path}")
        self.carrier_udp_timeout(CARRIER_UDP_TIMEOUT)

    def carrier_udp_timeout(self, t: int) -> None:
        """How long the carrier NAT keeps an idle UDP mapping."""
        self.sh("carrier", f"sysctl -qw net.netfilter.nf_conntrack_udp_timeout={t} "
                           f"net.netfilter.nf_conntrack_udp_timeout_stream={t}")

    def log(self, name: str) -> str:
        try:
            with open(os.path.join(self.tmp, name)) as f:
                return f.read()
        except OSError:
            return ""

    def close(self) -> None:
        for _, p in reversed(self.procs):
            try:
                self.stop(p, signal.SIGTERM)
            except Exception:  # noqa: BLE001 - clean up whatever happens
                pass
        self.procs.clear()
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        for d in sorted(set(self.etc_dirs), reverse=True):  # /etc/netns/NS before /etc/netns
            shutil.rmtree(d, ignore_errors=True)
        self.etc_dirs.clear()


def wait_for(cond, timeout: float, step: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return None
