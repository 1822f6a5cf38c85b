"""The command line, the built executable and what an operator sees."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from agents import ROOT, command, converse, env, free_port, kernel_why_not, without_capabilities
from udp_tunnel import __version__
from udp_tunnel.wire import proto


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("UDP_TUNNEL_KEY", "test-key")
    return subprocess.run(command(*args), env=env(**kw), capture_output=True, text=True, timeout=30)


INSIDE = ["-s", "127.0.0.1:1", "-o", "127.0.0.1:2"]


@pytest.mark.parametrize("args, needle", [
    ([], "say which agent to run"),
    (["-l", "9999", "-s", "a:1", "-o", "b:2"], "cannot be combined"),
    (["-s", "127.0.0.1:1"], "needs both"),
    (["-s", "2001:db8::1:5", "-o", "127.0.0.1:1"], "brackets"),
    (["-s", "127.0.0.1:0", "-o", "127.0.0.1:1"], "bad port"),
    (["-l", "0"], "--listen: bad port '0' (1-65535)"),
    (["-l", "127.0.0.1:0"], "--listen: bad port '0' (1-65535)"),
    (["-l", "70000"], "bad port"),
    (["-l", "9", "-t", "0"], "keepalive"),
    (["-l", "9", "-k", "a", "--key-file", "/x"], "not both"),
    (["-l", "9", "--max-clients", "0"], "max-clients"),
    (["--bogus"], "unrecognized"),
    (["-l", "9", "-t", "x"], "expected a number"),
    (["-l", "9", "-t", "nan"], "expected a number"),
    (["-l", "9", "-t", "inf"], "expected a number"),
    (["-l", "9", "-t", "-5"], "must be between 0.1 and 3600"),
    (["-l", "9", "--keepalive", "-0.5"], "must be between 0.1 and 3600"),
    (["-l", "9", "-t", "3601"], "must be between 0.1 and 3600"),
    ([*INSIDE, "--timeout", "nan"], "expected a number"),
    ([*INSIDE, "--timeout", "inf"], "expected a number"),
    ([*INSIDE, "--timeout", "-1"], "shorter than the keepalive"),
    ([*INSIDE, "--spares", "²"], "expected a whole number"),
    ([*INSIDE, "--spares", "-1"], "expected a whole number"),
    (["-l", "9", "--max-clients", "-3"], "expected a whole number"),
    (["-l", "9", "--legacy", "--max-clock-skew", "nan"], "expected a number"),
    (["-l", "9", "--legacy", "--max-clock-skew", "-1"], "must not be negative"),
    (["-l", "²"], "--listen: expected HOST:PORT"),
    (["-l", "127.0.0.1:٩٩"], "bad port"),
    (["-s", "127.0.0.1:¹", "-o", "127.0.0.1:2"], "bad port"),
    (["-l", "9", "--metrics", "127.0.0.1:x"], "bad port"),
    (["-l", "9", "--spares", "3"], "--spares is for the inside agent"),
    (["-l", "9", "--timeout", "90"], "--timeout is for the inside agent"),
    (["-s", "h:1", "-o", "h:2", "--max-clients-per-source", "5"], "--max-clients-per-source is for the outside"),
    (["-s", "h:1", "-o", "h:2", "--state-file", "x"], "--state-file is for the outside agent"),
    (["-l", "9", "--max-clients", "10", "--max-clients-per-source", "11"], "between 1 and --max-clients"),
    ([*INSIDE, "--max-clock-skew", "10"], "--max-clock-skew is for the outside agent"),
    (["-l", "9", "--max-clock-skew", "10"], "only applies with --legacy"),
    (["-l", "9", "-k", ""], "the key is empty"),
    (["-l", "9", "--insecure-no-key"], "--insecure-no-key, yet a key is given"),
    (["-l", "9", "--name", "../x"], "is not a name"),
    (["status", "x", "--control", "/x"], "not both"),
])
def test_usage_errors_are_one_line_and_exit_2(args, needle):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("udp-tunnel: ")
    assert "Traceback" not in r.stderr


def test_failures_a_user_can_fix_are_one_line_and_exit_1(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    precious = tmp_path / "precious"
    precious.write_text("not a socket\n")
    try:
        cases = [
            (["-l", f"127.0.0.1:{free_port()}", "--control", str(precious)], "is not a socket"),
            (["-s", "127.0.0.1:1", "-o", "no-such-host.invalid:9"], "cannot resolve"),
            (["-l", f"127.0.0.1:{busy.getsockname()[1]}"], "Address already in use"),
            (["-l", "9", "--key-file", str(tmp_path / "missing")], "cannot read key file"),
            (["-l", "9", "--key-file", str(empty)], "is empty"),
        ]
        for args, needle in cases:
            r = run(*args)
            assert r.returncode == 1, (args, r.stderr)
            assert r.stderr.count("\n") == 1 and needle in r.stderr and "Traceback" not in r.stderr
    finally:
        busy.close()
    assert precious.read_text() == "not a socket\n"  # --control never removes what is not a socket


@pytest.mark.parametrize("args", [
    ["-l", "9"],
    ["-s", "127.0.0.1:1", "-o", "127.0.0.1:2"],
    ["-l", "9", "--legacy"],
])
def test_without_a_key_the_agents_refuse_to_start_and_say_how(args):
    r = run(*args, UDP_TUNNEL_KEY="")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("udp-tunnel: no key: ") and "--key-file" in r.stderr
    assert "--insecure-no-key" in r.stderr


def test_a_key_that_is_not_utf8_is_taken_as_its_bytes_from_argv_and_environment(lab):
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1", "-k", b"\xff\xfekey"], key=None)
    lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1"], key=None,
              UDP_TUNNEL_KEY=b"\xff\xfekey")
    out.wait_status(lambda s: s["spares"] >= 1)  # the inside agent's keepalives pass authentication
    assert out.status()["key"] is True and "Traceback" not in out.log()


def test_version_and_help():
    assert run("-V").stdout.strip() == f"udp-tunnel {__version__}"
    h = run("--help")
    assert h.returncode == 0 and "--key-file" in h.stdout and "--legacy" in h.stdout


def test_make_builds_one_executable_that_runs_the_demo():
    """As root (in a network namespace of its own, with a veth pair), the demo runs the kernel path where it
    can, on lo alone (not on the host's other interfaces), and says so; otherwise the agents relay, and it
    says why."""
    subprocess.run(["make", "-s", "-C", ROOT, "udp-tunnel"], check=True, timeout=60)
    exe = os.path.join(ROOT, "udp-tunnel")
    assert os.access(exe, os.X_OK)
    # runs with the standard library only: -I ignores user site-packages and PYTHON* variables
    argv = ["python3", "-I", exe, "demo"]
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0 and shutil.which("ip"):
            from kernelnet import Netns
            ns = Netns(f"utdemo{os.getpid() % 100000}")
            stack.callback(ns.close)
            ns.sh("ip link add d0 type veth peer name d1 && ip link set d0 up && ip link set d1 up")
            argv = ["ip", "netns", "exec", ns.name, *argv]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "15/15 datagrams came back intact (0 resent" in r.stdout and "demo OK" in r.stdout
    assert "warning" not in r.stdout and "error" not in r.stdout  # the happy path warns of nothing
    if os.geteuid() == 0 and kernel_why_not() is None:
        assert "\ndata path: the kernel (--datapath auto: eBPF at tc ingress of lo): after each client's first " \
               "datagram, both agents' eBPF programs relayed its datagrams without waking the agents\n" in r.stdout
    else:
        assert "\ndata path: the agents themselves, in user space (the kernel path cannot run here: " in r.stdout


def test_the_demo_without_privileges_runs_in_user_space_and_says_why():
    r = subprocess.run([sys.executable, "-m", "udp_tunnel", "demo"], capture_output=True, text=True, timeout=60,
                       env=env(), preexec_fn=without_capabilities())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "15/15 datagrams came back intact" in r.stdout and "demo OK" in r.stdout
    assert ("\ndata path: the agents themselves, in user space (the kernel path cannot run here: needs root or "
            "CAP_NET_ADMIN and CAP_BPF)\n") in r.stdout


def test_no_key_is_said_loudly_at_start(lab):
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "--insecure-no-key"], key=None)
    assert "NOT authenticated" in out.log()
    assert out.status()["key"] is False


def test_a_short_key_gets_a_warning_a_long_one_none(lab):
    short = lab.agent("short", ["-l", f"127.0.0.1:{free_port()}"], key="hunter2")
    long = lab.agent("long", ["-l", f"127.0.0.1:{free_port()}"], key="x8Hq2-kVt0PzL4wN9sRbYc")
    assert "the key is short" in short.log()
    assert "the key is short" not in long.log()


def test_status_shows_tunnels_as_text_and_json(lab):
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1"])
    ins = lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1"])
    assert converse(("127.0.0.1", port), 2, 5)["done"] == 2
    ins.wait_status(lambda s: s["clients"] == 2 and all(t["rtt"] is not None for t in s["tunnels"]))
    out.wait_status(lambda s: s["clients"] == 2)
    text = subprocess.run(command("status", "--control", ins.control), env=env(),
                          capture_output=True, text=True, timeout=10).stdout
    assert "agent: inside" in text and "outside agent answering: yes" in text
    assert text.count("(active)") == 2 and "keepalive round trip:" in text and "client: 127.0.0.1:" in text
    assert "keepalive: every 1.0 s (" in text and "; at most 1 s; 0 mapping(s) lapsed)" in text
    text = subprocess.run(command("status", "--control", out.control), env=env(),
                          capture_output=True, text=True, timeout=10).stdout
    assert "agent: outside" in text and "key: set" in text and "to inside: 5 datagrams" in text
    import json
    doc = json.loads(subprocess.run(command("status", "--json", "--control", out.control), env=env(),
                                    capture_output=True, text=True, timeout=10).stdout)
    assert doc["role"] == "outside" and doc["totals"]["datagrams_in"] == 10
    assert os.stat(out.control).st_mode & 0o777 == 0o600


def test_metrics_are_valid_prometheus_text_with_the_counts(lab):
    from prometheus_client.parser import text_string_to_metric_families
    svc = lab.echo()
    port, mport = free_port(), free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1", "--metrics", f"127.0.0.1:{mport}"])
    iport = free_port()
    lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1", "--metrics", f"127.0.0.1:{iport}"])
    assert converse(("127.0.0.1", port), 3, 4)["done"] == 3
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # one datagram that fails authentication
        s.sendto(b"UDPT" + bytes(proto.CTRL_LEN - 4), ("127.0.0.1", port))
    out.wait_status(lambda s: s["clients"] == 3 and s["stats"].get("drop_auth"))
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("udp_tunnel_datagrams_total", (("direction", "in"),))] == 12
    assert samples[("udp_tunnel_datagrams_total", (("direction", "out"),))] == 12
    assert samples[("udp_tunnel_tunnels", (("state", "active"),))] == 3
    assert samples[("udp_tunnel_dropped_total", (("reason", "auth"),))] == 1
    assert samples[("udp_tunnel_registrations_total", ())] >= 5
    body = urllib.request.urlopen(f"http://127.0.0.1:{iport}/metrics", timeout=5).read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(body) for s in fam.samples}
    assert samples[("udp_tunnel_keepalive_interval_seconds", ())] == 1.0  # -t 1: nothing to learn below it
    assert samples[("udp_tunnel_nat_mapping_lapses_total", ())] == 0


def test_systemd_notify_ready_status_watchdog_and_clean_stop(tmp_path):
    path = str(tmp_path / "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(path)
    ns.settimeout(10)
    e = env(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000", UDP_TUNNEL_KEY="k")
    p = subprocess.Popen(command("-l", f"127.0.0.1:{free_port()}"), env=e, stderr=subprocess.PIPE, text=True)
    try:
        got = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any("WATCHDOG=1" in g for g in got):
            got.append(ns.recv(4096).decode())
        assert got[0].startswith("READY=1\nSTATUS=0 client(s), 0 spare tunnel(s)")
        assert any(g == "WATCHDOG=1" for g in got)
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        rest = []
        ns.settimeout(0.5)
        try:
            while True:
                rest.append(ns.recv(4096).decode())
        except TimeoutError:
            pass
        assert "STOPPING=1" in rest
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        ns.close()


def test_sighup_reads_the_key_file_again(lab, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text("old key\n")
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1", "--key-file", str(keyfile)], key=None)
    lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1"], key="new key")
    out.wait_status(lambda s: s["stats"].get("drop_auth", 0) >= 2)
    assert out.status()["spares"] == 0
    keyfile.write_text("new key\n")
    out.proc.send_signal(signal.SIGHUP)
    out.wait_status(lambda s: s["spares"] >= 1)
    assert "key file read again" in out.log()


def test_metrics_port_in_use_is_one_line_and_leaves_no_control_socket(tmp_path):
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    ctl = tmp_path / "c.sock"
    try:
        r = run("-l", f"127.0.0.1:{free_port()}", "--control", str(ctl),
                "--metrics", f"127.0.0.1:{port}", UDP_TUNNEL_KEY="k")
    finally:
        busy.close()
    assert r.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert r.stderr.count("\n") == 1 and not ctl.exists()


# A SIGTERM that arrives the very moment our handler is installed: the handler must find the
# wake-up descriptor already set, or the loop never hears of it and the agent runs on.
SIGNAL_AT_INSTALL = """
import os, signal, sys
real = signal.signal
def signal_and_raise(sig, handler):
    old = real(sig, handler)
    if sig == signal.SIGTERM and callable(handler):
        os.kill(os.getpid(), signal.SIGTERM)
    return old
signal.signal = signal_and_raise
from udp_tunnel.cli import main
sys.exit(main())
"""


def test_a_sigterm_caught_as_the_handler_is_installed_stops_the_agent(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", SIGNAL_AT_INSTALL, "-l", f"127.0.0.1:{free_port()}",
                          "--control", str(tmp_path / "c.sock")], env=env(UDP_TUNNEL_KEY="k"),
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "SIGTERM: stopping" in p.stderr.read()


def test_a_sigterm_right_after_start_always_ends_the_agent(tmp_path):
    for i in range(20):
        p = subprocess.Popen(command("-l", f"127.0.0.1:{free_port()}", "--control", str(tmp_path / "c.sock")),
                             env=env(UDP_TUNNEL_KEY="k"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(i * 0.01)  # walk the signal through start-up: interpreter, imports, bind, loop
            p.send_signal(signal.SIGTERM)
            assert p.wait(20) in (0, -signal.SIGTERM), f"try {i}"
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for(cond, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    return None


def test_status_lists_every_agent_started_by_hand_and_picks_one_by_name(tmp_path):
    run_dir = tempfile.mkdtemp(prefix="udpt-", dir="/tmp")  # short: a socket path holds at most 107 bytes
    e = env(XDG_RUNTIME_DIR=run_dir, UDP_TUNNEL_KEY="k")
    port = free_port()
    sockets = os.path.join(run_dir, "udp-tunnel")
    log = open(tmp_path / "agents.log", "w")

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen(command(*args), env=e, stdout=log, stderr=subprocess.STDOUT)
        procs.append(p)
        return p

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(command("status", *args), env=e, capture_output=True, text=True, timeout=20)

    procs: list[subprocess.Popen] = []
    try:
        start("-l", f"127.0.0.1:{port}", "-t", "1")
        start("-s", "127.0.0.1:7", "-o", f"127.0.0.1:{port}", "-t", "1", "--name", "home")
        both = {f"outside-127.0.0.1_{port}", "home"}
        assert wait_for(lambda: status().stdout.count("agent: ") == 2), open(tmp_path / "agents.log").read()
        files = set(os.listdir(sockets))  # the sockets, and the outside's state file once its tunnels registered
        assert {f for f in files if f.endswith(".sock")} == {n + ".sock" for n in both}
        assert files - {n + ".sock" for n in both} <= {f"outside-127.0.0.1_{port}.state"}
        assert os.stat(sockets).st_mode & 0o777 == 0o700
        text = status().stdout
        assert "agent: outside" in text and "agent: inside" in text
        assert {line.split(": ")[1] for line in text.splitlines() if line.startswith("  name: ")} == both
        docs = json.loads(status("--json").stdout)
        assert {d["name"] for d in docs} == both

        one = status("home")
        assert one.returncode == 0 and one.stdout.count("agent: ") == 1 and "agent: inside" in one.stdout
        assert json.loads(status("--json", f"outside-127.0.0.1_{port}").stdout)["role"] == "outside"
        none = status("nosuch")
        assert none.returncode == 1 and none.stderr.count("\n") == 1 and "home" in none.stderr

        # a second agent of the same name: one line, and the first one keeps its socket
        twin = start("-s", "127.0.0.1:7", "-o", f"127.0.0.1:{port}", "--name", "home")
        assert twin.wait(20) == 1
        assert status("home").returncode == 0

        # an agent killed outright leaves its socket behind: status skips it and removes it
        killed = start("-s", "127.0.0.1:8", "-o", f"127.0.0.1:{port}", "--name", "gone")
        assert wait_for(lambda: "gone" in status().stdout)
        killed.kill()
        killed.wait()
        assert os.path.exists(os.path.join(sockets, "gone.sock"))
        r = status()
        assert r.returncode == 0 and r.stdout.count("agent: ") == 2 and "gone" not in r.stdout
        assert not os.path.exists(os.path.join(sockets, "gone.sock"))
        # and an agent started by hand over it takes the place
        start("-s", "127.0.0.1:8", "-o", f"127.0.0.1:{port}", "--name", "gone")
        assert wait_for(lambda: status("gone").returncode == 0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        log.close()
    out = (tmp_path / "agents.log").read_text()
    assert "another agent is serving" in out and "Traceback" not in out
    assert [f for f in os.listdir(sockets) if f.endswith(".sock")] == []  # each removed its socket (the state stays)
    shutil.rmtree(run_dir)


def test_a_socket_directory_others_can_enter_is_refused(tmp_path):
    d = tmp_path / "udp-tunnel"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    r = run("-l", f"127.0.0.1:{free_port()}", XDG_RUNTIME_DIR=str(tmp_path))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a private directory" in r.stderr
    assert stat.S_IMODE(d.stat().st_mode) == 0o755 and list(d.iterdir()) == []  # left as it was


def test_every_option_a_message_of_the_agents_names_is_one_the_command_line_has(capsys):
    """A message named --transparent-table, an option the command line never had (issue 20)."""
    import ast
    import pathlib
    import re

    from udp_tunnel import cli
    options = {o for a in cli.build_parser()._actions for o in a.option_strings}
    with pytest.raises(SystemExit):
        cli.status_main(["--help"])
    options |= set(re.findall(r"--[a-z][a-z0-9-]+", capsys.readouterr().out))
    unknown = {}
    for path in sorted(pathlib.Path(ROOT, "src").rglob("*.py")):
        if path.name == "hostnat.py":  # it reads iptables-save's options, not ours
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", node.value):
                    if opt not in options:
                        unknown.setdefault(opt, []).append(f"{path.name}:{node.lineno}")
    assert unknown == {}


def test_listening_in_a_family_this_host_lacks_is_one_line_and_a_port_alone_falls_back_to_ipv4(monkeypatch):
    import errno

    from udp_tunnel import agent
    real = socket.socket

    def no_ipv6(family=socket.AF_INET, *args, **kw):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args, **kw)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with pytest.raises(agent.StartError) as e:
        agent.bind_listen(None, 9, socket.AF_INET6)  # -l 9 -6
    assert str(e.value) == "cannot listen on [::]:9: Address family not supported by protocol"
    with agent.bind_listen(None, 0, None) as s:  # -l PORT: every IPv4 address then
        assert (s.family, s.getsockname()[0]) == (socket.AF_INET, "0.0.0.0")
