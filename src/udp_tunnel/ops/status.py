"""`udp-tunnel status`: a running agent's view, served on a local Unix socket.

The agent publishes a snapshot of its state once a second; a thread answers
each connection on the control socket with that snapshot as one JSON
document. The socket is created owner-only (0600).

Where the sockets are: under systemd `$RUNTIME_DIRECTORY/control.sock` (the
units' /run/udp-tunnel-outside, /run/udp-tunnel-inside); otherwise
`NAME.sock` in runtime_dir(): `$XDG_RUNTIME_DIR/udp-tunnel`, else
/run/udp-tunnel as root, else /tmp/udp-tunnel-UID; each a 0700 directory
of its user. `udp-tunnel status` looks in all of them.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import stat
import sys
import threading
import time

UNIT_GLOB = "/run/udp-tunnel*/control.sock"
ROOT_DIR = "/run/udp-tunnel"


def runtime_dir() -> str:
    """This user's directory for the control sockets of agents started by hand."""
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg.startswith("/") and os.path.isdir(xdg):
        return os.path.join(xdg, "udp-tunnel")
    if os.geteuid() == 0:
        return ROOT_DIR
    return f"/tmp/udp-tunnel-{os.geteuid()}"


def private_dir(path: str) -> str:
    """Make path a 0700 directory of ours, or make sure it is one (in /tmp anyone could
    have made it first)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise OSError(e.errno, f"cannot make {path}: {e.strerror} (give --control PATH, or --control none)") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise OSError(0, f"{path} is not a private directory of this user (owner uid {st.st_uid}, "
                         f"mode {stat.filemode(st.st_mode)}): remove it, or give --control PATH")
    return path


def _unlink_if_same(path: str, st: os.stat_result) -> None:
    """Remove path if it is still the very file st describes (not one made since)."""
    now = os.lstat(path)
    if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
        os.unlink(path)


def clear_stale(path: str) -> None:
    """Before serving at path: remove a socket nobody listens on; refuse anything else there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(0, f"{path} exists and is not a socket: remove it, or choose another --control")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        try:
            _unlink_if_same(path, st)  # left over by an agent that is gone
        except FileNotFoundError:
            pass
        except OSError as e:
            raise OSError(e.errno, f"cannot remove the stale socket {path}: {e.strerror}") from None
        return
    except TimeoutError:
        pass  # someone is listening, too busy to accept
    except OSError as e:
        raise OSError(e.errno, f"{path}: {e.strerror}") from None
    finally:
        probe.close()
    raise OSError(0, f"another agent is serving {path}: stop it, or give this one another --name or --control")


class ControlServer:
    def __init__(self, path: str, loop) -> None:
        self.path = path
        self.loop = loop
        clear_stale(path)
        # Listen under a temporary name, then link it into place: a socket found at path is
        # always listening or stale (never one about to listen), and link() fails if another
        # agent got there first.
        tmp = os.path.join(os.path.dirname(path), f".{os.getpid()}.tmp")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                self.sock.bind(tmp)
            except OSError as e:
                raise OSError(e.errno, f"{path}: {e.strerror or e}") from None
            finally:
                os.umask(old)
            try:
                os.chmod(tmp, 0o600)
                self.sock.listen(8)
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise OSError(0, f"another agent is serving {path}: stop it, or give this one "
                                     "another --name or --control") from None
                except OSError:
                    os.rename(tmp, path)  # a file system without hard links
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            self.ident = os.lstat(path)
        except BaseException:
            self.sock.close()
            raise
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
            _unlink_if_same(self.path, self.ident)
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


def keepalive_line(k: dict) -> str:
    """The keepalive interval in use and what was learned about the NATs' mapping lifetime."""
    known = []
    if k.get("survived"):
        known.append(f"NAT mappings survive {k['survived']:.1f} s idle")
    if k.get("lapsed"):
        known.append(f"lapse after {k['lapsed']:.1f} s")
    state = "learned" if k.get("learned") else "learning"
    return (f"every {k['interval']:.1f} s ({state}: {', '.join(known) or 'nothing yet'}; "
            f"at most {k['upper']:g} s; {k.get('lapses', 0)} mapping(s) lapsed)")


def render(s: dict) -> str:
    """The snapshot as text, in the spirit of `wg show`."""
    inside = s["role"] == "inside"
    lines = [f"agent: {s['role']} (udp-tunnel {s.get('version', '?')}, pid {s.get('pid', '?')})"]
    if s.get("name"):
        lines.append(f"  name: {s['name']}")
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
    if s.get("waiting"):
        lines.append(f"  new clients waiting for a tunnel: {s['waiting']}")
    if inside:
        lines.append(f"  outside agent answering: {'yes' if s['outside_answering'] else 'NO'}")
        if s.get("keepalive"):
            lines.append("  keepalive: " + keepalive_line(s["keepalive"]))
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


def search_dirs() -> list[str]:
    """Where agents started by hand put their sockets: this user's places, and as root everyone's."""
    dirs = [runtime_dir(), ROOT_DIR, f"/tmp/udp-tunnel-{os.geteuid()}"]
    if os.environ.get("XDG_RUNTIME_DIR", "").startswith("/"):
        dirs.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "udp-tunnel"))
    if os.geteuid() == 0:
        dirs += sorted(glob.glob("/run/user/*/udp-tunnel")) + sorted(glob.glob("/tmp/udp-tunnel-*"))
    return list(dict.fromkeys(dirs))


def find_sockets() -> list[str]:
    """Every control socket in the places agents use, each once."""
    found = []
    for d in search_dirs():
        try:
            st = os.lstat(d)
        except OSError:
            continue
        # not a directory someone else made under /tmp for us (root reads every user's)
        if stat.S_ISDIR(st.st_mode) and (st.st_uid in (os.geteuid(), 0) or os.geteuid() == 0):
            found += sorted(glob.glob(os.path.join(glob.escape(d), "*.sock")))
    found += sorted(glob.glob(UNIT_GLOB))
    seen, out = set(), []
    for path in found:
        real = os.path.realpath(path)
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def remove_if_stale(path: str) -> None:
    """A socket of ours that nobody listens on (its agent was killed): remove it."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
            _unlink_if_same(path, st)
    except OSError:
        pass


def status_command(argv: list[str]) -> int:
    from udp_tunnel.cli import Parser, UsageError

    p = Parser(prog="udp-tunnel status", description="Show running agents and their tunnels.")
    p.add_argument("name", metavar="NAME", nargs="?", help="only the agent of this name")
    p.add_argument("--control", metavar="PATH", help="only the agent serving this control socket")
    p.add_argument("--json", action="store_true", help="print the raw JSON document")
    a = p.parse_args(argv)
    if a.name and a.control:
        raise UsageError("status: give NAME or --control PATH, not both")
    docs = []
    if a.control:
        try:
            docs.append(query(a.control))
        except ConnectionRefusedError:
            print(f"udp-tunnel: no agent is serving {a.control} (a stale socket?)", file=sys.stderr)
            return 1
        except (OSError, ValueError) as e:
            print(f"udp-tunnel: cannot ask the agent at {a.control}: {getattr(e, 'strerror', None) or e}",
                  file=sys.stderr)
            return 1
    else:
        problems = []
        for path in find_sockets():
            try:
                doc = query(path)
            except ConnectionRefusedError:
                remove_if_stale(path)
                continue
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                problems.append(f"{path}: {getattr(e, 'strerror', None) or e}")
                continue
            if not isinstance(doc, dict) or "role" not in doc:
                problems.append(f"{path}: not an agent's answer")
                continue
            doc.setdefault("name", os.path.basename(path).removesuffix(".sock"))
            docs.append(doc)
        if a.name:
            names = [d["name"] for d in docs]
            docs = [d for d in docs if d["name"] == a.name]
            if not docs:
                print(f"udp-tunnel: no running agent named {a.name!r} (running: "
                      f"{', '.join(names) or 'none'})", file=sys.stderr)
                return 1
        if not docs:
            where = ", ".join(search_dirs()[:2] + [UNIT_GLOB])
            more = f"; could not ask {'; '.join(problems)}" if problems else ""
            print(f"udp-tunnel: no running agent found in {where} (give --control PATH){more}", file=sys.stderr)
            return 1
    if a.json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
    else:
        print("\n\n".join(render(d) for d in docs))
    return 0
