"""--legacy against a reference of the C tool (tests/legacy_ref.py), on loopback."""

from __future__ import annotations

import socket

from agents import converse, free_port
from legacy_ref import LegacyInside, LegacyOutside


def test_our_outside_serves_the_c_tools_inside_agent(lab):
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1", "--legacy"], key="pw")
    ref = LegacyInside(("127.0.0.1", port), svc.sock.getsockname(), b"pw", 1.0)
    try:
        out.wait_status(lambda s: s["spares"] >= 1)
        r = converse(("127.0.0.1", port), n_clients=10, per_client=10)
        assert r["done"] == 10 and r["wrong"] == 0, r
        assert len(svc.sources_by_client()) == 10
        st = out.wait_status(lambda s: s["clients"] == 10)
        assert st["protocol"] == "legacy"
    finally:
        ref.close()


def test_our_inside_works_with_the_c_tools_outside_agent(lab):
    svc = lab.echo()
    port = free_port()
    ref = LegacyOutside(port, b"pw", 1.0)
    try:
        lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1", "--legacy"], key="pw")
        r = converse(("127.0.0.1", port), n_clients=10, per_client=10, timeout=30)
        assert r["done"] == 10 and r["wrong"] == 0, r
        assert len(ref.tunnels) >= 11  # ten in use, and a spare
    finally:
        ref.close()


def test_legacy_outside_refuses_a_keepalive_captured_long_ago(lab):
    """After a restart the C tool takes any old capture; our --legacy checks the clock."""
    import hashlib
    import struct
    import time
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1", "--legacy"], key="pw")
    n = struct.pack("<Q", int((time.time() - 86400) * 1000))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(n + hashlib.sha256(b"pw" + n).digest(), ("127.0.0.1", port))
    st = out.wait_status(lambda s: s["stats"].get("drop_clock", 0) == 1)
    assert st["spares"] == 0
