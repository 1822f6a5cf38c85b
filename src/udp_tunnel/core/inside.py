"""The inside agent's state machine, without any I/O.

The I/O loop owns the sockets: per tunnel one socket connected to the
outside agent and, once a client uses the tunnel, one connected to the
service. It forwards data of active tunnels itself, counting into the
tunnel's meters (`rx`: from the outside to the service, `tx`: back).

What the I/O loop may use (nothing else):
- `receive(tid, data, now)`: a datagram on a tunnel socket that `rule`
  (classify.Classifier) says is the core's, or any datagram on a tunnel without
  a service socket yet;
- `take()`: the actions below, to carry out in order; `has_output()`;
- `next_timer()` / `on_timer(now)`; `reload_keys(secret, now)` (SIGHUP);
- `start(now)`, `socket_failed(tid)`, `on_resolved(changed, now)`, `shutdown(now)`, `snapshot(now)`;
- `serve(services, now)` (a new configuration).

Tables and their invariants (`check_invariants()` asserts every one):
- every tunnel is SPARE or ACTIVE; `active` counts the ACTIVE ones;
- every tunnel has exactly one live entry in the keepalive timer heap;
- an ACTIVE tunnel was told to open its service socket, a SPARE one was not.
"""

from __future__ import annotations

import enum
import heapq
import os
import socket
import time
from collections import Counter
from typing import NamedTuple

from udp_tunnel.addr import show
from udp_tunnel.core.classify import Kind, inside_rule
from udp_tunnel.core.common import Activity, CoreError, Logger, Meter, leg, traffic
from udp_tunnel.core.keepalive import MIN_INTERVAL, Learner
from udp_tunnel.core.keys import GRACE, KeySet
from udp_tunnel.core.spares import Demand
from udp_tunnel.wire import proto
from udp_tunnel.wire.proto import Control, ControlError

TICK = 1.0
STALL = 2.0  # an active tunnel sending without hearing anything back for this long: keepalive now
RETRY = 0.25  # first wait for an answer to a registration; doubles up to the keepalive interval
LEGACY_RESOLVE = 300.0  # legacy mode has no replies: look the name up again this often
HELLO_SESSIONS = 64  # outside sessions whose HELLO is remembered
# Data on a spare before the outside announced its client (reordered, or the ANNOUNCE lost) waits
# for the ANNOUNCE (the outside sends it again) within these bounds; data never announced is
# not the outside's (spoofed) and never reaches the service.
HELD_DATAGRAMS = 16
HELD_BYTES = 64 * 1024
ANNOUNCE_WAIT = 3.0


class OpenTunnel(NamedTuple):
    """Open a tunnel socket towards the outside agent; count into the meters."""
    tid: int
    rx: Meter
    tx: Meter


class OpenService(NamedTuple):
    """Open the service socket of tunnel tid, for a client of `service` (its port at `offset` in the
    service's range), the client at `client` (a socket address; None when unknown: legacy), which
    sent to `reached` at the outside (None when not known)."""
    tid: int
    service: str = "default"
    offset: int = 0
    client: tuple | None = None
    reached: tuple | None = None


class MoveService(NamedTuple):
    """Tunnel tid's client now sends from `client` (WireGuard roaming): the service sees the new address."""
    tid: int
    client: tuple


class Send(NamedTuple):
    """Send data out of tunnel tid's socket."""
    tid: int
    data: bytes


class ToService(NamedTuple):
    """Send data out of tunnel tid's service socket."""
    tid: int
    data: bytes


class Close(NamedTuple):
    """Close both sockets of tunnel tid."""
    tid: int


class Resolve(NamedTuple):
    """Look the outside agent's host name up again."""


class State(enum.Enum):
    SPARE = "spare"
    ACTIVE = "active"


SPARE, ACTIVE = State.SPARE, State.ACTIVE


class Tunnel:
    __slots__ = ("tid", "state", "created", "registered", "last_reply",
                 "cookie", "peer", "sent", "sent_at", "acked", "rtt", "registrations",
                 "registered_at", "next_ka", "retry", "answers", "known_by", "key",
                 "seen", "prev_sent_at", "probe_idle", "probe_seen", "probe_counter",
                 "service", "offset", "announced", "held", "held_bytes", "held_since",
                 "rx", "tx", "rx_act", "tx_act")

    def __init__(self, tid: int, now: float) -> None:
        self.tid = tid
        self.state = SPARE
        self.created = now
        self.registered = False
        self.last_reply = now
        self.registered_at: float | None = None
        self.cookie = bytes(proto.COOKIE_LEN)
        self.peer = proto.NO_PEER
        self.sent = self.acked = 0  # counters of the last keepalive sent / answered
        self.sent_at = now
        self.rtt: float | None = None
        self.registrations = 0
        self.next_ka = now
        self.retry = RETRY
        self.answers = 0  # challenges answered at once since the last registration
        self.known_by: int | None = None  # the outside session that registered it
        self.key = 0  # the key its keepalives are made with (0: the current one)
        self.seen = proto.NO_PEER  # where the outside sees it (its NAT mapping), as the last reply said
        self.prev_sent_at = now
        self.probe_idle = 0.0  # while it probes: how long it idles
        self.probe_seen = proto.NO_PEER  # ... and where it was seen before
        self.probe_counter = 0  # the keepalive after the idle, whose answer tells
        self.service: str | None = None  # the service of its client, as the outside announced it
        self.offset = 0  # ... and the port's offset in the service's range
        self.announced = 0  # the counter of the last ANNOUNCE believed
        self.held: list[bytes] = []  # data that came before its ANNOUNCE
        self.held_bytes = 0
        self.held_since = 0.0
        self.rx = Meter()  # from the outside, to the service (counted by the loop)
        self.tx = Meter()  # from the service, to the outside
        self.rx_act = Activity()
        self.tx_act = Activity()


class InsideCore:
    def __init__(self, *, secret: bytes, keepalive: float, timeout: float, spares: int,
                 max_clients: int, now: float, log: Logger, legacy: bool = False,
                 random_bytes=os.urandom, wall=time.time, services: tuple[str, ...] = ("default",)) -> None:
        self.legacy = legacy
        self.services = {proto.service_id(name): name for name in services}  # what the outside may announce
        self.keys = KeySet(secret)
        self.rule = inside_rule(legacy)
        self.random_bytes = random_bytes
        self.wall = wall
        self.session = int.from_bytes(random_bytes(8), "big")
        self.keepalive = keepalive  # the upper bound (-t); the interval in use is learned
        self.learner = Learner(keepalive, now)
        self.probe: Tunnel | None = None  # the spare that idles to measure a mapping's lifetime
        self.timeout = timeout
        self.spares = spares  # the floor: more are opened while clients keep arriving
        self.max_clients = max_clients
        self.log = log
        self.started = now
        self.counter = 0
        self.legacy_nonce = 0
        self.tunnels: dict[int, Tunnel] = {}
        self.actions: list = []
        self.stats: Counter[str] = Counter()
        self.retired: Counter[str] = Counter()  # traffic of closed tunnels, for totals that never drop
        self.outside_session: int | None = None
        self.last_reply: float | None = None
        self.answering = False  # the outside agent answers
        self.last_resolve = now
        self.next_tick = now
        self.timers: list[tuple[float, int]] = []  # (when, tid): keepalives due, stale entries skipped
        self.active = 0  # tunnels in state ACTIVE
        self.demand = Demand()  # clients' arrivals and registration times: the spares they need
        self.waiting = 0  # clients held at the outside for want of a spare (it says so)
        self.last_hello = -1e9
        self.hellos: dict[int, None] = {}  # outside sessions whose HELLO was believed (oldest first)

    # --- tunnels ---

    def start(self, now: float) -> None:
        self._replenish(now)

    def counts(self) -> tuple[int, int]:
        return self.active, len(self.tunnels) - self.active

    def spare_target(self, now: float) -> int:
        """Spares ready for clients: --spares, plus as many as clients arrived lately or wait at
        the outside, within --max-clients. The spare that idles to learn the NAT timeout (the
        probe) is never handed out while it idles and is not counted here; until it starts,
        one more is kept to start it with."""
        extra = self.demand.extra(now, self.waiting)
        target = max(0, min(self.spares + extra, self.max_clients - self.active)) if self.spares else 0
        if target and self.probe is None and not (self.legacy or self.learner.done()):
            target += 1
        return target

    def ready_spares(self) -> int:
        """Spares a client can take now: all but the probe."""
        return len(self.tunnels) - self.active - (self.probe is not None)

    def _replenish(self, now: float) -> None:
        active, spare = self.active, self.ready_spares()
        want = self.spare_target(now)
        if spare < self.spares and active >= self.max_clients:  # the outside counts what it drops
            self.log.limited("limit", f"client limit ({self.max_clients}) reached: no new spare tunnel")
        while spare < want:
            tid = 0
            while tid == 0 or tid in self.tunnels:
                tid = int.from_bytes(self.random_bytes(8), "big")
            self.tunnels[tid] = t = Tunnel(tid, now)
            self.actions.append(OpenTunnel(tid, t.rx, t.tx))
            self._send_keepalive(t, now)  # a new spare announces itself at once
            spare += 1

    def _shrink(self, now: float) -> None:
        """Close spares beyond the target, the oldest first, once demand has passed."""
        extra = self.ready_spares() - self.spare_target(now)
        if extra <= 0:
            return
        spares = (t for t in self.tunnels.values() if t.state is SPARE and t is not self.probe)
        for t in sorted(spares, key=lambda t: t.created)[:extra]:
            self.close(t.tid, now, "spare no longer needed")

    def _activate(self, t: Tunnel, now: float, service: str = "default", offset: int = 0,
                  reached: tuple | None = None) -> None:
        if self.probe is t:  # in use now: no figure from it
            self.probe = None
        t.state = ACTIVE
        t.service, t.offset = service, offset
        self.active += 1
        t.rx_act.last = now
        self.demand.arrived(now)
        client = proto.unpack_peer(t.peer, socket.AF_INET6)
        self.actions.append(OpenService(t.tid, service, offset, client, reached))
        self.log.info(f"tunnel {t.tid:016x} now carries a client"
                      + (f" of {service}, {show(client)}" if client is not None else ""))
        if not self.legacy:
            self._send_keepalive(t, now)  # says "active" at once and learns the client address
        self._replenish(now)

    def _drop(self, tid: int) -> Tunnel:
        """Remove tunnel tid from the table, keeping the count of active tunnels right."""
        t = self.tunnels.pop(tid)
        self.active -= t.state is ACTIVE
        if t.held:  # a spare that held data never announced
            self.stats["drop_unannounced"] += len(t.held)
        if self.probe is t:
            self.probe = None
        return t

    def close(self, tid: int, now: float, why: str) -> None:
        t = self._drop(tid)
        self.retired.update(traffic(t.rx, t.tx))
        if not self.legacy and t.registrations:  # (also while it registers again: the outside knew it)
            self.counter += 1
            self.actions.append(Send(tid, self._keepalive(t, self.counter, proto.F_CLOSING)))
        self.actions.append(Close(tid))
        self.log.info(f"tunnel {tid:016x} closed: {why}")
        self._replenish(now)

    def socket_failed(self, tid: int) -> None:
        """The loop could not open a socket for tunnel tid: drop it without a word to the outside."""
        if tid in self.tunnels:
            self._drop(tid)
            self.stats["socket_errors"] += 1

    # --- keepalives ---

    def interval(self) -> float:
        """Seconds between keepalives on every tunnel now."""
        return self.keepalive if self.legacy else self.learner.interval()

    def dead_after(self) -> float:
        """No reply for this long: the outside agent is gone."""
        return 2 * self.interval() + 1

    def _keepalive(self, t: Tunnel, counter: int, flags: int = 0, interval: float = 0.0) -> bytes:
        if self.legacy:
            self.legacy_nonce = max(self.legacy_nonce + 1, int(self.wall() * 1000))
            return proto.legacy_keepalive(self.keys.current, self.legacy_nonce)
        m = Control(proto.KEEPALIVE, flags, self.session, t.tid, counter, t.cookie, t.peer, self.active, t.key,
                    interval=round(interval), nonce=counter)
        if t.state is ACTIVE:  # it carries this client, of this service (port offset in `seen`'s port)
            m.flags |= proto.F_ACTIVE
            m.service, m.seen = proto.service_id(t.service), proto.NO_PEER[:16] + t.offset.to_bytes(2, "big")
        return self.keys.codec.encode(m)

    def _send_keepalive(self, t: Tunnel, now: float, probe: float = 0.0) -> None:
        """Send a keepalive on t now; with `probe`, t then idles that long on purpose."""
        if self.probe is t and not probe:
            self._probe_ends(t, now)
        elif t.registered and now - t.last_reply > self.dead_after():
            self._unregister(t)  # this tunnel's keepalives go unanswered: its mapping may be gone
        self.counter += 1
        t.prev_sent_at, t.sent, t.sent_at = t.sent_at, self.counter, now
        if probe:
            wait = probe
        elif t.registered or self.legacy:
            wait = self.interval()
        else:  # not registered yet: try again soon, backing off up to the keepalive interval
            wait = min(self.interval(), t.retry)
            t.retry = min(2 * t.retry, self.interval())
        self.actions.append(Send(t.tid, self._keepalive(t, self.counter, proto.F_PROBE if probe else 0, wait)))
        t.next_ka = now + wait
        heapq.heappush(self.timers, (t.next_ka, t.tid))

    # --- how long NAT mappings live (keepalive.py) ---

    def _start_probe(self, now: float) -> None:
        """Let one registered spare idle for the learner's next probe time."""
        if self.legacy or self.probe is not None or not self.answering:
            return
        idle = self.learner.next_probe(now)
        if idle is None:
            return
        spares = [t for t in self.tunnels.values() if t.state is SPARE and t.registered and t.seen != proto.NO_PEER]
        if len(spares) < 2 or any(t.probe_counter for t in spares):  # one stays ready; one result at a time
            return
        t = min(spares, key=lambda t: t.created)
        self.probe, t.probe_idle, t.probe_seen = t, idle, t.seen
        self._send_keepalive(t, now, probe=idle)

    def _probe_ends(self, t: Tunnel, now: float) -> None:
        self.probe = None
        if now >= t.sent_at + t.probe_idle - 0.1:  # it idled as long as asked: the answer tells
            t.probe_counter = self.counter + 1
        else:  # interrupted (an outside restart...): no figure from this one
            t.probe_idle = 0.0

    def _observe(self, t: Tunnel, seen: bytes, counter: int, now: float) -> None:
        """The outside says where it sees tunnel t: has its NAT mapping changed?"""
        if seen == proto.NO_PEER:
            return
        if t.probe_counter and counter == t.probe_counter:
            self.learner.result(t.probe_idle, survived=seen == t.probe_seen)
            t.probe_counter = 0
            self.log.debug(f"NAT mapping {'survived' if seen == t.probe_seen else 'lapsed after'} "
                           f"{t.probe_idle:.1f} s idle; keepalive interval now {self.interval():.1f} s")
        elif t.probe_counter:  # the answer to the keepalive after the idle is lost: no figure
            t.probe_counter = 0
        elif t.seen != proto.NO_PEER and seen != t.seen:
            self.stats["mappings_changed"] += 1
            idle = now - max(t.prev_sent_at, t.tx_act.last or 0.0, t.rx_act.last or 0.0)
            if idle >= MIN_INTERVAL:  # it idled that long and the NAT forgot it
                self.learner.result(idle, survived=False)
                self.log.info(f"a NAT mapping lapsed after {idle:.0f} s idle: keepalive interval now "
                              f"{self.interval():.1f} s")
        t.seen = seen

    def _unregister(self, t: Tunnel) -> None:
        t.registered = False
        t.answers = 0

    def _register_all_again(self, now: float, but: Tunnel | None = None) -> None:
        """Every tunnel sends a keepalive at once, active ones first."""
        for other in sorted(self.tunnels.values(), key=lambda o: o.state is not ACTIVE):
            if other is not but:
                self._unregister(other)
                self._send_keepalive(other, now)

    # --- datagrams in ---

    def receive(self, tid: int, data: bytes, now: float) -> None:
        """A datagram on tunnel tid's socket that the loop did not forward itself."""
        if self.rule.kind(data) is Kind.CONTROL:
            self._control(tid, data, now)
        else:
            self._data(tid, data, now)

    def _control(self, tid: int, data: bytes, now: float) -> None:
        t = self.tunnels.get(tid)
        if t is None:
            return
        m = self._verify(t, data)
        if m is None:
            return
        if m.type == proto.ANNOUNCE:
            if m.flags & proto.F_GONE:
                self.close(t.tid, now, "the outside agent let its client go")
                return
            self._announce(t, m.peer, m.service, m.interval, proto.unpack_peer(m.seen, socket.AF_INET6), now,
                           m.active)
            return
        if m.flags & proto.F_HELLO:
            self._hello(m, now)
            return
        self._observe(t, m.seen, m.counter, now)
        t.acked = m.counter
        self._outside_session(m.session, t, now)
        self.last_reply = now
        self.answering = True
        t.cookie = m.cookie
        if m.flags & proto.F_REGISTERED:
            self.waiting = m.active
            self._registered(t, m, now)
            if m.flags & proto.F_REKEY and t.key:  # the outside has our current key too: use it
                t.key = 0
                self._send_keepalive(t, now)
        elif m.flags & proto.F_REFUSED:
            self._refused(t, now)
        else:
            self._challenged(t, now)

    def _verify(self, t: Tunnel, data: bytes) -> Control | None:
        try:
            m = self.keys.codec.decode(data)
        except ControlError as e:
            self.stats[f"drop_{e.args[0]}"] += 1
            self.log.limited(f"bad-{e.args[0]}", "dropped a control datagram from the outside agent: "
                             + ("authentication failed (is the key the same on both ends?)"
                                if e.args[0] == "auth" else "malformed"))
            return None
        if m.type == proto.KEEPALIVE or m.tunnel != t.tid:
            self.stats["drop_malformed"] += 1
            return None
        if m.type == proto.ANNOUNCE:  # from the outside session that registered the tunnel, each once
            if m.session != t.known_by or m.counter <= t.announced:
                self.stats["drop_replay"] += 1
                return None
            t.announced = m.counter
            return m
        if m.flags & proto.F_HELLO and m.counter == 0:
            return m
        if not t.acked < m.counter <= t.sent:
            self.stats["drop_replay"] += 1
            return None
        return m

    def _announce(self, t: Tunnel, peer: bytes, sid: bytes, offset: int, reached: tuple | None,
                  now: float, forwarded: int = 0) -> None:
        """The outside gives tunnel t to the client at `peer`, of the service `sid` names (an
        ANNOUNCE, or a REPLY that says BOUND): its data may reach the service now; a new
        address of the client it carries is the client moving. Of the data held before, only
        the last `forwarded` datagrams (how many the outside forwarded before this ANNOUNCE)
        can be the client's: the rest was spoofed onto the spare, and is dropped."""
        service = self.services.get(sid)
        if service is None:
            self.stats["drop_unknown_service"] += 1
            self.log.limited("service", "the outside agent gave a tunnel to a client of a service this agent "
                             "does not serve (are the services the same at both ends?)")
            if t.state is SPARE:
                self.close(t.tid, now, "its client's service is not served here")
            return
        if t.state is SPARE:
            t.peer = peer
            self._activate(t, now, service, offset, reached)
            held, t.held, t.held_bytes = t.held, [], 0
            keep = held[len(held) - forwarded:] if forwarded else []
            if len(keep) < len(held):
                self.stats["drop_unannounced"] += len(held) - len(keep)
            for data in keep:  # what came before the announcement, in order
                self._to_service(t, data)
        elif peer != t.peer and peer != proto.NO_PEER and service == t.service:
            t.peer = peer
            client = proto.unpack_peer(peer, socket.AF_INET6)
            self.actions.append(MoveService(t.tid, client))
            self.stats["client_moves"] += 1
            self.log.info(f"the client of tunnel {t.tid:016x} moved to {show(client)}")

    def _hello(self, m: Control, now: float) -> None:
        """An outside agent that just started found us in its state file: register every
        tunnel again now, without waiting for the next keepalive. Believed for nothing else."""
        if m.session == self.outside_session or m.session in self.hellos or now - self.last_hello < 1.0:
            return  # one HELLO per outside session is believed: a replayed one costs nothing more
        self.last_hello = now
        self.hellos[m.session] = None
        if len(self.hellos) > HELLO_SESSIONS:
            del self.hellos[next(iter(self.hellos))]
        self.stats["hellos"] += 1
        self.log.info("the outside agent says it restarted: registering tunnels again")
        self._register_all_again(now)

    def _outside_session(self, session: int, t: Tunnel, now: float) -> None:
        if session == self.outside_session:
            return
        restarted = self.outside_session is not None
        self.outside_session = session
        if restarted:
            self.stats["outside_restarts"] += 1
            self.log.warning("the outside agent restarted (new session): registering tunnels again")
            self._register_all_again(now, but=t)

    def _registered(self, t: Tunnel, m: Control, now: float) -> None:
        if m.counter == t.sent:
            t.rtt = now - t.sent_at
        t.last_reply = now
        t.known_by = self.outside_session
        if not t.registered:
            if not t.registrations:
                self.demand.registered(now - t.created)
            t.registered = True
            t.registrations += 1
            t.registered_at = now
            t.retry = RETRY
            t.answers = 0
            self.stats["registrations"] += 1
            self.log.debug(f"tunnel {t.tid:016x} registered")
        if m.flags & proto.F_BOUND:  # the outside gave it to this client (its ANNOUNCE may have got lost)
            self._announce(t, m.peer, m.service, m.interval, None, now)
        self._replenish(now)

    def _refused(self, t: Tunnel, now: float) -> None:
        t.registered = False
        if t.state is ACTIVE:  # the outside no longer knows its client, or never gave it one
            self.close(t.tid, now, "the outside agent does not know its client")
        else:
            if len(self.keys) > 1 and t.answers < 3:  # keys are being rotated: try the other one now
                t.key = (t.key + 1) % len(self.keys)
                t.answers += 1
                self._send_keepalive(t, now)
            self.log.limited("refused", "the outside agent refused a tunnel (at its tunnel limit, "
                             "or it has another key)")

    def _challenged(self, t: Tunnel, now: float) -> None:
        """Prove we receive at our address: answer with the cookie, a few times at most."""
        if t.registered:
            self.log.info(f"tunnel {t.tid:016x} must register again (outside restart or new NAT mapping)")
        t.registered = False
        if t.answers < 3:
            t.answers += 1
            self._send_keepalive(t, now)

    def _data(self, tid: int, data: bytes, now: float) -> None:
        """Data on a tunnel the loop does not forward yet: the first datagram on a spare."""
        t = self.tunnels.get(tid)
        if t is None:
            return
        if t.state is SPARE:
            if not (self.legacy or t.known_by is not None and t.known_by == self.outside_session):
                # the outside hands out only spares it registered: this came from someone else
                self.stats["drop_unregistered_spare"] += 1
                return
            if self.active >= self.max_clients:  # the outside allows more clients than we do
                self.stats["drop_limit"] += 1
                self.log.limited("limit", f"client limit ({self.max_clients}) reached: dropping a new client")
                return
            if not self.legacy:  # wait for the outside's ANNOUNCE of its client
                self._hold(t, data, now)
                return
            self._activate(t, now, next(iter(self.services.values())))
        self._to_service(t, data)

    def _to_service(self, t: Tunnel, data: bytes) -> None:
        self.actions.append(ToService(t.tid, data))
        t.rx.pkts += 1
        t.rx.bytes += len(data)

    def _hold(self, t: Tunnel, data: bytes, now: float) -> None:
        if not t.held:
            t.held_since = now
        if len(t.held) >= HELD_DATAGRAMS or t.held_bytes + len(data) > HELD_BYTES:
            self.stats["drop_unannounced"] += 1
            return
        t.held.append(data)
        t.held_bytes += len(data)

    def has_output(self) -> bool:
        return bool(self.actions)

    def serve(self, services: tuple[str, ...], now: float) -> None:
        """A new configuration's services: clients of one no longer served close their tunnels."""
        self.services = {proto.service_id(name): name for name in services}
        for t in [t for t in self.tunnels.values() if t.state is ACTIVE and t.service not in services]:
            self.close(t.tid, now, f"service {t.service} is no longer served")

    def take(self) -> list:
        """The actions to carry out, handed over (and forgotten here)."""
        actions, self.actions = self.actions, []
        return actions

    def on_resolved(self, changed: bool, now: float) -> None:
        """The loop looked the outside name up again (and reconnected if `changed`)."""
        if changed:
            self._register_all_again(now)

    def reload_keys(self, secret: bytes, now: float) -> None:
        """The key file again (SIGHUP): the current key first (a key it replaces is still accepted
        for keys.GRACE s, while the other end may not have the new one yet); every tunnel
        registers again at once, with the new key."""
        kept = self.keys.reload(secret, now)
        self.log.info("SIGHUP: key file read again" + (f"; the old key is accepted for {GRACE:g} s more"
                                                         if kept else ""))
        for t in self.tunnels.values():
            t.key = 0
        if not self.legacy:
            self._register_all_again(now)

    # --- time ---

    def next_timer(self) -> float:
        t = min(self.next_tick, self.keys.forget_at)
        return min(t, self.timers[0][0]) if self.timers else t

    def on_timer(self, now: float) -> None:
        if self.keys.expire(now):
            for t in self.tunnels.values():
                t.key = min(t.key, len(self.keys) - 1)
            self.log.info("the old key is no longer accepted")
        timers = self.timers
        while timers and timers[0][0] <= now + 0.05:  # those due within 50 ms go out together
            when, tid = heapq.heappop(timers)
            t = self.tunnels.get(tid)
            if t is not None and t.next_ka == when:  # else: stale (rescheduled or closed)
                if not t.registered and len(self.keys) > 1:  # no answer: maybe the other end has the other key
                    t.key = (t.key + 1) % len(self.keys)
                self._send_keepalive(t, now)
        if now >= self.next_tick:
            self.next_tick = now + TICK
            self._tick(now)

    def _tick(self, now: float) -> None:
        """Once a second: the active tunnels' activity, and the pool of spares."""
        for t in self.tunnels.values():
            if t.held and now - t.held_since > ANNOUNCE_WAIT:  # never announced: not the outside's
                self.stats["drop_unannounced"] += len(t.held)
                t.held, t.held_bytes = [], 0
        for t in [t for t in self.tunnels.values() if t.state is ACTIVE]:
            t.rx_act.sample(t.rx, now)
            moved = t.tx_act.sample(t.tx, now)
            if now - t.rx_act.last > self.timeout:
                self.close(t.tid, now, f"no datagram from the client for {now - t.rx_act.last:.0f} s")
            elif moved and not self.legacy and now - t.rx_act.last > STALL and now - t.sent_at > STALL:
                # the service talks, the client seems not to: maybe the NAT mapping changed
                # (rebinding); a keepalive re-registers the tunnel from its new address now
                self.stats["stall_keepalives"] += 1
                self._send_keepalive(t, now)
        if self.answering and not self.legacy and now - (self.last_reply or self.started) > self.dead_after():
            self.answering = False
            self.log.limited("noreply", f"the outside agent has not answered for "
                             f"{now - (self.last_reply or self.started):.0f} s")
            for t in self.tunnels.values():
                self._unregister(t)
        self._replenish(now)
        self._shrink(now)
        self._start_probe(now)
        self._check_resolve(now)

    def shutdown(self, now: float) -> None:
        """Close every tunnel, telling the outside agent so that it forgets them now."""
        self.spares = 0
        for tid in list(self.tunnels):
            self.close(tid, now, "the agent is stopping")

    def _check_resolve(self, now: float) -> None:
        if self.legacy:
            due = now - self.last_resolve >= LEGACY_RESOLVE
        else:
            heard = self.last_reply if self.last_reply is not None else self.started
            dead = self.dead_after()
            due = not self.answering and now - heard > dead and now - self.last_resolve > dead
        if due:
            self.last_resolve = now
            self.actions.append(Resolve())

    # --- checks and what the operator sees ---

    def check_invariants(self, service_open: set[int] | None = None) -> None:
        """`service_open`: the tunnels whose service socket the loop (or a simulation) opened."""
        if sum(t.state is ACTIVE for t in self.tunnels.values()) != self.active:
            raise CoreError("active count")
        live = Counter(tid for when, tid in self.timers if tid in self.tunnels and self.tunnels[tid].next_ka == when)
        for tid, t in self.tunnels.items():
            if not isinstance(t.state, State) or t.tid != tid:
                raise CoreError(f"tunnel {tid:x}: state")
            if live[tid] < 1:
                raise CoreError(f"tunnel {tid:x}: no keepalive timer")
            if service_open is not None and (tid in service_open) != (t.state is ACTIVE):
                raise CoreError(f"tunnel {tid:x}: service socket vs state")

    def snapshot(self, now: float) -> dict:
        tunnels = []
        for t in self.tunnels.values():
            tunnels.append({
                "id": f"{t.tid:016x}", "state": t.state.value,
                "registered": t.registered or self.legacy,
                "client": show(proto.unpack_peer(t.peer, socket.AF_INET6)) if t.peer != proto.NO_PEER else None,
                "age": now - t.created, "rtt": t.rtt,
                "registered_ago": None if t.registered_at is None else now - t.registered_at,
                "registrations": t.registrations,
                "service": t.service,
                "from_outside": leg(t.rx, t.rx_act, now),
                "to_outside": leg(t.tx, t.tx_act, now),
            })
        totals = self.retired.copy()
        for t in self.tunnels.values():
            totals.update(traffic(t.rx, t.tx))
        active, spare = self.counts()
        return {"role": "inside", "protocol": "legacy" if self.legacy else f"v{proto.VERSION}",
                "uptime": now - self.started, "clients": active, "spares": spare,
                "keepalive": {**self.learner.snapshot(), "interval": self.interval(), "upper": self.keepalive},
                "demand": self.demand.snapshot(),
                "keepalives": self.counter,  # control messages sent, in all
                "services": {name: {"clients": sum(t.service == name for t in self.tunnels.values()
                                                   if t.state is ACTIVE)} for name in self.services.values()},
                "outside_answering": self.legacy or (self.answering and self.last_reply is not None
                                                     and now - self.last_reply <= self.dead_after()),
                "stats": dict(self.stats), "totals": dict(totals), "tunnels": tunnels}
