"""Who takes a tunnel at the outside agent: new clients, their source's limits, and the
first datagrams held while no spare is ready.

`Admission` owns the held clients, the per-source records and the challenge
budget; the tunnels are its core's (outside.py), which it asks through a few
named methods: `ready_spare`, `bind`, `forward`, `recovered`, `move_client`, and
`_remove` to evict a tunnel.

- A new client takes the spare with the freshest keepalive and its first datagram goes
  down at once. With no spare ready (or while a restarted outside waits for the active
  tunnels to come back) its datagrams are held, in order, within the HOLD_* bounds, and
  go down the first spare that registers.
- Sources are counted at several prefix lengths (V6_LEVELS, V4_LEVELS): an IPv6 /64, the /56 and the /48
  around it; an IPv4 address and its /24. A level of factor f holds at most f x
  `max_per_source` tunnels (never more than --max-clients), f x UNANSWERED_PER_SOURCE whose
  client never got a datagram back and f x HOLD_PER_SOURCE held clients, and gets f x
  CHALLENGE_RATE challenges a second: one host with a /56 (256 /64s) or a /48 is not
  hundreds of sources. A new client takes a tunnel only within every level's limits.
- A spray from many addresses (one datagram per source port) must not keep real clients
  out. A held client that sends again REPEAT_GAP s after its first datagram keeps talking: it
  goes before those that sent once, takes the place of the oldest of them when the hold is
  full, and a new client refused or dropped is remembered (RECENT), so its next datagram counts
  as such. The last `reserve` tunnels of the table (--max-clients / 16, at most RESERVE_MAX)
  are for such clients only (in WireGuard mode only under pressure), so that a spray that
  fills the rest of the table finds the inside with spares for them already. When such a
  client finds the table full (--max-clients), tunnels that carry
  one-shot flows are evicted (never one bound less than MIN_AGE s ago, never
  one whose client or service sent anything after its first burst, never one restored after a
  restart): through the core's `_remove`, which tells the inside at once (an ANNOUNCE saying
  GONE; should it be lost, the tunnel's next keepalive is refused), and the inside closes it
  (of the one-shot tunnels, those whose keepalive is due soonest go first: the fallback is
  soonest for them). For PRESSURE s after, evictions keep the reserve free. With
  room in the table but no spare for STARVED s (the inside at a lower limit), one tunnel is
  evicted, and another only once the inside must have learned of the last one (its keepalive
  interval). Never in legacy mode (a legacy inside is not told).
- With --wireguard-key (wireguard.py), only a valid handshake initiation takes a tunnel,
  and a known session's transport data from a new address is its client roaming (within its
  new source's limits).
"""

from __future__ import annotations

import heapq
import socket
from collections import Counter, OrderedDict
from typing import Any

from udp_tunnel.addr import show, unmapped
from udp_tunnel.core.common import Datagram, TokenBucket

# A new client's first datagrams wait here when no spare tunnel is ready (or while
# this agent, just restarted, waits for the active tunnels to come back).
HOLD_TIME = 3.0  # seconds a held client waits at most
HOLD_DATAGRAMS = 16  # per client
HOLD_BYTES = 64 * 1024  # per client
HOLD_CLIENTS = 1024  # in all
HOLD_PER_SOURCE = 128  # per source address
HOLD_TOTAL_BYTES = 4 << 20
# A source (an IPv4 address or an IPv6 /64) holds at most this many tunnels whose
# client has not had a single datagram back: a spray of junk from many ports of one
# host takes a few tunnels, not the pool.
UNANSWERED_PER_SOURCE = 32
SOURCES = 8192  # source records kept, every level counted (least recently used go first)
CHALLENGE_RATE = 50.0  # per source and second (the burst is the tunnel table's size)
CHALLENGE_GLOBAL = 2000.0  # in all, per second: bounds what spoofed floods can reflect
# The prefix lengths sources are counted at, each with the factor its limits are multiplied by
# (bytes of the packed address, factor), the source itself first. A household's clients sit in
# one /64 (its LAN) or a few of its /56; a site's in its /48 (which a tunnel broker also gives
# anyone for free): at the default --max-clients-per-source (a quarter of --max-clients) a /56
# holds at most half the table, a /48 three quarters, so another network always finds room.
V6_LEVELS = ((8, 1), (7, 2), (6, 3))  # /64, /56, /48
V4_LEVELS = ((4, 1), (3, 2))  # the address, its /24 (an ISP's or a CG-NAT's pool can be larger)
POLL = 0.05  # timer while clients are held
# One-shot flows (a spray: one datagram, or one burst, per source port) and clients that keep
# talking. A new client keeps talking when it sends again REPEAT_GAP s or more after its first
# datagram (every client that retransmits or goes on does; a spray does not). A bound tunnel
# carries a one-shot flow while neither its client nor the service has sent anything after
# their first burst (BURST s): its meters are looked at every LOOK s while in that burst (the
# timer wakes for it), then once more when it could be evicted.
REPEAT_GAP = 0.2
BURST = 1.0
LOOK = 0.25
MIN_AGE = 1.25  # s a tunnel is bound before it may be evicted (past its first burst)
SCAN = 1024  # one-shot tunnels looked at for the victims whose keepalive is due soonest
PRESSURE = 60.0  # s evictions make the reserve again after a client that keeps talking found the table full
RESERVE_MAX = 64  # the reserve: --max-clients / 16, at most this
STARVED = 1.0  # s a client that keeps talking waits, with room in the table but no spare, before an eviction
RECENT = 32768  # new clients refused lately, remembered by address (two generations of this many)
INF = float("inf")
WG_REASONS = {  # WireGuard mode: why a new source was refused (stats drop_wg_<reason>)
    "not_handshake": "not a WireGuard handshake initiation",
    "bad_mac1": "WireGuard handshake initiation with a wrong MAC1 (is --wireguard-key the server's public key?)",
    "unknown_session": "WireGuard transport data of no session seen here",
    "replay": "a copy of a WireGuard handshake initiation already admitted (replayed)",
}



def default_per_source(max_clients: int) -> int:
    """The most clients of one source when not given (--max-clients-per-source): a quarter, at least 16."""
    return max(16, max_clients // 4)

class Source:
    """One prefix that new clients come from (V6_LEVELS, V4_LEVELS): its budgets and what it holds.
    `up` is the next shorter prefix's record (None at the top); counts include everything
    below, so a record is busy while any address under it is."""

    __slots__ = ("key", "up", "factor", "challenges", "unanswered", "pending", "bound", "limit", "fresh")

    def __init__(self, key, factor: int, now: float, burst: float, limit: int, fresh: dict) -> None:
        self.key = key
        self.fresh = fresh  # the admission's tunnels that may carry one-shot flows
        self.up: Source | None = None
        self.factor = factor
        self.challenges = TokenBucket(CHALLENGE_RATE * factor, burst, now)
        self.unanswered: list = []  # of the core's tunnels
        self.pending = 0
        self.bound = 0  # tunnels its clients hold
        self.limit = limit

    def chain(self) -> list[Source]:
        """This record and those of the prefixes around it, longest first."""
        out, s = [], self
        while s is not None:
            out.append(s)
            s = s.up
        return out

    def take(self, t: Any) -> None:
        """Tunnel t is bound to a client from here."""
        for s in self.chain():
            s.unanswered.append(t)
            s.bound += 1

    def join(self) -> None:
        """A tunnel's client (answered before) now sends from here: a WireGuard client roaming."""
        for s in self.chain():
            s.bound += 1

    def leave(self, t: Any) -> None:
        """Tunnel t no longer carries a client from here (gone, or its client roamed)."""
        self.fresh.pop(t, None)
        for s in self.chain():
            s.bound -= 1
            if t in s.unanswered:
                s.unanswered.remove(t)

    def add_pending(self, n: int) -> None:
        for s in self.chain():
            s.pending += n

    def busy(self) -> bool:
        return self.bound > 0 or self.pending > 0

    def blocked(self) -> bool:
        """At the limit of tunnels, or of tunnels without an answer, at some level."""
        return any(s._full() for s in self.chain())

    def hold_full(self) -> bool:
        return any(s.pending >= HOLD_PER_SOURCE * s.factor for s in self.chain())

    def room_for(self, old: Source) -> bool:
        """Whether a tunnel whose client sends from under `old` may move here: every level
        that is not also one of `old`'s is below its tunnel limit."""
        mine = {id(s) for s in old.chain()}
        return all(s.bound < s.limit for s in self.chain() if id(s) not in mine)

    def _full(self) -> bool:
        """At its limit of tunnels, or of tunnels without an answer (pruned of those answered since)."""
        if self.bound >= self.limit:
            return True
        most = UNANSWERED_PER_SOURCE * self.factor
        if len(self.unanswered) < most:
            return False
        self.unanswered = [t for t in self.unanswered if t.down is not None and t.down.pkts == 0]
        return len(self.unanswered) >= most


class Pending:
    """A new client held for want of a tunnel."""

    __slots__ = ("addr", "src", "datagrams", "size", "since", "first", "talking")

    def __init__(self, addr: tuple, src: Source, now: float, first: float) -> None:
        self.addr, self.src, self.since = addr, src, now  # held since `now`
        self.first = first  # when its first datagram came (before it was held, if remembered)
        self.datagrams: list[bytes] = []
        self.size = 0
        self.talking = False  # it sent again REPEAT_GAP s or more after its first datagram


class Mark:
    """What a tunnel bound to a new client has carried, while it may still be a one-shot flow:
    the client's first burst (datagrams up to BURST s after binding) and the service's first
    burst of answers (up to BURST s after the first look that saw one)."""

    __slots__ = ("since", "up", "down", "down_at")

    def __init__(self, now: float, up: int) -> None:
        self.since = now
        self.up = up
        self.down = 0
        self.down_at: float | None = None


def source_key(addr: tuple):
    """An IPv4 address as text, or the /64 prefix of an IPv6 one as bytes."""
    return source_levels(addr)[0][0]


def source_levels(addr: tuple) -> list[tuple[Any, int]]:
    """(key, factor) of each prefix `addr` is counted under (V6_LEVELS, V4_LEVELS), the source first:
    an IPv4 address as text and its /24 as 3 bytes; an IPv6 /64, /56, /48 as 8, 7, 6 bytes."""
    host = unmapped(addr[0])
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return [(packed[:n], f) for n, f in V6_LEVELS]
    packed = socket.inet_aton(host)
    return [(host if n == 4 else packed[:n], f) for n, f in V4_LEVELS]


class Admission:
    """New clients of one outside core: held, limited per source, bound to spares, and room
    made for those that keep talking by evicting one-shot flows."""

    def __init__(self, core: Any, now: float, burst: float, max_per_source: int, wg: Any) -> None:
        self.core = core
        self.burst = burst  # a source's challenge burst
        self.max_per_source = max_per_source
        self.pending: OrderedDict[tuple, Pending] = OrderedDict()  # in order of arrival
        self.talkers: OrderedDict[tuple, Pending] = OrderedDict()  # those of them that keep talking
        self.pending_bytes = 0
        self.sources: OrderedDict = OrderedDict()  # source key -> Source, least recently used first
        self.challenges = TokenBucket(CHALLENGE_GLOBAL, CHALLENGE_GLOBAL, now)
        self.poll_at = INF  # while clients are held, or tunnels in their first burst: look again then
        self.wg = wg  # WireGuard mode (wireguard.Gate), or None
        self.wg_log_at = 0.0
        # one-shot flows and clients that keep talking
        self.fresh: OrderedDict[Any, Mark] = OrderedDict()  # tunnels that may be one-shot flows, oldest first
        self.recent: dict[int, float] = {}  # hash of a refused new client's address -> its first datagram's time
        self.recent_old: dict[int, float] = {}  # the generation before
        self.ghosts: OrderedDict[tuple, float] = OrderedDict()  # evicted tunnel address -> until: data dropped
        self.gone: OrderedDict[int, float] = OrderedDict()  # evicted tunnel's id -> until when it is refused
        self.untold: set[int] = set()  # of those, the ones whose keepalive was not refused yet
        self.pressed_until = -INF  # the reserve is made again by evictions until then
        self.look_at = now
        self.starve_at = now

    def source(self, addr: tuple, now: float) -> Source:
        """The record of `addr`'s source, linked to those of the prefixes around it."""
        up = None
        for key, factor in reversed(source_levels(addr)):
            s = self._record(key, factor, now)
            s.up = up  # the same record if s is busy (then so is up: never forgotten)
            up = s
        return up

    def _record(self, key, factor: int, now: float) -> Source:
        s = self.sources.get(key)
        if s is not None:
            self.sources.move_to_end(key)
            return s
        s = Source(key, factor, now, self.burst, self._limit(factor), self.fresh)
        for _ in range(8):  # forget the least recently used source that holds nothing
            if len(self.sources) < SOURCES:
                break
            old_key, old = self.sources.popitem(last=False)
            if old.busy():
                self.sources[old_key] = old  # to the back: still in use
        self.sources[key] = s
        return s

    def _limit(self, factor: int) -> int:
        """The tunnels a source level of `factor` may hold."""
        return self.max_per_source if factor == 1 else min(factor * self.max_per_source, self.core.max_clients)

    @property
    def reserve(self) -> int:
        """The last tunnels of the table kept for clients that keep talking (the limit of now: a
        reload may change it)."""
        return min(RESERVE_MAX, self.core.max_clients // 16)

    def configure(self, max_per_source: int, wg: Any) -> None:
        """A new configuration of the service: its limits hold for the sources known already too."""
        self.max_per_source, self.wg = max_per_source, wg
        for s in self.sources.values():
            s.limit = self._limit(s.factor)

    def wake(self, at: float) -> None:
        """Look at the held clients again at `at` (a spare is ready then)."""
        self.poll_at = min(self.poll_at, at)

    def may_challenge(self, addr: tuple, now: float) -> bool:
        """Within the budgets of `addr`'s source, of each prefix around it and of all sources
        (taken in that order: a source over its budget spends none of the others')."""
        return all(s.challenges.take(now) for s in self.source(addr, now).chain()) and self.challenges.take(now)

    def new_client(self, data: bytes, addr: tuple, now: float) -> None:
        """A datagram from a source that is no client and no tunnel."""
        core = self.core
        p = self.pending.get(addr)
        if p is None:
            if self._ghost(addr, now) or self.wg is not None and not self._wg_admit(data, addr, now):
                return
            p = self._arrive(data, addr, now)
            if p is None:
                return
        elif not p.talking and now - p.first >= REPEAT_GAP:
            self._promote(p)
        if len(p.datagrams) >= HOLD_DATAGRAMS or p.size + len(data) > HOLD_BYTES \
                or self.pending_bytes + len(data) > HOLD_TOTAL_BYTES:
            core.stats["drop_hold_full"] += 1
            return
        p.datagrams.append(data)
        p.size += len(data)
        self.pending_bytes += len(data)
        core.stats["held"] += 1
        spare = self._spare(p.src, p.talking, now)
        if spare is not None:  # a spare came up since: go now
            self._give(p, spare, now)
        elif p.talking:
            self._make_room(now)

    def _arrive(self, data: bytes, addr: tuple, now: float) -> Pending | None:
        """The first datagram of a new client (or the first since it was refused): it takes a
        spare at once, or is held (returned), or is refused (and remembered)."""
        core = self.core
        first = self._recall(addr)
        talking = first is not None and now - first >= REPEAT_GAP
        if first is None:
            first = now
        if len(core.clients) >= core.max_clients and not (talking and self._victim(now) is not None):
            core.stats["drop_limit"] += 1
            core.log.limited("limit", f"client limit ({core.max_clients}) reached: "
                             f"dropping datagrams of new client {show(addr)}")
            self._remember(addr, first)
            return None
        src = self.source(addr, now)
        spare = self._spare(src, talking, now)
        if spare is not None:
            core.bind(spare, addr, src, now)
            core.forward(addr, data)
            self._mark(spare, now)
            return None
        return self._hold(addr, src, now, first, talking)

    def _spare(self, src: Source, talking: bool, now: float) -> Any:
        """The spare a client from `src` may take now, if any."""
        core = self.core
        if not self._room(talking, now) or src.blocked():
            return None
        return core.ready_spare(now)

    def _room(self, talking: bool, now: float) -> bool:
        """Whether a client may take a tunnel now, as far as the table goes: below --max-clients,
        also as the inside counts (it counts an evicted tunnel until it closes it, told by the
        GONE or by the refusal of its keepalive: a spare taken before would be refused data at
        its limit), and one that does not (yet)
        keep talking only outside the reserve (in WireGuard mode only under pressure: junk
        takes no tunnel there, and a WireGuard client sends its next initiation 5 s later)."""
        free = self.core.max_clients - len(self.core.clients) - self._untold(now)
        if free <= 0 or not talking and free <= self.reserve and (self.wg is None or now < self.pressed_until):
            return False
        return self.core.recovered(now)

    def _untold(self, now: float) -> int:
        """Evicted tunnels the inside does not know are gone yet (forgotten once it must know)."""
        gone = self.gone
        while gone and next(iter(gone.values())) <= now:
            self.untold.discard(gone.popitem(last=False)[0])
        return len(self.untold)

    def _give(self, p: Pending, spare: Any, now: float) -> None:
        self.unhold(p)
        self.core.bind(spare, p.addr, p.src, now)
        for d in p.datagrams:  # in order, before anything newer from this client
            self.core.forward(p.addr, d)
        self._mark(spare, now)

    def _wg_admit(self, data: bytes, addr: tuple, now: float) -> bool:
        """WireGuard hook: only a valid handshake initiation takes a tunnel; transport data of a
        known session from a new address is its client roaming. Before any other check, so that
        junk is counted as such, never held and never logged as a missing spare."""
        core = self.core
        tid = self.wg.roaming(data)
        if tid is not None and tid in core.tunnels:
            self._wg_roam(core.tunnels[tid], data, addr, now)
            return False
        why = self.wg.admit_new(data)
        if why is None:
            return True
        core.stats["drop_wg_" + why] += 1
        if now >= self.wg_log_at:  # scans are routine on a public host: a line per 10 s at most
            self.wg_log_at = now + 10.0
            core.log.info(f"refusing datagrams from new sources that are not valid WireGuard "
                          f"handshakes, e.g. from {show(addr)}: {WG_REASONS[why]} (counts in status)")
        return False

    def _wg_roam(self, t: Any, data: bytes, addr: tuple, now: float) -> None:
        """WireGuard: transport data of tunnel t's session from `addr`, a new address.

        The datagram goes up the tunnel (WireGuard authenticates it; the server sees it on the
        same service socket as before). The client binding moves to `addr` once the bound
        address has been silent for wireguard.ROAM_QUIET s, so a client still sending from its
        address can't have its tunnel taken by someone who saw its index; and only within the
        limits of the new address's source (every level), so that someone who saw many clients'
        indices can't gather their tunnels at one address or prefix: refused, the datagram is
        dropped and the tunnel stays where it is."""
        core = self.core
        if t.client is None:  # not bound (yet, or any more)
            core.stats["drop_wg_unknown_session"] += 1
            return
        idle_since = (t.up_act.last or t.created) if t.up.pkts == t.up_act.seen else None
        if self.wg.may_move(t.tid, t.up.pkts, idle_since, now):
            src = self.source(addr, now)
            if not src.room_for(t.src):  # the same limits as a new client's, at every level
                core.stats["drop_wg_roam_limit"] += 1
                core.log.limited("roamlimit", f"WireGuard client of tunnel {t.tid:016x} not moved to "
                                 f"{show(addr)}: its source is at its limit (--max-clients-per-source)")
                return
            old = t.client
            core.move_client(t, addr, src, now)
            self.wg.moved(t.tid)
            core.stats["wg_roams"] += 1
            core.log.info(f"WireGuard client of tunnel {t.tid:016x} roamed from {show(old)} to {show(addr)}")
            t.up.pkts += 1
            t.up.bytes += len(data)
        else:
            core.stats["wg_roam_waits"] += 1
            # forwarded, but not on the bound flow's count, which tells whether the bound address is silent
            core.retired.update(datagrams_in=1, bytes_in=len(data))
        core.out.append(Datagram(data, t.addr))

    def _hold(self, addr: tuple, src: Source, now: float, first: float, talking: bool) -> Pending | None:
        """Hold a new client. When the hold is full, a client that keeps talking takes the place
        of the oldest held one that does not."""
        if src.hold_full() or len(self.pending) >= HOLD_CLIENTS and not (talking and self._displace()):
            self.core.stats["drop_hold_full"] += 1
            self.core.log.limited("holdfull", f"too many new clients waiting for a tunnel: dropping "
                                  f"datagrams of {show(addr)}")
            self._remember(addr, first)
            return None
        p = self.pending[addr] = Pending(addr, src, now, first)
        src.add_pending(1)
        if talking:
            self._promote(p)
        self.poll_at = min(self.poll_at, now + POLL)
        return p

    def _displace(self) -> bool:
        p = next((p for p in self.pending.values() if not p.talking), None)
        if p is None:
            return False
        self.unhold(p)
        self.core.stats["drop_hold_full"] += len(p.datagrams)
        self._remember(p.addr, p.first)
        return True

    def _promote(self, p: Pending) -> None:
        p.talking = True
        self.talkers[p.addr] = p

    def serve(self, now: float) -> None:
        """Bind held clients to spares, those that keep talking first, each in order of arrival;
        drop those held too long; make room for those that keep talking."""
        if now >= self.look_at:
            self._look(now)
        if now < self.pressed_until:
            self._make_room(now)  # the reserve, taken by clients that keep talking, is made again
        if not self.pending:
            self.poll_at = self.look_at if self._young(now) else INF
            return
        core = self.core
        self.poll_at = now + POLL  # clients blocked by their source's limit wait for answers
        while self.pending:
            p = next(iter(self.pending.values()))  # held in order: the oldest first
            if now - p.since <= HOLD_TIME:
                break
            self.unhold(p)
            core.stats["drop_hold_expired"] += len(p.datagrams)
            core.log.limited("holdexp", f"new client {show(p.addr)} waited {HOLD_TIME:g} s for a "
                             "tunnel: dropped (is the inside agent running and registered?)")
            self._remember(p.addr, p.first)
        for talking in (True, False):  # one pass each: a source blocked now stays blocked while spares go
            group = self.talkers if talking else self.pending
            for p in list(group.values()):
                if p.talking != talking or group.get(p.addr) is not p or p.src.blocked():
                    continue
                spare = core.ready_spare(now) if self._room(talking, now) else None
                if spare is None:
                    break
                self._give(p, spare, now)
        self._make_room(now)

    # --- one-shot flows make room for clients that keep talking ---

    def _mark(self, t: Any, now: float) -> None:
        """Tunnel t was just bound to a new client: watch whether it is a one-shot flow."""
        if not self.core.legacy:  # a legacy inside is never told a tunnel is gone: never evicted
            self.fresh[t] = Mark(now, t.up.pkts)
            self.poll_at = min(self.poll_at, now + LOOK)

    def _talking(self, t: Any, m: Mark, now: float) -> bool:
        """Whether t's client sent, or the service answered, again after its first burst."""
        up, down = t.up.pkts, t.down.pkts
        if up > m.up:
            if now - m.since > BURST:
                return True
            m.up = up
        if m.down_at is None:
            if down:
                m.down, m.down_at = down, now
        elif down > m.down:
            if now - m.down_at > BURST:
                return True
            m.down = down
        return False

    def _look(self, now: float) -> None:
        """Every LOOK s, the tunnels still in their first burst (the newest): their meters so far
        are that burst; one seen to keep talking is never evicted."""
        self.look_at = now + LOOK
        talking = []
        for t in reversed(self.fresh):
            m = self.fresh[t]
            if now - m.since > BURST + LOOK:
                break
            if self._talking(t, m, now):
                talking.append(t)
        for t in talking:
            del self.fresh[t]

    def _young(self, now: float) -> bool:
        """Whether a tunnel is still in its first burst (then the timer wakes to look at it)."""
        return bool(self.fresh) and now - self.fresh[next(reversed(self.fresh))].since <= BURST

    def _victims(self, n: int, now: float) -> list:
        """Up to n tunnels that carry one-shot flows and were bound MIN_AGE s ago or more: of the
        SCAN oldest, those whose next keepalive is due soonest (the inside learns first that they
        are gone, so a spare comes soonest); all of them are worth as little."""
        found, talking = [], []
        for t, m in self.fresh.items():
            if now - m.since < MIN_AGE or len(found) >= SCAN:
                break
            (talking if self._talking(t, m, now) else found).append(t)
        for t in talking:
            del self.fresh[t]
        return heapq.nsmallest(n, found, key=lambda t: t.last_ka + t.interval)

    def _victim(self, now: float) -> Any:
        v = self._victims(1, now)
        return v[0] if v else None

    def _make_room(self, now: float) -> None:
        """Held clients that keep talking and the table full for them: evict one-shot flows,
        and keep the reserve free by evictions for PRESSURE s. With
        room in the table but no spare for STARVED s (the inside at a lower limit of its own),
        one, once no eviction is on its way to the inside any more."""
        core = self.core
        if core.legacy or not core.recovered(now):
            return
        waiting = [p for p in self.talkers.values() if not p.src.blocked()]
        free = core.max_clients - len(core.clients)
        if free < len(waiting):
            self.pressed_until = now + PRESSURE
        need = len(waiting) + self.reserve - free if now < self.pressed_until else 0
        if need <= 0 and waiting and self._starved(waiting[0], now):
            need = 1
        if need > 0:
            for t in self._victims(need, now):
                self._evict(t, now)

    def _starved(self, p: Pending, now: float) -> bool:
        """`p` waited STARVED s with no spare ready, no eviction is still on its way to the inside,
        and the inside is there (a tunnel's keepalive is on time)."""
        core = self.core
        if now - p.since < STARVED or now < self.starve_at or core.ready_spare(now) is not None:
            return False
        return any(now - t.last_ka <= 1.2 * t.interval + 1.0 for t in core.tunnels.values())

    def _evict(self, t: Any, now: float) -> None:
        """Through the core's own table change, which tells the inside at once (an ANNOUNCE saying
        GONE) or, should that be lost, refuses the tunnel's next keepalive (within one keepalive
        interval): the inside closes it, and a spare takes its place."""
        core = self.core
        m = self.fresh.pop(t)
        client = t.client
        self._remember(client, -INF)  # if it comes back, it keeps talking: no wait
        # the inside learns by the tunnel's next keepalive at the latest: no eviction for want of a
        # spare before
        self.starve_at = max(self.starve_at, now + 1.2 * t.interval + 1.0)
        until = now + 2 * t.interval + 5.0  # its next keepalive is refused by then
        for table, key in ((self.ghosts, t.addr), (self.gone, t.tid)):
            # ghosts: the service's late answers are no new client; gone: the tunnel is not taken
            # back with its client, as after a restart of this agent. Oldest first, bounded.
            while table and (next(iter(table.values())) <= now or len(table) >= 2 * core.max_tunnels):
                old = table.popitem(last=False)[0]
                if table is self.gone:
                    self.untold.discard(old)
            table[key] = until
            table.move_to_end(key)
        self.untold.add(t.tid)
        core.stats["evictions"] += 1
        core._remove(t, f"evicted: its client {show(client)} sent one burst {now - m.since:.0f} s ago and "
                        "nothing since, and a new client that keeps talking needs room", gone=True)

    def evicted(self, tid: int, now: float) -> bool:
        """The core is about to refuse an active tunnel it does not know: whether it was evicted
        lately (then it is refused even in the core's restart hold). The inside learns now."""
        self.untold.discard(tid)
        return self.gone.get(tid, -INF) > now

    def _ghost(self, addr: tuple, now: float) -> bool:
        until = self.ghosts.get(addr)
        if until is None:
            return False
        if now >= until:
            del self.ghosts[addr]
            return False
        self.core.stats["drop_unbound_tunnel"] += 1
        return True

    def _remember(self, addr: tuple, first: float) -> None:
        """A new client refused or dropped: if it sends again, it keeps talking."""
        h = hash(addr)
        old = self.recent.get(h, self.recent_old.get(h))
        self.recent[h] = first if old is None else min(old, first)
        if len(self.recent) >= RECENT:
            self.recent_old, self.recent = self.recent, {}

    def _recall(self, addr: tuple) -> float | None:
        h = hash(addr)
        a, b = self.recent.pop(h, None), self.recent_old.pop(h, None)
        return b if a is None else a if b is None else min(a, b)

    def release(self, addr: tuple) -> Pending | None:
        """The held client at `addr`, no longer held (its datagrams are the caller's)."""
        p = self.pending.get(addr)
        if p is not None:
            self.unhold(p)
        return p

    def check(self) -> list[str]:
        """What of the invariants about held clients and sources does not hold."""
        core, bad = self.core, []
        if set(self.pending) & (set(core.clients) | set(core.by_addr)):
            bad.append("a held client is known")
        if self.pending_bytes != sum(p.size for p in self.pending.values()):
            bad.append("held bytes")
        if len(self.pending) > HOLD_CLIENTS:
            bad.append("too many held clients")
        chains = {id(t): {id(s) for s in t.src.chain()} for t in core.clients.values()}
        held = Counter(id(s) for p in self.pending.values() for s in p.src.chain())
        bound_by = Counter(i for c in chains.values() for i in c)
        for s in self.sources.values():
            if s.pending != held[id(s)]:
                bad.append("source pending count")
            if s.bound != bound_by[id(s)]:
                bad.append("source tunnel count")
            if not all(id(s) in chains.get(id(t), ()) and core.clients.get(t.client) is t for t in s.unanswered):
                bad.append("source lists a tunnel that is gone")
            if s.busy() and s.up is not None and self.sources.get(s.up.key) is not s.up:
                bad.append("a busy source's prefix record is not the one kept")
        live = {id(s) for s in self.sources.values()}
        if not set(held) <= live or not set(bound_by) <= live:
            bad.append("a held client or a tunnel counts under a source record that is not kept")
        return bad + self._check_one_shots()

    def _check_one_shots(self) -> list[str]:
        core, bad = self.core, []
        if any(self.talkers.get(a) is not p for a, p in self.pending.items() if p.talking) \
                or any(self.pending.get(a) is not p or not p.talking for a, p in self.talkers.items()):
            bad.append("the held clients that keep talking")
        since = [p.since for p in self.pending.values()]
        if since != sorted(since):
            bad.append("held clients out of order")
        if not all(core.clients.get(t.client) is t for t in self.fresh):
            bad.append("a tunnel watched as a one-shot flow is not bound")
        if len(self.recent) >= RECENT or len(self.recent_old) > RECENT:
            bad.append("too many new clients remembered")
        if len(self.ghosts) > 2 * core.max_tunnels or len(self.gone) > 2 * core.max_tunnels:
            bad.append("too many evicted tunnels remembered")
        if not self.untold <= set(self.gone) or self.untold & set(core.tunnels):
            bad.append("an evicted tunnel the inside is to learn of is not one evicted and gone")
        return bad

    def unhold(self, p: Pending) -> None:
        del self.pending[p.addr]
        self.talkers.pop(p.addr, None)
        p.src.add_pending(-1)
        self.pending_bytes -= p.size
