"""Command line: options, key loading, start-up of either agent."""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time

from udp_tunnel import __version__
from udp_tunnel.addr import AddrError, ResolveError, parse_listen, resolve, show, split_hostport
from udp_tunnel.log import DEBUG, INFO, WARNING, Log

USAGE = """\
udp-tunnel -s HOST:PORT -o HOST:PORT [options]   inside agent, next to the service
udp-tunnel -l [HOST:]PORT [options]              outside agent, on the public host
udp-tunnel status [--control PATH] [--json]      show a running agent's tunnels
udp-tunnel demo                                  run both agents on loopback and show them work"""


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(message)


def build_parser() -> Parser:
    p = Parser(prog="udp-tunnel", usage=USAGE, add_help=False,
               description="Reverse UDP tunnel: reach a UDP service behind NAT through a public relay.")
    g = p.add_argument_group("roles")
    g.add_argument("-s", "--service", metavar="HOST:PORT", help="inside: the UDP service to reach")
    g.add_argument("-o", "--outside", metavar="HOST:PORT", help="inside: the outside agent")
    g.add_argument("-l", "--listen", metavar="[HOST:]PORT",
                   help="outside: where clients and tunnels arrive (PORT alone: all IPv4 and IPv6 addresses)")
    g = p.add_argument_group("key (the same on both ends)")
    g.add_argument("-k", "--key", metavar="KEY", help="pre-shared key (visible in the process list: prefer --key-file)")
    g.add_argument("--key-file", metavar="PATH", help="read the key from this file (SIGHUP reads it again)")
    g = p.add_argument_group("tuning")
    g.add_argument("-t", "--keepalive", metavar="SECONDS", type=float, default=25.0,
                   help="keepalive interval, the same on both ends (default 25)")
    g.add_argument("--timeout", metavar="SECONDS", type=float, default=60.0,
                   help="inside: close a tunnel after this long without a datagram from its client (default 60)")
    g.add_argument("--spares", metavar="N", type=int, default=2, help="inside: spare tunnels kept ready (default 2)")
    g.add_argument("--max-clients", metavar="N", type=int, default=1000,
                   help="most clients (tunnels in use) at once (default 1000)")
    g.add_argument("--legacy", action="store_true", help="speak the wire format of the C udp-tunnel 1.x")
    g.add_argument("--wireguard-key", metavar="PUBKEY", action="append",
                   help="outside: admit only WireGuard clients of the server with this public key "
                        "(base64, as 'wg show' prints it; repeat or separate by commas for several)")
    g.add_argument("--max-clock-skew", metavar="SECONDS", type=float, default=120.0,
                   help="outside --legacy: refuse keepalives whose clock is further off (default 120, 0: off)")
    fam = g.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=socket.AF_INET, help="IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6, help="IPv6 only")
    g = p.add_argument_group("operation")
    g.add_argument("--control", metavar="PATH",
                   help="serve 'udp-tunnel status' on this Unix socket (default: $RUNTIME_DIRECTORY/control.sock)")
    g.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP here")
    g.add_argument("-v", "--verbose", action="store_true", help="log every tunnel event")
    g.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    g.add_argument("-V", "--version", action="version", version=f"udp-tunnel {__version__}")
    g.add_argument("-h", "-?", "--help", action="help", help="show this help")
    return p


def read_key_file(path: str) -> bytes:
    with open(path, "rb") as f:
        key = f.read().rstrip(b"\r\n")
    if not key:
        raise ValueError(f"key file {path} is empty")
    return key


def load_key(a: argparse.Namespace) -> tuple[bytes, str]:
    """The secret and where it came from ('' when there is none)."""
    if a.key is not None and a.key_file is not None:
        raise UsageError("give the key once: -k or --key-file, not both")
    if a.key_file is not None:
        try:
            return read_key_file(a.key_file), "key file"
        except OSError as e:
            raise StartError(f"cannot read key file {a.key_file}: {e.strerror}") from None
        except ValueError as e:
            raise StartError(str(e)) from None
    if a.key is not None:
        if not a.key:
            raise UsageError("-k: the key is empty")
        return a.key.encode(), "command line"
    env = os.environ.get("UDP_TUNNEL_KEY")
    if env:
        return env.encode(), "UDP_TUNNEL_KEY"
    return b"", ""


class StartError(Exception):
    pass


def check(a: argparse.Namespace) -> str:
    inside = a.service is not None or a.outside is not None
    if inside and a.listen is not None:
        raise UsageError("-l (outside agent) cannot be combined with -s/-o (inside agent)")
    if not inside and a.listen is None:
        raise UsageError("say which agent to run: -s HOST:PORT -o HOST:PORT (inside) or -l PORT (outside)")
    if inside and (a.service is None or a.outside is None):
        raise UsageError("the inside agent needs both -s HOST:PORT and -o HOST:PORT")
    if not 0.1 <= a.keepalive <= 3600:
        raise UsageError("-t: the keepalive interval must be between 0.1 and 3600 seconds")
    if a.timeout < a.keepalive:
        raise UsageError("--timeout must not be shorter than the keepalive interval")
    if not 1 <= a.spares <= 64:
        raise UsageError("--spares must be between 1 and 64")
    if not 1 <= a.max_clients <= 1_000_000:
        raise UsageError("--max-clients must be between 1 and 1000000")
    if a.max_clock_skew < 0:
        raise UsageError("--max-clock-skew must not be negative")
    if a.wireguard_key is not None:
        if inside:
            raise UsageError("--wireguard-key is for the outside agent (-l)")
        from udp_tunnel.wireguard import parse_keys
        try:
            a.wireguard_keys = parse_keys(",".join(a.wireguard_key))
        except ValueError as e:
            raise UsageError(f"--wireguard-key: {e}") from None
    return "inside" if inside else "outside"


def raise_fd_limit(want: int) -> None:
    """The inside agent holds two sockets per client: lift the soft limit as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


def bind_listen(text: str, family: int | None) -> socket.socket:
    host, port = parse_listen(text)
    if host is None:
        fam = family or socket.AF_INET6
        host = "::" if fam == socket.AF_INET6 else "0.0.0.0"
    else:
        fam, sockaddr = resolve(host, port, "--listen", family or socket.AF_UNSPEC)
        host = sockaddr[0]
    try:
        s = socket.socket(fam, socket.SOCK_DGRAM)
    except OSError:
        if family is None and fam == socket.AF_INET6 and host == "::":  # no IPv6 on this host
            return bind_listen(f"0.0.0.0:{port}", socket.AF_INET)
        raise
    if fam == socket.AF_INET6 and host == "::":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if family == socket.AF_INET6 else 0)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise StartError(f"cannot listen on {show((host, port))}: {e.strerror}") from None
    return s


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["demo"]:
            from udp_tunnel.demo import demo
            return demo(argv[1:])
        if argv[:1] == ["status"]:
            from udp_tunnel.status import status_command
            return status_command(argv[1:])
        return run(build_parser().parse_args(argv))
    except (StartError, ResolveError) as e:
        print(f"udp-tunnel: {e}", file=sys.stderr)
        return 1
    except (UsageError, AddrError) as e:
        print(f"udp-tunnel: {e} (see udp-tunnel --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run(a: argparse.Namespace) -> int:
    from udp_tunnel import metrics, status
    from udp_tunnel.inside import InsideCore
    from udp_tunnel.loop import InsideLoop, OutsideLoop
    from udp_tunnel.outside import OutsideCore

    role = check(a)
    secret, key_from = load_key(a)
    raise_fd_limit(2 * a.max_clients + 2 * a.spares + 64)
    log = Log(WARNING if a.quiet else DEBUG if a.verbose else INFO)
    reload_key = (lambda: read_key_file(a.key_file)) if a.key_file else None
    now = time.monotonic()
    protocol = "legacy (C udp-tunnel 1.x)" if a.legacy else "v1"
    control = a.control
    if control is None and os.environ.get("RUNTIME_DIRECTORY"):
        control = os.path.join(os.environ["RUNTIME_DIRECTORY"].split(":")[0], "control.sock")
    metrics_addr = split_hostport(a.metrics, "--metrics") if a.metrics else None

    if role == "outside":
        sock = bind_listen(a.listen, a.family)
        fam = sock.family
        gate = None
        if a.wireguard_key is not None:  # WireGuard mode (issue 9)
            from udp_tunnel.wireguard import Gate
            gate = Gate(a.wireguard_keys)
        core = OutsideCore(secret=secret, keepalive=a.keepalive, max_clients=a.max_clients, family=fam,
                           now=now, log=log, legacy=a.legacy, max_skew=a.max_clock_skew, wireguard=gate)
        loop = OutsideLoop(core, sock, log, reload_key=reload_key)
        where = show(sock.getsockname())
        if fam == socket.AF_INET6 and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            where += " (IPv4 and IPv6)"
        desc = f"outside agent listening on {where}"
        if gate is not None:
            n = len(a.wireguard_keys)
            desc += f", admitting only WireGuard handshakes for {n} server key{'s' if n > 1 else ''}"
        info = {"listen": where}
    else:
        host, port = split_hostport(a.outside, "--outside")
        outside_addr = resolve(host, port, "--outside", a.family or socket.AF_UNSPEC)
        shost, sport = split_hostport(a.service, "--service")
        service_addr = resolve(shost, sport, "--service", prefer_v4=True)
        core = InsideCore(secret=secret, keepalive=a.keepalive, timeout=a.timeout, spares=a.spares,
                          max_clients=a.max_clients, now=now, log=log, legacy=a.legacy)
        core.start(now)
        loop = InsideLoop(core, (host, port), outside_addr, service_addr, log,
                          family=a.family or socket.AF_UNSPEC, reload_key=reload_key)
        resolved = show(outside_addr[1])
        info = {"service": show(service_addr[1]),
                "outside": resolved if resolved == a.outside else f"{a.outside} ({resolved})"}
        desc = f"inside agent for service {info['service']} via outside agent {info['outside']}"
    loop.info = {"version": __version__, "pid": os.getpid(), "key": bool(secret), **info}
    servers = []
    try:
        if control:
            servers.append(status.ControlServer(control, loop))
        if metrics_addr:
            servers.append(metrics.MetricsServer(metrics_addr, loop))
    except OSError as e:
        what = "metrics" if servers or not control else "status"
        for s in servers:
            s.close()
        loop.close()
        raise StartError(f"cannot serve {what}: {e.strerror or e}") from None
    log.info(f"udp-tunnel {__version__}: {desc}, protocol {protocol}, "
             f"key {'set from ' + key_from if secret else 'NOT set'}, keepalive {a.keepalive:g} s"
             + (f", status on {control}" if control else "")
             + (f", metrics on http://{show(metrics_addr)}/metrics" if metrics_addr else ""))
    if not secret:
        log.warning("no key (-k, --key-file or UDP_TUNNEL_KEY): keepalives are NOT authenticated; "
                    "anyone who can send UDP to the outside agent can take over tunnels and "
                    "receive your clients' datagrams")
    elif key_from == "command line":
        log.warning("the key was given with -k and is visible to every local user in the "
                    "process list: prefer --key-file or UDP_TUNNEL_KEY")
    try:
        return loop.run()
    finally:
        for s in servers:
            s.close()
