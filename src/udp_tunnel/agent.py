"""Start an agent from its configuration (config.py's model: a file, or the command line as a
one-service configuration), run it, and apply a new configuration on SIGHUP.

The outside agent: a socket on the tunnel port (where the inside agents register) and one per
port of each service that does not listen on the tunnel port itself; the core gets these as
its endpoints, in that order. The inside agent: its services' addresses resolved, their
client-address modes set up (transparent mode: privileges and policy routing, or one line
saying what is missing).
"""

from __future__ import annotations

import os
import re
import resource
import socket
import time
from dataclasses import dataclass, field

from udp_tunnel import __version__, config
from udp_tunnel.addr import resolve, show
from udp_tunnel.core.inside import InsideCore
from udp_tunnel.core.outside import Endpoint, OutsideCore, Service
from udp_tunnel.core.wireguard import Gate
from udp_tunnel.io.datapath import Datapath, DatapathError, choose
from udp_tunnel.io.inside import inside_loop
from udp_tunnel.io.loop import Loop
from udp_tunnel.io.outside import outside_loop
from udp_tunnel.io.services import ServiceTarget
from udp_tunnel.io.transparent import TransparentError
from udp_tunnel.ops import metrics, paths, status
from udp_tunnel.ops.log import DEBUG, INFO, WARNING, Log
from udp_tunnel.wire import proto, statefile

MIN_KEY = 16  # a shorter key gets a warning


class StartError(Exception):
    """The agent cannot start: str() is the one line to print (exit status 1)."""


@dataclass
class Started:
    loop: Loop
    desc: str  # the start line's middle
    info: dict  # fixed facts shown with every snapshot
    secrets: dict[str, bytes] = field(default_factory=dict)  # key name -> secret
    origins: dict[str, str] = field(default_factory=dict)  # key name -> where it came from
    datapath: Datapath | None = None


def run(cfg: config.Config) -> int:
    log = Log(WARNING if cfg.quiet else DEBUG if cfg.verbose else INFO)
    now = time.monotonic()
    name = cfg.name or default_name(cfg)
    started = start_outside(cfg, log, now, name) if cfg.role == "outside" else start_inside(cfg, log, now)
    loop = started.loop
    loop.info = {"version": __version__, "pid": os.getpid(), "key": any(started.secrets.values()),
                 "name": name, **started.info}
    loop.on_reload = Reloader(cfg, loop, log)
    servers, control = serve(loop, cfg, name)
    start_line(cfg, started, log, control)
    try:
        return loop.run()
    finally:
        for s in servers:
            s.close()


def default_name(cfg: config.Config) -> str:
    """outside-9999, outside-192.0.2.1_9999, inside-localhost_51820-vps.example.com_9999."""
    def tidy(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
    if cfg.role == "outside":
        listen = cfg.listen
        return f"outside-{tidy(str(listen.ports) if listen.host is None else str(listen))}"[:64]
    return f"inside-{tidy(str(cfg.services[0].service))}-{tidy(str(cfg.outside))}"[:64]


def secrets_of(keys) -> tuple[dict[str, bytes], dict[str, str]]:
    try:
        return ({k.name: config.read_key(k) for k in keys}, {k.name: k.origin for k in keys})
    except config.ConfigError as e:
        raise StartError(str(e)) from None


def open_datapath(cfg: config.Config, legacy: bool, max_flows: int, close: list) -> Datapath:
    """The data path cfg asks for (StartError, one line, for datapath "kernel" where it can't run;
    the sockets in `close` are closed then)."""
    try:
        return choose(cfg.datapath, legacy=legacy, max_flows=max(1024, max_flows))
    except DatapathError as e:
        for s in close:
            s.close()
        raise StartError(str(e)) from None


def raise_fd_limit(want: int) -> None:
    """The inside agent holds two sockets per client: lift the soft limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


# --- the outside agent ---

def bind_listen(host: str | None, port: int, family: int | None) -> socket.socket:
    """A UDP socket on host:port; host None: every IPv6 and IPv4 address (IPv4 alone where the
    host has no IPv6)."""
    if host is None:
        fam = family or socket.AF_INET6
        host = "::" if fam == socket.AF_INET6 else "0.0.0.0"
    else:
        fam, sockaddr = resolve(host, port, "--listen", family or socket.AF_UNSPEC)
        host = sockaddr[0]
    try:
        s = socket.socket(fam, socket.SOCK_DGRAM)
    except OSError as e:
        if family is None and fam == socket.AF_INET6 and host == "::":  # no IPv6 on this host
            return bind_listen("0.0.0.0", port, socket.AF_INET)
        raise StartError(f"cannot listen on {show((host, port))}: {e.strerror or e}") from None
    if fam == socket.AF_INET6 and host == "::":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if family == socket.AF_INET6 else 0)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise StartError(f"cannot listen on {show((host, port))}: {e.strerror}") from None
    return s


def where(sock: socket.socket) -> str:
    text = show(sock.getsockname())
    if sock.family == socket.AF_INET6 and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
        text += " (IPv4 and IPv6)"
    return text


def endpoints(cfg: config.OutsideConfig) -> list[tuple[tuple, str | None, int]]:
    """(endpoint, host, port) for each socket: the tunnel port first (shared by a service that
    listens on it), then every port of the other services."""
    tunnel_service = next((s for s in cfg.services if s.listen == cfg.listen), None)
    out = [((tunnel_service.name if tunnel_service else None, 0, True), cfg.listen.host, cfg.listen.ports.first)]
    for s in cfg.services:
        if s is tunnel_service:
            continue
        for k, port in enumerate(range(s.listen.ports.first, s.listen.ports.last + 1)):
            out.append(((s.name, k, False), s.listen.host, port))
    return out


def open_endpoints(cfg: config.OutsideConfig) -> tuple[list[tuple], list[socket.socket]]:
    eps, socks = [], []
    try:
        for ep, host, port in endpoints(cfg):
            socks.append(bind_listen(host, port, cfg.family))
            eps.append(ep)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return eps, socks


def outside_services(cfg: config.OutsideConfig) -> list[Service]:
    return [Service(s.name, s.key, s.max_clients, s.max_clients_per_source,
                    Gate(list(s.wireguard_keys)) if s.wireguard_keys else None) for s in cfg.services]


def start_outside(cfg: config.OutsideConfig, log: Log, now: float, name: str) -> Started:
    secrets, origins = secrets_of(cfg.keys)
    legacy = any(s.legacy for s in cfg.services)
    eps, socks = open_endpoints(cfg)
    core = OutsideCore(keys={k.name: (secrets[k.name], k.max_clients) for k in cfg.keys},
                       services=outside_services(cfg), endpoints=[Endpoint(*e) for e in eps],
                       keepalive=cfg.keepalive, family=socks[0].family, now=now, log=log, legacy=legacy,
                       max_skew=cfg.services[0].max_clock_skew)
    for via, s in enumerate(socks):
        core.reached[via] = reached(s)
    try:
        state = paths.state_path(cfg.state_file, name) if not legacy else None
    except OSError as e:
        for s in socks:
            s.close()
        raise StartError(f"{e.strerror or e} (or --state-file PATH)") from None
    # two directions per tunnel that can carry a client, and room for the keys added by a reload
    dp = open_datapath(cfg, legacy, 2 * core.max_tunnels + 256, socks)
    loop = outside_loop(core, socks, log, state_path=state, datapath=dp)  # (the map follows the routes from here)
    remember(core, state, log, now)
    desc = f"outside agent listening on {where(socks[0])}"
    if len(cfg.services) > 1 or cfg.services[0].listen != cfg.listen:
        desc += f" for tunnels, serving {', '.join(f'{s.name} on {s.listen}' for s in cfg.services)}"
    wg = [s for s in cfg.services if s.wireguard_keys]
    if wg:
        n = sum(len(s.wireguard_keys) for s in wg)
        desc += f", admitting only WireGuard handshakes for {n} server key{'s' if n > 1 else ''}"
    return Started(loop, desc, {"listen": where(socks[0])}, secrets, origins, dp)


def reached(sock: socket.socket) -> tuple | None:
    """The address clients send to on this socket, when it is bound to one (not a wildcard)."""
    host, port = sock.getsockname()[:2]
    return None if host in ("::", "0.0.0.0") else (host, port)


def remember(core: OutsideCore, path: str | None, log: Log, now: float) -> None:
    """The tunnels the previous run knew (the state file) are asked to register again at once."""
    if not path:
        return
    try:
        entries, initiations = statefile.load_all(path, core.max_tunnels)
    except ValueError as e:
        log.warning(f"{e}: tunnels register again at their next keepalive")
        return
    core.remember_initiations(initiations)
    if entries:
        log.info(f"asking the {len(entries)} tunnel(s) of the previous run to register again")
        core.remembered(entries, now)


# --- the inside agent ---

def service_target(s: config.InsideService, log: Log) -> ServiceTarget:
    """A service's address resolved and its client-address mode set up (StartError, one line)."""
    fam, addr = resolve(s.service.host, s.service.ports.first, f"service {s.name}", prefer_v4=True)
    t = ServiceTarget(s.name, fam, addr[0], addr[1], s.service.ports.size, s.client_address, warn=log.warning)
    try:
        for line in t.start():
            log.info(line)
    except TransparentError as e:
        raise StartError(str(e)) from None
    return t


def service_targets(cfg: config.InsideConfig, log: Log) -> dict[str, ServiceTarget]:
    return {s.name: service_target(s, log) for s in cfg.services}


def start_inside(cfg: config.InsideConfig, log: Log, now: float) -> Started:
    secrets, origins = secrets_of((cfg.key,))
    secret = secrets[cfg.key.name]
    raise_fd_limit(2 * cfg.max_clients + 2 * cfg.spares + 64)
    outside_addr = resolve(cfg.outside.host, cfg.outside.ports.first, "--outside", cfg.family or socket.AF_UNSPEC)
    legacy = any(s.legacy for s in cfg.services)
    dp = open_datapath(cfg, legacy, 2 * cfg.max_clients + 64, [])
    try:
        targets = service_targets(cfg, log)
    except BaseException:
        dp.close()
        raise
    core = InsideCore(secret=secret, keepalive=cfg.keepalive, timeout=max(s.timeout for s in cfg.services),
                      spares=cfg.spares, max_clients=cfg.max_clients, now=now, log=log, legacy=legacy,
                      services=tuple(targets))
    core.start(now)
    loop = inside_loop(core, (cfg.outside.host, cfg.outside.ports.first), outside_addr, targets, log,
                       family=cfg.family or socket.AF_UNSPEC, datapath=dp)
    resolved = show(outside_addr[1])
    given = str(cfg.outside)
    served = ", ".join(f"{n} {t}" + (f" ({t.mode})" if t.mode != "off" else "") for n, t in targets.items())
    info = {"service": served if len(targets) > 1 else str(next(iter(targets.values()))),
            "outside": resolved if resolved == given else f"{given} ({resolved})"}
    what = f"service {info['service']}" if len(targets) == 1 else f"services {served}"
    return Started(loop, f"inside agent for {what} via outside agent {info['outside']}", info, secrets, origins,
                   dp)


# --- status, metrics, the start line, SIGHUP ---

def serve(loop: Loop, cfg: config.Config, name: str) -> tuple[list, str | None]:
    servers: list = []
    control, what = None, "status"
    try:
        control = paths.control_path(cfg.control, name)
        if control:
            servers.append(status.ControlServer(control, loop))
        if cfg.metrics:
            what = f"metrics on {show(cfg.metrics)}"
            servers.append(metrics.MetricsServer(cfg.metrics, loop))
    except OSError as e:
        for s in servers:
            s.close()
        loop.close()
        raise StartError(f"cannot serve {what}: {e.strerror or e}") from None
    return servers, control


def start_line(cfg: config.Config, started: Started, log: Log, control: str | None) -> None:
    legacy = any(s.legacy for s in cfg.services)
    protocol = "legacy (C udp-tunnel 1.x)" if legacy else f"v{proto.VERSION}"
    keys = [(n, s, started.origins[n]) for n, s in started.secrets.items()]
    if len(keys) == 1:
        key = f"key {'set from ' + keys[0][2] if keys[0][1] else 'NOT set'}"
    else:
        key = f"{len(keys)} keys"
    log.info(f"udp-tunnel {__version__}: {started.desc}, protocol {protocol}, {key}, keepalive {cfg.keepalive:g} s"
             + (f", {started.datapath.line()}" if started.datapath else "")
             + (f", status on {control}" if control else "")
             + (f", metrics on http://{show(cfg.metrics)}/metrics" if cfg.metrics else ""))
    for name, secret, origin in keys:
        label = "" if name == config.DEFAULT else f"key {name}: "
        if not secret:
            log.warning(f"{label}--insecure-no-key: keepalives are NOT authenticated; anyone who can send UDP "
                        "to the outside agent can take over tunnels and receive your clients' datagrams")
        elif origin == "command line":
            log.warning("the key was given with -k and is visible to every local user in the "
                        "process list: prefer --key-file or UDP_TUNNEL_KEY")
        if secret and min(len(k) for k in proto.key_list(secret)) < MIN_KEY:
            log.warning(f"{label}the key is short (under {MIN_KEY} characters): whoever captures one "
                        "keepalive can try guesses offline; use a long random key (make install-* makes one)")


class Reloader:
    """SIGHUP: the key files again, or (with --config) the whole file, applied without losing a
    datagram of what did not change: services added start, removed ones stop (their tunnels
    close), changed ones change; a bad file is refused as a whole (one line) and the running
    configuration stays."""

    def __init__(self, cfg: config.Config, loop: Loop, log: Log) -> None:
        self.cfg, self.loop, self.log = cfg, loop, log

    def __call__(self, now: float) -> None:
        cfg = self.cfg
        try:
            new = cfg if cfg.source == "command line" else config.load(cfg.source)
            if new.role != cfg.role:
                raise config.ConfigError(f"a configuration of an {new.role} agent, this one is the {cfg.role}",
                                         cfg.source)
            keys = new.keys if new.role == "outside" else (new.key,)
            secrets, _ = secrets_of(keys)
            # the command line again: only its key files, read again
            ch = config.changes(cfg, new) if new is not cfg else config.Changes(keys=tuple(secrets))
            if new.role == "outside":
                self._check_outside(cfg, new, ch)
        except (config.ConfigError, StartError) as e:
            self.log.error(f"SIGHUP: {e}; the running configuration stays")
            return
        if new is cfg and not any(k.file for k in keys):
            self.log.info("SIGHUP: no key file to read again")
            return
        try:
            if new.role == "outside":
                self._outside(new, ch, secrets, now)
            else:
                self._inside(cfg, new, ch, secrets[new.key.name], now)
        except (StartError, OSError) as e:
            self.log.error(f"SIGHUP: {e}; the configuration is applied in part")
        if ch.settings:
            self.log.warning(f"SIGHUP: {', '.join(ch.settings)} change when the agent restarts")
        self.cfg = new

    def _check_outside(self, old: config.OutsideConfig, new: config.OutsideConfig, ch: config.Changes) -> None:
        if (ch.added or ch.removed) and not self.loop.can_add_ports:
            raise StartError("this agent started with one port (its fast path): adding or removing services "
                             "needs a restart")
        for name in ch.changed:
            if old.service(name).listen != new.service(name).listen:
                raise StartError(f"service {name}: a new port or range needs the service removed and added, "
                                 "or a restart")

    def _outside(self, new: config.OutsideConfig, ch: config.Changes, secrets: dict, now: float) -> None:
        core = self.loop.core
        for name in ch.keys:
            k = new.key(name)
            if k is None:
                core.remove_key(name, now)
            elif name not in core.keyring:
                core.add_key(name, secrets[name], k.max_clients, now)
            else:
                core.reload_keys(secrets[name], now, name)
                core.set_key_limit(name, k.max_clients)
        for name in ch.removed:
            for via in core.remove_service(name, now):
                self.loop.remove_socket(via)
            self.log.info(f"SIGHUP: service {name} stopped")
        services = {s.name: s for s in outside_services(new)}
        for name in ch.changed:
            core.update_service(services[name])
            self.log.info(f"SIGHUP: service {name} changed")
        for name in ch.added:
            svc = new.service(name)
            socks, eps = [], []
            for k, port in enumerate(range(svc.listen.ports.first, svc.listen.ports.last + 1)):
                socks.append(bind_listen(svc.listen.host, port, new.family))
                eps.append(Endpoint(name, k, False))
            for via, sock in zip(core.add_service(services[name], eps, now), socks, strict=True):
                if self.loop.add_socket(sock) != via:
                    raise StartError(f"service {name}: endpoints out of step")
                core.reached[via] = reached(sock)
            self.log.info(f"SIGHUP: service {name} started on {svc.listen}")

    def _inside(self, old: config.InsideConfig, new: config.InsideConfig, ch: config.Changes, secret: bytes,
                now: float) -> None:
        loop, core = self.loop, self.loop.core
        core.reload_keys(secret, now)
        if new is old:
            return
        for name in (*ch.added, *ch.changed):
            t = service_target(new.service(name), self.log)
            if name in loop.services:  # its clients keep their sockets (and its policy routing) until stop
                loop.replaced.append(loop.services[name])
            loop.services[name] = t  # new clients; those already there keep their sockets
        for name in ch.removed:
            if name in loop.services:
                loop.replaced.append(loop.services.pop(name))
        core.serve(tuple(s.name for s in new.services), now)
