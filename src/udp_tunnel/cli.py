"""Command line: options, key loading, start-up of either agent."""

from __future__ import annotations

import argparse
import math
import os
import re
import resource
import socket
import sys
import time

from udp_tunnel import __version__
from udp_tunnel.addr import AddrError, ResolveError, parse_listen, resolve, show, split_hostport
from udp_tunnel.ops.log import DEBUG, INFO, WARNING, Log
from udp_tunnel.wire.proto import key_list

USAGE = """\
udp-tunnel -s HOST:PORT -o HOST:PORT [options]   inside agent, next to the service
udp-tunnel -l [HOST:]PORT [options]              outside agent, on the public host
udp-tunnel status [NAME] [--control PATH] [--json]   show running agents and their tunnels
udp-tunnel demo                                  run both agents on loopback and show them work"""


class UsageError(Exception):
    pass


MAX_KEEPALIVE = 3600  # seconds; the cores size their cookie lifetime from the keepalive


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UsageError(message)


def number(text: str) -> float:
    """A finite decimal number written in ASCII (float() also takes 'nan', 'inf' and other digits)."""
    try:
        value = float(text) if text.isascii() else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}")
    return value


def whole(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


# Options that take a number: argparse would read a negative value (-t -5) as an option,
# because -4 and -6 are options; join_negative turns it into -t=-5 so the range check speaks.
NUMERIC = {"-t", "--keepalive", "--timeout", "--spares", "--max-clients", "--max-clients-per-source",
           "--max-clock-skew"}
NEGATIVE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def join_negative(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in NUMERIC and i + 1 < len(argv) and NEGATIVE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


NO_KEY = ("no key: give the same key to both ends with --key-file PATH (or UDP_TUNNEL_KEY), "
          "or run without authentication with --insecure-no-key")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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
    g.add_argument("--insecure-no-key", action="store_true",
                   help="run without a key: anyone can take over tunnels (without a key the agents refuse to start)")
    g = p.add_argument_group("tuning")
    g.add_argument("-t", "--keepalive", metavar="SECONDS", type=number, default=25.0,
                   help=f"keepalive interval, the same on both ends (default 25, at most {MAX_KEEPALIVE})")
    g.add_argument("--timeout", metavar="SECONDS", type=number,
                   help="inside: close a tunnel after this long without a datagram from its client (default 60)")
    g.add_argument("--spares", metavar="N", type=whole, help="inside: spare tunnels kept ready (default 2)")
    g.add_argument("--max-clients", metavar="N", type=whole, default=1000,
                   help="most clients (tunnels in use) at once (default 1000)")
    g.add_argument("--max-clients-per-source", metavar="N", type=whole,
                   help="outside: most clients from one IPv4 address or IPv6 /64 (default a quarter of "
                        "--max-clients, at least 16; twice that per IPv4 /24 or IPv6 /56, three times per "
                        "IPv6 /48): a spray from one host can't take every tunnel")
    g.add_argument("--legacy", action="store_true", help="speak the wire format of the C udp-tunnel 1.x")
    g.add_argument("--wireguard-key", metavar="PUBKEY", action="append",
                   help="outside: admit only WireGuard clients of the server with this public key "
                        "(base64, as 'wg show' prints it; repeat or separate by commas for several)")
    g.add_argument("--max-clock-skew", metavar="SECONDS", type=number,
                   help="outside --legacy: refuse keepalives whose clock is further off (default 120, 0: off)")
    fam = g.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=socket.AF_INET, help="IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6, help="IPv6 only")
    g = p.add_argument_group("operation")
    g.add_argument("--name", metavar="NAME", help="what 'udp-tunnel status NAME' calls this agent "
                                                  "(default: outside-PORT, inside-SERVICE-OUTSIDE)")
    g.add_argument("--control", metavar="PATH",
                   help="serve 'udp-tunnel status' on this Unix socket, 'none' for no socket "
                        "(default: NAME.sock in $XDG_RUNTIME_DIR/udp-tunnel, else /run/udp-tunnel as root, "
                        "else /tmp/udp-tunnel-UID; under systemd $RUNTIME_DIRECTORY/control.sock)")
    g.add_argument("--check-config", action="store_true", help=argparse.SUPPRESS)  # for make install-*
    g.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP here")
    g.add_argument("--state-file", metavar="PATH",
                   help="outside: remember where the tunnels are, so that after a restart they register "
                        "again at once (default: NAME.state beside the control socket, "
                        "$STATE_DIRECTORY/outside.state under systemd; none: off)")
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
    """The secret and where it came from ('' when there is none). A key is bytes: from
    -k or UDP_TUNNEL_KEY the very bytes given (os.fsencode), as from a key file."""
    if a.key_file is not None:
        try:
            return read_key_file(a.key_file), "key file"
        except OSError as e:
            raise StartError(f"cannot read key file {a.key_file}: {e.strerror}") from None
        except ValueError as e:
            raise StartError(str(e)) from None
    if a.key is not None:
        return os.fsencode(a.key), "command line"
    env = os.environb.get(b"UDP_TUNNEL_KEY")
    if env:
        return env, "UDP_TUNNEL_KEY"
    return b"", ""


MIN_KEY = 16  # a shorter key gets a warning


class StartError(Exception):
    pass


def check(a: argparse.Namespace) -> str:
    """Everything about the command line that can be checked without I/O (also what
    `make install-*` asks with --check-config). Fills in the role-specific defaults."""
    inside = a.service is not None or a.outside is not None
    if inside and a.listen is not None:
        raise UsageError("-l (outside agent) cannot be combined with -s/-o (inside agent)")
    if not inside and a.listen is None:
        raise UsageError("say which agent to run: -s HOST:PORT -o HOST:PORT (inside) or -l PORT (outside)")
    if inside and (a.service is None or a.outside is None):
        raise UsageError("the inside agent needs both -s HOST:PORT and -o HOST:PORT")
    if inside:
        split_hostport(a.service, "--service")
        split_hostport(a.outside, "--outside")
        if a.max_clock_skew is not None:
            raise UsageError("--max-clock-skew is for the outside agent (-l --legacy), not the inside agent")
        for opt, value in (("--state-file", a.state_file), ("--max-clients-per-source", a.max_clients_per_source)):
            if value is not None:
                raise UsageError(f"{opt} is for the outside agent (-l), not the inside agent")
    else:
        parse_listen(a.listen)
        for opt, value in (("--timeout", a.timeout), ("--spares", a.spares)):
            if value is not None:
                raise UsageError(f"{opt} is for the inside agent (-s/-o), not the outside agent")
        if a.max_clock_skew is not None and not a.legacy:
            raise UsageError("--max-clock-skew only applies with --legacy")
    if a.metrics:
        split_hostport(a.metrics, "--metrics")
    if not 0.1 <= a.keepalive <= MAX_KEEPALIVE:
        raise UsageError(f"-t: the keepalive interval must be between 0.1 and {MAX_KEEPALIVE} seconds")
    if a.timeout is None:
        a.timeout = max(60.0, a.keepalive)
    elif a.timeout < a.keepalive:
        raise UsageError("--timeout must not be shorter than the keepalive interval")
    if a.spares is None:
        a.spares = 2
    elif not 1 <= a.spares <= 64:
        raise UsageError("--spares must be between 1 and 64")
    if not 1 <= a.max_clients <= 1_000_000:
        raise UsageError("--max-clients must be between 1 and 1000000")
    if a.max_clients_per_source is None:
        a.max_clients_per_source = max(16, a.max_clients // 4)
    elif not 1 <= a.max_clients_per_source <= a.max_clients:
        raise UsageError("--max-clients-per-source must be between 1 and --max-clients")
    if a.max_clock_skew is None:
        a.max_clock_skew = 120.0
    elif a.max_clock_skew < 0:
        raise UsageError("--max-clock-skew must not be negative")
    if a.key is not None and a.key_file is not None:
        raise UsageError("give the key once: -k or --key-file, not both")
    if a.key == "":
        raise UsageError("-k: the key is empty")
    has_key = a.key is not None or a.key_file is not None or bool(os.environb.get(b"UDP_TUNNEL_KEY"))
    if a.insecure_no_key and has_key:
        raise UsageError("--insecure-no-key, yet a key is given (-k, --key-file or UDP_TUNNEL_KEY): drop one")
    if not has_key and not a.insecure_no_key:
        raise UsageError(NO_KEY)
    if a.name is not None and not NAME.fullmatch(a.name):
        raise UsageError(f"--name: {a.name!r} is not a name (letters, digits, '.', '_', '-'; at most 64)")
    if a.wireguard_key is not None:
        if inside:
            raise UsageError("--wireguard-key is for the outside agent (-l)")
        from udp_tunnel.core.wireguard import parse_keys
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


def default_name(role: str, a: argparse.Namespace) -> str:
    """outside-9999, outside-192.0.2.1_9999, inside-localhost_51820-vps.example.com_9999."""
    def tidy(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")
    name = f"outside-{tidy(a.listen)}" if role == "outside" else f"inside-{tidy(a.service)}-{tidy(a.outside)}"
    return name[:64]


def agent_path(given: str | None, name: str, unit_dir: str, unit_file: str, suffix: str) -> str | None:
    """--control / --state-file: PATH, 'none', or by default the unit's directory ($unit_dir) under
    systemd, else NAME+suffix in this user's private runtime directory (made here if needed)."""
    from udp_tunnel.ops import status

    if given == "none":
        return None
    if given:
        return given
    if os.environ.get(unit_dir):
        return os.path.join(os.environ[unit_dir].split(":")[0], unit_file)
    return os.path.join(status.private_dir(status.runtime_dir()), f"{name}{suffix}")


def control_path(given: str | None, name: str) -> str | None:
    return agent_path(given, name, "RUNTIME_DIRECTORY", "control.sock", ".sock")


def state_path(given: str | None, name: str) -> str | None:
    return agent_path(given, name, "STATE_DIRECTORY", "outside.state", ".state")


def remember(core, path: str | None, log: Log, now: float) -> None:
    """The outside agent starts: the tunnels its previous run knew (the state file) are asked
    to register again at once."""
    if not path:
        return
    from udp_tunnel.wire import statefile
    try:
        entries = statefile.load(path)
    except ValueError as e:
        log.warning(f"{e}: tunnels register again at their next keepalive")
        return
    if entries:
        log.info(f"asking the {len(entries)} tunnel(s) of the previous run to register again")
        core.remembered(entries, now)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["demo"]:
            from udp_tunnel.demo import demo
            return demo(argv[1:])
        if argv[:1] == ["status"]:
            from udp_tunnel.ops.status import status_command
            return status_command(argv[1:])
        return run(build_parser().parse_args(join_negative(argv)))
    except (StartError, ResolveError) as e:
        print(f"udp-tunnel: {e}", file=sys.stderr)
        return 1
    except (UsageError, AddrError) as e:
        print(f"udp-tunnel: {e} (see udp-tunnel --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the output went to a pipe that closed (udp-tunnel demo | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run(a: argparse.Namespace) -> int:
    from udp_tunnel.core.inside import InsideCore
    from udp_tunnel.core.outside import OutsideCore
    from udp_tunnel.io.inside import inside_loop
    from udp_tunnel.io.outside import outside_loop
    from udp_tunnel.ops import metrics, status

    role = check(a)
    if a.check_config:
        return 0
    secret, key_from = load_key(a)
    raise_fd_limit(2 * a.max_clients + 2 * a.spares + 64)
    log = Log(WARNING if a.quiet else DEBUG if a.verbose else INFO)
    reload_key = (lambda: read_key_file(a.key_file)) if a.key_file else None
    now = time.monotonic()
    protocol = "legacy (C udp-tunnel 1.x)" if a.legacy else "v2"
    name = a.name or default_name(role, a)
    metrics_addr = split_hostport(a.metrics, "--metrics") if a.metrics else None

    if role == "outside":
        sock = bind_listen(a.listen, a.family)
        fam = sock.family
        gate = None
        if a.wireguard_key is not None:  # WireGuard mode (issue 9)
            from udp_tunnel.core.wireguard import Gate
            gate = Gate(a.wireguard_keys)
        core = OutsideCore(secret=secret, keepalive=a.keepalive, max_clients=a.max_clients, family=fam,
                           now=now, log=log, legacy=a.legacy, max_skew=a.max_clock_skew, wireguard=gate,
                           max_per_source=a.max_clients_per_source)
        try:
            state = state_path(a.state_file, name)
        except OSError as e:
            sock.close()
            raise StartError(f"{e.strerror or e} (or --state-file PATH)") from None
        remember(core, state, log, now)
        loop = outside_loop(core, sock, log, state_path=state, reload_key=reload_key)
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
        loop = inside_loop(core, (host, port), outside_addr, service_addr, log,
                           family=a.family or socket.AF_UNSPEC, reload_key=reload_key)
        resolved = show(outside_addr[1])
        info = {"service": show(service_addr[1]),
                "outside": resolved if resolved == a.outside else f"{a.outside} ({resolved})"}
        desc = f"inside agent for service {info['service']} via outside agent {info['outside']}"
    loop.info = {"version": __version__, "pid": os.getpid(), "key": bool(secret), "name": name, **info}
    servers = []
    control, what = None, "status"
    try:
        control = control_path(a.control, name)
        if control:
            servers.append(status.ControlServer(control, loop))
        what = "metrics"
        if metrics_addr:
            servers.append(metrics.MetricsServer(metrics_addr, loop))
    except OSError as e:
        for s in servers:
            s.close()
        loop.close()
        raise StartError(f"cannot serve {what}: {e.strerror or e}") from None
    log.info(f"udp-tunnel {__version__}: {desc}, protocol {protocol}, "
             f"key {'set from ' + key_from if secret else 'NOT set'}, keepalive {a.keepalive:g} s"
             + (f", status on {control}" if control else "")
             + (f", metrics on http://{show(metrics_addr)}/metrics" if metrics_addr else ""))
    if not secret:
        log.warning("--insecure-no-key: keepalives are NOT authenticated; "
                    "anyone who can send UDP to the outside agent can take over tunnels and "
                    "receive your clients' datagrams")
    elif key_from == "command line":
        log.warning("the key was given with -k and is visible to every local user in the "
                    "process list: prefer --key-file or UDP_TUNNEL_KEY")
    if secret and min(len(k) for k in key_list(secret)) < MIN_KEY:
        log.warning(f"the key is short (under {MIN_KEY} characters): whoever captures one keepalive can "
                    "try guesses offline; use a long random key (make install-* makes one)")
    try:
        return loop.run()
    finally:
        for s in servers:
            s.close()
