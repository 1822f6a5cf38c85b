"""Prometheus metrics (text exposition format 0.0.4) over HTTP.

The text is made here from the published snapshot, so the agent needs no
third-party package; the tests check it with prometheus_client's parser.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
    st, tot = s["stats"], s.get("totals", {})
    out: list[str] = []
    _metric(out, "info", "gauge", "Agent role, protocol and version.",
            [({"role": s["role"], "protocol": s["protocol"], "version": s.get("version", "")}, 1)])
    _metric(out, "uptime_seconds", "gauge", "Seconds since the agent started.", [({}, f"{s['uptime']:.3f}")])
    _metric(out, "tunnels", "gauge", "Tunnels by state.",
            [({"state": "active"}, s["clients"]), ({"state": "spare"}, s["spares"])])
    for unit in ("datagrams", "bytes"):
        _metric(out, f"{unit}_total", "counter",
                f"Data {unit} forwarded, towards the service (in) and back to clients (out).",
                [({"direction": "in"}, tot.get(f"{unit}_in", 0)), ({"direction": "out"}, tot.get(f"{unit}_out", 0))])
    reasons = {"no_spare": 0, "limit": 0, "auth": 0, "malformed": 0, "replay": 0, "send_error": 0}
    wg = s.get("wireguard")  # outside with --wireguard-key
    if wg:
        reasons.update(wg_not_handshake=0, wg_bad_mac1=0, wg_unknown_session=0, wg_replay=0)
    for k, v in st.items():
        if k.startswith("drop_"):
            reasons[k[5:]] = reasons.get(k[5:], 0) + v
        elif k.startswith(("send_", "tunnel_", "service_", "receive_", "to_service_")):
            reasons["send_error"] += v
    _metric(out, "dropped_total", "counter", "Datagrams dropped, by reason.",
            [({"reason": r}, v) for r, v in sorted(reasons.items())])
    _metric(out, "registrations_total", "counter", "Tunnel registrations accepted.",
            [({}, st.get("registrations", 0))])
    _metric(out, "rebinds_total", "counter", "Tunnels that moved to a new public address (NAT rebinding).",
            [({}, st.get("rebinds", 0))])
    _metric(out, "challenges_total", "counter", "Registration challenges sent.", [({}, st.get("challenges", 0))])
    if wg:
        _metric(out, "wireguard_clients", "gauge",
                "Clients by how they were admitted (WireGuard handshake, or bound again after a restart).",
                [({"admitted": k}, wg["clients"].get(k, 0)) for k in ("handshake", "restored")])
        _metric(out, "wireguard_sessions", "gauge", "WireGuard session indices known for roaming.",
                [({}, wg["sessions"])])
        _metric(out, "wireguard_roams_total", "counter", "WireGuard clients whose tunnel followed them "
                "to a new address.", [({}, st.get("wg_roams", 0))])
    if s["role"] == "inside":
        rtts = [t["rtt"] for t in s["tunnels"] if t["rtt"] is not None and t["registered"]]
        if rtts:
            _metric(out, "keepalive_rtt_seconds", "gauge", "Keepalive round-trip time to the outside agent.",
                    [({"stat": "min"}, f"{min(rtts):.6f}"), ({"stat": "avg"}, f"{sum(rtts) / len(rtts):.6f}"),
                     ({"stat": "max"}, f"{max(rtts):.6f}")])
        _metric(out, "outside_up", "gauge", "1 while the outside agent answers keepalives.",
                [({}, int(bool(s["outside_answering"])))])
        _metric(out, "outside_restarts_total", "counter", "Restarts of the outside agent seen.",
                [({}, st.get("outside_restarts", 0))])
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
    return "\n".join(out) + "\n"


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
