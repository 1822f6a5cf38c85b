"""The inside agent's loop in-process, on both paths: real sockets to an outside agent (its
plain loop, driven in a thread) and to an echo service."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest

from udp_tunnel.core.inside import InsideCore
from udp_tunnel.core.outside import OutsideCore
from udp_tunnel.io import fastio
from udp_tunnel.io.inside import FastInsideLoop, PlainInsideLoop, inside_loop
from udp_tunnel.io.outside import PlainOutsideLoop
from udp_tunnel.ops.log import DEBUG, Log


def echo(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(65536)
        except TimeoutError:
            continue
        sock.sendto(data, addr)


def drive_outside(loop: PlainOutsideLoop, stop: threading.Event) -> None:
    """The outside's plain loop, without run() (signals are the main thread's)."""
    now = time.monotonic()
    while not stop.is_set():
        now = loop.wait(max(0.0, min(0.05, loop.core.next_timer() - now)))
        if now >= loop.core.next_timer():
            loop.tick(now)


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_the_inside_loop_carries_clients_both_ways_counts_them_and_closes_its_tunnels_when_it_stops(path):
    if path == "fast" and fastio.load() is None:
        pytest.skip("no recvmmsg/sendmmsg here")
    log = Log(DEBUG, io.StringIO())
    now = time.monotonic()
    stop = threading.Event()
    osock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    osock.bind(("127.0.0.1", 0))
    ocore = OutsideCore(secret=b"k", keepalive=5, max_clients=10, family=socket.AF_INET, now=now, log=log)
    outside = PlainOutsideLoop(ocore, osock, log)
    svc = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    svc.bind(("127.0.0.1", 0))
    icore = InsideCore(secret=b"k", keepalive=5, timeout=30, spares=2, max_clients=10, now=now, log=log)
    icore.start(now)
    inside = inside_loop(icore, osock.getsockname(), (socket.AF_INET, osock.getsockname()),
                         (socket.AF_INET, svc.getsockname()), log, plain=path == "plain")
    assert type(inside) is (PlainInsideLoop if path == "plain" else FastInsideLoop)
    threads = [threading.Thread(target=echo, args=(svc, stop), daemon=True),
               threading.Thread(target=drive_outside, args=(outside, stop), daemon=True)]
    result: dict = {}

    def clients() -> None:
        try:
            deadline = time.monotonic() + 5
            while len(ocore.spares) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            got = []
            for c in range(3):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.settimeout(2)
                    s.connect(osock.getsockname())
                    for k in range(20):
                        s.send(b"client %d datagram %d " % (c, k) + bytes(k))
                        got.append(s.recv(65536))
            result["got"] = got
        finally:
            inside.stopping = True

    for th in threads:
        th.start()
    driver = threading.Thread(target=clients, daemon=True)
    driver.start()
    try:
        assert inside.run() == 0
        driver.join(5)
        sent = [b"client %d datagram %d " % (c, k) + bytes(k) for c in range(3) for k in range(20)]
        assert result.get("got") == sent
        totals = icore.snapshot(time.monotonic())["totals"]  # closed tunnels count on, as retired
        assert (totals["datagrams_in"], totals["datagrams_out"]) == (60, 60)
        assert totals["bytes_in"] == totals["bytes_out"] == sum(map(len, sent))
        assert inside.pipes == {}  # stopping closed every socket
        deadline = time.monotonic() + 3  # and told the outside, which forgets them at once
        while ocore.tunnels and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ocore.tunnels == {} and ocore.stats["registrations"] >= 5
    finally:
        stop.set()
        for th in threads:
            th.join(2)
        outside.close()
        svc.close()
