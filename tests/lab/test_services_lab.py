"""Several services from configuration files through the lab's double NAT (issue 21).

One outside agent on the VPS with two keys and four services: WireGuard (admitted by the
home server's public key) on 9999, an echo on 7100, a range 7110-7112, and "dns" on 7120
carried by another key. Two inside agents at home, one per key, each with its own file.
Each service at home answers with its own name and port (tool.py tagged), so that a
datagram delivered to the wrong service or port shows. Root only; skipped with the reason
otherwise (test_lab.py's conditions).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from netlab import ROOT, VPS4, Lab, wait_for
from test_lab import WG_PORT, Net, wg_ping, wireguard

from agents import kernel_why_not

pytestmark = pytest.mark.netns

TPORT = 9990  # the tunnel port; WireGuard's clients send to netlab's PORT (9999), as test_lab's
ECHO, RANGE, DNS = 7100, (7110, 7112), 7120


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("services-lab"))
    lab = Lab(tmp)
    try:
        lab.build()
        lab.spawn_tool("home", "echo.log", "tagged", "127.0.0.1", str(ECHO), "echo")
        lab.spawn_tool("home", "range.log", "tagged", "127.0.0.1", f"{RANGE[0]}-{RANGE[1]}", "range")
        lab.spawn_tool("home", "dns.log", "tagged", "127.0.0.1", str(DNS), "dns")
        wireguard(lab, tmp)
        yield lab
    finally:
        lab.close()


def outside_file(lab: Lab, tmp: str, services: list[str], datapath: str = "user") -> str:
    body = (f'[outside]\nlisten = "{TPORT}"\nkeepalive = 5\ncontrol = "{tmp}/outside.sock"\nstate_file = "none"\n'
            f'datapath = "{datapath}"\n'
            f'[keys.home]\nfile = "home.key"\n[keys.friend]\nfile = "friend.key"\nmax_clients = 4\n')
    table = {
        "wireguard": f'listen = "9999"\nkey = "home"\nwireguard_key = "{lab.wg_keys["home"][1]}"\n',
        "echo": f'listen = "{ECHO}"\nkey = "home"\n',
        "range": f'listen = "{RANGE[0]}-{RANGE[1]}"\nkey = "home"\n',
        "dns": f'listen = "{DNS}"\nkey = "friend"\n',
    }
    for name in services:
        body += f"[services.{name}]\n{table[name]}"
    path = os.path.join(tmp, "outside.toml")
    with open(path, "w") as f:
        f.write(body)
    return path


def inside_file(tmp: str, key: str, services: dict[str, str], datapath: str = "user") -> str:
    body = (f'[inside]\noutside = "{VPS4}:{TPORT}"\nkey_file = "{key}.key"\nkeepalive = 5\ndatapath = "{datapath}"\n'
            f'control = "{tmp}/inside-{key}.sock"\nname = "inside-{key}"\n')
    for name, target in services.items():
        body += f'[services.{name}]\nservice = "{target}"\n'
    path = os.path.join(tmp, f"inside-{key}.toml")
    with open(path, "w") as f:
        f.write(body)
    return path


def start(net: Net, ns: str, name: str, cfg: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    p = net.lab.spawn(ns, ["python3", "-m", "udp_tunnel", "--config", cfg], f"{name}.log", env=env)
    ctl = os.path.join(net.tmp, f"{name}.sock")
    a = {"name": name, "proc": p, "control": ctl, "ns": ns, "args": ()}
    net.agents.append((name, a))
    assert wait_for(lambda: os.path.exists(ctl), 10), net.lab.log(f"{name}.log")
    return a


HOME = {"wireguard": f"127.0.0.1:{WG_PORT}", "echo": f"127.0.0.1:{ECHO}", "range": f"127.0.0.1:{RANGE[0]}-{RANGE[1]}"}


def agents(lab: Lab, net: Net, services: list[str], datapath: str = "user") -> tuple[dict, dict, dict]:
    for key in ("home", "friend"):
        with open(os.path.join(net.tmp, f"{key}.key"), "w") as f:
            f.write(f"the {key} key, long and random in real life\n")
    out_cfg = outside_file(lab, net.tmp, services, datapath)
    home_cfg = inside_file(net.tmp, "home", HOME, datapath)
    friend_cfg = inside_file(net.tmp, "friend", {"dns": f"127.0.0.1:{DNS}"}, datapath)
    for cfg in (home_cfg, friend_cfg):  # the pair of files agrees (what `make install-*` asks)
        r = subprocess.run([sys.executable, "-m", "udp_tunnel", "--check-config", "--config", out_cfg,
                            "--config", cfg], env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src")),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    out = start(net, "vps", "outside", out_cfg)
    home = start(net, "home", "inside-home", home_cfg)
    friend = start(net, "home", "inside-friend", friend_cfg)
    net.wait_status(out, lambda s: s["spares"] >= 2)
    return out, home, friend


def tool(lab: Lab, ns: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", lab.ns(ns), sys.executable,
                             os.path.join(ROOT, "tests", "lab", "tool.py"), *map(str, args)],
                            stdout=subprocess.PIPE, text=True)


def result(p: subprocess.Popen, timeout: float = 120):
    try:
        out = p.communicate(timeout=timeout)[0]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return json.loads(out)


def ask(lab: Lab, ns: str, port: int, n: int, per: int) -> list[list[str]]:
    return result(tool(lab, ns, "ask", VPS4, port, n, per))


def answered_by(answers: list[list[str]], tag: str, n: int, per: int) -> None:
    """Every client got an answer to every datagram, from the service `tag` ("NAME PORT")."""
    want = [[f"{tag}|client {i} datagram {k}" for k in range(per)] for i in range(n)]
    assert answers == want


@pytest.mark.parametrize("datapath", ["user", "kernel"])
def test_four_services_two_keys_wireguard_bulk_beside_echo_clients(lab, net, datapath):
    if datapath == "kernel" and kernel_why_not():
        pytest.skip(f"the kernel data path: {kernel_why_not()}")
    out, home, friend = agents(lab, net, ["wireguard", "echo", "range", "dns"], datapath)
    assert wg_ping(lab), "no ping across WireGuard"
    size = 64 << 20
    server = lab.spawn_tool("home", "tcpserve.log", "tcpserve", "100.100.0.1", "8080", str(size))
    time.sleep(0.3)
    try:
        bulk = tool(lab, "work1", "tcpfetch", "100.100.0.1", 8080, size)
        # while WireGuard carries the bulk transfer: clients of the other services from both work hosts
        asks = {f"echo {ECHO}": (tool(lab, "work2", "ask", VPS4, ECHO, 3, 20), 3, 20),
                f"dns {DNS}": (tool(lab, "work2", "ask", VPS4, DNS, 4, 20), 4, 20)}
        for port in range(RANGE[0], RANGE[1] + 1):
            asks[f"range {port}"] = (tool(lab, "work1", "ask", VPS4, port, 2, 20), 2, 20)
        for tag, (p, n, per) in asks.items():
            answered_by(result(p), tag, n, per)
        res = result(bulk)
    finally:
        lab.stop(server)
    print(f"bulk TCP over WireGuard beside 13 clients of three other services ({datapath} data path): {res}")
    assert bulk.returncode == 0 and res["intact"] and res["bytes"] == size
    s = net.wait_status(out, lambda s: s["services"]["range"]["clients"] == 6)
    print({name: v["clients"] for name, v in s["services"].items()})
    assert {name: v["clients"] for name, v in s["services"].items()} == \
        {"wireguard": 1, "echo": 3, "range": 6, "dns": 4}
    assert s["services"]["wireguard"]["datagrams_out"] > size // 1420
    assert s["datapath"]["path"] == datapath
    if datapath == "kernel":  # the bulk went through the program, each service's clients have their flows
        assert s["datapath"]["program"]["relayed"] > size // 1420, s["datapath"]
    assert net.status(home)["clients"] == 10 and net.status(friend)["clients"] == 4
    # the friend's key is limited to 4 clients: a fifth waits, and is not given another key's tunnel
    assert ask(lab, "work1", DNS, 1, 1) == [[]]
    assert net.status(home)["clients"] == 10


def test_a_service_removed_by_sighup_stops_while_wireguard_goes_on(lab, net):
    out, home, _ = agents(lab, net, ["wireguard", "echo", "range", "dns"])
    assert wg_ping(lab)
    answered_by(ask(lab, "work2", ECHO, 2, 2), f"echo {ECHO}", 2, 2)
    outside_file(lab, net.tmp, ["wireguard", "range", "dns"])
    out["proc"].send_signal(signal.SIGHUP)
    net.wait_status(out, lambda s: "echo" not in s["services"])
    assert ask(lab, "work2", ECHO, 1, 1) == [[]]  # nobody listens on 7100 at the VPS any more
    assert wg_ping(lab, timeout=5), "WireGuard stopped with the reload of another service"
    answered_by(ask(lab, "work1", RANGE[0], 1, 2), f"range {RANGE[0]}", 1, 2)
    # the inside agent still has the service: its tunnels for it are refused, nothing else
    log = lab.log("outside.log")
    assert "Traceback" not in log and "Traceback" not in lab.log("inside-home.log")
