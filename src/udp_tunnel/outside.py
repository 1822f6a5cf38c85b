"""The outside agent's state machine, without any I/O.

The I/O loop forwards datagrams of known flows itself with one lookup in
`route` (source address -> Flow, whose `dst` is where to send). Everything
else comes here through `handle()`: control messages, datagrams from unknown
sources (new clients), and, in legacy mode, every 40-byte datagram. What to
send is left in `out` as (bytes, address) pairs; `on_timer()` wants to be
called about once a second.
"""

from __future__ import annotations

import os
import time
from collections import Counter

from udp_tunnel import proto
from udp_tunnel.addr import show
from udp_tunnel.log import Log
from udp_tunnel.proto import Control, ControlError
from udp_tunnel.status import leg
from udp_tunnel.wireguard import DOWN_LENS, Gate

COOKIE_SLOT = 60.0  # seconds; a cookie stays valid for one to two slots
WG_REASONS = {  # WireGuard mode: why a new source was refused (stats drop_wg_<reason>)
    "not_handshake": "not a WireGuard handshake initiation",
    "bad_mac1": "WireGuard handshake initiation with a wrong MAC1 (is --wireguard-key the server's public key?)",
    "unknown_session": "WireGuard transport data of no session seen here",
    "replay": "a copy of a WireGuard handshake initiation already admitted (replayed)",
}


class Flow:
    """One direction of a bound tunnel: where datagrams from a source go."""

    __slots__ = ("dst", "pkts", "bytes")

    def __init__(self, dst: tuple) -> None:
        self.dst = dst
        self.pkts = 0
        self.bytes = 0


class Tunnel:
    __slots__ = ("tid", "session", "addr", "client", "active", "created", "last_ka",
                 "counter", "registered_at", "rebinds", "up", "down",
                 "seen_up", "seen_down", "last_up", "last_down")

    def __init__(self, tid: int, session: int, addr: tuple, now: float) -> None:
        self.tid = tid
        self.session = session
        self.addr = addr
        self.client: tuple | None = None
        self.active = False  # bound to a client, or said so by the inside: never a spare again
        self.created = self.last_ka = self.registered_at = now
        self.counter = 0
        self.rebinds = 0
        self.up: Flow | None = None  # client -> inside
        self.down: Flow | None = None  # inside -> client
        self.seen_up = self.seen_down = 0
        self.last_up: float | None = None
        self.last_down: float | None = None


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class OutsideCore:
    def __init__(self, *, secret: bytes, keepalive: float, max_clients: int,
                 family: int, now: float, log: Log, legacy: bool = False,
                 max_skew: float = 120.0, random_bytes=os.urandom, wall=time.time,
                 wireguard: Gate | None = None) -> None:
        self.legacy = legacy
        self.password = secret
        self.codec = proto.Codec(secret)
        self.cookie_secret = random_bytes(32)  # new each start: old cookies die with the process
        self.session = int.from_bytes(random_bytes(8), "big")
        self.keepalive = keepalive
        self.expiry = keepalive + 10 if legacy else 2 * keepalive + 5
        self.max_clients = max_clients
        self.max_tunnels = max_clients + 32
        self.family = family
        self.log = log
        self.max_skew = max_skew
        self.wall = wall
        self.started = now
        self.route: dict[tuple, Flow] = {}
        self.tunnels: dict[int, Tunnel] = {}
        self.by_addr: dict[tuple, Tunnel] = {}
        self.clients: dict[tuple, Tunnel] = {}
        self.spares: dict[int, Tunnel] = {}
        self.out: list[tuple[bytes, tuple]] = []
        self.stats: Counter[str] = Counter()
        self.retired: Counter[str] = Counter()  # traffic of tunnels gone, for totals that never drop
        self.challenges = TokenBucket(200.0, 200.0, now)
        self.legacy_nonce = 0
        self.legacy_ids = 0
        self.next_tick = now + 1.0
        # Just started: active tunnels of a running inside agent come back with their
        # clients. Until they have (or the expiry window is over), new clients wait,
        # so that an old client can't be given a fresh spare instead of its own tunnel.
        self.recovering = not legacy
        self.announced: dict[int, int] = {}  # inside session -> active tunnels it says it has
        # WireGuard mode (--wireguard-key, issue 9): admission of new clients and roaming,
        # all in wireguard.py; None when off. Hooks: handle(), _new_client(), _remove(), snapshot().
        self.wg = wireguard
        self.wg_log_at = 0.0

    # --- datagrams ---

    def handle(self, data: bytes, addr: tuple, now: float) -> None:
        n = len(data)
        if self.legacy:
            if n == proto.LEGACY_LEN:
                nonce = proto.legacy_verify(self.password, data)
                if nonce is not None:
                    self._legacy_keepalive(nonce, addr, now)
                    return
        elif n == proto.CTRL_LEN and data[:4] == proto.MAGIC:
            self._control(data, addr, now)
            return
        f = self.route.get(addr)
        if f is not None:
            self.out.append((data, f.dst))
            f.pkts += 1
            f.bytes += n
            # WireGuard hook: a handshake message going back to a client names its session.
            # The loop's fast path sends these two lengths here when the mode is on.
            if self.wg is not None and n in DOWN_LENS:
                t = self.by_addr.get(addr)
                if t is not None:
                    self.wg.observe_down(data, t.tid)
        elif addr in self.by_addr:
            self.stats["drop_unbound_tunnel"] += 1
        else:
            self._new_client(data, addr, now)

    def _recovered(self, now: float) -> bool:
        if now - self.started > self.expiry:
            self.recovering = False
        else:
            have = Counter(t.session for t in self.tunnels.values() if t.active)
            self.recovering = any(have[s] < n for s, n in self.announced.items())
        return not self.recovering

    def _new_client(self, data: bytes, addr: tuple, now: float) -> None:
        # WireGuard hook: only a valid handshake initiation takes a tunnel; transport data of a
        # known session from a new address is its client roaming. Before any other check, so
        # that junk is counted as such and never logged as a missing spare.
        if self.wg is not None:
            tid = self.wg.roaming(data)
            if tid is not None and tid in self.tunnels:
                self._wg_roam(self.tunnels[tid], data, addr, now)
                return
            why = self.wg.admit_new(data)
            if why is not None:
                self.stats["drop_wg_" + why] += 1
                if now >= self.wg_log_at:  # scans are routine on a public host: a line per 10 s at most
                    self.wg_log_at = now + 10.0
                    self.log.info(f"refusing datagrams from new sources that are not valid WireGuard "
                                  f"handshakes, e.g. from {show(addr)}: {WG_REASONS[why]} (counts in status)")
                return
        if self.recovering and not self._recovered(now):
            self.stats["drop_recovering"] += 1
            self.log.limited("recovering", f"new client {show(addr)} waits: active tunnels are "
                             "still coming back after this agent's restart")
            return
        if len(self.clients) >= self.max_clients:
            self.stats["drop_limit"] += 1
            self.log.limited("limit", f"client limit ({self.max_clients}) reached: "
                             f"dropping datagrams of new client {show(addr)}")
            return
        if not self.spares:
            self.stats["drop_no_spare"] += 1
            self.log.limited("nospare", f"no spare tunnel for new client {show(addr)}: "
                             "dropped (is the inside agent running and registered?)")
            return
        t = max(self.spares.values(), key=lambda s: s.last_ka)  # the freshest NAT mapping
        del self.spares[t.tid]
        self._bind(t, addr)
        if self.wg is not None:
            self.wg.admitted(t.tid)
        self.log.info(f"client {show(addr)} takes tunnel {t.tid:016x} at {show(t.addr)}"
                      + (" (WireGuard handshake)" if self.wg is not None else ""))
        self.out.append((data, t.addr))
        t.up.pkts += 1
        t.up.bytes += len(data)

    def _bind(self, t: Tunnel, client: tuple) -> None:
        t.client = client
        t.active = True
        self.clients[client] = t
        t.up = self.route[client] = Flow(t.addr)
        t.down = self.route[t.addr] = Flow(client)

    def _wg_roam(self, t: Tunnel, data: bytes, addr: tuple, now: float) -> None:
        """WireGuard: transport data of tunnel t's session from `addr`, a new address.

        The datagram goes up the tunnel (WireGuard authenticates it; the server sees it on the
        same service socket as before). The client binding moves to `addr` once the bound
        address has been silent for wireguard.ROAM_QUIET s, so a client still sending from its
        address can't have its tunnel taken by someone who saw its index."""
        if t.client is None:
            self.stats["drop_wg_unknown_session"] += 1
            return
        idle_since = (t.last_up if t.last_up is not None else t.created) if t.up.pkts == t.seen_up else None
        if self.wg.may_move(t.tid, t.up.pkts, idle_since, now):
            old = t.client
            del self.clients[old]
            del self.route[old]
            t.client = addr
            self.clients[addr] = t
            self.route[addr] = t.up
            t.down.dst = addr
            self.wg.moved(t.tid)
            self.stats["wg_roams"] += 1
            self.log.info(f"WireGuard client of tunnel {t.tid:016x} roamed from {show(old)} to {show(addr)}")
            t.up.pkts += 1
            t.up.bytes += len(data)
        else:
            self.stats["wg_roam_waits"] += 1
            # forwarded, but not on the bound flow's count, which tells whether the bound address is silent
            self.retired.update(datagrams_in=1, bytes_in=len(data))
        self.out.append((data, t.addr))

    def _remove(self, t: Tunnel, why: str) -> None:
        if self.wg is not None:  # WireGuard hook: its sessions go with it
            self.wg.forget(t.tid)
        del self.tunnels[t.tid]
        del self.by_addr[t.addr]
        self.spares.pop(t.tid, None)
        if t.client is not None:
            del self.clients[t.client]
            del self.route[t.client]
            del self.route[t.addr]
            self.retired.update(datagrams_in=t.up.pkts, bytes_in=t.up.bytes,
                                datagrams_out=t.down.pkts, bytes_out=t.down.bytes)
        self.log.info(f"tunnel {t.tid:016x} at {show(t.addr)} removed: {why}")

    def _claim(self, addr: tuple, t: Tunnel | None) -> None:
        """`t` has proved it receives at `addr`: whatever else sat there goes."""
        other = self.by_addr.get(addr)
        if other is not None and other is not t:
            self._remove(other, "its address was taken over by another tunnel")
        c = self.clients.get(addr)
        if c is not None:
            self._remove(c, "its client address is now a tunnel's")

    def _move(self, t: Tunnel, addr: tuple, now: float) -> None:
        self._claim(addr, t)
        old = t.addr
        del self.by_addr[old]
        self.by_addr[addr] = t
        t.addr = addr
        if t.client is not None:
            self.route[addr] = self.route.pop(old)
            t.up.dst = addr
        t.rebinds += 1
        t.registered_at = now
        self.stats["rebinds"] += 1
        self.log.info(f"tunnel {t.tid:016x} moved from {show(old)} to {show(addr)} (NAT rebinding)")

    def _cookie(self, slot: int, tid: int, addr: tuple) -> bytes:
        return proto.cookie(self.cookie_secret, slot, tid, addr)

    def _control(self, data: bytes, addr: tuple, now: float) -> None:
        try:
            m = self.codec.decode(data)
        except ControlError as e:
            self.stats[f"drop_{e.args[0]}"] += 1
            self.log.limited(f"bad-{e.args[0]}", f"dropped control datagram from {show(addr)}: "
                             f"{'authentication failed (wrong key?)' if e.args[0] == 'auth' else 'malformed'}")
            return
        if m.type != proto.KEEPALIVE:
            self.stats["drop_malformed"] += 1
            return
        slot = int(now // COOKIE_SLOT)
        cur = self._cookie(slot, m.tunnel, addr)
        if m.cookie != cur and m.cookie != self._cookie(slot - 1, m.tunnel, addr):
            if m.flags & proto.F_CLOSING:
                return
            if not self.challenges.take(now):
                self.stats["drop_rate"] += 1
                return
            self.stats["challenges"] += 1
            self._reply(addr, m, 0, cur)
            return
        t = self.tunnels.get(m.tunnel)
        if t is not None:
            if t.session != m.session:
                self.stats["drop_session"] += 1
                return
            if m.counter <= t.counter:
                self.stats["drop_replay"] += 1
                return
            if m.flags & proto.F_CLOSING:
                self._remove(t, "closed by the inside agent")
                return
        elif m.flags & proto.F_CLOSING:
            return
        if t is None:
            client = proto.unpack_peer(m.peer, self.family) if m.flags & proto.F_ACTIVE else None
            if len(self.tunnels) >= self.max_tunnels or (client is not None and client in self.by_addr):
                # at the limit; or an active tunnel whose "client" was really another tunnel's
                # new address (its data arrived before its keepalive after a NAT rebinding):
                # refused, and the inside closes an active tunnel that is refused
                self.stats["drop_limit" if client is None else "drop_stale_client"] += 1
                if client is None:
                    self.log.limited("tlimit", f"tunnel limit ({self.max_tunnels}) reached: refusing a new tunnel")
                self._reply(addr, m, proto.F_REFUSED, cur)
                return
            self._claim(addr, None)
            t = Tunnel(m.tunnel, m.session, addr, now)
            self.tunnels[t.tid] = t
            self.by_addr[addr] = t
            self.stats["registrations"] += 1
            if client is not None and client not in self.clients:
                self._bind(t, client)
                if self.wg is not None:  # WireGuard hook: bound again without a handshake seen here
                    self.wg.admitted(t.tid, "restored")
                self.log.info(f"active tunnel {t.tid:016x} at {show(addr)} registered again, "
                              f"serving client {show(client)} again")
            elif m.flags & proto.F_ACTIVE:
                t.active = True  # its client is unknown here: it will never carry another one
                self.log.info(f"active tunnel {t.tid:016x} at {show(addr)} registered without its client")
            else:
                self.spares[t.tid] = t
                self.log.debug(f"spare tunnel {t.tid:016x} registered at {show(addr)}")
        elif t.addr != addr:
            self._move(t, addr, now)
        if m.flags & proto.F_ACTIVE and not t.active:
            t.active = True
            del self.spares[t.tid]
        t.counter = m.counter
        t.last_ka = now
        if self.recovering:
            self.announced[m.session] = m.active
        if t.client is None:
            self._reply(addr, m, proto.F_REGISTERED, cur)
        else:
            self._reply(addr, m, proto.F_REGISTERED | proto.F_BOUND, cur, proto.pack_peer(t.client))

    def _reply(self, addr: tuple, m: Control, flags: int, cookie: bytes, peer: bytes = proto.NO_PEER) -> None:
        r = Control(proto.REPLY, flags, self.session, m.tunnel, m.counter, cookie, peer)
        self.out.append((self.codec.encode(r), addr))

    def _legacy_keepalive(self, nonce: int, addr: tuple, now: float) -> None:
        if nonce <= self.legacy_nonce:
            self.stats["drop_replay"] += 1
            return
        if self.max_skew and abs(nonce / 1000.0 - self.wall()) > self.max_skew:
            self.stats["drop_clock"] += 1
            self.log.limited("skew", f"legacy keepalive from {show(addr)} refused: its clock is more "
                             f"than {self.max_skew:g} s from ours (replayed, or a clock to fix)")
            return
        self.legacy_nonce = nonce
        t = self.by_addr.get(addr)
        if t is None:
            if len(self.tunnels) >= self.max_tunnels:
                self.stats["drop_limit"] += 1
                return
            self._claim(addr, None)
            self.legacy_ids += 1
            t = Tunnel(self.legacy_ids, 0, addr, now)
            self.tunnels[t.tid] = t
            self.by_addr[addr] = t
            self.spares[t.tid] = t
            self.stats["registrations"] += 1
            self.log.debug(f"spare tunnel {t.tid:016x} registered at {show(addr)}")
        t.last_ka = now

    # --- time ---

    def next_timer(self) -> float:
        return self.next_tick

    def on_timer(self, now: float) -> None:
        self.next_tick = now + 1.0
        for t in list(self.tunnels.values()):
            if now - t.last_ka > self.expiry:
                self._remove(t, f"no keepalive for {now - t.last_ka:.0f} s")
            elif t.client is not None:
                if t.up.pkts != t.seen_up:
                    t.seen_up, t.last_up = t.up.pkts, now
                if t.down.pkts != t.seen_down:
                    t.seen_down, t.last_down = t.down.pkts, now

    # --- what the operator sees ---

    def snapshot(self, now: float) -> dict:
        tunnels = []
        for t in self.tunnels.values():
            up, down = t.up or Flow(()), t.down or Flow(())
            tunnels.append({
                "id": f"{t.tid:016x}", "state": "active" if t.active else "spare",
                "endpoint": show(t.addr), "client": show(t.client) if t.client else None,
                "age": now - t.created, "last_keepalive": now - t.last_ka,
                "registered": now - t.registered_at, "rebinds": t.rebinds,
                "to_inside": leg(up.pkts, up.bytes, t.last_up, now),
                "to_client": leg(down.pkts, down.bytes, t.last_down, now),
            })
            if self.wg is not None:  # WireGuard hook: how its client was admitted, roams
                tunnels[-1]["wireguard"] = self.wg.describe(t.tid)
        totals = self.retired.copy()
        for t in self.tunnels.values():
            if t.client is not None:
                totals.update(datagrams_in=t.up.pkts, bytes_in=t.up.bytes,
                              datagrams_out=t.down.pkts, bytes_out=t.down.bytes)
        return {"role": "outside", "protocol": "legacy" if self.legacy else "v1",
                "uptime": now - self.started, "clients": len(self.clients),
                "spares": len(self.spares), "stats": dict(self.stats), "totals": dict(totals),
                "tunnels": tunnels, **({"wireguard": self.wg.summary()} if self.wg is not None else {})}
