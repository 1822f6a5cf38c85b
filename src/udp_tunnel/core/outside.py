"""The outside agent's state machine, without any I/O.

What the I/O loop may use (nothing else):
- `receive(data, addr, now)`: a datagram the loop does not forward itself (from
  an unknown source, or one `rule` says the core must see);
- `take()`: what to send, as `Datagram`s; `has_output()` says whether there is any;
- `next_timer()` / `on_timer(now)`; `reload_keys(secret, now)` (SIGHUP);
- `routes` (routes.RouteTable: `get`, `version`): where datagrams of known flows go,
  read-only; the loop counts what it forwards into the flows (Meters);
- `rule` (classify.Classifier): which datagrams of known flows are the core's;
- `snapshot(now)`, and `saved_tunnels()` / `remembered()` across a restart.

Tables and their invariants (`check_invariants()` asserts every one):

- `tunnels` (id -> Tunnel) and `by_addr` (public address -> Tunnel) hold the
  same tunnels, each under its own id and address.
- A tunnel is in exactly one state: SPARE (in `spares`, no client), BOUND
  (its client in `clients`, both directions in `route`) or ORPHAN (the inside
  says it carries a client this agent does not know: never handed out).
- `routes` holds exactly the two flows of every BOUND tunnel: client -> the
  tunnel's address, the tunnel's address -> the client.
- No address is both a client's and a tunnel's.
- `admission.pending` holds new clients waiting for a spare, none of them a
  client or a tunnel; their datagrams and bytes stay within the HOLD_* bounds.
- Per source (an IPv4 address or an IPv6 /64), `Source.unanswered` lists
  BOUND tunnels of that source that may not have had an answer yet.
- Every tunnel's session is in `sessions`; a session counts its ORPHAN and
  BOUND tunnels in `active`.
"""

from __future__ import annotations

import enum
import os
import socket
import time
from collections import Counter

from udp_tunnel.addr import show
from udp_tunnel.core.admission import Admission, Source, source_key
from udp_tunnel.core.classify import Kind, outside_rule
from udp_tunnel.core.common import Activity, CoreError, Datagram, Flow, Logger, ReplayWindow, leg
from udp_tunnel.core.keys import GRACE, KeySet
from udp_tunnel.core.routes import RouteTable
from udp_tunnel.core.wireguard import Gate
from udp_tunnel.wire import proto
from udp_tunnel.wire.proto import Control, ControlError

SESSIONS = 256  # inside sessions remembered
LEGACY_TICK = 0.0015  # s: a legacy spare is handed out no sooner than the next millisecond of its keepalive
class State(enum.Enum):
    SPARE = "spare"
    BOUND = "active"
    ORPHAN = "orphan"


class Session:
    """What this agent knows of one inside agent's session (its random id)."""

    __slots__ = ("sid", "window", "active", "announced", "last", "src")

    def __init__(self, sid: int, now: float, src=None) -> None:
        self.sid = sid
        self.src = src  # where it first registered from (its source key)
        self.window = ReplayWindow()  # its keepalive counters: each accepted once
        self.active = 0  # ORPHAN and BOUND tunnels here
        self.announced: int | None = None  # active tunnels it said it has (while recovering)
        self.last = now


class Tunnel:
    __slots__ = ("tid", "session", "addr", "state", "client", "src", "created", "last_ka", "key",
                 "interval", "probe", "ready_at",
                 "counter", "registered_at", "rebinds", "up", "down", "up_act", "down_act")

    def __init__(self, tid: int, session: Session, addr: tuple, now: float) -> None:
        self.tid = tid
        self.session = session
        self.addr = addr
        self.state = State.SPARE
        self.client: tuple | None = None
        self.src: Source | None = None  # the client's source record
        self.created = self.last_ka = self.registered_at = now
        self.counter = 0
        self.key = 0  # which of the codec's keys its last keepalive was made with
        self.interval = 25.0  # seconds to its next keepalive, as its last one said
        self.probe = False  # it idles on purpose: never handed out
        self.ready_at = 0.0  # not handed out before (legacy: the next millisecond of its keepalive)
        self.rebinds = 0
        self.up: Flow | None = None  # client -> inside
        self.down: Flow | None = None  # inside -> client
        self.up_act: Activity | None = None
        self.down_act: Activity | None = None


class OutsideCore:
    def __init__(self, *, secret: bytes, keepalive: float, max_clients: int,
                 family: int, now: float, log: Logger, legacy: bool = False,
                 max_skew: float = 120.0, max_per_source: int = 0, random_bytes=os.urandom,
                 wall=time.time, wireguard: Gate | None = None) -> None:
        self.legacy = legacy
        self.keys = KeySet(secret)
        self.rule = outside_rule(legacy, wireguard is not None)
        self.random_bytes = random_bytes
        self.cookie_secret = random_bytes(32)  # new each start: old cookies die with the process
        self.session = int.from_bytes(random_bytes(8), "big")
        self.keepalive = keepalive
        self.expiry = keepalive + 10 if legacy else 2 * keepalive + 5
        # a cookie lives one to two slots: longer than a keepalive interval and a lost one
        self.cookie_slot = max(60.0, self.expiry)
        self.max_clients = max_clients
        self.max_tunnels = max_clients + 64
        self.family = family
        self.log = log
        self.max_skew = max_skew
        self.wall = wall
        self.started = now
        self.routes = RouteTable()
        self.tunnels: dict[int, Tunnel] = {}
        self.by_addr: dict[tuple, Tunnel] = {}
        self.clients: dict[tuple, Tunnel] = {}
        self.spares: dict[int, Tunnel] = {}  # in order of their last keepalive, freshest last
        self.sessions: dict[int, Session] = {}
        self.out: list[Datagram] = []
        self.stats: Counter[str] = Counter()
        self.retired: Counter[str] = Counter()  # traffic of tunnels gone, for totals that never drop
        self.legacy_nonce = 0
        self.legacy_session = Session(0, now)
        self.legacy_ids = 0
        self.next_tick = now + 1.0
        # Just started: active tunnels of a running inside agent come back with their
        # clients. Until they have (or the expiry window is over), new clients are held,
        # so that an old client can't be given a fresh spare instead of its own tunnel.
        self.recover_until = now if legacy else now + self.expiry
        self.recovering = not legacy
        # WireGuard mode (--wireguard-key): admission of new clients and roaming, all in
        # wireguard.py; None when off. Hooks: receive(), admission, bind(), _remove(), snapshot().
        self.wg = wireguard
        self.admission = Admission(self, now, float(self.max_tunnels),
                                   max_per_source or max(16, max_clients // 4), wireguard)

    # --- datagrams in ---

    def receive(self, data: bytes, addr: tuple, now: float) -> None:
        kind = self.rule.kind(data)
        if kind is Kind.CONTROL:
            if not self.legacy:
                self._control(data, addr, now)
                return
            nonce = proto.legacy_verify(self.keys.current, data)
            if nonce is not None:
                self._legacy_keepalive(nonce, addr, now)
                return
        f = self.routes.get(addr)
        if f is not None:
            self.out.append(Datagram(data, f.dst))
            f.pkts += 1
            f.bytes += len(data)
            if kind is Kind.HANDSHAKE:  # WireGuard hook: a handshake going back to a client names its session
                t = self.by_addr.get(addr)
                if t is not None:
                    self.wg.observe_down(data, t.tid)
        elif addr in self.by_addr:
            self.stats["drop_unbound_tunnel"] += 1
        else:
            self.admission.new_client(data, addr, now)

    def has_output(self) -> bool:
        return bool(self.out)

    def take(self) -> list[Datagram]:
        """What to send, handed over (and forgotten here)."""
        out, self.out = self.out, []
        return out

    def reload_keys(self, secret: bytes, now: float) -> None:
        """The key file again (SIGHUP): the current key first; the key it replaces is still accepted
        for keys.GRACE s from tunnels that carry clients, which are asked to move to the current key.
        Spares must register again."""
        kept = self.keys.reload(secret, now)
        self.log.info("SIGHUP: key file read again" + (f"; the old key is accepted for {GRACE:g} s more"
                                                         if kept else ""))
        for t in list(self.tunnels.values()):
            t.key = -1  # registered under a key that is not the current one
            if t.state is State.SPARE and not self.legacy:
                self._remove(t, "registered under the old key")

    # --- new clients ---

    def recovered(self, now: float) -> bool:
        """Done waiting for the active tunnels of the inside agents that have spoken."""
        if self.recovering:
            if now >= self.recover_until:
                self.recovering = False
            else:
                said = [s for s in self.sessions.values() if s.announced is not None]
                self.recovering = not said or any(s.active < s.announced for s in said)
        return not self.recovering

    def ready_spare(self, now: float) -> Tunnel | None:
        """The spare with the freshest keepalive, unless even that one missed its last
        keepalive (its NAT mapping may be gone) or idles on purpose (a probe)."""
        for tid in reversed(self.spares):
            t = self.spares[tid]
            if now - t.last_ka > 1.2 * t.interval + 1.0:
                return None  # the rest are older still
            if t.probe:
                continue
            if now < t.ready_at:
                self.admission.wake(t.ready_at)
                continue
            return t
        return None

    def forward(self, addr: tuple, data: bytes) -> None:
        """A datagram of bound client `addr` that the loop did not forward (held, or its first)."""
        f = self.routes.get(addr)
        self.out.append(Datagram(data, f.dst))
        f.pkts += 1
        f.bytes += len(data)

    # --- table changes: every one goes through these ---

    def bind(self, t: Tunnel, client: tuple, src: Source, now: float) -> None:
        if t.state is State.SPARE:
            del self.spares[t.tid]
            t.session.active += 1
        t.state = State.BOUND
        t.client, t.src = client, src
        self.clients[client] = t
        t.up, t.down = self.routes.bind(client, t.addr)
        t.up_act, t.down_act = Activity(now), Activity()
        src.take(t)
        if self.wg is not None:
            self.wg.admitted(t.tid)
        self.log.info(f"client {show(client)} takes tunnel {t.tid:016x} at {show(t.addr)}"
                      + (" (WireGuard handshake)" if self.wg is not None else ""))

    def _orphan(self, t: Tunnel) -> None:
        """The inside says t carries a client: never hand it out."""
        if t.state is State.SPARE:
            del self.spares[t.tid]
            t.state = State.ORPHAN
            t.session.active += 1

    def _add(self, tid: int, session: Session, addr: tuple, now: float) -> Tunnel:
        self._claim(addr, None)
        t = Tunnel(tid, session, addr, now)
        t.interval = self.keepalive
        self.tunnels[tid] = t
        self.by_addr[addr] = t
        self.spares[tid] = t
        self.stats["registrations"] += 1
        return t

    def _remove(self, t: Tunnel, why: str) -> None:
        if self.tunnels.get(t.tid) is not t:
            return
        if self.wg is not None:  # WireGuard hook: its sessions go with it
            self.wg.forget(t.tid)
        del self.tunnels[t.tid]
        del self.by_addr[t.addr]
        if t.state is State.SPARE:
            del self.spares[t.tid]
        else:
            t.session.active -= 1
        if t.state is State.BOUND:
            self._unroute(t)
        self.log.info(f"tunnel {t.tid:016x} at {show(t.addr)} removed: {why}")

    def _unroute(self, t: Tunnel) -> None:
        del self.clients[t.client]
        self.routes.unbind(t.client, t.addr)
        t.src.leave(t)
        self.retired.update(datagrams_in=t.up.pkts, bytes_in=t.up.bytes,
                            datagrams_out=t.down.pkts, bytes_out=t.down.bytes)

    def move_client(self, t: Tunnel, addr: tuple, src: Source) -> None:
        """BOUND t's client now sends from `addr` (a WireGuard client roaming), of source `src`."""
        old = t.client
        del self.clients[old]
        t.client = addr
        self.clients[addr] = t
        self.routes.move_client(t.addr, old, addr)
        t.src.leave(t)
        t.src = src
        src.join(t)

    def _claim(self, addr: tuple, t: Tunnel | None) -> None:
        """`t` (or a new tunnel) has proved it receives at `addr`: whatever else sat there goes."""
        other = self.by_addr.get(addr)
        if other is not None and other is not t:
            self._remove(other, "its address was taken over by another tunnel")
        c = self.clients.get(addr)
        if c is not None:
            self._remove(c, "its client address is now a tunnel's")
        self.admission.release(addr)

    def _move(self, t: Tunnel, addr: tuple, now: float) -> None:
        self._claim(addr, t)
        if self.tunnels.get(t.tid) is not t:  # t's own client sat at addr: t went with it
            return
        old = t.addr
        del self.by_addr[old]
        self.by_addr[addr] = t
        t.addr = addr
        if t.state is State.BOUND:
            self.routes.move_tunnel(t.client, old, addr)
        t.rebinds += 1
        t.registered_at = now
        self.stats["rebinds"] += 1
        self.log.info(f"tunnel {t.tid:016x} moved from {show(old)} to {show(addr)} (NAT rebinding)")

    # --- control messages ---

    def _cookie(self, slot: int, m: Control, addr: tuple) -> bytes:
        return proto.cookie(self.cookie_secret, slot, m.session, m.tunnel, addr)

    def _control(self, data: bytes, addr: tuple, now: float) -> None:
        m = self._authentic(data, addr)
        if m is None:
            return
        session = self.sessions.get(m.session)
        t = self.tunnels.get(m.tunnel)
        if not self._fresh(m, session, t):
            return
        slot = int(now // self.cookie_slot)
        cur = self._cookie(slot, m, addr)
        if m.cookie != cur and m.cookie != self._cookie(slot - 1, m, addr):
            self._challenge(m, addr, cur, now)
            return
        if session is None:
            session = self._new_session(m.session, addr, now)
            if session is None:
                self._reply(addr, m, proto.F_REFUSED, cur)
                return
        session.last = now
        if self.recovering:
            session.announced = m.active
        self._keepalive(m, session, t, addr, cur, now)

    def _keepalive(self, m: Control, session: Session, t: Tunnel | None, addr: tuple, cur: bytes,
                   now: float) -> None:
        """An authentic, fresh keepalive from an address that proved itself (its cookie)."""
        if m.flags & proto.F_CLOSING:
            if t is not None:
                self._remove(t, "closed by the inside agent")
            return
        if m.key and (t is None or t.state is State.SPARE):
            # an old key (while keys are rotated) keeps clients' tunnels going, nothing more
            if t is not None:
                self._remove(t, "a spare under the old key")
            self.stats["drop_old_key"] += 1
            self._reply(addr, m, proto.F_REFUSED, cur)
            return
        if t is None:
            t = self._register(m, session, addr, now, cur)
            if t is None:
                return
        elif t.addr != addr:
            self._move(t, addr, now)
            if self.tunnels.get(t.tid) is not t:
                return
        if m.flags & proto.F_ACTIVE and t.state is State.SPARE:
            # the inside took this spare into use, but no client was given it here:
            # datagrams from someone else (spoofed as coming from us) woke it. It closes it.
            self._remove(t, "activated at the inside without a client from here")
            self.stats["drop_spoofed_activation"] += 1
            self._reply(addr, m, proto.F_REFUSED, cur)
            return
        self._refresh(t, m, now)
        flags = proto.F_REGISTERED | (proto.F_REKEY if m.key else 0)
        if t.state is State.BOUND:
            self._reply(addr, m, flags | proto.F_BOUND, cur, proto.pack_peer(t.client))
        else:
            self._reply(addr, m, flags, cur)
        self.admission.serve(now)

    def _refresh(self, t: Tunnel, m: Control, now: float) -> None:
        """What tunnel t's keepalive m says: when it sends the next, whether it idles on purpose."""
        t.counter = m.counter
        t.last_ka = now
        t.key = m.key
        t.probe = bool(m.flags & proto.F_PROBE)
        t.interval = min(max(float(m.interval), 1.0), 1.5 * self.keepalive) if m.interval else self.keepalive
        if t.state is State.SPARE:  # freshest keepalive last: the next client takes it
            self.spares[t.tid] = self.spares.pop(t.tid)

    def _authentic(self, data: bytes, addr: tuple) -> Control | None:
        try:
            m = self.keys.codec.decode(data)
        except ControlError as e:
            self.stats[f"drop_{e.args[0]}"] += 1
            self.log.limited(f"bad-{e.args[0]}", f"dropped control datagram from {show(addr)}: "
                             f"{'authentication failed (wrong key?)' if e.args[0] == 'auth' else 'malformed'}")
            return None
        if m.type != proto.KEEPALIVE:
            self.stats["drop_malformed"] += 1
            return None
        return m

    def _fresh(self, m: Control, session: Session | None, t: Tunnel | None) -> bool:
        """Each keepalive counts once, also after its tunnel is gone; checked before any
        answer, so replays of captured keepalives cost one MAC and get nothing back."""
        if t is not None and t.session.sid != m.session:
            self.stats["drop_session"] += 1
            return False
        if session is not None and not session.window.fresh(m.counter) \
                or t is not None and m.counter <= t.counter:
            self.stats["drop_replay"] += 1
            return False
        return True

    def _challenge(self, m: Control, addr: tuple, cookie: bytes, now: float) -> None:
        """Prove you receive at `addr`: the cookie goes there, no state is kept."""
        if m.flags & proto.F_CLOSING:
            return
        if not self.admission.may_challenge(addr, now):
            self.stats["drop_rate"] += 1
            return
        self.stats["challenges"] += 1
        self._reply(addr, m, 0, cookie)

    def _new_session(self, sid: int, addr: tuple, now: float) -> Session | None:
        if len(self.sessions) >= SESSIONS:
            # forget one with no tunnel left whose cookies have died; never one that could
            # still replay (its window would be lost)
            dead = next((s for s in self.sessions.values() if s.active == 0 and not self._has_tunnels(s)
                         and now - s.last > 2 * self.cookie_slot), None)
            if dead is None:
                self.stats["drop_sessions"] += 1
                self.log.limited("sessions", f"{SESSIONS} inside agent sessions known: refusing another")
                return None
            del self.sessions[dead.sid]
        s = self.sessions[sid] = Session(sid, now, source_key(addr))
        if self.recovering:  # an inside agent restarted here: don't wait for its old session
            for old in self.sessions.values():
                if old.src == s.src and old is not s:
                    old.announced = None
        return s

    def _has_tunnels(self, s: Session) -> bool:
        return any(t.session is s for t in self.tunnels.values())

    def _register(self, m: Control, session: Session, addr: tuple, now: float, cookie: bytes) -> Tunnel | None:
        """A tunnel this agent does not know proved its address: register it, or refuse."""
        if len(self.tunnels) >= self.max_tunnels:
            self.stats["drop_limit"] += 1
            self.log.limited("tlimit", f"tunnel limit ({self.max_tunnels}) reached: refusing a new tunnel")
            self._reply(addr, m, proto.F_REFUSED, cookie)
            return None
        if not m.flags & proto.F_ACTIVE:
            t = self._add(m.tunnel, session, addr, now)
            self.log.debug(f"spare tunnel {t.tid:016x} registered at {show(addr)}")
            return t
        # an active tunnel this agent does not know: it comes back after this agent's
        # restart (then, and only then, with its client), or it was forgotten (refused:
        # the inside closes it, its client gets a fresh tunnel)
        client = proto.unpack_peer(m.peer, self.family)
        if self.admission.evicted(m.tunnel, now) or now >= self.recover_until or self.legacy:
            self.stats["drop_stale_tunnel"] += 1
            self._reply(addr, m, proto.F_REFUSED, cookie)
            return None
        if client is not None and (client == addr or client in self.by_addr):
            # its "client" is a tunnel's address (after a NAT rebinding the service's answer
            # can come before the keepalive and look like a new client): refused
            self.stats["drop_stale_client"] += 1
            self._reply(addr, m, proto.F_REFUSED, cookie)
            return None
        t = self._add(m.tunnel, session, addr, now)
        if client is not None and client not in self.clients:
            self.bind(t, client, self.admission.source(client, now), now)
            if self.wg is not None:  # WireGuard hook: bound again without a handshake seen here
                self.wg.admitted(t.tid, "restored")
            self.log.info(f"active tunnel {t.tid:016x} at {show(addr)} registered again, "
                          f"serving client {show(client)} again")
            p = self.admission.release(client)
            if p is not None:  # it spoke before its tunnel was back: what it said goes on now
                for d in p.datagrams:
                    self.forward(client, d)
        else:
            self._orphan(t)
            self.log.info(f"active tunnel {t.tid:016x} at {show(addr)} registered without its client")
        return t

    def _reply(self, addr: tuple, m: Control, flags: int, cookie: bytes, peer: bytes = proto.NO_PEER) -> None:
        waiting = min(len(self.admission.pending), 0xFFFF) if flags & proto.F_REGISTERED else 0
        r = Control(proto.REPLY, flags, self.session, m.tunnel, m.counter, cookie, peer, waiting, m.key,
                    proto.pack_peer(addr))
        self.out.append(Datagram(self.keys.codec.encode(r), addr))

    # --- legacy keepalives ---

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
            self.legacy_ids += 1
            self.sessions.setdefault(0, self.legacy_session)
            t = self._add(self.legacy_ids, self.legacy_session, addr, now)
            self.log.debug(f"spare tunnel {t.tid:016x} registered at {show(addr)}")
        t.last_ka = now
        # The C inside's keepalive nonce is its clock in milliseconds, one counter for all its
        # tunnels: data now would make it open its next spare within this millisecond, whose
        # keepalive (the same nonce) is then refused. Hand the spare out from the next one.
        t.ready_at = now + LEGACY_TICK
        if t.state is State.SPARE:
            self.spares[t.tid] = self.spares.pop(t.tid)
        self.admission.serve(now)

    # --- across a restart ---

    def saved_tunnels(self) -> list[tuple[int, tuple]]:
        """What to remember across a restart: where the tunnels are."""
        return [(t.tid, t.addr) for t in self.tunnels.values()] if not self.legacy else []

    def remembered(self, entries: list[tuple[int, tuple]], now: float) -> None:
        """Just started: tell the tunnels a previous run knew to register again now. A HELLO
        grants nothing; the inside answers it with keepalives that go through the usual
        challenge (and a replayed HELLO costs the inside one keepalive per tunnel)."""
        for tid, addr in entries[: self.max_tunnels]:
            if self.family == socket.AF_INET6 and ":" not in addr[0]:
                addr = ("::ffff:" + addr[0], addr[1], 0, 0)
            elif self.family == socket.AF_INET and ":" in addr[0]:
                continue
            m = Control(proto.REPLY, proto.F_HELLO, self.session, tid, 0)
            self.out.append(Datagram(self.keys.codec.encode(m), addr))
            self.stats["hellos"] += 1

    # --- time ---

    def next_timer(self) -> float:
        return min(self.next_tick, self.admission.poll_at, self.keys.forget_at)

    def on_timer(self, now: float) -> None:
        self.admission.serve(now)
        if self.keys.expire(now):
            self.log.info("the old key is no longer accepted")
        if now < self.next_tick:
            return
        self.next_tick = now + 1.0
        for t in list(self.tunnels.values()):
            if now - t.last_ka > (self.expiry if self.legacy else 2 * t.interval + 5):
                self._remove(t, f"no keepalive for {now - t.last_ka:.0f} s")
            elif t.state is State.BOUND:
                t.up_act.sample(t.up, now)
                t.down_act.sample(t.down, now)
        for s in [s for s in self.sessions.values() if s.active == 0 and now - s.last > 2 * self.cookie_slot]:
            if not self._has_tunnels(s):
                del self.sessions[s.sid]

    # --- checks and what the operator sees ---

    def check_invariants(self) -> None:
        def need(cond: bool, what: str) -> None:
            if not cond:
                raise CoreError(what)

        need(len(self.tunnels) == len(self.by_addr), "tunnels and by_addr differ in size")
        bound = 0
        active: Counter[int] = Counter()
        for tid, t in self.tunnels.items():
            need(t.tid == tid and self.by_addr.get(t.addr) is t, f"tunnel {tid:x} not under its id and address")
            need(self.sessions.get(t.session.sid) is t.session, f"tunnel {tid:x}: session unknown")
            need((self.spares.get(tid) is t) == (t.state is State.SPARE), f"tunnel {tid:x}: spare table")
            need((t.client is not None) == (t.state is State.BOUND), f"tunnel {tid:x}: client vs state")
            if t.state is not State.SPARE:
                active[t.session.sid] += 1
            if t.state is State.BOUND:
                bound += 1
                need(self.clients.get(t.client) is t, f"tunnel {tid:x}: client not in clients")
                need(self.routes.get(t.client) is t.up and t.up.dst == t.addr, f"tunnel {tid:x}: up route")
                need(self.routes.get(t.addr) is t.down and t.down.dst == t.client, f"tunnel {tid:x}: down route")
        need(len(self.spares) == sum(t.state is State.SPARE for t in self.tunnels.values()), "stray spares")
        need(len(self.clients) == bound and len(self.routes) == 2 * bound, "clients/routes hold stray entries")
        need(not set(self.clients) & set(self.by_addr), "an address is both a client's and a tunnel's")
        need(len(self.tunnels) <= self.max_tunnels and len(self.clients) <= self.max_clients, "limits")
        for s in self.sessions.values():
            need(s.active == active[s.sid], f"session {s.sid:x}: active count {s.active} != {active[s.sid]}")
        for what in self.admission.check(self):
            need(False, what)

    def snapshot(self, now: float) -> dict:
        tunnels = []
        for t in self.tunnels.values():
            tunnels.append({
                "id": f"{t.tid:016x}", "state": "spare" if t.state is State.SPARE else "active",
                "endpoint": show(t.addr), "client": show(t.client) if t.client else None,
                "age": now - t.created, "last_keepalive": now - t.last_ka,
                "registered": now - t.registered_at, "rebinds": t.rebinds,
                "to_inside": leg(t.up, t.up_act, now),
                "to_client": leg(t.down, t.down_act, now),
            })
            if self.wg is not None:  # WireGuard hook: how its client was admitted, roams
                tunnels[-1]["wireguard"] = self.wg.describe(t.tid)
        totals = self.retired.copy()
        for t in self.clients.values():
            totals.update(datagrams_in=t.up.pkts, bytes_in=t.up.bytes,
                          datagrams_out=t.down.pkts, bytes_out=t.down.bytes)
        return {"role": "outside", "protocol": "legacy" if self.legacy else "v2",
                "uptime": now - self.started, "clients": len(self.clients),
                "spares": len(self.spares), "waiting": len(self.admission.pending),
                "stats": dict(self.stats), "totals": dict(totals), "tunnels": tunnels,
                **({"wireguard": self.wg.summary()} if self.wg is not None else {})}
