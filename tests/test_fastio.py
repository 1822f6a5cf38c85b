"""The batched I/O path (fastio) and the plain path it falls back to, both through the agents."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest

from agents import converse, free_port, hostport
from udp_tunnel.io import fastio

FAST = fastio.load() is not None
needs_fast = pytest.mark.skipif(not FAST, reason="no recvmmsg/sendmmsg through ctypes here")
PATHS = ["fast", "plain"] if FAST else ["plain"]


def pair(lab, host: str, path: str, t: str = "1"):
    extra = {"UDP_TUNNEL_PLAIN": "1"} if path == "plain" else {}
    svc = lab.echo(host)
    port = free_port(socket.AF_INET6 if ":" in host else socket.AF_INET)
    out = lab.agent("outside", ["-l", hostport(host, port), "-t", t], **extra)
    ins = lab.agent("inside", ["-s", svc.addr, "-o", hostport(host, port), "-t", t, "--spares", "4"], **extra)
    out.wait_status(lambda s: s["spares"] >= 1)
    return svc, out, ins, (host, port)


def gso_send(s: socket.socket, payload: bytes, seg: int) -> None:
    s.sendmsg([payload], [(fastio.SOL_UDP, fastio.UDP_SEGMENT, struct.pack("=H", seg))])


def udp_pair(family: int = socket.AF_INET):
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    a, b = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_DGRAM)
    a.bind((host, 0))
    b.bind((host, 0))
    a.connect(b.getsockname())
    return a, b


@needs_fast
def test_a_ring_takes_a_burst_in_one_call_with_lengths_and_the_senders_address():
    a, b = udp_pair()
    with a, b:
        for k in range(10):
            a.send(bytes([k]) * (10 + k))
        ring = fastio.Ring(fastio.load(), names=True)
        n = ring.recv(b.fileno(), fastio.MSG_DONTWAIT)
        assert n == 10
        for k in range(10):
            assert ring.length(k) == 10 + k
            assert bytes(ring.views[k][:10 + k]) == bytes([k]) * (10 + k)
            assert ring.segment(k) == 0
            raw = ring.name(k)
            assert raw == fastio.sockaddr(a.getsockname(), socket.AF_INET)
        assert ring.recv(b.fileno(), fastio.MSG_DONTWAIT) == -11  # EAGAIN, no exception


@needs_fast
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_batch_sends_equal_size_runs_as_gso_and_a_gro_socket_gets_them_as_one(family):
    lib = fastio.load()
    src, mid = udp_pair(family)
    _, dst = udp_pair(family)
    with src, mid, dst, _:
        assert fastio.enable_gro(dst)
        sizes = [1200] * 5 + [700] + [100] * 3 + [0, 0]
        for k, n in enumerate(sizes):
            src.send(bytes([k]) * n)
        ring = fastio.Ring(lib, names=True)
        assert ring.recv(mid.fileno(), fastio.MSG_DONTWAIT) == len(sizes)
        batch = fastio.Batch(lib, gso=True)
        d = fastio.dest(dst.getsockname(), family)
        for k, n in enumerate(sizes):
            batch.add(ring, k, n, 0, d)
        assert batch.nmsg == 5  # 5 x 1200, 1 x 700, 3 x 100 (each run one message), two empty ones
        errors: list = []
        batch.send(mid.fileno(), errors.append, lambda v, dst: errors.append("fallback"))
        assert errors == []
        ring2 = fastio.Ring(lib, names=False)
        got: list[bytes] = []
        deadline = time.monotonic() + 2
        while len(got) < len(sizes) and time.monotonic() < deadline:
            n = ring2.recv(dst.fileno(), fastio.MSG_DONTWAIT)
            for i in range(max(n, 0)):
                got += [bytes(v) for v in fastio.segments(ring2.views[i], ring2.length(i), ring2.segment(i))]
            time.sleep(0.01)
        assert got == [bytes([k]) * n for k, n in enumerate(sizes)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_both_paths_carry_many_clients_and_every_size(lab, host, path):
    svc, out, ins, target = pair(lab, host, path)
    r = converse(target, n_clients=30, per_client=10)
    assert r["done"] == 30 and r["complete"] == 300 and r["wrong"] == 0, r
    for size in (1, 1400, 9000, 65000 if host == "127.0.0.1" else 60000):
        r = converse(target, n_clients=2, per_client=3, size=size)
        assert r["done"] == 2 and r["wrong"] == 0, (size, r)


@needs_fast
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_gso_sending_client_gets_every_datagram_back_in_order_of_its_bytes(lab, host, path):
    svc, out, ins, target = pair(lab, host, path)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(fam, socket.SOCK_DGRAM)
    with c:
        c.connect(target)
        c.settimeout(0.2)
        c.send(b"hello")  # the first datagram takes the tunnel
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if c.recv(100) == b"hello":
                    break
            except TimeoutError:
                c.send(b"hello")
        sent = [bytes([k]) * 1000 for k in range(20)] + [b"tail"]
        gso_send(c, b"".join(sent), 1000)
        got: set[bytes] = set()
        deadline = time.monotonic() + 5
        while len(got) < len(sent) and time.monotonic() < deadline:
            try:
                got.add(c.recv(2000))
            except TimeoutError:
                pass
        assert got == set(sent)
    st = out.wait_status(lambda s: s["totals"]["datagrams_in"] >= 22)
    assert st["totals"]["datagrams_in"] == 22  # counted as datagrams, not as one run


@pytest.mark.parametrize("path", PATHS)
def test_an_idle_outside_agent_stops_at_once_on_sigterm(lab, path):
    svc, out, ins, target = pair(lab, "127.0.0.1", path, t="25")
    time.sleep(0.5)
    t0 = time.monotonic()
    rc = out.stop(signal.SIGTERM)
    assert rc == 0
    assert time.monotonic() - t0 < 1.5


def test_plain_path_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.setattr(fastio, "_lib", None)
    monkeypatch.setitem(os.environ, "UDP_TUNNEL_PLAIN", "1")
    assert fastio.load() is None


@needs_fast
def test_a_gso_message_the_kernel_refuses_goes_out_datagram_by_datagram():
    import ctypes
    import errno

    real = fastio.load()

    class Refusing:  # a kernel without UDP GSO (or a device without checksum offload): EIO
        recvmmsg = real.recvmmsg

        @staticmethod
        def sendmmsg(fd, msgs, n, flags):
            ctypes.set_errno(errno.EIO)
            return -1

    a, b = udp_pair()
    with a, b:
        for k in range(4):
            a.send(bytes([k]) * 500)
        ring = fastio.Ring(real, names=False)
        assert ring.recv(b.fileno(), fastio.MSG_DONTWAIT) == 4
        batch = fastio.Batch(Refusing(), gso=True)
        for k in range(4):
            batch.add(ring, k, 500, 0, None)
        assert batch.nmsg == 1  # one run of four
        sent: list[bytes] = []
        errors: list = []
        batch.send(b.fileno(), errors.append, lambda v, dst: sent.append(bytes(v)))
        assert sent == [bytes([k]) * 500 for k in range(4)] and errors == []
        assert batch.gso_max == 0 and batch.nmsg == 0


def outside_loop(family: int, lib=None):
    """An outside loop on a real socket around a real core whose routes the test sets, and
    whose receive() only records what reached it."""
    from udp_tunnel.core.outside import OutsideCore
    from udp_tunnel.io.outside import FastOutsideLoop
    from udp_tunnel.ops.log import INFO, Log

    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    log = Log(INFO, __import__("io").StringIO())
    core = OutsideCore(secret=b"k", keepalive=5, max_clients=10, family=family, now=time.monotonic(), log=log)
    got: list = []
    core.receive = lambda data, src, now: got.append((data, src[:2]))
    loop = FastOutsideLoop(core, sock, log, lib or fastio.load())
    return loop, core, got


def route(core, src: socket.socket, dst: socket.socket) -> None:
    """src's datagrams go to dst (the route table's own method: it moves the version)."""
    core.routes.bind(src.getsockname(), dst.getsockname())


def drain(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(70000, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


@needs_fast
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_the_outside_batch_goes_on_in_place_in_order_with_runs_control_and_strangers_between(family):
    from udp_tunnel.wire import proto

    loop, core, got = outside_loop(family)
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(5)]
    a, b, t1, t2, stranger = socks
    try:
        for s in socks:
            s.bind((host, 0))
        route(core, a, t1)
        route(core, b, t2)
        dst = loop.sock.getsockname()
        sent = [(a, bytes([1]) * 100), (a, bytes([2]) * 100), (a, bytes([3]) * 100), (b, bytes([4]) * 100),
                (a, bytes([5]) * 100), (a, bytes([6]) * 130), (a, proto.MAGIC + b"C" * (proto.CTRL_LEN - 4)),
                (a, b"D" * proto.CTRL_LEN), (stranger, b"new"),
                (a, bytes([7]) * 100), (b, bytes([8]) * 100), (b, bytes([9]) * 100), (a, b""), (a, b"")]
        for s, data in sent:
            s.sendto(data, dst)
        time.sleep(0.05)
        loop._recv_batch(fastio.MSG_DONTWAIT)
        time.sleep(0.05)
        control = proto.MAGIC + b"C" * (proto.CTRL_LEN - 4)  # the core's; 120 bytes without the magic are data
        assert drain(t1) == [d for s, d in sent if s is a and d != control]
        assert drain(t2) == [d for s, d in sent if s is b]
        assert got == [(control, a.getsockname()[:2]), (b"new", stranger.getsockname()[:2])]
        assert core.routes.get(a.getsockname()).pkts == 9 and core.routes.get(b.getsockname()).pkts == 3
        # the route moves (NAT rebinding of a's tunnel): the next batch follows it
        core.routes.move_tunnel(a.getsockname(), t1.getsockname(), t2.getsockname())
        a.sendto(b"moved", dst)
        time.sleep(0.05)
        loop._recv_batch(fastio.MSG_DONTWAIT)
        time.sleep(0.05)
        assert drain(t2) == [b"moved"] and drain(t1) == []
    finally:
        for s in socks:
            s.close()
        loop.close()


@needs_fast
def test_the_outside_sends_a_refused_gso_run_datagram_by_datagram_and_stops_making_runs():
    import ctypes
    import errno

    real = fastio.load()

    class Refusing:  # sendmmsg of a kernel without UDP GSO: EIO for a message with UDP_SEGMENT
        recvmmsg = real.recvmmsg

        @staticmethod
        def sendmmsg(fd, msgs, n, flags):
            if ctypes.c_uint64.from_address(msgs + 8 * 5).value:  # msg_controllen of the first
                ctypes.set_errno(errno.EIO)
                return -1
            return real.sendmmsg(fd, msgs, n, flags)

    loop, core, got = outside_loop(socket.AF_INET, Refusing())
    a, t1 = udp_pair()
    try:
        route(core, a, t1)
        for k in range(4):
            a.sendto(bytes([k]) * 500, loop.sock.getsockname())
        time.sleep(0.05)
        loop._recv_batch(fastio.MSG_DONTWAIT)
        time.sleep(0.05)
        assert drain(t1) == [bytes([k]) * 500 for k in range(4)]
        assert loop.gso_max == 0 and loop.errors == {}
    finally:
        a.close()
        t1.close()
        loop.close()


@needs_fast
def test_a_connected_batch_goes_in_order_as_runs_of_equal_size_ending_at_a_shorter_datagram():
    lib = fastio.load()
    a, mid = udp_pair()
    out, b = udp_pair()
    with a, mid, out, b:
        b.setsockopt(fastio.SOL_UDP, fastio.UDP_GRO, 1)
        sizes = [100] * 5 + [60] + [200] * 3 + [300] + [50, 50] + [0, 0]
        sent = [bytes([k]) * n for k, n in enumerate(sizes)]
        for d in sent:
            a.send(d)
        ring = fastio.Ring(lib, names=False)
        assert ring.recv(mid.fileno(), fastio.MSG_DONTWAIT) == len(sizes)
        nbytes, failed = ring.send_runs(out.fileno(), len(sizes), fastio.SLOT)
        assert nbytes == sum(sizes) and failed == []
        time.sleep(0.05)
        runs, got = [], []
        while True:
            try:
                data, anc, _, _ = b.recvmsg(70000, 64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            seg = struct.unpack("=i", anc[0][2][:4])[0] if anc else len(data)
            runs.append((len(data), seg))
            got += [data[o:o + seg] for o in range(0, len(data), seg)] if data else [data]
        assert got == sent
        # as the kernel kept the GSO messages; empty datagrams never join a run
        assert runs == [(560, 100), (600, 200), (350, 300), (50, 50), (0, 0), (0, 0)]
        # with runs off, each datagram is a message of its own
        for d in sent:
            a.send(d)
        time.sleep(0.05)
        assert ring.recv(mid.fileno(), fastio.MSG_DONTWAIT) == len(sizes)
        assert ring.send_runs(out.fileno(), len(sizes), 0) == (sum(sizes), [])
        time.sleep(0.05)
        assert [b.recv(1000) for _ in sizes] == sent


@needs_fast
def test_a_refused_gso_run_comes_back_from_send_runs_with_its_datagrams():
    import ctypes
    import errno

    real = fastio.load()

    class Refusing:  # a kernel without UDP GSO: sendmmsg stops at a message with UDP_SEGMENT
        recvmmsg = real.recvmmsg

        @staticmethod
        def sendmmsg(fd, msgs, n, flags):
            gso = [k for k in range(n) if ctypes.c_uint64.from_address(msgs + 64 * k + 8 * 5).value]
            if gso and gso[0] == 0:
                ctypes.set_errno(errno.EIO)
                return -1
            return real.sendmmsg(fd, msgs, gso[0] if gso else n, flags)

    a, mid = udp_pair()
    out, b = udp_pair()
    with a, mid, out, b:
        sent = [b"x" * 30] + [bytes([k]) * 500 for k in range(3)] + [b"y" * 40]
        for d in sent:
            a.send(d)
        ring = fastio.Ring(real, names=False)
        assert ring.recv(mid.fileno(), fastio.MSG_DONTWAIT) == 5
        ring.lib = Refusing()
        nbytes, failed = ring.send_runs(out.fileno(), 5, fastio.SLOT)
        # the shorter datagram ends the run of three 500-byte ones
        assert nbytes == sum(map(len, sent)) and failed == [(1, 4, 500, errno.EIO)]
        assert [bytes(v) for v in ring.parts(1, 4, 0)] == sent[1:]
        time.sleep(0.05)
        assert drain(b) == [sent[0]]  # the rest went
