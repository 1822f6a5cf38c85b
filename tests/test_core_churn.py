"""Sustained churn on the cores (issue 18): hundreds of new clients a second from one address,
each answered and gone, with a fake clock."""

from __future__ import annotations

from sim import Sim, v6


def churn(sim: Sim, rate: int, seconds: float) -> tuple[int, int]:
    """`rate` new clients a second from one address, each sending one datagram that the service
    answers: (clients, clients answered within 1 s)."""
    step = 1.0 / rate
    answered = 0
    pending: dict[bytes, tuple] = {}
    seen = 0
    n = int(rate * seconds)
    for i in range(n + int(rate)):
        if i < n:
            c = v6("198.51.100.60", 1024 + i % 60000)
            msg = b"query %d" % i
            pending[msg] = (c, sim.now)
            sim.send(msg, c)
        sim.advance(step)
        while seen < len(sim.service_rx):
            tid, data = sim.service_rx[seen]
            seen += 1
            if data in pending and tid in sim.service_socket:
                sim.reply(tid, b"answer " + data)
        for msg, (c, t0) in list(pending.items()):
            if b"answer " + msg in sim.received.get(c, []):
                answered += sim.now - t0 <= 1.0
                del pending[msg]
            elif sim.now - t0 > 1.0:
                del pending[msg]
    return n, answered


def test_an_inside_that_proved_itself_registers_hundreds_of_new_tunnels_a_second():
    """Each new client needs a new spare, each new spare a challenge: the real inside's own
    registrations have a budget of their own (not a stranger's 50/s per address)."""
    sim = Sim(keepalive=3, timeout=3, max_clients=1500)
    sim.outside.admission.max_per_source = 1500  # one address brings every client here
    sim.checks = False  # thousands of tunnels: the invariants are checked once at the end
    n, answered = churn(sim, rate=300, seconds=7)
    sim.outside.check_invariants()
    sim.inside.check_invariants(sim.service_socket)
    assert answered == n
    assert sim.outside.stats["drop_rate"] == 0


def test_the_spare_pool_follows_the_arrival_rate_and_the_registration_time_and_shrinks_when_they_fall():
    from udp_tunnel.core.spares import MAX_EXTRA, WINDOW, Demand
    d = Demand()
    for _ in range(20):
        d.registered(0.05)  # a new spare registers 50 ms after it opens (converges to 0.05)
    assert abs(d.registration - 0.05) < 0.01
    d.registration = 0.05
    now = 100.0
    for i in range(3000):  # 300 clients a second for 10 s, evenly spread
        d.arrived(now + (i + 0.5) / 300)
    now += 10
    # steady: 2 x 300/s x ~0.05 s = 30 (a burst bucket of 100 ms holds 30 too)
    assert d.extra(now) == 30
    assert d.extra(now, waiting=70) == 70  # clients held at the outside for want of a spare
    for _ in range(500):  # a burst of 500 at once: capped
        d.arrived(now)
    assert d.extra(now) == MAX_EXTRA
    assert d.extra(now + WINDOW + 0.2) == 0  # the demand has passed: the pool shrinks to --spares
