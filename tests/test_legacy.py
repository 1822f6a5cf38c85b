"""--legacy against a reference of the C tool (tests/legacy_ref.py), on loopback."""

from __future__ import annotations

import socket

import pytest

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


@pytest.mark.parametrize("n", [5, 20])
def test_new_clients_at_once_all_get_a_spare_of_the_c_tools_inside_whose_nonce_is_its_millisecond_clock(lab, n):
    """The reference inside opens its next spare the moment a datagram arrives, with a keepalive
    nonce of the current millisecond; our outside must not hand it data within the millisecond of
    the spare's own keepalive, or that next keepalive repeats the nonce and is refused (and, at
    -t 25, the spare is missing for 25 s)."""
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "--legacy"], key="pw")
    ref = LegacyInside(("127.0.0.1", port), svc.sock.getsockname(), b"pw", 25.0)
    try:
        out.wait_status(lambda s: s["spares"] >= 1)
        r = converse(("127.0.0.1", port), n_clients=n, per_client=3, timeout=5, retry=10)
        assert (r["done"], r["wrong"], r["resent"]) == (n, 0, 0), r
        assert len(svc.sources_by_client()) == n
        st = out.status()
        assert st["stats"].get("drop_replay", 0) == 0
    finally:
        ref.close()
