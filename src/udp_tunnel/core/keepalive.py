"""How often to send keepalives: learn how long the NATs on the path keep a
UDP mapping, and stay safely under it (sans-I/O, time is a parameter).

The inside agent lets one spare tunnel idle on purpose for a chosen time (a
probe, the way RFC 5780 measures a binding's lifetime) and then asks the
outside agent, with a keepalive, at which address it sees that tunnel: the
same address as before means the mapping survived the idle time, a new one
means the NAT forgot it. A binary search between the longest idle seen to
survive (`survived`) and the shortest seen to lapse (`lapsed`) converges in
a few probes. Every tunnel then keeps alive at SAFETY x `survived`, within
[MIN_INTERVAL, the -t upper bound]. A mapping seen to change on a tunnel in
normal use also counts as a lapse at the time it idled.
"""

from __future__ import annotations

START = 10.0  # interval until anything is known: under the shortest carrier timeouts seen (~20 s)
MIN_INTERVAL = 2.0
SAFETY = 0.8  # interval = SAFETY x the longest idle seen to survive
FIRST_PROBE = 20.0
RELEARN = 3600.0  # forget the lapse figure this often and look above it again (a NAT may change)


class Learner:
    def __init__(self, upper: float, now: float) -> None:
        self.upper = upper  # -t: never more than this
        self.survived = 0.0  # longest idle a mapping was seen to survive
        self.lapsed = float("inf")  # shortest idle after which a mapping was gone
        self.lapses = 0
        self.probes = 0
        self.relearn_at = now + RELEARN

    def interval(self) -> float:
        if self.survived <= 0:
            i = min(START, self.lapsed * SAFETY)
        else:
            i = SAFETY * self.survived
        return max(min(i, self.upper), min(MIN_INTERVAL, self.upper))

    def done(self) -> bool:
        """Nothing more worth knowing: at the upper bound, or the bounds are close."""
        if SAFETY * self.survived >= self.upper:
            return True
        return self.lapsed - self.survived <= max(2.0, 0.1 * self.survived)

    def next_probe(self, now: float) -> float | None:
        """How long the next probe should idle (None: no probe needed now)."""
        if now >= self.relearn_at:
            self.relearn_at = now + RELEARN
            self.lapsed = float("inf")
        if self.done():
            return None
        if self.lapsed == float("inf"):
            d = max(FIRST_PROBE, 2 * self.survived)
        else:
            d = (self.survived + self.lapsed) / 2
        return min(d, self.upper / SAFETY)

    def result(self, idle: float, survived: bool) -> None:
        """What a probe (or a tunnel in use, idle that long) showed."""
        self.probes += 1
        if survived:
            self.survived = max(self.survived, idle)
            if self.lapsed <= self.survived:
                self.lapsed = float("inf")  # the NAT changed: look again
        else:
            self.lapses += 1
            self.lapsed = min(self.lapsed, idle)
            if self.survived >= self.lapsed:
                self.survived = self.lapsed / 2

    def snapshot(self) -> dict:
        return {"interval": self.interval(), "survived": self.survived or None,
                "lapsed": None if self.lapsed == float("inf") else self.lapsed,
                "learned": self.done(), "lapses": self.lapses, "probes": self.probes}
