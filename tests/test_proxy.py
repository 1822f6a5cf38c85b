"""PROXY protocol v2 headers for UDP, byte by byte against HAProxy's proxy-protocol.txt, 2.2.

The expected bytes are written out from the specification's text, field by field,
not from the module's constants.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from udp_tunnel.io.proxied import EVERY, FIRST, ProxyFraming
from udp_tunnel.io.services import ServiceTarget
from udp_tunnel.wire import proxy

# "\x0D \x0A \x0D \x0A \x00 \x0D \x0A \x51 \x55 \x49 \x54 \x0A"
SIG = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


def test_udp_over_ipv4_is_the_signature_then_21_12_length_12_then_addresses_and_ports():
    h = proxy.encode(("198.51.100.7", 40000), ("203.0.113.10", 9999))
    assert h == bytes.fromhex(
        "0d0a0d0a000d0a515549540a"  # signature
        "21"  # version 2 (high nibble), command PROXY 1 (low nibble)
        "12"  # AF_INET 1 (high nibble), DGRAM 2 (low nibble): "UDP over IPv4"
        "000c"  # 2*4 + 2*2 = 12 address bytes follow, network order
        "c6336407"  # source address 198.51.100.7
        "cb00710a"  # destination address 203.0.113.10
        "9c40"  # source port 40000
        "270f")  # destination port 9999
    assert len(h) == 28 == 16 + 12


def test_udp_over_ipv6_is_the_signature_then_21_22_length_36_then_addresses_and_ports():
    h = proxy.encode(("2001:db8:1::7", 40000, 0, 0), ("2001:db8:5::10", 9999, 0, 0))
    assert h == SIG + bytes([0x21, 0x22, 0x00, 0x24]) + bytes.fromhex(
        "20010db8000100000000000000000007"  # source 2001:db8:1::7
        "20010db8000500000000000000000010"  # destination 2001:db8:5::10
        "9c40" "270f")
    assert len(h) == 52 == 16 + 36


def test_an_ipv4_client_of_an_ipv6_service_address_is_sent_as_ipv6_with_the_client_ipv4_mapped():
    h = proxy.encode(("198.51.100.7", 40000), ("::1", 7000))
    assert h == SIG + bytes([0x21, 0x22, 0x00, 0x24]) + bytes.fromhex(
        "00000000000000000000ffffc6336407"  # ::ffff:198.51.100.7
        "00000000000000000000000000000001"  # ::1
        "9c40" "1b58")


def test_an_ipv6_client_of_an_ipv4_service_address_gets_the_service_ipv4_mapped():
    h = proxy.encode(("2001:db8:1::7", 40000), ("127.0.0.1", 7000))
    assert h[13] == 0x22 and h[16:32] == ipaddress.ip_address("2001:db8:1::7").packed
    assert h[32:48] == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])


def test_an_ipv4_mapped_client_seen_by_a_dual_stack_socket_is_sent_as_ipv4():
    assert proxy.encode(("::ffff:198.51.100.7", 40000, 0, 0), ("203.0.113.10", 9999)) == \
        proxy.encode(("198.51.100.7", 40000), ("203.0.113.10", 9999))


def test_the_destination_is_the_outside_address_the_client_reached_else_the_service():
    service = ("127.0.0.1", 51820)
    assert proxy.destination(("198.51.100.10", 9999), service) == ("198.51.100.10", 9999)
    assert proxy.destination(None, service) == service
    assert proxy.destination(("0.0.0.0", 9999), service) == service  # a wildcard listen address is no answer
    assert proxy.destination(("::", 9999, 0, 0), service) == service


def test_decode_reads_back_what_encode_wrote_and_splits_off_the_payload():
    data = proxy.encode(("198.51.100.7", 40000), ("203.0.113.10", 9999)) + b"payload"
    h, payload = proxy.split(data)
    assert h == proxy.Header(proxy.PROXY, proxy.FAM_INET, proxy.TRANS_DGRAM, ("198.51.100.7", 40000),
                             ("203.0.113.10", 9999), 28)
    assert bytes(payload) == b"payload"


def test_decode_skips_tlvs_counted_in_the_length_and_returns_them_raw():
    tlv = bytes([0x04, 0x00, 0x03]) + b"abc"  # PP2_TYPE_NOOP, length 3
    data = SIG + bytes([0x21, 0x12, 0x00, 12 + len(tlv)]) + bytes(12) + tlv + b"x"
    h, payload = proxy.split(data)
    assert h.length == 16 + 12 + 6 and h.tlvs == tlv and bytes(payload) == b"x"


def test_a_local_header_with_an_address_block_is_skipped_by_its_length_and_its_addresses_ignored():
    data = SIG + bytes([0x20, 0x12, 0x00, 0x0C]) + bytes(range(12)) + b"x"
    h, payload = proxy.split(data)
    assert (h.command, h.source, h.destination, h.length) == (proxy.LOCAL, None, None, 28)
    assert bytes(payload) == b"x"


@pytest.mark.parametrize("data, why", [
    (SIG[:15], "shorter than the 16-byte fixed part"),
    (b"\x00" + SIG[1:] + bytes([0x21, 0x12, 0, 0]), "no PROXY v2 signature"),
    (SIG + bytes([0x11, 0x12, 0, 12]) + bytes(12), "version 1, not 2"),
    (SIG + bytes([0x22, 0x12, 0, 12]) + bytes(12), "unassigned command 0x2"),
    (SIG + bytes([0x21, 0x42, 0, 12]) + bytes(12), "unassigned family/transport byte 0x42"),
    (SIG + bytes([0x21, 0x13, 0, 12]) + bytes(12), "unassigned family/transport byte 0x13"),
    (SIG + bytes([0x21, 0x12, 0, 12]) + bytes(11), "header says 28 bytes, the datagram has 27"),
    (SIG + bytes([0x21, 0x22, 0, 12]) + bytes(12), "address block of 12 bytes, family 2 needs 36"),
])
def test_decode_refuses_what_a_receiver_must_drop(data, why):
    with pytest.raises(proxy.ProxyHeaderError, match=why):
        proxy.decode(data)


def test_a_version_1_text_header_is_not_taken_for_version_2():
    assert not proxy.is_header(b"PROXY TCP4 198.51.100.7 203.0.113.10 40000 9999\r\n")


addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str))


@given(addresses, st.integers(0, 65535), addresses, st.integers(0, 65535))
def test_any_pair_of_addresses_decodes_to_itself(a, ap, b, bp):
    h = proxy.decode(proxy.encode((a, ap), (b, bp)))
    v4 = ":" not in a and ":" not in b

    def norm(x):  # what a mixed pair becomes: the IPv4 one, mapped
        return x if v4 or ":" in x else f"::ffff:{x}"
    assert h.family == (proxy.FAM_INET if v4 else proxy.FAM_INET6)
    assert ipaddress.ip_address(h.source[0]) == ipaddress.ip_address(norm(a)) and h.source[1] == ap
    assert ipaddress.ip_address(h.destination[0]) == ipaddress.ip_address(norm(b)) and h.destination[1] == bp


# --- the service socket helper ---

CLIENT, SERVICE, OUTSIDE = ("198.51.100.7", 40000), ("127.0.0.1", 7000), ("203.0.113.10", 9999)


def test_proxy_v2_puts_the_header_before_every_datagram_of_a_client():
    f = ProxyFraming(EVERY, CLIENT, SERVICE, reached=OUTSIDE)
    h = proxy.encode(CLIENT, OUTSIDE)
    assert [b"".join(f.frame(d)) for d in (b"a", b"bb", b"c")] == [h + b"a", h + b"bb", h + b"c"]


def test_proxy_v2_first_puts_it_before_the_first_datagram_only():
    f = ProxyFraming(FIRST, CLIENT, SERVICE)
    h = proxy.encode(CLIENT, SERVICE)
    assert [b"".join(f.frame(d)) for d in (b"a", b"bb", b"c")] == [h + b"a", b"bb", b"c"]


def test_when_the_client_moves_proxy_v2_keeps_the_socket_and_sends_the_new_address():
    f = ProxyFraming(EVERY, CLIENT, SERVICE)
    f.frame(b"a")
    assert f.moved(("198.51.100.8", 41000)) is False
    assert b"".join(f.frame(b"b")) == proxy.encode(("198.51.100.8", 41000), SERVICE) + b"b"


def test_when_the_client_moves_proxy_v2_first_asks_for_a_new_socket_whose_first_datagram_has_the_header():
    f = ProxyFraming(FIRST, CLIENT, SERVICE)
    f.frame(b"a")
    f.frame(b"b")
    assert f.moved(("198.51.100.8", 41000)) is True
    assert [b"".join(f.frame(d)) for d in (b"c", b"d")] == [proxy.encode(("198.51.100.8", 41000), SERVICE) + b"c",
                                                            b"d"]


# --- which address of the front a client's datagrams go to ---

def _front_on_both_loopbacks() -> tuple[int, list[socket.socket]]:
    """A PROXY v2 front (as go-mmproxy on [::] is) on 127.0.0.1:P and [::1]:P."""
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4.bind(("127.0.0.1", 0))
    port = s4.getsockname()[1]
    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s6.bind(("::1", port))
    for s in (s4, s6):
        s.settimeout(2.0)
    return port, [s4, s6]


@pytest.mark.parametrize("mode", [EVERY, FIRST])
def test_a_proxy_v2_front_on_both_loopbacks_gets_each_client_over_the_clients_own_family(mode):
    """go-mmproxy dials the service in the family of the datagrams' sender and binds that socket to
    the header's source: an IPv6 client sent to it over IPv4 fails ("no suitable address found"),
    so with -s 127.0.0.1:P an IPv6 client goes to [::1]:P when the front listens there too (found
    in tests/lab/test_clientaddr_agents.py), and the other way round."""
    port, (s4, s6) = _front_on_both_loopbacks()
    try:
        t = ServiceTarget("default", socket.AF_INET, "127.0.0.1", port, mode=mode)
        assert t.start() == []
        c6, c4 = ("2001:db8:8::2", 40000, 0, 0), ("::ffff:203.0.113.18", 40001, 0, 0)
        conn6, conn4 = t.open(0, c6, None), t.open(0, c4, None)
        assert conn6.sock.family == socket.AF_INET6 and conn6.sock.getpeername()[:2] == ("::1", port)
        assert conn4.sock.family == socket.AF_INET and conn4.sock.getpeername() == ("127.0.0.1", port)
        conn6.sock.sendmsg(conn6.framing.frame(b"six"))
        conn4.sock.sendmsg(conn4.framing.frame(b"four"))
        assert s6.recv(100) == proxy.encode(c6[:2], ("::1", port)) + b"six"
        assert s4.recv(100) == proxy.encode(("203.0.113.18", 40001), ("127.0.0.1", port)) + b"four"
        # an IPv4 client that roams to IPv6 (a phone off Wi-Fi) goes on through [::1]
        new = t.move(conn4, c4, ("2001:db8:8::3", 40002, 0, 0), 0.0)
        assert new is not None and new.family == socket.AF_INET6 and new.getpeername()[:2] == ("::1", port)
        for c in (conn6, conn4):
            c.sock.close()
        new.close()
    finally:
        s4.close()
        s6.close()


def test_a_proxy_v2_front_on_one_loopback_gets_every_client_there():
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s4.bind(("127.0.0.1", 0))
    port = s4.getsockname()[1]
    try:
        t = ServiceTarget("default", socket.AF_INET, "127.0.0.1", port, mode=EVERY)
        t.start()
        conn = t.open(0, ("2001:db8:8::2", 40000, 0, 0), None)
        assert conn.sock.family == socket.AF_INET and conn.sock.getpeername() == ("127.0.0.1", port)
        assert t.move(conn, ("2001:db8:8::2", 40000, 0, 0), ("2001:db8:8::3", 40000, 0, 0), 0.0) is None
        conn.sock.close()
    finally:
        s4.close()
