"""The configuration of either agent, from a TOML file (`--config PATH`) or from the command line.

Both end in the same typed, immutable model: `OutsideConfig` or `InsideConfig`, each with
its services. The command line is a configuration of one service named `default`
(`from_args`); a file names its services (`load`, `parse`). Reading a file does no I/O but
reading that file: key files are read when the agent starts or reloads (`read_key`).

A file that is wrong gives one `ConfigError` whose text names the file, the line and the
problem (`outside.toml:12: services.game.listen: bad port '70000' (1-65535)`).

The outside agent has one tunnel port, where the inside agents register (`[outside] listen`),
named keys (one per inside agent, `[keys.NAME]`) and services (`[services.NAME]`), each with
the port or port range its clients send to and the key whose tunnels carry it. A service may
listen on the tunnel port itself: that is what `-l 9999` is (one service, clients and tunnels
on one port). The inside agent has one outside agent, one key and services, each with the
address (or range) of the service it reaches; an inside service is the outside service of the
same name. examples/outside.toml and examples/inside.toml show every setting.
"""

from __future__ import annotations

import bisect
import difflib
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import NoReturn

from udp_tunnel.addr import HOST, HOST6
from udp_tunnel.core.admission import default_per_source

MAX_KEEPALIVE = 3600  # seconds (-t, keepalive): the cores size their cookie lifetime from the keepalive
MAX_CLIENTS = 1_000_000
MAX_RANGE = 1024  # ports in one service's range: the outside holds one socket per port
MAX_FILE = 1 << 20  # bytes of a configuration file
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an agent's name (--name, name)
ITEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")  # a service's or a key's name (goes on the wire, in labels)
CLIENT_ADDRESS = ("off", "transparent", "proxy-v2", "proxy-v2-first")
FAMILIES = {"any": None, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
LOG = ("normal", "verbose", "quiet")
DATAPATHS = ("auto", "kernel", "user")
DEFAULT = "default"  # the one service (and key) of a command line


class ConfigError(Exception):
    """A configuration that cannot be used; str() is the one line to print. status: the exit
    status (2: the file is wrong, 1: it cannot be read)."""

    def __init__(self, message: str, path: str = "", line: int = 0, status: int = 2) -> None:
        self.status = status
        where = f"{path}:{line}: " if path and line else f"{path}: " if path else ""
        super().__init__(where + message)


# --- the model ---

@dataclass(frozen=True)
class PortRange:
    """first..last, both included; one port when first == last."""
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def overlaps(self, other: PortRange) -> bool:
        return self.first <= other.last and other.first <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Listen:
    """Where an outside agent receives: host None is every IPv4 and IPv6 address."""
    host: str | None
    ports: PortRange

    def __str__(self) -> str:
        if self.host is None:
            return str(self.ports)
        return f"[{self.host}]:{self.ports}" if ":" in self.host else f"{self.host}:{self.ports}"


@dataclass(frozen=True)
class Target:
    """A host and a port or port range to send to (resolved when the agent starts)."""
    host: str
    ports: PortRange

    def __str__(self) -> str:
        return f"[{self.host}]:{self.ports}" if ":" in self.host else f"{self.host}:{self.ports}"


@dataclass(frozen=True)
class Key:
    """A pre-shared key: from a file (file), or given on the command line or in UDP_TUNNEL_KEY
    (value, origin), or none at all (insecure: --insecure-no-key). max_clients: the most
    tunnels in use for this key, all its services together (outside)."""
    name: str
    file: str | None = None  # absolute (a relative file name in a configuration file is beside it)
    value: bytes | None = field(default=None, repr=False)
    origin: str = "key file"  # "key file", "command line", "UDP_TUNNEL_KEY" or "" (no key)
    max_clients: int = 1000
    where: str = field(default="", compare=False)  # "outside.toml:7" (messages at reload)
    given: str = field(default="", compare=False, repr=False)  # file as written in the configuration

    @property
    def insecure(self) -> bool:
        return self.file is None and self.value is None


@dataclass(frozen=True)
class OutsideService:
    name: str
    listen: Listen  # clients send here: a port or a range (offset k goes to the inside's port first+k)
    key: str  # the name of the Key whose tunnels carry this service
    max_clients: int = 1000
    max_clients_per_source: int = 250
    wireguard_keys: tuple[bytes, ...] = ()  # admit only WireGuard handshakes for these server keys; () off
    legacy: bool = False  # the C udp-tunnel 1.x wire format (then the only service, on the tunnel port)
    max_clock_skew: float = 120.0  # legacy only
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class OutsideConfig:
    source: str  # the file, or "command line"
    listen: Listen  # the tunnel port (one port)
    keepalive: float  # the longest keepalive interval (-t)
    keys: tuple[Key, ...]
    services: tuple[OutsideService, ...]
    name: str | None = None
    control: str | None = None  # as --control: None default, "none" off, else a path
    state_file: str | None = None  # as --state-file
    metrics: tuple[str, int] | None = None
    family: int | None = None  # None (both), socket.AF_INET (-4), socket.AF_INET6 (-6)
    verbose: bool = False
    quiet: bool = False
    datapath: str = "auto"  # one of DATAPATHS (--datapath)
    role = "outside"

    def key(self, name: str) -> Key | None:
        return next((k for k in self.keys if k.name == name), None)

    def service(self, name: str) -> OutsideService:
        return next(s for s in self.services if s.name == name)


@dataclass(frozen=True)
class InsideService:
    name: str  # the outside service of the same name
    service: Target  # a port, or a range of the size of the outside's
    timeout: float = 60.0  # close a client's tunnel after this long without a datagram from it
    max_clients: int = 1000
    client_address: str = "off"  # one of CLIENT_ADDRESS
    legacy: bool = False
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class InsideConfig:
    source: str
    outside: Target  # one port
    key: Key
    keepalive: float
    spares: int
    max_clients: int  # all services together
    services: tuple[InsideService, ...]
    name: str | None = None
    control: str | None = None
    metrics: tuple[str, int] | None = None
    family: int | None = None
    verbose: bool = False
    quiet: bool = False
    datapath: str = "auto"
    role = "inside"

    def service(self, name: str) -> InsideService:
        return next(s for s in self.services if s.name == name)


Config = OutsideConfig | InsideConfig


# --- the command line: one service named "default" ---

def from_args(a) -> Config:
    """The model of a command line that passed cli.check(a) (which filled in the defaults)."""
    from udp_tunnel.addr import parse_listen, split_hostport

    if a.key_file is not None:
        key = Key(DEFAULT, file=a.key_file, origin="key file", max_clients=a.max_clients)
    elif a.key is not None:
        key = Key(DEFAULT, value=os.fsencode(a.key), origin="command line", max_clients=a.max_clients)
    elif os.environb.get(b"UDP_TUNNEL_KEY"):
        key = Key(DEFAULT, value=os.environb[b"UDP_TUNNEL_KEY"], origin="UDP_TUNNEL_KEY",
                  max_clients=a.max_clients)
    else:
        key = Key(DEFAULT, origin="", max_clients=a.max_clients)
    metrics = split_hostport(a.metrics, "--metrics") if a.metrics else None
    common = dict(source="command line", name=a.name, control=a.control, metrics=metrics, family=a.family,
                  verbose=a.verbose, quiet=a.quiet, datapath=getattr(a, "datapath", None) or "auto")
    if a.listen is not None:
        host, port = parse_listen(a.listen)
        listen = Listen(host, PortRange(port, port))
        wg = tuple(getattr(a, "wireguard_keys", None) or ())
        svc = OutsideService(DEFAULT, listen, DEFAULT, max_clients=a.max_clients,
                             max_clients_per_source=a.max_clients_per_source, wireguard_keys=wg,
                             legacy=a.legacy, max_clock_skew=a.max_clock_skew)
        return OutsideConfig(listen=listen, keepalive=a.keepalive, keys=(key,), services=(svc,),
                             state_file=a.state_file, **common)
    host, port = split_hostport(a.outside, "--outside")
    shost, sport = split_hostport(a.service, "--service")
    svc = InsideService(DEFAULT, Target(shost, PortRange(sport, sport)), timeout=a.timeout,
                        max_clients=a.max_clients, client_address=getattr(a, "client_address", None) or "off",
                        legacy=a.legacy)
    return InsideConfig(outside=Target(host, PortRange(port, port)), key=key, keepalive=a.keepalive,
                        spares=a.spares, max_clients=a.max_clients, services=(svc,), **common)


def read_key(key: Key) -> bytes:
    """The secret of a key (b"" for none); ConfigError(status 1) when its file cannot be read or is
    empty. A key file's trailing line break is not part of the key (as --key-file)."""
    if key.file is None:
        return key.value or b""
    try:
        with open(key.file, "rb") as f:
            secret = f.read(65536).rstrip(b"\r\n")
    except OSError as e:
        raise ConfigError(f"cannot read key file {key.file}: {e.strerror or e}", status=1) from None
    if not secret:
        raise ConfigError(f"key file {key.file} is empty", status=1)
    return secret


# --- where things are in a TOML text ---

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", "e": "\x1b", '"': '"', "\\": "\\"}


def _unescape(s: str) -> str:
    def one(m: re.Match) -> str:
        e = m.group(1)
        if e[0] in "uU":
            return chr(int(e[1:], 16))
        return _ESCAPES.get(e, e)
    return re.sub(r"\\(u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", one, s)


class _Locator:
    """The line of every table header and key of a TOML text tomllib has read, by its path of
    names: ("services", "game", "listen") -> 14. Only as much of TOML as finding them needs."""

    def __init__(self, text: str) -> None:
        self.t = text
        self.n = len(text)
        self.nl = [i for i, c in enumerate(text) if c == "\n"]
        self.lines: dict[tuple[str, ...], int] = {}
        try:
            self._document()
        except (IndexError, ValueError, RecursionError):  # not expected of a text tomllib read; keep what was found
            pass

    def line_at(self, i: int) -> int:
        return bisect.bisect_left(self.nl, i) + 1

    def line(self, path: tuple[str, ...]) -> int:
        """The line of path, or of its nearest parent that has one (1 if none has)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return 1

    def _blank(self, i: int, newlines: bool) -> int:
        t = self.t
        while i < self.n:
            c = t[i]
            if c in " \t\r" or (newlines and c == "\n"):
                i += 1
            elif c == "#":
                while i < self.n and t[i] != "\n":
                    i += 1
            else:
                break
        return i

    def _string(self, i: int) -> tuple[str, int]:
        t = self.t
        q = t[i]
        if t.startswith(q * 3, i):
            end = t.index(q * 3, i + 3)
            while t.startswith(q, end + 3):  # up to two quotes may end the content
                end += 1
            return t[i + 3:end], end + 3
        j = i + 1
        while t[j] != q:
            j += 2 if q == '"' and t[j] == "\\" else 1
        s = t[i + 1:j]
        return (_unescape(s) if q == '"' else s), j + 1

    def _key(self, i: int) -> tuple[tuple[str, ...], int]:
        parts = []
        while True:
            i = self._blank(i, False)
            if self.t[i] in "\"'":
                name, i = self._string(i)
            else:
                m = _BARE.match(self.t, i)
                if not m:
                    raise ValueError("not a key")
                name, i = m.group(), m.end()
            parts.append(name)
            i = self._blank(i, False)
            if i < self.n and self.t[i] == ".":
                i += 1
                continue
            return tuple(parts), i

    def _record(self, path: tuple[str, ...], at: int) -> None:
        for k in range(1, len(path) + 1):
            self.lines.setdefault(path[:k], self.line_at(at))

    def _value(self, i: int, path: tuple[str, ...]) -> int:
        t = self.t
        c = t[i]
        if c in "\"'":
            return self._string(i)[1]
        if c == "[":
            i += 1
            while True:
                i = self._blank(i, True)
                if t[i] == "]":
                    return i + 1
                i = self._value(i, path)
                i = self._blank(i, True)
                if t[i] == ",":
                    i += 1
        if c == "{":
            i += 1
            while True:
                i = self._blank(i, False)
                if t[i] == "}":
                    return i + 1
                start = i
                parts, i = self._key(i)
                self._record(path + parts, start)
                i = self._blank(i, False) + 1  # "="
                i = self._value(self._blank(i, False), path + parts)
                i = self._blank(i, False)
                if t[i] == ",":
                    i += 1
        while i < self.n and t[i] not in ",]}\n#":
            i += 1
        return i

    def _document(self) -> None:
        t, i, table = self.t, 0, ()
        while True:
            i = self._blank(i, True)
            if i >= self.n:
                return
            start = i
            if t[i] == "[":
                double = t.startswith("[[", i)
                table, i = self._key(i + (2 if double else 1))
                self._record(table, start)
                i += 2 if double else 1
            else:
                parts, i = self._key(i)
                self._record(table + parts, start)
                i = self._blank(i, False) + 1  # "="
                i = self._value(self._blank(i, False), table + parts)
            while i < self.n and t[i] != "\n":  # the rest of the line: blanks, a comment
                i += 1


# --- reading a file ---

class _Reader:
    """Checks a parsed document against the schema; every error names the line of its key."""

    def __init__(self, path: str, doc: dict, where: _Locator) -> None:
        self.path, self.doc, self.where = path, doc, where
        self.base = os.path.dirname(os.path.abspath(path))

    def fail(self, keys: tuple[str, ...], message: str) -> NoReturn:
        name = ".".join(keys)
        raise ConfigError(f"{name}: {message}" if name else message, self.path, self.where.line(keys))

    def at(self, keys: tuple[str, ...]) -> str:
        return f"{self.path}:{self.where.line(keys)}"

    def table(self, keys: tuple[str, ...], value: object) -> dict:
        if not isinstance(value, dict):
            self.fail(keys, f"must be a table ([{'.'.join(keys)}]), not {_kind(value)}")
        return value

    def known(self, keys: tuple[str, ...], table: dict, allowed: tuple[str, ...]) -> None:
        for k in table:
            if k not in allowed:
                near = difflib.get_close_matches(k, allowed, 1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(allowed)})"
                self.fail(keys + (k,), f"unknown setting {k!r} in [{'.'.join(keys)}]{hint}")

    def string(self, keys: tuple[str, ...], value: object) -> str:
        if not isinstance(value, str):
            self.fail(keys, f"must be a string (in quotes), not {_kind(value)}")
        if not value.isprintable():
            self.fail(keys, "must not hold control characters")
        return value

    def number(self, keys, value, low: float, high: float, what: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(keys, f"must be a number of seconds, not {_kind(value)}")
        if not low <= value <= high:
            self.fail(keys, f"{what} must be between {low:g} and {high:g} seconds")
        return float(value)

    def whole(self, keys, value, low: int, high: int, what: str = "") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(keys, f"must be a whole number, not {_kind(value)}")
        if not low <= value <= high:
            self.fail(keys, f"must be between {low} and {high}{what}")
        return value

    def flag(self, keys, value) -> bool:
        if not isinstance(value, bool):
            self.fail(keys, f"must be true or false, not {_kind(value)}")
        return value

    def choice(self, keys, value, choices) -> str:
        value = self.string(keys, value)
        if value not in choices:
            self.fail(keys, f"must be one of {', '.join(repr(c) for c in choices)}, not {value!r}")
        return value

    def ports(self, keys, text: str) -> PortRange:
        first, sep, last = text.partition("-")
        for p in (first, last) if sep else (first,):
            if not (p.isascii() and p.isdigit()) or not 1 <= int(p) <= 65535:
                self.fail(keys, f"bad port {p!r} (1-65535)")
        r = PortRange(int(first), int(last if sep else first))
        if r.last < r.first:
            self.fail(keys, f"the range {text} ends before it starts")
        if r.size > MAX_RANGE:
            self.fail(keys, f"the range {text} has {r.size} ports, more than {MAX_RANGE}")
        return r

    def hostports(self, keys, text: str, host_optional: bool) -> tuple[str | None, str]:
        """'[HOST:]PORTS' -> (host or None, 'PORTS'), the host checked as addr.split_hostport does."""
        if host_optional and text.isascii() and text.replace("-", "").isdigit():
            return None, text
        if text.startswith("["):
            host, sep, ports = text[1:].partition("]:")
            if not sep or not host or not HOST6.fullmatch(host):
                self.fail(keys, f"expected [IPV6]:PORT, got {text!r}")
            return host, ports
        host, sep, ports = text.rpartition(":")
        if not sep or not host:
            self.fail(keys, f"expected {'[HOST:]PORT' if host_optional else 'HOST:PORT'}, got {text!r}")
        if ":" in host:
            self.fail(keys, f"put an IPv6 address in brackets, as in [{host}]:{ports}")
        if not HOST.fullmatch(host):
            self.fail(keys, f"bad host name {host!r}")
        return host, ports

    def listen(self, keys, value, single: bool = False) -> Listen:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        text = self.string(keys, value)
        host, ports = self.hostports(keys, text, host_optional=True)
        r = self.ports(keys, ports)
        if single and r.size > 1:
            self.fail(keys, f"one port, not a range ({text})")
        return Listen(host, r)

    def target(self, keys, value, single: bool = False) -> Target:
        text = self.string(keys, value)
        host, ports = self.hostports(keys, text, host_optional=False)
        r = self.ports(keys, ports)
        if single and r.size > 1:
            self.fail(keys, f"one port, not a range ({text})")
        return Target(host, r)

    def file(self, keys, value) -> str:
        text = self.string(keys, value)
        if not text or "\0" in text:
            self.fail(keys, "must be a file name")
        return os.path.normpath(os.path.join(self.base, text))  # relative: beside the configuration file

    def item_name(self, keys, kind: str) -> str:
        name = keys[-1]
        if not ITEM.fullmatch(name):
            self.fail(keys, f"{name!r} is not a {kind} name (letters, digits, '_', '-'; at most 32)")
        return name

    def general(self, keys: tuple[str, ...], t: dict) -> dict:
        """The settings both roles have, as keyword arguments of the model."""
        out: dict = {}
        if "name" in t:
            out["name"] = self.string(keys + ("name",), t["name"])
            if not NAME.fullmatch(out["name"]):
                self.fail(keys + ("name",), f"{out['name']!r} is not a name (letters, digits, '.', '_', '-'; "
                                            "at most 64)")
        if "control" in t:
            out["control"] = self.string(keys + ("control",), t["control"]) or None
        if "metrics" in t:
            text = self.string(keys + ("metrics",), t["metrics"])
            host, ports = self.hostports(keys + ("metrics",), text, host_optional=False)
            out["metrics"] = (host, self.ports(keys + ("metrics",), ports).first)
            if "-" in ports:
                self.fail(keys + ("metrics",), f"one port, not a range ({text})")
        if "family" in t:
            out["family"] = FAMILIES[self.choice(keys + ("family",), t["family"], tuple(FAMILIES))]
        if "log" in t:
            log = self.choice(keys + ("log",), t["log"], LOG)
            out["verbose"], out["quiet"] = log == "verbose", log == "quiet"
        if "datapath" in t:
            out["datapath"] = self.choice(keys + ("datapath",), t["datapath"], DATAPATHS)
        return out


GENERAL = ("name", "control", "metrics", "family", "log", "datapath")
OUTSIDE = ("listen", "keepalive", "state_file", *GENERAL)
KEY = ("file", "insecure_no_key", "max_clients")
OUTSIDE_SERVICE = ("listen", "key", "max_clients", "max_clients_per_source", "wireguard_key", "legacy",
                   "max_clock_skew")
INSIDE = ("outside", "key_file", "insecure_no_key", "keepalive", "timeout", "spares", "max_clients", *GENERAL)
INSIDE_SERVICE = ("service", "timeout", "max_clients", "client_address", "legacy")


def _kind(value: object) -> str:
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _outside(r: _Reader, doc: dict) -> OutsideConfig:
    K = ("outside",)  # noqa: N806
    o = r.table(K, doc["outside"])
    r.known(K, o, OUTSIDE)
    if "listen" not in o:
        r.fail(K, "the tunnel port is missing: listen = \"PORT\" (where the inside agents register)")
    listen = r.listen(K + ("listen",), o["listen"], single=True)
    keepalive = r.number(K + ("keepalive",), o.get("keepalive", 25.0), 0.1, MAX_KEEPALIVE,
                         "the keepalive interval")
    extra = r.general(K, o)
    if "state_file" in o:
        extra["state_file"] = r.string(K + ("state_file",), o["state_file"]) or None
    keys = _keys(r, doc)
    services = _outside_services(r, doc, {k.name: k for k in keys})
    _check_listens(r, services, listen)
    return OutsideConfig(source=r.path, listen=listen, keepalive=keepalive, keys=tuple(keys),
                         services=tuple(services), **extra)


def _keys(r: _Reader, doc: dict) -> list[Key]:
    """[keys.NAME]: at least one, no two of one file."""
    keys = [_key(r, name, t) for name, t in r.table(("keys",), doc.get("keys", {})).items()]
    for i, k in enumerate(keys):
        for other in keys[:i]:
            if k.file is not None and k.file == other.file:
                r.fail(("keys", k.name, "file"), f"the same file as keys.{other.name} ({other.where}): each inside "
                                                 "agent needs a key of its own")
    if not keys:
        r.fail(("keys",), "no key: add a [keys.NAME] table with file = \"PATH\" (one key per inside agent)")
    return keys


def _key(r: _Reader, name: str, t: object) -> Key:
    k = ("keys", name)
    r.item_name(k, "key")
    t = r.table(k, t)
    r.known(k, t, KEY)
    insecure = r.flag(k + ("insecure_no_key",), t.get("insecure_no_key", False))
    if insecure == ("file" in t):
        r.fail(k, "give the key's file = \"PATH\" (or insecure_no_key = true, without a file)")
    return Key(name, file=r.file(k + ("file",), t["file"]) if "file" in t else None,
               origin="key file" if "file" in t else "",
               max_clients=r.whole(k + ("max_clients",), t.get("max_clients", 1000), 1, MAX_CLIENTS),
               where=r.at(k), given=t.get("file", ""))


def _outside_services(r: _Reader, doc: dict, keys: dict[str, Key]) -> list[OutsideService]:
    svcs = r.table(("services",), doc.get("services", {}))
    if not svcs:
        r.fail(("services",), "no service: add a [services.NAME] table with listen = \"PORT\" and key = \"NAME\"")
    return [_outside_service(r, name, t, keys) for name, t in svcs.items()]


def _outside_service(r: _Reader, name: str, t: object, keys: dict[str, Key]) -> OutsideService:
    s = ("services", name)
    r.item_name(s, "service")
    t = r.table(s, t)
    r.known(s, t, OUTSIDE_SERVICE)
    if "listen" not in t:
        r.fail(s, "listen = \"PORT\" (or \"FIRST-LAST\", a range) is missing: where this service's clients "
                  "send")
    listen = r.listen(s + ("listen",), t["listen"])
    key = _service_key(r, s, t, keys)
    top = keys[key].max_clients
    max_clients = r.whole(s + ("max_clients",), t.get("max_clients", top), 1, top,
                          f" (key {key!r} allows {top})" if "max_clients" in t else "")
    per_source = default_per_source(max_clients)
    if "max_clients_per_source" in t:
        per_source = r.whole(s + ("max_clients_per_source",), t["max_clients_per_source"], 1, max_clients,
                             " (its max_clients)")
    wg = _wireguard_keys(r, s, t)
    legacy = r.flag(s + ("legacy",), t.get("legacy", False))
    skew = 120.0
    if "max_clock_skew" in t:
        if not legacy:
            r.fail(s + ("max_clock_skew",), "only applies with legacy = true")
        skew = r.number(s + ("max_clock_skew",), t["max_clock_skew"], 0, 86400, "the clock skew")
    return OutsideService(name, listen, key, max_clients, per_source, wg, legacy, skew, where=r.at(s))


def _service_key(r: _Reader, s: tuple[str, ...], t: dict, keys: dict[str, Key]) -> str:
    """The name of the key whose tunnels carry the service (may be left out when there is one)."""
    if "key" in t:
        key = r.string(s + ("key",), t["key"])
        if key not in keys:
            r.fail(s + ("key",), f"no key named {key!r}: add [keys.{key}] with its file (keys: "
                                 f"{', '.join(keys)})")
        return key
    if len(keys) == 1:
        return next(iter(keys))
    r.fail(s, f"key = \"NAME\" is missing: which inside agent's key carries it ({', '.join(keys)})")


def _wireguard_keys(r: _Reader, s: tuple[str, ...], t: dict) -> tuple[bytes, ...]:
    if "wireguard_key" not in t:
        return ()
    from udp_tunnel.core.wireguard import parse_keys
    v = t["wireguard_key"]
    words = v if isinstance(v, list) else [v]
    text = ",".join(r.string(s + ("wireguard_key",), w) for w in words)
    try:
        return tuple(parse_keys(text))
    except ValueError as e:
        r.fail(s + ("wireguard_key",), str(e))


def _check_listens(r: _Reader, services: list[OutsideService], listen: Listen) -> None:
    """No two services on one port, none overlapping the tunnel port, a legacy service alone on it."""
    for i, a in enumerate(services):
        s = ("services", a.name, "listen")
        if _overlap(a.listen, listen) and a.listen != listen:
            r.fail(s, f"{a.listen} overlaps the tunnel port {listen} ([outside] listen): a service on the "
                      "tunnel port listens on that port alone, with the same address")
        for b in services[:i]:
            if _overlap(a.listen, b.listen):
                r.fail(s, f"{a.listen} overlaps service {b.name!r} ({b.listen}, line "
                          f"{r.where.line(('services', b.name, 'listen'))})")
        if a.legacy and (len(services) > 1 or a.listen != listen):
            r.fail(("services", a.name, "legacy"), "a legacy service must be the only one, on the tunnel port "
                                                   f"({listen}): legacy tunnels carry no service name")


def _overlap(a: Listen, b: Listen) -> bool:
    same_host = a.host is None or b.host is None or a.host.lower() == b.host.lower()
    return same_host and a.ports.overlaps(b.ports)


def _inside(r: _Reader, doc: dict) -> InsideConfig:
    K = ("inside",)  # noqa: N806
    t = r.table(K, doc["inside"])
    r.known(K, t, INSIDE)
    if "outside" not in t:
        r.fail(K, "the outside agent is missing: outside = \"HOST:PORT\" (its tunnel port)")
    outside = r.target(K + ("outside",), t["outside"], single=True)
    key = _inside_key(r, t)
    keepalive = r.number(K + ("keepalive",), t.get("keepalive", 25.0), 0.1, MAX_KEEPALIVE,
                         "the keepalive interval")
    timeout = max(60.0, keepalive)
    if "timeout" in t:
        timeout = r.number(K + ("timeout",), t["timeout"], keepalive, 86400 * 7,
                           "the timeout (at least the keepalive interval)")
    spares = r.whole(K + ("spares",), t.get("spares", 2), 1, 64)
    max_clients = r.whole(K + ("max_clients",), t.get("max_clients", 1000), 1, MAX_CLIENTS)
    extra = r.general(K, t)
    services = _inside_services(r, doc, keepalive, timeout, max_clients)
    return InsideConfig(source=r.path, outside=outside, key=key, keepalive=keepalive, spares=spares,
                        max_clients=max_clients, services=tuple(services), **extra)


def _inside_key(r: _Reader, t: dict) -> Key:
    """[inside] key_file, or insecure_no_key = true: one of the two."""
    K = ("inside",)  # noqa: N806
    insecure = r.flag(K + ("insecure_no_key",), t.get("insecure_no_key", False))
    if insecure == ("key_file" in t):
        r.fail(K, "give key_file = \"PATH\" (the same key as the outside's for this agent; or "
                  "insecure_no_key = true, without a key file)")
    return Key(DEFAULT, file=None if insecure else r.file(K + ("key_file",), t["key_file"]),
               origin="" if insecure else "key file", where=r.at(K + ("key_file",)), given=t.get("key_file", ""))


def _inside_services(r: _Reader, doc: dict, keepalive: float, timeout: float,
                     max_clients: int) -> list[InsideService]:
    svcs = r.table(("services",), doc.get("services", {}))
    if not svcs:
        r.fail(("services",), "no service: add a [services.NAME] table with service = \"HOST:PORT\" "
                              "(NAME as at the outside agent)")
    return [_inside_service(r, name, st, len(svcs) == 1, keepalive, timeout, max_clients)
            for name, st in svcs.items()]


def _inside_service(r: _Reader, name: str, st: object, alone: bool, keepalive: float, timeout: float,
                    max_clients: int) -> InsideService:
    """[services.NAME] of the inside agent; timeout and max_clients are [inside]'s (the default and the bound)."""
    s = ("services", name)
    r.item_name(s, "service")
    st = r.table(s, st)
    r.known(s, st, INSIDE_SERVICE)
    if "service" not in st:
        r.fail(s, "service = \"HOST:PORT\" (or \"HOST:FIRST-LAST\") is missing: where this service runs")
    target = r.target(s + ("service",), st["service"])
    if "timeout" in st:
        timeout = r.number(s + ("timeout",), st["timeout"], keepalive, 86400 * 7,
                           "the timeout (at least the keepalive interval)")
    legacy = r.flag(s + ("legacy",), st.get("legacy", False))
    service = InsideService(
        name, target, timeout,
        r.whole(s + ("max_clients",), st.get("max_clients", max_clients), 1, max_clients,
                " ([inside] max_clients)"),
        r.choice(s + ("client_address",), st.get("client_address", "off"), CLIENT_ADDRESS), legacy,
        where=r.at(s))
    if legacy and (not alone or target.ports.size > 1):
        r.fail(s + ("legacy",), "a legacy service must be the only one, and one port: legacy tunnels carry "
                                "no service name")
    if legacy and service.client_address != "off":
        r.fail(s + ("client_address",), "a legacy service cannot see its clients' addresses: the C tool's "
                                        "protocol does not name them")
    return service


_TOML_ERROR = re.compile(r"(.*) \(at line (\d+), column (\d+)\)$", re.DOTALL)
_TWICE = re.compile(r"Cannot declare \((.*)\) twice$")


def _deepest(text: str, limit: int = 100) -> int:
    """The line where brackets first nest deeper than limit (strings and comments counted too: a guess)."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c in "[{") - (c in "]}")
        if depth > limit:
            return text.count("\n", 0, i) + 1
    return 1


def parse(data: bytes, path: str) -> Config:
    """The configuration in data (the bytes of the file at path); ConfigError when it is wrong."""
    import tomllib

    if len(data) > MAX_FILE:
        raise ConfigError(f"too big ({len(data)} bytes, at most {MAX_FILE}): not a configuration file", path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {col}): save the file as UTF-8",
                          path, line) from None
    text = text.removeprefix("\ufeff")
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        raise ConfigError("lists or tables nested too deep", path, _deepest(text)) from None
    except tomllib.TOMLDecodeError as e:
        m = _TOML_ERROR.match(str(e))
        if not m:
            raise ConfigError(f"not TOML: {e}", path) from None
        problem, line, col = m.group(1), int(m.group(2)), int(m.group(3))
        twice = _TWICE.match(problem)
        if twice:
            names = ".".join(re.findall(r"'((?:[^'\\]|\\.)*)'", twice.group(1)))
            problem = f"[{names}] is declared twice: each table (each service, each key) only once, " \
                      "with a name of its own"
        elif problem == "Cannot overwrite a value":
            problem = "a setting is given twice (or a table names a setting already given)"
        else:
            problem = f"not TOML: {problem[:1].lower()}{problem[1:]} (column {col})"
        raise ConfigError(problem, path, line) from None
    r = _Reader(path, doc, _Locator(text))
    roles = [k for k in ("outside", "inside") if k in doc]
    for k in doc:
        if k not in ("outside", "inside", "keys", "services"):
            near = difflib.get_close_matches(k, ("outside", "inside", "keys", "services"), 1)
            r.fail((k,), f"unknown table or setting {k!r}" + (f" (did you mean {near[0]!r}?)" if near else
                                                               " (known: outside, inside, keys, services)"))
    if len(roles) != 1:
        r.fail(("inside",) if roles == ["outside", "inside"] else (),
               "say which agent this file is for: an [outside] table or an [inside] table (one of them)")
    if roles == ["inside"] and "keys" in doc:
        r.fail(("keys",), "[keys] is for the outside agent: the inside agent has one key_file in [inside]")
    return _outside(r, doc) if roles == ["outside"] else _inside(r, doc)


def load(path: str) -> Config:
    """Read and check the file at path; ConfigError (status 1 when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the configuration file: {e.strerror or e}", path, status=1) from None
    return parse(data, path)


def check_pair(outside: OutsideConfig, inside: InsideConfig) -> None:
    """What can be checked with both ends' files at hand: every inside service is an outside
    service, and a range has the same size at both ends. ConfigError at the inside file's line."""
    for s in inside.services:
        o = next((x for x in outside.services if x.name == s.name), None)
        line = int(s.where.rpartition(":")[2] or 0)
        if o is None:
            raise ConfigError(f"services.{s.name}: the outside agent ({outside.source}) has no service of "
                              f"this name (it has: {', '.join(x.name for x in outside.services)})",
                              inside.source, line)
        if o.listen.ports.size != s.service.ports.size:
            raise ConfigError(f"services.{s.name}.service: {s.service.ports.size} port(s) ({s.service.ports}) "
                              f"here, {o.listen.ports.size} at the outside agent ({o.listen.ports}, {o.where}): "
                              "a range maps port by port, so both must be of one size", inside.source, line)
        if o.legacy != s.legacy:
            raise ConfigError(f"services.{s.name}.legacy: {str(s.legacy).lower()} here, "
                              f"{str(o.legacy).lower()} at the outside agent ({o.where})", inside.source, line)


@dataclass(frozen=True)
class Changes:
    """What a reload changes, by name: services added, removed, changed; keys (outside) added,
    removed or changed (file or limit); the agent's own settings that differ (field names)."""
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.keys or self.settings)


def changes(old: Config, new: Config) -> Changes:
    """From old to new (one role; where a setting is written does not count)."""
    if old.role != new.role:
        raise ValueError(f"a reload cannot turn an {old.role} agent into an {new.role} agent")
    before, after = {s.name: s for s in old.services}, {s.name: s for s in new.services}
    keys: tuple[str, ...] = ()
    if isinstance(old, OutsideConfig) and isinstance(new, OutsideConfig):
        kb, ka = {k.name: k for k in old.keys}, {k.name: k for k in new.keys}
        keys = tuple(n for n in dict.fromkeys([*kb, *ka]) if kb.get(n) != ka.get(n))
    elif isinstance(old, InsideConfig) and isinstance(new, InsideConfig) and old.key != new.key:
        keys = (old.key.name,)
    skip = {"source", "services", "keys", "key"}
    settings = tuple(f for f in old.__dataclass_fields__ if f not in skip and getattr(old, f) != getattr(new, f))
    return Changes(added=tuple(n for n in after if n not in before),
                   removed=tuple(n for n in before if n not in after),
                   changed=tuple(n for n in after if n in before and before[n] != after[n]),
                   keys=keys, settings=settings)


def install_facts(cfg: Config) -> list[tuple[str, str]]:
    """What `make install-*` needs to know of a file, as (name, value) pairs: its role, each key
    file it names (key_file, once per file), the descriptors the agent may need (nofile, for
    LimitNOFILE=), caps (CAP_NET_BIND_SERVICE when a port below 1024 is listened on; CAP_BPF and
    CAP_NET_ADMIN with datapath = "kernel"; CAP_NET_ADMIN and CAP_NET_RAW for a service with
    client_address = "transparent"), the data path (datapath: kernel, or user for auto and user:
    the unit gives the kernel path what it needs only when it is asked for), whether the agent
    needs netlink (netlink: yes or no) and a description for the unit. A key file is as written in
    the file: a relative name is beside it."""
    caps = ["CAP_BPF", "CAP_NET_ADMIN"] if cfg.datapath == "kernel" else []
    if isinstance(cfg, OutsideConfig):
        files = [k.given for k in cfg.keys if k.given]
        low = min([cfg.listen.ports.first] + [s.listen.ports.first for s in cfg.services])
        nofile = sum(s.listen.ports.size for s in cfg.services) + 2 * sum(k.max_clients for k in cfg.keys) + 64
        caps = (["CAP_NET_BIND_SERVICE"] if low < 1024 else []) + caps
        what = f"relay on {cfg.listen}: {', '.join(s.name for s in cfg.services)}"
    else:
        files = [cfg.key.given] if cfg.key.given else []
        nofile = 2 * cfg.max_clients + 2 * cfg.spares + 64
        if any(s.client_address == "transparent" for s in cfg.services):
            caps = list(dict.fromkeys(caps + ["CAP_NET_ADMIN", "CAP_NET_RAW"]))
        what = f"{', '.join(s.name for s in cfg.services)} via {cfg.outside}"
    netlink = "yes" if "CAP_NET_ADMIN" in caps else "no"
    return [("role", cfg.role), *(("key_file", f) for f in files), ("nofile", str(nofile)), ("caps", " ".join(caps)),
            ("datapath", "kernel" if cfg.datapath == "kernel" else "user"), ("netlink", netlink),
            ("description", what)]
