"""The I/O loop in-process: what it does when a handler fails."""

from __future__ import annotations

import io
import socket
import threading
import time

from udp_tunnel import proto
from udp_tunnel.log import INFO, Log
from udp_tunnel.loop import OutsideLoop
from udp_tunnel.outside import OutsideCore


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
    loop = OutsideLoop(core, sock, log)
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
