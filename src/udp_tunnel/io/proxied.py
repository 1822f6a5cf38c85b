"""PROXY v2 service sockets: a header before the client's datagrams to a PROXY-protocol front.

`--client-address proxy-v2` puts the header before every datagram;
`proxy-v2-first` only before the first datagram of each service socket, since
receivers disagree (frp sent it with every datagram, then only with the first
of a flow). go-mmproxy (Debian's 2.1, and its current source) parses a header
in every datagram and drops one without ("PROXY header missing"): it needs
`proxy-v2`. A `proxy-v2-first` receiver keys a flow by the datagrams' source,
the service socket: so when a client moves, the I/O layer opens a new service
socket for it (moved() returns True) and the new socket's first datagram
carries the new address; with `proxy-v2` the socket stays and the header
changes.

Answers: go-mmproxy sends the service's answers back as they are, with no
header (udpCopyFromUpstream writes the bytes it read), and the I/O layer passes
them on as they are.
"""

from __future__ import annotations

from udp_tunnel.wire import proxy

EVERY, FIRST = "proxy-v2", "proxy-v2-first"


class ProxyFraming:
    """The PROXY v2 state of one client's service socket.

    The I/O layer sends `frame(payload)` with sock.sendmsg (two buffers, no copy of the
    payload), or asks `prefix()` for the bytes to put before the next datagram itself
    (b"" when none: in a batch, a datagram after the first in `proxy-v2-first`)."""

    __slots__ = ("every", "reached", "service", "header", "pending")

    def __init__(self, mode: str, client: tuple, service: tuple, reached: tuple | None = None) -> None:
        if mode not in (EVERY, FIRST):
            raise ValueError(f"PROXY v2 mode {mode!r}: {EVERY} or {FIRST}")
        self.every = mode == EVERY
        self.reached, self.service = reached, service
        self.header = proxy.encode(client, proxy.destination(reached, service))
        self.pending = True  # the next datagram is the socket's first

    def prefix(self) -> bytes:
        if self.every:
            return self.header
        if self.pending:
            self.pending = False
            return self.header
        return b""

    def frame(self, payload: bytes | memoryview) -> list[bytes | memoryview]:
        p = self.prefix()
        return [p, payload] if p else [payload]

    def moved(self, client: tuple) -> bool:
        """The client's new address. True: open a new service socket for the client and
        send through it from now on (this framing's next datagram carries the header
        again); the old socket drains like a transparent socket's (the front answers to
        where a flow came from)."""
        self.header = proxy.encode(client, proxy.destination(self.reached, self.service))
        if self.every:
            return False
        self.pending = True
        return True
