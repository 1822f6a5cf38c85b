"""The findings of the second protocol review (issue 17), on both cores with a fake clock:
each test reproduces the attack as the review described it."""

from __future__ import annotations

from sim import Sim, v6
from udp_tunnel.wire import proto

INSIDE_IP = "203.0.113.7"  # the inside's public address in the simulated network


def captured_keepalives(sim: Sim) -> list[bytes]:
    return sorted({d for d, _, w in sim.wire if w == "up" and proto.is_control(d)})


def flood(sim: Sim, replays: list[bytes], seconds: float, rate: int, clients: list[tuple],
          talker: tuple | None = None, src=lambda k: v6(INSIDE_IP, 20000 + k % 30000)) -> dict:
    """Replay `replays` at `rate`/s from src(k) for `seconds` while the new `clients` arrive,
    evenly spread, each sending one datagram (which the service answers), and `talker` (if
    any) sends every 100 ms.
    Returns when each new client's datagram reached the service (None: never), and the
    talker's datagrams sent and delivered."""
    steps = int(seconds * rate)
    every = max(1, steps // max(1, len(clients)))
    arrived: dict[tuple, float] = {}
    sent_at: dict[bytes, float] = {}
    talk = [0, 0]
    seen = 0
    for k in range(steps):
        sim.advance(1.0 / rate)
        while seen < len(sim.service_rx):  # the service answers each new client (an echo)
            tid, data = sim.service_rx[seen]
            seen += 1
            if data.startswith(b"new client") and tid in sim.service_socket:
                sim.reply(tid, b"re " + data)
        sim.send(replays[k % len(replays)], src(k))
        if k % every == 0 and k // every < len(clients):
            c = clients[k // every]
            msg = b"new client %d" % (k // every)
            sent_at[msg] = sim.now
            sim.send(msg, c)
        if talker is not None and k % max(1, rate // 10) == 0:
            talk[0] += 1
            sim.send(b"talk %d" % talk[0], talker)
    sim.advance(2)
    got = {d for _, d in sim.service_rx}
    for i, c in enumerate(clients):
        msg = b"new client %d" % i
        delivered = next((sim.now for _, d in sim.service_rx if d == msg), None)
        arrived[c] = delivered if msg in got else None
    talk[1] = sum(1 for _, d in sim.service_rx if d.startswith(b"talk "))
    return {"clients": arrived, "talk": tuple(talk)}


def test_replays_of_a_forgotten_session_from_the_insides_own_address_do_not_starve_its_registrations():
    """Finding 1: an old inside session's keepalives, replayed at 1000/s from the inside's
    public IPv4 (any port), used up that address's challenges: 3 of 59 new clients served."""
    sim = Sim(keepalive=5, max_clients=1000)
    for i in range(8):
        sim.send(b"old %d" % i, v6("198.51.100.30", 6000 + i))
    sim.advance(40)
    replays = captured_keepalives(sim)
    assert len(replays) > 50
    sim.restart_inside()
    sim.advance(130)  # the old session is forgotten at the outside (2 cookie lifetimes without tunnels)
    assert len(sim.outside.sessions) == 1
    clients = [v6("198.51.100.40", 7000 + i) for i in range(59)]
    r = flood(sim, replays, seconds=10, rate=1000, clients=clients)
    served = sum(t is not None for t in r["clients"].values())
    assert served == 59
    assert sim.outside.stats["challenges"] < len(replays) + 200  # each captured counter challenged once at most


def test_after_an_outside_restart_without_state_the_existing_client_flows_again_under_the_replay_flood():
    """Finding 1: after an outside restart without a state file, every capture is of a session
    the new outside does not know; the existing client got 0 of 64 datagrams through."""
    sim = Sim(keepalive=25, max_clients=1000)
    client = v6("198.51.100.10", 5000)
    sim.send(b"first", client)
    sim.advance(60)
    replays = captured_keepalives(sim)
    sim.restart_outside()
    r = flood(sim, replays, seconds=35, rate=1000, clients=[], talker=client)
    sent, delivered = r["talk"]
    # within one keepalive interval (25 s) of the restart it flows again: at most 25 s of 35 s lost
    assert delivered >= sent - 250 and sim.service_rx[-1][1] == b"talk %d" % sent


def test_replays_from_many_ipv6_prefixes_do_not_take_the_budget_of_the_real_inside():
    """Finding 1, without spoofing: the same replays from 1024 IPv6 /64s at 12 000/s used up
    the global budget: 6 of 19 new clients served."""
    sim = Sim(keepalive=5, max_clients=1000)
    for i in range(8):
        sim.send(b"old %d" % i, v6("198.51.100.30", 6000 + i))
    sim.advance(40)
    replays = captured_keepalives(sim)
    sim.restart_inside()
    sim.advance(130)
    clients = [v6("198.51.100.41", 7000 + i) for i in range(19)]
    r = flood(sim, replays, seconds=10, rate=12000, clients=clients,
              src=lambda k: (f"2001:db8:{k % 1024:x}::1", 4000 + k % 1000, 0, 0))
    assert sum(t is not None for t in r["clients"].values()) == 19


def test_a_sessions_first_keepalive_replayed_after_its_tunnel_closed_makes_no_ghost_spare():
    """Finding 2: the keepalive that created a session was never marked as seen; replayed from
    its old address after the tunnel closed, it made a ghost spare the next client was given."""
    sim = Sim(keepalive=25, spares=1)
    codec = proto.Codec(b"secret")
    ups = [(d, a) for d, a, w in sim.wire if w == "up" and proto.is_control(d)]
    # the session's first keepalive with a valid cookie: the answer to the first challenge
    first, first_addr = next((d, a) for d, a in ups if codec.decode(d).cookie != bytes(proto.COOKIE_LEN))
    sim.advance(1)
    for tid in list(sim.inside.tunnels):
        sim.inside.close(tid, sim.now, "test")
    sim.pump()
    sim.advance(5)
    sim.send(first, first_addr)  # replayed from its old address, its cookie still valid
    assert all(t.addr != first_addr for t in sim.outside.tunnels.values())
    sim.send(b"next client", v6("198.51.100.50", 5000))
    sim.advance(1)
    assert sim.service_rx[-1][1] == b"next client"


CLIENT = v6("198.51.100.10", 5000)


def test_spoofed_data_on_a_spare_never_reaches_the_service_only_announced_clients_do():
    """Finding 12: data spoofed from the outside's address reached the service once through a
    registered spare. Now the outside announces each client (authenticated) before its first
    datagram, and the inside lets nothing else through."""
    sim = Sim(keepalive=25)
    spare = next(iter(sim.outside.spares))
    sim.deliver_to_inside(spare, b"spoofed")
    sim.advance(5)
    assert sim.service_rx == [] and sim.inside.stats["drop_unannounced"] == 1
    sim.send(b"hello", CLIENT)
    tid = sim.outside.clients[CLIENT].tid
    assert sim.service_rx == [(tid, b"hello")]
    assert sim.inside.tunnels[tid].peer == proto.pack_peer(CLIENT)


def test_a_lost_announce_is_sent_again_and_the_held_first_datagram_then_reaches_the_service():
    sim = Sim(keepalive=25)
    lost = []
    real = sim.deliver_to_inside

    def lose_announces(tid, data):
        if proto.is_control(data) and proto.Codec(b"secret").decode(data).type == proto.ANNOUNCE and not lost:
            lost.append(data)  # the first ANNOUNCE is lost on the way
            return
        real(tid, data)

    sim.deliver_to_inside = lose_announces
    sim.send(b"first", CLIENT)
    assert lost and sim.service_rx == []  # held at the inside, waiting for its ANNOUNCE
    sim.advance(0.2)  # the outside sends it again
    tid = sim.outside.clients[CLIENT].tid
    assert sim.service_rx == [(tid, b"first")] and sim.outside.clients[CLIENT].confirmed
    real(tid, lost[0])  # the lost one, late (or replayed): believed once only
    assert sim.inside.stats["drop_replay"] == 1


def test_data_spoofed_on_the_spares_before_a_client_takes_one_never_reaches_the_service_as_that_clients():
    """Found in the lab (tests/lab/test_clientaddr_agents.py): data spoofed from the outside's
    address onto every spare was held there, and the ANNOUNCE of the next client the outside
    gave one of them handed it to the service as that client's (from the client's own address
    with --client-address transparent). The ANNOUNCE now says how many of the client's
    datagrams the outside forwarded before it: the inside keeps only that many of the last held."""
    sim = Sim(keepalive=25, spares=2)
    spares = list(sim.outside.spares)
    for tid in spares:
        sim.deliver_to_inside(tid, b"spoofed")
    sim.pump()
    sim.send(b"real", CLIENT)
    tid = sim.outside.clients[CLIENT].tid
    assert tid in spares and sim.service_rx == [(tid, b"real")]
    sim.advance(4)
    assert sim.inside.stats["drop_unannounced"] == len(spares) and sim.service_rx == [(tid, b"real")]


def test_data_spoofed_on_a_spare_that_closes_before_its_hold_ends_is_counted_as_dropped():
    """Found in the lab: a spare closed while it held spoofed data (no longer needed) dropped
    that data without counting it."""
    sim = Sim(keepalive=25, spares=2)
    spare = next(iter(sim.outside.spares))
    sim.deliver_to_inside(spare, b"spoofed")
    sim.deliver_to_inside(spare, b"spoofed again")
    sim.pump()
    sim.inside.close(spare, sim.now, "spare no longer needed")
    assert sim.inside.stats["drop_unannounced"] == 2 and sim.service_rx == []


def test_after_a_lost_announce_only_the_clients_own_held_datagrams_reach_the_service_not_spoofed_ones():
    sim = Sim(keepalive=25, spares=2)
    codec = proto.Codec(b"secret")
    lost = []
    real = sim.deliver_to_inside

    def lose_the_first_announce(tid, data):
        if proto.is_control(data) and codec.decode(data).type == proto.ANNOUNCE and not lost:
            lost.append(data)
            return
        real(tid, data)

    sim.deliver_to_inside = lose_the_first_announce
    for tid in list(sim.outside.spares):
        real(tid, b"spoofed")
    sim.pump()
    sim.send(b"first", CLIENT)
    sim.send(b"second", CLIENT)
    tid = sim.outside.clients[CLIENT].tid
    assert lost and sim.service_rx == []  # held: spoofed, first, second
    sim.advance(0.2)  # the ANNOUNCE again: two datagrams of the client went down the tunnel before it
    assert sim.service_rx == [(tid, b"first"), (tid, b"second")]
    assert sim.inside.stats["drop_unannounced"] == 1


def test_every_encrypted_message_has_a_nonce_of_its_own():
    """Finding 13: challenges to unknown sessions and replies to replays repeated their nonce
    (only the seen field differed)."""
    sim = Sim(keepalive=5)
    replays = []
    for i in range(3):
        sim.send(b"c%d" % i, v6("198.51.100.70", 5000 + i))
    sim.advance(20)
    replays = captured_keepalives(sim)
    sim.restart_outside()
    for d in replays[:20] * 3:  # the same keepalives, again and again, from elsewhere
        sim.send(d, v6("192.0.2.66", 6666))
    sim.advance(20)
    codec = proto.Codec(b"secret")
    seen = [(codec.decode(d).session, d[:proto.NONCE_END]) for d, _, _ in sim.wire if proto.is_control(d)]
    assert len(seen) > 100
    assert len(set(seen)) == len(seen)


def test_a_replayed_hello_of_an_old_outside_session_is_believed_once():
    """Finding 11: a spoofed HELLO made every tunnel register again, once a second, forever."""
    sim = Sim(keepalive=25)
    sim.send(b"a", CLIENT)
    sim.advance(1)
    sim.restart_outside(remember=True)
    hello = next(d for d, _, w in sim.wire if w == "down" and proto.is_control(d)
                 and proto.Codec(b"secret").decode(d).flags & proto.F_HELLO)
    sim.restart_outside()  # another restart: the captured HELLO is of an old outside session now
    sim.advance(2)
    tid = next(iter(sim.inside.tunnels))
    before = sim.inside.stats["hellos"]
    for _ in range(10):
        sim.deliver_to_inside(tid, hello)
        sim.pump()
        sim.advance(1.5)
    assert sim.inside.stats["hellos"] - before == 0  # that outside session's HELLO was believed already


def test_a_tunnel_closed_while_it_registers_again_still_tells_the_outside():
    """Finding 11: while unregistered (after a HELLO), close() skipped the CLOSING keepalive."""
    sim = Sim(keepalive=25, timeout=30)
    sim.send(b"a", CLIENT)
    tid = sim.outside.clients[CLIENT].tid
    sim.up = False  # the answers to its registration are lost
    sim.inside._register_all_again(sim.now)
    sim.pump()
    sim.up = True
    assert not sim.inside.tunnels[tid].registered
    sim.inside.close(tid, sim.now, "test")
    sim.pump()
    assert tid not in sim.outside.tunnels and tid in next(iter(sim.outside.sessions.values())).closed


def test_a_tampered_state_file_makes_a_paced_trickle_of_hellos_never_a_flood():
    """Finding 10: a state file naming 1064 addresses made the outside send 1064 HELLOs at once."""
    sim = Sim(keepalive=25, max_clients=1000)
    victims = [(i + 1, v6("192.0.2.99", 1000 + i)) for i in range(5000)]
    sim.outside = sim.new_outside()
    sim.outside.remembered(victims, sim.now)
    sent = [len([1 for d, a, _ in sim.outside.take()])]
    for _ in range(40):  # 2 s, the timer every 50 ms
        sim.now += 0.05
        sim.outside.on_timer(sim.now)
        sent.append(len(sim.outside.take()))
    assert sent[0] == 64 and max(sent) == 64 and sum(sent) == 1064  # at most max_tunnels, 64 per 50 ms


def test_captured_wireguard_initiations_stay_refused_after_a_restart_with_the_state_file():
    """Finding 7: the memory of admitted initiations was lost at a restart: 10 of 10 captured
    initiations were admitted again. It goes into the state file now (and back out of it)."""
    from test_wireguard import initiation, wg_sim
    from udp_tunnel.wire import statefile
    sim = wg_sim(keepalive=5)
    inits = [initiation(sender=bytes([i]) * 4) for i in range(10)]
    for i, d in enumerate(inits):
        sim.send(d, v6("198.51.100.20", 6000 + i))
    assert sim.outside.stats.get("drop_wg_replay", 0) == 0 and len(sim.outside.clients) == 10
    tunnels, seen = statefile.parse_all(statefile.dump(sim.outside.saved_tunnels(), sim.outside.saved_initiations()))
    assert seen == {"default": [d[116:132] for d in inits]}
    sim.restart_outside(remember=True)
    for i, d in enumerate(inits):  # the copies, from other ports
        sim.send(d, v6("192.0.2.66", 7000 + i))
    assert sim.outside.stats["drop_wg_replay"] == 10


def test_a_key_full_of_sessions_never_takes_another_key_s_session():
    """Each key (each inside agent) remembers at most SESSIONS sessions; when one is full, it may
    forget one of its own dead ones, never another key's (whose replay window would be lost)."""
    import io
    import socket

    from udp_tunnel.core import outside as core_outside
    from udp_tunnel.ops.log import INFO, Log
    now = 1000.0
    core = core_outside.OutsideCore(keepalive=25, family=socket.AF_INET6, now=now, log=Log(INFO, io.StringIO()),
                                    keys={"a": (b"key a, long enough", 10), "b": (b"key b, long enough", 10)})
    core.sessions[1] = core_outside.Session(1, now - 10 * core.cookie_slot, keyname="b")  # dead, of key b
    for sid in range(2, 2 + core_outside.SESSIONS):
        core.sessions[sid] = core_outside.Session(sid, now, keyname="a")
    m = proto.Control(proto.KEEPALIVE, 0, 999, 1, 1)
    assert core._new_session(m, v6("192.0.2.9", 9), now, "a") is None
    assert 1 in core.sessions and core.stats["drop_sessions"] == 1
    core.sessions[2].last = now - 10 * core.cookie_slot  # a dead one of its own: that one goes
    assert core._new_session(m, v6("192.0.2.9", 9), now, "a") is not None
    assert 2 not in core.sessions and 1 in core.sessions and 999 in core.sessions
