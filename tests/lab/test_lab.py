"""Layer 3: the real situation, in network namespaces, with real NAT and WireGuard.

Root only; skipped with the reason otherwise. See netlab.py for the topology.
Each test prints what it measured; a failing test prints every agent's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from netlab import CARRIER_PUBLIC, CARRIER_UDP_TIMEOUT, HOME4, PORT, ROOT, VPS4, VPS6, Lab, wait_for

from flood import cpu_seconds  # user and system CPU time of a process (not the softirq work it causes)
from udp_tunnel.wire import proto

pytestmark = pytest.mark.netns

TOOLS = ["ip", "nft", "conntrack", "wireguard-go", "wg", "ping"]
ECHO_PORT = 7000
WG_PORT = 51820
KEEPALIVE = "5"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces, nftables)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"the network lab needs {', '.join(missing)} (.ci/run installs them)"
    if not os.path.exists("/dev/net/tun"):
        return "the network lab needs /dev/net/tun for wireguard-go"
    return None


if _why_not():
    pytest.skip(_why_not(), allow_module_level=True)


class Net:
    def __init__(self, lab: Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        self.key = os.path.join(tmp, "key")
        with open(self.key, "w") as f:
            f.write("lab key, long and random in real life\n")
        self.agents: list[tuple[str, object]] = []

    def agent(self, ns: str, name: str, *args: str) -> dict:
        ctl = os.path.join(self.tmp, f"{name}.sock")
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
        env.pop("UDP_TUNNEL_KEY", None)
        p = self.lab.spawn(ns, ["python3", "-m", "udp_tunnel", *args, "--control", ctl], f"{name}.log", env=env)
        a = {"name": name, "proc": p, "control": ctl, "ns": ns, "args": args}
        self.agents.append((name, a))
        assert wait_for(lambda: os.path.exists(ctl), 10), self.lab.log(f"{name}.log")
        return a

    def restart(self, a: dict) -> None:
        assert self.lab.stop(a["proc"]) == 0
        new = self.agent(a["ns"], a["name"], *a["args"])
        a["proc"] = new["proc"]

    def status(self, a: dict) -> dict:
        from udp_tunnel.ops.status import query
        return query(a["control"])

    def wait_status(self, a: dict, cond, timeout: float = 20) -> dict:
        def check():
            try:
                s = self.status(a)
            except (OSError, ValueError):
                return None
            return s if cond(s) else None
        s = wait_for(check, timeout)
        assert s, f"{a['name']}: status condition not met\n{self.lab.log(a['name'] + '.log')}"
        return s

    def pair(self, service: str, port: int, *inside_extra: str, outside_addr: str | None = None,
             legacy: bool = False, keepalive: str = KEEPALIVE, outside_extra: tuple = (), datapath: str = "auto"):
        """An outside agent on the VPS and an inside agent at home for one service
        (inside_extra, outside_extra: options for one agent only; the other refuses them);
        datapath: both agents' --datapath."""
        mode = ["--legacy"] if legacy else []
        common = ["-t", keepalive, "--key-file", self.key, "--datapath", datapath, *mode]
        out = self.agent("vps", f"outside-{port}", "-l", str(port), *common, *outside_extra)
        ins = self.agent("home", f"inside-{port}", "-s", service, "-o", outside_addr or f"{VPS4}:{port}",
                         *common, *inside_extra)
        self.wait_status(out, lambda s: s["spares"] >= 1)
        return out, ins

    def stop_agents(self) -> str:
        logs = []
        for name, a in self.agents:
            self.lab.stop(a["proc"])
            logs.append(f"----- {name} -----\n{self.lab.log(name + '.log')}")
        self.agents.clear()
        return "\n".join(logs)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("lab"))
    lab = Lab(tmp)
    try:
        lab.build()
        lab.spawn_tool("home", "echo.log", "echo", "0.0.0.0", str(ECHO_PORT))
        wireguard(lab, tmp)
        yield lab
    finally:
        lab.close()


def wireguard(lab: Lab, tmp: str) -> None:
    """wireguard-go at home (server, port 51820) and on work1 (client, Endpoint = the VPS agent)."""
    keys = {}
    for side in ("home", "work"):
        priv = lab.sh("home", "wg genkey").stdout.strip()
        pub = lab.sh("home", f"echo {priv} | wg pubkey").stdout.strip()
        path = os.path.join(tmp, f"wg-{side}.key")
        with open(path, "w") as f:
            f.write(priv + "\n")
        os.chmod(path, 0o600)
        keys[side] = (path, pub)
    lab.wg_keys = keys  # (private key file, public key) of "home" (the server) and "work" (the client)
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    # wireguard-go's control sockets live in /var/run/wireguard, which namespaces share:
    # interface names of this lab's own, so that two labs at once don't take each other's
    wgh, wgw = f"{lab.prefix}h", f"{lab.prefix}w"
    for ns, ifname in (("home", wgh), ("work1", wgw)):
        lab.spawn(ns, ["wireguard-go", "-f", ifname], f"wireguard-{ns}.log", env=env)
        assert wait_for(lambda ifname=ifname: os.path.exists(f"/var/run/wireguard/{ifname}.sock"), 10), \
            lab.log(f"wireguard-{ns}.log")
    lab.sh("home", f"wg set {wgh} private-key {keys['home'][0]} listen-port {WG_PORT} "
                   f"peer {keys['work'][1]} allowed-ips 100.100.0.2/32; "
                   f"ip addr add 100.100.0.1/24 dev {wgh}; ip link set {wgh} up")
    lab.sh("work1", f"wg set {wgw} private-key {keys['work'][0]} "
                    f"peer {keys['home'][1]} allowed-ips 100.100.0.1/32 endpoint {VPS4}:{PORT}; "
                    f"ip addr add 100.100.0.2/24 dev {wgw}; ip link set {wgw} up")


def wg_ping(lab: Lab, count: int = 3, timeout: float = 20) -> bool:
    return bool(wait_for(lambda: lab.sh("work1", f"ping -c {count} -i 0.2 -W 2 100.100.0.1",
                                        check=False).returncode == 0, timeout, step=0.5))


def flow_times(lab: Lab, log: str) -> list[float]:
    return [float(x) for x in lab.log(log).split()]


def resumed_after(lab: Lab, log: str, t: float, timeout: float = 40) -> float:
    """Seconds from t to the first of three echoes after t."""
    def check():
        after = [x for x in flow_times(lab, log) if x > t]
        return after[0] - t if len(after) >= 3 else None
    took = wait_for(check, timeout)
    assert took is not None, f"traffic did not resume within {timeout} s"
    return took


# 1
def test_without_the_tunnel_work_cannot_reach_the_home_service(lab, net):
    for target in (CARRIER_PUBLIC, HOME4):
        assert lab.tool("work1", "probe", target, str(ECHO_PORT)).returncode == 1
    assert lab.tool("work1", "probe", VPS4, "9998").returncode == 1  # nothing relays yet
    net.pair(f"127.0.0.1:{ECHO_PORT}", 9998)
    assert lab.tool("work1", "probe", VPS4, "9998").returncode == 0


def kernel_path_in_use(net: Net, *agents: dict) -> None:
    """Each agent runs the kernel path, relays its tunnel's directions there, keeps none in user space."""
    for a in agents:
        d = net.wait_status(a, lambda s: s["datapath"].get("flows", 0) >= 2)["datapath"]
        assert (d["path"], d["kept_count"]) == ("kernel", 0), d


# 2
@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_wireguard_through_double_nat_ping_and_bulk_tcp(lab, net, datapath):
    out, ins = net.pair(f"127.0.0.1:{WG_PORT}", PORT, datapath=datapath)
    assert wg_ping(lab), "no ping across WireGuard"
    server = lab.spawn_tool("home", "tcpserve.log", "tcpserve", "100.100.0.1", "8080", str(32 << 20))
    time.sleep(0.5)
    cpu0 = [cpu_seconds(a["proc"].pid) for a in (out, ins)]
    r = lab.tool("work1", "tcpfetch", "100.100.0.1", "8080", str(32 << 20))
    cpu1 = [cpu_seconds(a["proc"].pid) for a in (out, ins)]
    lab.stop(server)
    res = json.loads(r.stdout)
    print(f"bulk TCP over WireGuard over udp-tunnel ({datapath} data path): {res}; the relays' CPU during "
          f"it: outside agent {cpu1[0] - cpu0[0]:.2f} s, inside agent {cpu1[1] - cpu0[1]:.2f} s "
          "(wireguard-go's own CPU bounds the throughput here)")
    assert r.returncode == 0 and res["intact"] and res["bytes"] == 32 << 20
    # 32 MiB in datagrams of at most 1420 bytes went home -> work ("out"), all through one tunnel
    for a in (out, ins):
        net.wait_status(a, lambda s: s["clients"] == 1 and s["totals"]["datagrams_out"] > (32 << 20) // 1420)
    if datapath == "kernel":
        kernel_path_in_use(net, out, ins)
        # both directions left the VPS for its neighbour (redirected in the kernel), nearly every datagram
        program = net.status(out)["datapath"]["program"]
        assert program["relayed"] > (32 << 20) // 1420, program


# 3
def test_idle_longer_than_the_carrier_nat_timeout_then_traffic_resumes(lab, net):
    net.pair(f"127.0.0.1:{WG_PORT}", PORT)
    assert wg_ping(lab)
    # control: a hole nobody keeps open really closes at the carrier NAT
    lab.sh("home", f"python3 -c \"import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                   f".sendto(b'x', ('{VPS4}', 5555))\"")
    assert "dport=5555" in lab.sh("carrier", "conntrack -L -p udp 2>/dev/null").stdout
    time.sleep(CARRIER_UDP_TIMEOUT + 8)
    table = lab.sh("carrier", "conntrack -L -p udp 2>/dev/null").stdout
    assert "dport=5555" not in table, "the carrier NAT timeout is not in force"
    assert f"dport={PORT}" in table  # the tunnels' holes are kept open by the keepalives
    t0 = time.monotonic()
    assert lab.sh("work1", "ping -c 1 -W 2 100.100.0.1", check=False).returncode == 0
    print(f"after {CARRIER_UDP_TIMEOUT + 8} s idle the first ping came back in {time.monotonic() - t0:.2f} s")


def test_after_idling_past_the_carrier_nat_timeout_the_first_datagram_is_answered(lab, net):
    """Both agents at -t 25, the carrier NAT forgets UDP mappings after 20 s: the keepalive
    interval is learned and kept under that, so no idle period loses the first datagram."""
    out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9996, keepalive="25")
    r = lab.tool("work1", "idles", VPS4, "9996", "40,44,48,52", timeout=260)
    res = json.loads(r.stdout)
    st = net.status(ins)
    print(f"first datagram after idling: {res}; keepalive: {st['keepalive']}")
    assert all(x["answered"] for x in res), res
    assert st["keepalive"]["interval"] < CARRIER_UDP_TIMEOUT


def test_behind_a_lenient_nat_the_keepalive_settles_at_its_upper_bound(lab, net):
    """A carrier NAT that keeps idle mappings for 120 s: the learned interval is -t, so no
    more keepalives than with a fixed interval."""
    lab.carrier_udp_timeout(120)
    try:
        out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9994, keepalive="25")
        st = net.wait_status(ins, lambda s: s["keepalive"]["learned"], timeout=150)
        print(f"lenient NAT (120 s): keepalive {st['keepalive']}")
        assert st["keepalive"]["interval"] == 25 and st["keepalive"]["lapses"] == 0
    finally:
        lab.carrier_udp_timeout(CARRIER_UDP_TIMEOUT)


# 4
@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_restart_outside_then_inside_under_traffic(lab, net, datapath):
    out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9998, datapath=datapath)
    flow = lab.spawn_tool("work1", "flow4.log", "flow", VPS4, "9998", "120")
    try:
        resumed_after(lab, "flow4.log", 0)
        t = time.time()
        net.restart(out)
        took_out = resumed_after(lab, "flow4.log", t)
        t = time.time()
        net.restart(ins)
        took_in = resumed_after(lab, "flow4.log", t)
        print(f"traffic resumed {took_out:.2f} s after the outside agent restarted, "
              f"{took_in:.2f} s after the inside agent restarted (keepalive {KEEPALIVE} s, {datapath} data path)")
        if datapath == "kernel":
            kernel_path_in_use(net, out, ins)
    finally:
        lab.stop(flow)


def test_outside_restart_at_the_default_keepalive_resumes_at_once_not_at_the_next_keepalive(lab, net):
    """The restarted outside agent asks the tunnels in its state file to register at once: the
    flow resumes as soon as the new agent is up, not at the next keepalive (25 s). Timed from the
    new agent's start (its control socket), so that the box's load on Python's start-up does not
    count; the time from the stop is printed too."""
    state = os.path.join(net.tmp, "outside.state")
    out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9997, keepalive="25", outside_extra=("--state-file", state))
    flow = lab.spawn_tool("work1", "flow4b.log", "flow", VPS4, "9997", "60")
    try:
        resumed_after(lab, "flow4b.log", 0)
        time.sleep(2.5)  # the state file is written every 2 s
        t = time.time()
        net.restart(out)
        up = time.time()
        after_up = resumed_after(lab, "flow4b.log", up)
        times = [x for x in flow_times(lab, "flow4b.log") if t - 1 <= x <= up + after_up + 0.1]
        gap = max(b - a for a, b in zip(times, times[1:], strict=False))
        print(f"traffic resumed {after_up:.2f} s after the restarted outside agent was up (the longest gap "
              f"between echoes: {gap:.2f} s, of which {up - t:.2f} s stopping and starting; keepalive 25 s, "
              "state file)")
        assert after_up < 2.0
    finally:
        lab.stop(flow)


# 5
@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_nat_rebinding_keeps_the_conversation(lab, net, datapath):
    out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9998, datapath=datapath)
    flow = lab.spawn_tool("work1", "flow5.log", "flow", VPS4, "9998", "120")
    try:
        resumed_after(lab, "flow5.log", 0)
        before = net.wait_status(out, lambda s: s["clients"] == 1)
        t = time.time()
        for router in ("hrouter", "carrier"):
            lab.sh(router, "conntrack -F 2>/dev/null")
        took = resumed_after(lab, "flow5.log", t)
        tb = [x for x in before["tunnels"] if x["state"] == "active"][0]

        def moved(s):
            return any(x["id"] == tb["id"] and x["endpoint"] != tb["endpoint"] for x in s["tunnels"])
        after = net.wait_status(out, moved)
        ta = [x for x in after["tunnels"] if x["id"] == tb["id"]][0]
        print(f"NAT rebinding: tunnel moved {tb['endpoint']} -> {ta['endpoint']}, traffic resumed in {took:.2f} s "
              f"({datapath} data path)")
        assert ta["client"] == tb["client"] and ta["rebinds"] == 1
        if datapath == "kernel":
            kernel_path_in_use(net, out, ins)
            resumed_after(lab, "flow5.log", time.time())  # and on it goes, in the kernel
            assert net.status(out)["datapath"]["flows"] == 2
    finally:
        lab.stop(flow)


# 6
def test_inside_agent_over_ipv6_serves_an_ipv4_wireguard_client(lab, net):
    out, _ = net.pair(f"127.0.0.1:{WG_PORT}", PORT, outside_addr=f"[{VPS6}]:{PORT}")
    st = net.status(out)
    assert all(t["endpoint"].startswith("[2001:db8:1::2]") for t in st["tunnels"]), st["tunnels"]
    assert wg_ping(lab)
    server = lab.spawn_tool("home", "tcpserve6.log", "tcpserve", "100.100.0.1", "8081", str(2 << 20))
    time.sleep(0.5)
    r = lab.tool("work1", "tcpfetch", "100.100.0.1", "8081", str(2 << 20))
    lab.stop(server)
    assert r.returncode == 0, r.stdout + r.stderr


# 7
def _attack_round(lab: Lab, net: Net, out: dict, capfile: str, clients: int) -> dict:
    attack = lab.spawn_tool("attacker", "attack.log", "attack", VPS4, "9998", capfile, "6")
    time.sleep(1.0)
    r = json.loads(lab.tool("work2", "converse", VPS4, "9998", str(clients), "3").stdout)
    attack.wait(20)
    result = json.loads(lab.log("attack.log").strip().splitlines()[-1])
    result["clients_done"] = r["done"]
    return result


@pytest.mark.parametrize("legacy", [False, True], ids=["v3", "legacy"])
def test_forged_and_replayed_keepalives_from_an_attacker(lab, net, legacy):
    out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9998, legacy=legacy)
    sniff = lab.spawn(
        "inet", ["python3", os.path.join(ROOT, "tests", "lab", "tool.py"), "sniff", "to-vps", "9998", "12"],
        "capture.txt")
    assert json.loads(lab.tool("work1", "converse", VPS4, "9998", "2", "3").stdout)["done"] == 2
    sniff.wait(20)
    want = proto.LEGACY_LEN if legacy else proto.CTRL_LEN
    caps = [c for c in lab.log("capture.txt").split() if len(c) == 2 * want]
    assert len(caps) >= 3, "no keepalives captured on the wire"
    capfile = os.path.join(net.tmp, "caps.txt")
    with open(capfile, "w") as f:
        f.write("\n".join(caps))
    before = _attack_round(lab, net, out, capfile, 10)
    net.restart(out)  # right after an outside restart
    after = _attack_round(lab, net, out, capfile, 10)
    print(f"{'legacy' if legacy else 'v3'}: attacker replayed {len(caps)} captured keepalives; "
          f"client datagrams it received: {before['client_datagrams']} before, "
          f"{after['client_datagrams']} right after an outside restart")
    assert before["clients_done"] == 10 and after["clients_done"] == 10
    if not legacy:
        assert before["client_datagrams"] == 0 and after["client_datagrams"] == 0


# 8
def test_fifty_clients_on_two_work_hosts_no_cross_talk(lab, net):
    net.pair(f"127.0.0.1:{ECHO_PORT}", 9998, "--spares", "4")
    procs = [lab.spawn_tool(w, f"converse-{w}.log", "converse", VPS4, "9998", "25", "20") for w in ("work1", "work2")]
    for p in procs:
        p.wait(120)
    results = [json.loads(lab.log(f"converse-{w}.log").strip().splitlines()[-1]) for w in ("work1", "work2")]
    print(f"50 clients on two hosts: {results}")
    for r in results:
        assert r["done"] == 25 and r["complete"] == 500 and r["wrong"] == 0


def test_twenty_new_clients_at_once_on_two_hosts_get_their_first_datagram_answered(lab, net):
    net.pair(f"127.0.0.1:{ECHO_PORT}", 9995)  # default options
    time.sleep(1)
    procs = [lab.spawn_tool(w, f"burst-{w}.log", "burst", VPS4, "9995", "10") for w in ("work1", "work2")]
    for p in procs:
        p.wait(30)
    results = [json.loads(lab.log(f"burst-{w}.log").strip().splitlines()[-1]) for w in ("work1", "work2")]
    answered = sum(r["answered"] for r in results)
    print(f"20 new clients at once on two hosts: {results}")
    assert sum(r["wrong"] for r in results) == 0
    assert answered >= 19, results


# 9 (issue 2: the outside host name is looked up again when the outside stops answering)
@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_a_vps_that_changes_address_is_found_again_by_name(lab, net, datapath):
    """(With the kernel path the inside agent pipes its tunnels again from their new sockets.)"""
    lab.hosts("home", f"127.0.0.1 localhost\n{VPS4} vps.lab.test\n")
    out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9997, outside_addr="vps.lab.test:9997", datapath=datapath)
    assert lab.tool("work1", "probe", VPS4, "9997").returncode == 0
    new = "198.51.100.11"
    try:
        lab.hosts("home", f"127.0.0.1 localhost\n{new} vps.lab.test\n")
        lab.sh("vps", f"ip addr del {VPS4}/28 dev eth0; ip addr add {new}/28 dev eth0; "
                      "ip route replace default via 198.51.100.1")
        t = time.time()
        flow = lab.spawn_tool("work1", "flow9.log", "flow", new, "9997", "60")
        took = resumed_after(lab, "flow9.log", t, timeout=50)
        lab.stop(flow)
        print(f"the VPS moved to {new}: the inside agent found it again by name; "
              f"traffic resumed after {took:.1f} s (keepalive {KEEPALIVE} s, {datapath} data path)")
        assert "outside agent address changed" in lab.log("inside-9997.log")
        if datapath == "kernel":
            kernel_path_in_use(net, ins)
    finally:
        lab.sh("vps", f"ip addr del {new}/28 dev eth0; ip addr add {VPS4}/28 dev eth0; "
                      "ip route replace default via 198.51.100.1", check=False)


# 10 (issue 9: WireGuard mode)
def wg_client_if(lab: Lab) -> str:
    """The WireGuard interface on work1, whatever the lab named it (the one that is not lo or eth0)."""
    names = set(lab.sh("work1", "ls /sys/class/net").stdout.split()) - {"lo", "eth0"}
    assert len(names) == 1, names
    return names.pop()


def wg_client_fresh(lab: Lab, listen_port: int) -> None:
    """The WireGuard client forgets its session and sends from a new port: its next packet is
    a handshake initiation from an address the outside agent has never seen."""
    home_pub = lab.wg_keys["home"][1]
    wgw = wg_client_if(lab)
    lab.sh("work1", f"wg set {wgw} peer {home_pub} remove; wg set {wgw} listen-port {listen_port} "
                    f"peer {home_pub} allowed-ips 100.100.0.1/32 endpoint {VPS4}:{PORT}")


def wg_handshake_seconds(lab: Lab, listen_port: int) -> float | None:
    """Time from a fresh client's first ping to its answer: the handshake and one round trip.
    ping -W 4 ends before WireGuard would send a second initiation (after 5 s): None if the
    first one got no answer."""
    # the server takes at most one initiation per peer every 20 ms, and only with a newer time
    # stamp (wireguard-go rounds them to ~17 ms): leave room after the previous handshake
    time.sleep(0.5)
    wg_client_fresh(lab, listen_port)
    t0 = time.monotonic()
    r = lab.sh("work1", "ping -c 1 -W 4 100.100.0.1", check=False)
    return time.monotonic() - t0 if r.returncode == 0 else None


def latest_handshake(lab: Lab) -> int:
    return int(lab.sh("work1", f"wg show {wg_client_if(lab)} latest-handshakes").stdout.split()[1])


def test_wireguard_mode_admits_a_real_client_while_an_attacker_sprays(lab, net):
    out, ins = net.pair(f"127.0.0.1:{WG_PORT}", PORT, outside_extra=("--wireguard-key", lab.wg_keys["home"][1]))
    quiet = [wg_handshake_seconds(lab, 41000 + i) for i in range(3)]
    spray = lab.spawn_tool("attacker", "spray.log", "spray", VPS4, str(PORT), "1000", "10", "300")
    time.sleep(1.0)
    sprayed = [wg_handshake_seconds(lab, 41100 + i) for i in range(3)]
    spray.wait(30)
    res = json.loads(lab.log("spray.log").strip().splitlines()[-1])

    def wg_refused(s):
        return sum(v for k, v in s["stats"].items() if k.startswith("drop_wg_"))
    st = net.wait_status(out, lambda s: wg_refused(s) >= res["sent"], timeout=10)  # published once a second
    refused = {k: v for k, v in st["stats"].items() if k.startswith("drop_wg_")}
    clients = sorted(t["client"] for t in st["tunnels"] if t["client"])
    ins_st = net.status(ins)
    print(f"WireGuard handshake + first ping through an outside agent with --wireguard-key: "
          f"{', '.join(f'{x:.3f}' for x in quiet if x)} s quiet; {', '.join(f'{x:.3f}' for x in sprayed if x)} s "
          f"while the attacker sprayed {res['sent']} datagrams from {res['ports']} ports in {res['seconds']} s; "
          f"refused by the outside agent: {refused}; answers the attacker got: {res['received']}; "
          f"tunnels in use: {len(clients)} (all the WireGuard client's), active at the inside: {ins_st['clients']}")
    assert None not in quiet and None not in sprayed, "a handshake needed a second initiation"
    assert res["sent"] >= 9000 and res["received"] == 0
    assert sum(refused.values()) == res["sent"]  # every sprayed datagram, and nothing else, refused
    assert len(clients) == 6 and all(c.startswith("203.0.113.18:") for c in clients), clients  # work's NAT
    assert ins_st["clients"] == 6
    assert all(t["wireguard"]["admitted"] == "handshake" for t in st["tunnels"] if t["client"])


@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_wireguard_client_whose_nat_mapping_is_flushed_mid_transfer_roams_without_a_handshake(lab, net, datapath):
    out, ins = net.pair(f"127.0.0.1:{WG_PORT}", PORT, outside_extra=("--wireguard-key", lab.wg_keys["home"][1]),
                        datapath=datapath)
    assert wg_handshake_seconds(lab, 42000) is not None
    flow = lab.spawn_tool("work1", "flow10.log", "flow", "100.100.0.1", str(ECHO_PORT), "30")
    # the work router gives a new mapping a random port (as carrier NATs do), not the old one
    lab.sh("wrouter", 'nft flush chain ip nat post; nft add rule ip nat post oifname "wan" masquerade fully-random')
    try:
        resumed_after(lab, "flow10.log", 0)
        before = net.wait_status(out, lambda s: s["clients"] == 1)
        tb = [x for x in before["tunnels"] if x["client"]][0]
        hs = latest_handshake(lab)
        time.sleep(1.0)
        t = time.time()
        lab.sh("wrouter", "conntrack -D -p udp --orig-src 192.0.2.66 2>/dev/null")
        resumed_after(lab, "flow10.log", t + 0.5, timeout=20)
        after = net.wait_status(out, lambda s: s["stats"].get("wg_roams") == 1)
        ta = [x for x in after["tunnels"] if x["id"] == tb["id"]][0]
        time.sleep(2.0)
        hs_after = latest_handshake(lab)
        # the stall: the longest time without an echo around the flush (one every 20 ms otherwise)
        times = [x for x in flow_times(lab, "flow10.log") if t - 1 < x < t + 3]
        took = max(b - a for a, b in zip(times, times[1:], strict=False))
        print(f"WireGuard roaming: client {tb['client']} -> {ta['client']} on tunnel {ta['id']}, longest "
              f"time without an echo around the NAT flush: {took:.2f} s ({len(times)} echoes in those 4 s), "
              f"new handshakes: {0 if hs_after == hs else 'yes'}; outside: {after['stats'].get('wg_roam_waits', 0)} "
              f"datagrams forwarded while the old address was checked for silence")
        assert ta["client"] != tb["client"] and ta["client"].startswith("203.0.113.18:")
        assert ta["wireguard"]["roams"] == 1 and after["clients"] == 1
        assert hs_after == hs, "WireGuard needed a new handshake"
        assert took < 5.0  # printed above; WireGuard alone would have waited ~15 s for a new handshake
        if datapath == "kernel":  # the tunnel follows its client in the kernel's map too
            kernel_path_in_use(net, out, ins)
            ours = [k for k in net.status(out)["datapath"].get("kept", {})]
            assert ours == []
    finally:
        lab.stop(flow)
        lab.sh("wrouter", 'nft flush chain ip nat post; nft add rule ip nat post oifname "wan" masquerade')


# 11 (issue 19: the kernel data path leaves nothing behind)
def _our_programs(lab: Lab, ns: str) -> list[str]:
    """The interfaces of namespace ns with one of our programs attached, as "name:count"."""
    code = ("import socket; from udp_tunnel.io import bpf; print(' '.join(f'{n}:{c}' for i, n in "
            "socket.if_nameindex() if (c := sum(bpf.prog_name_by_id(p) == 'udpt_relay' "
            "for p in bpf.prog_ids(i)))))")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    r = subprocess.run(["ip", "netns", "exec", lab.ns(ns), "python3", "-c", code], capture_output=True, text=True,
                       timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


@pytest.mark.parametrize("which", ["outside", "inside"])
def test_an_agent_killed_with_sigkill_leaves_no_program_attached_and_its_successor_carries_on(lab, net, which):
    out, ins = net.pair(f"127.0.0.1:{ECHO_PORT}", 9993, datapath="kernel")
    agent, ns = (out, "vps") if which == "outside" else (ins, "home")
    flow = lab.spawn_tool("work1", "flow11.log", "flow", VPS4, "9993", "60")
    try:
        resumed_after(lab, "flow11.log", 0)
        kernel_path_in_use(net, out, ins)
        attached = _our_programs(lab, ns)
        assert sorted(attached) == (["eth0:1", "lo:1"] if ns == "vps" else ["eth0:1", "lo:1"]), attached
        agent["proc"].send_signal(signal.SIGKILL)
        assert agent["proc"].wait(10) == -signal.SIGKILL
        gone = wait_for(lambda: _our_programs(lab, ns) == [], 5, step=0.1)
        assert gone, f"still attached after SIGKILL: {_our_programs(lab, ns)}"
        os.unlink(agent["control"])  # (a killed agent leaves its socket; the next one would clear it too)
        t = time.time()
        new = net.agent(agent["ns"], agent["name"], *agent["args"])
        took = resumed_after(lab, "flow11.log", t)
        print(f"{which} agent killed with SIGKILL: nothing of ours stayed attached; its successor carried the "
              f"flow again after {took:.2f} s")
        kernel_path_in_use(net, new)
    finally:
        lab.stop(flow)
