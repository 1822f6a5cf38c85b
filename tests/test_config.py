"""The configuration file (issue 21): its model, its checks and their one-line errors, the
examples, and the command line as a configuration of one service."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents import ROOT, command, env
from udp_tunnel import cli, config
from udp_tunnel.config import (
    InsideConfig,
    InsideService,
    Key,
    Listen,
    OutsideConfig,
    OutsideService,
    PortRange,
    Target,
)

EXAMPLES = os.path.join(ROOT, "examples")
WG = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="

OUTSIDE = """\
[outside]
listen = "9999"

[keys.home]
file = "home.key"

[services.wireguard]
listen = "51820"
key = "home"

[services.game]
listen = "27015-27020"
key = "home"
"""

INSIDE = """\
[inside]
outside = "vps.example.com:9999"
key_file = "home.key"

[services.wireguard]
service = "localhost:51820"

[services.game]
service = "127.0.0.1:27015-27020"
"""


def main(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


def write(tmp_path, text: str | bytes, name: str = "agent.toml") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# --- the examples ---

@pytest.mark.parametrize("args", [["outside.toml"], ["inside.toml"], ["outside.toml", "inside.toml"]])
def test_the_example_files_pass_check_config(args):
    configs = [a for name in args for a in ("--config", os.path.join(EXAMPLES, name))]
    r = subprocess.run(command("--check-config", *configs), env=env(), capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


def test_the_outside_example_reads_into_its_model():
    c = config.load(os.path.join(EXAMPLES, "outside.toml"))
    assert isinstance(c, OutsideConfig) and c.role == "outside"
    assert (c.listen, c.keepalive, c.metrics, c.family, c.verbose, c.quiet) == (
        Listen(None, PortRange(9999, 9999)), 25.0, ("127.0.0.1", 9100), None, False, False)
    assert c.keys == (Key("home", file=os.path.join(EXAMPLES, "home.key"), max_clients=1000),
                      Key("friend", file=os.path.join(EXAMPLES, "friend.key"), max_clients=100))
    assert c.services == (
        OutsideService("wireguard", Listen(None, PortRange(51820, 51820)), "home", max_clients=100,
                       max_clients_per_source=16, wireguard_keys=(bytes.fromhex(
                           "c53201039adba14be71f886da1d8dbe9eebded08cb111b75340078999aa9f038"),)),
        OutsideService("game", Listen(None, PortRange(27015, 27020)), "home", max_clients=1000,
                       max_clients_per_source=250),
        OutsideService("dns", Listen(None, PortRange(53, 53)), "friend", max_clients=100, max_clients_per_source=25))
    assert c.service("game").listen.ports.size == 6 and 27017 in c.service("game").listen.ports
    assert c.services[0].where == f"{EXAMPLES}/outside.toml:53"  # where [services.wireguard] is


def test_the_inside_example_reads_into_its_model():
    c = config.load(os.path.join(EXAMPLES, "inside.toml"))
    assert isinstance(c, InsideConfig) and c.role == "inside"
    assert (c.outside, c.keepalive, c.spares, c.max_clients) == (
        Target("vps.example.com", PortRange(9999, 9999)), 25.0, 2, 1000)
    assert c.key == Key("default", file=os.path.join(EXAMPLES, "home.key"))
    assert c.services == (
        InsideService("wireguard", Target("localhost", PortRange(51820, 51820)), timeout=180.0, max_clients=1000),
        InsideService("game", Target("127.0.0.1", PortRange(27015, 27020)), timeout=60.0, max_clients=64))


def test_a_configuration_is_immutable_and_equal_to_the_same_one_from_another_place(tmp_path):
    a = config.parse(OUTSIDE.encode(), str(tmp_path / "a.toml"))
    b = config.parse(("# moved down a line\n" + OUTSIDE).encode(), str(tmp_path / "b.toml"))
    assert a.services == b.services and a.keys == b.keys  # where they are is not part of what they are
    assert a.services[0].where != b.services[0].where
    with pytest.raises(AttributeError):
        a.services[0].listen = None


# --- the command line is a configuration of one service named "default" ---

def args(*argv: str):
    a = cli.build_parser().parse_args(cli.join_negative(list(argv)))
    cli.check(a)
    return a


def test_an_outside_command_line_is_one_service_on_the_tunnel_port(monkeypatch):
    monkeypatch.delenv("UDP_TUNNEL_KEY", raising=False)
    c = config.from_args(args("-l", "203.0.113.5:9999", "-t", "10", "--key-file", "/k", "--max-clients", "40",
                              "--wireguard-key", WG, "--name", "relay", "--metrics", "127.0.0.1:9100", "-4"))
    listen = Listen("203.0.113.5", PortRange(9999, 9999))
    assert c == OutsideConfig(
        source="command line", listen=listen, keepalive=10.0,
        keys=(Key("default", file="/k", origin="key file", max_clients=40),),
        services=(OutsideService("default", listen, "default", max_clients=40, max_clients_per_source=16,
                                 wireguard_keys=(c.services[0].wireguard_keys[0],)),),
        name="relay", metrics=("127.0.0.1", 9100), family=socket.AF_INET)
    assert len(c.services[0].wireguard_keys[0]) == 32


def test_an_inside_command_line_is_one_service_and_its_key_comes_from_where_the_agent_takes_it(monkeypatch):
    monkeypatch.setenv("UDP_TUNNEL_KEY", "from the environment")
    c = config.from_args(args("-s", "localhost:51820", "-o", "vps.example.com:9999", "--spares", "3", "--legacy"))
    assert c == InsideConfig(
        source="command line", outside=Target("vps.example.com", PortRange(9999, 9999)),
        key=Key("default", value=b"from the environment", origin="UDP_TUNNEL_KEY"), keepalive=25.0, spares=3,
        max_clients=1000, services=(InsideService("default", Target("localhost", PortRange(51820, 51820)),
                                                  timeout=60.0, max_clients=1000, legacy=True),))
    assert config.read_key(c.key) == b"from the environment"
    c = config.from_args(args("-s", "h:1", "-o", "h:2", "-k", "on the line"))
    assert (c.key.value, c.key.origin) == (b"on the line", "command line")


def test_read_key_reads_a_key_file_as_the_agents_do_and_says_what_is_wrong_in_one_line(tmp_path):
    (tmp_path / "k").write_bytes(b"secret\r\n")
    assert config.read_key(Key("home", file=str(tmp_path / "k"))) == b"secret"
    (tmp_path / "empty").write_bytes(b"\n")
    for name, message in (("missing", "cannot read key file {}: No such file or directory"),
                          ("empty", "key file {} is empty")):
        with pytest.raises(config.ConfigError) as e:
            config.read_key(Key("home", file=str(tmp_path / name)))
        assert str(e.value) == message.format(tmp_path / name) and e.value.status == 1
    assert config.read_key(Key("default", origin="")) == b""  # --insecure-no-key


def test_check_config_of_a_command_line_is_as_it_was(capsys):
    assert main(capsys, "--check-config", "-l", "9999", "-k", "x") == (0, "", "")
    assert main(capsys, "--check-config", "-l", "70000", "-k", "x") == (
        2, "", "udp-tunnel: --listen: bad port '70000' (1-65535) (see udp-tunnel --help)\n")


# --- files that are wrong: one line, the file, the line, the problem ---

def edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


BAD = [
    # unknown settings and tables
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\nkeepalve = 25\n'), 3,
     "outside.keepalve: unknown setting 'keepalve' in [outside] (did you mean 'keepalive'?)"),
    (edit(OUTSIDE, 'listen = "27015-27020"\n', 'listen = "27015-27020"\nport = 1\n'), 13,
     "services.game.port: unknown setting 'port' in [services.game] (known: listen, key, max_clients, "
     "max_clients_per_source, wireguard_key, legacy, max_clock_skew)"),
    ("[outsde]\nlisten = \"9\"\n", 1, "outsde: unknown table or setting 'outsde' (did you mean 'outside'?)"),
    (OUTSIDE + "[inside]\noutside = \"h:1\"\n", 14,
     "inside: say which agent this file is for: an [outside] table or an [inside] table (one of them)"),
    ("# nothing\n", 1, "say which agent this file is for: an [outside] table or an [inside] table (one of them)"),
    # overlapping ports
    (edit(OUTSIDE, 'listen = "51820"', 'listen = "27000-27015"'), 12,
     None),  # checked below: the game range overlaps it
    (edit(OUTSIDE, 'listen = "51820"', 'listen = "9990-10000"'), 8,
     "services.wireguard.listen: 9990-10000 overlaps the tunnel port 9999 ([outside] listen): a service on the "
     "tunnel port listens on that port alone, with the same address"),
    (edit(OUTSIDE, 'listen = "51820"', 'listen = "127.0.0.1:9999"'), 8,
     "services.wireguard.listen: 127.0.0.1:9999 overlaps the tunnel port 9999 ([outside] listen): a service on "
     "the tunnel port listens on that port alone, with the same address"),
    # a name twice: TOML refuses it, said well
    (OUTSIDE + '\n[services.game]\nlisten = "5000"\n', 15,
     "[services.game] is declared twice: each table (each service, each key) only once, with a name of its own"),
    (edit(OUTSIDE, 'key = "home"\n', 'key = "home"\nkey = "home"\n'), 10,
     "a setting is given twice (or a table names a setting already given)"),
    # not TOML
    (edit(OUTSIDE, 'listen = "51820"', 'listen = 51820"'), 8, "not TOML: expected newline or end of document "
                                                               "after a statement (column 15)"),
    # ports
    (edit(OUTSIDE, 'listen = "51820"', 'listen = "70000"'), 8, "services.wireguard.listen: bad port '70000' (1-65535)"),
    (edit(OUTSIDE, 'listen = "51820"', 'listen = 0'), 8, "services.wireguard.listen: bad port '0' (1-65535)"),
    (edit(OUTSIDE, '"27015-27020"', '"27020-27015"'), 12, "services.game.listen: the range 27020-27015 ends before "
                                                          "it starts"),
    (edit(OUTSIDE, '"27015-27020"', '"20000-30000"'), 12, "services.game.listen: the range 20000-30000 has 10001 "
                                                          "ports, more than 1024"),
    (edit(OUTSIDE, 'listen = "9999"', 'listen = "9999-10000"'), 2, "outside.listen: one port, not a range "
                                                                   "(9999-10000)"),
    (edit(OUTSIDE, 'listen = "9999"', 'listen = "vps example:9999"'), 2,
     "outside.listen: bad host name 'vps example'"),
    (edit(OUTSIDE, 'listen = "9999"', 'listen = "2001:db8::1:9999"'), 2,
     "outside.listen: put an IPv6 address in brackets, as in [2001:db8::1]:9999"),
    # keys
    (edit(OUTSIDE, 'file = "home.key"\n', ''), 4,
     "keys.home: give the key's file = \"PATH\" (or insecure_no_key = true, without a file)"),
    (edit(OUTSIDE, 'key = "home"\n', 'key = "hmoe"\n'), 9,
     "services.wireguard.key: no key named 'hmoe': add [keys.hmoe] with its file (keys: home)"),
    (OUTSIDE.replace('[services', '[keys.friend]\nfile = "./home.key"\n\n[services', 1), 8,
     None),  # the same file for two keys: checked below
    (edit(OUTSIDE, '[services.wireguard]', '[keys.friend]\nfile = "f.key"\n\n[services.wireguard]')
     .replace('key = "home"\n', '', 1), 10,
     "services.wireguard: key = \"NAME\" is missing: which inside agent's key carries it (home, friend)"),
    # limits
    (edit(OUTSIDE, 'file = "home.key"\n', 'file = "home.key"\nmax_clients = 10\n')
     .replace('key = "home"\n', 'key = "home"\nmax_clients_per_source = 11\n', 1), 11,
     "services.wireguard.max_clients_per_source: must be between 1 and 10 (its max_clients)"),
    (edit(OUTSIDE, 'file = "home.key"\n', 'file = "home.key"\nmax_clients = 10\n')
     .replace('listen = "51820"\n', 'listen = "51820"\nmax_clients = 11\n'), 10,
     "services.wireguard.max_clients: must be between 1 and 10 (key 'home' allows 10)"),
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\nkeepalive = 0\n'), 3,
     "outside.keepalive: the keepalive interval must be between 0.1 and 3600 seconds"),
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\nkeepalive = "25"\n'), 3,
     "outside.keepalive: must be a number of seconds, not a string"),
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\nkeepalive = nan\n'), 3,
     "outside.keepalive: must be a number of seconds, not a number"),
    (edit(OUTSIDE, 'file = "home.key"\n', 'file = "home.key"\nmax_clients = true\n'), 6,
     "keys.home.max_clients: must be a whole number, not true/false"),
    # WireGuard, legacy
    (edit(OUTSIDE, 'key = "home"\n', 'key = "home"\nwireguard_key = ["' + WG + '",\n  "not-a-key"]\n'), 10,
     "services.wireguard.wireguard_key: 'not-a-key' is not a WireGuard public key (32 bytes in base64, as "
     "'wg show INTERFACE public-key' prints it)"),
    (edit(OUTSIDE, 'key = "home"\n', 'key = "home"\nlegacy = true\n'), 10,
     "services.wireguard.legacy: a legacy service must be the only one, on the tunnel port (9999): legacy "
     "tunnels carry no service name"),
    (edit(OUTSIDE, 'key = "home"\n', 'key = "home"\nmax_clock_skew = 5\n'), 10,
     "services.wireguard.max_clock_skew: only applies with legacy = true"),
    # names and shapes
    (edit(OUTSIDE, '[services.game]', '[services."game server"]'), 11,
     "services.game server: 'game server' is not a service name (letters, digits, '_', '-'; at most 32)"),
    (edit(OUTSIDE, '[services.game]\nlisten = "27015-27020"\n', '[services.game]\n'), 11,
     "services.game: listen = \"PORT\" (or \"FIRST-LAST\", a range) is missing: where this service's clients "
     "send"),
    ("[outside]\nlisten = \"9\"\n[keys.a]\nfile = \"k\"\n", 1,
     "services: no service: add a [services.NAME] table with listen = \"PORT\" and key = \"NAME\""),
    ("services = 3\n[outside]\nlisten = \"9\"\n[keys.a]\nfile = \"k\"\n", 1,
     "services: must be a table ([services]), not a whole number"),
    # the data path
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\ndatapath = "ebpf"\n'), 3,
     "outside.datapath: must be one of 'auto', 'kernel', 'user', not 'ebpf'"),
    (edit(INSIDE, 'key_file = "home.key"\n', 'key_file = "home.key"\ndatapath = true\n'), 4,
     "inside.datapath: must be a string (in quotes), not true/false"),
    (edit(OUTSIDE, 'key = "home"\n', 'key = "home"\ndatapath = "user"\n', ), 10,
     "services.wireguard.datapath: unknown setting 'datapath' in [services.wireguard] (known: listen, key, "
     "max_clients, max_clients_per_source, wireguard_key, legacy, max_clock_skew)"),
    # the inside
    (edit(INSIDE, 'service = "localhost:51820"\n', 'service = "localhost:51820"\nclient_address = "proxy"\n'), 7,
     "services.wireguard.client_address: must be one of 'off', 'transparent', 'proxy-v2', 'proxy-v2-first', "
     "not 'proxy'"),
    (edit(INSIDE, '[inside]\n', '[inside]\nkeepalive = 30\ntimeout = 20\n'), 3,
     "inside.timeout: the timeout (at least the keepalive interval) must be between 30 and 604800 seconds"),
    (edit(INSIDE, 'key_file = "home.key"\n', ''), 1,
     "inside: give key_file = \"PATH\" (the same key as the outside's for this agent; or insecure_no_key = true, "
     "without a key file)"),
    (edit(INSIDE, '"localhost:51820"', '"localhost"'), 6,
     "services.wireguard.service: expected HOST:PORT, got 'localhost'"),
    (edit(INSIDE, '"127.0.0.1:27015-27020"', '"127.0.0.1:27015-27020\\u001b[2J"'), 9,
     "services.game.service: must not hold control characters"),
    (INSIDE + '[keys.home]\nfile = "k"\n', 10,
     "keys: [keys] is for the outside agent: the inside agent has one key_file in [inside]"),
    (edit(INSIDE, 'outside = "vps.example.com:9999"', 'outside = "vps.example.com:9999-10000"'), 2,
     "inside.outside: one port, not a range (vps.example.com:9999-10000)"),
    (edit(INSIDE, '[services.wireguard]\n', '[services.wireguard]\nlegacy = true\n'), 6,
     "services.wireguard.legacy: a legacy service must be the only one, and one port: legacy tunnels carry no "
     "service name"),
]


@pytest.mark.parametrize("text, line, problem", BAD)
def test_a_bad_file_is_one_line_naming_the_file_the_line_and_the_problem_and_exit_2(tmp_path, capsys, text, line,
                                                                                      problem):
    path = write(tmp_path, text)
    code, out, err = main(capsys, "--check-config", "--config", path)
    assert (code, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith(f"udp-tunnel: {path}:{line}: "), err
    if problem is not None:
        assert err == f"udp-tunnel: {path}:{line}: {problem}\n"


def test_overlapping_ranges_and_a_shared_key_file_name_the_other_service_and_its_line(tmp_path, capsys):
    path = write(tmp_path, edit(OUTSIDE, 'listen = "51820"', 'listen = "27000-27015"'))
    assert main(capsys, "--check-config", "--config", path)[2] == (
        f"udp-tunnel: {path}:12: services.game.listen: 27015-27020 overlaps service 'wireguard' (27000-27015, "
        "line 8)\n")
    path = write(tmp_path, OUTSIDE.replace('[services', '[keys.friend]\nfile = "./home.key"\n\n[services', 1))
    assert main(capsys, "--check-config", "--config", path)[2] == (
        f"udp-tunnel: {path}:8: keys.friend.file: the same file as keys.home ({path}:4): each inside agent needs a "
        "key of its own\n")


def test_listen_addresses_on_different_hosts_do_not_overlap(tmp_path, capsys):
    text = edit(OUTSIDE, 'listen = "51820"', 'listen = "192.0.2.1:27015"')
    text = edit(text, 'listen = "27015-27020"', 'listen = "192.0.2.2:27015-27020"')
    assert main(capsys, "--check-config", "--config", write(tmp_path, text)) == (0, "", "")
    text = edit(text, '"192.0.2.2:27015-27020"', '"27015-27020"')  # every address: that includes 192.0.2.1
    assert "overlaps service 'wireguard'" in main(capsys, "--check-config", "--config", write(tmp_path, text))[2]


def test_a_file_that_is_not_utf8_names_its_line(tmp_path, capsys):
    path = write(tmp_path, OUTSIDE.encode().replace(b'"game"', b'"g\xe9me"').replace(b"[services.game]",
                                                                                    b"# caf\xe9\n[services.game]"))
    assert main(capsys, "--check-config", "--config", path) == (
        2, "", f"udp-tunnel: {path}:11: not UTF-8 text (byte 0xe9 at column 6): save the file as UTF-8\n")


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a=" * 2000 + "1" + "}" * 2000])
def test_values_nested_too_deep_are_one_line_not_a_traceback(tmp_path, capsys, value):
    path = write(tmp_path, f"[outside]\nlisten = \"9\"\nx = {value}\n")
    assert main(capsys, "--check-config", "--config", path) == (
        2, "", f"udp-tunnel: {path}:3: lists or tables nested too deep\n")


def test_lines_are_found_past_multi_line_strings_arrays_and_inline_tables(tmp_path, capsys):
    text = edit(OUTSIDE, 'key = "home"\n', 'key = "home"\nwireguard_key = [\n  "' + WG + '",  # first\n'
                '  # a comment ] with a bracket\n]\n')
    text = edit(text, '[outside]\n', '[outside]\ncontrol = """/run/udp\\\n= not a key \\\n"""\n')
    text = edit(text, 'listen = "27015-27020"\n', 'listen = "27015-27020"\n"max_clients" = 1_000\nbogus = {a = 1}\n')
    path = write(tmp_path, text)
    assert main(capsys, "--check-config", "--config", path)[2] == (
        f"udp-tunnel: {path}:21: services.game.bogus: unknown setting 'bogus' in [services.game] (known: listen, "
        "key, max_clients, max_clients_per_source, wireguard_key, legacy, max_clock_skew)\n")


def test_a_range_whose_size_differs_between_the_two_ends_is_found_with_both_files(tmp_path, capsys):
    outside = write(tmp_path, OUTSIDE, "outside.toml")
    inside = write(tmp_path, edit(INSIDE, "27015-27020", "27015-27019"), "inside.toml")
    assert main(capsys, "--check-config", "--config", inside) == (0, "", "")  # alone it cannot be known
    assert main(capsys, "--check-config", "--config", outside, "--config", inside) == (
        2, "", f"udp-tunnel: {inside}:8: services.game.service: 5 port(s) (27015-27019) here, 6 at the outside "
               f"agent (27015-27020, {outside}:11): a range maps port by port, so both must be of one size\n")
    inside = write(tmp_path, INSIDE.replace("[services.game]", "[services.gmae]"), "inside.toml")
    assert main(capsys, "--check-config", "--config", inside, "--config", outside) == (
        2, "", f"udp-tunnel: {inside}:8: services.gmae: the outside agent ({outside}) has no service of this name "
               "(it has: wireguard, game)\n")


def test_config_errors_of_the_command_line_are_one_line(tmp_path, capsys):
    path = write(tmp_path, OUTSIDE)
    assert main(capsys, "--config", str(tmp_path / "nope.toml")) == (
        1, "", f"udp-tunnel: {tmp_path}/nope.toml: cannot read the configuration file: No such file or directory\n")
    assert main(capsys, "--config", path, "-l", "9999") == (
        2, "", "udp-tunnel: --config: -l goes in the file, not on the command line (with --config, only "
               "--check-config) (see udp-tunnel --help)\n")
    assert main(capsys, "--check-config", "--config", path, "--config", path) == (
        2, "", "udp-tunnel: --config twice: one outside agent's file and one inside agent's, not two outside files "
               "(see udp-tunnel --help)\n")
    assert main(capsys, "--config", path, "--config", path) == (
        2, "", "udp-tunnel: --config: give one file (two only with --check-config: an outside agent's and an inside "
               "agent's, checked against each other) (see udp-tunnel --help)\n")
    assert main(capsys, "--config", path) == (  # (its key files are read when the agent starts)
        1, "", f"udp-tunnel: cannot read key file {tmp_path}/home.key: No such file or directory\n")


def test_install_facts_say_the_role_key_files_descriptors_and_capability(capsys):
    code, out, err = main(capsys, "--check-config", "--print-install-facts", "--config",
                          os.path.join(EXAMPLES, "outside.toml"))
    assert (code, err) == (0, "")
    assert out == ("role=outside\nkey_file=home.key\nkey_file=friend.key\nnofile=2272\n"
                   "caps=CAP_NET_BIND_SERVICE\ndatapath=user\nnetlink=no\n"
                   "description=relay on 9999: wireguard, game, dns\n")
    code, out, err = main(capsys, "--check-config", "--print-install-facts", "--config",
                          os.path.join(EXAMPLES, "inside.toml"))
    assert out == ("role=inside\nkey_file=home.key\nnofile=2068\ncaps=\ndatapath=user\nnetlink=no\n"
                   "description=wireguard, game via vps.example.com:9999\n")


@pytest.mark.parametrize("text, caps, datapath", [
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\ndatapath = "kernel"\n'), "CAP_BPF CAP_NET_ADMIN", "kernel"),
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\ndatapath = "auto"\n'), "", "user"),
    (edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\ndatapath = "kernel"\n').replace('"51820"', '"53"'),
     "CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN", "kernel"),
    (edit(INSIDE, 'key_file = "home.key"\n', 'key_file = "home.key"\ndatapath = "kernel"\n'),
     "CAP_BPF CAP_NET_ADMIN", "kernel"),
    (edit(INSIDE, '"localhost:51820"\n', '"localhost:51820"\nclient_address = "transparent"\n'),
     "CAP_NET_ADMIN CAP_NET_RAW", "user"),
    (edit(INSIDE, '"localhost:51820"\n', '"localhost:51820"\nclient_address = "transparent"\n')
     .replace('key_file = "home.key"\n', 'key_file = "home.key"\ndatapath = "kernel"\n'),
     "CAP_BPF CAP_NET_ADMIN CAP_NET_RAW", "kernel"),
])
def test_install_facts_give_the_kernel_path_and_transparent_mode_their_capabilities_only_when_on(
        tmp_path, capsys, text, caps, datapath):
    code, out, err = main(capsys, "--check-config", "--print-install-facts", "--config", write(tmp_path, text))
    facts = dict(line.split("=", 1) for line in out.splitlines() if not line.startswith("key_file="))
    assert (code, err) == (0, "")
    assert (facts["caps"], facts["datapath"], facts["netlink"]) == (caps, datapath,
                                                                   "yes" if "CAP_NET_ADMIN" in caps else "no")


def test_the_data_path_comes_from_the_file_or_the_command_line_and_is_auto_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("UDP_TUNNEL_KEY", raising=False)
    assert config.parse(OUTSIDE.encode(), "o.toml").datapath == "auto"
    assert config.parse(INSIDE.encode(), "i.toml").datapath == "auto"
    for mode in ("auto", "kernel", "user"):
        o = config.parse(edit(OUTSIDE, 'listen = "9999"\n', f'listen = "9999"\ndatapath = "{mode}"\n').encode(),
                         "o.toml")
        i = config.parse(edit(INSIDE, '[inside]\n', f'[inside]\ndatapath = "{mode}"\n').encode(), "i.toml")
        assert (o.datapath, i.datapath) == (mode, mode)
        assert config.from_args(args("-l", "9999", "-k", "x", "--datapath", mode)).datapath == mode
        assert config.from_args(args("-s", "h:1", "-o", "h:2", "-k", "x", "--datapath", mode)).datapath == mode
    assert config.from_args(args("-l", "9999", "-k", "x")).datapath == "auto"
    a = config.parse(OUTSIDE.encode(), "o.toml")
    b = config.parse(edit(OUTSIDE, 'listen = "9999"\n', 'listen = "9999"\ndatapath = "user"\n').encode(), "o.toml")
    assert config.changes(a, b).settings == ("datapath",)  # (a reload says it changes at the next start)


def test_a_bad_datapath_on_the_command_line_is_one_line(capsys):
    code, out, err = main(capsys, "--check-config", "-l", "9999", "-k", "x", "--datapath", "ebpf")
    assert (code, out) == (2, "")
    assert err == ("udp-tunnel: argument --datapath: invalid choice: 'ebpf' (choose from 'auto', 'kernel', 'user') "
                   "(see udp-tunnel --help)\n")


def test_the_readme_s_config_examples_pass_check_config_alone_and_together(tmp_path, capsys):
    readme = open(os.path.join(ROOT, "README.md")).read()
    start = readme.index("## Config file")
    section = readme[start:readme.index("\n## ", start + 1)]
    blocks = [b.split("```", 1)[0] for b in section.split("```toml\n")[1:]]
    assert len(blocks) == 2 and "[outside]" in blocks[0] and "[inside]" in blocks[1]
    outside, inside = write(tmp_path, blocks[0], "outside.toml"), write(tmp_path, blocks[1], "inside.toml")
    assert main(capsys, "--check-config", "--config", outside, "--config", inside) == (0, "", "")
    wrong = write(tmp_path, blocks[0].replace('listen = "51820"', 'listen = "27000-27015"'), "wrong.toml")
    line = next(x for x in section.splitlines() if x.startswith("udp-tunnel: /etc/udp-tunnel/outside.toml:"))
    assert main(capsys, "--check-config", "--config", wrong) == (
        2, "", line.replace("/etc/udp-tunnel/outside.toml", wrong) + "\n")  # the error the README shows


EXAMPLE_BYTES = [open(os.path.join(EXAMPLES, f), "rb").read() for f in ("outside.toml", "inside.toml")]


@settings(max_examples=400, derandomize=True, deadline=None)
@given(which=st.sampled_from([0, 1]), edits=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 40),
              st.binary(max_size=6) | st.sampled_from([b"[", b"]", b"{", b'"', b"'''", b"=", b"\n", b"-", b"\xff"])),
    min_size=1, max_size=5))
def test_any_mangled_file_is_a_configuration_or_one_line_naming_the_file_never_a_traceback(which, edits):
    text = bytearray(EXAMPLE_BYTES[which])
    for where, cut, insert in edits:  # cut some bytes somewhere and put others in their place
        i = int(where * len(text))
        text[i:i + cut] = insert
    try:
        c = config.parse(bytes(text), "mangled.toml")
    except config.ConfigError as e:
        assert str(e).startswith("mangled.toml") and "\n" not in str(e) and e.status == 2
    else:
        assert c.role in ("outside", "inside") and c.services


def test_changes_say_which_services_keys_and_settings_a_reload_adds_removes_or_changes(tmp_path):
    old = config.parse(OUTSIDE.encode(), str(tmp_path / "a.toml"))
    assert not config.changes(old, config.parse(("# a comment moves it all\n" + OUTSIDE).encode(),
                                                str(tmp_path / "b.toml")))
    text = edit(OUTSIDE, '[services.wireguard]\nlisten = "51820"\nkey = "home"\n\n', "")  # removed
    text = edit(text, 'listen = "27015-27020"', 'listen = "27015-27021"')  # changed
    text = edit(text, 'listen = "9999"\n', 'listen = "9999"\nkeepalive = 20\n')
    text = edit(text, 'file = "home.key"\n', 'file = "home.key"\nmax_clients = 50\n')
    text += '\n[services.dns]\nlisten = "53"\n'  # added
    assert config.changes(old, config.parse(text.encode(), str(tmp_path / "a.toml"))) == config.Changes(
        added=("dns",), removed=("wireguard",), changed=("game",), keys=("home",), settings=("keepalive",))
    inside = config.parse(INSIDE.encode(), "i.toml")
    with pytest.raises(ValueError, match="a reload cannot turn an outside agent into an inside agent"):
        config.changes(old, inside)
    moved = config.parse(edit(INSIDE, 'key_file = "home.key"', 'key_file = "other.key"').encode(), "i.toml")
    assert config.changes(inside, moved) == config.Changes(keys=("default",))
