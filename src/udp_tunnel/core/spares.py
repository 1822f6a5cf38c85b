"""How many spare tunnels the inside agent keeps beyond --spares: enough for the clients that
arrive while new spares register, measured (sans-I/O, time is a parameter).

Every client takes a spare, and the spare opened in its place is ready one registration later
(a keepalive, the outside's challenge, the answer: about one round trip). So a steady arrival
rate r needs r x (registration time) spares in flight, twice that for safety; a burst needs as
many as arrive at once. Both are measured over the last WINDOW seconds, so the pool grows with
the demand at once and shrinks within WINDOW seconds once it falls; MAX_EXTRA bounds it.
"""

from __future__ import annotations

import math
from collections import deque

WINDOW = 10.0  # seconds of arrivals remembered
BURST = 0.1  # seconds: arrivals this close together count as one burst
MAX_EXTRA = 256  # spares opened for demand beyond --spares
FIRST_REGISTRATION = 0.1  # s: the registration time assumed until one is measured
SMOOTH = 0.2  # weight of a new registration time in the running figure


class Demand:
    __slots__ = ("buckets", "total", "registration")

    def __init__(self) -> None:
        self.buckets: deque[list] = deque()  # [bucket index, arrivals in it], oldest first
        self.total = 0
        self.registration = FIRST_REGISTRATION

    def arrived(self, now: float) -> None:
        """A client took a spare."""
        b = int(now / BURST)
        if self.buckets and self.buckets[-1][0] == b:
            self.buckets[-1][1] += 1
        else:
            self.buckets.append([b, 1])
        self.total += 1

    def registered(self, seconds: float) -> None:
        """A new spare registered `seconds` after it was opened."""
        self.registration += SMOOTH * (min(seconds, 5.0) - self.registration)

    def forget(self, now: float) -> None:
        oldest = int((now - WINDOW) / BURST)
        while self.buckets and self.buckets[0][0] < oldest:
            self.total -= self.buckets.popleft()[1]

    def extra(self, now: float, waiting: int = 0) -> int:
        """Spares to keep beyond --spares: clients held at the outside for want of one
        (`waiting`), the largest burst, or twice the arrival rate times the registration time."""
        self.forget(now)
        burst = max((n for _, n in self.buckets), default=0)
        steady = math.ceil(round(2 * self.total / WINDOW * self.registration, 6))
        return min(MAX_EXTRA, max(waiting, burst, steady))

    def snapshot(self) -> dict:
        return {"arrivals_per_s": self.total / WINDOW, "registration_s": self.registration}
