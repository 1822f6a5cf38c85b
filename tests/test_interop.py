"""--legacy against the real C udp-tunnel 1.x (github.com/prof7bit/udp-reverse-tunnel),
on loopback: new clients arriving at once, each sending a few datagrams and waiting for
their echoes (resending every 0.3 s), all within 10 s, with the agents' keepalive
interval at the C tool's default 25 s, so that a new tunnel that waits for its next
keepalive (issue 16: the C inside's millisecond nonce) is seen as a client that never
completes. Runs only with C_TOOL=/path/to/the/C/udp-tunnel (a build of that tool);
tests/legacy_ref.py covers the same ground against our own reference of it."""

from __future__ import annotations

import os
import socket

import pytest

from agents import converse, free_port
from churn import CAgent

C_TOOL = os.environ.get("C_TOOL", "")
pytestmark = pytest.mark.skipif(not (C_TOOL and os.access(C_TOOL, os.X_OK)),
                                reason="C_TOOL is not set to the C udp-tunnel's executable "
                                       "(a build of github.com/prof7bit/udp-reverse-tunnel): no interop test")

KEY = "interop-key"
KEEPALIVE = "25"  # the C tool's default
PER_CLIENT = 3
WAIT = 10.0  # s for all clients to complete: well under one keepalive interval


@pytest.fixture
def c_agents(tmp_path):
    started: list[CAgent] = []

    def start(name: str, *args: str) -> CAgent:
        a = CAgent(name, [C_TOOL, *args, "-t", KEEPALIVE, "-k", KEY], tmp_path, max_fds=4096)
        started.append(a)
        return a
    yield start
    for a in reversed(started):
        a.stop()
        print(f"----- log of {a.name} -----\n{a.log()[-3000:]}")


def path_works(target: tuple[str, int], wait: float = 10.0) -> bool:
    """One client that sends until it is answered: the agents found each other."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(target)
        s.settimeout(0.2)
        for _ in range(int(wait / 0.2)):
            try:
                s.send(b"interop probe")
                if s.recv(2048) == b"interop probe":
                    return True
            except (TimeoutError, ConnectionRefusedError):
                pass
    return False


@pytest.mark.parametrize("clients", [5, 20])
def test_new_clients_at_once_all_complete_through_our_legacy_outside_and_the_c_inside(lab, c_agents, clients):
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", KEEPALIVE, "--legacy"], key=KEY)
    c_agents("c-inside", "-s", svc.addr, "-o", f"127.0.0.1:{port}")
    out.wait_status(lambda s: s["spares"] >= 1)
    r = converse(("127.0.0.1", port), n_clients=clients, per_client=PER_CLIENT, timeout=WAIT)
    assert (r["done"], r["complete"], r["wrong"]) == (clients, clients * PER_CLIENT, 0), str(r)
    assert len(svc.sources_by_client()) == clients  # each client reached the service from a socket of its own
    assert all(len(v) == 1 for v in svc.sources_by_client().values())


@pytest.mark.parametrize("clients", [5, 20])
def test_new_clients_at_once_all_complete_through_the_c_outside_and_our_legacy_inside(lab, c_agents, clients):
    svc = lab.echo()
    port = free_port()
    c_agents("c-outside", "-l", str(port))
    lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", KEEPALIVE, "--legacy"], key=KEY)
    assert path_works(("127.0.0.1", port))
    r = converse(("127.0.0.1", port), n_clients=clients, per_client=PER_CLIENT, timeout=WAIT)
    assert (r["done"], r["complete"], r["wrong"]) == (clients, clients * PER_CLIENT, 0), str(r)
    assert len(svc.sources_by_client()) == clients + 1  # and the probe
    assert all(len(v) == 1 for v in svc.sources_by_client().values())
