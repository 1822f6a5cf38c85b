"""Programs the client-address lab runs inside its namespaces (see test_clientaddr.py).

    clientaddr_tool.py seen HOST PORT [record]
                                           UDP service: answers each datagram with "IP PORT|" + the datagram,
                                           the address it came from as the service sees it; with `record`,
                                           also prints "IP PORT HEX" (source, datagram) for every datagram
    clientaddr_tool.py clients HOST PORT N PER
                                           N client sockets (N local ports) to HOST:PORT, each sends PER
                                           datagrams and waits for each answer (resent after 1 s, 3 tries);
                                           JSON: per socket its local address, datagrams sent, answers
    clientaddr_tool.py spoof SRC_HOST SRC_PORT DST_HOST DST_PORT COUNT
                                           COUNT datagrams "spoofed N" from SRC (not an address of this
                                           host: IP_TRANSPARENT) to DST
    clientaddr_tool.py driver              reads JSON requests on stdin, one a line, and answers each with one
                                           JSON line: the inside agent's I/O calls, one at a time (below)
    clientaddr_tool.py relay LISTEN_HOST LISTEN_PORT SERVICE_HOST SERVICE_PORT ANNOUNCE_IP1 ANNOUNCE_IP2 TABLE
                                           a minimal inside agent for one service in transparent mode: each
                                           sender to LISTEN gets a service socket bound to (ANNOUNCE_IP, its
                                           port), as if the outside agent had announced that address; SIGUSR1
                                           moves every client to ANNOUNCE_IP2; SIGTERM stops (routing removed)

driver requests ({"op": ...}):
    routing   services, table, action (install | remove | missing | commands)  -> {"result": [...]}
    open      id, client, service [, exact_only]        transparent socket -> {"bound", "exact"}
    front     id, client, front, service, mode          plain socket to a PROXY v2 front, with framing
    send      id, data                                  through the client's current socket
    recv      id [, old] [, timeout]                    one datagram from the current (or the retired) socket
    move      id, client                                new socket, the old one retired -> {"bound", "revived"}
    leave     id                                        close the client's sockets
    check     service, client                           Routing.answers_come_back -> {"result": bool}
    warning   service, client                           service_path_warning -> {"result": text or null}
    privileges [manage]                                 check_privileges -> {"result": text or null}
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src"))

from udp_tunnel.io import transparent  # noqa: E402
from udp_tunnel.io.proxied import ProxyFraming  # noqa: E402


def fam(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def seen(host: str, port: str, record: str = "") -> None:
    s = socket.socket(fam(host), socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    while True:
        data, addr = s.recvfrom(65536)
        if record:
            print(f"{addr[0]} {addr[1]} {data.hex()}", flush=True)
        try:
            s.sendto(f"{addr[0]} {addr[1]}|".encode() + data, addr)
        except OSError as e:  # EINVAL: no route back from this address (no policy routing)
            print(f"answer to {addr[0]} {addr[1]}: {e}", flush=True)


def clients(host: str, port: str, n: str, per: str) -> None:
    socks = []
    for _ in range(int(n)):
        s = socket.socket(fam(host), socket.SOCK_DGRAM)
        s.connect((host, int(port)))
        s.settimeout(1.0)
        socks.append(s)
    out = [{"local": list(s.getsockname()[:2]), "sent": 0, "answers": []} for s in socks]
    for j in range(int(per)):
        for i, s in enumerate(socks):
            msg = f"c{i} d{j}".encode()
            for _ in range(3):
                s.send(msg)
                out[i]["sent"] += 1
                try:
                    answer = s.recv(65536)
                except TimeoutError:
                    continue
                out[i]["answers"].append(answer.decode(errors="replace"))
                break
    print(json.dumps(out))


def spoof(src_host: str, src_port: str, dst_host: str, dst_port: str, count: str) -> None:
    f = fam(dst_host)
    with socket.socket(f, socket.SOCK_DGRAM) as s:
        if f == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, transparent.IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, transparent.IP_TRANSPARENT, 1)
        s.bind((src_host, int(src_port)))
        for i in range(int(count)):
            s.sendto(b"spoofed %d" % i, (dst_host, int(dst_port)))
    print(json.dumps({"sent": int(count)}))


class Driver:
    def __init__(self) -> None:
        self.socks: dict[str, socket.socket] = {}
        self.keys: dict[str, tuple] = {}  # id -> (client, service)
        self.framing: dict[str, ProxyFraming] = {}
        self.old: dict[str, socket.socket] = {}
        self.retiring = transparent.Retiring()

    def do(self, req: dict) -> dict:
        op = req["op"]
        if op == "routing":
            r = transparent.Routing([tuple(s) for s in req["services"]], table=req["table"])
            try:
                return {"result": getattr(r, req["action"])()}
            finally:
                r.close()
        if op == "open":
            client, service = tuple(req["client"]), tuple(req["service"])
            o = transparent.open_socket(client, service, exact_only=req.get("exact_only", False))
            self.socks[req["id"]], self.keys[req["id"]] = o.sock, (client, service)
            return {"bound": list(o.bound), "exact": o.exact}
        if op == "front":
            s = socket.socket(fam(req["front"][0]), socket.SOCK_DGRAM)
            s.connect(tuple(req["front"]))
            self.socks[req["id"]] = s
            self.framing[req["id"]] = ProxyFraming(req["mode"], tuple(req["client"]), tuple(req["service"]))
            return {"bound": list(s.getsockname()[:2])}
        if op == "send":
            data = req["data"].encode()
            f = self.framing.get(req["id"])
            n = self.socks[req["id"]].sendmsg(f.frame(data) if f else [data])
            return {"sent": n}
        if op == "recv":
            s = self.old[req["id"]] if req.get("old") else self.socks[req["id"]]
            if not select.select([s], [], [], req.get("timeout", 2.0))[0]:
                return {"data": None}
            data = s.recv(65536)
            if req.get("old"):
                self.retiring.seen(s.fileno(), time.monotonic())
            return {"data": data.decode(errors="replace")}
        if op == "move":
            client = tuple(req["client"])
            if req["id"] in self.framing:
                return {"new_socket": self.framing[req["id"]].moved(client)}
            old = self.socks[req["id"]]
            _, service = self.keys[req["id"]]
            revived = self.retiring.revive((client, service))
            if revived is not None:
                s, bound = revived, revived.getsockname()[:2]
            else:
                o = transparent.open_socket(client, service)
                s, bound = o.sock, o.bound
            self.retiring.retire(old, self.keys[req["id"]], time.monotonic())
            self.old[req["id"]] = old
            self.socks[req["id"]], self.keys[req["id"]] = s, (client, service)
            return {"bound": list(bound), "revived": revived is not None}
        if op == "leave":
            self.socks.pop(req["id"]).close()
            return {}
        if op == "check":
            r = transparent.Routing([tuple(req["service"])], table=req.get("table", transparent.DEFAULT_TABLE))
            try:
                return {"result": r.answers_come_back(tuple(req["service"]), tuple(req["client"]))}
            finally:
                r.close()
        if op == "warning":
            return {"result": transparent.service_path_warning(tuple(req["service"]), tuple(req["client"]))}
        if op == "privileges":
            return {"result": transparent.check_privileges(req.get("manage", True),
                                                           (socket.AF_INET, socket.AF_INET6))}
        raise ValueError(f"unknown op {op!r}")


def driver() -> None:
    d = Driver()
    for line in sys.stdin:
        try:
            out = d.do(json.loads(line))
        except Exception as e:  # noqa: BLE001 - the test reads the error
            out = {"error": f"{type(e).__name__}: {e}", "errno": getattr(e, "errno", None)}
        print(json.dumps(out), flush=True)


def relay(lhost: str, lport: str, shost: str, sport: str, ip1: str, ip2: str, table: str) -> None:
    """What the inside agent's I/O does with TransparentClients, for one service."""
    def log(**kw) -> None:
        print(json.dumps(kw), flush=True)
    clients = transparent.TransparentClients((shost, int(sport)), int(table), warn=lambda m: log(warning=m))
    log(routing=clients.start())
    front = socket.socket(fam(lhost), socket.SOCK_DGRAM)
    front.bind((lhost, int(lport)))
    ep = select.epoll()
    ep.register(front.fileno(), select.EPOLLIN)
    current: dict[tuple, tuple[socket.socket, tuple]] = {}  # the real sender -> its socket, announced address
    by_fd: dict[int, tuple[socket.socket, tuple]] = {}  # any registered service socket -> it, the real sender
    state = {"ip": ip1, "stop": False, "move": False}
    signal.signal(signal.SIGUSR1, lambda *a: state.update(move=True))
    signal.signal(signal.SIGTERM, lambda *a: state.update(stop=True))

    def register(s: socket.socket, peer: tuple) -> None:
        if s.fileno() not in by_fd:
            ep.register(s.fileno(), select.EPOLLIN)
        by_fd[s.fileno()] = (s, peer)

    try:
        while not state["stop"]:
            now = time.monotonic()
            if state["move"]:
                state["move"], state["ip"] = False, ip2
                for peer, (old, announced) in list(current.items()):
                    new = (ip2, announced[1])
                    s = clients.move(old, announced, new, now)
                    register(s, peer)
                    current[peer] = (s, new)
                    log(client=list(peer[:2]), moved=list(new))
            for s in clients.expired(now):
                ep.unregister(s.fileno())
                del by_fd[s.fileno()]
                s.close()
            try:
                events = ep.poll(0.2)
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == front.fileno():
                    data, peer = front.recvfrom(65536)
                    if peer not in current:
                        announced = (state["ip"], peer[1])  # what the outside agent would announce
                        s = clients.announce(announced)
                        register(s, peer)
                        current[peer] = (s, announced)
                        log(client=list(peer[:2]), bound=list(s.getsockname()[:2]))
                    current[peer][0].send(data)
                elif fd in by_fd:
                    s, peer = by_fd[fd]
                    try:
                        data = s.recv(65536)
                    except OSError:
                        continue
                    if s is not current[peer][0]:
                        clients.seen(fd, now)
                    front.sendto(data, peer)
    finally:
        retired, removed = clients.stop()
        for s in retired + [c[0] for c in current.values()]:
            s.close()
        log(removed=removed)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
