"""Small programs the lab runs inside its network namespaces.

    tool.py echo HOST PORT                 UDP echo service (runs until killed)
    tool.py tagged HOST FIRST-LAST NAME    UDP service on each port: answers "NAME PORT|" + the datagram
    tool.py ask HOST PORT N PER            N client sockets, PER datagrams each (resent after 0.5 s, 6
                                           tries); JSON: per socket the answers (to "tagged"), in order
    tool.py probe HOST PORT                one datagram; exit 0 if it comes back within 1 s
    tool.py converse HOST PORT N PER       N clients x PER datagrams, byte-checked; JSON result
    tool.py flow HOST PORT SECONDS         a datagram every 20 ms; prints the wall time of each echo
    tool.py sniff IFACE PORT SECONDS       capture UDP payloads to PORT (AF_PACKET); hex lines
    tool.py attack HOST PORT CAPFILE SECONDS  replay captures + a forged keepalive, then count
                                           what arrives at the attacker; JSON result
    tool.py spray HOST PORT RATE SECONDS NPORTS  junk and WireGuard-shaped datagrams with wrong MAC1
                                           or unknown sessions from NPORTS source ports, RATE/s, at
                                           most RATE x SECONDS of them; JSON result (sent, received)
    tool.py tcpserve HOST PORT NBYTES      serve NBYTES of a fixed pseudo-random stream once
    tool.py tcpfetch HOST PORT NBYTES      fetch it and check its SHA-256; exit 0 if intact
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src"))


def fam(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def echo(host: str, port: str) -> None:
    s = socket.socket(fam(host), socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    while True:
        data, addr = s.recvfrom(65536)
        s.sendto(data, addr)


def tagged(host: str, ports: str, name: str) -> None:
    import selectors
    first, _, last = ports.partition("-")
    sel = selectors.DefaultSelector()
    for p in range(int(first), int(last or first) + 1):
        s = socket.socket(fam(host), socket.SOCK_DGRAM)
        s.bind((host, p))
        sel.register(s, selectors.EVENT_READ, b"%s %d|" % (name.encode(), p))
    while True:
        for key, _ in sel.select():
            data, addr = key.fileobj.recvfrom(65536)
            key.fileobj.sendto(key.data + data, addr)


def ask(host: str, port: str, n: str, per: str) -> None:
    socks = []
    for _ in range(int(n)):
        s = socket.socket(fam(host), socket.SOCK_DGRAM)
        s.connect((host, int(port)))
        s.settimeout(0.5)
        socks.append(s)
    out = [[] for _ in socks]
    for k in range(int(per)):
        for i, s in enumerate(socks):
            msg = b"client %d datagram %d" % (i, k)
            answer = None
            for _ in range(6):
                s.send(msg)
                try:
                    while answer is None:
                        got = s.recv(65536)
                        if not any(got.endswith(b"|client %d datagram %d" % (i, j)) for j in range(k)):
                            answer = got.decode(errors="replace")  # not a late answer to an earlier one
                    break
                except OSError:
                    continue
            if answer is not None:
                out[i].append(answer)
    print(json.dumps(out))


def probe(host: str, port: str) -> int:
    with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
        s.settimeout(1.0)
        s.sendto(b"probe", (host, int(port)))
        try:
            return 0 if s.recv(100) == b"probe" else 1
        except OSError:
            return 1


def idles(host: str, port: str, periods: str) -> None:
    """One client: a datagram, then for each period: idle that long and send ONE datagram
    (no resend); print whether each first datagram after an idle was answered within 2 s."""
    out = []
    with socket.socket(fam(host), socket.SOCK_DGRAM) as s:
        s.connect((host, int(port)))
        s.settimeout(2.0)
        for i, idle in enumerate([0.0] + [float(x) for x in periods.split(",")]):
            time.sleep(idle)
            msg = b"idle %d" % i
            t0 = time.monotonic()
            s.send(msg)
            try:
                ok = s.recv(100) == msg
            except OSError:
                ok = False
            out.append({"idle": idle, "answered": ok, "ms": round((time.monotonic() - t0) * 1000, 1)})
    print(json.dumps(out))


def burst(host: str, port: str, n: str) -> None:
    from agents import burst as run
    print(json.dumps(run((host, int(port)), int(n))))


def converse(host: str, port: str, n: str, per: str) -> None:
    from agents import converse as run
    print(json.dumps(run((host, int(port)), int(n), int(per), timeout=90, retry=0.5)))


def flow(host: str, port: str, seconds: str) -> None:
    from agents import flow as run
    end = time.monotonic() + float(seconds)
    run((host, int(port)), lambda: time.monotonic() < end, lambda: print(f"{time.time():.3f}", flush=True), 0.02)


def sniff(iface: str, port: str, seconds: str) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))  # all protocols
    s.bind((iface, 0))
    s.settimeout(0.2)
    end = time.monotonic() + float(seconds)
    want = int(port)
    while time.monotonic() < end:
        try:
            pkt = s.recv(65536)
        except TimeoutError:
            continue
        v = pkt[0] >> 4
        if v == 4 and pkt[9] == 17:
            udp = pkt[(pkt[0] & 15) * 4:]
        elif v == 6 and pkt[6] == 17:
            udp = pkt[40:]
        else:
            continue
        if struct.unpack("!H", udp[2:4])[0] == want:
            print(udp[8:].hex(), flush=True)


def attack(host: str, port: str, capfile: str, seconds: str) -> None:
    from udp_tunnel.wire import proto
    caps = [bytes.fromhex(line) for line in open(capfile).read().split()]
    forged = proto.Codec(b"guessed key").encode(proto.Control(proto.KEEPALIVE, 0, 1, 2, 3))
    s = socket.socket(fam(host), socket.SOCK_DGRAM)
    s.settimeout(0.1)
    target = (host, int(port))
    end = time.monotonic() + float(seconds)
    control = data = 0
    while time.monotonic() < end:
        for c in caps + [forged]:  # keep replaying while clients arrive
            s.sendto(c, target)
        until = time.monotonic() + 0.5
        while time.monotonic() < until:
            try:
                d = s.recv(65536)
            except TimeoutError:
                continue
            if len(d) == proto.CTRL_LEN and d[:4] == proto.MAGIC:
                control += 1
            else:
                data += 1
    print(json.dumps({"replayed": len(caps), "control_received": control, "client_datagrams": data}))


def spray_datagram(rng: random.Random, i: int) -> bytes:
    """What a scanner or an attacker without the server's public key can send."""
    k = i % 6
    if k == 0:  # junk of any size
        return rng.randbytes(rng.randrange(0, 1400))
    if k == 1:  # an initiation with a random MAC1
        return bytes([1, 0, 0, 0]) + rng.randbytes(144)
    if k == 2:  # an initiation with a MAC1 for another server's key
        body = bytes([1, 0, 0, 0]) + rng.randbytes(112)
        key = hashlib.blake2s(b"mac1----" + rng.randbytes(32)).digest()
        return body + hashlib.blake2s(body, digest_size=16, key=key).digest() + bytes(16)
    if k == 3:  # transport data of a guessed session
        return bytes([4, 0, 0, 0]) + rng.randbytes(rng.choice((28, 60, 1404)))
    if k == 4:  # a response, a cookie reply: never what a client opens with
        return bytes([2, 0, 0, 0]) + rng.randbytes(88)
    return bytes([3, 0, 0, 0]) + rng.randbytes(60)


def drain(socks: list) -> int:
    """Read what came back on non-blocking sockets; how many datagrams."""
    import select
    n = 0
    for s in select.select(socks, [], [], 0)[0]:
        try:
            while s.recv(65536) is not None:
                n += 1
        except OSError:
            pass
    return n


def spray(host: str, port: str, rate: str, seconds: str, nports: str) -> None:
    rng = random.Random(99)
    socks = []
    for _ in range(int(nports)):
        s = socket.socket(fam(host), socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("", 0))
        socks.append(s)
    target, total = (host, int(port)), int(float(rate) * float(seconds))
    per_tick, tick = max(1, int(float(rate) / 100)), 0.01
    sent = received = errors = 0
    start = t0 = time.monotonic()
    end = t0 + float(seconds) + 5  # bounded in time even if the machine is slow
    while sent < total and time.monotonic() < end:
        for _ in range(min(per_tick, total - sent)):
            try:
                socks[sent % len(socks)].sendto(spray_datagram(rng, sent), target)
            except OSError:
                errors += 1
            sent += 1
        received += drain(socks)
        t0 += tick
        time.sleep(max(0.0, t0 - time.monotonic()))
    took = time.monotonic() - start
    time.sleep(0.5)
    received += drain(socks)
    print(json.dumps({"sent": sent - errors, "send_errors": errors, "ports": len(socks),
                      "received": received, "seconds": round(took, 2)}))


def stream(n: int):
    rng = random.Random(1234)
    while n > 0:
        k = min(n, 65536)
        yield rng.randbytes(k)
        n -= k


def tcpserve(host: str, port: str, nbytes: str) -> None:
    srv = socket.socket(fam(host), socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port)))
    srv.listen(1)
    conn, _ = srv.accept()
    for chunk in stream(int(nbytes)):
        conn.sendall(chunk)
    conn.close()


def tcpfetch(host: str, port: str, nbytes: str) -> int:
    want = hashlib.sha256()
    for chunk in stream(int(nbytes)):
        want.update(chunk)
    got, n = hashlib.sha256(), 0
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as c:
        while True:
            b = c.recv(65536)
            if not b:
                break
            got.update(b)
            n += len(b)
    dt = time.monotonic() - t0
    print(json.dumps({"bytes": n, "intact": got.digest() == want.digest(), "seconds": round(dt, 2),
                      "mbit_s": round(n * 8 / dt / 1e6, 1)}))
    return 0 if n == int(nbytes) and got.digest() == want.digest() else 1


if __name__ == "__main__":
    rc = globals()[sys.argv[1]](*sys.argv[2:])
    sys.exit(rc or 0)
