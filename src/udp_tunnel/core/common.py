"""What both sans-I/O cores share: their output types, the fast path's meters,
rate limits, the replay window and the pieces of a status snapshot.

Both cores have one shape (as aioquic's QuicConnection): datagrams and events
go in with the time `now`; what to do comes out as typed actions, handed over
by `take()` (the outside: `Datagram`s; the inside: the actions in inside.py);
`next_timer()` says when to call `on_timer(now)`.

The I/O loop never writes into a core's objects, with one exception made for
speed and kept in one class: a `Meter` (and the outside's `Flow`, a meter
with a destination) is created by a core and handed to the loop, which
counts the datagrams it forwards on its own into it. The core counts into the
same meters the datagrams it forwards itself, and samples them for activity.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Logger(Protocol):
    """What a core needs of a log (ops.log.Log is one): the core never writes anywhere itself."""

    def debug(self, msg: str) -> None: ...
    def info(self, msg: str) -> None: ...
    def warning(self, msg: str) -> None: ...
    def limited(self, key: str, msg: str, prio: int = ...) -> None: ...


class Datagram(NamedTuple):
    """Send `data` to `addr` (outside agent: from endpoint `via`, the tunnel port by default)."""

    data: bytes
    addr: tuple
    via: int = 0


class Meter:
    """Datagrams and bytes the loop forwarded on one path, counted by the loop."""

    __slots__ = ("pkts", "bytes")

    def __init__(self) -> None:
        self.pkts = 0
        self.bytes = 0


class Flow(Meter):
    """One direction of a bound tunnel at the outside: where datagrams from a source go, and
    from which endpoint (the local port, by index: 0 when there is one); `up`: from the client
    to the tunnel."""

    __slots__ = ("dst", "via", "up")

    def __init__(self, dst: tuple, via: int = 0, up: bool = False) -> None:
        super().__init__()
        self.dst = dst
        self.via = via
        self.up = up


class Activity:
    """When a meter last moved, sampled once a second by a core's timer."""

    __slots__ = ("seen", "last")

    def __init__(self, now: float | None = None) -> None:
        self.seen = 0
        self.last = now

    def sample(self, m: Meter, now: float) -> bool:
        """True when `m` moved since the last sample."""
        if m.pkts != self.seen:
            self.seen, self.last = m.pkts, now
            return True
        return False


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "t")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ReplayWindow:
    """Which counters of one sender were seen: the highest, and a bitmap of the
    WINDOW below it (as IPsec and WireGuard keep it). Each counter passes once."""

    WINDOW = 4096
    __slots__ = ("top", "bits")

    def __init__(self) -> None:
        self.top = 0
        self.bits = 0

    def fresh(self, c: int) -> bool:
        """Check and mark: False for a counter seen before or too far below the top."""
        if c > self.top:
            shift = c - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.WINDOW) - 1) if shift < self.WINDOW else 1
            self.top = c
            return True
        off = self.top - c
        if off >= self.WINDOW or self.bits >> off & 1:
            return False
        self.bits |= 1 << off
        return True


TRAFFIC = ("datagrams_in", "bytes_in", "datagrams_out", "bytes_out")  # the keys of `totals` in snapshots


def traffic(inward: Meter, outward: Meter) -> dict[str, int]:
    """A tunnel's traffic under the TRAFFIC keys: `inward` towards the service, `outward` back."""
    return {"datagrams_in": inward.pkts, "bytes_in": inward.bytes,
            "datagrams_out": outward.pkts, "bytes_out": outward.bytes}


def leg(m: Meter | None, act: Activity | None, now: float) -> dict:
    """One direction of a tunnel's traffic, as snapshots show it."""
    if m is None:
        return {"datagrams": 0, "bytes": 0, "last": None}
    last = act.last if act is not None else None
    return {"datagrams": m.pkts, "bytes": m.bytes, "last": None if last is None else now - last}


class CoreError(AssertionError):
    """A table invariant does not hold (raised by check_invariants)."""
