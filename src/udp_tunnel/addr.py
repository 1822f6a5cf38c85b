"""Address parsing, name resolution and display."""

from __future__ import annotations

import re
import socket

HOST = re.compile(r"[\w.-]+")  # a name (also an IDN) or an IPv4 address; no spaces, quotes or shell characters
HOST6 = re.compile(r"[\w.:%-]+")  # inside brackets: an IPv6 address, with a %scope perhaps


class AddrError(ValueError):
    """A user-supplied address that is written wrong; str() is the message."""


class ResolveError(AddrError):
    """A well-formed host name that does not resolve."""


def _port(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 65535:
        raise AddrError(f"{what}: bad port {text!r} (1-65535)")
    return int(text)


def split_hostport(text: str, what: str) -> tuple[str, int]:
    """'host:port', '192.0.2.1:9', '[2001:db8::1]:9' -> (host, port)."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or not host:
            raise AddrError(f"{what}: expected [IPV6]:PORT, got {text!r}")
        if not HOST6.fullmatch(host):
            raise AddrError(f"{what}: bad address {host!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise AddrError(f"{what}: expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise AddrError(f"{what}: put an IPv6 address in brackets, as in [{host}]:{port}")
        if not HOST.fullmatch(host):
            raise AddrError(f"{what}: bad host name {host!r}")
    return host, _port(port, what)


def parse_listen(text: str) -> tuple[str | None, int]:
    """'9999' (every address, IPv4 and IPv6), 'HOST:PORT' or '[V6]:PORT'."""
    if text.isascii() and text.isdigit():
        return None, _port(text, "--listen")
    return split_hostport(text, "--listen")


def resolve(host: str, port: int, what: str, family: int = socket.AF_UNSPEC,
            prefer_v4: bool = False) -> tuple[int, tuple]:
    """(family, sockaddr) for a UDP peer; the first answer of getaddrinfo, or
    the first IPv4 one with prefer_v4 (what the C tool, IPv4 only, would use)."""
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ResolveError(f"{what}: cannot resolve {host!r}: {getattr(e, 'strerror', None) or e}") from None
    if prefer_v4:
        infos.sort(key=lambda i: i[0] != socket.AF_INET)
    fam, _, _, _, sockaddr = infos[0]
    return fam, sockaddr


def unmapped(host: str) -> str:
    """An IPv4-mapped IPv6 address (::ffff:192.0.2.1) as the IPv4 address it is; any other as it is."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def family(host: str) -> int:
    """The address family of an address literal."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def show(addr: tuple | None) -> str:
    """An address as a person writes it: 192.0.2.1:9 or [2001:db8::1]:9."""
    if not addr:
        return "-"
    host = unmapped(addr[0])
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
