"""Who takes a tunnel at the outside agent under attack (issue 17, items 3, 5 and 6), on the
sans-I/O cores joined by the simulated network (tests/sim.py) with a fake clock.

- per-source limits count prefixes too: an IPv6 /64, /56 and /48, an IPv4 address and /24;
- a spray of one-shot flows from many addresses does not keep new clients that keep talking
  out, and established clients never lose their tunnel;
- a roaming WireGuard client moves only within its new source's limits.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sim import Sim, v6
from test_random import CLIENTS, KEEPALIVE, SETTINGS, STEP, Run
from test_wireguard import handshake, transport, wg_sim
from udp_tunnel.core import admission
from udp_tunnel.core.outside import Service

CLIENT = v6("198.51.100.10", 5000)


def in_prefix(sim: Sim, prefix: str) -> int:
    return sum(1 for c in sim.outside.clients if c[0].startswith(prefix))


# --- item 3: one host with a prefix is not hundreds of sources ---

SPRAYS = {
    # name: (hosts of the spray, the prefix they share as text, its limit at --max-clients 100)
    "16 /64s of one IPv6 /56": ([f"2001:db8:0:ab{i:02x}::1" for i in range(16)], "2001:db8:0:ab", 50),
    "16 /64s of one IPv6 /48": ([f"2001:db8:0:{i:x}00::1" for i in range(16)], "2001:db8:0:", 75),
    "16 addresses of one IPv4 /24": ([f"::ffff:192.0.2.{i + 1}" for i in range(16)], "::ffff:192.0.2.", 50),
}


@pytest.mark.parametrize("name", list(SPRAYS))
def test_a_prefix_of_many_sources_holds_a_bounded_share_and_a_real_client_still_gets_a_tunnel(name):
    """--max-clients 100: a source (a /64, an IPv4 address) holds 25, a /56 or an IPv4 /24 twice
    that, a /48 three times: never the whole table."""
    hosts, prefix, limit = SPRAYS[name]
    sim = Sim(max_clients=100)
    for port in range(10):
        for h in hosts:
            sim.send(b"spray", (h, 20000 + port, 0, 0))
    assert in_prefix(sim, prefix) == limit
    assert all(sum(1 for c in sim.outside.clients if c[0] == h) <= 25 for h in hosts)
    sim.send(b"real", CLIENT)
    assert sim.service_rx[-1] == (sim.outside.clients[CLIENT].tid, b"real")


def test_a_per_source_limit_lowered_by_a_reload_holds_for_a_source_already_known():
    """--max-clients 100: a source holds 25, until a reload says 2. A source that already had a
    record (its client holds a tunnel) kept the old limit while its record lived."""
    sim = Sim(max_clients=100)
    o = sim.outside
    host = "2001:db8:7::1"
    sim.send(b"first", (host, 20000, 0, 0))
    svc = o.services["default"]
    o.update_service(Service(svc.name, svc.key, svc.max_clients, 2, svc.wireguard))
    for port in range(1, 6):
        sim.send(b"more", (host, 20000 + port, 0, 0))
    assert sum(1 for c in o.clients if c[0] == host) == 2
    o.check_invariants()


def test_source_levels_name_each_prefix_of_an_address_with_its_factor():
    assert admission.source_levels(("2001:db8:1:2:3:4:5:6", 9, 0, 0)) == [
        (bytes.fromhex("20010db800010002"), 1), (bytes.fromhex("20010db8000100"), 2),
        (bytes.fromhex("20010db80001"), 3)]
    assert admission.source_levels(("::ffff:192.0.2.7", 9, 0, 0)) == [("192.0.2.7", 1), (bytes([192, 0, 2]), 2)]
    assert admission.source_levels(("192.0.2.7", 9)) == [("192.0.2.7", 1), (bytes([192, 0, 2]), 2)]
    assert admission.source_levels(("fe80::1%eth0", 9, 0, 2))[0] == (bytes.fromhex("fe80000000000000"), 1)


def test_a_48_of_many_64s_gets_three_sources_worth_of_challenges_and_the_inside_still_registers():
    """Registration challenges are budgeted per /64, /56 and /48 too: 1024 /64s of one /48 get
    the /48's 150/s, not the global 2000/s, and a new inside tunnel elsewhere is challenged."""
    sim = Sim(max_clients=100)
    adm = sim.outside.admission
    now = sim.now + 100.0  # every bucket full
    granted = sum(adm.may_challenge((f"2001:db8:77:{i:x}::1", 1, 0, 0), now) for i in range(1024))
    assert granted == int(sim.outside.max_tunnels)  # the /48's burst, the table's size
    granted = sum(adm.may_challenge((f"2001:db8:77:{i:x}::1", 1, 0, 0), now + 1.0) for i in range(1024))
    assert granted == 150  # 3 x 50/s in the next second
    assert adm.may_challenge(v6("203.0.113.7", 40000), now + 1.0)


def test_unanswered_tunnels_are_limited_per_prefix_too():
    """A /56 of 16 /64s, none of whose clients ever gets an answer, holds at most 2 x 32 such
    tunnels (a /64 alone 32)."""
    sim = Sim(max_clients=1000)
    for port in range(10):
        for i in range(16):
            sim.send(b"x", (f"2001:db8:0:ab{i:02x}::1", 20000 + port, 0, 0))
    assert in_prefix(sim, "2001:db8:0:ab") == 2 * admission.UNANSWERED_PER_SOURCE


# --- item 6: a roaming move obeys the limits of the source it moves to ---

@pytest.mark.parametrize("where", ["one IPv4 address", "40 /64s of one IPv6 /56"])
def test_someone_who_saw_the_session_indices_cannot_move_more_tunnels_than_a_source_may_hold(where):
    n = 20 if where == "one IPv4 address" else 40
    sim = wg_sim(max_clients=n)  # --max-clients-per-source: 16; a /56: 32
    clients = [v6(f"100.{64 + i}.0.1", 5000) for i in range(n)]
    for i, c in enumerate(clients):
        handshake(sim, c, server_index=i.to_bytes(4, "big"))
    sim.advance(2)  # every client idles
    for i in range(n):
        attacker = v6("192.0.2.66", 7000 + i) if n == 20 else (f"2001:db8:0:ab{i:02x}::1", 7000, 0, 0)
        sim.send(transport(i.to_bytes(4, "big")), attacker)
    moved = [c for c in sim.outside.clients if c not in clients]
    assert len(moved) == (16 if n == 20 else 32)
    assert sim.outside.stats["drop_wg_roam_limit"] == n - len(moved)
    assert sim.outside.stats["wg_roams"] == len(moved)
    kept = [c for c in clients if c in sim.outside.clients]
    assert len(kept) == n - len(moved)
    for c in kept:  # their tunnels stay theirs
        tid = sim.outside.clients[c].tid
        sim.reply(tid, b"still yours")
        assert sim.received[c][-1] == b"still yours"


# --- item 5: a spray of one-shot flows from many addresses ---

class Spray:
    """The shape of `make flood`'s many-address spray, scaled to --max-clients 100 (a tenth of
    the default, and a tenth of its 5000/s): junk from 200 addresses in 200 IPv4 /24s, every
    datagram (or pair, `per_port`) from a new source port; an echo service answering everything;
    established clients talking 10 times a second; new clients arriving twice a second that
    resend every 0.25 s until answered and then keep talking every 0.5 s."""

    STEP = 0.01

    def __init__(self, per_port: int = 1, rate: float = 500.0, keepalive: float = 2.0) -> None:
        self.sim = Sim(max_clients=100, keepalive=keepalive, spares=2)
        self.per_port, self.rate = per_port, rate
        self.echoed = 0  # service_rx entries answered so far
        self.ports = [20000] * 200
        self.junk_sent = 0
        self.established = [v6(f"198.51.100.{10 + i}", 5000) for i in range(3)]
        self.est_sent: dict[tuple, list[bytes]] = {c: [] for c in self.established}
        self.new: list[dict] = []  # new clients: addr, start, answered_at, next
        for c in self.established:
            self.say(c, b"hello")
        self.sim.advance(3)  # established: they talked and were answered before the flood

    def say(self, addr: tuple, data: bytes) -> None:
        if addr in self.est_sent:
            self.est_sent[addr].append(data)
        self.sim.send(data, addr)
        self.echo()

    def echo(self) -> None:
        sim = self.sim
        while self.echoed < len(sim.service_rx):
            tid, data = sim.service_rx[self.echoed]
            self.echoed += 1
            if tid in sim.service_socket:
                sim.reply(tid, data)

    def junk(self) -> None:
        k = self.junk_sent % 200
        self.ports[k] += 1
        for _ in range(self.per_port):
            self.sim.send(b"junk", v6(f"100.64.{k}.1", self.ports[k]))
        self.junk_sent += 1
        self.echo()

    def run(self, seconds: float, new_from: float = 0.0, new_until: float | None = None,
            new_per_second: float = 2.0) -> None:
        """`seconds` of spray; new clients arrive from `new_from` s to `new_until` s into it."""
        sim, t0 = self.sim, self.sim.now
        new_until = seconds if new_until is None else new_until
        step = 0
        while sim.now < t0 + seconds - 1e-9:
            step += 1
            due = int(step * self.STEP * self.rate / self.per_port)
            while self.junk_sent < due:
                self.junk()
            if step % 10 == 0:
                for i, c in enumerate(self.established):
                    self.say(c, b"est %d %d" % (i, step))
            arrivals = int(max(0.0, min(sim.now, t0 + new_until) - t0 - new_from) * new_per_second + 1e-9)
            if new_per_second and sim.now - t0 >= new_from and len(self.new) < arrivals:
                i = len(self.new)
                self.new.append({"addr": v6(f"203.0.113.{i + 1}", 6000), "start": sim.now, "at": None,
                                 "next": sim.now, "tries": 0})
            for n in self.new:
                self.client_step(n)
            sim.advance(self.STEP, step=self.STEP)

    def client_step(self, n: dict) -> None:
        sim = self.sim
        if n["at"] is None and any(d.startswith(b"new") for d in sim.received.get(n["addr"], [])):
            n["at"] = sim.now
        if sim.now >= n["next"]:
            n["tries"] += 1
            self.say(n["addr"], b"new %d" % n["tries"])
            n["next"] = sim.now + (0.25 if n["at"] is None else 0.5)

    def established_lost(self) -> int:
        lost = 0
        for c, sent in self.est_sent.items():
            got = set(self.sim.received.get(c, []))
            lost += sum(1 for d in sent if d not in got)
        return lost

    def figures(self) -> str:
        st = self.sim.outside.stats
        lat = sorted(n["at"] - n["start"] for n in self.new if n["at"] is not None)
        within = sum(1 for x in lat if x <= 1.0)
        sent = sum(len(s) for s in self.est_sent.values())
        return (f"junk {self.junk_sent} ports x {self.per_port}; new clients {within}/{len(self.new)} answered "
                f"within 1 s, {len(lat)} at all, median {lat[len(lat) // 2] if lat else None}, max "
                f"{lat[-1] if lat else None}; established lost {self.established_lost()} of {sent}; "
                f"evictions {st['evictions']}, drop_limit {st['drop_limit']}, hold_full {st['drop_hold_full']}, "
                f"hold_expired {st['drop_hold_expired']}; clients {len(self.sim.outside.clients)}")

    def within(self, limit: float = 1.0) -> int:
        return sum(1 for n in self.new if n["at"] is not None and n["at"] - n["start"] <= limit)


@pytest.mark.parametrize("per_port", [1, 2])
def test_a_spray_of_one_shot_flows_from_many_addresses_leaves_room_for_new_clients_that_keep_talking(per_port):
    """The spray fills the table (3 s), new clients arrive during the next 10 s of it, and the
    last of them have 2 s more (as `make flood` waits for them). Each datagram of the spray is
    answered (an echo), also the second of a pair sent from one port."""
    f = Spray(per_port=per_port)
    f.run(15.0, new_from=3.0, new_until=13.0)
    print(f.figures())
    assert len(f.new) == 20
    assert f.within(1.0) >= 18  # >= 90 % of the new clients answered within 1 s
    assert f.established_lost() == 0
    assert all(c in f.sim.outside.clients for c in f.established)
    assert f.sim.outside.stats["evictions"] > 0


def one_shot(sim: Sim, addr: tuple, data: bytes = b"once") -> int:
    """A client that sends one datagram, answered once by the service: its tunnel."""
    sim.send(data, addr)
    tid = sim.outside.clients[addr].tid
    sim.reply(tid, b"answer")
    return tid


def talk_twice(sim: Sim, addr: tuple, first: bytes = b"n1", again: bytes = b"n2") -> None:
    """A new client that sends again a quarter of a second later (a retransmission)."""
    sim.send(first, addr)
    sim.advance(0.25)
    sim.send(again, addr)


def test_only_one_shot_flows_are_evicted_those_due_soonest_first_and_the_inside_closes_them_at_once():
    """Keepalive every 5 s. One-shot flows bound at 0 s (next keepalive at 10 s) and at 3.5 s
    (at 8.5 s); a client sending without answers, one the service streams to, one that chats.
    At 6 s a new client that keeps talking finds the table full: one one-shot tunnel goes (no
    reserve below 16 clients), of 3.5 s, whose keepalive comes first."""
    sim = Sim(max_clients=10, keepalive=5)
    o = sim.outside
    early = [one_shot(sim, v6("192.0.2.1", 1000 + i)) for i in range(3)]
    sim.advance(0.5)
    one_way, stream, chat = v6("198.51.100.1", 1), v6("198.51.100.2", 2), v6("198.51.100.3", 3)
    sim.send(b"subscribe", stream)
    sim.send(b"hello", chat)
    late = []
    for step in range(22):  # 5.5 s: one client sends without answers, one service streams, one pair chats
        if step == 12:
            late = [one_shot(sim, v6("192.0.2.1", 2000 + i)) for i in range(4)]
        sim.send(b"log %d" % step, one_way)
        sim.reply(o.clients[stream].tid, b"frame %d" % step)
        if step % 4 == 0:
            sim.send(b"q%d" % step, chat)
            sim.reply(o.clients[chat].tid, b"a%d" % step)
        sim.advance(0.25)
    assert len(o.clients) == 10 and o.stats["evictions"] == 0
    assert sim.now < o.recover_until  # still in the restart hold of this outside
    newcomer = v6("203.0.113.50", 7000)
    talk_twice(sim, newcomer)
    assert o.stats["drop_limit"] == 1 and o.stats["evictions"] == 1
    assert [t for t in early + late if t not in o.tunnels] == late[:1]
    # the inside is told at once (an ANNOUNCE saying GONE): it closes the tunnel, a spare takes its place
    assert late[0] not in sim.inside.tunnels and o.stats["drop_stale_tunnel"] == 0
    assert {one_way, stream, chat} <= set(o.clients) and newcomer in o.clients
    tid = o.clients[newcomer].tid
    assert [d for t, d in sim.service_rx if t == tid] == [b"n2"]
    sim.reply(tid, b"welcome")
    assert sim.received[newcomer] == [b"welcome"]
    assert {one_way, stream, chat} <= set(o.clients) and o.stats["evictions"] == 1


def test_the_reserve_is_for_clients_that_keep_talking_and_evictions_make_it_again():
    """--max-clients 32: the last 2 tunnels (32 / 16) are for clients that send again. An evicted
    client that comes back keeps talking, and its tunnel's late data is no new client."""
    sim = Sim(max_clients=32, keepalive=5)
    o = sim.outside
    shots = [v6(f"100.64.{i}.1", 1000) for i in range(40)]
    for c in shots:  # one datagram each: 30 take a tunnel, the rest wait (and never send again)
        sim.send(b"once", c)
    assert len(o.clients) == 30 and len(o.admission.pending) == 10
    for c in shots[:30]:
        sim.reply(o.clients[c].tid, b"answer")
    sim.advance(3)
    for i in range(2):  # the reserve: at their second datagram, no eviction
        c = v6(f"203.0.113.{i + 1}", 7000)
        talk_twice(sim, c)
        assert [d for t, d in sim.service_rx if t == o.clients[c].tid] == [b"n1", b"n2"]
    assert len(o.clients) == 32 and o.stats["evictions"] == 0
    talk_twice(sim, v6("203.0.113.3", 7000))  # the table is full: its own tunnel and the reserve's
    gone = [c for c in shots[:30] if c not in o.clients]
    assert o.stats["evictions"] == 3 and len(gone) == 3
    evicted_tid = next(tid for tid, d in sim.service_rx if d == b"once" and tid not in o.tunnels)
    sim.send(b"late answer", sim.public[evicted_tid])  # from the evicted tunnel's address, sent before it knew
    # told at once (GONE), the inside closed the three, and the newcomer has a new spare already
    assert o.stats["drop_unbound_tunnel"] == 1 and len(o.clients) == 30
    sim.advance(5.5)  # the inside closed them when told; the spares come
    assert v6("203.0.113.3", 7000) in o.clients and len(o.clients) == 30
    sim.send(b"me again", gone[0])  # its first datagram since it was evicted: it keeps talking
    assert sim.service_rx[-1] == (o.clients[gone[0]].tid, b"me again")
    sim.advance(0.25)
    assert o.stats["evictions"] == 4  # the reserve made again


def test_a_legacy_outside_never_evicts_because_a_legacy_inside_is_never_told():
    sim = Sim(max_clients=3, keepalive=5, legacy=True)
    for i in range(3):
        sim.send(b"once", v6("192.0.2.1", 1000 + i))
        sim.advance(0.01)
    assert len(sim.outside.clients) == 3
    sim.advance(3)
    talk_twice(sim, v6("203.0.113.50", 7000))
    assert sim.outside.stats["evictions"] == 0 and sim.outside.stats["drop_limit"] == 2


def test_with_room_in_the_table_but_none_at_the_inside_a_client_that_keeps_talking_gets_one_after_an_eviction():
    """The inside allows fewer clients than the outside (a lower --max-clients of its own): no
    spare comes, although the outside's table has room."""
    sim = Sim(max_clients=10, keepalive=5)
    sim.inside.max_clients = 3
    for i in range(3):
        one_shot(sim, v6("192.0.2.1", 1000 + i))
    sim.advance(3)
    assert sim.inside.ready_spares() == 0 and len(sim.outside.clients) == 3
    newcomer = v6("203.0.113.50", 7000)
    talk_twice(sim, newcomer)
    assert sim.outside.stats["evictions"] == 0  # not before it waited STARVED s
    sim.advance(1.0)
    assert sim.outside.stats["evictions"] == 1
    sim.advance(5.0)
    assert [d for _, d in sim.service_rx][-1] == b"n2" and newcomer in sim.outside.clients
    assert sim.outside.stats["evictions"] == 1


# --- randomized: evictions among everything else the attacker does ---

SPRAY = st.tuples(st.just("spray"), st.integers(1, 12), st.booleans())
TALK = st.tuples(st.just("talk"), st.integers(0, len(CLIENTS) - 1))
SPRAY_STEP = st.one_of(TALK, SPRAY, STEP)  # earlier branches are drawn more often


class SprayRun(Run):
    """test_random's attacker and clients, plus one-shot sprays from many addresses (answered
    by the service, or not) and clients that send again a quarter of a second later."""

    def __init__(self) -> None:
        super().__init__(key=b"secret")
        self.port = 30000

    def step(self, s: tuple) -> None:
        sim = self.sim
        if s[0] == "spray":
            for i in range(s[1]):
                self.port += 1
                self.send(b"j%d" % self.port, v6(f"100.64.{i}.1", self.port))
                if s[2]:
                    tid = self.sim.outside.clients.get(v6(f"100.64.{i}.1", self.port))
                    if tid is not None and tid.tid in sim.service_socket:
                        sim.reply(tid.tid, b"r%d" % tid.tid)
        elif s[0] == "talk":
            self.seq += 1
            self.send(b"c%d#%d" % (s[1], self.seq), CLIENTS[s[1]])
            sim.advance(0.25, step=0.25)
            self.seq += 1
            self.send(b"c%d#%d" % (s[1], self.seq), CLIENTS[s[1]])
        else:
            super().step(s)


@SETTINGS
@given(st.lists(SPRAY_STEP, max_size=40))
def test_no_sequence_of_sprays_evictions_and_attacks_lets_a_client_receive_another_clients_datagram(steps):
    """Each sequence starts with the table full of one-shot flows old enough to be evicted."""
    run = SprayRun()
    for s in [("spray", 8, True), ("advance", 1.0), ("advance", 1.0)] + steps:
        run.step(s)
        run.check_no_cross_talk()
        run.check_registrations()
    run.sim.advance(3 * KEEPALIVE + 10, step=1.0)
    run.check_no_cross_talk()


def test_the_randomized_sprays_do_evict():
    """The sequences above reach evictions (else they would test nothing new)."""
    run = SprayRun()
    for s in [("spray", 12, True), ("advance", 4.0), ("talk", 0), ("advance", 11.0), ("talk", 2)]:
        run.step(s)
        run.check_no_cross_talk()
    assert run.sim.outside.stats["evictions"] >= 2


def test_the_reserve_follows_a_limit_changed_by_a_reload():
    sim = Sim(max_clients=160)
    a = sim.outside.admission
    assert a.reserve == 10  # a sixteenth of the table
    sim.outside.set_key_limit("default", 1600)
    sim.outside.update_service(Service(max_clients=1600))
    assert a.reserve == admission.RESERVE_MAX  # at most 64
