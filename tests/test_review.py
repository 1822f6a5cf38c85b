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
