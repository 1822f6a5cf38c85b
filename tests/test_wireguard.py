"""WireGuard mode (--wireguard-key): admission by MAC1, roaming by session index, with a fake clock.

The WireGuard messages are built here from the protocol description with hashlib alone, not
with udp_tunnel.core.wireguard, so a mistake there can't hide in the tests.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random

import pytest

from sim import Sim, v6
from udp_tunnel.core.wireguard import INDICES_PER_TUNNEL, ROAM_QUIET, Gate, parse_keys
from udp_tunnel.ops import metrics, status

SERVER_PUB = bytes(range(32))
OTHER_PUB = bytes(range(100, 132))
CLIENT = v6("198.51.100.10", 5000)
CLIENT_NEW = v6("198.51.100.10", 6001)  # the same client after its NAT gave it a new port
ATTACKER = v6("192.0.2.66", 6666)
rng = random.Random(9)


def initiation(pub: bytes = SERVER_PUB, sender: bytes = b"\x11\x22\x33\x44") -> bytes:
    """Type 1, 148 bytes; mac1 = BLAKE2s-128(key=BLAKE2s-256("mac1----" || pub), msg[0:116])."""
    body = bytes([1, 0, 0, 0]) + sender + rng.randbytes(32 + 48 + 28)
    assert len(body) == 116
    key = hashlib.blake2s(b"mac1----" + pub).digest()
    return body + hashlib.blake2s(body, digest_size=16, key=key).digest() + bytes(16)


def response(sender: bytes, receiver: bytes = b"\x11\x22\x33\x44") -> bytes:
    """Type 2, 92 bytes, from the server: sender = the server's index for this session."""
    return bytes([2, 0, 0, 0]) + sender + receiver + rng.randbytes(32 + 16 + 16 + 16)


def transport(receiver: bytes, counter: int = 0, size: int = 48) -> bytes:
    """Type 4: receiver index, counter, then encrypted data (opaque here)."""
    return bytes([4, 0, 0, 0]) + receiver + counter.to_bytes(8, "little") + rng.randbytes(size - 16)


def wg_sim(*keys: bytes, **kw) -> Sim:
    return Sim(wireguard=lambda: Gate(list(keys or (SERVER_PUB,))), **kw)


def handshake(sim: Sim, client: tuple = CLIENT, server_index: bytes = b"\xaa\xbb\xcc\xdd") -> int:
    """The client's initiation goes up, the server's response comes back: the tunnel id."""
    init = initiation()
    sim.send(init, client)
    tid, data = sim.service_rx[-1]
    assert data == init
    sim.reply(tid, response(server_index))
    assert sim.received[client][-1][:1] == b"\x02"
    return tid


def test_a_valid_initiation_takes_a_tunnel_and_reaches_the_service_byte_for_byte():
    sim = wg_sim()
    init = initiation()
    sim.send(init, CLIENT)
    assert [d for _, d in sim.service_rx] == [init]
    assert CLIENT in sim.outside.clients
    tid = sim.outside.clients[CLIENT].tid
    snap = {t["id"]: t for t in sim.outside.snapshot(sim.now)["tunnels"]}
    assert snap[f"{tid:016x}"]["wireguard"] == {"admitted": "handshake", "sessions": 0, "roams": 0}
    # then everything from the admitted client passes untouched, whatever its shape
    for later in (b"x", transport(b"\x01\x02\x03\x04"), bytes(148), b"UDPT" * 10):
        sim.send(later, CLIENT)
        assert sim.service_rx[-1] == (tid, later)


@pytest.mark.parametrize("what", ["flipped bit", "other server", "zero mac"])
def test_an_initiation_with_a_wrong_mac1_is_dropped_counted_and_takes_nothing(what):
    sim = wg_sim()
    init = initiation(OTHER_PUB if what == "other server" else SERVER_PUB)
    if what == "flipped bit":
        init = init[:120] + bytes([init[120] ^ 1]) + init[121:]
    elif what == "zero mac":
        init = init[:116] + bytes(32)
    spares = dict(sim.outside.spares)
    sim.send(init, ATTACKER)
    assert sim.service_rx == [] and sim.outside.clients == {} and sim.outside.spares == spares
    assert sim.outside.stats["drop_wg_bad_mac1"] == 1
    assert ATTACKER not in sim.received


def test_junk_from_new_sources_never_takes_a_tunnel_and_is_counted_by_reason():
    sim = wg_sim()
    spares = dict(sim.outside.spares)
    junk = [b"", b"x", rng.randbytes(1200), bytes(148), b"\x01" + bytes(147), initiation()[:147],
            initiation() + b"x", response(b"\x01\x02\x03\x04"), bytes([3, 0, 0, 0]) + bytes(60),
            b"UDPT" + bytes(10)]
    for i, d in enumerate(junk):
        sim.send(d, v6("192.0.2.66", 10000 + i))
    for i in range(200):  # transport data of sessions nobody saw, from 200 ports
        sim.send(transport(rng.randbytes(4)), v6("192.0.2.66", 20000 + i))
    st = sim.outside.stats
    # b"\x01" + bytes(147) is shaped like an initiation: its MAC1 is what is wrong
    assert st["drop_wg_not_handshake"] == len(junk) - 1 and st["drop_wg_bad_mac1"] == 1
    assert st["drop_wg_unknown_session"] == 200
    assert sim.service_rx == [] and sim.outside.clients == {} and sim.outside.spares == spares
    assert sim.received == {}
    assert "no spare" not in sim.log.getvalue()


def test_a_replayed_initiation_takes_no_tunnel_from_other_ports_and_the_memory_is_bounded():
    sim = wg_sim()
    init = initiation()
    sim.send(init, CLIENT)
    for i in range(100):  # captured on the path, sent again from 100 ports (mac2 is not under mac1)
        sim.send(init[:132] + rng.randbytes(16), v6("192.0.2.66", 30000 + i))
    assert list(sim.outside.clients) == [CLIENT] and sim.outside.stats["drop_wg_replay"] == 100
    from udp_tunnel.core.wireguard import SEEN_INITIATIONS
    gate = Gate([SERVER_PUB])
    first = initiation()
    assert gate.admit_new(first) is None and gate.admit_new(first) == "replay"
    for _ in range(SEEN_INITIATIONS):
        assert gate.admit_new(initiation()) is None
    assert len(gate.seen) == SEEN_INITIATIONS and gate.admit_new(first) is None  # forgotten: bounded


def test_several_server_keys_admit_initiations_for_any_of_them():
    sim = wg_sim(SERVER_PUB, OTHER_PUB)
    sim.send(initiation(SERVER_PUB), CLIENT)
    sim.send(initiation(OTHER_PUB), ATTACKER)
    sim.send(initiation(bytes(32)), v6("192.0.2.67", 1))
    assert set(sim.outside.clients) == {CLIENT, ATTACKER}
    assert sim.outside.stats["drop_wg_bad_mac1"] == 1


def test_at_the_client_limit_valid_initiations_wait_but_junk_is_counted_as_junk():
    sim = wg_sim(max_clients=1)
    sim.send(initiation(), CLIENT)
    sim.send(initiation(), ATTACKER)
    sim.send(b"junk", v6("192.0.2.67", 1))
    assert list(sim.outside.clients) == [CLIENT]
    assert sim.outside.stats["drop_limit"] == 1 and sim.outside.stats["drop_wg_not_handshake"] == 1


def test_an_idle_roaming_client_moves_its_tunnel_at_its_first_datagram():
    sim = wg_sim()
    idx = b"\xaa\xbb\xcc\xdd"
    tid = handshake(sim, server_index=idx)
    sim.send(transport(idx, 0), CLIENT)
    sim.advance(3)  # the client idles; then its NAT gives it a new port
    data = transport(idx, 1)
    sim.send(data, CLIENT_NEW)
    assert sim.service_rx[-1] == (tid, data)
    assert sim.outside.clients[CLIENT_NEW].tid == tid and CLIENT not in sim.outside.clients
    assert sim.outside.stats["wg_roams"] == 1
    sim.reply(tid, b"answer")
    assert sim.received[CLIENT_NEW] == [b"answer"]
    assert sim.outside.snapshot(sim.now)["stats"]["wg_roams"] == 1
    desc = {t["id"]: t.get("wireguard") for t in sim.outside.snapshot(sim.now)["tunnels"]}[f"{tid:016x}"]
    assert desc == {"admitted": "handshake", "sessions": 1, "roams": 1}
    # the inside learns the new client address from the next keepalive's answer
    sim.advance(sim.keepalive + 1)
    from udp_tunnel.wire import proto
    assert proto.unpack_peer(sim.inside.tunnels[tid].peer, 10) == CLIENT_NEW


def test_a_client_whose_nat_changes_mid_transfer_moves_within_the_quiet_time():
    sim = wg_sim()
    idx = b"\x01\x00\x00\x07"
    tid = handshake(sim, server_index=idx)
    counter = 0
    for _ in range(100):  # 2 s of data every 20 ms from the old address
        sim.send(transport(idx, counter), CLIENT)
        counter += 1
        sim.advance(0.02, step=0.02)
    switched = sim.now
    moved_at = None
    for _ in range(100):
        sim.send(transport(idx, counter), CLIENT_NEW)
        counter += 1
        if moved_at is None and CLIENT_NEW in sim.outside.clients:
            moved_at = sim.now
        sim.advance(0.02, step=0.02)
    assert moved_at is not None and ROAM_QUIET <= moved_at - switched <= ROAM_QUIET + 0.05
    assert sim.outside.clients[CLIENT_NEW].tid == tid
    # nothing was lost upstream while waiting: every datagram from the new address went up
    assert sum(1 for t, _ in sim.service_rx if t == tid) == 1 + 200
    assert sim.outside.snapshot(sim.now)["totals"]["datagrams_in"] == 201


def test_someone_who_knows_the_index_cannot_take_the_tunnel_of_a_client_that_keeps_sending():
    sim = wg_sim()
    idx = b"\x05\x06\x07\x08"
    tid = handshake(sim, server_index=idx)
    for i in range(300):  # 6 s: the client sends every 100 ms, the attacker every 20 ms
        if i % 5 == 0:
            sim.send(transport(idx, i), CLIENT)
        sim.send(transport(idx, 10**6 + i), ATTACKER)
        sim.advance(0.02, step=0.02)
    assert sim.outside.clients[CLIENT].tid == tid and ATTACKER not in sim.outside.clients
    assert sim.outside.stats["wg_roams"] == 0 and sim.outside.stats["wg_roam_waits"] == 300
    sim.reply(tid, b"for the client")
    assert sim.received[CLIENT][-1] == b"for the client" and ATTACKER not in sim.received


def test_a_stolen_idle_binding_goes_back_when_the_client_sends_again_or_handshakes():
    """Documented limit: an idle client's tunnel follows whoever sends its index after a quiet time."""
    sim = wg_sim()
    idx = b"\x05\x06\x07\x09"
    tid = handshake(sim, server_index=idx)
    sim.advance(2)
    sim.send(transport(idx), ATTACKER)
    assert sim.outside.clients[ATTACKER].tid == tid
    sim.advance(2)  # the attacker stops: the client's next datagram takes it back
    sim.send(transport(idx), CLIENT)
    assert sim.outside.clients[CLIENT].tid == tid
    sim.advance(2)
    sim.send(transport(idx), ATTACKER)
    for _ in range(50):  # an attacker that keeps sending holds it; the client's next handshake
        sim.send(transport(idx), ATTACKER)  # from its address takes a fresh tunnel
        sim.advance(0.1, step=0.1)
    sim.send(initiation(), CLIENT)
    assert sim.outside.clients[CLIENT].tid != tid


def test_transport_of_a_session_never_seen_or_of_a_tunnel_gone_is_refused():
    sim = wg_sim(keepalive=5, timeout=30)
    idx = b"\x09\x09\x09\x09"
    tid = handshake(sim, server_index=idx)
    sim.send(transport(b"\x09\x09\x09\x08"), ATTACKER)
    assert sim.outside.stats["drop_wg_unknown_session"] == 1
    sim.advance(40)  # the client leaves; the inside closes its tunnel
    assert tid not in sim.outside.tunnels and sim.outside.wg.index == {} and sim.outside.wg.sessions == {}
    sim.send(transport(idx), CLIENT_NEW)
    assert sim.outside.stats["drop_wg_unknown_session"] == 2 and CLIENT_NEW not in sim.outside.clients


def test_a_handshake_started_by_the_server_names_the_session_too():
    sim = wg_sim()
    tid = handshake(sim, server_index=b"\x01\x01\x01\x01")
    server_init = initiation(OTHER_PUB, sender=b"\x02\x02\x02\x02")  # to the client: any MAC1
    sim.reply(tid, server_init)
    assert sim.received[CLIENT][-1] == server_init
    sim.advance(2)
    sim.send(transport(b"\x02\x02\x02\x02"), CLIENT_NEW)
    assert sim.outside.clients[CLIENT_NEW].tid == tid


def test_the_session_table_keeps_the_latest_indices_per_tunnel_and_is_bounded():
    sim = wg_sim()
    tid = handshake(sim, server_index=b"\x00\x00\x00\x00")
    for i in range(1, 50):  # rekeys: a new server index each time
        sim.reply(tid, response(i.to_bytes(4, "big")))
    assert len(sim.outside.wg.index) == INDICES_PER_TUNNEL
    assert set(sim.outside.wg.index) == {i.to_bytes(4, "big") for i in range(47, 50)}
    sim.advance(2)
    sim.send(transport((10).to_bytes(4, "big")), CLIENT_NEW)  # an old session: forgotten
    assert CLIENT_NEW not in sim.outside.clients
    sim.send(transport((48).to_bytes(4, "big")), CLIENT_NEW)
    assert sim.outside.clients[CLIENT_NEW].tid == tid


def test_after_an_outside_restart_clients_come_back_as_restored_and_learn_sessions_again():
    sim = wg_sim()
    tid = handshake(sim)
    sim.restart_outside()
    sim.advance(sim.keepalive + 1)
    assert sim.outside.clients[CLIENT].tid == tid
    desc = {t["id"]: t.get("wireguard") for t in sim.outside.snapshot(sim.now)["tunnels"]}[f"{tid:016x}"]
    assert desc == {"admitted": "restored", "sessions": 0, "roams": 0}
    sim.reply(tid, response(b"\x03\x03\x03\x03"))  # the next rekey names the session again
    sim.advance(2)
    sim.send(transport(b"\x03\x03\x03\x03"), CLIENT_NEW)
    assert sim.outside.clients[CLIENT_NEW].tid == tid


def test_status_and_metrics_show_the_mode_the_refusals_and_the_roams():
    sim = wg_sim()
    tid = handshake(sim, server_index=b"\x04\x04\x04\x04")
    sim.send(b"junk", ATTACKER)
    sim.send(initiation(OTHER_PUB), ATTACKER)
    sim.advance(2)
    sim.send(transport(b"\x04\x04\x04\x04"), CLIENT_NEW)
    snap = sim.outside.snapshot(sim.now)
    snap.update(version="x", pid=1, key=True)
    assert snap["wireguard"] == {"keys": 1, "clients": {"handshake": 1}, "sessions": 1}
    text = status.render(snap)
    assert "wireguard: admitting only handshakes valid for 1 server key" in text
    assert "1 wg bad mac1, 1 wg not handshake" in text
    assert f"tunnel: {tid:016x}" in text and "admitted: WireGuard handshake, roamed 1 time(s)" in text
    body = metrics.render(snap)
    assert 'udp_tunnel_dropped_total{reason="wg_bad_mac1"} 1' in body
    assert 'udp_tunnel_dropped_total{reason="wg_unknown_session"} 0' in body
    assert "udp_tunnel_wireguard_roams_total 1" in body
    assert 'udp_tunnel_wireguard_clients{admitted="handshake"} 1' in body


def test_without_the_mode_nothing_changes():
    sim = Sim()
    sim.send(b"junk", ATTACKER)
    assert ATTACKER in sim.outside.clients
    snap = sim.outside.snapshot(sim.now)
    assert "wireguard" not in snap and "wireguard" not in snap["tunnels"][0]


def test_keys_are_32_bytes_of_base64_and_several_can_be_given():
    a, b = base64.b64encode(SERVER_PUB).decode(), base64.b64encode(OTHER_PUB).decode()
    assert parse_keys(a) == [SERVER_PUB]
    assert parse_keys(f"{a}, {b} {a}") == [SERVER_PUB, OTHER_PUB]
    for bad in ("", "abc", base64.b64encode(bytes(31)).decode(), base64.b64encode(bytes(33)).decode(),
                a[:-2] + "!=", a + "x"):
        with pytest.raises(ValueError):
            parse_keys(bad)
    gate = Gate([OTHER_PUB, SERVER_PUB])
    assert gate.admit_new(initiation()) is None and gate.admit_new(initiation(os.urandom(32))) == "bad_mac1"


# --- the real command on loopback: the option, the loop's hook for handshake messages going back ---

def _recv(s, timeout: float = 0.3) -> bytes | None:
    s.settimeout(timeout)
    try:
        return s.recv(65536)
    except TimeoutError:
        return None


def test_real_agents_admit_only_valid_initiations_and_follow_a_roaming_client(lab):
    import socket
    import time

    from agents import converse, free_port
    svc = lab.echo()
    port = free_port()
    key = base64.b64encode(SERVER_PUB).decode()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1", "--wireguard-key", key])
    lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1"])
    out.wait_status(lambda s: s["spares"] >= 1)
    target = ("127.0.0.1", port)
    assert converse(target, 2, 2, timeout=2)["done"] == 0  # plain clients get nowhere
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.sendto(initiation(OTHER_PUB), target)
        assert _recv(a) is None
        init = initiation(sender=b"\x0a\x0b\x0c\x0d")
        a.sendto(init, target)
        # the echo service sends it back: a 148-byte type 1 going down names session 0a0b0c0d
        assert _recv(a, 5) == init
        a.sendto(transport(b"\x0a\x0b\x0c\x0d"), target)
        assert _recv(a, 5) is not None
        time.sleep(1.0)  # quiet, then "the NAT" gives the client a new port
        data, got, t0 = transport(b"\x0a\x0b\x0c\x0d", 7), None, time.monotonic()
        for _ in range(40):
            b.sendto(data, target)
            got = _recv(b, 0.1)
            if got:
                break
        took = time.monotonic() - t0
        print(f"loopback: roaming client answered at its new port after {took:.2f} s")
        assert got == data
        b_addr = f"127.0.0.1:{b.getsockname()[1]}"
        st = out.wait_status(lambda s: s["stats"].get("wg_roams") == 1)
        assert [t["client"] for t in st["tunnels"] if t["client"]] == [b_addr]
        assert st["stats"]["drop_wg_bad_mac1"] == 1 and st["stats"]["drop_wg_not_handshake"] >= 2
        # only the WireGuard client reached the service: one service socket, WireGuard-shaped data
        assert len({addr for addr, _ in svc.seen}) == 1 and {d[0] for _, d in svc.seen} == {1, 4}
    finally:
        a.close()
        b.close()
    assert "admitting only WireGuard handshakes for 1 server key" in out.log()


@pytest.mark.parametrize("args, needle", [
    (["-l", "9", "--wireguard-key", "abc"], "'abc' is not a WireGuard public key"),
    (["-l", "9", "--wireguard-key", base64.b64encode(bytes(31)).decode()], "32 bytes in base64"),
    (["-s", "127.0.0.1:1", "-o", "127.0.0.1:2", "--wireguard-key", base64.b64encode(bytes(32)).decode()],
     "for the outside agent"),
])
def test_a_bad_wireguard_key_is_one_clear_line_and_exit_2(args, needle):
    import subprocess

    from agents import command, env
    r = subprocess.run(command(*args), env=env(UDP_TUNNEL_KEY="a key, long enough"), capture_output=True,
                       text=True, timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr


@pytest.mark.parametrize("kernel", [False, True], ids=["user", "kernel-map"])
def test_a_service_made_wireguard_by_a_reload_sees_its_clients_roam(kernel):
    """A reload gives the running service a WireGuard key: the tunnel port's rule now claims the
    server's handshake answers (their session indices are how a roaming client is found), in the
    core and in the kernel path's map (the simulator checks that the map equals the table and
    that the program claims what the core's rule claims)."""
    from udp_tunnel.core.outside import Service
    sim = Sim(kernel=kernel)
    assert 92 not in sim.outside.rule.lengths
    version = sim.outside.routes.version
    sim.outside.update_service(Service(wireguard=Gate([SERVER_PUB])))
    assert 92 in sim.outside.rule.lengths and 148 in sim.outside.rule.lengths
    assert sim.outside.routes.version > version
    idx = b"\xaa\xbb\xcc\xdd"
    tid = handshake(sim, server_index=idx)
    sim.send(transport(idx, 0), CLIENT)
    sim.advance(3)
    data = transport(idx, 1)
    sim.send(data, CLIENT_NEW)
    assert sim.service_rx[-1] == (tid, data)
    assert sim.outside.clients[CLIENT_NEW].tid == tid and sim.outside.stats["wg_roams"] == 1
    sim.outside.update_service(Service())  # and back: the handshake answers are data again
    assert 92 not in sim.outside.rule.lengths
