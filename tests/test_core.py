"""Unit tests of the sans-I/O cores, joined by a simulated network and a fake clock."""

from __future__ import annotations

import hashlib
import struct

import pytest

from sim import Sim, v6
from udp_tunnel.core.inside import ACTIVE, SPARE
from udp_tunnel.core.keys import GRACE
from udp_tunnel.wire import proto

CLIENT_A = v6("198.51.100.10", 5000)
CLIENT_B = v6("198.51.100.11", 5001)
ATTACKER = v6("192.0.2.66", 6666)


def keepalives(sim: Sim, direction: str = "up") -> list[tuple[bytes, tuple]]:
    return [(d, a) for d, a, w in sim.wire if w == direction and len(d) in (proto.CTRL_LEN, proto.LEGACY_LEN)]


def test_spares_register_through_a_challenge_before_any_client_arrives():
    sim = Sim(spares=2)
    assert sim.registered_spares() == 3  # --spares, and one to learn the NAT's timeout with
    assert all(t.registered and t.rtt is not None for t in sim.inside.tunnels.values())
    # each spare: keepalive without cookie -> challenge -> keepalive with cookie -> registered
    assert sim.outside.stats["challenges"] == 3
    assert sim.outside.stats["registrations"] == 3


def test_first_client_datagram_goes_through_at_once_and_a_new_spare_opens():
    sim = Sim(spares=2)
    sim.send(b"hello", CLIENT_A)
    assert [d for _, d in sim.service_rx] == [b"hello"]
    tid = sim.service_rx[0][0]
    assert sim.inside.tunnels[tid].state == ACTIVE
    # one more spare than before while clients keep arriving (the pool follows demand)
    assert sum(t.state == SPARE for t in sim.inside.tunnels.values()) == 4
    assert sim.registered_spares() == 4
    # the inside learned its client's address from the outside's answer
    assert proto.unpack_peer(sim.inside.tunnels[tid].peer, 10) == CLIENT_A


def test_letting_a_client_go_tells_the_inside_once_and_sets_no_timer_in_the_past():
    sim = Sim(spares=2)
    o = sim.outside
    sim.send(b"hello", CLIENT_A)
    tid = sim.service_rx[0][0]
    sim.advance(1)  # the inside confirmed its client: no ANNOUNCE is due any more
    announces = o.stats["announces"]
    o.remove_service("default", sim.now)  # GONE, down the tunnel at once
    assert o.stats["announces"] == announces + 1 and tid not in o.tunnels
    assert o.next_timer() > sim.now  # nothing left to announce again: the loop is not woken for it


def test_replies_reach_only_their_own_client():
    sim = Sim()
    sim.send(b"a1", CLIENT_A)
    sim.send(b"b1", CLIENT_B)
    ta, tb = (tid for tid, _ in sim.service_rx)
    assert ta != tb
    sim.reply(ta, b"to-a")
    sim.reply(tb, b"to-b")
    assert sim.received[CLIENT_A] == [b"to-a"]
    assert sim.received[CLIENT_B] == [b"to-b"]
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1] == (ta, b"a2")


def test_keepalive_every_interval_on_each_tunnel_once_the_nat_is_known_to_allow_it():
    sim = Sim(keepalive=25, spares=1)  # the simulated NAT never forgets a mapping
    sim.advance(300)  # probes: mappings survive 20 s, then 31.25 s idle: -t is safe
    assert sim.inside.learner.done() and sim.inside.interval() == 25
    start = len(keepalives(sim))
    sim.advance(250)
    per_tunnel = {}
    for _, a in keepalives(sim)[start:]:
        per_tunnel[a] = per_tunnel.get(a, 0) + 1
    assert list(per_tunnel.values()) == [10]


def test_idle_tunnel_closes_on_both_sides():
    sim = Sim(keepalive=5, timeout=30)
    sim.send(b"x", CLIENT_A)
    tid = sim.service_rx[0][0]
    sim.advance(29)
    assert tid in sim.inside.tunnels and CLIENT_A in sim.outside.clients
    sim.advance(3)
    assert tid not in sim.inside.tunnels
    assert CLIENT_A not in sim.outside.clients  # told by the closing keepalive, no wait
    assert tid not in sim.outside.tunnels


def test_outside_expires_tunnels_whose_keepalives_stop():
    sim = Sim(keepalive=10)
    sim.send(b"x", CLIENT_A)
    sim.up = False
    sim.advance(24)
    assert len(sim.outside.tunnels) == 5  # 1 active, 4 spares (the pool follows demand)
    sim.advance(2)  # 2 * keepalive + 5 s after the last keepalive
    assert sim.outside.tunnels == {} and len(sim.outside.routes) == 0


def test_forged_keepalive_is_dropped_without_answer_or_state():
    sim = Sim()
    forged = proto.Codec(b"wrong key").encode(proto.Control(proto.KEEPALIVE, 0, 1, 2, 3))
    before = (dict(sim.outside.tunnels), list(sim.outside.routes.items()))
    sim.send(forged, ATTACKER)
    assert sim.outside.stats["drop_auth"] == 1
    assert ATTACKER not in sim.received
    assert (dict(sim.outside.tunnels), list(sim.outside.routes.items())) == before


@pytest.mark.parametrize("data", [b"UDPT", b"UDPT" + bytes(proto.CTRL_LEN - 5), bytes(proto.CTRL_LEN),
                                  b"UDPT" + bytes(proto.CTRL_LEN - 3)])
def test_truncated_or_garbage_control_never_becomes_a_tunnel(data):
    """Not control-shaped: plain data of a new client, forwarded as such, never a registration."""
    sim = Sim()
    sim.send(data, ATTACKER)
    assert ATTACKER not in sim.outside.by_addr
    assert sim.service_rx == [(sim.outside.clients[ATTACKER].tid, data)]


def test_control_shaped_garbage_is_dropped_and_counted():
    sim = Sim()
    sim.send(b"UDPT" + bytes(proto.CTRL_LEN - 4), ATTACKER)
    assert sim.outside.stats["drop_auth"] == 1
    assert ATTACKER not in sim.outside.by_addr and ATTACKER not in sim.outside.clients
    assert sim.service_rx == []


@pytest.mark.parametrize("restart", [False, True])
def test_replayed_keepalives_from_another_address_never_get_client_data(restart):
    sim = Sim()
    sim.send(b"a", CLIENT_A)
    sim.advance(60)
    captured = [d for d, _ in keepalives(sim)]
    if restart:
        sim.restart_outside()
    for d in captured:
        sim.send(d, ATTACKER)
    assert ATTACKER not in sim.outside.by_addr
    for i in range(20):  # new clients arrive: none may be sent to the attacker
        sim.send(b"secret %d" % i, v6("198.51.100.50", 7000 + i))
    assert all(len(d) == proto.CTRL_LEN for d in sim.received.get(ATTACKER, []))  # challenges only
    assert sim.outside.stats["challenges"] >= len(captured) - sim.outside.stats["drop_rate"] - 4


def test_replay_from_the_genuine_address_is_refused_by_the_counter():
    sim = Sim()
    (d, addr), = [(d, a) for d, a in keepalives(sim) if proto.Codec(b"secret").decode(d).cookie != bytes(16)][:1]
    sim.send(d, addr)
    assert sim.outside.stats["drop_replay"] == 1


def test_outside_restart_restores_active_tunnels_to_their_clients():
    sim = Sim(keepalive=5)
    sim.send(b"a1", CLIENT_A)
    sim.send(b"b1", CLIENT_B)
    ta, tb = (tid for tid, _ in sim.service_rx)
    sim.restart_outside()
    sim.send(b"lost", CLIENT_A)  # before re-registration: no spare known, dropped
    sim.advance(6)  # one keepalive round: challenge, answer, registered with the client address
    assert sim.inside.stats["outside_restarts"] == 1
    sim.send(b"a2", CLIENT_A)
    sim.send(b"b2", CLIENT_B)
    assert sim.service_rx[-2:] == [(ta, b"a2"), (tb, b"b2")]
    # a new client gets a fresh spare, never an active tunnel
    sim.send(b"c1", v6("198.51.100.12", 5002))
    assert sim.service_rx[-1][0] not in (ta, tb)


def test_active_tunnel_is_never_handed_out_as_a_spare_when_its_client_is_unknown():
    sim = Sim(keepalive=5)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[0][0]
    sim.inside.tunnels[ta].peer = proto.NO_PEER  # as if the answer with the client address was lost
    sim.restart_outside()
    sim.advance(6)
    assert ta in sim.outside.tunnels and ta not in sim.outside.spares
    sim.send(b"new", CLIENT_B)
    assert sim.service_rx[-1][0] != ta


def test_nat_rebinding_keeps_the_conversation():
    sim = Sim(keepalive=5)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[0][0]
    old = sim.rebind(ta)
    sim.advance(6)
    new = sim.public[ta]
    assert new != old and sim.outside.tunnels[ta].addr == new
    assert sim.outside.stats["rebinds"] == 1
    sim.send(b"a2", CLIENT_A)
    sim.reply(ta, b"back")
    assert sim.service_rx[-1] == (ta, b"a2")
    assert sim.received[CLIENT_A][-1] == b"back"


def test_inside_detects_outside_outage_within_two_intervals_and_resolves_again():
    sim = Sim(keepalive=10)
    sim.up = False
    sim.advance(21.5)
    assert not any(t.registered for t in sim.inside.tunnels.values())
    sim.advance(1)
    assert sim.inside.snapshot(sim.now)["outside_answering"] is False
    assert sim.resolves == 1
    sim.up = True
    sim.advance(11)
    assert all(t.registered for t in sim.inside.tunnels.values())


def test_replayed_reply_is_refused_by_the_inside():
    sim = Sim()
    tid, t = next(iter(sim.inside.tunnels.items()))
    old = [d for d, a, w in sim.wire if w == "down" and a == sim.public[tid]][-1]
    sim.inside.receive(tid, old, sim.now)
    assert sim.inside.stats["drop_replay"] == 1


def test_client_limit_holds_against_a_flood_of_source_ports():
    sim = Sim(max_clients=10, spares=2)
    for port in range(20000, 25000):
        sim.send(b"flood", v6("192.0.2.99", port))
    assert len(sim.outside.clients) == 10 and len(sim.outside.routes) == 2 * 10
    assert sim.inside.active == 10 and len(sim.inside.tunnels) == 11  # the last spare waits for the tick...
    sim.advance(2)
    assert sim.inside.ready_spares() == 0  # ...that closes it: no spare past the limit
    assert sim.outside.stats["drop_limit"] == 5000 - 10
    sim.send(b"still", v6("192.0.2.99", 20000))  # an existing client goes on
    assert sim.service_rx[-1][1] == b"still"


def test_hours_of_clock_difference_do_not_matter():
    sim = Sim(keepalive=5)
    sim.outside.wall = lambda: sim.now + sim.wall_offset + 5 * 3600
    sim.advance(30)
    sim.send(b"x", CLIENT_A)
    assert sim.service_rx[-1][1] == b"x"


def test_wrong_key_on_the_inside_never_registers():
    sim = Sim(inside_key=b"other")
    assert sim.registered_spares() == 0
    assert sim.outside.stats["drop_auth"] == 3  # the first keepalive of each of the 3 spares
    sim.send(b"x", CLIENT_A)
    assert sim.service_rx == [] and CLIENT_A in sim.outside.admission.pending  # held for a spare...
    sim.advance(4)
    assert sim.service_rx == [] and sim.outside.stats["drop_hold_expired"] == 1  # ...that never came


def test_reply_with_a_client_on_a_spare_activates_it():
    """The outside bound a spare to a client but the client's datagram got lost."""
    sim = Sim(keepalive=5)
    sim.up = False
    sim.outside.receive(b"lost", CLIENT_A, sim.now)
    sim.outside.take()
    sim.up = True
    sim.advance(6)
    assert sum(t.state == ACTIVE for t in sim.inside.tunnels.values()) == 1
    sim.send(b"next", CLIENT_A)
    assert sim.service_rx[-1][1] == b"next"


# --- legacy mode ---

def legacy_ka(password: bytes, nonce: int) -> bytes:
    n = struct.pack("<Q", nonce)
    return n + hashlib.sha256(password + n).digest()


def test_legacy_inside_sends_the_c_tools_bytes():
    sim = Sim(legacy=True, spares=1)
    (d, _), = keepalives(sim)
    nonce = struct.unpack("<Q", d[:8])[0]
    assert d == legacy_ka(b"secret", nonce)
    assert abs(nonce - (sim.now + sim.wall_offset) * 1000) < 2
    sim.advance(50)
    nonces = [struct.unpack("<Q", d[:8])[0] for d, _ in keepalives(sim)]
    assert nonces == sorted(set(nonces)) and len(nonces) == 3


def test_legacy_outside_takes_c_keepalives_and_refuses_replays_and_old_captures():
    sim = Sim(legacy=True)
    wall_ms = int((sim.now + sim.wall_offset) * 1000)
    o = sim.restart_outside() or sim.outside
    ka = legacy_ka(b"secret", wall_ms + 10)
    o.receive(ka, v6("203.0.113.9", 1), sim.now)
    assert v6("203.0.113.9", 1) in o.by_addr
    o.receive(ka, ATTACKER, sim.now)  # replay: nonce not above the last one
    assert ATTACKER not in o.by_addr and o.stats["drop_replay"] == 1
    fresh = sim.new_outside()  # after a restart the counter is 0, but the clock check holds
    fresh.receive(legacy_ka(b"secret", wall_ms - 3_600_000), ATTACKER, sim.now)
    assert ATTACKER not in fresh.by_addr and fresh.stats["drop_clock"] == 1
    fresh.receive(legacy_ka(b"wrong", wall_ms + 20), ATTACKER, sim.now)  # not verified: data from a new client
    assert ATTACKER not in fresh.by_addr and ATTACKER in fresh.admission.pending


def test_legacy_end_to_end_through_both_cores():
    sim = Sim(legacy=True, keepalive=5)
    sim.send(b"a1", CLIENT_A)
    assert sim.service_rx == []  # held: the spare's keepalive came in this very millisecond
    sim.advance(0.002)
    ta = sim.service_rx[0][0]
    sim.reply(ta, b"r1")
    assert sim.received[CLIENT_A] == [b"r1"]
    sim.advance(60)
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1] == (ta, b"a2")


def test_after_outside_restart_an_old_client_gets_its_own_tunnel_even_if_a_spare_returns_first():
    sim = Sim(keepalive=25)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[0][0]
    sim.restart_outside()
    spare = next(t for t in sim.inside.tunnels.values() if t.state == SPARE)
    sim.inside._send_keepalive(spare, sim.now)  # this spare's keepalive happens to come first
    sim.pump()
    # the spare's answer showed a new outside session: the inside re-announced every tunnel at once
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1] == (ta, b"a2")


def test_restarted_outside_holds_new_clients_until_announced_active_tunnels_are_back():
    sim = Sim(keepalive=25)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[-1][0]
    sim.restart_outside()
    o = sim.outside
    sim.lose_up = {ta}  # the active tunnel's keepalives are lost for now
    spare = next(t for t in sim.inside.tunnels.values() if t.state == SPARE)
    sim.inside._send_keepalive(spare, sim.now)  # the spares come back: "1 active tunnel here"
    sim.pump()
    assert o.spares and o.recovering
    sim.send(b"new", CLIENT_B)
    assert CLIENT_B in o.admission.pending and CLIENT_B not in o.clients  # held, not given a spare yet
    sim.lose_up = set()
    sim.advance(26)  # the active tunnel is back: the held datagram goes on, to a fresh spare
    assert CLIENT_B in o.clients and sim.service_rx[-1][1] == b"new" and sim.service_rx[-1][0] != ta
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1] == (ta, b"a2")


def test_rebound_tunnel_whose_data_came_first_gets_its_conversation_back_and_the_stray_tunnel_closes():
    """After a NAT rebinding the service's answer can reach the outside before the
    keepalive: it looks like a new client and takes a spare. The keepalive then
    claims the address back, and the stray tunnel is refused and closed."""
    sim = Sim(keepalive=5)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[0][0]
    sim.rebind(ta)
    sim.reply(ta, b"answer")  # data first, from the new public address
    stray = sim.service_rx[-1][0]
    assert stray != ta and sim.service_rx[-1][1] == b"answer"
    sim.advance(11)  # within two keepalive intervals
    assert sim.outside.tunnels[ta].addr == sim.public[ta]
    assert stray not in sim.inside.tunnels and stray not in sim.outside.tunnels
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1] == (ta, b"a2")


def test_inside_sends_a_keepalive_at_once_when_the_service_talks_but_nothing_comes_back():
    sim = Sim(keepalive=25)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[0][0]
    sim.advance(1)
    sent = sim.inside.tunnels[ta].sent
    for _ in range(4):  # the service keeps answering, the client's datagrams are lost
        sim.inside.tunnels[ta].tx.pkts += 1
        sim.advance(1)
    assert sim.inside.stats["stall_keepalives"] == 1 and sim.inside.tunnels[ta].sent > sent


# --- the security review's findings (issue 12) ---

def test_a_closed_tunnels_keepalive_replayed_from_its_own_address_registers_nothing():
    sim = Sim(keepalive=5)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[-1][0]
    addr = sim.public[ta]
    last = [d for d, a, w in sim.wire if w == "up" and a == addr][-1]  # an ACTIVE keepalive
    sim.inside.close(ta, sim.now, "test")
    sim.pump()
    assert ta not in sim.outside.tunnels
    sim.advance(10)
    sim.send(last, addr)  # spoofed from the genuine address, well within the cookie's life
    assert ta not in sim.outside.tunnels and CLIENT_A not in sim.outside.clients
    assert sim.outside.stats["drop_closed_tunnel"] == 1


def test_a_ghost_tunnel_on_a_reused_nat_port_never_carries_another_clients_datagrams():
    sim = Sim(keepalive=5)
    sim.send(b"z1", CLIENT_A)  # client Z
    tz = sim.service_rx[-1][0]
    sim.advance(6)  # a keepalive that names Z as the tunnel's client
    old = sim.public[tz]
    capture = [d for d, a, w in sim.wire if w == "up" and a == old][-1]
    sim.inside.close(tz, sim.now, "idle")
    sim.pump()
    sim.send(b"y1", CLIENT_B)  # client Y's tunnel: the NAT gives it Z's old public port
    ty = sim.service_rx[-1][0]
    sim.rebind(ty)
    sim.public[ty], sim.by_public[old] = old, ty
    sim.advance(6)  # Y's tunnel re-registers from there
    sim.send(capture, old)  # the ghost of Z's tunnel, bound to Z, from the same address
    sim.send(b"z2", CLIENT_A)
    assert (ty, b"z2") not in sim.service_rx
    sim.reply(ty, b"to-y")
    assert b"to-y" not in sim.received.get(CLIENT_A, [])


def test_the_key_is_stretched_with_a_memory_hard_kdf():
    mac, enc = proto.derive_keys(b"correct horse")
    k = hashlib.scrypt(b"correct horse", salt=proto.KDF_SALT, n=1 << 15, r=8, p=1, maxmem=64 << 20, dklen=64)
    assert (mac, enc) == (k[:32], k[32:]) and proto.KDF_N * proto.KDF_R * 128 >= 32 << 20  # 32 MiB a guess


def test_client_addresses_and_counts_do_not_travel_in_clear():
    sim = Sim(keepalive=5)
    sim.send(b"a1", CLIENT_A)
    sim.advance(12)
    assert len(sim.wire) > 10
    assert not any(proto.pack_peer(CLIENT_A) in d for d, _, _ in sim.wire)


def test_keys_rotated_70_s_apart_lose_no_client_datagram_and_end_all_under_the_new_key():
    sim = Sim(keepalive=25, key=b"old")
    sim.send(b"a0", CLIENT_A)
    ta = sim.service_rx[-1][0]
    sim.inside.reload_keys(b"new", sim.now)  # home reloaded first (the old key kept for a while)
    sent = 0
    for step in range(140):  # 70 s, a datagram every 0.5 s, then the VPS reloads
        if step == 70:
            sim.outside.reload_keys(b"new", sim.now)
        sim.send(b"a%d" % step, CLIENT_A)
        sent += 1
        sim.advance(0.5)
    assert [d for tid, d in sim.service_rx if tid == ta][-sent:] == [b"a%d" % i for i in range(140)]
    sim.advance(30)
    assert all(t.key == 0 for t in sim.outside.tunnels.values())  # every tunnel on the new key
    sim.advance(GRACE)  # the old key is forgotten
    sim.send(b"c1", CLIENT_B)
    assert sim.service_rx[-1][1] == b"c1"


@pytest.mark.parametrize("first", ["outside", "inside"])
def test_keys_rotated_either_end_first_serve_every_new_client(first):
    """The review (issue 17, finding 4): with the outside reloaded first its spares were dropped
    and the inside's old-key spares refused until the inside was reloaded too: 0 of 14 new
    clients served. During the grace the old key keeps spares usable too."""
    sim = Sim(keepalive=25, key=b"old")
    agents = [sim.outside, sim.inside] if first == "outside" else [sim.inside, sim.outside]
    agents[0].reload_keys(b"new", sim.now)
    sim.pump()
    for i in range(14):  # new clients while only one end has the new key (within the grace)
        sim.send(b"c%d" % i, v6("198.51.100.90", 7000 + i))
        sim.advance(10)
    assert [d for _, d in sim.service_rx] == [b"c%d" % i for i in range(14)]
    agents[1].reload_keys(b"new", sim.now)
    sim.advance(30)
    assert all(t.key == 0 for t in sim.outside.tunnels.values())  # every tunnel on the new key
    sim.advance(GRACE)  # the old key is forgotten at both ends
    sim.send(b"late", v6("198.51.100.91", 7000))
    assert sim.service_rx[-1][1] == b"late"


def test_a_client_of_an_inside_left_on_the_forgotten_key_can_still_be_let_go():
    """The outside reloaded, the inside not: its tunnel's keepalives are made with the old key
    until the grace ends. Letting its client go right after used to raise IndexError (the
    tunnel still named the forgotten key by its old index) in the middle of the removal."""
    sim = Sim(keepalive=25, timeout=10_000, key=b"old")
    sim.send(b"a0", CLIENT_A)
    ta = sim.service_rx[-1][0]
    sim.outside.reload_keys(b"new", sim.now)
    sim.advance(GRACE + 1)  # the old key is forgotten at the outside; the tunnel has not expired yet
    assert ta in sim.outside.tunnels and len(sim.outside.keys) == 1
    sim.outside.remove_service("default", sim.now)
    assert ta not in sim.outside.tunnels
    sim.outside.check_invariants()


def test_the_restart_hold_survives_a_datagram_that_arrives_before_the_first_keepalive():
    sim = Sim(keepalive=25)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[-1][0]
    sim.restart_outside()
    sim.send(b"a2", CLIENT_A)  # before any keepalive reached the new outside agent
    sim.advance(26)
    sim.send(b"a3", CLIENT_A)
    assert [d for tid, d in sim.service_rx if tid == ta] == [b"a1", b"a2", b"a3"]


def test_spoofed_data_on_a_spare_never_reaches_the_service_and_the_spare_stays_ready():
    """Data on a spare whose client the outside did not announce (spoofed from the outside's
    address) waits a moment for an ANNOUNCE that never comes, and is dropped."""
    sim = Sim(keepalive=25, spares=2)
    spare = next(tid for tid, t in sim.inside.tunnels.items() if t.state == SPARE)
    sim.deliver_to_inside(spare, b"spoofed")
    sim.pump()
    assert sim.service_rx == [] and sim.inside.tunnels[spare].state == SPARE
    sim.advance(4)
    assert sim.inside.stats["drop_unannounced"] == 1 and sim.service_rx == []
    assert sim.inside.tunnels[spare].state == SPARE and spare in sim.outside.spares
    sim.send(b"real", CLIENT_A)
    assert sim.service_rx == [(sim.outside.clients[CLIENT_A].tid, b"real")]


def test_a_restarted_outside_that_remembers_its_tunnels_has_them_back_at_once():
    sim = Sim(keepalive=25)
    sim.send(b"a1", CLIENT_A)
    ta = sim.service_rx[-1][0]
    sim.advance(1)
    sim.restart_outside(remember=True)  # HELLOs to every tunnel: they register again now
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1] == (ta, b"a2")
    assert sim.inside.stats["hellos"] == 1


def test_a_replayed_hello_grants_nothing_and_costs_one_keepalive_per_tunnel():
    sim = Sim(keepalive=25)
    sim.send(b"a1", CLIENT_A)
    sim.advance(1)
    sim.restart_outside(remember=True)
    hello = next(d for d, a, w in sim.wire if w == "down" and proto.is_control(d)
                 and proto.Codec(b"secret").decode(d).flags & proto.F_HELLO)
    tid = proto.Codec(b"secret").decode(hello).tunnel
    sim.advance(2)
    before = len([1 for _, _, w in sim.wire if w == "up"])
    sim.deliver_to_inside(tid, hello)  # replayed (spoofed from the outside's address)
    sim.pump()
    after = len([1 for _, _, w in sim.wire if w == "up"])
    assert after - before == 0  # from the outside session it already knows: believed for nothing
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1][1] == b"a2"


# --- keepalives that fit the path (issue 10) ---

@pytest.mark.parametrize("nat_timeout,upper", [(15, 25), (30, 25), (60, 25), (180, 25), (60, 120), (180, 120)])
def test_the_keepalive_interval_learns_the_nat_timeout_and_stays_under_it(nat_timeout, upper):
    sim = Sim(keepalive=upper, nat_timeout=nat_timeout, timeout=10_000)
    sim.send(b"a1", CLIENT_A)  # a client, idle from now on (and never closed for it)
    ta = sim.service_rx[-1][0]
    sim.advance(1800, step=0.5)
    learned = sim.inside.learner
    assert learned.done(), learned.snapshot()
    assert sim.inside.interval() < nat_timeout
    if upper < 0.8 * nat_timeout:
        assert sim.inside.interval() == upper  # a lenient NAT: no more keepalives than -t
    else:
        assert sim.inside.interval() >= 0.6 * nat_timeout  # not far under either
    changed = sim.inside.stats["mappings_changed"]
    sim.advance(1800, step=0.5)  # settled: no mapping lapses any more, the idle client still works
    assert sim.inside.stats["mappings_changed"] == changed
    sim.send(b"a2", CLIENT_A)
    assert sim.service_rx[-1] == (ta, b"a2")


def test_a_spare_that_missed_its_keepalive_is_not_handed_out_until_it_registers_again():
    sim = Sim(keepalive=25, spares=1)
    sim.inside.learner.survived = 31.25  # as if learned: -t is safe, no probes
    sim.advance(30)
    assert len(sim.outside.spares) == 1 and not next(iter(sim.outside.spares.values())).probe
    sim.lose_up = set(sim.inside.tunnels)  # its keepalives are lost (its mapping may be gone)
    sim.advance(40)
    assert sim.outside.spares  # still registered at the outside...
    sim.send(b"new", CLIENT_A)
    assert CLIENT_A in sim.outside.admission.pending and sim.service_rx == []  # ...but not handed out
    sim.lose_up = set()
    sim.advance(30)  # its next keepalive gets through: fresh again
    sim.send(b"again", CLIENT_A)
    assert sim.service_rx[-1][1] == b"again"


@pytest.mark.parametrize("limit", [2, 3, 10])
def test_at_exactly_max_clients_every_client_is_served_while_a_spare_idles_to_learn_the_nat(limit):
    """The spare that idles on purpose (the NAT-timeout probe) is never handed out, so it must
    not count as the one spare left at the limit: the last client would never be answered."""
    sim = Sim(max_clients=limit, spares=2)
    sim.advance(3)
    assert sim.inside.probe is not None  # learning: one spare idles on purpose
    clients = [v6("198.51.100.20", 7000 + i) for i in range(limit)]
    for i, c in enumerate(clients):
        sim.send(b"hello %d" % i, c)
        sim.advance(0.3)
    assert [d for _, d in sim.service_rx] == [b"hello %d" % i for i in range(limit)]
    assert len({tid for tid, _ in sim.service_rx}) == limit == len(sim.outside.clients)
    sim.send(b"one too many", v6("198.51.100.21", 7000))
    sim.advance(4)
    assert b"one too many" not in [d for _, d in sim.service_rx]
