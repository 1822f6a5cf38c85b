"""The inside agent's state machine, without any I/O.

The I/O loop owns the sockets: per tunnel one socket connected to the
outside agent and, once a client uses the tunnel, one connected to the
service. It forwards data of active tunnels itself, counting datagrams in the
tunnel's `rx`/`tx` fields, and hands over control datagrams
(`on_control`), the first data on a spare (`on_spare_data`) and the time
(`on_timer`, due at `next_timer()`). The core answers with `actions`:

    ("open", tid)            open a tunnel socket towards the outside agent
    ("service", tid)         open the service socket of tunnel tid
    ("send", tid, data)      send data out of tunnel tid's socket
    ("to_service", tid, data)
    ("close", tid)           close both sockets of tunnel tid
    ("resolve",)             look the outside host name up again
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter

from udp_tunnel import proto
from udp_tunnel.addr import show
from udp_tunnel.log import Log
from udp_tunnel.proto import Control, ControlError
from udp_tunnel.status import leg

SPARE, ACTIVE = "spare", "active"
TICK = 1.0
STALL = 2.0  # an active tunnel sending without hearing anything back for this long: keepalive now
LEGACY_RESOLVE = 300.0  # legacy mode has no replies: look the name up again this often


class Tunnel:
    __slots__ = ("tid", "state", "created", "activated", "registered", "last_reply",
                 "cookie", "peer", "sent", "sent_at", "acked", "rtt", "registrations",
                 "registered_at", "next_ka", "retry", "answers",
                 "rx", "rx_bytes", "tx", "tx_bytes", "seen_rx", "seen_tx", "last_rx", "last_tx")

    def __init__(self, tid: int, now: float) -> None:
        self.tid = tid
        self.state = SPARE
        self.created = now
        self.activated: float | None = None
        self.registered = False
        self.last_reply: float | None = None
        self.registered_at: float | None = None
        self.cookie = bytes(proto.COOKIE_LEN)
        self.peer = proto.NO_PEER
        self.sent = self.acked = 0  # counters of the last keepalive sent / answered
        self.sent_at = now
        self.rtt: float | None = None
        self.registrations = 0
        self.next_ka = now
        self.retry = 1.0
        self.answers = 0  # challenges answered at once since the last registration
        self.rx = self.rx_bytes = self.tx = self.tx_bytes = 0  # from / to the outside
        self.seen_rx = self.seen_tx = 0
        self.last_rx: float | None = None
        self.last_tx: float | None = None


class InsideCore:
    def __init__(self, *, secret: bytes, keepalive: float, timeout: float, spares: int,
                 max_clients: int, now: float, log: Log, legacy: bool = False,
                 random_bytes=os.urandom, wall=time.time) -> None:
        self.legacy = legacy
        self.password = secret
        self.codec = proto.Codec(secret)
        self.random_bytes = random_bytes
        self.wall = wall
        self.session = int.from_bytes(random_bytes(8), "big")
        self.keepalive = keepalive
        self.dead_after = 2 * keepalive + 1  # no reply for this long: the outside is gone
        self.timeout = timeout
        self.spares = spares
        self.max_clients = max_clients
        self.log = log
        self.started = now
        self.counter = 0
        self.legacy_nonce = 0
        self.tunnels: dict[int, Tunnel] = {}
        self.actions: list[tuple] = []
        self.stats: Counter[str] = Counter()
        self.retired: Counter[str] = Counter()  # traffic of closed tunnels, for totals that never drop
        self.outside_session: int | None = None
        self.last_reply: float | None = None
        self.last_resolve = now
        self.next_tick = now
        self.wake = now  # no timer is due before this
        self.active = 0  # tunnels in state ACTIVE

    # --- tunnels ---

    def start(self, now: float) -> None:
        self._replenish(now)

    def counts(self) -> tuple[int, int]:
        return self.active, len(self.tunnels) - self.active

    def _replenish(self, now: float) -> None:
        active, spare = self.counts()
        while spare < self.spares:
            if active >= self.max_clients:  # the outside counts the datagrams it then drops
                self.log.limited("limit", f"client limit ({self.max_clients}) reached: no new spare tunnel")
                return
            tid = 0
            while tid == 0 or tid in self.tunnels:
                tid = int.from_bytes(self.random_bytes(8), "big")
            self.tunnels[tid] = t = Tunnel(tid, now)
            self.actions.append(("open", tid))
            self._send_keepalive(t, now)  # a new spare announces itself at once
            spare += 1

    def _activate(self, t: Tunnel, now: float) -> None:
        t.state = ACTIVE
        self.active += 1
        t.activated = t.last_rx = now
        self.actions.append(("service", t.tid))
        self.log.info(f"tunnel {t.tid:016x} now carries a client")
        if not self.legacy:
            self._send_keepalive(t, now)  # says "active" at once and learns the client address
        self._replenish(now)

    def _drop(self, tid: int) -> Tunnel:
        """Remove tunnel tid from the table, keeping the count of active tunnels right."""
        t = self.tunnels.pop(tid)
        self.active -= t.state == ACTIVE
        return t

    def close(self, tid: int, now: float, why: str) -> None:
        t = self._drop(tid)
        self.retired.update(datagrams_in=t.rx, bytes_in=t.rx_bytes, datagrams_out=t.tx, bytes_out=t.tx_bytes)
        if not self.legacy and t.registered:
            self.counter += 1
            self.actions.append(("send", tid, self._keepalive(t, self.counter, proto.F_CLOSING)))
        self.actions.append(("close", tid))
        self.log.info(f"tunnel {tid:016x} closed: {why}")
        self._replenish(now)

    def forget(self, tid: int) -> None:
        """The loop could not open a socket for tunnel tid: drop it without a word to the outside."""
        self._drop(tid)
        self.stats["socket_errors"] += 1

    # --- keepalives ---

    def _keepalive(self, t: Tunnel, counter: int, flags: int = 0) -> bytes:
        if self.legacy:
            self.legacy_nonce = max(self.legacy_nonce + 1, int(self.wall() * 1000))
            return proto.legacy_keepalive(self.password, self.legacy_nonce)
        if t.state == ACTIVE:
            flags |= proto.F_ACTIVE
        return self.codec.encode(Control(proto.KEEPALIVE, flags, self.session, t.tid,
                                         counter, t.cookie, t.peer, self.active))

    def _send_keepalive(self, t: Tunnel, now: float) -> None:
        self.counter += 1
        t.sent, t.sent_at = self.counter, now
        self.actions.append(("send", t.tid, self._keepalive(t, self.counter)))
        if t.registered or self.legacy:
            t.next_ka = now + self.keepalive
        else:  # not registered yet: try again soon, backing off up to the keepalive interval
            t.next_ka = now + min(self.keepalive, t.retry)
            t.retry = min(2 * t.retry, self.keepalive)
        self.wake = min(self.wake, t.next_ka)

    def on_control(self, tid: int, data: bytes, now: float) -> None:
        t = self.tunnels.get(tid)
        if t is None:
            return
        try:
            m = self.codec.decode(data)
        except ControlError as e:
            self.stats[f"drop_{e.args[0]}"] += 1
            self.log.limited(f"bad-{e.args[0]}", "dropped a control datagram from the outside agent: "
                             + ("authentication failed (is the key the same on both ends?)"
                                if e.args[0] == "auth" else "malformed"))
            return
        if m.type != proto.REPLY or m.tunnel != tid:
            self.stats["drop_malformed"] += 1
            return
        if not t.acked < m.counter <= t.sent:
            self.stats["drop_replay"] += 1
            return
        t.acked = m.counter
        if m.session != self.outside_session:
            restarted = self.outside_session is not None
            self.outside_session = m.session
            if restarted:
                self.stats["outside_restarts"] += 1
                self.log.warning("the outside agent restarted (new session): registering tunnels again")
                for other in sorted(self.tunnels.values(), key=lambda o: o.state != ACTIVE):
                    if other is not t:  # every tunnel at once, active ones first
                        other.registered = False
                        other.answers = 0
                        self._send_keepalive(other, now)
        self.last_reply = now
        t.cookie = m.cookie
        if m.flags & proto.F_REGISTERED:
            if m.counter == t.sent:
                t.rtt = now - t.sent_at
            t.last_reply = now
            if not t.registered:
                t.registered = True
                t.registrations += 1
                t.registered_at = now
                t.retry = 1.0
                t.answers = 0
                t.next_ka = min(t.next_ka, now + self.keepalive)
                self.stats["registrations"] += 1
                self.log.debug(f"tunnel {tid:016x} registered")
            if m.flags & proto.F_BOUND:
                t.peer = m.peer
                if t.state == SPARE:  # the outside gave it to a client whose datagram got lost
                    self._activate(t, now)
        elif m.flags & proto.F_REFUSED:
            t.registered = False
            if t.state == ACTIVE:  # its client is gone at the outside (now a tunnel's address)
                self.close(tid, now, "the outside agent no longer knows its client")
            else:
                self.log.limited("refused", "the outside agent refused a tunnel: it is at its tunnel limit")
        else:  # a challenge: prove we receive at our address
            if t.registered:
                self.log.info(f"tunnel {tid:016x} must register again (outside restart or new NAT mapping)")
            t.registered = False
            if t.answers < 3:
                t.answers += 1
                self._send_keepalive(t, now)

    def on_spare_data(self, tid: int, data: bytes, now: float) -> None:
        t = self.tunnels.get(tid)
        if t is None:
            return
        if t.state == SPARE:
            self._activate(t, now)
        self.actions.append(("to_service", tid, data))
        t.rx += 1
        t.rx_bytes += len(data)

    def on_resolved(self, changed: bool, now: float) -> None:
        """The loop looked the outside name up again (and reconnected if `changed`)."""
        if changed:
            for t in self.tunnels.values():
                t.registered = False
                t.answers = 0
                self._send_keepalive(t, now)

    # --- time ---

    def next_timer(self) -> float:
        return self.wake

    def on_timer(self, now: float) -> None:
        self.wake = self.next_tick
        for t in list(self.tunnels.values()):
            if t.next_ka <= now:
                self._send_keepalive(t, now)
            else:
                self.wake = min(self.wake, t.next_ka)
        # keepalives due within 50 ms go out together with the next batch
        self.wake = max(self.wake, now + 0.05)
        if now < self.next_tick:
            return
        self.next_tick = now + TICK
        for t in list(self.tunnels.values()):
            if t.rx != t.seen_rx:
                t.seen_rx, t.last_rx = t.rx, now
            if t.tx != t.seen_tx:
                t.seen_tx, t.last_tx = t.tx, now
            if t.state == ACTIVE and now - t.last_rx > self.timeout:
                self.close(t.tid, now, f"no datagram from the client for {now - t.last_rx:.0f} s")
                continue
            if (t.state == ACTIVE and not self.legacy and t.last_tx == now and now - t.last_rx > STALL
                    and now - t.sent_at > STALL):
                # the service talks, the client seems not to: maybe the NAT mapping changed
                # (rebinding); a keepalive re-registers the tunnel from its new address now
                self.stats["stall_keepalives"] += 1
                self._send_keepalive(t, now)
            if t.registered and now - t.last_reply > self.dead_after:
                t.registered = False
                t.answers = 0
                self.log.limited("noreply", f"the outside agent has not answered for "
                                 f"{now - t.last_reply:.0f} s")
        self._replenish(now)
        self._check_resolve(now)
        self.wake = min(self.wake, self.next_tick)

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
            due = (now - heard > self.dead_after and now - self.last_resolve > self.dead_after
                   and not any(t.registered for t in self.tunnels.values()))
        if due:
            self.last_resolve = now
            self.actions.append(("resolve",))

    # --- what the operator sees ---

    def snapshot(self, now: float) -> dict:
        tunnels = []
        for t in self.tunnels.values():
            tunnels.append({
                "id": f"{t.tid:016x}", "state": t.state,
                "registered": t.registered or self.legacy,
                "client": show(proto.unpack_peer(t.peer, socket.AF_INET6)) if t.peer != proto.NO_PEER else None,
                "age": now - t.created, "rtt": t.rtt,
                "registered_ago": None if t.registered_at is None else now - t.registered_at,
                "registrations": t.registrations,
                "from_outside": leg(t.rx, t.rx_bytes, t.last_rx, now),
                "to_outside": leg(t.tx, t.tx_bytes, t.last_tx, now),
            })
        totals = self.retired.copy()
        for t in self.tunnels.values():
            totals.update(datagrams_in=t.rx, bytes_in=t.rx_bytes, datagrams_out=t.tx, bytes_out=t.tx_bytes)
        active, spare = self.counts()
        return {"role": "inside", "protocol": "legacy" if self.legacy else "v1",
                "uptime": now - self.started, "clients": active, "spares": spare,
                "outside_answering": self.legacy or (self.last_reply is not None
                                                     and now - self.last_reply <= self.dead_after),
                "stats": dict(self.stats), "totals": dict(totals), "tunnels": tunnels}

