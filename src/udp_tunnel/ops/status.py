"""`udp-tunnel status`: a running agent's view, served on a local Unix socket.

The agent's loop makes a snapshot of its state when a reader asks for one; a thread answers
each connection on the control socket with that snapshot as one JSON
document. The socket is created owner-only (0600).

Where the sockets are: under systemd `$RUNTIME_DIRECTORY/control.sock` (the
units' /run/udp-tunnel-outside, /run/udp-tunnel-inside); otherwise
`NAME.sock` in runtime_dir(): `$XDG_RUNTIME_DIR/udp-tunnel`, else
/run/udp-tunnel as root, else /tmp/udp-tunnel-UID; each a 0700 directory
of its user. `udp-tunnel status` looks in all of them, and asks the sockets of
its own user, root's and the units' (run as root, not every user's: see
find_sockets). It prints what the agents answer with every control character
escaped, and bounds what it spends on them: DEADLINE, PER_SOCKET, MAX_ANSWER.
"""

from __future__ import annotations

import concurrent.futures
import errno
import glob
import json
import os
import socket
import stat
import sys
import threading
import time
from typing import TextIO

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


# What `udp-tunnel status` spends on the agents it asks: each answer must come whole within
# PER_SOCKET seconds and MAX_ANSWER bytes, and the whole command ends within DEADLINE seconds
# (the sockets are asked side by side), so a socket that trickles or floods cannot hold it.
DEADLINE = 3.0
PER_SOCKET = 2.0
MAX_ANSWER = 16 << 20  # an agent's answer takes 0.33 KiB per spare tunnel, about 0.4 per active one
PARALLEL = 8


class AnswerError(ValueError):
    """An answer refused for what it is (too big, not JSON, not an agent's)."""


def query(path: str, timeout: float = PER_SOCKET, limit: int = MAX_ANSWER) -> dict:
    """The JSON document the agent at path answers; the whole answer must arrive within timeout
    seconds (TimeoutError) and limit bytes (AnswerError), whatever pace it comes at."""
    end = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks, got = [], 0
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(0, f"no complete answer within {round(timeout, 1):g} s")
            s.settimeout(left)
            try:
                b = s.recv(min(65536, limit + 1 - got))
            except TimeoutError:
                continue  # given up above, once the time is really spent
            if not b:
                break
            got += len(b)
            if got > limit:
                raise AnswerError(f"the answer is larger than {limit >> 20} MiB: refused" if limit % (1 << 20) == 0
                                  else f"the answer is larger than {limit} bytes: refused")
            chunks.append(b)
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise AnswerError("the answer is not JSON: nested too deep") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise AnswerError(f"the answer is not JSON: {e}") from None


def query_many(paths: list[str], deadline: float | None = None, per_socket: float | None = None,
               limit: int | None = None) -> list[tuple[str, dict | Exception]]:
    """Ask every socket, a few side by side; each gets per_socket seconds (PER_SOCKET), none
    beyond the deadline (DEADLINE). Returns (path, document or the exception) in the order of paths."""
    deadline = DEADLINE if deadline is None else deadline
    per_socket = PER_SOCKET if per_socket is None else per_socket
    limit = MAX_ANSWER if limit is None else limit
    end = time.monotonic() + deadline

    def ask(path: str) -> dict | Exception:
        left = min(per_socket, end - time.monotonic())
        if left <= 0:
            return TimeoutError(0, f"not asked: {deadline:g} s were spent on the other agents")
        try:
            return query(path, left, limit)
        except (OSError, ValueError) as e:
            return e

    if len(paths) <= 1:
        return [(p, ask(p)) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(PARALLEL, len(paths))) as pool:
        return list(zip(paths, pool.map(ask, paths), strict=True))


def escape(text: str) -> str:
    """text with every character that is not printable (control characters: escape sequences,
    line breaks, bidi overrides...) written as a Python escape, so it cannot reach a terminal."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        else:
            n = ord(c)
            out.append(f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}")
    return "".join(out)


def clean(value):
    """An agent's answer with every string in it (keys too) escaped for a terminal."""
    if isinstance(value, str):
        return escape(value)
    if isinstance(value, list):
        return [clean(v) for v in value]
    if isinstance(value, dict):
        return {escape(k) if isinstance(k, str) else k: clean(v) for k, v in value.items()}
    return value


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
    lines = _agent_lines(s)
    if inside:
        lines += _outside_agent_lines(s)
    lines += _counter_lines(s)
    services = s.get("services") or {}
    grouped = len(services) > 1 or set(services) - {"default"}
    if grouped:
        lines.append("  services: " + ", ".join(f"{name} ({v['clients']} client(s))" for name, v in services.items()))
    order = sorted(s["tunnels"], key=lambda t: (t["state"] != "active", t.get("service") or "", t["age"]))
    heading = None
    for t in order:
        group = (t.get("service") or "(spare)") if t["state"] == "active" else "(spare)"
        if grouped and group != heading:
            heading = group
            lines += ["", f"service: {group}" if group != "(spare)" else "spares:"]
        lines += ["", *_tunnel_lines(t, inside)]
    return "\n".join(lines)


def _agent_lines(s: dict) -> list[str]:
    """The agent's header: who it is, where, its key, its tunnels."""
    lines = [f"agent: {s['role']} (udp-tunnel {s.get('version', '?')}, pid {s.get('pid', '?')})"]
    if s.get("name"):
        lines.append(f"  name: {s['name']}")
    for key in ("listen", "service", "outside"):
        if s.get(key):
            lines.append(f"  {key}: {s[key]}")
    lines.append(f"  protocol: {s['protocol']}")
    lines += _datapath_lines(s.get("datapath"))
    wg = s.get("wireguard")  # outside with --wireguard-key
    if wg:
        lines.append(f"  wireguard: admitting only handshakes valid for {wg['keys']} server key"
                     f"{'s' if wg['keys'] > 1 else ''}; {wg['sessions']} session(s) known for roaming")
    lines.append(f"  key: {'set' if s.get('key') else 'NOT set (keepalives are not authenticated)'}")
    lines.append(f"  uptime: {ago(s['uptime'])}")
    lines.append(f"  tunnels: {s['clients']} active, {s['spares']} spare")
    if s.get("waiting"):
        lines.append(f"  new clients waiting for a tunnel: {s['waiting']}")
    return lines


def _datapath_lines(d: dict | None) -> list[str]:
    """Which data path runs and why; with the kernel path, what it relays, what stays in user
    space and why, what it changed on the host and what its program did."""
    if not d:
        return []
    if d["path"] != "kernel":
        return [f"  datapath: user space ({d['why']})"]
    kept = d.get("kept_count", 0)
    lines = [f"  datapath: kernel ({d['why']}): {d.get('flows', 0)} direction(s) relayed in the kernel"
             + (f", {kept} in user space" if kept else "")]
    lines += [f"    in user space: {k}: {why}" for k, why in d.get("kept", {}).items()]
    if kept > len(d.get("kept", {})):
        lines.append(f"    (and {kept - len(d['kept'])} more in user space)")
    lines += [f"    service {name} in user space: {why}" for name, why in d.get("services_kept", {}).items()]
    lines += [f"    note: {n}" for n in d.get("notes", [])]
    done = {k: v for k, v in (d.get("program") or {}).items() if v}
    if done:
        lines.append("    program: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in done.items()))
    if d.get("program_error"):
        lines.append(f"    program: its counters cannot be read: {d['program_error']}")
    return lines


def _outside_agent_lines(s: dict) -> list[str]:
    """An inside agent's view of its outside agent: answering, and the keepalive line."""
    lines = [f"  outside agent answering: {'yes' if s['outside_answering'] else 'NO'}"]
    if s.get("keepalive"):
        lines.append("  keepalive: " + keepalive_line(s["keepalive"]))
    return lines


def _counter_lines(s: dict) -> list[str]:
    """What went through, what was dropped and why, and the other events counted."""
    tot = s.get("totals", {})
    lines = [f"  transfer: {tot.get('datagrams_in', 0)} datagrams ({size(tot.get('bytes_in', 0))}) towards "
             f"the service, {tot.get('datagrams_out', 0)} ({size(tot.get('bytes_out', 0))}) back"]
    drops = {k[5:]: v for k, v in sorted(s["stats"].items()) if k.startswith("drop_") and v}
    if drops:
        lines.append("  dropped: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in drops.items()))
    other = {k: v for k, v in sorted(s["stats"].items()) if not k.startswith("drop_") and v}
    if other:
        lines.append("  events: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in other.items()))
    return lines


def _tunnel_lines(t: dict, inside: bool) -> list[str]:
    """One tunnel: its client, how it was admitted, its registration, and each leg's traffic."""
    lines = [f"tunnel: {t['id']} ({t['state']})"]
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
    return lines


def search_dirs() -> list[str]:
    """Where agents started by hand put their sockets: this user's places, and as root everyone's."""
    dirs = [runtime_dir(), ROOT_DIR, f"/tmp/udp-tunnel-{os.geteuid()}"]
    if os.environ.get("XDG_RUNTIME_DIR", "").startswith("/"):
        dirs.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "udp-tunnel"))
    if os.geteuid() == 0:
        dirs += sorted(glob.glob("/run/user/*/udp-tunnel")) + sorted(glob.glob("/tmp/udp-tunnel-*"))
    return list(dict.fromkeys(dirs))


def unit_socket(path: str) -> bool:
    """A socket of a unit's RuntimeDirectory: /run/udp-tunnel*/control.sock in a real directory
    of /run, which only root (systemd) makes; the unit's dynamic user owns it."""
    d = os.path.dirname(path)
    try:
        top, here = os.lstat(os.path.dirname(d)), os.lstat(d)
    except OSError:
        return False
    return (os.path.dirname(d) == os.path.dirname(os.path.dirname(UNIT_GLOB)) and top.st_uid == 0
            and not top.st_mode & 0o022 and stat.S_ISDIR(here.st_mode))


def find_sockets() -> tuple[list[str], list[str]]:
    """Every control socket in the places agents use, each once: those this user may ask (its
    own, root's, the units'), and those it does not ask (another user's: run as root, a status
    command that connects to any user's socket is theirs to stall or to fool)."""
    found = []
    for d in search_dirs():
        try:
            st = os.lstat(d)
        except OSError:
            continue
        # not a directory someone else made under /tmp for us (root looks in every user's)
        if stat.S_ISDIR(st.st_mode) and (st.st_uid in (os.geteuid(), 0) or os.geteuid() == 0):
            found += sorted(glob.glob(os.path.join(glob.escape(d), "*.sock")))
    units = sorted(glob.glob(UNIT_GLOB))
    seen, ask, others = set(), [], []
    for path in found + units:
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            continue
        if st.st_uid in (os.geteuid(), 0) or (path in units and unit_socket(path)):
            ask.append(path)
        else:
            others.append(path)
    return ask, others


def remove_if_stale(path: str) -> None:
    """A socket of ours that nobody listens on (its agent was killed): remove it."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == os.geteuid():
            _unlink_if_same(path, st)
    except OSError:
        pass


def problem(e: Exception) -> str:
    return escape(str(getattr(e, "strerror", None) or e))


def show(name: str | None = None, control: str | None = None, as_json: bool = False,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`udp-tunnel status [NAME] [--control PATH] [--json]` (cli.py reads the command line):
    print the agents found (or the one at control, or the one called name); 0, or 1 with one
    line on err when there is none to show. Every string an agent sends is escaped."""
    out = out or sys.stdout
    err = err or sys.stderr
    docs = _ask_control(control, err) if control else _ask_found(name, err)
    if docs is None:
        return 1
    if as_json:  # json.dumps writes every control character as an escape (ensure_ascii)
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2), file=out)
        return 0
    print("\n\n".join(_render_or_say_why(d) for d in docs), file=out)
    return 0


def _ask_control(control: str, err: TextIO) -> list[dict] | None:
    """The answer of the agent at control, or None with one line on err."""
    [(_, got)] = query_many([control])
    if isinstance(got, ConnectionRefusedError):
        print(f"udp-tunnel: no agent is serving {escape(control)} (a stale socket?)", file=err)
        return None
    if isinstance(got, Exception):
        print(f"udp-tunnel: cannot ask the agent at {escape(control)}: {problem(got)}", file=err)
        return None
    return [got]


def _ask_found(name: str | None, err: TextIO) -> list[dict] | None:
    """The answers of the agents found (those called name); the problems met on err; None
    with one line on err when there is none."""
    docs, problems = _ask_every_socket()
    if name:
        names = [escape(str(d["name"])) for d in docs]
        docs = [d for d in docs if d["name"] == name]
        if not docs:
            print(f"udp-tunnel: no running agent named {name!r} (running: "
                  f"{', '.join(names) or 'none'})", file=err)
            return None
    if not docs:
        where = ", ".join(search_dirs()[:2] + [UNIT_GLOB])
        more = f"; could not ask {'; '.join(problems)}" if problems else ""
        print(f"udp-tunnel: no running agent found in {where} (give --control PATH){more}", file=err)
        return None
    for p in problems:
        print(f"udp-tunnel: {p}", file=err)
    return docs


def _ask_every_socket() -> tuple[list[dict], list[str]]:
    """The agents' answers (each named, by its socket if it says no name), and what went wrong
    (a stale socket of ours is removed, not a problem)."""
    docs, problems = [], []
    paths, others = find_sockets()
    for path, got in query_many(paths):
        if isinstance(got, ConnectionRefusedError):
            remove_if_stale(path)
            continue
        if isinstance(got, FileNotFoundError):
            continue
        if isinstance(got, Exception):
            problems.append(f"{escape(path)}: {problem(got)}")
            continue
        if not isinstance(got, dict) or "role" not in got:
            problems.append(f"{escape(path)}: not an agent's answer")
            continue
        got.setdefault("name", os.path.basename(path).removesuffix(".sock"))
        docs.append(got)
    if others:
        problems.append(f"not asked (sockets of other users; --control PATH asks one): "
                        f"{', '.join(escape(p) for p in others)}")
    return docs, problems


def _render_or_say_why(doc: dict) -> str:
    try:
        return render(clean(doc))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        return (f"agent: ? (an answer this version cannot show: {escape(type(e).__name__)} "
                f"{problem(e)}; --json prints it)")
