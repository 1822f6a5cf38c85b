"""WireGuard-aware admission for the outside agent (`--wireguard-key`), without any I/O.

A new client takes a tunnel only if its first datagram is a WireGuard
handshake initiation whose MAC1 verifies for one of the server's public keys:

    mac1 = BLAKE2s-128(key = BLAKE2s-256("mac1----" || server public key), initiation[0:116])

(the whitepaper's section 5.4.4; no secret is needed). Everything else from an
unknown source is refused with a reason, and never reaches a tunnel.

Roaming: a WireGuard client whose NAT gave it a new source port keeps sending
transport data (type 4) from there. The server's handshake messages going back
to a client (responses, type 2; and initiations, type 1, when the server starts
a handshake) carry the server's index, which the client then puts in every
transport message as its receiver index. `observe_down` records those indices
per tunnel (they come from the inside agent: the trusted side); `roaming` maps a
type-4 datagram from an unknown address to the tunnel of its session, and
`may_move` decides when the tunnel's client may be moved there (docs/protocol.md,
"WireGuard mode", has the security argument).

Message formats (little-endian type in byte 0, three zero bytes, then):
    1 initiation  148 bytes: sender index [4:8], mac1 [116:132], mac2 [132:148]
    2 response     92 bytes: sender index [4:8], receiver index [8:12], mac1 [60:76]
    3 cookie reply 64 bytes: receiver index [4:8]
    4 transport   >= 32 bytes: receiver index [4:8], counter [8:16]
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections import Counter, deque

INITIATION, RESPONSE, COOKIE_REPLY, TRANSPORT = 1, 2, 3, 4
INITIATION_LEN, RESPONSE_LEN, COOKIE_REPLY_LEN, TRANSPORT_MIN = 148, 92, 64, 32
MAC1_AT = 116  # mac1 covers initiation[0:116] and sits at [116:132]
ZERO3 = b"\0\0\0"
# Sizes of the handshake messages the server sends back that name a session: the I/O
# loop hands datagrams going to a client to the core only at these two lengths.
# (Transport messages are 32 + 16*k bytes long, so they never have either length.)
DOWN_LENS = (RESPONSE_LEN, INITIATION_LEN)

INDICES_PER_TUNNEL = 3  # the current session, the previous one, one being set up
ROAM_QUIET = 0.5  # s the bound client address must have been silent before its tunnel moves
# Initiations admitted lately, by their MAC1: a byte-identical copy is a replay (WireGuard makes
# a new initiation, new ephemeral key and time stamp, for every attempt), refused so that one
# captured initiation can't take a tunnel from each of many source ports.
SEEN_INITIATIONS = 4096


def parse_keys(text: str) -> list[bytes]:
    """Public keys in base64 (as `wg show` prints them), separated by commas or spaces."""
    keys = []
    for word in text.replace(",", " ").split():
        try:
            raw = base64.b64decode(word, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"'{word}' is not a WireGuard public key (32 bytes in base64, "
                             "as 'wg show INTERFACE public-key' prints it)")
        if raw not in keys:
            keys.append(raw)
    if not keys:
        raise ValueError("no key given")
    return keys


def mac1_key(public_key: bytes) -> bytes:
    return hashlib.blake2s(b"mac1----" + public_key).digest()


def mac1(key: bytes, covered: bytes) -> bytes:
    return hashlib.blake2s(covered, digest_size=16, key=key).digest()


def kind(data: bytes) -> int:
    """The WireGuard message type of data, or 0 if it is not shaped like one."""
    n = len(data)
    if n < TRANSPORT_MIN or data[1:4] != ZERO3:
        return 0
    t = data[0]
    if t == TRANSPORT or (t == INITIATION and n == INITIATION_LEN) or (t == RESPONSE and n == RESPONSE_LEN) \
            or (t == COOKIE_REPLY and n == COOKIE_REPLY_LEN):
        return t
    return 0


class Session:
    """What the gate knows about one tunnel's WireGuard client."""

    __slots__ = ("how", "indices", "roams", "mark")

    def __init__(self, how: str) -> None:
        self.how = how  # "handshake": admitted by a valid initiation; "restored": bound again after a restart
        self.indices: list[bytes] = []  # newest last
        self.roams = 0
        self.mark: tuple[int, float] | None = None  # (client datagram count, time) of the first roam attempt


class Gate:
    """Admission of new clients and the table of sessions seen, for one service of the outside
    agent (its --wireguard-key)."""

    def __init__(self, keys: list[bytes], quiet: float = ROAM_QUIET) -> None:
        self.keys = [mac1_key(k) for k in keys]
        self.quiet = quiet
        self.sessions: dict[int, Session] = {}  # tunnel id -> session
        self.index: dict[bytes, int] = {}  # server's index (4 bytes as on the wire) -> tunnel id
        self.seen: set[bytes] = set()  # MAC1 of initiations admitted lately (bounded, oldest forgotten)
        self.seen_order: deque[bytes] = deque()

    # --- datagrams from unknown sources ---

    def admit_new(self, data: bytes) -> str | None:
        """None if data is a handshake initiation with a valid MAC1; else the reason to refuse it
        ('not_handshake', 'bad_mac1', 'replay' for a copy of one admitted lately, 'unknown_session'
        for transport data of no session we know)."""
        t = kind(data)
        if t != INITIATION:
            return "unknown_session" if t == TRANSPORT else "not_handshake"
        covered, tag = data[:MAC1_AT], data[MAC1_AT:MAC1_AT + 16]
        for k in self.keys:
            if hmac.compare_digest(mac1(k, covered), tag):
                break
        else:
            return "bad_mac1"
        if tag in self.seen:
            return "replay"
        self._see(tag)
        return None

    def remember(self, tags: list[bytes]) -> None:
        """Initiations a previous run admitted (the state file): their copies stay refused."""
        for tag in tags[-SEEN_INITIATIONS:]:
            if tag not in self.seen:
                self._see(tag)

    def _see(self, tag: bytes) -> None:
        """Refuse copies of the initiation of MAC1 `tag` from now on (the oldest is forgotten)."""
        self.seen.add(tag)
        self.seen_order.append(tag)
        if len(self.seen_order) > SEEN_INITIATIONS:
            self.seen.discard(self.seen_order.popleft())

    def roaming(self, data: bytes) -> int | None:
        """The tunnel whose session a transport datagram belongs to (by its receiver index), if any."""
        return self.index.get(data[4:8]) if kind(data) == TRANSPORT else None

    def may_move(self, tid: int, sent: int, idle_since: float | None, now: float) -> bool:
        """Whether tunnel tid's client may move to the address a roaming datagram came from.

        Only when the bound address has sent nothing for `quiet` seconds: `sent` is the count of
        datagrams from it so far, `idle_since` a time since which it is known to have been silent
        (or None). A client that is still sending from its address keeps its tunnel."""
        s = self.sessions.get(tid)
        if s is None:
            return False
        if idle_since is not None and now - idle_since >= self.quiet:
            return True
        if s.mark is None or s.mark[0] != sent:
            s.mark = (sent, now)
            return False
        return now - s.mark[1] >= self.quiet

    def moved(self, tid: int) -> None:
        s = self.sessions[tid]
        s.roams += 1
        s.mark = None

    # --- the tunnel's life ---

    def admitted(self, tid: int, how: str = "handshake") -> None:
        self.forget(tid)
        self.sessions[tid] = Session(how)

    def observe_down(self, data: bytes, tid: int) -> None:
        """A datagram the server sent back down tunnel tid (the loop passes only DOWN_LENS sizes)."""
        if kind(data) not in (RESPONSE, INITIATION):
            return
        s = self.sessions.get(tid)
        if s is None:  # bound before this mode knew it (restored after an outside restart)
            s = self.sessions[tid] = Session("restored")
        idx = data[4:8]
        if idx in s.indices:
            return
        old = self.index.get(idx)
        if old is not None and old != tid and old in self.sessions:  # reused by the server: latest wins
            self.sessions[old].indices.remove(idx)
        self.index[idx] = tid
        s.indices.append(idx)
        if len(s.indices) > INDICES_PER_TUNNEL:
            del self.index[s.indices.pop(0)]

    def forget(self, tid: int) -> None:
        s = self.sessions.pop(tid, None)
        if s is not None:
            for idx in s.indices:
                if self.index.get(idx) == tid:
                    del self.index[idx]

    # --- what the operator sees ---

    def describe(self, tid: int) -> dict | None:
        s = self.sessions.get(tid)
        if s is None:
            return None
        return {"admitted": s.how, "sessions": len(s.indices), "roams": s.roams}

    def summary(self) -> dict:
        how = Counter(s.how for s in self.sessions.values())
        return {"keys": len(self.keys), "clients": dict(how), "sessions": len(self.index)}
