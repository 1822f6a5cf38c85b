"""Which data path an agent runs (`--datapath auto|kernel|user`, `datapath = "..."` in a
file), and the kernel path's glue to the loops.

    dp = choose("auto", legacy=False, wireguard=False, max_flows=4096)   # DatapathError: one line
    dp.path, dp.why, dp.kp        # "kernel" or "user", why (one line), the KernelPath or None

- auto: the kernel path where it can be opened here, else user space (`why` says why not);
- kernel: the kernel path, or DatapathError (the agent does not start);
- user: user space, never the kernel.

The outside loop sets its core's `routes.listener` to an `OutsideKernel`: the route table
tells it of every change (core/routes.py), and it writes the map at that very point,
each direction with the rule (core/classify.py) of the endpoint its datagrams arrive on
and the endpoints' addresses: the up direction (client -> tunnel) leaves from the
tunnel port's address, the down direction from the client's endpoint's. The inside
loop asks an `InsideKernel` to pipe a tunnel once its service socket is open (only a
service with client_address "off": the other modes need the agent on every datagram),
and to unpipe it when the pipe closes or its tunnel socket changes. Both count the
kernel's traffic into the core's meters (`count`) before the core's timer and before a
status snapshot, and what a flow counted when it goes, into its meters at that point:
expiry, status and metrics see the same figures with either path.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Hashable

from udp_tunnel.addr import show
from udp_tunnel.core.classify import Classifier
from udp_tunnel.core.common import Flow, Meter
from udp_tunnel.io.kernel import NO_RULE, FlowTable, KernelPath, KernelUnavailable, rule_flags
from udp_tunnel.ops.log import Log

REFRESH = 60.0  # seconds between looks at new interfaces, routes and NAT rules
SHOWN = 20  # directions kept in user space listed in a snapshot (all are counted)


class DatapathError(Exception):
    """--datapath kernel, and the kernel path cannot run here: str() is the one line."""


class Datapath:
    """What runs and why: `path` ("kernel" or "user"), `why` (one line), `kp` (the KernelPath, or None);
    `services`: services kept in user space and why (inside); `describe`: a flow key, for people."""

    def __init__(self, mode: str, path: str, why: str, kp: FlowTable | None = None) -> None:
        self.mode, self.path, self.why, self.kp = mode, path, why, kp
        self.services: dict[str, str] = {}
        self.describe: Callable[[Hashable], str] = str
        self.next_refresh = 0.0
        self.notes_said = 0

    def line(self) -> str:
        """For the start line: which path, and why."""
        return f"datapath {self.path if self.path == 'kernel' else 'user space'} ({self.why})"

    def refresh(self, now: float, log: Log) -> None:
        """Now and then: new interfaces, routes, NAT rules (KernelPath.refresh); and what the kernel path
        changed or could not do since the last call, to the log."""
        if isinstance(self.kp, KernelPath) and now >= self.next_refresh:
            self.next_refresh = now + REFRESH
            self.kp.refresh()
        if self.kp is not None:
            for note in self.kp.notes[self.notes_said:]:
                log.info(f"kernel data path: {note}")
            self.notes_said = len(self.kp.notes)

    def snapshot(self) -> dict:
        out: dict = {"path": self.path, "mode": self.mode, "why": self.why}
        kp = self.kp
        if kp is None:
            return out
        kept = sorted((self.describe(k), why) for k, why in kp.kept.items())
        out.update(flows=len(kp.entries), kept_count=len(kept), kept=dict(kept[:SHOWN]), notes=list(kp.notes))
        if isinstance(kp, KernelPath):
            out["attached"] = sorted(kp.attached)
            try:
                out["program"] = kp.stats()
            except OSError as e:  # bpf(2) failed: the rest of the snapshot stands
                out["program_error"] = str(e)
        if self.services:
            out["services_kept"] = dict(self.services)
        return out

    def close(self) -> None:
        if isinstance(self.kp, KernelPath):
            self.kp.close()


def choose(mode: str, *, legacy: bool = False, wireguard: bool = False, max_flows: int = 8192,
           opener: Callable[..., KernelPath] = KernelPath.open) -> Datapath:
    """The data path for `mode` (one of config.DATAPATHS); DatapathError when mode is "kernel" and it can't run."""
    if mode == "user":
        return Datapath(mode, "user", "--datapath user")
    try:
        kp = opener(legacy=legacy, wireguard=wireguard, max_flows=max_flows)
    except (KernelUnavailable, OSError) as e:
        reason = e.reason if isinstance(e, KernelUnavailable) else str(e)
        if mode == "kernel":
            raise DatapathError(f"--datapath kernel: the kernel path cannot run here: {reason}") from None
        return Datapath(mode, "user", f"the kernel path cannot run here: {reason}")
    where = ", ".join(sorted(kp.attached))
    return Datapath(mode, "kernel", f"--datapath {mode}: eBPF at tc ingress of {where}", kp)


def flags_of(rule: Classifier) -> int:
    """A Classifier as the program's rule flags (NO_RULE when the program cannot apply it)."""
    flags = rule_flags(rule)
    return NO_RULE if flags is None else flags


def add(m: Meter, counted: tuple[int, int, float | None] | None) -> None:
    if counted is not None:
        m.pkts += counted[0]
        m.bytes += counted[1]


# --- the outside agent ---

class OutsideKernel:
    """The route table's listener (core/routes.py RouteListener): the map follows the table. Flow
    keys are the table's own, (endpoint, source address). `addr_of(via)`: the address of endpoint
    via's socket; `rule_of(via)`: the rule of what arrives there (the core's rules[via])."""

    def __init__(self, table: FlowTable, routes, addr_of: Callable[[int], tuple],
                 rule_of: Callable[[int], Classifier]) -> None:
        self.table, self.routes, self.addr_of, self.rule_of = table, routes, addr_of, rule_of

    def routed(self, client: tuple, tunnel: tuple, up: Flow, down: Flow) -> None:
        cvia, tvia = down.via, up.via  # where each end's datagrams arrive (and the other's leave)
        self.table.outside_bind(self.addr_of(tvia), client, tunnel, client_listen=self.addr_of(cvia),
                                keys=((cvia, client), (tvia, tunnel)), up_rule=flags_of(self.rule_of(cvia)),
                                down_rule=flags_of(self.rule_of(tvia)))

    def unrouted(self, client: tuple, tunnel: tuple, up: Flow, down: Flow) -> None:
        ku, kd = (down.via, client), (up.via, tunnel)
        final = self.table.outside_unbind(client, tunnel, keys=(ku, kd))
        add(up, final.get(ku))
        add(down, final.get(kd))

    def sync(self) -> None:
        """Install what the table holds already."""
        for pair in self.routes.pairs():
            self.routed(*pair)

    def rules_changed(self) -> None:
        """The core's rules changed (a reload): every flow again, with its endpoint's new rule."""
        self.sync()

    def count(self) -> None:
        """The kernel's traffic since the last call, into the flows' meters."""
        gets = self.routes.gets
        for (via, a), counted in self.table.deltas().items():
            f = gets[via](a) if via < len(gets) else None
            if f is not None:
                add(f, counted)


def outside_describe(key: Hashable) -> str:
    via, a = key
    return f"from {show(a)}" + (f" (endpoint {via})" if via else "")


# --- the inside agent ---

class InsideKernel:
    """Tunnel socket <-> service socket pairs in the map, by tunnel id: keys ("rx", tid) (outside ->
    service) and ("tx", tid). `rule`: the inside core's rule (what it must see of the outside's)."""

    def __init__(self, table: FlowTable, rule: Classifier) -> None:
        self.table = table
        self.rx_rule = flags_of(rule)
        self.piped: dict[int, tuple[Meter, Meter]] = {}  # tid -> its (rx, tx) meters

    def pipe(self, tid: int, tsock: socket.socket, ssock: socket.socket, rx: Meter, tx: Meter) -> tuple[bool, bool]:
        try:
            ends = tsock.getsockname(), tsock.getpeername(), ssock.getsockname(), ssock.getpeername()
        except OSError:
            return False, False
        self.piped[tid] = (rx, tx)
        return self.table.inside_pipe(*ends, keys=(("rx", tid), ("tx", tid)), rx_rule=self.rx_rule, tx_rule=0)

    def unpipe(self, tid: int) -> None:
        meters = self.piped.pop(tid, None)
        final = self.table.inside_unpipe((), (), keys=(("rx", tid), ("tx", tid)))
        if meters is not None:
            add(meters[0], final.get(("rx", tid)))
            add(meters[1], final.get(("tx", tid)))

    def count(self) -> None:
        for (way, tid), counted in self.table.deltas().items():
            meters = self.piped.get(tid)
            if meters is not None:
                add(meters[0] if way == "rx" else meters[1], counted)


def inside_describe(key: Hashable) -> str:
    way, tid = key
    return f"tunnel {tid:016x} {'from' if way == 'rx' else 'to'} the outside agent"
