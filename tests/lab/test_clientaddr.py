"""The service sees each client's real address (issue 20): the pieces under the inside agent.

In two namespaces of their own (root only, skipped otherwise):

    home (192.0.2.2, 2001:db8:1::2: services, the driver, go-mmproxy, wireguard-go)
      └─eth0── lan (192.0.2.1, 2001:db8:1::1: home's default route; the WireGuard client)

Client addresses are documentation addresses that are not local to home
(198.51.100.0/24, 2001:db8:9::/64): an answer that does not come back through
the policy routing leaves home by its default route, to lan, where it is seen.
clientaddr_tool.py has the programs; its `driver` makes the calls the inside
agent's I/O layer makes, one JSON request at a time.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import time

import pytest
from netlab import ROOT, Lab, wait_for

pytestmark = pytest.mark.netns

TOOL = os.path.join(ROOT, "tests", "lab", "clientaddr_tool.py")
LABTOOL = os.path.join(ROOT, "tests", "lab", "tool.py")
TABLE = 21844
C1, C2 = "198.51.100.7", "198.51.100.8"
C6 = "2001:db8:9::7"
SVC4, SVC6, WILD = ("127.0.0.1", 7000), ("::1", 7000), 7001
TOOLS = ["ip", "setpriv"]


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the client-address lab needs root (network namespaces, IP_TRANSPARENT, policy routing)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"the client-address lab needs {', '.join(missing)} (.ci/run installs them)"
    return None


if _why_not():
    pytest.skip(_why_not(), allow_module_level=True)


class HomeLab(Lab):
    def build(self) -> None:
        for name in ("cahome", "calan"):
            subprocess.run(["ip", "netns", "add", self.ns(name)], check=True)
            self.namespaces.append(self.ns(name))
            self.sh(name, "ip link set lo up; sysctl -qw net.ipv6.conf.all.accept_dad=0 "
                          "net.ipv6.conf.default.accept_dad=0")
        a, b = f"{self.prefix}ca", f"{self.prefix}cb"
        subprocess.run(["ip", "link", "add", a, "netns", self.ns("cahome"), "type", "veth",
                        "peer", "name", b, "netns", self.ns("calan")], check=True)
        self.sh("cahome", f"ip link set {a} name eth0; ip addr add 192.0.2.2/28 dev eth0; "
                          "ip addr add 2001:db8:1::2/64 dev eth0 nodad; ip link set eth0 up; "
                          "ip route add default via 192.0.2.1; ip -6 route add default via 2001:db8:1::1")
        self.sh("calan", f"ip link set {b} name eth0; ip addr add 192.0.2.1/28 dev eth0; "
                         "ip addr add 2001:db8:1::1/64 dev eth0 nodad; ip link set eth0 up")


class Driver:
    """The driver program in a namespace; call it with an op and its fields."""

    def __init__(self, lab: Lab, ns: str, prefix: list[str] | None = None, log: str = "driver.log") -> None:
        err = open(os.path.join(lab.tmp, log), "a")
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.ns(ns), *(prefix or []), "python3", TOOL, "driver"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        err.close()
        lab.procs.append((log, self.p))
        self.lab = lab

    def __call__(self, op: str, **kw) -> dict:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        if not select.select([self.p.stdout], [], [], 20)[0]:
            raise AssertionError(f"the driver did not answer {op}")
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.lab.stop(self.p)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = HomeLab(str(tmp_path_factory.mktemp("clientaddr")))
    try:
        lab.build()
        for host, port in (SVC4, SVC6, ("0.0.0.0", WILD), ("192.0.2.2", 7002), ("127.0.0.1", 7003)):
            lab.spawn("cahome", ["python3", TOOL, "seen", host, str(port)], "seen.log")
        lab.spawn("calan", ["python3", TOOL, "seen", "192.0.2.1", "7000"], "seen-lan.log")
        time.sleep(0.5)
        yield lab
    finally:
        lab.close()


def rules(lab: Lab) -> str:
    return lab.sh("cahome", "ip rule; ip -6 rule").stdout


def table(lab: Lab) -> str:
    return lab.sh("cahome", f"ip route show table {TABLE}; ip -6 route show table {TABLE}", check=False).stdout


@pytest.fixture
def drv(lab, request):
    d = Driver(lab, "cahome")
    yield d
    d.close()
    # whatever a test left (a failing one): at most a few rules a family
    lab.sh("cahome", f"for i in 1 2 3 4 5 6; do ip rule del lookup {TABLE}; ip -6 rule del lookup {TABLE}; done "
                     f"2>/dev/null; ip route flush table {TABLE}; ip -6 route flush table {TABLE}", check=False)
    assert str(TABLE) not in rules(lab)


def routing(d: Driver, *services, action: str = "install") -> list[str]:
    r = d("routing", services=list(services), table=TABLE, action=action)
    assert "error" not in r, r
    return r["result"]


def test_the_service_sees_the_client_address_and_its_answers_come_back_through_the_policy_routing(lab, drv):
    assert routing(drv, SVC4) == [f"ip route add local 0.0.0.0/0 dev lo table {TABLE} proto 85",
                                  f"ip rule add from 127.0.0.1 iif lo ipproto udp sport 7000 lookup {TABLE} proto 85"]
    assert drv("open", id="a", client=[C1, 40000], service=SVC4) == {"bound": [C1, 40000], "exact": True}
    for i in range(3):
        drv("send", id="a", data=f"d{i}")
        assert drv("recv", id="a") == {"data": f"{C1} 40000|d{i}"}


def test_without_the_policy_routing_the_answers_never_reach_the_socket(lab, drv):
    drv("open", id="a", client=[C1, 40000], service=SVC4)
    drv("send", id="a", data="x")
    assert drv("recv", id="a", timeout=1.0) == {"data": None}
    assert drv("check", service=SVC4, client=[C1, 40000]) == {"result": False}
    routing(drv, SVC4)
    assert drv("check", service=SVC4, client=[C1, 40000]) == {"result": True}


def test_two_clients_behind_one_nat_address_with_different_ports_stay_apart(lab, drv):
    routing(drv, SVC4)
    drv("open", id="a", client=[C1, 40000], service=SVC4)
    drv("open", id="b", client=[C1, 40001], service=SVC4)
    drv("send", id="b", data="to b")
    drv("send", id="a", data="to a")
    assert drv("recv", id="a") == {"data": f"{C1} 40000|to a"}
    assert drv("recv", id="b") == {"data": f"{C1} 40001|to b"}
    assert drv("recv", id="a", timeout=0.5) == {"data": None}


def test_after_a_move_the_service_sees_the_new_address_and_answers_in_flight_to_the_old_one_arrive(lab, drv):
    routing(drv, SVC4)
    drv("open", id="a", client=[C1, 40000], service=SVC4)
    drv("send", id="a", data="before")  # its answer is on its way to the old address while the client moves
    assert drv("move", id="a", client=[C2, 41000]) == {"bound": [C2, 41000], "revived": False}
    drv("send", id="a", data="after")
    assert drv("recv", id="a") == {"data": f"{C2} 41000|after"}
    assert drv("recv", id="a", old=True) == {"data": f"{C1} 40000|before"}
    # and back: the old socket (still draining) is taken again
    assert drv("move", id="a", client=[C1, 40000]) == {"bound": [C1, 40000], "revived": True}
    drv("send", id="a", data="back")
    assert drv("recv", id="a") == {"data": f"{C1} 40000|back"}


def test_ipv6_clients_reach_an_ipv6_service_address_the_same_way(lab, drv):
    routing(drv, SVC6)
    assert drv("open", id="a", client=[C6, 40000], service=SVC6) == {"bound": [C6, 40000], "exact": True}
    drv("send", id="a", data="six")
    assert drv("recv", id="a") == {"data": f"{C6} 40000|six"}
    drv("move", id="a", client=["2001:db8:9::8", 40002])
    drv("send", id="a", data="moved")
    assert drv("recv", id="a") == {"data": "2001:db8:9::8 40002|moved"}


def test_an_ipv4_client_cannot_be_shown_to_an_ipv6_service_address(lab, drv):
    r = drv("open", id="a", client=[C1, 40000], service=SVC6)
    assert r["error"] == ("ClientAddressError: client 198.51.100.7:40000: an IPv4 client needs an IPv4 address "
                          "of the service (it has [::1]:7000)")


def test_stopping_removes_the_rules_and_the_table_route_and_installing_twice_adds_nothing(lab, drv):
    before = rules(lab)
    assert len(routing(drv, SVC4, SVC6)) == 4
    assert routing(drv, SVC4, SVC6) == []
    assert rules(lab).count(f"lookup {TABLE}") == 2
    assert table(lab).split("\n")[:2] == ["local default dev lo proto 85 scope host ",
                                          "local default dev lo proto 85 metric 1024 pref medium"]
    assert len(routing(drv, SVC4, SVC6, action="remove")) == 4
    assert routing(drv, SVC4, SVC6, action="remove") == []
    assert rules(lab) == before and table(lab) == ""


def test_a_table_holding_routes_of_the_user_is_refused_and_left_as_it_was(lab, drv):
    lab.sh("cahome", f"ip route add 203.0.113.0/24 via 192.0.2.1 table {TABLE}")
    try:
        r = drv("routing", services=[SVC4], table=TABLE, action="install")
        assert r["error"] == (f"RoutingError: routing table {TABLE} already holds routes that udp-tunnel did not add "
                              "(such as 203.0.113.0/24): --client-address transparent needs it for its own "
                              "route alone; move those routes to another table")
        assert table(lab) == "203.0.113.0/24 via 192.0.2.1 dev eth0 \n" and str(TABLE) not in rules(lab)
    finally:
        lab.sh("cahome", f"ip route flush table {TABLE}")


def test_a_set_up_done_by_hand_is_used_and_left_in_place_at_stop(lab, drv):
    lab.sh("cahome", f"ip route add local 0.0.0.0/0 dev lo table {TABLE}; "
                     f"ip rule add from 127.0.0.1 iif lo ipproto udp sport 7000 lookup {TABLE}")
    try:
        assert routing(drv, SVC4, action="missing") == []
        assert routing(drv, SVC4) == [] and routing(drv, SVC4, action="remove") == []
        assert f"lookup {TABLE}" in rules(lab) and table(lab) == "local default dev lo scope host \n"
    finally:
        lab.sh("cahome", f"ip rule del from 127.0.0.1 iif lo ipproto udp sport 7000 lookup {TABLE}")


def test_a_second_agent_sharing_the_table_keeps_its_route_until_it_stops_too(lab, drv):
    other = Driver(lab, "cahome", log="driver2.log")
    try:
        routing(drv, SVC4)
        routing(other, ["127.0.0.1", 7003])
        routing(drv, SVC4, action="remove")
        assert "sport 7003" in rules(lab) and "local default" in table(lab)
        other("open", id="a", client=[C1, 40000], service=["127.0.0.1", 7003])
        other("send", id="a", data="still")
        assert other("recv", id="a") == {"data": f"{C1} 40000|still"}
        routing(other, ["127.0.0.1", 7003], action="remove")
        assert table(lab) == ""
    finally:
        other.close()


def test_the_same_client_address_talking_to_two_services_gets_each_answer_on_its_own_socket(lab, drv):
    routing(drv, SVC4, ["127.0.0.1", 7003])
    drv("open", id="a", client=[C1, 40000], service=SVC4)
    drv("open", id="b", client=[C1, 40000], service=["127.0.0.1", 7003])
    drv("send", id="b", data="b")
    drv("send", id="a", data="a")
    assert drv("recv", id="a") == {"data": f"{C1} 40000|a"}
    assert drv("recv", id="b") == {"data": f"{C1} 40000|b"}


def test_a_client_whose_port_a_socket_on_all_addresses_holds_keeps_its_address_with_another_port(lab, drv):
    routing(drv, SVC4)
    r = drv("open", id="a", client=[C1, WILD], service=SVC4, exact_only=True)
    assert r["errno"] == 98  # EADDRINUSE: 0.0.0.0:7001 is the wildcard service's
    r = drv("open", id="a", client=[C1, WILD], service=SVC4)
    assert r["exact"] is False and r["bound"][0] == C1 and r["bound"][1] != WILD
    drv("send", id="a", data="x")
    assert drv("recv", id="a") == {"data": f"{C1} {r['bound'][1]}|x"}


def test_a_service_on_all_addresses_is_warned_about_and_its_answers_really_leave_by_eth0(lab, drv):
    service = ["127.0.0.1", WILD]
    warning = drv("warning", service=service, client=[C1, 40000])["result"]
    assert warning == (
        "--client-address transparent: the service listens on 0.0.0.0:7001 (all addresses) and the agent sends "
        "to it at 127.0.0.1:7001: unless it answers from the address it was reached at (as WireGuard does), it "
        "answers a client such as 198.51.100.7:40000 from 192.0.2.2 on eth0, and those answers leave on eth0 for "
        "the client's real address instead of coming back to the agent. Bind the service to 127.0.0.1:7001")
    routing(drv, service)
    sniff = lab.spawn("calan", ["python3", LABTOOL, "sniff", "eth0", "40000", "4"], "leak.txt")
    time.sleep(1.0)
    drv("open", id="a", client=[C1, 40000], service=service)
    drv("send", id="a", data="leak")
    assert drv("recv", id="a", timeout=1.0) == {"data": None}
    sniff.wait(10)
    assert lab.log("leak.txt").split() == [f"{C1} 40000|leak".encode().hex()]  # seen on the lan, not at home


def test_no_warning_for_a_service_bound_to_the_address_the_agent_sends_to(lab, drv):
    assert drv("warning", service=SVC4, client=[C1, 40000]) == {"result": None}
    assert drv("warning", service=SVC6, client=[C6, 40000]) == {"result": None}


def test_a_service_on_another_host_is_warned_about(lab, drv):
    r = drv("warning", service=["192.0.2.1", 7000], client=[C1, 40000])
    assert r["result"].startswith("--client-address transparent: the service 192.0.2.1:7000 is not on this host")


def test_the_rule_for_a_lan_service_address_is_narrow_enough_that_the_host_still_talks_from_that_address(lab, drv):
    probe = "python3 -c \"import socket; s = socket.socket(); s = socket.socket(2, 2); s.settimeout(1); " \
            "s.bind(('192.0.2.2', 0)); s.sendto(b'x', ('192.0.2.1', 7000)); print(s.recv(100).decode())\""
    routing(drv, ["192.0.2.2", 7002])
    assert lab.sh("cahome", probe).stdout.startswith("192.0.2.2 ")
    # go-mmproxy's rule adapted only by its address would take everything this host sends from it
    lab.sh("cahome", "ip rule add from 192.0.2.2 iif lo lookup 21844 priority 100")
    try:
        assert lab.sh("cahome", probe, check=False).returncode != 0
    finally:
        lab.sh("cahome", "ip rule del priority 100")


@pytest.mark.parametrize("drop, manage, expect", [
    ("-net_admin,-net_raw", True,
     "--client-address transparent needs CAP_NET_ADMIN, to bind service sockets to the clients' addresses and to "
     "set up the policy routing: run the inside agent as root, or give it AmbientCapabilities=CAP_NET_ADMIN in "
     "its systemd unit"),
    ("-net_admin", True,
     "--client-address transparent needs CAP_NET_ADMIN, to bind service sockets to the clients' addresses and to "
     "set up the policy routing (it has CAP_NET_RAW only): run the inside agent as root, or give it "
     "AmbientCapabilities=CAP_NET_ADMIN in its systemd unit"),
    ("-net_admin", False, None),
], ids=["neither", "net_raw only", "net_raw only, routing set up by the unit"])
def test_without_the_capabilities_the_agent_says_what_it_needs_in_one_line(lab, drop, manage, expect):
    d = Driver(lab, "cahome", prefix=["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}"], log="nocap.log")
    try:
        assert d("privileges", manage=manage) == {"result": expect}
        opened = d("open", id="a", client=[C1, 40000], service=SVC4)
        if "net_raw" in drop:
            assert opened["error"] == "PrivilegeError: " + (
                "--client-address transparent needs CAP_NET_ADMIN or CAP_NET_RAW, to bind service sockets to the "
                "clients' addresses: run the inside agent as root, or give it AmbientCapabilities=CAP_NET_RAW in "
                "its systemd unit")
        else:
            assert opened == {"bound": [C1, 40000], "exact": True}  # CAP_NET_RAW is enough for the sockets
        if manage:
            r = d("routing", services=[SVC4], table=TABLE, action="install")
            assert r["error"].startswith("RoutingError: --client-address transparent needs CAP_NET_ADMIN")
    finally:
        d.close()


# --- PROXY v2 in front of Debian's go-mmproxy ---

MM_TABLE, MM_PORT, MM_SVC = 21845, 7100, 7101


@pytest.fixture(scope="module")
def mmproxy(lab):
    if shutil.which("go-mmproxy") is None:
        pytest.skip("go-mmproxy is not installed (.ci/run installs it)")
    for host in ("127.0.0.1", "::1"):
        lab.spawn("cahome", ["python3", TOOL, "seen", host, str(MM_SVC)], "seen-mm.log")
    # its UDP sockets dial the service from the client's address: the same policy routing
    d = Driver(lab, "cahome", log="driver-mm.log")
    services = [["127.0.0.1", MM_SVC], ["::1", MM_SVC]]
    assert "error" not in d("routing", services=services, table=MM_TABLE, action="install")
    p = lab.spawn("cahome", ["go-mmproxy", "-p", "udp", "-l", f"[::]:{MM_PORT}", "-4", f"127.0.0.1:{MM_SVC}",
                             "-6", f"[::1]:{MM_SVC}", "-v", "2"], "go-mmproxy.log")
    assert wait_for(lambda: "listening" in lab.log("go-mmproxy.log"), 10), lab.log("go-mmproxy.log")
    yield d
    lab.stop(p)
    assert d("routing", services=services, table=MM_TABLE, action="remove")["result"]
    d.close()


@pytest.mark.parametrize("client, front, service", [
    ((C1, 40000), ("127.0.0.1", MM_PORT), ("127.0.0.1", MM_SVC)),
    ((C6, 40000), ("::1", MM_PORT), ("::1", MM_SVC)),
], ids=["ipv4", "ipv6"])
def test_go_mmproxy_gives_the_service_the_client_address_from_a_header_before_every_datagram(
        lab, mmproxy, client, front, service):
    mmproxy("front", id="e", client=list(client), front=list(front), service=list(service), mode="proxy-v2")
    for i in range(3):
        assert mmproxy("send", id="e", data=f"d{i}") == {"sent": (28 if ":" not in client[0] else 52) + 2}
        # the answer, as the service wrote it: go-mmproxy sends no header back
        assert mmproxy("recv", id="e") == {"data": f"{client[0]} {client[1]}|d{i}"}


def test_go_mmproxy_drops_datagrams_without_a_header_so_proxy_v2_first_is_not_for_it(lab, mmproxy):
    mmproxy("front", id="f", client=[C1, 40010], front=["127.0.0.1", MM_PORT], service=["127.0.0.1", MM_SVC],
            mode="proxy-v2-first")
    mmproxy("send", id="f", data="first")
    assert mmproxy("recv", id="f") == {"data": f"{C1} 40010|first"}
    for data in ("second", "third"):
        mmproxy("send", id="f", data=data)
        assert mmproxy("recv", id="f", timeout=1.0) == {"data": None}
    assert "PROXY header missing" in lab.log("go-mmproxy.log")


def test_through_go_mmproxy_a_client_that_moves_shows_its_new_address(lab, mmproxy):
    mmproxy("front", id="m", client=[C1, 40020], front=["127.0.0.1", MM_PORT], service=["127.0.0.1", MM_SVC],
            mode="proxy-v2")
    mmproxy("send", id="m", data="a")
    assert mmproxy("recv", id="m") == {"data": f"{C1} 40020|a"}
    assert mmproxy("move", id="m", client=[C2, 40021]) == {"new_socket": False}
    mmproxy("send", id="m", data="b")
    assert mmproxy("recv", id="m") == {"data": f"{C2} 40021|b"}


def test_go_mmproxy_takes_an_ipv4_client_in_an_ipv6_header_from_an_ipv4_sender_only(lab, mmproxy):
    """The mixed case (an IPv4 client, an IPv6 destination): the header is AF_INET6 with the
    client IPv4-mapped. go-mmproxy 2.1 dials the service in the family of the datagram's
    sender, so the client must come to it over IPv4 (as with transparent sockets)."""
    mmproxy("front", id="x", client=[C1, 40030], front=["127.0.0.1", MM_PORT], service=["::1", MM_SVC],
            mode="proxy-v2")
    assert mmproxy("send", id="x", data="mixed") == {"sent": 52 + 5}
    assert mmproxy("recv", id="x") == {"data": f"{C1} 40030|mixed"}
    mmproxy("front", id="y", client=[C2, 40031], front=["::1", MM_PORT], service=["::1", MM_SVC], mode="proxy-v2")
    mmproxy("send", id="y", data="mixed")
    assert mmproxy("recv", id="y", timeout=1.0) == {"data": None}
    assert "no suitable address found" in lab.log("go-mmproxy.log")


# --- WireGuard: the server lists the announced address as the peer's endpoint ---

WG_TABLE, WG_PORT, RELAY_PORT, CLIENT_PORT = 21846, 51820, 9000, 41000


@pytest.fixture(scope="module")
def wireguard(lab):
    missing = [t for t in ("wireguard-go", "wg") if shutil.which(t) is None]
    if missing or not os.path.exists("/dev/net/tun"):
        pytest.skip(f"WireGuard check needs {', '.join(missing) or '/dev/net/tun'} (.ci/run installs them)")
    keys = {}
    for side in ("server", "client"):
        priv = lab.sh("cahome", "wg genkey").stdout.strip()
        path = os.path.join(lab.tmp, f"wg-{side}.key")
        with open(path, "w") as f:
            f.write(priv + "\n")
        os.chmod(path, 0o600)
        keys[side] = (path, lab.sh("cahome", f"echo {priv} | wg pubkey").stdout.strip())
    env = dict(os.environ, WG_PROCESS_FOREGROUND="1")
    names = {"cahome": f"{lab.prefix}s", "calan": f"{lab.prefix}c"}  # /var/run/wireguard is shared
    for ns, ifname in names.items():
        lab.spawn(ns, ["wireguard-go", "-f", ifname], f"wg-{ns}.log", env=env)
        assert wait_for(lambda ifname=ifname: os.path.exists(f"/var/run/wireguard/{ifname}.sock"), 10), \
            lab.log(f"wg-{ns}.log")
    lab.sh("cahome", f"wg set {names['cahome']} private-key {keys['server'][0]} listen-port {WG_PORT} "
                     f"peer {keys['client'][1]} allowed-ips 100.101.0.2/32; "
                     f"ip addr add 100.101.0.1/24 dev {names['cahome']}; ip link set {names['cahome']} up")
    lab.sh("calan", f"wg set {names['calan']} private-key {keys['client'][0]} listen-port {CLIENT_PORT} "
                    f"peer {keys['server'][1]} allowed-ips 100.101.0.1/32 endpoint 192.0.2.2:{RELAY_PORT}; "
                    f"ip addr add 100.101.0.2/24 dev {names['calan']}; ip link set {names['calan']} up")
    return names["cahome"]


def endpoint(lab: Lab, ifname: str) -> str:
    return lab.sh("cahome", f"wg show {ifname} endpoints").stdout.split()[1]


@pytest.mark.parametrize("service, first, second, shown", [
    ("127.0.0.1", C1, C2, "{}:41000"),
    ("::1", C6, "2001:db8:9::8", "[{}]:41000"),
], ids=["ipv4", "ipv6"])
def test_wireguard_lists_the_announced_client_address_as_the_peer_endpoint_and_follows_a_move(
        lab, wireguard, service, first, second, shown):
    log = f"relay{6 if ':' in service else 4}.log"
    relay = lab.spawn("cahome", ["python3", TOOL, "relay", "192.0.2.2", str(RELAY_PORT), service, str(WG_PORT),
                                 first, second, str(WG_TABLE)], log)
    try:
        assert wait_for(lambda: "routing" in lab.log(log), 10), lab.log(log)
        ping = "ping -c 1 -W 1 100.101.0.1"
        assert wait_for(lambda: lab.sh("calan", ping, check=False).returncode == 0, 20, step=0.5), lab.log(log)
        assert endpoint(lab, wireguard) == shown.format(first)
        relay.send_signal(signal.SIGUSR1)  # the client moves: the outside announces a new address
        assert wait_for(lambda: lab.sh("calan", ping, check=False).returncode == 0
                        and endpoint(lab, wireguard) == shown.format(second), 20, step=0.5), \
            f"{endpoint(lab, wireguard)}\n{lab.log(log)}"
    finally:
        assert lab.stop(relay) == 0
    assert f"lookup {WG_TABLE}" not in rules(lab)
    events = [json.loads(line) for line in lab.log(log).split("\n") if line.startswith("{")]
    assert events[-1]["removed"] and len(events[0]["routing"]) == 4  # both families: wireguard-go is on [::]
    assert not [e for e in events if "warning" in e]  # it answers from where it was reached: nothing to warn of
