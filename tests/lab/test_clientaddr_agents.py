"""The service sees each client's real address (issue 20), with the real agents in the lab.

The topology is netlab.py's (home behind its NAT and the carrier's, the VPS, work1 and work2
behind the work NAT, the attacker), with work1 on IPv6 too. Root only; skipped with the
reason otherwise. Unlike test_clientaddr.py (the I/O layer's pieces, driven one call at a
time), everything here goes through both agents: the outside agent announces each client,
the inside agent (`--client-address transparent` or `proxy-v2`) opens its service socket.

At home: wireguard-go on 51820 (all addresses, as test_lab.py sets it up), an echo that
records the source of every datagram on 127.0.0.1:7200 and [::1]:7200, another on
0.0.0.0:7201, and (test 5) go-mmproxy on 7300 in front of a recording echo on 7301.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
from netlab import PORT, ROOT, VPS4, VPS6, WORK1_6, WORK_PUBLIC, Lab, wait_for
from test_lab import WG_PORT, Net, wg_ping, wireguard

pytestmark = pytest.mark.netns

TOOL = os.path.join(ROOT, "tests", "lab", "clientaddr_tool.py")
REC, REC_WILD = 7200, 7201  # the recording echo on 127.0.0.1 and [::1]; one on 0.0.0.0
MM_FRONT, MM_SVC, MM_TABLE = 7300, 7301, 21847  # go-mmproxy, the echo behind it, its policy routing
TABLE = 21844  # the inside agent's default table
HOME_OWN = {"0.0.0.0", "*", "[::]", "127.0.0.1", "[::1]", "192.0.2.2", "[2001:db8:1::2]", "100.100.0.1"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("clientaddr-agents"))
    lab = Lab(tmp)
    try:
        lab.build()
        why = policy_routing_missing(lab)
        if why:
            pytest.skip(why)
        for host, port, log in (("127.0.0.1", REC, "rec4.log"), ("::1", REC, "rec6.log"),
                                ("0.0.0.0", REC_WILD, "recwild.log")):
            lab.spawn("home", ["python3", TOOL, "seen", host, str(port), "record"], log)
        wireguard(lab, tmp)  # before any inside agent: it looks at the service's sockets when it starts
        yield lab
    finally:
        lab.close()


def policy_routing_missing(lab: Lab) -> str | None:
    """What transparent mode and go-mmproxy need of the kernel and that a kernel may lack:
    policy routing for both families with the rules' protocol and port selectors (Linux 4.17,
    CONFIG_IP_MULTIPLE_TABLES, CONFIG_IPV6_MULTIPLE_TABLES), and IP_TRANSPARENT."""
    for fam, src in (("", "127.0.0.1"), ("-6 ", "::1")):
        rule = f"ip {fam}rule add from {src} iif lo ipproto udp sport 1 lookup 4242"
        r = lab.sh("home", f"{rule} && {rule.replace(' add ', ' del ')}", check=False)
        if r.returncode != 0:
            return f"this kernel refuses `{rule}` ({r.stderr.strip()}): transparent mode needs policy routing"
    probe = ("python3 -c 'import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
             "s.setsockopt(socket.IPPROTO_IPV6, 75, 1); s.bind((\"2001:db8:9::1\", 1))'")
    r = lab.sh("home", probe, check=False)
    if r.returncode != 0:
        return f"this kernel refuses IPV6_TRANSPARENT: {r.stderr.strip().splitlines()[-1:]}"
    return None


# --- helpers ---

def clients_of(st: dict) -> list[str]:
    """The clients a status lists (its tunnels'), as it shows them: 203.0.113.18:P, [2001:db8:8::2]:P."""
    return sorted(t["client"] for t in st["tunnels"] if t["client"])


def shown(seen: str) -> str:
    """The recording echo's "IP PORT" as status and `wg show` write it."""
    host, port = seen.split()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Records:
    """What the recording echoes received from now on: (source as "IP PORT", datagram)."""

    def __init__(self, lab: Lab, *logs: str) -> None:
        self.lab, self.logs = lab, logs
        self.start = {log: len(lab.log(log)) for log in logs}

    def lines(self) -> list[tuple[str, bytes]]:
        out = []
        for log in self.logs:
            for line in self.lab.log(log)[self.start[log]:].splitlines():
                host, port, data = line.split()
                out.append((f"{host} {port}", bytes.fromhex(data)))
        return out


def run_clients(lab: Lab, ns: str, host: str, port: int, n: int, per: int) -> list[dict]:
    """n client sockets in ns, per datagrams each (clientaddr_tool.py clients)."""
    r = lab.sh(ns, f"python3 {TOOL} clients {host} {port} {n} {per}", timeout=3 * n * per + 15)  # 3 tries of 1 s
    return json.loads(r.stdout)


def check_clients_apart(result: list[dict], records: Records, public: str, per: int) -> list[str]:
    """Each client socket got an answer to every datagram, each from one address of its own
    (the echo writes the source it saw before the datagram) on `public`; the echo saw every
    datagram of each client from that client's address and nothing else. The addresses."""
    seen = []
    for i, c in enumerate(result):
        assert len(c["answers"]) == per, c
        sources = {a.split("|")[0] for a in c["answers"]}
        assert len(sources) == 1, c
        src = sources.pop()
        assert src.split()[0] == public, c
        assert c["answers"] == [f"{src}|c{i} d{j}" for j in range(per)]
        seen.append(src)
    assert len(set(seen)) == len(seen), seen  # behind one address, told apart by their ports
    lines = records.lines()
    for i, src in enumerate(seen):
        mine = [d for s, d in lines if s == src]
        assert len(mine) == result[i]["sent"], (src, lines)
        once = [d for k, d in enumerate(mine) if k == 0 or d != mine[k - 1]]  # a datagram sent again: once
        assert once == [f"c{i} d{j}".encode() for j in range(per)], (src, lines)
        assert all(s == src for s, d in lines if d.startswith(b"c%d " % i)), lines
    assert {s for s, _ in lines} == set(seen)
    return seen


def foreign_bound(lab: Lab, agent: dict | None = None) -> set[str]:
    """The addresses UDP sockets at home are bound to that are not home's own (ss -uanp), of
    the inside agent `agent` only if given: the transparent sockets, each bound to a client's
    address."""
    out = lab.sh("home", "ss -uanpH").stdout
    mine = f"pid={agent['proc'].pid}," if agent else ""
    rows = [line.split() for line in out.splitlines() if mine in line]
    return {cols[3] for cols in rows if cols[3].rsplit(":", 1)[0] not in HOME_OWN}


def wg_fresh(lab: Lab, listen_port: int, endpoint: str) -> None:
    """Both WireGuard ends forget each other: the server at home has no endpoint for the client
    until the client's next handshake, which comes from listen_port (on work1) to endpoint."""
    home_if, work_if = f"{lab.prefix}h", f"{lab.prefix}w"
    home_pub, work_pub = lab.wg_keys["home"][1], lab.wg_keys["work"][1]
    lab.sh("home", f"wg set {home_if} peer {work_pub} remove; "
                   f"wg set {home_if} peer {work_pub} allowed-ips 100.100.0.2/32")
    lab.sh("work1", f"wg set {work_if} peer {home_pub} remove; wg set {work_if} listen-port {listen_port} "
                    f"peer {home_pub} allowed-ips 100.100.0.1/32 endpoint {endpoint}")
    assert wg_endpoint(lab) == "(none)"


def wg_endpoint(lab: Lab) -> str:
    """The client's endpoint as the WireGuard server at home lists it."""
    return lab.sh("home", f"wg show {lab.prefix}h endpoints").stdout.split()[1]


# --- 1: WireGuard lists the client's public endpoint ---

@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_wireguard_at_home_lists_the_clients_public_endpoint_and_after_it_changes_port_the_new_one(
        lab, net, family):
    """With --client-address transparent, `wg show` at home lists what the outside agent's
    status shows as the client: the work NAT's public address and port (IPv4), or work1's own
    address and port (IPv6, routed). The client then sends from another port (a new listen
    port: a new public port, as after a NAT rebinding): a new client at the outside, and
    WireGuard at home takes the new endpoint from its first authenticated packet."""
    v6 = family == "ipv6"
    out, ins = net.pair(f"127.0.0.1:{WG_PORT}", PORT, "--client-address", "transparent")
    wg_fresh(lab, 43100, f"[{VPS6}]:{PORT}" if v6 else f"{VPS4}:{PORT}")
    assert wg_ping(lab), "no ping across WireGuard"
    (first,) = clients_of(net.wait_status(out, lambda s: len(clients_of(s)) == 1))
    assert (first == f"[{WORK1_6}]:43100") if v6 else first.startswith(f"{WORK_PUBLIC}:")
    assert wg_endpoint(lab) == first
    assert clients_of(net.status(ins)) == [first]  # the inside shows the client's address too

    lab.sh("work1", f"wg set {lab.prefix}w listen-port 43101")
    assert wg_ping(lab), "no ping after the client changed its port"
    st = net.wait_status(out, lambda s: len(clients_of(s)) == 2)
    (second,) = set(clients_of(st)) - {first}
    assert (second == f"[{WORK1_6}]:43101") if v6 else second.startswith(f"{WORK_PUBLIC}:")
    assert wait_for(lambda: wg_endpoint(lab) == second, 10), wg_endpoint(lab)
    assert foreign_bound(lab, ins) == {first, second}  # a transparent socket per client, nothing else
    print(f"{family}: wg show listed {first}, then {second} after the client's port changed")


def test_a_wireguard_client_that_roams_keeps_its_tunnel_and_wireguard_at_home_follows_it(lab, net):
    """The outside agent with --wireguard-key moves the tunnel to a WireGuard client's new address
    (its NAT mapping flushed, a random new port) and announces the move (F_MOVED): the inside
    agent gives it a socket bound to the new address, WireGuard at home lists that, and the
    socket of the old address is closed once quiet."""
    out, ins = net.pair(f"127.0.0.1:{WG_PORT}", PORT, "--client-address", "transparent",
                        outside_extra=("--wireguard-key", lab.wg_keys["home"][1]))
    wg_fresh(lab, 43200, f"{VPS4}:{PORT}")
    # the work router gives a new mapping a random port, as carrier NATs do
    lab.sh("wrouter", 'nft flush chain ip nat post; nft add rule ip nat post oifname "wan" masquerade fully-random')
    try:
        assert wg_ping(lab)
        (tb,) = [t for t in net.wait_status(out, lambda s: len(clients_of(s)) == 1)["tunnels"] if t["client"]]
        assert wg_endpoint(lab) == tb["client"] and foreign_bound(lab, ins) == {tb["client"]}
        lab.sh("wrouter", "conntrack -D -p udp --orig-src 192.0.2.66 2>/dev/null", check=False)
        assert wg_ping(lab), "no ping after the NAT flush"
        after = net.wait_status(out, lambda s: s["stats"].get("wg_roams") == 1)
        (ta,) = [t for t in after["tunnels"] if t["client"]]
        assert ta["id"] == tb["id"] and ta["client"] != tb["client"] and ta["client"].startswith(f"{WORK_PUBLIC}:")
        assert wait_for(lambda: wg_endpoint(lab) == ta["client"], 10), wg_endpoint(lab)
        st = net.wait_status(ins, lambda s: s["stats"].get("client_moves") == 1)
        assert clients_of(st) == [ta["client"]]
        assert f"moved to {ta['client']}" in lab.log(f"inside-{PORT}.log")
        # the old address's socket drains answers for 2 s after the last one, then closes
        assert wait_for(lambda: foreign_bound(lab, ins) == {ta["client"]}, 15), foreign_bound(lab, ins)
        print(f"WireGuard roaming: tunnel {ta['id']} moved {tb['client']} -> {ta['client']}; wg show followed")
    finally:
        lab.sh("wrouter", 'nft flush chain ip nat post; nft add rule ip nat post oifname "wan" masquerade')


def test_a_wireguard_client_on_the_servers_own_port_is_listed_with_its_address_and_another_port(lab, net):
    """The limit of transparent mode: a client whose public port is the one WireGuard holds at home
    on all addresses (a peer with ListenPort = 51820 behind a NAT that keeps the port) can't have a
    socket bound to its exact address (EADDRINUSE, whatever the options); it keeps its address with
    another port, and the agent says so once."""
    out, ins = net.pair(f"127.0.0.1:{WG_PORT}", PORT, "--client-address", "transparent")
    wg_fresh(lab, WG_PORT, f"{VPS4}:{PORT}")
    assert wg_ping(lab), "no ping across WireGuard"
    (client,) = clients_of(net.wait_status(out, lambda s: len(clients_of(s)) == 1))
    assert client == f"{WORK_PUBLIC}:{WG_PORT}"  # the work NAT kept the port
    shown_at_home = wg_endpoint(lab)
    assert shown_at_home.startswith(f"{WORK_PUBLIC}:") and shown_at_home != client
    assert foreign_bound(lab, ins) == {shown_at_home}
    assert (f"client {client}: UDP port {WG_PORT} is taken on this host by a socket bound to all addresses (the "
            f"service itself?); the service sees {shown_at_home}: the client's address, another port"
            ) in lab.log(f"inside-{PORT}.log")


# --- 2: an echo sees every datagram from the client's address ---

@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_every_datagram_of_two_clients_behind_one_address_reaches_the_echo_from_its_own_public_address(
        lab, net, family):
    """Two client sockets on work1 (the same public address, two ports; the work NAT's for
    IPv4, work1's own for IPv6): the echo at home gets every datagram of each from that
    client's public address and port, exactly as the outside agent's status shows the client,
    and each client gets only its own answers.

    The echo is bound to 127.0.0.1 (and [::1] for IPv6 clients), the address the agent sends
    to, not to 0.0.0.0: a socket on all addresses answers from the address the kernel picks
    for the destination, and for a client's real (non-local) address that is home's LAN
    address on eth0, by the default route. Such an answer does not match the policy rule
    (UDP from 127.0.0.1, the service's port, on lo), so it never comes back to the agent's
    socket: it leaves on eth0 towards the client's real address (and shows it home's public
    address). The agent warns about that case (next test); WireGuard is not affected, as it
    answers from the address it was reached at."""
    v6 = family == "ipv6"
    out, ins = net.pair(f"127.0.0.1:{REC}", 9998, "--client-address", "transparent")
    records = Records(lab, "rec4.log", "rec6.log")
    result = run_clients(lab, "work1", VPS6 if v6 else VPS4, 9998, 2, 10)
    seen = check_clients_apart(result, records, WORK1_6 if v6 else WORK_PUBLIC, 10)
    assert clients_of(net.status(out)) == sorted(shown(s) for s in seen)
    assert foreign_bound(lab, ins) == {shown(s) for s in seen}
    print(f"{family}: the echo saw {sorted(seen)}, {sum(r['sent'] for r in result)} datagrams, each from its client")


def test_an_echo_on_all_addresses_is_warned_about_and_its_answers_do_not_come_back(lab, net):
    """The mistake the previous test's echo avoids: the inside agent says so at the first client."""
    out, ins = net.pair(f"127.0.0.1:{REC_WILD}", 9997, "--client-address", "transparent")
    records = Records(lab, "recwild.log")
    (c,) = run_clients(lab, "work1", VPS4, 9997, 1, 1)
    assert c["answers"] == [] and c["sent"] == 3
    (client,) = clients_of(net.status(out))
    src = client.replace(":", " ")
    assert records.lines() == [(src, b"c0 d0")] * 3  # it got them from the client's address...
    warning = (f"--client-address transparent: the service listens on 0.0.0.0:{REC_WILD} (all addresses) and the "
               f"agent sends to it at 127.0.0.1:{REC_WILD}: unless it answers from the address it was reached at "
               f"(as WireGuard does), it answers a client such as {client} from 192.0.2.2 on eth0")
    assert warning in lab.log("inside-9997.log")  # ...and answered from 192.0.2.2, out of eth0


# --- 3: data spoofed onto a spare ---

def spoof_spares(lab: Lab, net: Net, out: dict, port: int, count: int) -> list[str]:
    """From the attacker's namespace, `count` datagrams "spoofed N" from the outside agent's
    address and port to each spare's public address (the carrier NAT's mapping, as the outside
    agent's status shows it): what the carrier NAT and the home NAT let through to the spare's
    socket at home. The spares' endpoints."""
    spares = [t["endpoint"] for t in net.status(out)["tunnels"] if t["state"] == "spare"]
    for ep in spares:
        host, p = ep.rsplit(":", 1)
        lab.sh("attacker", f"python3 {TOOL} spoof {VPS4} {port} {host} {p} {count}")
    return spares


def test_data_spoofed_from_the_outside_agents_address_onto_spares_reaches_neither_the_service_nor_a_socket(
        lab, net):
    """The carrier NAT maps each of home's tunnels to a random public port; the attacker (on
    the Internet side, no path to home but through both NATs) is given those ports here from
    the outside agent's status, where a real one would have to guess them, and sends datagrams
    from the outside agent's address and port to every spare. They reach the inside agent's
    spare sockets, which count them (drop_unannounced) once they have waited 3 s for an
    ANNOUNCE the outside never sends: none reaches the echo, and no socket at home is bound to
    any address but those of the clients the outside announced (none, then one). Then, with
    the spares freshly spoofed again, a new client takes one of them at once: its ANNOUNCE lets
    through only its own datagram (the bug fixed with this test: the held spoofed data reached
    the echo as that client's, from its address)."""
    port = 9996
    out, ins = net.pair(f"127.0.0.1:{REC}", port, "--client-address", "transparent", "--spares", "3")
    # a steady pool: the keepalive learned (the spare kept for probing closed), no client yet
    net.wait_status(ins, lambda s: s["keepalive"]["learned"] and s["spares"] == 3, timeout=30)
    net.wait_status(out, lambda s: s["spares"] == 3)
    records = Records(lab, "rec4.log", "rec6.log")
    spares = spoof_spares(lab, net, out, port, 5)
    st = net.wait_status(ins, lambda s: s["stats"].get("drop_unannounced", 0) >= 15, timeout=10)
    assert len(spares) == 3 and st["stats"]["drop_unannounced"] == 15 and st["clients"] == 0
    assert records.lines() == [] and foreign_bound(lab) == set()  # any process's
    (real,) = check_clients_apart(run_clients(lab, "work1", VPS4, port, 1, 3), records, WORK_PUBLIC, 3)
    assert foreign_bound(lab) == {shown(real)}

    spares = spoof_spares(lab, net, out, port, 2)
    (c,) = run_clients(lab, "work2", VPS4, port, 1, 1)
    assert len(c["answers"]) == 1 and c["sent"] == 1, c
    src = c["answers"][0].split("|")[0]
    assert c["answers"] == [f"{src}|c0 d0"]  # its own datagram's answer, not a spoofed one's
    (taken,) = [t["endpoint"] for t in net.status(out)["tunnels"] if t["client"] == shown(src)]
    assert taken in spares, (taken, spares)  # it took a spare that held spoofed data
    assert [d for s, d in records.lines() if s == src] == [b"c0 d0"]
    assert not [d for _, d in records.lines() if d.startswith(b"spoofed")]
    assert foreign_bound(lab) == {shown(real), shown(src)}
    st = net.wait_status(ins, lambda s: s["stats"]["drop_unannounced"] >= 15 + 2 * len(spares), timeout=10)
    assert st["stats"]["drop_unannounced"] == 15 + 2 * len(spares)
    print(f"spoofed onto 3, then {len(spares)} spares: every datagram counted as drop_unannounced, none at the "
          f"echo; the client that took a spoofed spare got only its own answer")


# --- 4: PROXY v2 in front of go-mmproxy ---

@pytest.fixture(scope="module")
def mmproxy(lab):
    """go-mmproxy at home on [::]:7300 (UDP), in front of a recording echo on 127.0.0.1 and
    [::1]:7301. It binds its upstream sockets to the clients' addresses (IP_TRANSPARENT), so
    the echo's answers need the same kind of policy routing as transparent mode's: set up
    here with the `ip` command, in a table of its own."""
    if shutil.which("go-mmproxy") is None:
        pytest.skip("go-mmproxy is not installed (.ci/run installs it)")
    for host, log in (("127.0.0.1", "mm4.log"), ("::1", "mm6.log")):
        lab.spawn("home", ["python3", TOOL, "seen", host, str(MM_SVC), "record"], log)
    routing = [f"rule add from 127.0.0.1 iif lo ipproto udp sport {MM_SVC} lookup {MM_TABLE}",
               f"route add local 0.0.0.0/0 dev lo table {MM_TABLE}",
               f"-6 rule add from ::1 iif lo ipproto udp sport {MM_SVC} lookup {MM_TABLE}",
               f"-6 route add local ::/0 dev lo table {MM_TABLE}"]
    lab.sh("home", "; ".join(f"ip {r}" for r in routing))
    p = lab.spawn("home", ["go-mmproxy", "-p", "udp", "-l", f"[::]:{MM_FRONT}", "-4", f"127.0.0.1:{MM_SVC}",
                           "-6", f"[::1]:{MM_SVC}", "-v", "2"], "go-mmproxy.log")
    assert wait_for(lambda: "listening" in lab.log("go-mmproxy.log"), 10), lab.log("go-mmproxy.log")
    yield p
    lab.stop(p)
    lab.sh("home", "; ".join(f"ip {r.replace(' add ', ' del ')}" for r in routing))


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_behind_go_mmproxy_the_echo_sees_each_clients_public_address(lab, net, mmproxy, family):
    """The inside agent with --client-address proxy-v2 (a header before every datagram: go-mmproxy
    drops a datagram without one) and -s 127.0.0.1:7300: go-mmproxy dials the echo from each
    client's address, which the echo sees, for two clients behind one address. IPv6 clients
    reach go-mmproxy over [::1] (it dials in the family of the datagrams' sender)."""
    v6 = family == "ipv6"
    out, ins = net.pair(f"127.0.0.1:{MM_FRONT}", 9995, "--client-address", "proxy-v2")
    records = Records(lab, "mm4.log", "mm6.log")
    result = run_clients(lab, "work1", VPS6 if v6 else VPS4, 9995, 2, 10)
    seen = check_clients_apart(result, records, WORK1_6 if v6 else WORK_PUBLIC, 10)
    assert clients_of(net.status(out)) == sorted(shown(s) for s in seen)
    assert foreign_bound(lab) >= {shown(s) for s in seen}  # go-mmproxy's upstream sockets, not the agent's
    print(f"{family}: behind go-mmproxy the echo saw {sorted(seen)}")


# --- 5: what the agent sets up, and what it needs ---

def test_the_inside_agent_adds_its_policy_routing_at_start_and_removes_it_at_stop(lab, net):
    out, ins = net.pair(f"127.0.0.1:{REC}", 9994, "--client-address", "transparent")
    rules = lab.sh("home", "ip rule show; ip -6 rule show").stdout
    assert f"from 127.0.0.1 iif lo ipproto udp sport {REC} lookup {TABLE} proto 85" in rules
    assert f"from ::1 iif lo ipproto udp sport {REC} lookup {TABLE} proto 85" in rules  # the echo is on [::1] too
    table = lab.sh("home", f"ip route show table {TABLE}; ip -6 route show table {TABLE}").stdout
    assert table.splitlines() == ["local default dev lo proto 85 scope host ",
                                  "local default dev lo proto 85 metric 1024 pref medium"]
    assert lab.stop(ins["proc"]) == 0
    assert str(TABLE) not in lab.sh("home", "ip rule show; ip -6 rule show").stdout
    assert lab.sh("home", f"ip route show table {TABLE}; ip -6 route show table {TABLE}").stdout == ""
    removed = [line for line in lab.log("inside-9994.log").splitlines() if "policy routing removed:" in line]
    assert len(removed) == 4, removed  # two rules (their priorities as the kernel gave them), two routes
    assert f"from 127.0.0.1 iif lo ipproto udp sport {REC} lookup {TABLE} proto 85" in removed[0]
    assert removed[2:] == [f"<6>policy routing removed: ip route add local 0.0.0.0/0 dev lo table {TABLE} proto 85",
                           f"<6>policy routing removed: ip -6 route add local ::/0 dev lo table {TABLE} proto 85"]


def test_without_cap_net_admin_the_inside_agent_stops_at_start_with_one_line(lab, net):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    r = lab.sh("home", f"PYTHONPATH={ROOT}/src setpriv --bounding-set=-net_admin --inh-caps=-net_admin "
                       f"python3 -m udp_tunnel -s 127.0.0.1:{REC} -o {VPS4}:9993 --key-file {net.key} "
                       "--client-address transparent", check=False)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("udp-tunnel: --client-address transparent needs CAP_NET_ADMIN, to bind service sockets to "
                        "the clients' addresses and to set up the policy routing (it has CAP_NET_RAW only): run "
                        "the inside agent as root, or give it AmbientCapabilities=CAP_NET_ADMIN in its systemd "
                        "unit\n")
    assert str(TABLE) not in lab.sh("home", "ip rule show").stdout


def test_a_transparent_service_removed_by_sighup_has_its_policy_routing_removed_when_the_agent_stops(lab, net):
    """A configuration file with two services, one in transparent mode; SIGHUP with a file where
    that service is gone (and another where the remaining one is transparent on another port),
    then the agent stops: no rule or route of its is left (the replaced service's routing was
    never removed)."""
    cfg = os.path.join(net.tmp, "inside.toml")

    def write(services: str) -> None:
        with open(cfg, "w") as f:
            f.write(f'[inside]\noutside = "{VPS4}:9992"\nkey_file = "{net.key}"\nkeepalive = 5\ncontrol = "none"\n'
                    f'{services}')
    write(f'[services.echo]\nservice = "127.0.0.1:{REC}"\nclient_address = "transparent"\n'
          f'[services.wild]\nservice = "127.0.0.1:{REC_WILD}"\n')
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    ins = lab.spawn("home", ["python3", "-m", "udp_tunnel", "--config", cfg], "inside-config.log", env=env)
    assert wait_for(lambda: "inside agent for services" in lab.log("inside-config.log"), 10), \
        lab.log("inside-config.log")
    assert f"sport {REC} lookup {TABLE}" in lab.sh("home", "ip rule show").stdout
    write(f'[services.wild]\nservice = "127.0.0.1:{REC_WILD}"\nclient_address = "transparent"\n')
    ins.send_signal(signal.SIGHUP)
    assert wait_for(lambda: f"sport {REC_WILD} lookup {TABLE}" in lab.sh("home", "ip rule show").stdout, 10), \
        lab.log("inside-config.log")
    try:
        assert lab.stop(ins) == 0
        rules = lab.sh("home", "ip rule show; ip -6 rule show").stdout
        assert str(TABLE) not in rules, rules
        assert lab.sh("home", f"ip route show table {TABLE}; ip -6 route show table {TABLE}").stdout == ""
    finally:  # what a failure left, for the next tests
        lab.sh("home", f"for i in 1 2 3 4; do ip rule del lookup {TABLE}; ip -6 rule del lookup {TABLE}; done "
                       f"2>/dev/null; ip route flush table {TABLE}; ip -6 route flush table {TABLE}", check=False)
