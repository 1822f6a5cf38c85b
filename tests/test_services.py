"""Several services through one pair of agents, from configuration files, on loopback (issue 21):
single ports and a port range, byte for byte, no datagram of one service or client reaching
another; several inside agents (keys) on one outside agent; a reload under traffic."""

from __future__ import annotations

import random
import selectors
import socket
import threading
import time

import pytest

from agents import Agent

HOST = "127.0.0.1"


def free_range(size: int, tries: int = 200) -> int:
    """The first of `size` consecutive UDP ports free on loopback (none in the ephemeral range)."""
    rng = random.Random()
    for _ in range(tries):
        first = rng.randrange(20000, 32000 - size)
        socks = []
        try:
            for p in range(first, first + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((HOST, p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


class Echo:
    """UDP echo on ports first..first+size-1; records (port, source, data) of what it got."""

    def __init__(self, first: int, size: int = 1) -> None:
        self.first, self.size = first, size
        self.sel = selectors.DefaultSelector()
        self.socks = []
        for p in range(first, first + size):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST, p))
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ, p)
            self.socks.append(s)
        self.seen: list[tuple[int, tuple, bytes]] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.1):
                try:
                    data, addr = key.fileobj.recvfrom(65536)
                except OSError:
                    continue
                self.seen.append((key.data, addr, data))
                key.fileobj.sendto(data, addr)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        for s in self.socks:
            s.close()


def talk(port: int, cid: bytes, n: int, timeout: float = 10.0) -> list[bytes]:
    """One client: n datagrams to HOST:port, each waited for; what came back."""
    got = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((HOST, port))
        s.settimeout(0.3)
        deadline = time.monotonic() + timeout
        sent: list[bytes] = []
        for k in range(n):
            msg = cid + b" %04d " % k + bytes((k * 7 + i) % 251 for i in range(40))
            answer = None
            while answer is None and time.monotonic() < deadline:
                s.send(msg)
                try:
                    while answer is None:
                        reply = s.recv(65536)
                        if reply not in sent:  # else a late echo of an earlier datagram we sent again
                            answer = reply
                except (TimeoutError, ConnectionRefusedError):
                    continue
            sent.append(msg)
            if answer is not None:
                got.append(answer)
    return got


def run_clients(targets: list[tuple[int, bytes]], n: int) -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    threads = [threading.Thread(target=lambda p=p, c=c: out.__setitem__(c, talk(p, c, n))) for p, c in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def expected(cid: bytes, n: int) -> list[bytes]:
    return [cid + b" %04d " % k + bytes((k * 7 + i) % 251 for i in range(40)) for k in range(n)]


def datapath_line(datapath: str | None) -> str:
    """The agents' data path: user space unless the test asks for one (as tests/agents.py Agent)."""
    return f'datapath = "{datapath or "user"}"\n'


class Pair:
    """An outside and inside agents from configuration files in tmp. `inside_keys`: key -> (the inside
    agent's name, its services: names, or name -> the port it says, None for the service's own)."""

    def __init__(self, tmp, services: dict[str, tuple[str, str]], keys: dict[str, str] | None = None,
                 inside_keys: dict[str, tuple[str, list[str] | dict[str, str | None]]] | None = None,
                 keyed: dict[str, str] | None = None, datapath: str | None = None) -> None:
        self.tmp = tmp
        self.datapath = datapath
        self.tport = free_range(1)
        keys = keys or {"home": "a home key of some length"}
        for k, v in keys.items():
            (tmp / f"{k}.key").write_text(v + "\n")
        self.outside_toml = tmp / "outside.toml"
        self.services = services
        self.keys = keys
        self.write_outside(services, keyed)
        self.outside = Agent("outside", ["--config", str(self.outside_toml)], tmp, key=None,
                             control=str(tmp / "outside.sock"))
        self.insides = []
        for k, (name, svcs) in (inside_keys or {"home": ("inside", list(services))}).items():
            path = tmp / f"{name}.toml"
            body = (f'[inside]\noutside = "{HOST}:{self.tport}"\nkey_file = "{k}.key"\nkeepalive = 2\n'
                    f'control = "{tmp / (name + ".sock")}"\n{datapath_line(datapath)}')
            for s, port in (svcs if isinstance(svcs, dict) else dict.fromkeys(svcs)).items():
                body += f'\n[services.{s}]\nservice = "{HOST}:{port or services[s][1]}"\n'
            path.write_text(body)
            self.insides.append(Agent(name, ["--config", str(path)], tmp, key=None, control=str(tmp / f"{name}.sock")))

    def write_outside(self, services: dict[str, tuple[str, str]], keyed: dict[str, str] | None = None) -> None:
        body = f'[outside]\nlisten = "{HOST}:{self.tport}"\nkeepalive = 2\ncontrol = "{self.tmp / "outside.sock"}"\n'
        body += 'state_file = "none"\n' + datapath_line(self.datapath)
        for k in self.keys:
            body += f'\n[keys.{k}]\nfile = "{k}.key"\n'
        for name, (listen, _) in services.items():
            key = (keyed or {}).get(name, next(iter(self.keys)))
            body += f'\n[services.{name}]\nlisten = "{HOST}:{listen}"\nkey = "{key}"\n'
        self.outside_toml.write_text(body)

    def stop(self) -> None:
        for a in [*self.insides, self.outside]:
            a.stop()


def test_three_services_two_ports_and_a_range_of_a_hundred_through_one_pair_of_agents(tmp_path, datapath):
    """(With the kernel path, each client's datagrams go up from the tunnel port and its answers come
    back from the port it sent to: its connected socket takes nothing else.)"""
    a, b, r = free_range(1), free_range(1), free_range(100)
    ea, eb, er = Echo(free_range(1)), Echo(free_range(1)), Echo(free_range(100), 100)
    pair = Pair(tmp_path, {"wg": (str(a), str(ea.first)), "game": (f"{r}-{r + 99}", f"{er.first}-{er.first + 99}"),
                           "dns": (str(b), str(eb.first))}, datapath=datapath)
    try:
        pair.outside.wait_status(lambda s: s["spares"] >= 2)
        targets = [(a, b"wg%02d" % i) for i in range(20)] + [(b, b"dns%02d" % i) for i in range(20)] \
            + [(r + 5 * i, b"game%02d" % i) for i in range(20)]
        got = run_clients(targets, 5)
        for _, cid in targets:
            assert got[cid] == expected(cid, 5), cid
        # each datagram reached its own service, the range port by port, one service socket per client
        assert {d.split(b" ")[0] for p, _, d in ea.seen} == {c for _, c in targets if c.startswith(b"wg")}
        assert {d.split(b" ")[0] for p, _, d in eb.seen} == {c for _, c in targets if c.startswith(b"dns")}
        for p, _, d in er.seen:
            assert p - er.first == (int(d[4:6]) * 5), (p, d[:8])
        for echo in (ea, eb, er):
            by_client: dict[bytes, set] = {}
            for _, src, d in echo.seen:
                by_client.setdefault(d.split(b" ")[0], set()).add(src)
            assert all(len(v) == 1 for v in by_client.values())
        st = pair.outside.status()
        assert st["clients"] == 60 and {k: v["clients"] for k, v in st["services"].items()} == \
            {"wg": 20, "game": 20, "dns": 20}
        assert {k: v["datagrams_in"] for k, v in st["services"].items()} == {"wg": 100, "game": 100, "dns": 100}
        from udp_tunnel.ops import metrics, status
        text = status.render(st)  # tunnels grouped by service, then the spares
        heads = [line for line in text.splitlines() if line.startswith(("service: ", "spares:"))]
        assert heads == ["service: dns", "service: game", "service: wg", "spares:"]
        body = metrics.render(st)
        for name in ("wg", "game", "dns"):
            assert f'udp_tunnel_service_clients{{service="{name}"}} 20' in body
            assert f'udp_tunnel_service_datagrams_total{{service="{name}",direction="in"}} 100' in body
        inside = pair.insides[0].status()
        assert {k: v["clients"] for k, v in inside["services"].items()} == {"wg": 20, "game": 20, "dns": 20}
        for s in (st, inside):
            d = s["datapath"]
            assert d["path"] == datapath
            if datapath == "kernel":  # 60 clients, 2 directions each; 300 round trips, each first one the core's
                # (at the inside a first datagram that arrives after its pipe was made is the kernel's too)
                assert (d["flows"], d["kept_count"]) == (120, 0)
                assert d["program"]["local"] == 2 * 300 - 60 if s is st else 540 <= d["program"]["local"] <= 600
    finally:
        pair.stop()
        for e in (ea, eb, er):
            e.close()


def test_two_inside_agents_with_their_own_keys_serve_only_their_own_services(tmp_path, datapath):
    ea, eb = Echo(free_range(1)), Echo(free_range(1))
    a, b = free_range(1), free_range(1)
    services = {"mine": (str(a), str(ea.first)), "theirs": (str(b), str(eb.first))}
    # the friend's agent also claims "mine" in its file (as its own echo): it gets no client of it
    pair = Pair(tmp_path, services, keys={"home": "the home agent's key", "friend": "the friend's agent key"},
                inside_keys={"home": ("home", ["mine"]), "friend": ("friend", {"theirs": None, "mine": str(eb.first)})},
                keyed={"mine": "home", "theirs": "friend"}, datapath=datapath)
    try:
        pair.outside.wait_status(lambda s: s["spares"] >= 4)
        got = run_clients([(a, b"m%02d" % i) for i in range(10)] + [(b, b"t%02d" % i) for i in range(10)], 3)
        assert all(got[b"m%02d" % i] == expected(b"m%02d" % i, 3) for i in range(10))
        assert all(got[b"t%02d" % i] == expected(b"t%02d" % i, 3) for i in range(10))
        assert {d[:1] for _, _, d in ea.seen} == {b"m"} and {d[:1] for _, _, d in eb.seen} == {b"t"}
        home, friend = (a.status() for a in pair.insides)
        assert home["clients"] == 10 and friend["clients"] == 10
    finally:
        pair.stop()
        ea.close()
        eb.close()


@pytest.mark.parametrize("change", ["add", "remove", "limit"])
def test_a_reload_under_traffic_loses_no_datagram_of_the_services_it_does_not_touch(tmp_path, change, datapath):
    import signal
    ea, eb = Echo(free_range(1)), Echo(free_range(1))
    a, b, c = free_range(1), free_range(1), free_range(1)
    ec = Echo(free_range(1))
    services = {"steady": (str(a), str(ea.first)), "other": (str(b), str(eb.first))}
    pair = Pair(tmp_path, services, datapath=datapath)
    result: dict = {}
    try:
        pair.outside.wait_status(lambda s: s["spares"] >= 2)
        th = threading.Thread(target=lambda: result.update(steady=talk(a, b"steady", 150, timeout=30)))
        th.start()
        time.sleep(0.5)
        if change == "add":
            new = dict(services, added=(str(c), str(ec.first)))
        elif change == "remove":
            new = {"steady": services["steady"]}
        else:
            new = services
        pair.write_outside(new)
        if change == "limit":
            text = pair.outside_toml.read_text().replace('[services.other]\n', '[services.other]\nmax_clients = 5\n')
            pair.outside_toml.write_text(text)
        pair.outside.proc.send_signal(signal.SIGHUP)
        th.join(40)
        assert result["steady"] == expected(b"steady", 150)
        st = pair.outside.wait_status(lambda s: True)
        assert ("added" in st["services"]) == (change == "add") and ("other" in st["services"]) == (change != "remove")
        assert st["stats"].get("drop_hold_expired", 0) == 0
    finally:
        pair.stop()
        for e in (ea, eb, ec):
            e.close()


def test_a_reload_with_a_bad_file_is_refused_in_one_line_and_the_running_configuration_stays(tmp_path):
    import signal
    ea = Echo(free_range(1))
    a = free_range(1)
    pair = Pair(tmp_path, {"steady": (str(a), str(ea.first))})
    result: dict = {}
    try:
        pair.outside.wait_status(lambda s: s["spares"] >= 2)
        th = threading.Thread(target=lambda: result.update(steady=talk(a, b"steady", 60, timeout=20)))
        th.start()
        good = pair.outside_toml.read_text()
        pair.outside_toml.write_text(good + '\n[services.bad]\nlisten = "70000"\n')
        pair.outside.proc.send_signal(signal.SIGHUP)
        th.join(30)
        assert result["steady"] == expected(b"steady", 60)
        log = pair.outside.log()
        bad = [line for line in log.splitlines() if "SIGHUP" in line]
        assert len(bad) == 1 and f"{pair.outside_toml}:" in bad[0] and "70000" in bad[0] \
            and bad[0].endswith("the running configuration stays"), bad
        assert set(pair.outside.status()["services"]) == {"steady"}
    finally:
        pair.stop()
        ea.close()


def test_a_spray_against_one_inside_agents_service_leaves_the_others_new_clients_served_at_once(tmp_path):
    """Two keys, two services: a spray of new source ports against one (every port a new client)
    uses up that key's tunnels and held clients, never the other's."""
    ea, eb = Echo(free_range(1)), Echo(free_range(1))
    a, b = free_range(1), free_range(1)
    pair = Pair(tmp_path, {"mine": (str(a), str(ea.first)), "theirs": (str(b), str(eb.first))},
                keys={"home": "the home agent's key", "friend": "the friend's agent key"},
                inside_keys={"home": ("home", ["mine"]), "friend": ("friend", ["theirs"])},
                keyed={"mine": "home", "theirs": "friend"})
    stop = threading.Event()

    def spray() -> None:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
        try:
            end = time.monotonic() + 8
            while not stop.is_set() and time.monotonic() < end:
                for k in range(len(socks)):  # a new source port for every datagram
                    socks[k].close()
                    socks[k] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks[k].sendto(b"junk", (HOST, b))
                time.sleep(0.01)
        finally:
            for s in socks:
                s.close()

    try:
        pair.outside.wait_status(lambda s: s["spares"] >= 4)
        th = threading.Thread(target=spray)
        th.start()
        time.sleep(2)
        t0 = time.monotonic()
        got = run_clients([(a, b"m%02d" % i) for i in range(10)], 1)
        took = time.monotonic() - t0
        stop.set()
        th.join(10)
        assert all(got[b"m%02d" % i] == expected(b"m%02d" % i, 1) for i in range(10))
        print(f"10 new clients of the other key's service answered in {took * 1000:.0f} ms during the spray")
        st = pair.outside.status()
        assert st["services"]["theirs"]["clients"] > 10  # the spray did take the sprayed service's tunnels
    finally:
        stop.set()
        pair.stop()
        ea.close()
        eb.close()


def test_five_services_cost_the_keepalives_of_one(tmp_path):
    """Tunnels and spares are not tied to a service: five services through one pair of agents, a
    client each, send about the keepalives of one service with five clients (issue 21: at most 1.5
    times); a tunnel per client, and the spares shared."""
    counts = {}
    for n in (1, 5):
        sub = tmp_path / f"n{n}"
        sub.mkdir()
        echoes = [Echo(free_range(1)) for _ in range(n)]
        services = {f"s{i}": (str(free_range(1)), str(e.first)) for i, e in enumerate(echoes)}
        pair = Pair(sub, services)
        try:
            pair.outside.wait_status(lambda s: s["spares"] >= 2)
            ports = [int(listen) for listen, _ in services.values()]
            for i in range(5):  # five clients: of one service, or one of each
                assert talk(ports[i % n], b"c%d" % i, 2) == expected(b"c%d" % i, 2)
            ins = pair.insides[0]
            start = ins.status()["keepalives"]
            time.sleep(8)  # -t 2: four intervals
            counts[n] = ins.status()["keepalives"] - start
        finally:
            pair.stop()
            for e in echoes:
                e.close()
    print(f"keepalives in 8 s: one service {counts[1]}, five services {counts[5]} "
          f"({counts[5] / counts[1]:.2f}x)")
    assert counts[5] <= 1.5 * counts[1]
