"""The I/O loop in-process: what it does when a handler fails, and its timer under traffic."""

from __future__ import annotations

import io
import socket
import threading
import time

from sim import register_tunnel
from udp_tunnel.core.outside import OutsideCore
from udp_tunnel.io.outside import outside_loop
from udp_tunnel.ops.log import INFO, Log
from udp_tunnel.wire import proto


def test_an_exception_in_a_handler_is_contained_logged_with_its_traceback_once_and_counted():
    stream = io.StringIO()
    log = Log(INFO, stream)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    addr = sock.getsockname()
    core = OutsideCore(secret=b"k", keepalive=5, max_clients=10, family=socket.AF_INET,
                       now=time.monotonic(), log=log)
    real = core.receive

    def receive(data, src, now):  # a bug that one kind of datagram trips
        if data == b"poison":
            raise RuntimeError("a bug met a datagram")
        real(data, src, now)

    core.receive = receive
    loop = outside_loop(core, sock, log)
    result = {}

    def drive() -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(3)
                for _ in range(3):
                    c.sendto(b"poison", addr)
                    time.sleep(0.1)
                # still serving: a keepalive gets its challenge
                c.sendto(proto.Codec(b"k").encode(proto.Control(proto.KEEPALIVE, 0, 1, 2, 3)), addr)
                result["reply"] = c.recv(500)
        finally:
            loop.stopping = True

    th = threading.Thread(target=drive, daemon=True)
    th.start()
    assert loop.run() == 0
    th.join(5)
    assert proto.is_control(result.get("reply", b""))
    assert loop.errors["internal_RuntimeError"] == 3
    text = stream.getvalue()
    assert text.count("Traceback") == 1 and "a bug met a datagram" in text


def test_steady_traffic_forwarded_by_the_outside_fast_path_does_not_starve_the_timer():
    """The outside's single-receive loop forwards without returning to the main loop; the
    core's once-a-second timer must still run while a flow sends every 10 ms."""
    log = Log(INFO, io.StringIO())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    core = OutsideCore(secret=b"k", keepalive=5, max_clients=10, family=socket.AF_INET,
                       now=time.monotonic(), log=log)
    ticks: list[float] = []
    real = core.on_timer
    core.on_timer = lambda now: (ticks.append(now), real(now))
    loop = outside_loop(core, sock, log)
    client, tunnel = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    for s in (client, tunnel):
        s.bind(("127.0.0.1", 0))
    register_tunnel(core, tunnel.getsockname(), time.monotonic())  # the next client takes it
    sent = []

    def drive() -> None:
        try:
            time.sleep(0.3)
            del ticks[:]
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                client.sendto(b"data", sock.getsockname())
                sent.append(time.monotonic())
                time.sleep(0.01)
        finally:
            loop.stopping = True

    th = threading.Thread(target=drive, daemon=True)
    th.start()
    try:
        assert loop.run() == 0
        th.join(5)
        flow = core.routes.get(client.getsockname())
    finally:
        client.close()
    got = 0
    tunnel.setblocking(False)
    try:
        while True:
            d = tunnel.recv(200)
            if not proto.is_control(d):  # (the client's ANNOUNCE came first)
                assert d == b"data"
                got += 1
    except BlockingIOError:
        pass
    tunnel.close()
    assert got == len(sent) > 100  # all forwarded (all but the first, which bound it, on the fast path)
    assert not loop.batched and flow.pkts == got
    assert len(ticks) >= 2  # about one a second while the traffic went on


def test_a_failing_kernel_path_is_counted_and_the_timer_and_status_go_on():
    """bpf(2) failing while the loop reads the kernel path's counters (before the timer and
    before a status snapshot): counted as an internal error; the core's timer still runs and
    status still answers."""
    from udp_tunnel.io.bpf import BpfError

    class Failing:
        def count(self) -> None:
            raise BpfError(12, "reading a map")  # ENOMEM

    log = Log(INFO, io.StringIO())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    core = OutsideCore(secret=b"k", keepalive=5, max_clients=10, family=socket.AF_INET,
                       now=time.monotonic(), log=log)
    ticks: list[float] = []
    real = core.on_timer
    core.on_timer = lambda now: (ticks.append(now), real(now))
    loop = outside_loop(core, sock, log)
    loop.kernel = Failing()
    snaps = []

    def drive() -> None:
        try:
            time.sleep(2.5)
            snaps.append(loop.snapshot)  # a status request, from another thread
        finally:
            loop.stopping = True
            loop.poke()

    th = threading.Thread(target=drive, daemon=True)
    th.start()
    assert loop.run() == 0
    th.join(5)
    assert len(ticks) >= 2  # once a second
    assert snaps and snaps[0]["role"] == "outside"
    # every tick, the first publish and the status request's publish each met the failure once
    assert loop.errors["internal_BpfError"] == len(ticks) + 2
