"""Control messages and their authentication (docs/protocol.md has the bytes).

Data datagrams carry no header at all. A control message is told apart from
data by its exact length and its 4-byte magic, so the data path pays one
length comparison.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass

MAGIC = b"UDPT"
VERSION = 3

KEEPALIVE = 1  # inside -> outside
REPLY = 2  # outside -> inside
ANNOUNCE = 3  # outside -> inside, down a tunnel: the client it now carries, before its first datagram

# Keepalive flags
F_ACTIVE = 0x01  # this tunnel carries a client; never hand it out as a spare
F_CLOSING = 0x02  # the inside closed this tunnel; forget it now
F_PROBE = 0x04  # keepalive: this spare now idles on purpose (its mapping's lifetime is measured)
# Reply flags
F_REGISTERED = 0x01  # the cookie was valid: the tunnel is registered at the source address
F_BOUND = 0x02  # the tunnel is bound to the client in the peer field
F_REFUSED = 0x04  # the outside is at its tunnel limit and did not register it
F_REKEY = 0x08  # the keepalive was made with an old key: send the next one with the current key
F_HELLO = 0x10  # unasked, from an outside agent that just started: register again now
# Announce flags
F_MOVED = 0x01  # the tunnel's client now sends from a new address (WireGuard roaming)
F_GONE = 0x02  # the outside let the tunnel's client go (evicted, its service stopped): close the tunnel

_BODY = struct.Struct("!4sBBBBQQQQ16s16sHH16sHH16s")
BODY_LEN = _BODY.size  # 112
TAG_LEN = 32
CTRL_LEN = BODY_LEN + TAG_LEN  # 144
NONCE_END = 40  # bytes 0..39 (magic to the message number) are the keystream's nonce
COOKIE_LEN = 16
NO_PEER = bytes(18)
SERVICE_LEN = 16
NO_SERVICE = bytes(SERVICE_LEN)

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
    active: int = 0  # keepalive: active tunnels the inside has; reply: clients waiting for a spare;
    # announce: the client's datagrams the outside forwarded down the tunnel before it
    key: int = 0  # which of the codec's keys made (encode) or verified (decode) the tag
    seen: bytes = NO_PEER  # reply: where the outside sees the tunnel; announce: where the client sent to;
    # an active tunnel's keepalive: zeros, its port field the client's port offset
    interval: int = 0  # keepalive: seconds until its next keepalive; announce, reply BOUND: the port's offset
    nonce: int = 0  # the sender's message number: never the same twice in one session under one key
    service: bytes = NO_SERVICE  # announce, reply BOUND, active keepalive: service_id() of the client's service


# The key is stretched with scrypt (memory-hard: 32 MiB and about 0.1 s per guess), so a
# captured control message does not let anyone test guesses of a weak key quickly.
KDF_SALT = b"udp-tunnel control v2"
KDF_N, KDF_R, KDF_P = 1 << 15, 8, 1
SECRET_FIELDS = slice(56, 112)  # peer, count, seen address, interval, service: encrypted


def service_id(name: str) -> bytes:
    """How control messages name a service: 16 bytes of BLAKE2s of its name."""
    return hashlib.blake2s(name.encode(), digest_size=SERVICE_LEN).digest()


def key_id(mac_key: bytes) -> int:
    """A byte that tells which key made a message (a hint: the tag decides)."""
    return hmac.new(mac_key, b"udp-tunnel key id", hashlib.sha256).digest()[0]


def key_list(secret: bytes) -> list[bytes]:
    """The keys in a key file: the current one first, then old ones still accepted while a
    key is rotated. A key with no newline in it is one key."""
    keys = [k.strip(b"\r") for k in secret.split(b"\n") if k.strip(b"\r")]
    return keys or [b""]


@functools.lru_cache(maxsize=8)
def derive_keys(secret: bytes) -> tuple[bytes, bytes]:
    """(MAC key, encryption key) from the pre-shared secret."""
    k = hashlib.scrypt(secret, salt=KDF_SALT, n=KDF_N, r=KDF_R, p=KDF_P, maxmem=64 << 20, dklen=64)
    return k[:32], k[32:]


def is_control(data: bytes | memoryview) -> bool:
    return len(data) == CTRL_LEN and data[:4] == MAGIC


def _xor(data: bytes, enc_key: bytes, nonce: bytes) -> bytes:
    """Encrypt or decrypt the secret fields: XOR with HMAC(enc_key, nonce), a PRF keystream.
    The nonce (magic to the message number of the same message) is never reused under one
    key: the sender's session is drawn at random at each start and its message number
    counts every message it sends."""
    stream = b"".join(hmac.new(enc_key, bytes(nonce) + bytes([i]), hashlib.sha256).digest()
                      for i in range((len(data) + 31) // 32))
    return bytes(a ^ b for a, b in zip(data, stream, strict=False))


class Codec:
    """Encodes and authenticates control messages: HMAC-SHA-256 over the whole message,
    the client address and counts encrypted. Several keys while a key is rotated:
    the first encodes, every one verifies."""

    __slots__ = ("_keys", "ids")

    def __init__(self, *secrets: bytes) -> None:
        self._keys = [derive_keys(s) for s in secrets]
        self.ids = [key_id(mac) for mac, _ in self._keys]

    def encode(self, m: Control) -> bytes:
        mac_key, enc_key = self._keys[m.key]
        body = bytearray(_BODY.pack(
            MAGIC, VERSION, m.type, m.flags, self.ids[m.key], m.session, m.tunnel, m.counter, m.nonce,
            m.cookie, m.peer[:16], int.from_bytes(m.peer[16:18], "big"), min(m.active, 0xFFFF),
            m.seen[:16], int.from_bytes(m.seen[16:18], "big"), min(m.interval, 0xFFFF), m.service,
        ))
        body[SECRET_FIELDS] = _xor(body[SECRET_FIELDS], enc_key, body[:NONCE_END])
        return bytes(body) + hmac.new(mac_key, body, hashlib.sha256).digest()

    def knows(self, data: bytes) -> bool:
        """The key-id byte names one of this codec's keys (a hint, checked before any MAC)."""
        return data[7] in self.ids

    def _verify(self, body: bytes, tag: bytes) -> int:
        """The index of the key that made `tag` (only keys whose id the message names are tried)."""
        for i, (mac_key, _) in enumerate(self._keys):
            if self.ids[i] == body[7] and hmac.compare_digest(hmac.new(mac_key, body, hashlib.sha256).digest(), tag):
                return i
        raise ControlError("auth")

    def decode(self, data: bytes) -> Control:
        """Parse and verify; raises ControlError('malformed'|'auth') otherwise."""
        if len(data) != CTRL_LEN or data[:4] != MAGIC:
            raise ControlError("malformed")
        body = data[:BODY_LEN]
        i = self._verify(body, data[BODY_LEN:])
        body = body[:SECRET_FIELDS.start] + _xor(body[SECRET_FIELDS], self._keys[i][1], body[:NONCE_END])
        (_, ver, typ, flags, _, session, tunnel, counter, nonce, cookie, paddr, pport, active,
         saddr, sport, interval, service) = _BODY.unpack(body)
        if ver != VERSION or typ not in (KEEPALIVE, REPLY, ANNOUNCE):
            raise ControlError("malformed")
        return Control(typ, flags, session, tunnel, counter, cookie, paddr + pport.to_bytes(2, "big"), active, i,
                       saddr + sport.to_bytes(2, "big"), interval, nonce, service)


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
