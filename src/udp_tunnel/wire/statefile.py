"""The outside agent's memory across a restart: where its tunnels were, and (WireGuard mode)
which handshake initiations it admitted lately, so that captured copies of them are refused
after a restart as before it.

A small JSON file, written atomically (a temporary file, then rename) and
owner-only. It only says where to send a HELLO after a restart, so that the
inside agents register again at once instead of at their next keepalive:
nothing read from it is trusted, registration stays authenticated.

It is read strictly: a file that is not exactly what `dump` writes (a port
out of 1-65535, a host that is not an IPv4 or IPv6 literal of a unicast
address, a tunnel id that is not 16 hex digits, too many entries, too big)
is refused as a whole with ValueError, whose text says what is wrong in one
line. The agent then warns and starts without it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile

VERSION = 1
# The most tunnels an outside agent of one key holds: --max-clients (at most 1 000 000) + 64
# spares; an agent with several keys may hold more (load_all's max_entries).
MAX_ENTRIES = 1_000_064
MAX_HOST = 64  # an IPv6 literal is at most 45 characters; the rest for a %scope


def max_bytes(max_entries: int) -> int:
    """An entry as dump writes it is at most 16 + 64 + 5 characters of values and 15 of JSON around
    them; the WireGuard initiations (at most MAX_TAGS of 34 characters per service) fit in what
    MAX_ENTRIES entries leave."""
    return max(max_entries, MAX_ENTRIES) * 104 + 4096
TID = re.compile(r"[0-9a-f]{16}")
TAG = re.compile(r"[0-9a-f]{32}")  # an initiation's MAC1 (16 bytes)
MAX_TAGS = 4096  # per service (wireguard.SEEN_INITIATIONS)
MAX_SERVICES = 1024


def _show(value: object) -> str:
    """A value from the file for a message: repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= 50 else text[:40] + "..." + text[-5:]


def _address(host: object, port: object) -> tuple[str, int]:
    """A tunnel's address from the file, or ValueError."""
    if not isinstance(host, str) or not 2 <= len(host) <= MAX_HOST or not host.isascii() \
            or not host.isprintable():
        raise ValueError(f"host {_show(host)} is not an IP address")
    try:
        ip = ipaddress.ip_address(host)  # literals only: never a name to resolve; IPv6 may carry a %scope
    except ValueError:
        raise ValueError(f"host {_show(host)} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"host {_show(host)} is not a unicast address")
    if type(port) is not int or not 1 <= port <= 65535:  # not bool, not float
        raise ValueError(f"port {_show(port)} is not in 1-65535")
    return host, port


def parse_all(data: bytes, path: str = "state file", max_entries: int = MAX_ENTRIES,
              ) -> tuple[list[tuple[int, tuple]], dict[str, list[bytes]]]:
    """From the file's bytes: the (tunnel id, address) pairs (at most max_entries, or MAX_ENTRIES
    if that is more), and the initiations admitted per WireGuard service (MAC1s, oldest first);
    ValueError (one line) when the file is not exactly one this version wrote."""
    where = f"the state file {path}"
    max_entries = max(max_entries, MAX_ENTRIES)
    if len(data) > max_bytes(max_entries):
        raise ValueError(f"{where} is too big ({len(data)} bytes, at most {max_bytes(max_entries)})")
    if b"\0" in data:
        raise ValueError(f"{where} holds a NUL byte")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ValueError(f"{where} is not JSON: nested too deep") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("tunnels"), list) \
            or set(doc) - {"version", "tunnels", "wireguard"}:
        raise ValueError(f"{where} is not one this version wrote")
    tunnels = doc["tunnels"]
    if len(tunnels) > max_entries:
        raise ValueError(f"{where} lists {len(tunnels)} tunnels, more than the agent holds ({max_entries})")
    out = []
    for i, entry in enumerate(tunnels):
        try:
            if not isinstance(entry, list) or len(entry) != 3:
                raise ValueError("not [tunnel id, host, port]")
            tid, host, port = entry
            if not isinstance(tid, str) or not TID.fullmatch(tid):
                raise ValueError(f"tunnel id {_show(tid)} is not 16 hex digits")
            out.append((int(tid, 16), _address(host, port)))
        except ValueError as e:
            raise ValueError(f"{where}: tunnel {i + 1}: {e}") from None
    return out, _initiations(doc.get("wireguard", {}), where)


def _initiations(doc: object, where: str) -> dict[str, list[bytes]]:
    if not isinstance(doc, dict) or len(doc) > MAX_SERVICES:
        raise ValueError(f"{where}: wireguard is not a table of services")
    out = {}
    for name, tags in doc.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable() \
                or not isinstance(tags, list) or len(tags) > MAX_TAGS \
                or not all(isinstance(t, str) and TAG.fullmatch(t) for t in tags):
            raise ValueError(f"{where}: wireguard: {_show(name)} is not a service with up to {MAX_TAGS} MAC1s")
        out[name] = [bytes.fromhex(t) for t in tags]
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def load_all(path: str, max_entries: int = MAX_ENTRIES) -> tuple[list[tuple[int, tuple]], dict[str, list[bytes]]]:
    """What parse_all reads from the file at `path`; nothing when there is no file. Raises
    ValueError (one line) when the file cannot be read or is not exactly one this version wrote."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes(max_entries) + 1)
    except FileNotFoundError:
        return [], {}
    except OSError as e:
        raise ValueError(f"cannot read the state file {path}: {e.strerror or e}") from None
    return parse_all(data, path, max_entries)


def dump(entries: list[tuple[int, tuple]], initiations: dict[str, list[bytes]] | None = None) -> bytes:
    doc: dict = {"version": VERSION, "tunnels": [[f"{tid:016x}", a[0], a[1]] for tid, a in entries]}
    if initiations:
        doc["wireguard"] = {name: [t.hex() for t in tags] for name, tags in initiations.items()}
    return json.dumps(doc).encode()


def save(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
