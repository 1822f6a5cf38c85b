"""The outside agent's state machine, without any I/O.

The agent receives on endpoints (local ports, by index `via`): endpoint 0 is
the tunnel port, where the inside agents register; a service's clients arrive
on its own port(s), or on the tunnel port when the service listens there
(`-l PORT`: one endpoint for everything). Each inside agent has a key; a
service names the key whose tunnels carry it.

What the I/O loop may use (nothing else):
- `receive(data, addr, now, via)`: a datagram the loop does not forward itself
  (from an unknown source, or one `rules[via]` says the core must see);
- `take()`: what to send, as `Datagram`s (data, address, endpoint to send from);
  `has_output()` says whether there is any;
- `next_timer()` / `on_timer(now)`; `reload_keys(secret, now, key)` (SIGHUP);
- `routes` (routes.RouteTable: `gets[via]`, `version`, a `listener`): where
  datagrams of known flows go, read-only; the loop counts what it forwards
  into the flows (Meters);
- `rules` (classify.Classifier per endpoint): which datagrams of known flows
  are the core's;
- `reached[via]`: the address clients send to on an endpoint, when known;
- `snapshot(now)`, `saved_tunnels()` / `saved_initiations()` /
  `remembered()` / `remember_initiations()` across a restart;
- `add_key` / `remove_key` / `set_key_limit` / `add_service` /
  `remove_service` / `update_service` / `add_endpoint` (a new configuration).

Tables and their invariants (`check_invariants()` asserts every one):

- `tunnels` (id -> Tunnel) and `by_addr` (public address -> Tunnel) hold the
  same tunnels, each under its own id and address.
- A tunnel is in exactly one state: SPARE (in `spares`, no client), BOUND
  (its client in `clients_at[via]`, both directions in `routes`) or ORPHAN
  (the inside says it carries a client this agent does not know: never
  handed out).
- `routes` holds exactly the two flows of every BOUND tunnel: client (on its
  endpoint) -> the tunnel's address, from endpoint 0; the tunnel's address
  (on endpoint 0) -> the client, from the client's endpoint.
- No address is both a tunnel's and a client's on the tunnel port.
- Clients per service and per key, tunnels per key, are counted right and
  within their limits.
- Each endpoint's admission (`admissions[via]`) holds in `pending` new clients waiting for a spare,
  none of them a client or a tunnel; their datagrams and bytes stay within the
  HOLD_* bounds (Admission.check() checks its own invariants).
- Every tunnel's session is in `sessions`; a session counts its ORPHAN and
  BOUND tunnels in `active`.
"""

from __future__ import annotations

import enum
import os
import socket
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from udp_tunnel.addr import show
from udp_tunnel.core.admission import Admission, Source, default_per_source, source_key
from udp_tunnel.core.classify import Classifier, Kind, outside_rule
from udp_tunnel.core.common import (
    TRAFFIC,
    Activity,
    CoreError,
    Datagram,
    Flow,
    Logger,
    ReplayWindow,
    TokenBucket,
    leg,
    traffic,
)
from udp_tunnel.core.keys import GRACE, KeySet
from udp_tunnel.core.routes import RouteTable
from udp_tunnel.core.wireguard import Gate
from udp_tunnel.wire import proto
from udp_tunnel.wire.proto import Control, ControlError

SESSIONS = 256  # inside sessions remembered
ANNOUNCE_AGAIN = 0.1  # s until an unconfirmed ANNOUNCE is sent again, doubling
ANNOUNCE_TRIES = 5  # then the keepalives' replies (BOUND) announce it
HELLO_BURST, HELLO_PACE = 64, 0.05  # HELLOs after a restart: 64 every 50 ms (1280/s) at most
INF = float("inf")
STRANGERS = 4096  # sessions not (yet) known whose challenged keepalive counters are remembered
# Tunnel ids the inside closed, remembered per session, the latest CLOSED of them: every close
# takes a counter of the session's (its CLOSING keepalive) and a new tunnel's first keepalive is
# within NEAR of the newest, so a tunnel closed more than NEAR counters ago can't come back anyway.
CLOSED = 2048
NEAR = 1024  # a new tunnel's first keepalive is this close to its session's newest counter
# Challenges have three budgets, so that strangers can't starve the real inside agent:
SESSION_CHALLENGES = 500.0  # per second, per known session: its new tunnels (fresh counters only)
PROVEN_CHALLENGES = 500.0  # per second: to addresses where a tunnel registered before
LEGACY_TICK = 0.0015  # s: a legacy spare is handed out no sooner than the next millisecond of its keepalive


class State(enum.Enum):
    SPARE = "spare"
    BOUND = "active"
    ORPHAN = "orphan"


class Session:
    """What this agent knows of one inside agent's session (its random id)."""

    __slots__ = ("sid", "keyname", "window", "active", "announced", "last", "src", "challenges", "closed")

    def __init__(self, sid: int, now: float, src=None, window: ReplayWindow | None = None,
                 burst: float = 64.0, keyname: str = "default") -> None:
        self.sid = sid
        self.keyname = keyname  # the key its keepalives are made with (one per inside agent)
        self.src = src  # where it first registered from (its source key)
        self.window = window or ReplayWindow()  # its keepalive counters: each accepted once
        self.active = 0  # ORPHAN and BOUND tunnels here
        self.announced: int | None = None  # active tunnels it said it has (while recovering)
        self.last = now
        self.challenges = TokenBucket(SESSION_CHALLENGES, burst, now)  # for its new tunnels
        self.closed: dict[int, None] = {}  # the tunnels it closed lately (CLOSED at most), oldest first


class Strangers:
    """The keepalive counters challenged per inside session this agent does not know: each
    (session, counter) is challenged once, so replays of captured keepalives of a forgotten
    session (or of every session, after a restart) cost one challenge each, not one per copy."""

    def __init__(self) -> None:
        self.windows: OrderedDict[int, ReplayWindow] = OrderedDict()

    def first(self, sid: int, counter: int) -> bool:
        w = self.windows.pop(sid, None) or ReplayWindow()
        self.windows[sid] = w
        if len(self.windows) > STRANGERS:
            self.windows.popitem(last=False)
        return w.fresh(counter)

    def known(self, sid: int) -> ReplayWindow | None:
        """The session is known now: what was challenged of it (its window goes on from there)."""
        return self.windows.pop(sid, None)


@dataclass(frozen=True)
class Service:
    """A service the outside agent serves: whose tunnels carry it (`key`), its limits, and its
    WireGuard gate (wireguard.Gate, or None: any client)."""
    name: str = "default"
    key: str = "default"
    max_clients: int = 1000
    max_per_source: int = 0  # 0: a quarter of max_clients, at least 16
    wireguard: Gate | None = None


@dataclass(frozen=True)
class Endpoint:
    """A local port the agent receives on (the I/O layer holds its socket), by index: `via`.
    `service`: whose clients arrive here (None: only tunnels), `offset`: the port's place in the
    service's range, `tunnels`: the inside agents register here (the tunnel port, endpoint 0)."""
    service: str | None = "default"
    offset: int = 0
    tunnels: bool = True


class Tunnel:
    __slots__ = ("tid", "session", "addr", "state", "client", "via", "src", "created", "last_ka", "key",
                 "interval", "probe", "ready_at", "service", "offset", "confirmed", "announce_at",
                 "announce_tries", "counter", "registered_at", "rebinds", "up", "down", "up_act", "down_act")

    def __init__(self, tid: int, session: Session, addr: tuple, now: float) -> None:
        self.tid = tid
        self.session = session
        self.addr = addr
        self.state = State.SPARE
        self.client: tuple | None = None
        self.via = 0  # BOUND: the endpoint its client sends to
        self.src: Source | None = None  # the client's source record
        self.created = self.last_ka = self.registered_at = now
        self.counter = 0
        self.key = 0  # which of the codec's keys its last keepalive was made with
        self.interval = 25.0  # seconds to its next keepalive, as its last one said
        self.probe = False  # it idles on purpose: never handed out
        self.ready_at = 0.0  # not handed out before (legacy: the next millisecond of its keepalive)
        self.service = ""  # BOUND: the service of its client, and the port's offset in its range
        self.offset = 0
        self.confirmed = False  # BOUND: the inside said ACTIVE for its client (the ANNOUNCE arrived)
        self.announce_at = INF  # BOUND, not confirmed: when to send the ANNOUNCE again
        self.announce_tries = 0
        self.rebinds = 0
        self.up: Flow | None = None  # client -> inside
        self.down: Flow | None = None  # inside -> client
        self.up_act: Activity | None = None
        self.down_act: Activity | None = None


class Door:
    """What the Admission of one endpoint sees of its core: the clients on that port, the limits
    of its service and of the service's key, the spares of that key. Everything else is the
    core's own."""

    def __init__(self, core: OutsideCore, via: int, service: Service) -> None:
        self.core, self.via, self.service = core, via, service
        self.clients = core.clients_at[via]
        self.stats, self.log = core.stats, core.log  # the core's, read on every new client: not via __getattr__

    def __getattr__(self, name: str):
        return getattr(self.core, name)

    @property
    def max_clients(self) -> int:
        """len(clients) reaches it when the service, its key or the agent is full."""
        return len(self.clients) + self.core.room(self.service)

    def ready_spare(self, now: float) -> Tunnel | None:
        return self.core.ready_spare(now, self.service.key)

    def bind(self, t: Tunnel, client: tuple, src: Source, now: float) -> None:
        self.core.bind(t, client, src, now, self.via)

    def forward(self, addr: tuple, data: bytes) -> None:
        self.core.forward(addr, data, self.via)


class OutsideCore:
    def __init__(self, *, secret: bytes = b"", keepalive: float, max_clients: int = 1000,
                 family: int, now: float, log: Logger, legacy: bool = False,
                 max_skew: float = 120.0, max_per_source: int = 0, random_bytes=os.urandom,
                 wall=time.time, wireguard: Gate | None = None,
                 keys: dict[str, tuple[bytes, int]] | None = None, services: list[Service] | None = None,
                 endpoints: list[Endpoint] | None = None) -> None:
        """One service on one port (the command line's): secret, max_clients, max_per_source,
        wireguard; or several: `keys` (name -> (secret, most clients)), `services`, `endpoints`
        (the tunnel port first)."""
        self.legacy = legacy
        keys = keys or {"default": (secret, max_clients)}
        self.keyring = {name: KeySet(k) for name, (k, _) in keys.items()}
        self.key_limit = {name: n for name, (_, n) in keys.items()}
        self.keys = next(iter(self.keyring.values()))  # the first key (legacy: the only one)
        self.services = {s.name: s for s in services or [Service("default", next(iter(keys)), max_clients,
                                                                   max_per_source, wireguard)]}
        self.cookie_secret = random_bytes(32)  # new each start: old cookies die with the process
        self.session = int.from_bytes(random_bytes(8), "big")
        self.keepalive = keepalive
        self.expiry = keepalive + 10 if legacy else 2 * keepalive + 5
        # a cookie lives one to two slots: longer than a keepalive interval and a lost one
        self.cookie_slot = max(60.0, self.expiry)
        self._limits()
        self.family, self.log, self.max_skew, self.wall, self.started = family, log, max_skew, wall, now
        self._tables(now)
        # Just started: active tunnels of a running inside agent come back with their
        # clients. Until they have (or the expiry window is over), new clients are held,
        # so that an old client can't be given a fresh spare instead of its own tunnel.
        self.recover_until = now if legacy else now + self.expiry
        self.recovering = not legacy
        self.endpoints: list[Endpoint] = []
        for e in endpoints or [Endpoint()]:
            self.add_endpoint(e, now)
        # WireGuard mode (--wireguard-key) is per service: its Service's gate (wireguard.py), which
        # gate(t) and the admissions reach. Below, the command line's one service on one port, as
        # the tests see it (the I/O layer reads `rule`: endpoint 0's).
        self.wg = wireguard if len(self.services) == 1 else None
        self.rule = self.rules[0]
        self.clients = self.clients_at[0]
        self.admission = next((a for a in self.admissions if a is not None), None)

    def _tables(self, now: float) -> None:
        self.stats: Counter[str] = Counter()
        self.routes = RouteTable()
        self.rules: list[Classifier] = []  # per endpoint: which datagrams of known flows are the core's
        self.clients_at: list[dict[tuple, Tunnel]] = []  # per endpoint: client address -> its tunnel
        self.admissions: list[Admission | None] = []  # per endpoint with a service
        self.reached: list[tuple | None] = []  # per endpoint: where clients send (when known)
        self.tunnels: dict[int, Tunnel] = {}
        self.by_addr: dict[tuple, Tunnel] = {}
        self.bound: Counter[str] = Counter()  # clients, per service and per "key:NAME"
        self.key_tunnels: Counter[str] = Counter()  # tunnels per key
        self.spares: dict[int, Tunnel] = {}  # in order of their last keepalive, freshest last
        self.sessions: dict[int, Session] = {}
        self.strangers = Strangers()
        self.proven: set[tuple] = set()  # after a restart: where the previous run's tunnels were
        self.proven_challenges = TokenBucket(PROVEN_CHALLENGES, float(self.max_tunnels), now)
        # strangers' challenges (sessions not known here), per key: budgets per source and in all
        self.strangers_budget = {
            name: Admission(self, now, float(limit + 64), 16, None) for name, limit in self.key_limit.items()}
        self.out: list[Datagram] = []
        self.retired: Counter[str] = Counter()  # traffic of tunnels gone, for totals that never drop
        self.retired_by: dict[str, Counter[str]] = {}  # ... per service
        self.sent = 0  # messages sent: each one's number
        self.announce_due = INF  # the earliest ANNOUNCE to send again
        self.hellos: deque[tuple[int, tuple]] = deque()  # HELLOs still to send (a restart), paced
        self.hello_at = INF
        self.legacy_nonce = 0
        self.legacy_session = Session(0, now, keyname=next(iter(self.keyring)))
        self.legacy_ids = 0
        self.next_tick = now + 1.0

    def add_endpoint(self, e: Endpoint, now: float) -> int:
        """A local port more (the I/O layer opened its socket): its index, `via`."""
        via = self.routes.add_endpoint()
        self.endpoints.append(e)
        self.rules.append(self._rule_of(e))
        self.clients_at.append({})
        self.reached.append(None)
        svc = self.services.get(e.service) if e.service is not None else None
        self.admissions.append(None if svc is None else Admission(
            Door(self, via, svc), now, float(self.max_tunnels),
            svc.max_per_source or default_per_source(svc.max_clients), svc.wireguard))
        return via

    def _rule_of(self, e: Endpoint) -> Classifier:
        """What the core must see of known flows on endpoint e: on the tunnel port, the control
        messages, and the WireGuard handshake answers when a service admits WireGuard clients
        (their sessions, for roaming: wireguard.py); nothing of a service's own port."""
        wg_any = any(s.wireguard is not None for s in self.services.values())
        return outside_rule(self.legacy, wg_any) if e.tunnels else Classifier({})

    def _update_rules(self) -> None:
        """After services changed: the tunnel port's rule, should a WireGuard service have come or gone."""
        rules = [self._rule_of(e) for e in self.endpoints]
        if rules != self.rules:
            self.rules[:] = rules
            self.rule = self.rules[0]
            self.routes.rules_changed()

    # --- a new configuration (SIGHUP) ---

    def add_key(self, name: str, secret: bytes, limit: int, now: float) -> None:
        self.keyring[name] = KeySet(secret)
        self.key_limit[name] = limit
        self.strangers_budget[name] = Admission(self, now, float(limit + 64), 16, None)
        self._limits()

    def remove_key(self, name: str, now: float) -> None:
        """Its tunnels go: those with a client are told so (an ANNOUNCE saying GONE); the spares'
        keepalives go unanswered from now on (no key here verifies them)."""
        for t in [t for t in self.tunnels.values() if t.session.keyname == name]:
            self._remove(t, f"key {name} is no longer configured", gone=True)
        for sid in [sid for sid, s in self.sessions.items() if s.keyname == name]:
            del self.sessions[sid]
        del self.keyring[name], self.key_limit[name], self.strangers_budget[name]
        self._limits()

    def set_key_limit(self, name: str, limit: int) -> None:
        self.key_limit[name] = limit
        self.strangers_budget[name].burst = float(limit + 64)  # as add_key makes it
        self._limits()

    def _limits(self) -> None:
        self.max_clients = sum(self.key_limit.values())
        self.max_tunnels = self.max_clients + 64 * len(self.key_limit)
        if hasattr(self, "proven_challenges"):  # (a reload: the budgets made by _tables follow)
            self.proven_challenges.burst = float(self.max_tunnels)

    def add_service(self, svc: Service, endpoints: list[Endpoint], now: float) -> list[int]:
        """A service more, on these new endpoints (the I/O layer opened their sockets, in order)."""
        self.services[svc.name] = svc
        vias = [self.add_endpoint(e, now) for e in endpoints]
        self._update_rules()
        return vias

    def remove_service(self, name: str, now: float) -> list[int]:
        """The service stops: its clients' tunnels close (the inside is told at once by an ANNOUNCE
        saying GONE; should it be lost, the tunnel's next keepalive is refused), its held clients
        are dropped. Its endpoints, whose sockets the I/O layer closes: returned."""
        for t in [t for t in self.all_clients() if t.service == name]:
            self._remove(t, f"service {name} is no longer served", gone=True)
        gone = []
        for via, e in enumerate(self.endpoints):
            if e.service == name:
                gone.append(via)
                self.endpoints[via] = Endpoint(None, 0, e.tunnels)
                a = self.admissions[via]
                if a is not None:
                    for p in list(a.pending.values()):
                        a.unhold(p)
                self.admissions[via] = None
        del self.services[name]
        self._update_rules()
        return [via for via in gone if not self.endpoints[via].tunnels]

    def update_service(self, svc: Service) -> None:
        """New limits (or WireGuard keys) for a service; its clients keep their tunnels."""
        old = self.services[svc.name]
        if svc.wireguard is not None and old.wireguard is not None and svc.wireguard.keys == old.wireguard.keys:
            svc = Service(svc.name, svc.key, svc.max_clients, svc.max_per_source, old.wireguard)
        self.services[svc.name] = svc
        for a in self.admissions:
            if a is not None and a.core.service.name == svc.name:
                a.core.service = svc
                a.configure(svc.max_per_source or default_per_source(svc.max_clients), svc.wireguard)
        self._update_rules()

    # --- datagrams in ---

    def receive(self, data: bytes, addr: tuple, now: float, via: int = 0) -> None:
        """A datagram from addr on endpoint `via` that the loop did not forward itself."""
        kind = self.rules[via].kind(data)
        if kind is Kind.CONTROL:
            if not self.legacy:
                self._control(data, addr, now)
                return
            nonce = proto.legacy_verify(self.keys.current, data)
            if nonce is not None:
                self._legacy_keepalive(nonce, addr, now)
                return
        f = self.routes.gets[via](addr)
        if f is not None:
            self._send_on(f, data)
            if kind is Kind.HANDSHAKE:  # WireGuard hook: a handshake going back to a client names its session
                t = self.by_addr.get(addr)
                gate = self.gate(t)
                if gate is not None:
                    gate.observe_down(data, t.tid)
        elif self.endpoints[via].tunnels and addr in self.by_addr:
            self.stats["drop_unbound_tunnel"] += 1
        elif self.admissions[via] is not None:
            self.admissions[via].new_client(data, addr, now)
        else:
            self.stats["drop_no_service"] += 1

    def all_clients(self):
        """Every BOUND tunnel, by its client, on every endpoint."""
        for clients in self.clients_at:
            yield from clients.values()

    def gate(self, t: Tunnel | None) -> Gate | None:
        """The WireGuard gate of t's client's service (None: not WireGuard mode, or no client)."""
        return None if t is None or not t.service else self.services[t.service].wireguard

    def has_output(self) -> bool:
        return bool(self.out)

    def take(self) -> list[Datagram]:
        """What to send, handed over (and forgotten here)."""
        out, self.out = self.out, []
        return out

    def reload_keys(self, secret: bytes, now: float, key: str | None = None) -> None:
        """A key file again (SIGHUP): the current key first; the key it replaces is still accepted
        for keys.GRACE s, so that the inside agent can be reloaded later (either end first): its
        tunnels, spares too, go on meanwhile and are asked to move to the current key."""
        name = key or next(iter(self.keyring))
        keys = self.keyring[name]
        before = list(keys.accepted)
        kept = keys.reload(secret, now)
        self.log.info("SIGHUP: key file read again" + (f" ({name})" if len(self.keyring) > 1 else "")
                      + (f"; the old key is accepted for {GRACE:g} s more" if kept else ""))
        self._renumber_keys(name, before)

    def _renumber_keys(self, name: str, before: list[bytes]) -> None:
        """Key `name` accepts other keys than `before` now: its tunnels name the key their last
        keepalive was made with by its new index (0, the current key, when it is no longer accepted)."""
        accepted = self.keyring[name].accepted
        for t in self.tunnels.values():
            if t.session.keyname == name:
                old = before[t.key]
                t.key = accepted.index(old) if old in accepted else 0

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

    def ready_spare(self, now: float, key: str | None = None) -> Tunnel | None:
        """The spare (of `key`'s tunnels) with the freshest keepalive, unless even that one
        missed its last keepalive (its NAT mapping may be gone) or idles on purpose (a probe)."""
        for tid in reversed(self.spares):
            t = self.spares[tid]
            if key is not None and t.session.keyname != key:
                continue
            if now - t.last_ka > 1.2 * t.interval + 1.0:
                return None  # the rest are older still
            if t.probe:
                continue
            if now < t.ready_at:
                for a in self.admissions:
                    if a is not None:
                        a.wake(t.ready_at)
                continue
            return t
        return None

    def room(self, service: Service) -> int:
        """How many more clients the service can take: within its limit, its key's and the agent's."""
        return max(0, min(service.max_clients - self.bound[service.name],
                          self.key_limit[service.key] - self.bound["key:" + service.key],
                          self.max_clients - sum(map(len, self.clients_at))))

    def forward(self, addr: tuple, data: bytes, via: int = 0) -> None:
        """A datagram of bound client `addr` (on endpoint via) that the loop did not forward
        (held, or its first)."""
        self._send_on(self.routes.gets[via](addr), data)

    def _send_on(self, f: Flow, data: bytes) -> None:
        """Send data where flow f goes, counted into its meter as the loop counts what it forwards."""
        self.out.append(Datagram(data, f.dst, f.via))
        f.pkts += 1
        f.bytes += len(data)

    # --- table changes: every one goes through these ---

    def bind(self, t: Tunnel, client: tuple, src: Source, now: float, via: int = 0) -> None:
        if t.state is State.SPARE:
            del self.spares[t.tid]
            t.session.active += 1
        t.state = State.BOUND
        t.client, t.src, t.via = client, src, via
        self.clients_at[via][client] = t
        t.up, t.down = self.routes.bind(client, t.addr, via, 0)
        t.up_act, t.down_act = Activity(now), Activity()
        src.take(t)
        e = self.endpoints[via]
        t.service, t.offset = e.service, e.offset
        self.bound[t.service] += 1
        self.bound["key:" + t.session.keyname] += 1
        t.confirmed, t.announce_tries = False, 0
        if not self.legacy:
            self._announce(t, now)  # before its first datagram
        gate = self.gate(t)
        if gate is not None:
            gate.admitted(t.tid)
        self.log.info(f"client {show(client)} of {t.service} takes tunnel {t.tid:016x} at {show(t.addr)}"
                      + (" (WireGuard handshake)" if gate is not None else ""))

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
        self.key_tunnels[session.keyname] += 1
        self.stats["registrations"] += 1
        return t

    def _remove(self, t: Tunnel, why: str, gone: bool = False) -> None:
        """`gone`: the inside still has the tunnel and is told at once (an ANNOUNCE saying GONE)."""
        if self.tunnels.get(t.tid) is not t:
            return
        if gone and not self.legacy and t.state is State.BOUND:
            self._announce(t, 0.0, proto.F_GONE)
        gate = self.gate(t)
        if gate is not None:  # WireGuard hook: its sessions go with it
            gate.forget(t.tid)
        del self.tunnels[t.tid]
        self.key_tunnels[t.session.keyname] -= 1
        del self.by_addr[t.addr]
        if t.state is State.SPARE:
            del self.spares[t.tid]
        else:
            t.session.active -= 1
        if t.state is State.BOUND:
            self._unroute(t)
        self.log.info(f"tunnel {t.tid:016x} at {show(t.addr)} removed: {why}")

    def _unroute(self, t: Tunnel) -> None:
        del self.clients_at[t.via][t.client]
        self.routes.unbind(t.client, t.addr, t.via, 0)
        self.bound[t.service] -= 1
        self.bound["key:" + t.session.keyname] -= 1
        t.src.leave(t)
        for c in (self.retired, self.retired_by.setdefault(t.service, Counter())):
            c.update(traffic(t.up, t.down))

    def move_client(self, t: Tunnel, addr: tuple, src: Source, now: float) -> None:
        """BOUND t's client now sends from `addr` (a WireGuard client roaming), of source `src`;
        the inside is told (its service may see the client's address)."""
        old = t.client
        clients = self.clients_at[t.via]
        del clients[old]
        t.client = addr
        clients[addr] = t
        self.routes.move_client(t.addr, old, addr, t.via, 0)
        t.src.leave(t)
        t.src = src
        src.join()
        t.confirmed, t.announce_tries = False, 0
        self._announce(t, now, proto.F_MOVED)

    def _claim(self, addr: tuple, t: Tunnel | None) -> None:
        """`t` (or a new tunnel) has proved it receives at `addr`: whatever else sat there goes."""
        other = self.by_addr.get(addr)
        if other is not None and other is not t:
            self._remove(other, "its address was taken over by another tunnel")
        c = self.clients_at[0].get(addr)  # (tunnels register on endpoint 0)
        if c is not None:
            self._remove(c, "its client address is now a tunnel's")
        if self.admissions[0] is not None:
            self.admissions[0].release(addr)

    def _move(self, t: Tunnel, addr: tuple, now: float) -> None:
        self._claim(addr, t)
        if self.tunnels.get(t.tid) is not t:  # t's own client sat at addr: t went with it
            return
        old = t.addr
        del self.by_addr[old]
        self.by_addr[addr] = t
        t.addr = addr
        if t.state is State.BOUND:
            self.routes.move_tunnel(t.client, old, addr, t.via, 0)
        t.rebinds += 1
        t.registered_at = now
        self.stats["rebinds"] += 1
        self.log.info(f"tunnel {t.tid:016x} moved from {show(old)} to {show(addr)} (NAT rebinding)")

    # --- control messages ---

    def _cookie(self, slot: int, m: Control, addr: tuple) -> bytes:
        return proto.cookie(self.cookie_secret, slot, m.session, m.tunnel, addr)

    def _control(self, data: bytes, addr: tuple, now: float) -> None:
        keyname, m = self._authentic(data, addr)
        if m is None:
            return
        session = self.sessions.get(m.session)
        t = self.tunnels.get(m.tunnel)
        if session is not None and session.keyname != keyname:
            self.stats["drop_session"] += 1  # a session is one inside agent's, under its key
            return
        if not self._fresh(m, session, t):
            return
        slot = int(now // self.cookie_slot)
        cur = self._cookie(slot, m, addr)
        if m.cookie != cur and m.cookie != self._cookie(slot - 1, m, addr):
            self._challenge(m, addr, cur, now, session, keyname)
            return
        if session is None:
            session = self._new_session(m, addr, now, keyname)
            if session is None:
                self._reply(addr, m, proto.F_REFUSED, cur, keyname=keyname)
                return
        session.last = now
        if self.recovering:
            session.announced = m.active
        self._keepalive(m, session, t, addr, cur, now)

    def _keepalive(self, m: Control, session: Session, t: Tunnel | None, addr: tuple, cur: bytes,
                   now: float) -> None:
        """An authentic, fresh keepalive from an address that proved itself (its cookie)."""
        if m.flags & proto.F_CLOSING:
            session.closed[m.tunnel] = None
            if len(session.closed) > CLOSED:
                del session.closed[next(iter(session.closed))]
            for a in self.admissions:  # an evicted one: the inside knows it is gone now
                if a is not None:
                    a.evicted(m.tunnel, now)
            if t is not None:
                self._remove(t, "closed by the inside agent")
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
            self._reply(addr, m, proto.F_REFUSED, cur, keyname=session.keyname)
            return
        self._refresh(t, m, now)
        flags = proto.F_REGISTERED | (proto.F_REKEY if m.key else 0)
        if t.state is State.BOUND:
            if m.flags & proto.F_ACTIVE and m.peer == proto.pack_peer(t.client):
                t.confirmed, t.announce_at = True, INF  # the inside has its client
            self._reply(addr, m, flags | proto.F_BOUND, cur, t)
        else:
            self._reply(addr, m, flags, cur, keyname=session.keyname)
        self._serve(now)

    def _serve(self, now: float) -> None:
        """A spare may have come up: the held clients of every port."""
        for a in self.admissions:
            if a is not None and a.pending:
                a.serve(now)

    def _refresh(self, t: Tunnel, m: Control, now: float) -> None:
        """What tunnel t's keepalive m says: when it sends the next, whether it idles on purpose."""
        t.counter = m.counter
        t.last_ka = now
        t.key = m.key
        t.probe = bool(m.flags & proto.F_PROBE)
        t.interval = min(max(float(m.interval), 1.0), 1.5 * self.keepalive) if m.interval else self.keepalive
        if t.state is State.SPARE:  # freshest keepalive last: the next client takes it
            self.spares[t.tid] = self.spares.pop(t.tid)

    def _authentic(self, data: bytes, addr: tuple) -> tuple[str, Control | None]:
        """(the name of the key that made it, the keepalive) or ("", None). Only keys whose id the
        message names are tried: one MAC per key a message can claim."""
        why = "auth"
        for name, keys in self.keyring.items():
            if not keys.codec.knows(data):
                continue
            try:
                m = keys.codec.decode(data)
            except ControlError as e:
                why = e.args[0]
                if why == "malformed":
                    break
                continue
            if m.type != proto.KEEPALIVE:
                self.stats["drop_malformed"] += 1
                return "", None
            return name, m
        self.stats[f"drop_{why}"] += 1
        self.log.limited(f"bad-{why}", f"dropped control datagram from {show(addr)}: "
                         f"{'authentication failed (wrong key?)' if why == 'auth' else 'malformed'}")
        return "", None

    def _fresh(self, m: Control, session: Session | None, t: Tunnel | None) -> bool:
        """Each keepalive counts once, also after its tunnel is gone; checked before any
        answer, so replays of captured keepalives cost one MAC and get nothing back. A new
        tunnel's first keepalive is among its session's newest, and a tunnel the inside
        closed stays closed."""
        if t is not None and t.session.sid != m.session:
            self.stats["drop_session"] += 1
            return False
        if t is None and session is not None and m.tunnel in session.closed:
            self.stats["drop_closed_tunnel"] += 1
            return False
        if session is not None:
            stale = t is None and m.counter + NEAR < session.window.top
            if stale or not session.window.fresh(m.counter):
                self.stats["drop_replay"] += 1
                return False
        if t is not None and m.counter <= t.counter:
            self.stats["drop_replay"] += 1
            return False
        return True

    def _challenge(self, m: Control, addr: tuple, cookie: bytes, now: float, session: Session | None,
                   keyname: str) -> None:
        """Prove you receive at `addr`: the cookie goes there, no state is kept. Within budgets:
        a known session's fresh counter (its new tunnel, or a tunnel's new NAT mapping) has its
        own; an address where a tunnel registered before has its own; strangers share the rest,
        and each counter of a session not known here is challenged once."""
        if m.flags & proto.F_CLOSING:
            return
        if session is None and not self.strangers.first(m.session, m.counter):
            self.stats["drop_replay"] += 1
            return
        if session is not None:
            ok = session.challenges.take(now)
        elif addr in self.by_addr or addr in self.proven:  # a tunnel's (new cookie), or one before a restart
            ok = self.proven_challenges.take(now)
        else:
            ok = self.strangers_budget[keyname].may_challenge(addr, now)
        if not ok:
            self.stats["drop_rate"] += 1
            return
        self.stats["challenges"] += 1
        self._reply(addr, m, 0, cookie, keyname=keyname)

    def _new_session(self, m: Control, addr: tuple, now: float, keyname: str) -> Session | None:
        sid = m.session
        if sum(s.keyname == keyname for s in self.sessions.values()) >= SESSIONS:
            # forget one of this key's with no tunnel left whose cookies have died; never one
            # that could still replay (its window would be lost)
            dead = next((s for s in self.sessions.values() if s.keyname == keyname and s.active == 0
                         and not self._has_tunnels(s) and now - s.last > 2 * self.cookie_slot), None)
            if dead is None:
                self.stats["drop_sessions"] += 1
                self.log.limited("sessions", f"{SESSIONS} inside agent sessions known: refusing another")
                return None
            del self.sessions[dead.sid]
        s = self.sessions[sid] = Session(sid, now, source_key(addr), self.strangers.known(sid),
                                         float(self.max_tunnels), keyname)
        s.window.fresh(m.counter)  # the keepalive that made it counts once too
        if self.recovering:  # an inside agent restarted here: don't wait for its old session
            for old in self.sessions.values():
                if old.src == s.src and old is not s:
                    old.announced = None
        return s

    def _has_tunnels(self, s: Session) -> bool:
        return any(t.session is s for t in self.tunnels.values())

    def _register(self, m: Control, session: Session, addr: tuple, now: float, cookie: bytes) -> Tunnel | None:
        """A tunnel this agent does not know proved its address: register it, or refuse."""
        key = session.keyname
        if self.key_tunnels[key] >= self.key_limit[key] + 64 or len(self.tunnels) >= self.max_tunnels:
            self.stats["drop_limit"] += 1
            whose = f" for key {key}" if len(self.keyring) > 1 else ""
            self.log.limited("tlimit", f"tunnel limit ({self.key_limit[key] + 64}{whose}) reached: "
                             "refusing a new tunnel")
            self._reply(addr, m, proto.F_REFUSED, cookie, keyname=key)
            return None
        if not m.flags & proto.F_ACTIVE:
            t = self._add(m.tunnel, session, addr, now)
            self.log.debug(f"spare tunnel {t.tid:016x} registered at {show(addr)}")
            return t
        # an active tunnel this agent does not know: it comes back after this agent's
        # restart (then, and only then, with its client), or it was forgotten (refused:
        # the inside closes it, its client gets a fresh tunnel)
        client = proto.unpack_peer(m.peer, self.family)
        via = self.endpoint_of(m.service, int.from_bytes(m.seen[16:18], "big"))
        evicted = any(a.evicted(m.tunnel, now) for a in self.admissions if a is not None)
        if evicted or now >= self.recover_until or self.legacy:
            self.stats["drop_stale_tunnel"] += 1
            self._reply(addr, m, proto.F_REFUSED, cookie, keyname=key)
            return None
        if client is not None and via == 0 and (client == addr or client in self.by_addr):
            # its "client" is a tunnel's address (after a NAT rebinding the service's answer
            # can come before the keepalive and look like a new client): refused
            self.stats["drop_stale_client"] += 1
            self._reply(addr, m, proto.F_REFUSED, cookie, keyname=key)
            return None
        t = self._add(m.tunnel, session, addr, now)
        door = self.admissions[via] if via is not None else None
        if client is not None and door is not None and client not in self.clients_at[via]:
            self.bind(t, client, door.source(client, now), now, via)
            gate = self.gate(t)
            if gate is not None:  # WireGuard hook: bound again without a handshake seen here
                gate.admitted(t.tid, "restored")
            self.log.info(f"active tunnel {t.tid:016x} at {show(addr)} registered again, "
                          f"serving client {show(client)} again")
            p = door.release(client)
            if p is not None:  # it spoke before its tunnel was back: what it said goes on now
                for d in p.datagrams:
                    self.forward(client, d, via)
        else:
            self._orphan(t)
            self.log.info(f"active tunnel {t.tid:016x} at {show(addr)} registered without its client")
        return t

    def endpoint_of(self, sid: bytes, offset: int) -> int | None:
        """The endpoint of the service `sid` names, at `offset` in its range (None: none here)."""
        for via, e in enumerate(self.endpoints):
            if e.service is not None and e.offset == offset and proto.service_id(e.service) == sid:
                return via
        return None

    def waiting(self, key: str) -> int:
        """Clients held for want of a spare of `key`."""
        return sum(len(a.pending) for a in self.admissions if a is not None and a.core.service.key == key)

    def _reply(self, addr: tuple, m: Control, flags: int, cookie: bytes, t: Tunnel | None = None,
               keyname: str = "") -> None:
        """Answer keepalive m at addr; BOUND: with its client (t's), which it announces too."""
        key = t.session.keyname if t is not None else keyname
        waiting = min(self.waiting(key), 0xFFFF) if flags & proto.F_REGISTERED else 0
        r = Control(proto.REPLY, flags, self.session, m.tunnel, m.counter, cookie, proto.NO_PEER, waiting, m.key,
                    proto.pack_peer(addr))
        if t is not None:
            r.peer, r.service, r.interval = proto.pack_peer(t.client), proto.service_id(t.service), t.offset
        self.out.append(Datagram(self._encode(r, key), addr))

    def _encode(self, m: Control, key: str) -> bytes:
        """Every message this agent sends has a number of its own (its keystream's nonce)."""
        self.sent += 1
        m.nonce = self.sent
        return self.keyring[key].codec.encode(m)

    def _announce(self, t: Tunnel, now: float, flags: int = 0) -> None:
        """Tell the inside, down tunnel t, which client it now carries (before its first datagram),
        until the inside says ACTIVE for it; or, with F_GONE, once, that t no longer carries one."""
        reached = self.reached[t.via]
        # active: how many of the client's datagrams went down the tunnel before this ANNOUNCE (0 the
        # first time): the inside lets only that many of what it held before it reach the service
        m = Control(proto.ANNOUNCE, flags, self.session, t.tid, self.sent + 1, peer=proto.pack_peer(t.client),
                    active=t.up.pkts, key=t.key, seen=proto.pack_peer(reached) if reached else proto.NO_PEER,
                    interval=t.offset, service=proto.service_id(t.service))
        self.out.append(Datagram(self._encode(m, t.session.keyname), t.addr))
        self.stats["announces"] += 1
        if flags & proto.F_GONE:  # once: t is gone here (lost, its next keepalive is refused)
            return
        t.announce_tries += 1
        t.announce_at = now + ANNOUNCE_AGAIN * 2 ** (t.announce_tries - 1) \
            if t.announce_tries < ANNOUNCE_TRIES else INF
        self.announce_due = min(self.announce_due, t.announce_at)

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
        self._serve(now)

    # --- across a restart ---

    def saved_tunnels(self) -> list[tuple[int, tuple]]:
        """What to remember across a restart: where the tunnels are."""
        return [(t.tid, t.addr) for t in self.tunnels.values()] if not self.legacy else []

    def saved_initiations(self) -> dict[str, list[bytes]]:
        """WireGuard mode: the initiations admitted lately, per service (their copies stay refused
        across a restart)."""
        return {n: list(s.wireguard.seen_order) for n, s in self.services.items() if s.wireguard is not None}

    def remember_initiations(self, seen: dict[str, list[bytes]]) -> None:
        for name, tags in seen.items():
            svc = self.services.get(name)
            if svc is not None and svc.wireguard is not None:
                svc.wireguard.remember(tags)

    def remembered(self, entries: list[tuple[int, tuple]], now: float) -> None:
        """Just started: tell the tunnels a previous run knew to register again now. A HELLO
        grants nothing; the inside answers it with keepalives that go through the usual
        challenge (and believes one HELLO per outside session). At most max_tunnels of them,
        HELLO_BURST every HELLO_PACE s: a tampered state file can't make this agent send a
        flood to anyone."""
        for tid, addr in entries[: self.max_tunnels]:
            if self.family == socket.AF_INET6 and ":" not in addr[0]:
                addr = ("::ffff:" + addr[0], addr[1], 0, 0)
            elif self.family == socket.AF_INET and ":" in addr[0]:
                continue
            if len(self.proven) < self.max_tunnels:
                self.proven.add(addr)
            self.hellos.append((tid, addr))
        self._send_hellos(now)

    def _send_hellos(self, now: float) -> None:
        for _ in range(min(HELLO_BURST, len(self.hellos))):
            tid, addr = self.hellos.popleft()
            for key in self.keyring:  # (the file does not say whose: a HELLO under each key)
                m = Control(proto.REPLY, proto.F_HELLO, self.session, tid, 0)
                self.out.append(Datagram(self._encode(m, key), addr))
                self.stats["hellos"] += 1
        self.hello_at = now + HELLO_PACE if self.hellos else INF

    # --- time ---

    def next_timer(self) -> float:
        return min(self.next_tick, self.announce_due, self.hello_at,
                   *(a.poll_at for a in self.admissions if a is not None),
                   *(k.forget_at for k in self.keyring.values()))

    def on_timer(self, now: float) -> None:
        for a in self.admissions:
            if a is not None:
                a.serve(now)
        if now >= self.announce_due:
            self._announce_again(now)
        if now >= self.hello_at:
            self._send_hellos(now)
        for name, keys in self.keyring.items():
            before = list(keys.accepted)
            if keys.expire(now):
                self._renumber_keys(name, before)
                self.log.info("the old key is no longer accepted" + (f" ({name})" if len(self.keyring) > 1 else ""))
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

    def _announce_again(self, now: float) -> None:
        """ANNOUNCEs the inside has not confirmed yet (lost, or their tunnel's NAT mapping moved)."""
        self.announce_due = INF
        for t in self.all_clients():
            if not t.confirmed and t.announce_at <= now:
                self._announce(t, now, proto.F_MOVED if t.announce_tries and t.up.pkts > 1 else 0)
            elif not t.confirmed:
                self.announce_due = min(self.announce_due, t.announce_at)

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
                need(self.clients_at[t.via].get(t.client) is t, f"tunnel {tid:x}: client not in clients")
                need(self.routes.gets[t.via](t.client) is t.up and t.up.dst == t.addr and t.up.via == 0,
                     f"tunnel {tid:x}: up route")
                need(self.routes.get(t.addr) is t.down and t.down.dst == t.client and t.down.via == t.via,
                     f"tunnel {tid:x}: down route")
                need(self.endpoints[t.via].service == t.service, f"tunnel {tid:x}: service")
        nclients = sum(map(len, self.clients_at))
        need(len(self.spares) == sum(t.state is State.SPARE for t in self.tunnels.values()), "stray spares")
        need(nclients == bound and len(self.routes) == 2 * bound, "clients/routes hold stray entries")
        need(not set(self.clients_at[0]) & set(self.by_addr), "an address is both a client's and a tunnel's")
        need(len(self.tunnels) <= self.max_tunnels and nclients <= self.max_clients, "limits")
        by_key = Counter(t.session.keyname for t in self.tunnels.values())
        need(all(self.key_tunnels[k] == by_key[k] for k in self.keyring), "tunnels per key")
        for name, svc in self.services.items():
            n = sum(t.service == name for t in self.all_clients())
            need(self.bound[name] == n <= svc.max_clients, f"clients of {name}")
        for s in self.sessions.values():
            need(s.active == active[s.sid], f"session {s.sid:x}: active count {s.active} != {active[s.sid]}")
        for a in self.admissions:
            for what in a.check() if a is not None else ():
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
            if t.service:
                tunnels[-1]["service"] = t.service
            gate = self.gate(t)
            if gate is not None:  # WireGuard hook: how its client was admitted, roams
                tunnels[-1]["wireguard"] = gate.describe(t.tid)
        totals = self.retired.copy()
        for t in self.all_clients():
            totals.update(traffic(t.up, t.down))
        gates = [s.wireguard for s in self.services.values() if s.wireguard is not None]
        return {"role": "outside", "protocol": "legacy" if self.legacy else f"v{proto.VERSION}",
                "uptime": now - self.started, "clients": sum(map(len, self.clients_at)),
                "spares": len(self.spares),
                "waiting": sum(len(a.pending) for a in self.admissions if a is not None),
                "services": self._service_totals(),
                "stats": dict(self.stats), "totals": dict(totals), "tunnels": tunnels,
                **({"wireguard": merge_summaries([g.summary() for g in gates])} if gates else {})}

    def _service_totals(self) -> dict:
        """Per service: its clients, its key, the traffic of its clients (gone ones too)."""
        out = {}
        for name, svc in self.services.items():
            tot = Counter(self.retired_by.get(name, Counter()))
            for t in self.all_clients():
                if t.service == name:
                    tot.update(traffic(t.up, t.down))
            out[name] = {"clients": self.bound[name], "key": svc.key, **{k: tot[k] for k in TRAFFIC}}
        return out


def merge_summaries(parts: list[dict]) -> dict:
    """The WireGuard gates of several services as one (status shows the mode once)."""
    if len(parts) == 1:
        return parts[0]
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            if isinstance(v, dict):
                out.setdefault(k, Counter()).update(v)
            elif isinstance(v, int):
                out[k] = out.get(k, 0) + v
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in out.items()}
