"""Who takes a tunnel at the outside agent: new clients, their source's limits, and the
first datagrams held while no spare is ready.

`Admission` owns the held clients, the per-source records and the challenge
budget; the tunnels are its core's (outside.py), which it asks through a few
named methods: `ready_spare`, `bind`, `forward`, `recovered`, `move_client`.

- A new client takes the spare with the freshest keepalive and its first datagram goes
  down at once. With no spare ready (or while a restarted outside waits for the active
  tunnels to come back) its datagrams are held, in order, within the HOLD_* bounds, and
  go down the first spare that registers.
- Sources are counted at several prefix lengths (LEVELS): an IPv6 /64, the /56 and the /48
  around it; an IPv4 address and its /24. A level of factor f holds at most f x
  `max_per_source` tunnels (never more than --max-clients), f x UNANSWERED_PER_SOURCE whose
  client never got a datagram back and f x HOLD_PER_SOURCE held clients, and gets f x
  CHALLENGE_RATE challenges a second: one host with a /56 (256 /64s) or a /48 is not
  hundreds of sources. A new client takes a tunnel only within every level's limits.
- With --wireguard-key (wireguard.py), only a valid handshake initiation takes a tunnel,
  and a known session's transport data from a new address is its client roaming.
"""

from __future__ import annotations

import socket
from collections import Counter, OrderedDict
from typing import Any

from udp_tunnel.addr import show
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
INF = float("inf")
WG_REASONS = {  # WireGuard mode: why a new source was refused (stats drop_wg_<reason>)
    "not_handshake": "not a WireGuard handshake initiation",
    "bad_mac1": "WireGuard handshake initiation with a wrong MAC1 (is --wireguard-key the server's public key?)",
    "unknown_session": "WireGuard transport data of no session seen here",
    "replay": "a copy of a WireGuard handshake initiation already admitted (replayed)",
}


class Source:
    """One prefix that new clients come from (see LEVELS): its budgets and what it holds.
    `up` is the next shorter prefix's record (None at the top); counts include everything
    below, so a record is busy while any address under it is."""

    __slots__ = ("key", "up", "factor", "challenges", "unanswered", "pending", "bound", "limit")

    def __init__(self, key, factor: int, now: float, burst: float, limit: int) -> None:
        self.key = key
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

    def join(self, t: Any) -> None:
        """Tunnel t's client (answered before) now sends from here: a WireGuard client roaming."""
        for s in self.chain():
            s.bound += 1

    def leave(self, t: Any) -> None:
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
    __slots__ = ("addr", "src", "datagrams", "size", "since")

    def __init__(self, addr: tuple, src: Source, now: float) -> None:
        self.addr, self.src, self.since = addr, src, now
        self.datagrams: list[bytes] = []
        self.size = 0


def source_key(addr: tuple):
    """An IPv4 address as text, or the /64 prefix of an IPv6 one as bytes."""
    return source_levels(addr)[0][0]


def source_levels(addr: tuple) -> list[tuple[Any, int]]:
    """(key, factor) of each prefix `addr` is counted under (LEVELS), the source itself first:
    an IPv4 address as text and its /24 as 3 bytes; an IPv6 /64, /56, /48 as 8, 7, 6 bytes."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
        return [(packed[:n], f) for n, f in V6_LEVELS]
    packed = socket.inet_aton(host)
    return [(host if n == 4 else packed[:n], f) for n, f in V4_LEVELS]


class Admission:
    """New clients of one outside core: held, limited per source, bound to spares."""

    def __init__(self, core: Any, now: float, burst: float, max_per_source: int, wg: Any) -> None:
        self.core = core
        self.burst = burst  # a source's challenge burst
        self.max_per_source = max_per_source
        self.pending: dict[tuple, Pending] = {}  # in order of arrival
        self.pending_bytes = 0
        self.sources: OrderedDict = OrderedDict()  # source key -> Source, least recently used first
        self.challenges = TokenBucket(CHALLENGE_GLOBAL, CHALLENGE_GLOBAL, now)
        self.poll_at = INF  # while clients are held: look at them again then
        self.wg = wg  # WireGuard mode (wireguard.Gate), or None
        self.wg_log_at = 0.0

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
        limit = self.max_per_source if factor == 1 else min(factor * self.max_per_source, self.core.max_clients)
        s = Source(key, factor, now, self.burst, limit)
        for _ in range(8):  # forget the least recently used source that holds nothing
            if len(self.sources) < SOURCES:
                break
            old_key, old = self.sources.popitem(last=False)
            if old.busy():
                self.sources[old_key] = old  # to the back: still in use
        self.sources[key] = s
        return s

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
        if p is None and self.wg is not None and not self._wg_admit(data, addr, now):
            return
        if p is None:
            if len(core.clients) >= core.max_clients:
                core.stats["drop_limit"] += 1
                core.log.limited("limit", f"client limit ({core.max_clients}) reached: "
                                 f"dropping datagrams of new client {show(addr)}")
                return
            src = self.source(addr, now)
            spare = core.ready_spare(now)
            if spare is not None and not src.blocked() and core.recovered(now):
                core.bind(spare, addr, src, now)
                core.forward(addr, data)
                return
            p = self._hold(addr, src, now)
            if p is None:
                return
        if len(p.datagrams) >= HOLD_DATAGRAMS or p.size + len(data) > HOLD_BYTES \
                or self.pending_bytes + len(data) > HOLD_TOTAL_BYTES:
            core.stats["drop_hold_full"] += 1
            return
        p.datagrams.append(data)
        p.size += len(data)
        self.pending_bytes += len(data)
        core.stats["held"] += 1
        if core.ready_spare(now) is not None:  # a spare came up since: go now
            self.serve(now)

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
            core.move_client(t, addr, src)
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

    def _hold(self, addr: tuple, src: Source, now: float) -> Pending | None:
        if len(self.pending) >= HOLD_CLIENTS or src.hold_full():
            self.core.stats["drop_hold_full"] += 1
            self.core.log.limited("holdfull", f"too many new clients waiting for a tunnel: dropping "
                             f"datagrams of {show(addr)}")
            return None
        p = self.pending[addr] = Pending(addr, src, now)
        src.add_pending(1)
        self.poll_at = min(self.poll_at, now + POLL)
        return p

    def serve(self, now: float) -> None:
        """Bind held clients, in order of arrival, to spares; drop those held too long."""
        if not self.pending:
            self.poll_at = INF
            return
        core = self.core
        self.poll_at = now + POLL  # clients blocked by their source's limit wait for answers
        recovered = core.recovered(now)
        for addr in list(self.pending):
            p = self.pending[addr]
            if now - p.since > HOLD_TIME:
                self.unhold(p)
                core.stats["drop_hold_expired"] += len(p.datagrams)
                core.log.limited("holdexp", f"new client {show(addr)} waited {HOLD_TIME:g} s for a "
                                 "tunnel: dropped (is the inside agent running and registered?)")
                continue
            spare = core.ready_spare(now) if recovered else None
            if spare is None or p.src.blocked():
                continue  # look at the rest for expiry only
            self.unhold(p)
            core.bind(spare, addr, p.src, now)
            for d in p.datagrams:  # in order, before anything newer from this client
                core.forward(addr, d)

    def release(self, addr: tuple) -> Pending | None:
        """The held client at `addr`, no longer held (its datagrams are the caller's)."""
        p = self.pending.get(addr)
        if p is not None:
            self.unhold(p)
        return p

    def check(self, core: Any) -> list[str]:
        """What of the invariants about held clients and sources does not hold."""
        bad = []
        if set(self.pending) & (set(core.clients) | set(core.by_addr)):
            bad.append("a held client is known")
        if self.pending_bytes != sum(p.size for p in self.pending.values()):
            bad.append("held bytes")
        if len(self.pending) > HOLD_CLIENTS:
            bad.append("too many held clients")
        held = Counter(id(s) for p in self.pending.values() for s in p.src.chain())
        bound_by = Counter(id(s) for t in core.clients.values() for s in t.src.chain())
        for s in self.sources.values():
            if s.pending != held[id(s)]:
                bad.append("source pending count")
            if s.bound != bound_by[id(s)]:
                bad.append("source tunnel count")
            if not all(s in t.src.chain() and core.clients.get(t.client) is t for t in s.unanswered):
                bad.append("source lists a tunnel that is gone")
            if s.busy() and s.up is not None and self.sources.get(s.up.key) is not s.up:
                bad.append("a busy source's prefix record is not the one kept")
        live = {id(s) for s in self.sources.values()}
        if not all(id(s) in live for p in self.pending.values() for s in p.src.chain()) \
                or not all(id(s) in live for t in core.clients.values() for s in t.src.chain()):
            bad.append("a held client or a tunnel counts under a source record that is not kept")
        return bad

    def unhold(self, p: Pending) -> None:
        del self.pending[p.addr]
        p.src.add_pending(-1)
        self.pending_bytes -= p.size
