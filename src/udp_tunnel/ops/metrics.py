"""Prometheus metrics (text exposition format 0.0.4) over HTTP.

The text is made here from the published snapshot, so the agent needs no
third-party package; the tests check it with prometheus_client's parser.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    if s.get("wireguard"):
        _wireguard(out, s)
    if s["role"] == "inside":
        _inside(out, s)
    return "\n".join(out) + "\n"


def _agent(out: list[str], s: dict) -> None:
    tot = s.get("totals", {})
    _metric(out, "info", "gauge", "Agent role, protocol and version.",
            [({"role": s["role"], "protocol": s["protocol"], "version": s.get("version", "")}, 1)])
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


class MetricsServer:
    def __init__(self, addr: tuple[str, int], loop) -> None:
        snapshot = loop.snapshot_lock, lambda: loop.snapshot

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                with snapshot[0]:
                    body = render(snapshot[1]()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            daemon_threads = True

        self.httpd = Server(addr, Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
