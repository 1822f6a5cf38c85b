"""`udp-tunnel status`: a running agent's view, served on a local Unix socket.

The agent publishes a snapshot of its state once a second; a thread answers
each connection on the control socket with that snapshot as one JSON
document. The socket is created owner-only (0600).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import sys
import threading
import time

DEFAULT_GLOB = "/run/udp-tunnel*/control.sock"


def leg(datagrams: int, nbytes: int, last: float | None, now: float) -> dict:
    """One direction of a tunnel's traffic, as snapshots show it."""
    return {"datagrams": datagrams, "bytes": nbytes, "last": None if last is None else now - last}


class ControlServer:
    def __init__(self, path: str, loop) -> None:
        self.path = path
        self.loop = loop
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left over by an agent that is gone
            else:
                raise OSError(0, f"another agent is serving {path}")
            finally:
                probe.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        # One descriptor held in reserve, so that status still answers when the agent
        # has run out of them (EMFILE): that is when an operator most wants to look.
        reserve: int | None = os.open(os.devnull, os.O_RDONLY)
        try:
            while not self.stopping:
                try:
                    conn, _ = self.sock.accept()
                except TimeoutError:
                    continue
                except OSError as e:
                    if self.stopping:
                        return
                    if e.errno == errno.EMFILE and reserve is not None:
                        os.close(reserve)
                        reserve = None
                    else:
                        time.sleep(0.1)
                    continue
                with conn:
                    conn.settimeout(2.0)
                    with self.loop.snapshot_lock:
                        snap = self.loop.snapshot
                    try:
                        conn.sendall(json.dumps(snap).encode() + b"\n")
                    except OSError:
                        pass
                if reserve is None:
                    try:
                        reserve = os.open(os.devnull, os.O_RDONLY)
                    except OSError:
                        pass
        finally:
            if reserve is not None:
                os.close(reserve)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2.0)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def query(path: str, timeout: float = 3.0) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    return json.loads(b"".join(chunks))


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def render(s: dict) -> str:
    """The snapshot as text, in the spirit of `wg show`."""
    inside = s["role"] == "inside"
    lines = [f"agent: {s['role']} (udp-tunnel {s.get('version', '?')}, pid {s.get('pid', '?')})"]
    for key in ("listen", "service", "outside"):
        if s.get(key):
            lines.append(f"  {key}: {s[key]}")
    lines.append(f"  protocol: {s['protocol']}")
    wg = s.get("wireguard")  # outside with --wireguard-key
    if wg:
        lines.append(f"  wireguard: admitting only handshakes valid for {wg['keys']} server key"
                     f"{'s' if wg['keys'] > 1 else ''}; {wg['sessions']} session(s) known for roaming")
    lines.append(f"  key: {'set' if s.get('key') else 'NOT set (keepalives are not authenticated)'}")
    lines.append(f"  uptime: {ago(s['uptime'])}")
    lines.append(f"  tunnels: {s['clients']} active, {s['spares']} spare")
    if inside:
        lines.append(f"  outside agent answering: {'yes' if s['outside_answering'] else 'NO'}")
    tot = s.get("totals", {})
    lines.append(f"  transfer: {tot.get('datagrams_in', 0)} datagrams ({size(tot.get('bytes_in', 0))}) towards "
                 f"the service, {tot.get('datagrams_out', 0)} ({size(tot.get('bytes_out', 0))}) back")
    drops = {k[5:]: v for k, v in sorted(s["stats"].items()) if k.startswith("drop_") and v}
    if drops:
        lines.append("  dropped: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in drops.items()))
    other = {k: v for k, v in sorted(s["stats"].items()) if not k.startswith("drop_") and v}
    if other:
        lines.append("  events: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in other.items()))
    for t in sorted(s["tunnels"], key=lambda t: (t["state"] != "active", t["age"])):
        lines.append("")
        lines.append(f"tunnel: {t['id']} ({t['state']})")
        if t.get("client"):
            lines.append(f"  client: {t['client']}")
        if t.get("wireguard"):
            w = t["wireguard"]
            how = "WireGuard handshake" if w["admitted"] == "handshake" else \
                "bound again after a restart of this agent"
            lines.append(f"  admitted: {how}, roamed {w['roams']} time(s), sessions known: {w['sessions']}")
        if inside:
            lines.append(f"  registered: {'yes' if t['registered'] else 'NO'}"
                         + (f", {t['registrations']} time(s), last {ago(t['registered_ago'])} ago"
                            if t["registered_ago"] is not None else ""))
            if t["rtt"] is not None:
                lines.append(f"  keepalive round trip: {t['rtt'] * 1000:.1f} ms")
            legs = (("from outside", t["from_outside"]), ("to outside", t["to_outside"]))
        else:
            lines.append(f"  endpoint: {t['endpoint']}")
            lines.append(f"  last keepalive: {ago(t['last_keepalive'])} ago; registered here "
                         f"{ago(t['registered'])} ago, NAT rebindings: {t['rebinds']}")
            legs = (("to inside", t["to_inside"]), ("to client", t["to_client"]))
        lines.append(f"  age: {ago(t['age'])}")
        for name, leg in legs:
            last = f", last {ago(leg['last'])} ago" if leg["last"] is not None else ""
            lines.append(f"  {name}: {leg['datagrams']} datagrams, {size(leg['bytes'])}{last}")
    return "\n".join(lines)


def status_command(argv: list[str]) -> int:
    from udp_tunnel.cli import Parser, UsageError  # noqa: F401 (UsageError travels up)

    p = Parser(prog="udp-tunnel status", description="Show a running agent's tunnels.")
    p.add_argument("--control", metavar="PATH", help=f"the agent's control socket (default: {DEFAULT_GLOB})")
    p.add_argument("--json", action="store_true", help="print the raw JSON document")
    a = p.parse_args(argv)
    paths = [a.control] if a.control else sorted(glob.glob(DEFAULT_GLOB))
    if not paths:
        print("udp-tunnel: no running agent found under /run (give --control PATH)", file=sys.stderr)
        return 1
    docs = []
    for path in paths:
        try:
            docs.append(query(path))
        except (OSError, ValueError) as e:
            print(f"udp-tunnel: cannot ask the agent at {path}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            return 1
    if a.json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        print("\n\n".join(render(d) for d in docs))
    return 0
