"""Prometheus metrics (text exposition format 0.0.4) over HTTP.

The text is made here from the published snapshot, so the agent needs no
third-party package; the tests check it with prometheus_client's parser. The
HTTP server is a small one of its own (MetricsServer): one thread, a bounded
number of connections and deadlines, so that idle or slow clients cannot
take threads or descriptors from the agent.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time

from udp_tunnel.core import counters

PREFIX = "udp_tunnel_"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metric(out: list[str], name: str, kind: str, help_: str, samples) -> None:
    out.append(f"# HELP {PREFIX}{name} {help_}")
    out.append(f"# TYPE {PREFIX}{name} {kind}")
    for labels, value in samples:
        lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
        out.append(f"{PREFIX}{name}{{{lab}}} {value}" if lab else f"{PREFIX}{name} {value}")


def render(s: dict) -> str:
    out: list[str] = []
    _agent(out, s)
    _counters(out, s)
    if s.get("services"):
        _services(out, s)
    if s.get("wireguard"):
        _wireguard(out, s)
    if s["role"] == "inside":
        _inside(out, s)
    return "\n".join(out) + "\n"


def _agent(out: list[str], s: dict) -> None:
    tot = s.get("totals", {})
    dp = s.get("datapath") or {}
    _metric(out, "info", "gauge", "Agent role, protocol, version and data path (kernel or user).",
            [({"role": s["role"], "protocol": s["protocol"], "version": s.get("version", ""),
               "datapath": dp.get("path", "user")}, 1)])
    if dp.get("path") == "kernel":
        _metric(out, "datapath_directions", "gauge", "Flow directions relayed by the kernel path's program "
                "(kernel) and kept in user space (user).",
                [({"where": "kernel"}, dp.get("flows", 0)), ({"where": "user"}, dp.get("kept_count", 0))])
        if dp.get("program"):
            _metric(out, "kernel_packets_total", "counter", "What the kernel path's program did with the packets "
                    "it saw, by reason (relayed, local: it relayed them; the others went to the stack as they were).",
                    [({"reason": k}, v) for k, v in sorted(dp["program"].items())])
    _metric(out, "uptime_seconds", "gauge", "Seconds since the agent started.", [({}, f"{s['uptime']:.3f}")])
    _metric(out, "tunnels", "gauge", "Tunnels by state.",
            [({"state": "active"}, s["clients"]), ({"state": "spare"}, s["spares"])])
    for unit in ("datagrams", "bytes"):
        _metric(out, f"{unit}_total", "counter",
                f"Data {unit} forwarded, towards the service (in) and back to clients (out).",
                [({"direction": "in"}, tot.get(f"{unit}_in", 0)), ({"direction": "out"}, tot.get(f"{unit}_out", 0))])


def _counters(out: list[str], s: dict) -> None:
    """Every counter of counters.py, by its name: drops by reason, events, errors by site."""
    st, role, wg = s["stats"], s["role"], s.get("wireguard")
    reasons = {r: 0 for r in counters.for_role(counters.DROPS, role) if wg or not r.startswith("wg_")}
    reasons["send_error"] = 0
    events = {e: 0 for e in counters.for_role(counters.EVENTS, role) if wg or not e.startswith("wg_")}
    errors: dict[tuple[str, str], int] = {}
    internal = 0
    for k, v in st.items():
        site_errno = counters.parse_error(k)
        if k.startswith("drop_"):
            reasons[k[5:]] = reasons.get(k[5:], 0) + v
        elif site_errno is not None:
            reasons["send_error"] += v  # a datagram lost to a network error
            errors[site_errno] = errors.get(site_errno, 0) + v
        elif k.startswith(counters.INTERNAL):
            internal += v
        else:
            events[k] = events.get(k, 0) + v
    _metric(out, "dropped_total", "counter", "Datagrams dropped, by reason.",
            [({"reason": r}, v) for r, v in sorted(reasons.items())])
    _metric(out, "events_total", "counter", "What happened, by event (udp-tunnel status names them too).",
            [({"event": e}, v) for e, v in sorted(events.items())])
    _metric(out, "network_errors_total", "counter", "Network errors, by where they happened and errno.",
            [({"site": site, "errno": name}, v) for (site, name), v in sorted(errors.items())])
    _metric(out, "internal_errors_total", "counter", "Bugs met by a datagram or event, contained.",
            [({}, internal)])
    _metric(out, "registrations_total", "counter", "Tunnel registrations accepted.",
            [({}, st.get("registrations", 0))])
    if role == "outside":
        _metric(out, "rebinds_total", "counter", "Tunnels that moved to a new public address (NAT rebinding).",
                [({}, st.get("rebinds", 0))])
        _metric(out, "challenges_total", "counter", "Registration challenges sent.",
                [({}, st.get("challenges", 0))])


def _services(out: list[str], s: dict) -> None:
    svc = s["services"]
    _metric(out, "service_clients", "gauge", "Clients (tunnels in use), by service.",
            [({"service": name}, v["clients"]) for name, v in svc.items()])
    if s["role"] == "outside":
        for unit in ("datagrams", "bytes"):
            _metric(out, f"service_{unit}_total", "counter", f"Data {unit} forwarded, by service and direction.",
                    [({"service": name, "direction": d}, v[f"{unit}_{d}"]) for name, v in svc.items()
                     for d in ("in", "out")])


def _wireguard(out: list[str], s: dict) -> None:
    wg = s["wireguard"]
    _metric(out, "wireguard_clients", "gauge",
            "Clients by how they were admitted (WireGuard handshake, or bound again after a restart).",
            [({"admitted": k}, wg["clients"].get(k, 0)) for k in ("handshake", "restored")])
    _metric(out, "wireguard_sessions", "gauge", "WireGuard session indices known for roaming.",
            [({}, wg["sessions"])])
    _metric(out, "wireguard_roams_total", "counter", "WireGuard clients whose tunnel followed them "
            "to a new address.", [({}, s["stats"].get("wg_roams", 0))])


def _inside(out: list[str], s: dict) -> None:
    rtts = [t["rtt"] for t in s["tunnels"] if t["rtt"] is not None and t["registered"]]
    if rtts:
        _metric(out, "keepalive_rtt_seconds", "gauge", "Keepalive round-trip time to the outside agent.",
                [({"stat": "min"}, f"{min(rtts):.6f}"), ({"stat": "avg"}, f"{sum(rtts) / len(rtts):.6f}"),
                 ({"stat": "max"}, f"{max(rtts):.6f}")])
    _metric(out, "outside_up", "gauge", "1 while the outside agent answers keepalives.",
            [({}, int(bool(s["outside_answering"])))])
    _metric(out, "outside_restarts_total", "counter", "Restarts of the outside agent seen.",
            [({}, s["stats"].get("outside_restarts", 0))])
    k = s.get("keepalive")
    if k:
        _metric(out, "keepalive_interval_seconds", "gauge", "Keepalive interval in use (learned, at most -t).",
                [({}, f"{k['interval']:.3f}")])
        bounds = [({"bound": b}, f"{k[b]:.3f}") for b in ("survived", "lapsed") if k.get(b)]
        if bounds:
            _metric(out, "nat_mapping_idle_seconds", "gauge",
                    "Longest idle a NAT mapping survived, shortest after which one lapsed.", bounds)
        _metric(out, "nat_mapping_lapses_total", "counter", "NAT mappings seen to lapse.",
                [({}, k.get("lapses", 0))])


# The HTTP server is one thread with a fixed number of descriptors, whatever its clients do:
# at most MAX_CONNECTIONS open at once (a new one closes the oldest still being read), each
# must send its request head (at most MAX_REQUEST bytes) within REQUEST_TIMEOUT seconds and
# take the answer within SEND_TIMEOUT seconds. One request per connection (Connection: close).
# There is no authentication: bind it to localhost or a private address (README).
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
MAX_REQUEST = 8192


class _Conn:
    __slots__ = ("sock", "data", "out", "deadline", "since")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.data = bytearray()
        self.out: memoryview | None = None  # the answer being sent; None while reading
        self.deadline = now + REQUEST_TIMEOUT
        self.since = now


def _answer(code: int, reason: str, body: bytes, ctype: str = "text/plain; charset=utf-8",
            extra: str = "") -> bytes:
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


class MetricsServer:
    """Prometheus metrics at http://ADDR/metrics (and /), served by one thread."""

    def __init__(self, addr: tuple[str, int], loop) -> None:
        self.loop = loop
        fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            self.sock.listen(128)  # waiting in the kernel's queue costs the agent nothing
            self.sock.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            self.sock.close()
            raise
        self._wake_r.setblocking(False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.conns: dict[int, _Conn] = {}
        self.accept_paused_until = 0.0
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        self.thread.start()

    # --- the thread ---

    def _serve(self) -> None:
        try:
            while not self.stopping:
                now = time.monotonic()
                wait = 1.0
                if self.conns:
                    wait = max(0.0, min(wait, min(c.deadline for c in self.conns.values()) - now))
                if self.accept_paused_until:
                    wait = max(0.0, min(wait, self.accept_paused_until - now))
                for key, _ in self.sel.select(wait):
                    if key.data is None:
                        self._accept()
                    elif key.data == "wake":
                        return
                    else:
                        try:
                            self._on_conn(key.data)
                        except Exception:  # a bug must cost one connection, not the metrics of the agent
                            self._close(key.data)
                now = time.monotonic()
                for c in [c for c in self.conns.values() if now >= c.deadline]:
                    self._close(c)  # too slow to ask, or to take the answer
                if self.accept_paused_until and now >= self.accept_paused_until:
                    self.accept_paused_until = 0.0
                    self.sel.register(self.sock, selectors.EVENT_READ, None)
        except OSError:  # the selector itself failed: metrics stop, the agent goes on
            pass
        finally:
            for c in list(self.conns.values()):
                self._close(c)

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors (EMFILE) or the like: stop accepting for a moment
                self.sel.unregister(self.sock)
                self.accept_paused_until = time.monotonic() + 0.2
                return
            now = time.monotonic()
            if len(self.conns) >= MAX_CONNECTIONS:
                reading = [c for c in self.conns.values() if c.out is None] or list(self.conns.values())
                self._close(min(reading, key=lambda c: c.since))
            sock.setblocking(False)
            c = _Conn(sock, now)
            self.conns[sock.fileno()] = c
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _close(self, c: _Conn) -> None:
        fd = c.sock.fileno()
        if self.conns.pop(fd, None) is not None:
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()

    def _on_conn(self, c: _Conn) -> None:
        try:
            if c.out is None:
                got = c.sock.recv(4096)
                if not got:
                    self._close(c)
                    return
                c.data += got
                end = c.data.find(b"\r\n\r\n")
                if end < 0:
                    end = c.data.find(b"\n\n")
                if end < 0:
                    if len(c.data) > MAX_REQUEST:
                        self._reply(c, _answer(431, "Request Header Fields Too Large", b"request too large\n"))
                    return
                self._reply(c, self._respond(bytes(c.data[:end])))
            if c.out is not None:
                sent = c.sock.send(c.out)
                c.out = c.out[sent:]
                if not c.out:
                    self._close(c)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(c)

    def _reply(self, c: _Conn, data: bytes) -> None:
        c.out = memoryview(data)
        c.deadline = time.monotonic() + SEND_TIMEOUT
        self.sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def _respond(self, head: bytes) -> bytes:
        parts = head.split(b"\n", 1)[0].strip().split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _answer(400, "Bad Request", b"bad request\n")
        method, target = parts[0], parts[1]
        if method != b"GET":
            return _answer(405, "Method Not Allowed", b"only GET\n", extra="Allow: GET\r\n")
        if target.split(b"?")[0] not in (b"/metrics", b"/"):
            return _answer(404, "Not Found", b"not found: try /metrics\n")
        try:
            with self.loop.snapshot_lock:
                body = render(self.loop.snapshot).encode()
        except Exception:  # a snapshot this version cannot render: say so, keep serving
            return _answer(500, "Internal Server Error", b"cannot render the metrics\n")
        return _answer(200, "OK", body, "text/plain; version=0.0.4; charset=utf-8")

    def close(self) -> None:
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self.thread.join(2.0)
        self.sel.close()
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()
