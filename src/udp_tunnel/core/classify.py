"""The one rule for which datagrams of a known flow the core must see.

Data carries no header, so a datagram is told apart from data by its length
alone, and, where the protocol has one, by a prefix compared only when the
length matches (docs/protocol.md, "Why this meets each requirement", 8). The
I/O paths forward everything else themselves; datagrams from unknown sources
are always the core's.

    rule = outside_rule(legacy=False, wireguard=False)
    if n in rule.lengths and rule.kind(view[:n]) is not Kind.DATA: hand it to the core

The rule per role and mode:

| role    | mode      | CONTROL                          | HANDSHAKE (WireGuard mode only)   |
|---------|-----------|----------------------------------|-----------------------------------|
| outside | v2        | 144 bytes starting with b"UDPT"  | 92 and 148 bytes                  |
| outside | legacy    | 40 bytes                         | 92 and 148 bytes                  |
| inside  | v2        | 144 bytes starting with b"UDPT"  | -                                 |
| inside  | legacy    | (none: the C outside never sends control) | -                        |
"""

from __future__ import annotations

import enum

from udp_tunnel.core.wireguard import DOWN_LENS
from udp_tunnel.wire import proto


class Kind(enum.IntEnum):
    DATA = 0  # forwarded as is
    CONTROL = 1  # a control message (v2), or any datagram of the legacy keepalive's length
    HANDSHAKE = 2  # WireGuard mode: a handshake message whose session the outside learns


class Classifier:
    """`lengths`: the lengths of datagrams that may be the core's (a set, for the fast paths'
    first test); `kind(data)`: what a datagram is."""

    __slots__ = ("lengths", "_by_len")

    def __init__(self, by_len: dict[int, tuple[bytes, Kind]]) -> None:
        self._by_len = by_len
        self.lengths = frozenset(by_len)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Classifier) and self._by_len == other._by_len

    def __hash__(self) -> int:
        return hash(frozenset(self._by_len.items()))

    def kind(self, data: bytes | memoryview) -> Kind:
        rule = self._by_len.get(len(data))
        if rule is None:
            return Kind.DATA
        prefix, kind = rule
        return kind if data[:len(prefix)] == prefix else Kind.DATA

    def core_sees(self, data: bytes | memoryview) -> bool:
        return self.kind(data) is not Kind.DATA

    def run_may_hold(self, n: int, seg: int) -> bool:
        """A coalesced run of n bytes in seg-byte segments (GRO) may hold a datagram the core
        must see: its segments must then be looked at one by one."""
        return seg in self.lengths or n % seg in self.lengths


def outside_rule(legacy: bool, wireguard: bool) -> Classifier:
    rule = {proto.LEGACY_LEN: (b"", Kind.CONTROL)} if legacy else {proto.CTRL_LEN: (proto.MAGIC, Kind.CONTROL)}
    if wireguard:
        for n in DOWN_LENS:
            rule.setdefault(n, (b"", Kind.HANDSHAKE))
    return Classifier(rule)


def inside_rule(legacy: bool) -> Classifier:
    return Classifier({} if legacy else {proto.CTRL_LEN: (proto.MAGIC, Kind.CONTROL)})
