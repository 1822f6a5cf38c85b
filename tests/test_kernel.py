"""The kernel data path (issue 19): the eBPF program on crafted packets
(BPF_PROG_TEST_RUN), attached for real in network namespaces, the loader's
clean-up when its process is killed, and the host-NAT detection.

Needs root, Linux 6.6+ (tcx) and the compiled program (`make`, with clang);
skipped with the reason otherwise, except the parts that need none of it.
"""

from __future__ import annotations

import ipaddress
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from agents import without_capabilities
from kernelnet import ZERO_MAC, Netns, datagram, eth, ip4, ip6, mac_of, parse, skb_ctx, udp, veth
from udp_tunnel.core.classify import Classifier, Kind, inside_rule, outside_rule
from udp_tunnel.core.routes import RouteTable
from udp_tunnel.io import bpf
from udp_tunnel.io.datapath import OutsideKernel
from udp_tunnel.io.hostnat import NatRules, parse_iptables, parse_nft
from udp_tunnel.io.kernel import (
    F_CTRL,
    F_LEN40,
    F_SRC_IS_DST,
    F_TO_AGENT,
    F_V4,
    F_WG,
    KEY,
    NO_RULE,
    VALUE,
    DictMap,
    FlowTable,
    KernelPath,
    KernelUnavailable,
    addr,
    find_object,
    kernel_version,
    rule_flags,
)
from udp_tunnel.wire import proto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REDIRECT, NEXT = 7, -1
CTRL = proto.MAGIC + bytes(proto.CTRL_LEN - 4)  # a control message as the agents send it


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, bpf)"
    if kernel_version() < (6, 6):
        return "needs Linux 6.6 or later (tcx)"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    try:
        find_object()
    except KernelUnavailable as e:
        return e.reason
    return None


WHY_NOT = _why_not()
needs_kernel = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


def _object_or_skip() -> bytes:
    try:
        return find_object()
    except KernelUnavailable as e:
        pytest.skip(e.reason)


# --- without root ---

def test_addresses_are_taken_as_the_agent_sees_them_ipv4_clients_of_a_dual_stack_socket_included():
    v4 = addr(("192.0.2.7", 40000))
    assert v4.raw == bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7]) and v4.port == b"\x9c\x40" and v4.v4
    assert addr(("::ffff:192.0.2.7", 40000, 0, 0)) == v4
    v6 = addr(("2001:db8::1", 5000, 0, 0))
    assert v6.raw == ipaddress.ip_address("2001:db8::1").packed and not v6.v4
    assert addr(("fe80::1%eth0", 1, 0, 2)).raw == ipaddress.ip_address("fe80::1").packed
    for wildcard in ("", "0.0.0.0", "::"):
        assert addr((wildcard, 9999)).raw == bytes(16) and addr((wildcard, 9999)).ip is None
    with pytest.raises(ValueError):
        addr(("192.0.2.300", 1))


def test_the_compiled_object_has_one_program_three_maps_and_only_map_relocations():
    obj = bpf.parse_object(_object_or_skip())
    assert obj.license == "Dual MIT/GPL"
    assert {n: (m.kind, m.key_size, m.value_size) for n, m in obj.maps.items()} == {
        "flows": (bpf.MAP_HASH, 36, 64), "config": (bpf.MAP_ARRAY, 4, 8), "stats": (bpf.MAP_PERCPU_ARRAY, 4, 8)}
    assert obj.relocs and {name for _, name in obj.relocs} == {"flows", "config", "stats"}
    code = bpf.patch(obj, {"flows": 7, "config": 8, "stats": 9})
    for i, name in obj.relocs:
        assert code[i * 8] == 0x18 and code[i * 8 + 1] >> 4 == 1  # ld_imm64 of a map fd
        assert struct.unpack_from("<i", code, i * 8 + 4)[0] == {"flows": 7, "config": 8, "stats": 9}[name]
    with pytest.raises(ValueError, match="not a little-endian 64-bit ELF"):
        bpf.parse_object(b"MZ" + bytes(100))


NFT_HOME_ROUTER = {"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"table": {"family": "ip", "name": "nat", "handle": 1}},
    {"chain": {"family": "ip", "table": "nat", "name": "post", "handle": 1, "type": "nat", "hook": "postrouting"}},
    {"rule": {"family": "ip", "table": "nat", "chain": "post", "handle": 2, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "wan"}},
        {"masquerade": None}]}},
    {"rule": {"family": "inet", "table": "cgn", "chain": "post", "handle": 3, "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": {"set": ["out", "out2"]}}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                   "right": {"prefix": {"addr": "100.64.0.0", "len": 10}}}},
        {"snat": {"addr": "203.0.113.2"}}]}},
    {"rule": {"family": "ip", "table": "filter", "chain": "fw", "handle": 4, "expr": [{"accept": None}]}},
]}


def test_nat_rules_from_nft_apply_by_output_interface_and_source_address():
    rules = NatRules(parse_nft(NFT_HOME_ROUTER))
    assert len(rules.rules) == 2
    home = ipaddress.ip_address("192.0.2.2")
    assert rules.applies(home, "wan") == "nft ip nat post handle 2"
    assert rules.applies(home, "lan") is None
    assert rules.applies(ipaddress.ip_address("2001:db8::2"), "wan") is None  # an ip (IPv4) table
    cgn = ipaddress.ip_address("100.64.1.2")
    assert rules.applies(cgn, "out2") == "nft inet cgn post handle 3"
    assert rules.applies(ipaddress.ip_address("203.0.113.9"), "out") is None
    assert NatRules([], unknown="cannot tell").applies(home, "lan") == "cannot tell"


def test_nat_rules_from_iptables_save_read_interfaces_wildcards_and_negations():
    text = """*nat
:POSTROUTING ACCEPT [0:0]
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A POSTROUTING -o ppp+ -j MASQUERADE
-A POSTROUTING -o eth1 -j ACCEPT
COMMIT
"""
    rules = NatRules(parse_iptables(text, 4))
    assert len(rules.rules) == 2
    docker = ipaddress.ip_address("172.17.0.5")
    assert rules.applies(docker, "eth0").startswith("iptables (IPv4) -A POSTROUTING -s 172.17.0.0/16")
    assert rules.applies(docker, "docker0") is None
    assert rules.applies(ipaddress.ip_address("192.0.2.2"), "eth0") is None
    assert "-o ppp+" in rules.applies(ipaddress.ip_address("192.0.2.2"), "ppp0")


def test_without_root_the_kernel_path_says_why_in_one_line():
    code = f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'src')!r}); " \
           "from udp_tunnel.io.kernel import available; print(available())"
    drop = without_capabilities()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, preexec_fn=drop)
    assert r.returncode == 0 and r.stdout == "needs root or CAP_NET_ADMIN and CAP_BPF\n"


@needs_kernel
def test_a_missing_or_refused_program_is_one_line_with_the_verifier_s_first_lines_when_debugging(monkeypatch):
    monkeypatch.setenv("UDP_TUNNEL_BPF_OBJECT", "/nonexistent/relay.bpf.o")
    with pytest.raises(KernelUnavailable) as e:
        KernelPath.open(ifaces=["lo"])
    assert e.value.reason == "UDP_TUNNEL_BPF_OBJECT=/nonexistent/relay.bpf.o: No such file or directory"
    monkeypatch.delenv("UDP_TUNNEL_BPF_OBJECT")
    data = bytearray(find_object())
    at = bytes(data).find(bpf.parse_object(bytes(data)).insns)
    data[at:at + 8] = bytes([0x79, 0xA0, 8, 0, 0, 0, 0, 0])  # r0 = *(u64 *)(r10 + 8): above the stack
    monkeypatch.setattr("udp_tunnel.io.kernel.find_object", lambda: bytes(data))
    with pytest.raises(KernelUnavailable) as e:
        KernelPath.open(ifaces=["lo"])
    assert e.value.reason == "the kernel's verifier refused the eBPF program (run with debug logging to see why)"
    with pytest.raises(KernelUnavailable) as e:
        KernelPath.open(ifaces=["lo"], debug=True)
    assert e.value.reason.startswith("the kernel's verifier refused the eBPF program: ")
    assert "invalid read from stack" in e.value.reason and "\n" not in e.value.reason


@needs_kernel
def test_an_open_that_fails_after_loading_closes_the_program_and_its_maps(monkeypatch):
    def no_fds() -> None:
        raise OSError(24, "Too many open files")

    fds = sorted(os.listdir("/proc/self/fd"))
    monkeypatch.setattr("udp_tunnel.io.kernel.LoSettings", no_fds)
    with pytest.raises(OSError) as e:
        KernelPath.open(ifaces=["lo"])
    assert e.value.errno == 24
    assert sorted(os.listdir("/proc/self/fd")) == fds


def _table_entry(table: FlowTable, fkey) -> tuple:
    """(key: source, destination; value: new source, new destination, flags) of fkey's map entry, readable."""
    e = table.entries[fkey]
    src, dst, sport, dport = KEY.unpack(e.key)
    nsrc, ndst, nsport, ndport, flags, *_ = VALUE.unpack(table.flows.lookup(e.key))

    def a(raw, port):
        ip = ipaddress.IPv6Address(raw)
        return (str(ip.ipv4_mapped or ip) if any(raw) else "*", int.from_bytes(port, "big"))
    return a(src, sport), a(dst, dport), a(nsrc, nsport), a(ndst, ndport), flags


def test_with_several_endpoints_the_up_direction_leaves_from_the_tunnel_port_and_the_down_one_from_the_client_s():
    """A client of the service on port 51820 (endpoint 1): its datagrams go up from the tunnel port 9999
    (endpoint 0) where the tunnel registered, the tunnel's come back from 51820, where the client sent."""
    t = FlowTable(DictMap())
    client, tunnel = ("203.0.113.7", 40000), ("198.51.100.9", 41000)
    tunnel_port, service_port = ("192.0.2.1", 9999), ("192.0.2.1", 51820)
    assert t.outside_bind(tunnel_port, client, tunnel, client_listen=service_port, keys=((1, client), (0, tunnel)),
                          up_rule=0, down_rule=F_CTRL) == (True, True)
    assert _table_entry(t, (1, client)) == (client, service_port, tunnel_port, tunnel, F_V4 | F_TO_AGENT)
    assert _table_entry(t, (0, tunnel)) == (tunnel, tunnel_port, service_port, client, F_V4 | F_CTRL)
    # listening on every address: the new source is where the datagram was sent, the port the endpoint's
    t.outside_bind(("::", 9999, 0, 0), client, tunnel, client_listen=("::", 51820, 0, 0),
                   keys=((1, client), (0, tunnel)), up_rule=0, down_rule=F_CTRL)
    assert _table_entry(t, (1, client)) == (client, ("*", 51820), ("*", 9999), tunnel, F_V4 | F_SRC_IS_DST | F_TO_AGENT)
    assert _table_entry(t, (0, tunnel)) == (tunnel, ("*", 9999), ("*", 51820), client, F_V4 | F_SRC_IS_DST | F_CTRL)
    assert len(t.flows.items()) == 2 and t.kept == {}


def test_a_reload_after_a_client_roamed_re_installs_each_direction_the_way_round_it_goes():
    """With one port, client and tunnel arrive on the same endpoint: the route table must say which
    is which (a roamed client comes after its tunnel in the table), else a reload would mark the
    tunnel's direction as the one that goes to an agent and the client's as the one that does not."""
    routes = RouteTable()
    routes.add_endpoint()
    t = FlowTable(DictMap())
    routes.listener = OutsideKernel(t, routes, lambda via: ("192.0.2.1", 9999), lambda via: outside_rule(False, False))
    client, roamed, tunnel = ("203.0.113.7", 40000), ("203.0.113.8", 40001), ("198.51.100.9", 41000)
    routes.bind(client, tunnel)
    routes.move_client(tunnel, client, roamed)
    for _ in range(2):  # as bound, then as a reload re-installs them
        assert _table_entry(t, (0, roamed))[2:] == (("192.0.2.1", 9999), tunnel, F_V4 | F_CTRL | F_TO_AGENT)
        assert _table_entry(t, (0, tunnel))[2:] == (("192.0.2.1", 9999), roamed, F_V4 | F_CTRL)
        routes.rules_changed()


def test_what_a_flow_counted_goes_to_its_meters_when_it_goes_and_nothing_is_counted_twice():
    t = FlowTable(DictMap())
    c, tun, lis = ("203.0.113.7", 40000), ("198.51.100.9", 41000), ("192.0.2.1", 9999)
    t.outside_bind(lis, c, tun)

    def relay(fkey, n, size):  # as the program counts
        e = t.entries[fkey]
        fields = list(VALUE.unpack(t.flows.lookup(e.key)))
        fields[5] += n
        fields[6] += n * size
        t.flows.update(e.key, VALUE.pack(*fields))

    relay(c, 3, 100)
    assert {k: v[:2] for k, v in t.deltas().items()} == {c: (3, 300)}
    relay(c, 2, 100)
    relay(tun, 1, 50)
    t.outside_bind(lis, c, ("198.51.100.9", 41001))  # rebinding: the tunnel's old flow goes, with its count
    assert t.deltas() == {c: (2, 200, None), tun: (1, 50, None)} and tun not in t.entries and tun not in t.kept
    relay(c, 4, 10)
    final = t.outside_unbind(c, ("198.51.100.9", 41001))
    assert {k: v[:2] for k, v in final.items()} == {c: (4, 40)} and t.deltas() == {} and t.flows.items() == []


def test_a_direction_that_goes_back_to_the_agent_hands_what_it_counted_to_the_next_deltas():
    class Natted(FlowTable):
        nat = None

        def _nat(self, src, oif):
            return self.nat

    t = Natted(DictMap())
    c, tun, lis = ("203.0.113.7", 40000), ("198.51.100.9", 41000), ("192.0.2.1", 9999)
    t.outside_bind(lis, c, tun)
    e = t.entries[c]
    fields = list(VALUE.unpack(t.flows.lookup(e.key)))
    fields[5:7] = 5, 500
    t.flows.update(e.key, VALUE.pack(*fields))
    t.nat = "nft ip nat post handle 4"
    t.reinstall()  # (refresh(): the host NATs now)
    assert t.kept == {c: "this host NATs it (nft ip nat post handle 4)", tun: "this host NATs it (nft ip nat post "
                      "handle 4)"} and t.flows.items() == []
    assert t.deltas() == {c: (5, 500, None)} and t.deltas() == {}
    t.nat = None
    t.reinstall()
    assert set(t.entries) == {c, tun} and t.kept == {}


def test_the_program_s_rule_flags_are_the_core_s_rules_and_an_unknown_rule_stays_with_the_agent():
    assert rule_flags(outside_rule(legacy=False, wireguard=False)) == F_CTRL
    assert rule_flags(outside_rule(legacy=False, wireguard=True)) == F_CTRL | F_WG
    assert rule_flags(outside_rule(legacy=True, wireguard=False)) == F_LEN40
    assert rule_flags(outside_rule(legacy=True, wireguard=True)) == F_LEN40 | F_WG
    assert rule_flags(inside_rule(legacy=False)) == F_CTRL and rule_flags(inside_rule(legacy=True)) == 0
    assert rule_flags(Classifier({})) == 0
    assert rule_flags(Classifier({50: (b"", Kind.CONTROL)})) is None  # a length the program does not know
    assert rule_flags(Classifier({proto.CTRL_LEN: (b"XXXX", Kind.CONTROL)})) is None  # another magic
    assert rule_flags(Classifier({92: (b"", Kind.HANDSHAKE)})) is None  # half of WireGuard's
    t = FlowTable(DictMap())
    c, tun, lis = ("203.0.113.7", 40000), ("198.51.100.9", 41000), ("192.0.2.1", 9999)
    assert t.outside_bind(lis, c, tun, up_rule=NO_RULE, down_rule=F_CTRL) == (False, True)
    assert t.kept == {c: "its rule of the datagrams the agent must see is not one the program knows"}


# --- BPF_PROG_TEST_RUN on crafted packets ---

L4, C4, T4, T4B = ("198.51.100.1", 5000), ("203.0.113.7", 40000), ("192.0.2.50", 41000), ("192.0.2.51", 41001)
L6, C6, T6 = ("2001:db8:5::1", 5000), ("2001:db8:7::7", 40000), ("2001:db8:8::8", 41000)


@pytest.fixture(scope="module")
def trns():
    """A namespace for test runs: lo, and a veth with a default route via a neighbour whose MAC is fixed."""
    if WHY_NOT:
        pytest.skip(WHY_NOT)
    ns = Netns(f"utk{os.getpid() % 100000}-tr")
    try:
        ns.sh("ip link add v0 type veth peer name v1 && ip link set v0 up && ip link set v1 up"
              " && ip addr add 198.51.100.1/24 dev v0 && ip addr add 2001:db8:5::1/64 dev v0 nodad"
              " && ip neigh add 198.51.100.2 lladdr 02:00:00:00:00:02 dev v0 nud permanent"
              " && ip neigh add 2001:db8:5::2 lladdr 02:00:00:00:00:02 dev v0 nud permanent"
              " && ip route add default via 198.51.100.2 && ip -6 route add default via 2001:db8:5::2")
        yield ns
    finally:
        ns.close()


@pytest.fixture
def kp(trns):
    with trns.entered():
        k = KernelPath.open(ifaces=["lo"])
    try:
        yield k
    finally:
        k.close()


def run(ns: Netns, k: KernelPath, frame: bytes, **kw) -> tuple[int, bytes, dict]:
    """Run the program on a frame in ns: (its verdict, the packet it left, the stats that moved)."""
    with ns.entered():
        before = k.stats()
        r = k.test_run(frame, **kw)
        after = k.stats()
    return r.retval, r.data, {n: after[n] - before[n] for n in after if after[n] != before[n]}


@needs_kernel
def test_a_bound_ipv4_client_datagram_leaves_from_the_listen_address_to_the_tunnel_checksums_right(trns, kp):
    with trns.entered():
        assert kp.outside_bind(L4, C4, T4) == (True, True)
    frame = datagram(C4, L4, b"hello tunnel", ttl=50)
    verdict, out, moved = run(trns, kp, frame)
    assert verdict == REDIRECT and moved == {"relayed": 1}
    p = parse(out)  # both checksums recomputed here
    assert (p["src"], p["sport"], p["dst"], p["dport"]) == ("198.51.100.1", 5000, "192.0.2.50", 41000)
    assert p["ttl"] == 49 and p["payload"] == b"hello tunnel" and p["ident"] == frame[18:20]
    assert len(out) == len(frame) and out[:14] == frame[:14]
    (packets, nbytes, last), = [v for k, v in kp.counters().items() if k == C4]
    assert (packets, nbytes) == (1, 12) and abs(last - time.monotonic()) < 5
    # and the tunnel's answer goes to the client, from the listen address
    verdict, out, moved = run(trns, kp, datagram(T4, L4, b"answer"))
    p = parse(out)
    assert verdict == REDIRECT and (p["src"], p["sport"], p["dst"], p["dport"]) == ("198.51.100.1", 5000,
                                                                                     "203.0.113.7", 40000)
    assert kp.deltas() == {C4: (1, 12, kp.counters()[C4][2]), T4: (1, 6, kp.counters()[T4][2])}
    assert kp.deltas() == {}


@needs_kernel
def test_a_bound_ipv6_client_datagram_is_rewritten_with_its_udp_checksum_and_hop_limit(trns, kp):
    with trns.entered():
        assert kp.outside_bind(L6, C6, T6) == (True, True)
    frame = datagram(C6, L6, b"six" * 10, hop=9, flow=0x12345)
    verdict, out, moved = run(trns, kp, frame)
    p = parse(out)
    assert verdict == REDIRECT and moved == {"relayed": 1}
    assert (p["src"], p["sport"], p["dst"], p["dport"]) == ("2001:db8:5::1", 5000, "2001:db8:8::8", 41000)
    assert p["ttl"] == 8 and p["payload"] == b"six" * 10 and p["flow"] == frame[14:18]
    assert kp.counters()[C6][:2] == (1, 30)


@needs_kernel
def test_checksums_stay_right_for_a_checksum_complete_skb_ipv4_ipv6_and_zero(trns, kp):
    with trns.entered():
        kp.outside_bind(L4, C4, T4)
        kp.outside_bind(L6, C6, T6)
    for frame in (datagram(C4, L4, b"x" * 33), datagram(C6, L6, b"y" * 33), datagram(C4, L4, b"z", zero_csum=True)):
        try:
            verdict, out, _ = run(trns, kp, frame, flags=bpf.TEST_SKB_CHECKSUM_COMPLETE)
        except bpf.BpfError as e:
            if e.errno == 22:
                pytest.skip("this kernel's test runs have no CHECKSUM_COMPLETE mode (6.11+)")
            raise  # EBADMSG: skb->csum no longer matches the packet
        assert verdict == REDIRECT
        parse(out)


@needs_kernel
def test_a_zero_ipv4_udp_checksum_stays_zero_and_the_ip_header_checksum_is_right(trns, kp):
    with trns.entered():
        kp.outside_bind(L4, C4, T4)
    verdict, out, _ = run(trns, kp, datagram(C4, L4, b"no checksum", zero_csum=True))
    p = parse(out)
    assert verdict == REDIRECT and p["csum"] == 0 and p["dst"] == "192.0.2.50" and p["payload"] == b"no checksum"


@needs_kernel
def test_what_the_agent_must_see_passes_untouched(trns, kp):
    with trns.entered():
        kp.outside_bind(L4, C4, T4)
        kp.outside_bind(L6, C6, T6)
    ttl1 = datagram(C4, L4, b"a", ttl=1)
    frag_mf = eth(ip4(C4[0], L4[0], udp(*C4, *L4, b"first part"), frag=0x2000))
    frag_off = eth(ip4(C4[0], L4[0], udp(*C4, *L4, b"later part"), frag=0x0010))
    v6frag = eth(ip6(C6[0], L6[0], struct.pack("!BxHI", 17, 1, 7) + udp(*C6, *L6, b"frag"), nexthdr=44))
    options = eth(ip4(C4[0], L4[0], udp(*C4, *L4, b"opts"), options=b"\x01\x01\x01\x00"))
    good = datagram(C4, L4, b"0123456789")
    bad_len = bytearray(good)
    struct.pack_into("!H", bad_len, 38, 17)  # UDP length says 9 bytes of payload, IP says 10
    zero6 = bytearray(datagram(C6, L6, b"zero"))
    struct.pack_into("!H", zero6, 60, 0)
    cases = {
        "control message from the tunnel": (datagram(T4, L4, CTRL), "control"),
        "IPv6 control message": (datagram(C6, L6, CTRL), "control"),
        "unknown source": (datagram(("203.0.113.99", 40000), L4, b"who"), "unknown"),
        "other port": (datagram(C4, ("198.51.100.1", 5001), b"other"), "unknown"),
        "TTL 1": (ttl1, "ttl"),
        "more fragments": (frag_mf, "fragment"),
        "fragment offset": (frag_off, "fragment"),
        "IPv6 fragment header": (v6frag, "fragment"),
        "IPv4 options": (options, "ip_options"),
        "IPv4 without a UDP header": (eth(ip4(C4[0], L4[0], b"")), "malformed"),
        "half a UDP header": (eth(ip4(C4[0], L4[0], udp(*C4, *L4, b"")[:4])), "malformed"),
        "IPv6, half a UDP header": (eth(ip6(C6[0], L6[0], udp(*C6, *L6, b"")[:4])), "malformed"),
        "truncated": (good[:-3], "malformed"),
        "truncated IPv6": (datagram(C6, L6, b"0123456789")[:-1], "malformed"),
        "UDP length": (bytes(bad_len), "malformed"),
        "zero IPv6 checksum": (bytes(zero6), "malformed"),
        "not UDP": (eth(ip4(C4[0], L4[0], bytes(20), proto=6)), "not_udp"),
        "ARP": (ZERO_MAC + bytes(6) + b"\x08\x06" + bytes(28), "not_ip"),
        "someone else's MAC": (datagram(C4, L4, b"x", mac=b"\x02\0\0\0\0\x99"), "otherhost"),
    }
    for what, (frame, reason) in cases.items():
        verdict, out, moved = run(trns, kp, frame)
        assert (verdict, out, moved) == (NEXT, frame, {reason: 1}), what
    assert kp.counters()[C4][:2] == (0, 0) and kp.counters()[T4][:2] == (0, 0)
    # a datagram of a control message's length without the magic is data
    verdict, _, moved = run(trns, kp, datagram(T4, L4, b"UDPX" + bytes(proto.CTRL_LEN - 4)))
    assert verdict == REDIRECT and moved == {"relayed": 1}


@needs_kernel
@pytest.mark.parametrize("rule", [outside_rule(False, False), outside_rule(False, True), outside_rule(True, False),
                                  outside_rule(True, True), inside_rule(False), inside_rule(True)],
                         ids=["v3", "v3-wireguard", "legacy", "legacy-wireguard", "inside", "inside-legacy"])
def test_the_program_leaves_to_the_agent_exactly_what_the_core_s_rule_claims(trns, kp, rule):
    with trns.entered():
        assert kp.outside_bind(L4, C4, T4, up_rule=rule_flags(rule)) == (True, True)
    n = proto.CTRL_LEN
    for size in sorted({0, 1, 3, 4, 39, 40, 41, 91, 92, 93, 147, 148, 149, n - 1, n, n + 1, 200}):
        for head in (b"", proto.MAGIC, b"UDPX", b"\x01\x00\x00\x00"):
            payload = (head + bytes(size))[:size]
            verdict, _, moved = run(trns, kp, datagram(C4, L4, payload))
            claimed = rule.core_sees(payload)
            assert (verdict == NEXT) == claimed, (size, head)
            assert moved == ({"control": 1} if rule.kind(payload) is Kind.CONTROL else {"wireguard": 1} if claimed
                             else {"relayed": 1}), (size, head)


@needs_kernel
def test_legacy_mode_leaves_every_40_byte_datagram_and_relays_control_message_sized_ones(trns):
    with trns.entered():
        k = KernelPath.open(ifaces=["lo"], legacy=True)
    try:
        with trns.entered():
            k.outside_bind(L4, C4, T4)
        frame = datagram(T4, L4, bytes(40))
        assert run(trns, k, frame) == (NEXT, frame, {"control": 1})
        assert run(trns, k, datagram(T4, L4, CTRL))[0] == REDIRECT
        assert run(trns, k, datagram(T4, L4, bytes(41)))[0] == REDIRECT
    finally:
        k.close()


@needs_kernel
def test_wireguard_handshake_lengths_reach_the_agent_only_when_asked(trns, kp):
    with trns.entered():
        wg = KernelPath.open(ifaces=["lo"], wireguard=True)
    try:
        with trns.entered():
            wg.outside_bind(L4, C4, T4)
            kp.outside_bind(L4, C4, T4)
        for n in (148, 92):
            frame = datagram(C4, L4, b"\x01" + bytes(n - 1))
            assert run(trns, wg, frame) == (NEXT, frame, {"wireguard": 1})
            assert run(trns, kp, frame)[0] == REDIRECT
        assert run(trns, wg, datagram(C4, L4, b"\x04" + bytes(31)))[0] == REDIRECT  # transport data
    finally:
        wg.close()


@needs_kernel
def test_a_gso_packet_counts_its_segments_and_passes_if_a_segment_may_be_a_control_message(trns, kp):
    with trns.entered():
        kp.outside_bind(L4, C4, T4)
        ifindex = 1
    frame = datagram(C4, L4, bytes(300))
    verdict, out, moved = run(trns, kp, frame, ctx=skb_ctx(ifindex, gso_size=100, gso_segs=3))
    assert verdict == REDIRECT and parse(out)["dst"] == "192.0.2.50"
    assert kp.counters()[C4][:2] == (3, 300)
    n = proto.CTRL_LEN
    for size, total in ((n, 2 * n), (200, 200 + n)):  # a segment of a control message's length: first, or last
        frame = datagram(C4, L4, bytes(total))
        segs = -(-total // size)
        assert run(trns, kp, frame, ctx=skb_ctx(ifindex, gso_size=size, gso_segs=segs)) == (NEXT, frame,
                                                                                            {"control": 1})


@needs_kernel
def test_the_route_decides_a_neighbour_not_yet_resolved_is_fine_too_big_blackholed_or_no_forwarding_is_not(
        trns, kp):
    unresolved, holed = ("198.51.100.77", 41000), ("192.0.2.200", 41000)
    with trns.entered():
        trns.sh("ip route replace blackhole 192.0.2.200/32")
        kp.outside_bind(L4, C4, unresolved)
        kp.outside_bind(L4, ("203.0.113.8", 40000), holed)
    verdict, out, moved = run(trns, kp, datagram(C4, L4, b"who has 198.51.100.77?"))
    assert (verdict, moved, parse(out)["dst"]) == (REDIRECT, {"relayed": 1}, "198.51.100.77")
    too_big = datagram(C4, L4, bytes(1500 - 28 + 1))
    assert run(trns, kp, too_big) == (NEXT, too_big, {"mtu": 1})
    frame = datagram(("203.0.113.8", 40000), L4, b"into the hole")
    assert run(trns, kp, frame) == (NEXT, frame, {"no_route": 1})
    trns.sh("sysctl -qw net.ipv4.conf.lo.forwarding=0")
    try:
        frame = datagram(C4, L4, b"no forwarding")
        assert run(trns, kp, frame) == (NEXT, frame, {"fwd_disabled": 1})
    finally:
        trns.sh("sysctl -qw net.ipv4.conf.lo.forwarding=1")


@needs_kernel
def test_a_local_destination_goes_into_lo_with_lo_s_mac_from_any_device(trns, kp):
    local_tunnel = ("127.0.0.1", 41000)
    with trns.entered():
        assert kp.outside_bind(L4, C4, local_tunnel) == (True, True)
        v0 = socket.if_nametoindex("v0")
        mac = mac_of("v0")
    frame = datagram(C4, L4, b"to a local socket", mac=mac)
    verdict, out, moved = run(trns, kp, frame, ctx=skb_ctx(v0))
    p = parse(out)
    assert verdict == REDIRECT and moved == {"local": 1} and p["dst_mac"] == ZERO_MAC
    assert (p["src"], p["dst"], p["dport"]) == ("198.51.100.1", "127.0.0.1", 41000)


@needs_kernel
def test_a_local_datagram_for_an_agent_goes_round_lo_again_only_if_another_agent_s_program_came_before(trns, kp):
    """On lo, a rewritten datagram for a local agent (here the outside agent: the tx direction) goes round lo
    again when another agent's program ran before this one (that one may relay it on); one for a leaf (the
    service: rx) goes on to the stack either way."""
    tl, outside, sl, service = ("127.0.0.1", 33000), ("127.0.0.1", 9999), ("127.0.0.1", 34000), \
        ("127.0.0.1", 51820)
    with trns.entered():
        second = KernelPath.open(ifaces=["lo"])  # attached after kp: kp's program runs first
    try:
        with trns.entered():
            kp.inside_pipe(tl, outside, sl, service)
            second.inside_pipe(tl, outside, sl, service)
        frame = datagram(service, sl, b"x")
        first_verdict, first_out, _ = run(trns, kp, frame)
        second_verdict, second_out, _ = run(trns, second, frame)
        assert (first_verdict, second_verdict) == (NEXT, REDIRECT) and first_out == second_out
        assert parse(first_out)["dport"] == 9999
        frame = datagram(outside, tl, b"x")
        first_verdict, first_out, _ = run(trns, kp, frame)
        second_verdict, second_out, _ = run(trns, second, frame)
        assert (first_verdict, second_verdict) == (NEXT, NEXT) and first_out == second_out
        assert parse(first_out)["dport"] == 51820
    finally:
        second.close()


@needs_kernel
def test_dual_stack_addresses_and_a_wildcard_listener_take_the_address_the_datagram_was_sent_to(trns, kp):
    mapped = lambda a: ("::ffff:" + a[0], a[1], 0, 0)  # noqa: E731
    with trns.entered():
        assert kp.outside_bind(("::", 5000, 0, 0), mapped(C4), mapped(T4)) == (True, True)
    verdict, out, _ = run(trns, kp, datagram(C4, L4, b"v4 through a v6 socket"))
    p = parse(out)
    assert verdict == REDIRECT and (p["src"], p["sport"], p["dst"]) == ("198.51.100.1", 5000, "192.0.2.50")
    assert mapped(C4) in kp.counters()


@needs_kernel
def test_client_and_tunnel_of_different_families_stay_with_the_agent(trns, kp):
    with trns.entered():
        assert kp.outside_bind(("::", 5000, 0, 0), C4, T6) == (False, False)
    assert "family" in kp.kept[C4] and kp.counters() == {}
    frame = datagram(C4, L4, b"v4 client")
    assert run(trns, kp, frame) == (NEXT, frame, {"unknown": 1})


@needs_kernel
def test_rebinding_keeps_the_counters_and_unbinding_gives_the_flow_back_to_the_agent(trns, kp):
    with trns.entered():
        kp.outside_bind(L4, C4, T4)
        run(trns, kp, datagram(C4, L4, b"12345"))
        run(trns, kp, datagram(C4, L4, b"12345"))
        kp.outside_bind(L4, C4, T4B)  # the tunnel's NAT mapping moved
        _, out, _ = run(trns, kp, datagram(C4, L4, b"1"))
        assert parse(out)["dst"] == "192.0.2.51" and kp.counters()[C4][:2] == (3, 11)
        kp.outside_unbind(C4, T4B)
    frame = datagram(C4, L4, b"after")
    assert run(trns, kp, frame) == (NEXT, frame, {"unknown": 1}) and kp.counters() == {}


@needs_kernel
def test_a_full_flow_table_leaves_the_flows_that_do_not_fit_to_the_agent(trns):
    with trns.entered():
        k = KernelPath.open(ifaces=["lo"], max_flows=3)
    try:
        with trns.entered():
            assert k.outside_bind(L4, C4, T4) == (True, True)
            c2, t2 = ("203.0.113.8", 40000), ("192.0.2.52", 41000)
            assert k.outside_bind(L4, c2, t2) == (True, False)
        assert k.kept == {t2: "the kernel's flow table refused it: Argument list too long"}
        assert set(k.counters()) == {C4, T4, c2}
        frame = datagram(t2, L4, b"to the agent")
        assert run(trns, k, frame) == (NEXT, frame, {"unknown": 1})
        with trns.entered():
            k.outside_unbind(C4, T4)
            assert k.outside_bind(L4, c2, t2) == (True, True) and k.kept == {}
    finally:
        k.close()


@needs_kernel
def test_an_inside_pipe_relays_outside_to_service_and_service_to_outside(trns, kp):
    tl, outside, sl, service = ("198.51.100.1", 33000), ("203.0.113.10", 9999), ("127.0.0.1", 34000), \
        ("127.0.0.1", 51820)
    with trns.entered():
        assert kp.inside_pipe(tl, outside, sl, service) == (True, True)
    verdict, out, moved = run(trns, kp, datagram(outside, tl, b"from a client"))
    p = parse(out)
    assert (verdict, moved) == (NEXT, {"local": 1})  # on lo already, and the only agent there: on it goes
    assert (p["src"], p["sport"], p["dst"], p["dport"]) == ("127.0.0.1", 34000, "127.0.0.1", 51820)
    verdict, out, moved = run(trns, kp, datagram(service, sl, b"from the service"))
    p = parse(out)
    assert (verdict, moved) == (REDIRECT, {"relayed": 1})
    assert (p["src"], p["sport"], p["dst"], p["dport"]) == ("198.51.100.1", 33000, "203.0.113.10", 9999)
    assert {k: v[:2] for k, v in kp.counters().items()} == {tl: (1, 13), sl: (1, 16)}
    with trns.entered():
        kp.inside_unpipe(tl, sl)
    assert kp.counters() == {}


# --- attached for real ---

def _nothing_waiting(*socks: socket.socket) -> bool:
    r, _, _ = select.select(socks, [], [], 0.2)
    return not r


@pytest.fixture
def ns_factory():
    made: list[Netns] = []

    def make(tag: str) -> Netns:
        if WHY_NOT:
            pytest.skip(WHY_NOT)
        n = Netns(f"utk{os.getpid() % 100000}-{tag}")
        made.append(n)
        return n

    yield make
    for n in made:
        n.close()


def _udp(family: int, address: tuple, connect: tuple | None = None) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind(address)
    if connect:
        s.connect(connect)
    s.settimeout(2.0)
    return s


@needs_kernel
@pytest.mark.parametrize("family,host,inside_first", [(socket.AF_INET, "127.0.0.1", False),
                                                       (socket.AF_INET, "127.0.0.1", True),
                                                       (socket.AF_INET6, "::1", False),
                                                       (socket.AF_INET6, "::1", True)])
def test_two_agents_on_one_loopback_relay_a_round_trip_without_their_sockets_seeing_it(ns_factory, family, host,
                                                                                        inside_first):
    ns = ns_factory("lo" + str(family))
    socks: list[socket.socket] = []
    paths: list[KernelPath] = []
    try:
        with ns.entered():
            def sock(port, connect=None):
                socks.append(_udp(family, (host, port), connect))
                return socks[-1]

            service = sock(51820)
            listen = sock(5000)  # the outside agent's socket
            tunnel = sock(41000, (host, 5000))  # the inside agent's tunnel socket, registered at the outside
            service_side = sock(34000, (host, 51820))  # the inside agent's socket towards the service
            client = sock(40000)
            stranger = sock(40001)
            outside_kp = inside_kp = None
            for role in (("inside", "outside") if inside_first else ("outside", "inside")):
                k = KernelPath.open(ifaces=["lo"])
                paths.append(k)
                if role == "outside":
                    outside_kp = k
                else:
                    inside_kp = k
            assert outside_kp.outside_bind(listen.getsockname(), client.getsockname(),
                                           tunnel.getsockname()) == (True, True)
            assert inside_kp.inside_pipe(tunnel.getsockname(), listen.getsockname(), service_side.getsockname(),
                                         service.getsockname()) == (True, True)
            client.sendto(b"ping", (host, 5000))
            data, peer = service.recvfrom(100)
            assert data == b"ping" and peer[:2] == (host, 34000)
            service.sendto(b"pong", peer)
            data, peer = client.recvfrom(100)
            assert data == b"pong" and peer[:2] == (host, 5000)
            assert _nothing_waiting(listen, tunnel, service_side)
            assert {k[1]: v[:2] for k, v in outside_kp.counters().items()} == {40000: (1, 4), 41000: (1, 4)}
            assert {k[1]: v[:2] for k, v in inside_kp.counters().items()} == {41000: (1, 4), 34000: (1, 4)}
            # the agent sees the rest: a stranger, and the tunnel's control messages
            stranger.sendto(b"hello?", (host, 5000))
            assert listen.recvfrom(100)[0] == b"hello?"
            tunnel.send(CTRL)
            data, peer = listen.recvfrom(200)
            assert data == CTRL and peer[:2] == (host, 41000)
            assert _nothing_waiting(service, client)
    finally:
        for s in socks:
            s.close()
        for k in paths:
            k.close()


@needs_kernel
@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_table_that_sends_datagrams_round_in_a_circle_lets_them_go_at_the_ttl_s_end(ns_factory, family, host):
    ns = ns_factory("ring" + str(family))
    a, b, c, d = ((host, p) for p in (7001, 7002, 7003, 7004))
    socks: list[socket.socket] = []
    paths: list[KernelPath] = []
    try:
        with ns.entered():
            paths += [KernelPath.open(ifaces=["lo"]), KernelPath.open(ifaces=["lo"])]
            # one agent: a -> b becomes c -> d; the other: c -> d becomes a -> b (each towards an agent, as a
            # service's answer to the outside agent: such a datagram goes round lo for the other to see)
            assert paths[0].inside_pipe(c, d, b, a)[1] and paths[1].inside_pipe(a, b, d, c)[1]
            sender, at_b, at_d = _udp(family, a), _udp(family, b), _udp(family, d)
            socks += [sender, at_b, at_d]
            if family == socket.AF_INET:
                sender.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 5)
            else:
                sender.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 5)
            sender.sendto(b"round and round", b)
            # rewritten at TTL 5, 4, 3 and 2; with 1 left it goes to the stack as it is: from a, to b
            data, peer = at_b.recvfrom(100)
            assert data == b"round and round" and peer[:2] == a
            assert [p.counters()[k][:2] for p, k in ((paths[0], b), (paths[1], d))] == [(2, 30), (2, 30)]
            assert [p.stats()["ttl"] for p in paths] == [1, 0]
            assert _nothing_waiting(at_d)
    finally:
        for s in socks:
            s.close()
        for k in paths:
            k.close()


@needs_kernel
def test_a_gso_send_is_relayed_as_its_datagrams_unless_one_may_be_a_control_message(ns_factory):
    ns = ns_factory("gso")
    socks: list[socket.socket] = []
    k = None
    try:
        with ns.entered():
            listen, tunnel, client = (_udp(socket.AF_INET, ("127.0.0.1", p)) for p in (5000, 41000, 40000))
            socks += [listen, tunnel, client]
            k = KernelPath.open(ifaces=["lo"])
            k.outside_bind(listen.getsockname(), client.getsockname(), tunnel.getsockname())
            client.setsockopt(socket.IPPROTO_UDP, 103, 1000)  # UDP_SEGMENT: one send, datagrams of 1000 bytes
            client.sendto(bytes(1000) * 2 + b"last", ("127.0.0.1", 5000))
            got = [tunnel.recvfrom(2000) for _ in range(3)]
            assert [(len(d), a) for d, a in got] == [(1000, ("127.0.0.1", 5000))] * 2 + [(4, ("127.0.0.1", 5000))]
            assert k.counters()[client.getsockname()][:2] == (3, 2004)
            client.setsockopt(socket.IPPROTO_UDP, 103, proto.CTRL_LEN)  # segments of a control message's length
            client.sendto(CTRL * 3, ("127.0.0.1", 5000))
            assert [listen.recvfrom(200) for _ in range(3)] == [(CTRL, client.getsockname())] * 3
            client.setsockopt(socket.IPPROTO_UDP, 103, 200)  # the last, shorter segment is one
            client.sendto(bytes(200) + CTRL, ("127.0.0.1", 5000))
            assert [listen.recvfrom(300) for _ in range(2)] == [(bytes(200), client.getsockname()),
                                                                (CTRL, client.getsockname())]
            assert _nothing_waiting(tunnel)
    finally:
        for s in socks:
            s.close()
        if k is not None:
            k.close()


def _frames(sock: socket.socket, port: int, seconds: float = 2.0) -> bytes:
    """The first incoming frame on a packet socket carrying a UDP datagram to `port`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        frame, meta = sock.recvfrom(4096)
        if meta[2] == socket.PACKET_OUTGOING or len(frame) < 42:
            continue
        l3 = frame[14:]
        if frame[12:14] == b"\x08\x00" and l3[9] == 17:
            off = (l3[0] & 15) * 4
        elif frame[12:14] == b"\x86\xdd" and l3[6] == 17:
            off = 40
        else:
            continue
        if struct.unpack("!H", l3[off + 2:off + 4])[0] == port:
            return frame
    raise AssertionError(f"no datagram to port {port} within {seconds} s")


def _csum_errors() -> int:
    with open("/proc/thread-self/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("InCsumErrors")])


@needs_kernel
@pytest.mark.parametrize("v6", [False, True])
def test_a_bound_flow_is_redirected_to_the_neighbour_with_checksums_the_receiver_verifies(ns_factory, v6):
    vps, net = ns_factory("vps"), ns_factory("net")
    veth(vps, "eth0", ["198.51.100.1/24", "2001:db8:5::1/64"], net, "eth0", ["198.51.100.2/24", "2001:db8:5::2/64"])
    fam, a, b = ((socket.AF_INET6, "2001:db8:5::1", "2001:db8:5::2") if v6
                 else (socket.AF_INET, "198.51.100.1", "198.51.100.2"))
    listen_addr, client_addr, tunnel_addr, stranger_addr = (a, 5000), (b, 40000), (b, 41000), (b, 40500)
    socks: list[socket.socket] = []
    k = None
    try:
        with vps.entered():
            vps_mac = mac_of("eth0")
            listen = _udp(fam, listen_addr)
            socks.append(listen)
            k = KernelPath.open()  # every interface: lo and eth0
            assert set(k.attached) == {"lo", "eth0"}
            assert k.outside_bind(listen_addr, client_addr, tunnel_addr) == (True, True)
        with net.entered():
            net_mac = mac_of("eth0")
            client, tunnel = _udp(fam, client_addr), _udp(fam, tunnel_addr)
            socks += [client, tunnel]
            raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            socks.append(raw)
            raw.bind(("eth0", 0x0003))
            errors = _csum_errors()

            def send(src, payload):  # a frame whose checksums are in it (no offload to trust)
                raw.send(datagram(src, listen_addr, payload, mac=vps_mac, src_mac=net_mac))

            send(client_addr, b"up the tunnel")
            p = parse(_frames(raw, 41000))
            assert (p["src"], p["sport"], p["dst"], p["dport"], p["ttl"]) == (a, 5000, b, 41000, 63)
            assert p["dst_mac"] == net_mac and p["src_mac"] == vps_mac and p["payload"] == b"up the tunnel"
            assert tunnel.recvfrom(100) == (b"up the tunnel", (a, 5000, 0, 0) if v6 else (a, 5000))
            send(tunnel_addr, b"down to the client")
            p = parse(_frames(raw, 40000))
            assert (p["src"], p["sport"], p["dst"], p["dport"]) == (a, 5000, b, 40000)
            assert client.recvfrom(100)[0] == b"down to the client"
            assert _csum_errors() == errors
        with vps.entered():
            assert _nothing_waiting(listen)
            assert {kk: v[:2] for kk, v in k.counters().items()} == {client_addr: (1, 13), tunnel_addr: (1, 18)}
            assert k.stats()["relayed"] == 2
        with net.entered():
            send(stranger_addr, b"unknown")
            send(tunnel_addr, CTRL)
            client.sendto(bytes(3000), listen_addr)  # fragments, on this 1500-byte link
        with vps.entered():
            assert listen.recvfrom(100)[0] == b"unknown"
            data, peer = listen.recvfrom(200)
            assert data == CTRL and peer[:2] == tunnel_addr
            assert listen.recvfrom(4000) == (bytes(3000), client.getsockname() if not v6 else (*client_addr, 0, 0))
            assert k.stats()["fragment"] >= 2
    finally:
        for s in socks:
            s.close()
        if k is not None:
            k.close()


@needs_kernel
@pytest.mark.parametrize("v6", [False, True])
def test_an_inside_agent_pipes_between_its_network_and_a_service_on_its_own_loopback(ns_factory, v6):
    vps, home = ns_factory("ovps"), ns_factory("home")
    veth(vps, "eth0", ["198.51.100.1/24", "2001:db8:5::1/64"], home, "eth0", ["198.51.100.2/24", "2001:db8:5::2/64"])
    fam, lo, a, b = ((socket.AF_INET6, "::1", "2001:db8:5::1", "2001:db8:5::2") if v6
                     else (socket.AF_INET, "127.0.0.1", "198.51.100.1", "198.51.100.2"))
    socks: list[socket.socket] = []
    k = None
    try:
        with vps.entered():
            outside = _udp(fam, (a, 9999))  # stands for the outside agent
            socks.append(outside)
        with home.entered():
            service = _udp(fam, (lo, 51820))
            tunnel = _udp(fam, (b, 33000), (a, 9999))
            service_side = _udp(fam, (lo, 34000), (lo, 51820))
            socks += [service, tunnel, service_side]
            k = KernelPath.open()
            assert k.inside_pipe(tunnel.getsockname(), (a, 9999), service_side.getsockname(),
                                 service.getsockname()) == (True, True)
        with vps.entered():
            outside.sendto(b"a client's datagram", (b, 33000))
        with home.entered():
            data, peer = service.recvfrom(100)
            assert data == b"a client's datagram" and peer[:2] == (lo, 34000)
            service.sendto(b"the service's answer", peer)
        with vps.entered():
            data, peer = outside.recvfrom(100)
            assert data == b"the service's answer" and peer[:2] == (b, 33000)
        with home.entered():
            assert _nothing_waiting(tunnel, service_side)
            assert {kk[1]: v[:2] for kk, v in k.counters().items()} == {33000: (1, 19), 34000: (1, 20)}
            assert (k.stats()["local"], k.stats()["relayed"]) == (1, 1)
    finally:
        for s in socks:
            s.close()
        if k is not None:
            k.close()


# --- nothing stays behind ---

HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from udp_tunnel.io.kernel import KernelPath
k = KernelPath.open()
print(" ".join(sorted(k.attached)), flush=True)
time.sleep(60)
"""


def _ours(ifindex: int) -> list[int]:
    return [p for p in bpf.prog_ids(ifindex) if bpf.prog_name_by_id(p) == "udpt_relay"]


@needs_kernel
def test_an_agent_killed_with_sigkill_leaves_no_program_attached_and_the_next_attaches(ns_factory):
    ns = ns_factory("kill")
    ns.sh("ip link add k0 type veth peer name k1 && ip link set k0 up && ip link set k1 up")
    code = HOLDER.format(src=os.path.join(ROOT, "src"))
    p = subprocess.Popen(["ip", "netns", "exec", ns.name, sys.executable, "-c", code], stdout=subprocess.PIPE,
                         text=True)
    try:
        r, _, _ = select.select([p.stdout], [], [], 20)
        assert r, "the holder did not start"
        assert p.stdout.readline().split() == ["k0", "k1", "lo"]
        with ns.entered():
            indexes = [socket.if_nametoindex(n) for n in ("lo", "k0", "k1")]
            assert [len(_ours(i)) for i in indexes] == [1, 1, 1]
        os.kill(p.pid, signal.SIGKILL)
        assert p.wait(timeout=10) == -signal.SIGKILL
        with ns.entered():
            deadline = time.monotonic() + 5  # the links go as the dead process's files are closed
            while any(_ours(i) for i in indexes) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [bpf.prog_ids(i) for i in indexes] == [[], [], []]
            k = KernelPath.open()
            try:
                assert [len(_ours(i)) for i in indexes] == [1, 1, 1]
            finally:
                k.close()
            assert [bpf.prog_ids(i) for i in indexes] == [[], [], []]
    finally:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


@needs_kernel
def test_lo_s_settings_an_agent_turned_on_are_set_back_when_the_last_agent_stops(ns_factory):
    ns = ns_factory("sysctl")
    ns.sh("ip link add s0 type veth peer name s1 && ip link set s0 up && ip link set s1 up"
          " && ip addr add 198.51.100.1/24 dev s0 && ip route add default via 198.51.100.2")
    forwarding = "/proc/sys/net/ipv4/conf/lo/forwarding"

    def setting() -> str:
        return ns.sh(f"cat {forwarding}").strip()

    with ns.entered():
        a = KernelPath.open(ifaces=["lo", "s0"])
        assert setting() == "0"
        assert a.outside_bind(L4, C4, T4) == (True, True)  # to another host: routes are looked up from lo
        assert setting() == "1" and any("turned on net.ipv4.conf.lo.forwarding" in n for n in a.notes)
    a.close()  # (from another namespace: it goes back to its own to set them back)
    assert setting() == "0"
    with ns.entered():
        a, b = KernelPath.open(ifaces=["lo"]), KernelPath.open(ifaces=["lo"])
        a.outside_bind(L4, C4, T4)
        b.outside_bind(L4, ("203.0.113.8", 40000), T4B)
        assert setting() == "1"
        a.close()
        assert setting() == "1"  # b still relays with it (it found it turned on by a, and holds it too)
        b.close()
    assert setting() == "0"  # the last one out set it back
    ns.sh(f"echo 1 > {forwarding}")  # on by the host's own choice: no agent turned it on
    with ns.entered():
        a = KernelPath.open(ifaces=["lo"])
        a.outside_bind(L4, C4, T4)
        assert not any("forwarding" in n for n in a.notes)
        a.close()
    assert setting() == "1"


# --- the host's own NAT ---

@needs_kernel
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (nftables)")
def test_a_host_that_masquerades_its_wan_traffic_keeps_that_direction_in_user_space(ns_factory):
    ns = ns_factory("nat")
    ns.sh("ip link add wan type veth peer name wanp && ip link add lan type veth peer name lanp"
          " && for i in wan wanp lan lanp; do ip link set $i up; done"
          " && ip addr add 100.64.1.2/30 dev wan && ip addr add 192.0.2.1/28 dev lan"
          " && ip route add default via 100.64.1.1")
    ns.sh("nft -f - <<'EOF'\ntable ip nat {\n chain post { type nat hook postrouting priority srcnat; "
          "oifname \"wan\" masquerade; }\n}\nEOF")
    tunnel_local, outside = ("100.64.1.2", 33000), ("203.0.113.10", 9999)
    service_local, service = ("192.0.2.1", 34000), ("192.0.2.5", 51820)
    with ns.entered():
        nat = NatRules.load()
        assert nat.unknown is None
        assert nat.applies(ipaddress.ip_address("100.64.1.2"), "wan") == "nft ip nat post handle 2"
        assert nat.applies(ipaddress.ip_address("192.0.2.1"), "lan") is None
        k = KernelPath.open(ifaces=["lo", "wan", "lan"])
        try:
            # outside -> service leaves through lan (no NAT): kernel; service -> outside through wan: the agent
            assert k.inside_pipe(tunnel_local, outside, service_local, service) == (True, False)
            assert k.kept == {service_local: "this host NATs it (nft ip nat post handle 2)"}
            assert set(k.entries) == {tunnel_local}
            ns.sh("nft flush ruleset")
            k.refresh()
            assert k.kept == {} and set(k.entries) == {tunnel_local, service_local}
        finally:
            k.close()
