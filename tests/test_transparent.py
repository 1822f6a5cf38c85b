"""The parts of --client-address transparent that need no privileges: the messages, the
checks, the policy routing's commands, the drain of moved clients' sockets, rtnetlink reads.

The sockets and the routing themselves are tested in the namespace lab
(tests/lab/test_clientaddr.py).
"""

from __future__ import annotations

import socket
import sys

import pytest

from udp_tunnel.io import rtnl, transparent
from udp_tunnel.io.transparent import Retiring, Routing, path_warning, privilege_problem

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

ADMIN, RAW = 1 << 12, 1 << 13


def test_without_net_admin_or_net_raw_the_agent_says_what_it_needs_in_one_line():
    msg = privilege_problem(0, manage_routing=True)
    assert msg == ("--client-address transparent needs CAP_NET_ADMIN, to bind service sockets to the clients' "
                   "addresses and to set up the policy routing: run the inside agent as root, or give it "
                   "AmbientCapabilities=CAP_NET_ADMIN in its systemd unit")
    assert "\n" not in msg


def test_net_raw_alone_binds_the_sockets_but_cannot_set_up_the_routing():
    assert privilege_problem(RAW, manage_routing=True).endswith(
        "set up the policy routing (it has CAP_NET_RAW only): run the inside agent as root, or give it "
        "AmbientCapabilities=CAP_NET_ADMIN in its systemd unit")
    assert privilege_problem(RAW, manage_routing=False) is None


def test_routing_set_up_by_someone_else_needs_net_raw_or_net_admin():
    assert privilege_problem(0, manage_routing=False) == (
        "--client-address transparent needs CAP_NET_ADMIN or CAP_NET_RAW, to bind service sockets to the "
        "clients' addresses: run the inside agent as root, or give it AmbientCapabilities=CAP_NET_RAW in its "
        "systemd unit")
    assert privilege_problem(ADMIN, manage_routing=True) is None


def test_the_effective_capabilities_are_read_from_the_status_file(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython3\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n"
                      "CapEff:\t0000000000003000\nCapBnd:\t000001ffffffffff\n")
    assert transparent.effective_capabilities(str(status)) == ADMIN | RAW
    assert transparent.effective_capabilities(str(tmp_path / "absent")) == 0


@pytest.mark.parametrize("client, why", [
    (("0.0.0.0", 40000), "not an address a service socket can be bound to"),
    (("127.0.0.1", 40000), "not an address a service socket can be bound to"),
    (("::1", 40000), "not an address a service socket can be bound to"),
    (("224.0.0.1", 40000), "not an address a service socket can be bound to"),
    (("255.255.255.255", 40000), "not an address a service socket can be bound to"),
    (("fe80::1", 40000), "not an address a service socket can be bound to"),
    (("198.51.100.7", 0), "port 0"),
    (("not an address", 1), "is not an IP address"),
])
def test_addresses_no_outside_agent_can_have_seen_are_refused(client, why):
    assert why in transparent.client_problem(client)


def test_a_public_client_address_is_fine_also_ipv4_mapped():
    assert transparent.client_problem(("198.51.100.7", 40000)) is None
    assert transparent.client_problem(("::ffff:198.51.100.7", 40000)) is None
    assert transparent.client_problem(("2001:db8:1::7", 40000, 0, 0)) is None


def test_the_service_listeners_are_read_from_proc_net_udp_unconnected_sockets_only(tmp_path):
    (tmp_path / "udp").write_text(
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        " 1555: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 113234 2\n"
        " 5887: 0100007F:1B58 0100007F:0009 01 00000000:00000000 00:00000000 00000000     0        0 113236 2\n")
    (tmp_path / "udp6").write_text(
        "  sl  local_address                         remote_address                        st tx_queue\n"
        " 5887: 00000000000000000000000001000000:1B58 00000000000000000000000000000000:0000 07 00000000:0\n")
    if sys.byteorder != "little":
        pytest.skip("the sample lines are a little-endian host's")
    assert transparent.udp_listeners(51820, str(tmp_path)) == ["0.0.0.0"]
    assert transparent.udp_listeners(7000, str(tmp_path)) == ["::1"]  # 127.0.0.1:7000 is connected: a client
    assert transparent.udp_listeners(9, str(tmp_path)) == []


def test_a_loopback_service_listening_on_both_families_gets_both_loopbacks():
    four, six = socket.AF_INET, socket.AF_INET6
    assert transparent.service_addresses(("127.0.0.1", 51820), ["0.0.0.0", "::"]) == {
        four: ("127.0.0.1", 51820), six: ("::1", 51820)}
    assert transparent.service_addresses(("127.0.0.1", 7000), ["127.0.0.1"]) == {four: ("127.0.0.1", 7000)}
    assert transparent.service_addresses(("::1", 7000, 0, 0), ["::"]) == {
        six: ("::1", 7000), four: ("127.0.0.1", 7000)}
    assert transparent.service_addresses(("192.0.2.2", 7000), ["0.0.0.0", "::"]) == {four: ("192.0.2.2", 7000)}


# --- the warnings for services whose answers go astray ---

SERVICE, CLIENT = ("127.0.0.1", 7000), ("198.51.100.7", 40000)


def test_a_service_on_all_addresses_that_would_answer_from_another_one_gets_a_warning():
    msg = path_warning(SERVICE, CLIENT, True, ["0.0.0.0"], "192.0.2.2", "eth0")
    assert msg == (
        "--client-address transparent: the service listens on 0.0.0.0:7000 (all addresses) and the agent sends "
        "to it at 127.0.0.1:7000: unless it answers from the address it was reached at (as WireGuard does), it "
        "answers a client such as 198.51.100.7:40000 from 192.0.2.2 on eth0, and those answers leave on eth0 for "
        "the client's real address instead of coming back to the agent. Bind the service to 127.0.0.1:7000")


def test_a_dual_stack_socket_counts_as_listening_on_all_ipv4_addresses_too():
    assert "listens on [::]:7000 (all addresses)" in path_warning(SERVICE, CLIENT, True, ["::"], "192.0.2.2", "eth0")


def test_an_ipv6_service_on_all_addresses_gets_the_same_warning():
    msg = path_warning(("::1", 7000), ("2001:db8:9::7", 40000), True, ["::"], "2001:db8:1::2", "eth0")
    assert "the service listens on [::]:7000 (all addresses) and the agent sends to it at [::1]:7000" in msg
    assert msg.endswith("those answers leave on eth0 for the client's real address instead of coming back to the "
                        "agent. Bind the service to [::1]:7000")


@pytest.mark.parametrize("listeners, source", [
    (["127.0.0.1"], "192.0.2.2"),  # bound to the address the agent sends to
    (["127.0.0.1", "0.0.0.0"], "192.0.2.2"),
    (["0.0.0.0"], "127.0.0.1"),  # the host's own choice is the address the agent sends to
    ([], "192.0.2.2"),  # nothing listens yet: nothing to say
])
def test_no_warning_when_the_answers_leave_from_the_address_the_agent_sends_to(listeners, source):
    assert path_warning(SERVICE, CLIENT, True, listeners, source, "eth0") is None


def test_a_service_on_another_host_gets_a_warning_that_it_must_be_on_this_one():
    msg = path_warning(("192.0.2.5", 7000), CLIENT, False, [], "192.0.2.2", "eth0")
    assert msg == ("--client-address transparent: the service 192.0.2.5:7000 is not on this host: it will answer "
                   "the clients' real addresses through its own default route, not through this agent. Run the "
                   "service on this host, or route its answers to clients through this host")


# --- policy routing, as commands ---

def test_the_policy_routing_is_one_narrow_rule_per_service_address_and_one_local_route_per_family():
    r = Routing([("127.0.0.1", 51820), ("::1", 51820, 0, 0)], table=123)
    assert r.commands() == [
        "ip rule add from 127.0.0.1 iif lo ipproto udp sport 51820 lookup 123 proto 85",
        "ip -6 rule add from ::1 iif lo ipproto udp sport 51820 lookup 123 proto 85",
        "ip route add local 0.0.0.0/0 dev lo table 123 proto 85",
        "ip -6 route add local ::/0 dev lo table 123 proto 85",
    ]


def test_the_table_and_the_rule_priority_can_be_chosen():
    r = Routing([("192.0.2.2", 7000)], priority=100)
    assert r.commands() == [
        f"ip rule add priority 100 from 192.0.2.2 iif lo ipproto udp sport 7000 lookup {transparent.DEFAULT_TABLE} "
        "proto 85",
        f"ip route add local 0.0.0.0/0 dev lo table {transparent.DEFAULT_TABLE} proto 85",
    ]


@pytest.mark.parametrize("table", [0, 253, 254, 255, 2 ** 32])
def test_the_main_local_and_default_tables_are_refused(table):
    with pytest.raises(transparent.RoutingError, match=f"routing table {table}: pick a number"):
        Routing([SERVICE], table=table)


# --- the old sockets of clients that moved ---

class FakeSock:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_a_moved_client_old_socket_closes_after_two_quiet_seconds():
    r = Retiring()
    old = FakeSock(10)
    r.retire(old, (CLIENT, SERVICE), now=100.0)
    assert r.expired(101.9) == []
    r.seen(10, 101.5)  # an answer still arrived on it
    assert r.expired(103.4) == []
    assert r.expired(103.5) == [old] and len(r) == 0


def test_an_old_socket_that_keeps_receiving_closes_after_thirty_seconds_anyway():
    r = Retiring()
    old = FakeSock(10)
    r.retire(old, (CLIENT, SERVICE), now=0.0)
    for t in range(1, 30):
        r.seen(10, float(t))
        assert r.expired(float(t)) == []
    assert r.expired(30.0) == [old]


def test_a_client_that_moves_back_gets_its_old_socket_again():
    r = Retiring()
    a, b = FakeSock(10), FakeSock(11)
    r.retire(a, (CLIENT, SERVICE), 0.0)
    r.retire(b, (("198.51.100.8", 40000), SERVICE), 0.0)
    assert r.revive((CLIENT, SERVICE)) is a
    assert r.revive((CLIENT, SERVICE)) is None
    assert r.all() == [b] and len(r) == 0


# --- rtnetlink, reading (no privileges needed) ---

def test_rtnetlink_lists_the_main_table_rule_and_finds_loopback_local():
    with rtnl.Netlink() as nl:
        rules = nl.rules(socket.AF_INET)
        assert any(r.table == 254 and r.priority == 32766 and r.src is None for r in rules)  # from all lookup main
        r = nl.route_get(socket.AF_INET, "127.0.0.1")
        # (its table is 255, local, or 254 while no rule was ever added: the kernel merges them till then)
        assert (r.type, r.oif) == (rtnl.RTN_LOCAL, socket.if_nametoindex("lo"))


def fake_proc(tmp_path, owner: str | None):
    """A /proc with one UDP socket on 0.0.0.0:51820 (inode 4242), held by `owner` (or no process)."""
    net = tmp_path / "net"
    net.mkdir()
    (net / "udp").write_text(
        "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        " 1555: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2\n")
    fd = tmp_path / "123" / "fd"
    fd.mkdir(parents=True)
    (fd / "0").symlink_to("/dev/null")
    if owner:
        (fd / "3").symlink_to("socket:[4242]")
        (tmp_path / "123" / "comm").write_text(owner + "\n")
    return str(net), str(tmp_path)


@pytest.mark.parametrize("owner, expect", [("wireguard-go", "wireguard-go"), (None, "kernel"),
                                           ("python3", "python3")])
def test_the_owner_of_the_socket_on_all_addresses_is_found_by_its_inode(tmp_path, owner, expect):
    if sys.byteorder != "little":
        pytest.skip("the sample lines are a little-endian host's")
    net, proc = fake_proc(tmp_path, owner)
    assert transparent.wildcard_owner(("127.0.0.1", 51820), net, proc) == expect


@pytest.mark.parametrize("owner", ["wireguard-go", "kernel"])
def test_no_warning_for_wireguard_which_answers_from_the_address_it_was_reached_at(owner):
    assert path_warning(("127.0.0.1", 51820), CLIENT, True, ["0.0.0.0"], "192.0.2.2", "eth0", owner) is None
    assert path_warning(("127.0.0.1", 51820), CLIENT, True, ["0.0.0.0"], "192.0.2.2", "eth0", "python3")
