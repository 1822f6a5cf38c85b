"""The one rule for which datagrams of a known flow the core must see (core/classify.py), for
every length, prefix, role and mode; and that both cores and the simulator ask it."""

from __future__ import annotations

import pytest

from udp_tunnel.core.classify import Kind, inside_rule, outside_rule
from udp_tunnel.core.wireguard import INITIATION_LEN, RESPONSE_LEN
from udp_tunnel.wire import proto

CTRL = proto.MAGIC + bytes(proto.CTRL_LEN - 4)  # a control message's length and magic
CTRL_NO_MAGIC = b"DATA" + bytes(proto.CTRL_LEN - 4)  # its length, other first bytes: data
LEGACY = bytes(proto.LEGACY_LEN)
INIT = bytes([1, 0, 0, 0]) + bytes(INITIATION_LEN - 4)
RESP = bytes([2, 0, 0, 0]) + bytes(RESPONSE_LEN - 4)

DATAGRAMS = {
    "control": CTRL, "control length, other prefix": CTRL_NO_MAGIC, "one byte short": CTRL[:-1],
    "one byte more": CTRL + b"x", "legacy keepalive length": LEGACY, "WireGuard initiation length": INIT,
    "WireGuard response length": RESP, "empty": b"", "small": b"hi", "large": bytes(1400),
}

# (role, legacy, wireguard) -> the datagrams that are not DATA, and their kind
EXPECTED = {
    ("outside", False, False): {"control": Kind.CONTROL},
    ("outside", True, False): {"legacy keepalive length": Kind.CONTROL},
    ("outside", False, True): {"control": Kind.CONTROL, "WireGuard initiation length": Kind.HANDSHAKE,
                               "WireGuard response length": Kind.HANDSHAKE},
    ("outside", True, True): {"legacy keepalive length": Kind.CONTROL, "WireGuard initiation length": Kind.HANDSHAKE,
                              "WireGuard response length": Kind.HANDSHAKE},
    ("inside", False, False): {"control": Kind.CONTROL},
    ("inside", True, False): {},
}


# the lengths a fast path compares before anything else
LENGTHS = {
    ("outside", False, False): {proto.CTRL_LEN}, ("outside", True, False): {proto.LEGACY_LEN},
    ("outside", False, True): {proto.CTRL_LEN, INITIATION_LEN, RESPONSE_LEN},
    ("outside", True, True): {proto.LEGACY_LEN, INITIATION_LEN, RESPONSE_LEN},
    ("inside", False, False): {proto.CTRL_LEN}, ("inside", True, False): set(),
}


def rule(role: str, legacy: bool, wireguard: bool):
    return outside_rule(legacy, wireguard) if role == "outside" else inside_rule(legacy)


@pytest.mark.parametrize("mode", list(EXPECTED), ids=lambda m: f"{m[0]}-{'legacy' if m[1] else 'v3'}"
                         + ("-wireguard" if m[2] else ""))
@pytest.mark.parametrize("name", list(DATAGRAMS))
def test_each_datagram_of_a_known_flow_is_data_or_the_cores_by_length_and_prefix(mode, name):
    r = rule(*mode)
    data = DATAGRAMS[name]
    want = EXPECTED[mode].get(name, Kind.DATA)
    assert r.kind(data) is want
    assert r.kind(memoryview(data)) is want  # the fast paths ask with a view of their buffer
    assert r.core_sees(data) == (want is not Kind.DATA)
    assert (len(data) in r.lengths) == (len(data) in LENGTHS[mode])  # the fast paths' first, cheap test


@pytest.mark.parametrize("mode", list(EXPECTED), ids=str)
def test_a_coalesced_run_is_looked_at_datagram_by_datagram_when_a_segment_may_be_the_cores(mode):
    r = rule(*mode)
    specials = sorted(r.lengths)
    for seg in (64, 1400):
        assert not r.run_may_hold(seg * 10, seg)  # all data
    for n in specials:
        assert r.run_may_hold(n * 5, n)  # segments of a special length
        assert r.run_may_hold(1000 + n, 1000)  # the last, shorter segment is one


def test_both_cores_and_the_simulator_ask_the_same_rule():
    from sim import Sim
    from test_wireguard import wg_sim
    for sim, legacy, wg in ((Sim(), False, False), (Sim(legacy=True), True, False), (wg_sim(), False, True)):
        assert sim.outside.rule.lengths == outside_rule(legacy, wg).lengths
        assert sim.inside.rule.lengths == inside_rule(legacy).lengths
        assert sim.outside.rules == [sim.outside.rule]
