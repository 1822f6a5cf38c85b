"""Command line: options, key loading, start-up of either agent."""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
import sys

from udp_tunnel import __version__, config
from udp_tunnel.addr import AddrError, ResolveError, parse_listen, split_hostport

USAGE = """\
udp-tunnel -s HOST:PORT -o HOST:PORT [options]   inside agent, next to the service
udp-tunnel -l [HOST:]PORT [options]              outside agent, on the public host
udp-tunnel --config FILE [--check-config]        either agent, with its services in a TOML file
udp-tunnel status [NAME] [--control PATH] [--json]   show running agents and their tunnels
udp-tunnel demo                                  run both agents on loopback and show them work"""


class UsageError(Exception):
    """A command line that is wrong: str() is the one line; `see`, the help that explains it."""

    see = "udp-tunnel --help"


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


def build_parser() -> Parser:
    p = Parser(prog="udp-tunnel", usage=USAGE, add_help=False,
               description="Reverse UDP tunnel: reach a UDP service behind NAT through a public relay.")
    _role_options(p.add_argument_group("roles"))
    _key_options(p.add_argument_group("key (the same on both ends)"))
    _tuning_options(p.add_argument_group("tuning"))
    _operation_options(p.add_argument_group("operation"))
    return p


def _role_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("-s", "--service", metavar="HOST:PORT", help="inside: the UDP service to reach")
    g.add_argument("-o", "--outside", metavar="HOST:PORT", help="inside: the outside agent")
    g.add_argument("-l", "--listen", metavar="[HOST:]PORT",
                   help="outside: where clients and tunnels arrive (PORT alone: all IPv4 and IPv6 addresses)")


def _key_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("-k", "--key", metavar="KEY", help="pre-shared key (visible in the process list: prefer --key-file)")
    g.add_argument("--key-file", metavar="PATH", help="read the key from this file (SIGHUP reads it again)")
    g.add_argument("--insecure-no-key", action="store_true",
                   help="run without a key: anyone can take over tunnels (without a key the agents refuse to start)")


def _tuning_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("-t", "--keepalive", metavar="SECONDS", type=number, default=25.0,
                   help=f"the longest keepalive interval, the same on both ends (default 25, at most "
                        f"{config.MAX_KEEPALIVE})")
    g.add_argument("--timeout", metavar="SECONDS", type=number,
                   help="inside: close a tunnel after this long without a datagram from its client "
                        "(default 60, or the keepalive interval if longer)")
    g.add_argument("--spares", metavar="N", type=whole, help="inside: spare tunnels kept ready (default 2)")
    g.add_argument("--max-clients", metavar="N", type=whole, default=1000,
                   help="most clients (tunnels in use) at once (default 1000)")
    g.add_argument("--max-clients-per-source", metavar="N", type=whole,
                   help="outside: most clients from one IPv4 address or IPv6 /64 (default a quarter of "
                        "--max-clients, at least 16; twice that per IPv4 /24 or IPv6 /56, three times per "
                        "IPv6 /48): a spray from one host can't take every tunnel")
    g.add_argument("--legacy", action="store_true", help="speak the wire format of the C udp-tunnel 1.x")
    g.add_argument("--client-address", metavar="MODE", choices=config.CLIENT_ADDRESS,
                   help="inside: how the service sees each client: off (as the inside agent, the default), "
                        "transparent (its real address: needs CAP_NET_ADMIN), proxy-v2 / proxy-v2-first (a PROXY "
                        "v2 header before every / the first datagram, for a PROXY-protocol front)")
    g.add_argument("--wireguard-key", metavar="PUBKEY", action="append",
                   help="outside: admit only WireGuard clients of the server with this public key "
                        "(base64, as 'wg show' prints it; repeat or separate by commas for several)")
    g.add_argument("--datapath", metavar="MODE", choices=config.DATAPATHS,
                   help="who relays the datagrams of known flows: auto (the kernel, through an eBPF program, where "
                        "it can: root or CAP_BPF and CAP_NET_ADMIN, Linux 6.6+; else this process; the default), "
                        "kernel (or refuse to start), user (always this process)")
    g.add_argument("--max-clock-skew", metavar="SECONDS", type=number,
                   help="outside --legacy: refuse keepalives whose clock is further off (default 120, 0: off)")
    fam = g.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=socket.AF_INET, help="IPv4 only")
    fam.add_argument("-6", dest="family", action="store_const", const=socket.AF_INET6, help="IPv6 only")


def _operation_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--name", metavar="NAME", help="what 'udp-tunnel status NAME' calls this agent "
                                                  "(default: outside-PORT, inside-SERVICE-OUTSIDE)")
    g.add_argument("--control", metavar="PATH",
                   help="serve 'udp-tunnel status' on this Unix socket, 'none' for no socket "
                        "(default: NAME.sock in $XDG_RUNTIME_DIR/udp-tunnel, else /run/udp-tunnel as root, "
                        "else /tmp/udp-tunnel-UID; under systemd $RUNTIME_DIRECTORY/control.sock)")
    g.add_argument("--config", metavar="PATH", action="append",
                   help="read the agent's settings and services from this TOML file (see examples/); "
                        "with --check-config only check it (twice: an outside and an inside file, against "
                        "each other)")
    g.add_argument("--check-config", action="store_true",
                   help="check the command line or --config file and exit (0: fine)")
    g.add_argument("--print-install-facts", action="store_true", help=argparse.SUPPRESS)  # for make install-*
    g.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics over HTTP here (no "
                   "authentication: bind it to localhost or a private address)")
    g.add_argument("--state-file", metavar="PATH",
                   help="outside: remember where the tunnels are, so that after a restart they register "
                        "again at once (default: NAME.state in the default control socket's directory, "
                        "$STATE_DIRECTORY/outside.state under systemd; none: off)")
    g.add_argument("-v", "--verbose", action="store_true", help="log every tunnel event")
    g.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    g.add_argument("-V", "--version", action="version", version=f"udp-tunnel {__version__}")
    g.add_argument("-h", "-?", "--help", action="help", help="show this help")


def check(a: argparse.Namespace) -> str:
    """Everything about the command line that can be checked without I/O (also what
    `make install-*` asks with --check-config), then the role-specific defaults filled in
    (config.from_args reads them). Which agent: "inside" or "outside"."""
    inside = _check_roles(a)
    _check_metrics(a)
    _check_numbers(a)
    _check_key(a)
    _check_name(a)
    _check_wireguard_keys(a, inside)
    fill_defaults(a)
    return "inside" if inside else "outside"


def _check_roles(a: argparse.Namespace) -> bool:
    """Which agent the options ask for (True: the inside one), and no option of the other."""
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
        if a.client_address not in (None, "off") and a.legacy:
            raise UsageError("--client-address: the C tool's protocol (--legacy) does not name the clients")
        for opt, value in (("--state-file", a.state_file), ("--max-clients-per-source", a.max_clients_per_source)):
            if value is not None:
                raise UsageError(f"{opt} is for the outside agent (-l), not the inside agent")
    else:
        parse_listen(a.listen)
        for opt, value in (("--timeout", a.timeout), ("--spares", a.spares), ("--client-address", a.client_address)):
            if value is not None:
                raise UsageError(f"{opt} is for the inside agent (-s/-o), not the outside agent")
        if a.max_clock_skew is not None and not a.legacy:
            raise UsageError("--max-clock-skew only applies with --legacy")
    return inside


def _check_metrics(a: argparse.Namespace) -> None:
    if a.metrics:
        split_hostport(a.metrics, "--metrics")


def _check_numbers(a: argparse.Namespace) -> None:
    """The intervals and limits given, each in its range (those not given get defaults later)."""
    if not 0.1 <= a.keepalive <= config.MAX_KEEPALIVE:
        raise UsageError(f"-t: the keepalive interval must be between 0.1 and {config.MAX_KEEPALIVE} seconds")
    if a.timeout is not None and a.timeout < a.keepalive:
        raise UsageError("--timeout must not be shorter than the keepalive interval")
    if a.spares is not None and not 1 <= a.spares <= 64:
        raise UsageError("--spares must be between 1 and 64")
    if not 1 <= a.max_clients <= config.MAX_CLIENTS:
        raise UsageError(f"--max-clients must be between 1 and {config.MAX_CLIENTS}")
    if a.max_clients_per_source is not None and not 1 <= a.max_clients_per_source <= a.max_clients:
        raise UsageError("--max-clients-per-source must be between 1 and --max-clients")
    if a.max_clock_skew is not None and a.max_clock_skew < 0:
        raise UsageError("--max-clock-skew must not be negative")


def _check_key(a: argparse.Namespace) -> None:
    """One key, from one place (-k, --key-file or UDP_TUNNEL_KEY), or --insecure-no-key."""
    if a.key is not None and a.key_file is not None:
        raise UsageError("give the key once: -k or --key-file, not both")
    if a.key == "":
        raise UsageError("-k: the key is empty")
    has_key = a.key is not None or a.key_file is not None or bool(os.environb.get(b"UDP_TUNNEL_KEY"))
    if a.insecure_no_key and has_key:
        raise UsageError("--insecure-no-key, yet a key is given (-k, --key-file or UDP_TUNNEL_KEY): drop one")
    if not has_key and not a.insecure_no_key:
        raise UsageError(NO_KEY)


def _check_name(a: argparse.Namespace) -> None:
    if a.name is not None and not config.NAME.fullmatch(a.name):
        raise UsageError(f"--name: {a.name!r} is not a name (letters, digits, '.', '_', '-'; at most 64)")


def _check_wireguard_keys(a: argparse.Namespace, inside: bool) -> None:
    """--wireguard-key (outside only), parsed into a.wireguard_keys."""
    if a.wireguard_key is None:
        return
    if inside:
        raise UsageError("--wireguard-key is for the outside agent (-l)")
    from udp_tunnel.core.wireguard import parse_keys
    try:
        a.wireguard_keys = parse_keys(",".join(a.wireguard_key))
    except ValueError as e:
        raise UsageError(f"--wireguard-key: {e}") from None


def fill_defaults(a: argparse.Namespace) -> None:
    """The defaults of the options that depend on others (a checked command line)."""
    if a.timeout is None:
        a.timeout = max(60.0, a.keepalive)
    if a.spares is None:
        a.spares = 2
    if a.max_clients_per_source is None:
        a.max_clients_per_source = config.default_per_source(a.max_clients)
    if a.max_clock_skew is None:
        a.max_clock_skew = 120.0


def status_main(argv: list[str]) -> int:
    """udp-tunnel status [NAME] [--control PATH] [--json]"""
    from udp_tunnel.ops import status

    p = Parser(prog="udp-tunnel status", description="Show running agents and their tunnels.")
    p.add_argument("name", metavar="NAME", nargs="?", help="only the agent of this name")
    p.add_argument("--control", metavar="PATH", help="only the agent serving this control socket")
    p.add_argument("--json", action="store_true", help="print the raw JSON document")
    try:
        a = p.parse_args(argv)
        if a.name and a.control:
            raise UsageError("give NAME or --control PATH, not both")
    except UsageError as e:
        e.see = "udp-tunnel status --help"
        raise
    return status.show(name=a.name, control=a.control, as_json=a.json)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["demo"]:
            from udp_tunnel.demo import demo
            return demo(argv[1:])
        if argv[:1] == ["status"]:
            return status_main(argv[1:])
        return run(build_parser().parse_args(join_negative(argv)))
    except ResolveError as e:
        print(f"udp-tunnel: {e}", file=sys.stderr)
        return 1
    except config.ConfigError as e:
        print(f"udp-tunnel: {e}", file=sys.stderr)
        return e.status
    except UsageError as e:
        print(f"udp-tunnel: {e} (see {e.see})", file=sys.stderr)
        return 2
    except AddrError as e:
        print(f"udp-tunnel: {e} (see udp-tunnel --help)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the output went to a pipe that closed (udp-tunnel demo | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


CONFIG_ONLY = {"config", "check_config", "print_install_facts"}


def config_command(a: argparse.Namespace) -> int:
    """--config PATH [--check-config]: the settings come from the file, none from the command line."""
    parser = build_parser()
    for action in parser._actions:
        if action.dest in CONFIG_ONLY or action.default == argparse.SUPPRESS:
            continue
        if getattr(a, action.dest, None) != action.default:
            raise UsageError(f"--config: {action.option_strings[0]} goes in the file, not on the command line "
                             "(with --config, only --check-config)")
    if len(a.config) > 2 or (len(a.config) == 2 and not a.check_config):
        raise UsageError("--config: give one file (two only with --check-config: an outside agent's and an "
                         "inside agent's, checked against each other)")
    cfgs = [config.load(path) for path in a.config]
    if len(cfgs) == 2:
        roles = {c.role: c for c in cfgs}
        if len(roles) != 2:
            raise UsageError(f"--config twice: one outside agent's file and one inside agent's, not two "
                             f"{cfgs[0].role} files")
        config.check_pair(roles["outside"], roles["inside"])
    if a.print_install_facts:
        for name, value in config.install_facts(cfgs[0]):
            print(f"{name}={value}")
    if a.check_config:
        return 0
    return run_config(cfgs[0])


def run_config(cfg: config.Config) -> int:
    """Run an agent from its configuration (a file's, or the command line's)."""
    from udp_tunnel import agent
    try:
        return agent.run(cfg)
    except agent.StartError as e:  # one line, as every error a user can cause
        print(f"udp-tunnel: {e}", file=sys.stderr)
        return 1


def run(a: argparse.Namespace) -> int:
    if a.config is not None:
        return config_command(a)
    if a.print_install_facts:
        raise UsageError("--print-install-facts goes with --config")
    check(a)
    cfg = config.from_args(a)  # the same model as a file's
    if a.check_config:
        return 0
    return run_config(cfg)
