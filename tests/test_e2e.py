"""End-to-end on loopback: the real command in subprocesses, 127.0.0.1 and ::1."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from agents import burst, converse, flow, free_port, hostport
from udp_tunnel.wire import proto

HOSTS = ["127.0.0.1", "::1"]


def start_pair(lab, host="127.0.0.1", t="1", outside_extra=(), inside_extra=(), via=None):
    svc = lab.echo(host)
    port = free_port(socket.AF_INET6 if ":" in host else socket.AF_INET)
    out = lab.agent("outside", ["-l", hostport(host, port), "-t", t, *outside_extra])
    o_addr = hostport(host, port)
    nat = None
    if via == "nat":
        nat = lab.nat((host, port))
        o_addr = hostport(host, nat.port)
    ins = lab.agent("inside", ["-s", svc.addr, "-o", o_addr, "-t", t, *inside_extra])
    out.wait_status(lambda s: s["spares"] >= 1)
    return svc, out, ins, (host, port), nat


@pytest.mark.parametrize("host", HOSTS)
def test_hundred_concurrent_clients_each_get_their_own_bytes_back(lab, host, datapath):
    svc, out, ins, target, _ = start_pair(lab, host, inside_extra=["--spares", "4"])
    r = converse(target, n_clients=100, per_client=20)
    assert r["done"] == 100 and r["complete"] == 2000, r
    assert r["wrong"] == 0, r
    by_client = svc.sources_by_client()
    assert len(by_client) == 100
    assert all(len(src) == 1 for src in by_client.values())  # one service socket per client...
    assert len({next(iter(s)) for s in by_client.values()}) == 100  # ...never shared
    st = out.wait_status(lambda s: s["clients"] == 100)
    assert st["totals"]["datagrams_in"] >= 2000


@pytest.mark.parametrize("n", [30, 100])
def test_a_burst_of_new_clients_each_gets_its_first_datagram_answered_without_resending(lab, n):
    """Default options: the spares run out at once; the first datagrams wait at the outside
    while the inside opens more, and none is lost."""
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}"])
    lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}"])
    out.wait_status(lambda s: s["spares"] >= 2)
    r = burst(("127.0.0.1", port), n)
    print(f"{n} new clients at once: {r}")
    assert r["wrong"] == 0
    assert r["answered"] >= (n if n < 100 else 95), r


def test_ipv4_client_reaches_a_tunnel_that_arrives_over_ipv6(lab, datapath):
    svc = lab.echo("127.0.0.1")
    port = free_port(socket.AF_INET6)
    out = lab.agent("outside", ["-l", str(port), "-t", "1"])  # dual-stack
    ins = lab.agent("inside", ["-s", svc.addr, "-o", f"[::1]:{port}", "-t", "1"])
    st = out.wait_status(lambda s: s["spares"] >= 1)
    assert all(t["endpoint"].startswith("[::1]") for t in st["tunnels"])
    r = converse(("127.0.0.1", port), n_clients=3, per_client=5)
    assert r["done"] == 3 and r["wrong"] == 0
    if datapath == "kernel":  # the two ends of each direction differ in family: the agents relay them
        for agent in (out, ins):
            d = agent.wait_status(lambda s: s["datapath"]["kept_count"] == 6)["datapath"]
            assert d["flows"] == 0 and set(d["kept"].values()) == {
                "client and tunnel differ in address family" if agent is out else
                "tunnel and service differ in address family"}


def resumes_after(log: list, t: float, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        after = [x for x in log if x > t]
        if len(after) >= 5:
            return after[0] - t
        time.sleep(0.05)
    raise AssertionError("traffic did not resume")


@contextlib.contextmanager
def flowing(target):
    """One client sending a datagram every 50 ms while the block runs; yields the echo times."""
    stop, log = threading.Event(), []
    th = threading.Thread(target=flow, args=(target, lambda: not stop.is_set(),
                                             lambda: log.append(time.monotonic()), 0.05), daemon=True)
    th.start()
    try:
        yield log
    finally:
        stop.set()
        th.join(2)


@pytest.mark.parametrize("which", ["outside", "inside"])
def test_traffic_resumes_after_an_agent_restarts(lab, which, datapath):
    svc, out, ins, target, _ = start_pair(lab)
    with flowing(target) as log:
        resumes_after(log, 0)
        agent = out if which == "outside" else ins
        assert agent.stop() == 0  # SIGTERM: a clean exit
        t = time.monotonic()
        agent.start()
        took = resumes_after(log, t)
        print(f"traffic resumed {took * 1000:.0f} ms after the {which} agent restarted")
        if which == "outside":  # the tunnel was restored to its client: same service socket
            assert len(svc.sources_by_client()[b"flow"]) == 1


def test_an_outside_restart_at_the_default_keepalive_resumes_within_a_second(lab, tmp_path):
    """The restarted outside agent reads where its tunnels were and asks them to register now,
    instead of waiting up to 25 s for their next keepalive."""
    svc, out, ins, target, _ = start_pair(lab, t="25", outside_extra=["--state-file", str(tmp_path / "out.state")])
    with flowing(target) as log:
        resumes_after(log, 0)
        time.sleep(2.5)  # the state file is written every 2 s
        assert out.stop() == 0
        t = time.monotonic()
        out.start()
        took = resumes_after(log, t, timeout=30)
        print(f"traffic resumed {took * 1000:.0f} ms after the outside agent restarted (keepalive 25 s)")
        assert took < 1.0
        assert len(svc.sources_by_client()[b"flow"]) == 1  # its own tunnel, its own service socket


def test_forged_and_replayed_keepalives_never_receive_client_data(lab, datapath):
    svc, out, ins, target, nat = start_pair(lab, via="nat")
    assert converse(target, n_clients=2, per_client=3)["done"] == 2
    time.sleep(2.5)  # a few keepalive rounds to capture
    captured = [d for d in nat.captured if proto.is_control(d)]
    assert len(captured) >= 4
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    attacker_addr = f"127.0.0.1:{attacker.getsockname()[1]}"
    attacker.settimeout(0.2)
    forged = proto.Codec(b"not the key").encode(proto.Control(proto.KEEPALIVE, 0, 1, 2, 3))

    def attack_then_count_clients(n_clients: int) -> list[bytes]:
        for d in captured + [forged]:
            attacker.sendto(d, target)
        time.sleep(0.3)
        r = converse(target, n_clients=n_clients, per_client=3)
        assert r["done"] == n_clients and r["wrong"] == 0, r
        got = []
        while True:
            try:
                got.append(attacker.recv(65536))
            except TimeoutError:
                return got

    got = attack_then_count_clients(5)
    out.stop()
    out.start()  # right after a restart of the outside agent
    got += attack_then_count_clients(5)
    attacker.close()
    client_data = [d for d in got if not proto.is_control(d)]
    assert client_data == []
    # what the attacker got is challenges, which it cannot answer without the key
    assert all(proto.Codec(b"test-key").decode(d).type == proto.REPLY for d in got)
    st = out.wait_status(lambda s: s["stats"].get("drop_auth"))  # snapshots can be a second old
    assert attacker_addr not in [t["endpoint"] for t in st["tunnels"]]
    assert attacker_addr not in [t["client"] for t in st["tunnels"]]
    assert st["stats"].get("drop_auth", 0) >= 1 and st["stats"].get("challenges", 0) >= 1, st["stats"]


def test_out_of_sockets_the_inside_agent_keeps_serving_the_clients_it_has(lab):
    svc = lab.echo()
    port = free_port()
    lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1"])
    ins = lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1"], max_fds=40)
    first = converse_keep(("127.0.0.1", port), 8)
    flood = converse(("127.0.0.1", port), n_clients=40, per_client=1, timeout=3)
    assert flood["done"] < 40  # some new clients could not get a tunnel: no descriptors left
    for s, msg in first:  # the first clients go on, on their own tunnels
        s.send(msg)
        assert s.recv(2048) == msg
        s.close()
    assert ins.proc.poll() is None and "Too many open files" in ins.log()
    assert ins.status()["role"] == "inside"


def converse_keep(target, n: int) -> list:
    """n clients that each got one echo back; their sockets stay open."""
    out = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect(target)
        s.settimeout(0.3)
        msg = b"keep %d" % i
        for _ in range(20):
            s.send(msg)
            try:
                if s.recv(2048) == msg:
                    break
            except (TimeoutError, ConnectionRefusedError):
                continue
        else:
            raise AssertionError(f"client {i} got no echo")
        out.append((s, msg))
    return out


def test_inside_sockets_take_datagrams_only_from_their_own_peers(lab, datapath):
    svc, out, ins, target, _ = start_pair(lab)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.connect(target)
    c.settimeout(2)
    c.send(b"hello")
    assert c.recv(100) == b"hello"
    tunnels = out.wait_status(lambda s: s["clients"] == 1)["tunnels"]
    tunnel_ports = [int(t["endpoint"].rsplit(":", 1)[1]) for t in tunnels]
    service_side = svc.seen[0][0]  # the inside's service socket, as the service sees it
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    for port in tunnel_ports:  # pretending to be the outside agent
        stranger.sendto(b"to the service", ("127.0.0.1", port))
    stranger.sendto(b"to the client", service_side)  # pretending to be the service
    time.sleep(0.5)
    assert [d for _, d in svc.seen] == [b"hello"]
    c.settimeout(0.3)
    with pytest.raises(TimeoutError):
        c.recv(100)
    c.close()
    stranger.close()


def echoes(target: tuple, n: int, size: int = 64) -> int:
    """One client: n datagrams of `size` bytes, each sent once and its echo waited for (no resending:
    the counts below are exact). How many came back intact."""
    ok = 0
    with socket.socket(socket.AF_INET6 if ":" in target[0] else socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.connect(target)
        c.settimeout(5)
        for i in range(n):
            msg = b"echo %04d " % i + bytes(size - 10)
            c.send(msg)
            ok += c.recv(65536) == msg
    return ok


@pytest.mark.parametrize("host", HOSTS)
def test_status_counts_the_same_datagrams_and_bytes_with_either_path_and_the_kernel_carries_all_but_the_first(
        lab, host, datapath):
    """Status (and so expiry and the metrics) count what went through, whoever carried it. With the
    kernel path the agents' processes see at most the client's first datagram (it makes the tunnel);
    the programs relay everything else: 2n - 1 datagrams (or 2n) for n round trips."""
    svc, out, ins, target, _ = start_pair(lab, host)
    n, size = 50, 64
    assert echoes(target, n, size) == n
    want = {"datagrams_in": n, "bytes_in": n * size, "datagrams_out": n, "bytes_out": n * size}
    so = out.wait_status(lambda s: s["totals"] == want)
    si = ins.wait_status(lambda s: s["totals"] == want)
    [t] = [t for t in so["tunnels"] if t["state"] == "active"]
    assert (t["to_inside"]["datagrams"], t["to_inside"]["bytes"], t["to_client"]["datagrams"]) == (n, n * size, n)
    assert len(svc.seen) == n
    for s in (so, si):
        d = s["datapath"]
        assert d["path"] == datapath
        if datapath == "kernel":
            assert (d["mode"], d["flows"], d["kept_count"]) == ("kernel", 2, 0)
            # (at the inside the first datagram is the kernel's too when it arrives after its pipe was made)
            assert d["program"]["local"] in ((2 * n - 1,) if s is so else (2 * n - 1, 2 * n))
            assert d["program"]["relayed"] == 0
        else:
            assert (d["mode"], d["why"]) == ("user", "--datapath user") and "program" not in d
    from udp_tunnel.ops import metrics
    assert f'datapath="{datapath}"' in metrics.render(so)
