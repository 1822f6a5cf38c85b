"""Control messages and their authentication (docs/protocol.md has the bytes).

Data datagrams carry no header at all. A control message is told apart from
data by its exact length and its 4-byte magic, so the data path pays one
length comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass

MAGIC = b"UDPT"
VERSION = 1

KEEPALIVE = 1  # inside -> outside
REPLY = 2  # outside -> inside

# Keepalive flags
F_ACTIVE = 0x01  # this tunnel carries a client; never hand it out as a spare
F_CLOSING = 0x02  # the inside closed this tunnel; forget it now
# Reply flags
F_REGISTERED = 0x01  # the cookie was valid: the tunnel is registered at the source address
F_BOUND = 0x02  # the tunnel is bound to the client in the peer field
F_REFUSED = 0x04  # the outside is at its tunnel limit and did not register it

_BODY = struct.Struct("!4sBBBxQQQ16s16sHH")
BODY_LEN = _BODY.size  # 68
TAG_LEN = 32
CTRL_LEN = BODY_LEN + TAG_LEN  # 100
COOKIE_LEN = 16
NO_PEER = bytes(18)

LEGACY_LEN = 40
_LE64 = struct.Struct("<Q")


class ControlError(Exception):
    """A control-looking datagram that must be dropped; args[0] is the reason."""


@dataclass(slots=True)
class Control:
    type: int
    flags: int
    session: int  # the sender's random per-process session id
    tunnel: int  # tunnel id, chosen at random by the inside agent
    counter: int  # keepalive: sender's counter; reply: the answered keepalive's counter
    cookie: bytes = bytes(COOKIE_LEN)
    peer: bytes = NO_PEER  # client address, 16-byte IPv6 (v4-mapped) + 2-byte port
    active: int = 0  # keepalive: how many active tunnels the inside agent has (at most 65535)


def derive_key(secret: bytes) -> bytes:
    """The HMAC key: the pre-shared secret bound to this protocol and version."""
    return hmac.new(secret, b"udp-tunnel control v1", hashlib.sha256).digest()


def is_control(data: bytes | memoryview) -> bool:
    return len(data) == CTRL_LEN and data[:4] == MAGIC


class Codec:
    """Encodes and authenticates control messages with HMAC-SHA-256."""

    __slots__ = ("_key",)

    def __init__(self, secret: bytes) -> None:
        self._key = derive_key(secret)

    def encode(self, m: Control) -> bytes:
        body = _BODY.pack(
            MAGIC, VERSION, m.type, m.flags, m.session, m.tunnel, m.counter,
            m.cookie, m.peer[:16], int.from_bytes(m.peer[16:18], "big"), min(m.active, 0xFFFF),
        )
        return body + hmac.new(self._key, body, hashlib.sha256).digest()

    def decode(self, data: bytes) -> Control:
        """Parse and verify; raises ControlError('malformed'|'auth') otherwise."""
        if len(data) != CTRL_LEN or data[:4] != MAGIC:
            raise ControlError("malformed")
        body = data[:BODY_LEN]
        tag = hmac.new(self._key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, data[BODY_LEN:]):
            raise ControlError("auth")
        _, ver, typ, flags, session, tunnel, counter, cookie, paddr, pport, active = _BODY.unpack(body)
        if ver != VERSION or typ not in (KEEPALIVE, REPLY):
            raise ControlError("malformed")
        return Control(typ, flags, session, tunnel, counter, cookie, paddr + pport.to_bytes(2, "big"), active)


def pack_peer(addr: tuple) -> bytes:
    """A socket address (IPv4 or IPv6 tuple) as 18 bytes: v4-mapped IPv6 + port."""
    host = addr[0].split("%", 1)[0]
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host)
    else:
        raw = b"\0" * 10 + b"\xff\xff" + socket.inet_aton(host)
    return raw + addr[1].to_bytes(2, "big")


def unpack_peer(peer: bytes, family: int) -> tuple | None:
    """The inverse of pack_peer, in the form recvfrom returns on a socket of `family`."""
    if peer == NO_PEER:
        return None
    raw, port = peer[:16], int.from_bytes(peer[16:], "big")
    mapped = raw[:12] == b"\0" * 10 + b"\xff\xff"
    if family == socket.AF_INET:
        return (socket.inet_ntoa(raw[12:]), port) if mapped else None
    return (socket.inet_ntop(socket.AF_INET6, raw), port, 0, 0)


def cookie(secret: bytes, slot: int, session: int, tunnel: int, addr: tuple) -> bytes:
    """Stateless proof that the bearer receives datagrams at `addr`."""
    msg = slot.to_bytes(8, "big") + session.to_bytes(8, "big") + tunnel.to_bytes(8, "big") + pack_peer(addr)
    return hmac.new(secret, msg, hashlib.sha256).digest()[:COOKIE_LEN]


# --- the C tool's format (docs/protocol.md, "Legacy mode") ---

def legacy_keepalive(password: bytes, nonce: int) -> bytes:
    n = _LE64.pack(nonce)
    return n + hashlib.sha256(password + n).digest()


def legacy_verify(password: bytes, data: bytes) -> int | None:
    """The nonce of a genuine legacy keepalive, or None."""
    if len(data) != LEGACY_LEN:
        return None
    n = data[:8]
    if not hmac.compare_digest(hashlib.sha256(password + n).digest(), data[8:]):
        return None
    return _LE64.unpack(n)[0]
