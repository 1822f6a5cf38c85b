"""The --metrics HTTP server under idle, slow and odd clients (issue 17, item 9): a fixed budget
of one thread and a bounded number of descriptors, deadlines, and /metrics still answers."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request

import pytest

from agents import free_port
from udp_tunnel.ops import metrics

SNAPSHOT = {"role": "outside", "protocol": "v2", "version": "2.0.0", "uptime": 5.0, "clients": 1, "spares": 2,
            "stats": {"drop_auth": 3, "registrations": 4}, "totals": {"datagrams_in": 7}, "tunnels": []}


class FakeLoop:
    snapshot_lock = threading.Lock()
    snapshot = SNAPSHOT


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 1.0)
    srv = metrics.MetricsServer(("127.0.0.1", 0), FakeLoop())
    yield srv, srv.sock.getsockname()
    srv.close()


def ask(addr, request: bytes) -> bytes:
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_get_metrics_answers_the_prometheus_text_and_closes(server):
    _, addr = server
    body = metrics.render(SNAPSHOT).encode()
    assert ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    assert b'udp_tunnel_dropped_total{reason="auth"} 3\n' in body
    got = urllib.request.urlopen(f"http://127.0.0.1:{addr[1]}/?x=1", timeout=10)
    assert got.status == 200 and got.read() == body


@pytest.mark.parametrize("request_, status", [
    (b"GET /nothing HTTP/1.1\r\n\r\n", b"HTTP/1.1 404 Not Found\r\n"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 405 Method Not Allowed\r\n"),
    (b"hello\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 9000, b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
])
def test_other_requests_get_a_short_error_answer(server, request_, status):
    _, addr = server
    assert ask(addr, request_).startswith(status)


def test_a_client_that_trickles_its_request_is_cut_off_at_the_request_timeout(server):
    _, addr = server
    s = socket.create_connection(addr, timeout=10)
    s.sendall(b"GET /metrics HTTP/1.1\r\n")
    sent, cut = 0, False
    try:
        for _ in range(300):  # a header line every 0.1 s would go on for 30 s
            s.sendall(b"X-Slow: 1\r\n")
            sent += 1
            time.sleep(0.1)
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    cut = True
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
    except (ConnectionResetError, BrokenPipeError):
        cut = True
    finally:
        s.close()
    assert cut and sent < 300


def closed(s: socket.socket) -> bool:
    """The other end closed s (without waiting: s may have a timeout)."""
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        s.settimeout(10)


def threads_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def test_sixty_idle_connections_give_the_agent_no_thread_and_at_most_the_cap_of_descriptors(lab):
    port, mport = free_port(), free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "--metrics", f"127.0.0.1:{mport}"])
    url = f"http://127.0.0.1:{mport}/metrics"
    assert urllib.request.urlopen(url, timeout=10).status == 200
    threads0, fds0 = threads_and_fds(out.proc.pid)
    idle = [socket.create_connection(("127.0.0.1", mport), timeout=10) for _ in range(60)]
    try:
        evicted = 60 - metrics.MAX_CONNECTIONS  # the oldest idle ones make room for the newest
        deadline = time.monotonic() + 30
        while sum(closed(s) for s in idle) < evicted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(closed(s) for s in idle[:evicted])
        threads, fds = threads_and_fds(out.proc.pid)
        # (the newest may already be gone too: idle for REQUEST_TIMEOUT, they are closed)
        assert threads == threads0 and fds0 <= fds <= fds0 + metrics.MAX_CONNECTIONS, (threads, fds)
        body = urllib.request.urlopen(url, timeout=10).read().decode()  # still answers
        assert body.startswith("# HELP udp_tunnel_info ") and 'udp_tunnel_tunnels{state="spare"} 0\n' in body
    finally:
        for s in idle:
            s.close()
    assert out.proc.poll() is None and "Traceback" not in out.log()
