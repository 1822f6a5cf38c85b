"""The outside agent's route table: per endpoint (the local port a datagram arrived on,
by index), source address -> Flow, for both directions of every bound tunnel.

A client's datagrams arrive on its service's endpoint and go up from the tunnel endpoint;
the tunnel's come back on the tunnel endpoint and go to the client from the client's
endpoint (`Flow.via`). With one port for everything (`-l PORT`) both are endpoint 0.

The core changes the table only through the methods below, and each moves `version`;
the I/O layer reads it (`get` for endpoint 0, `gets[via]`, `version`) and may cache what it
read until the version moves: a cache can't go stale by a forgotten bump. A `listener`, when
set (the kernel data path), is told of every change at the same point, and of a change of
the core's rules (`rules_changed`).
"""

from __future__ import annotations

from typing import Protocol

from udp_tunnel.core.common import Flow


class RouteListener(Protocol):
    def routed(self, client: tuple, tunnel: tuple, up: Flow, down: Flow) -> None: ...
    def unrouted(self, client: tuple, tunnel: tuple, up: Flow, down: Flow) -> None: ...
    def rules_changed(self) -> None: ...


class RouteTable:
    __slots__ = ("_flows", "gets", "get", "version", "listener")

    def __init__(self) -> None:
        self._flows: list[dict[tuple, Flow]] = []  # per endpoint, each added by add_endpoint()
        self.gets: list = []  # the fast paths' one lookup, per endpoint
        self.get = {}.get  # endpoint 0's, once there is one
        self.version = 0
        self.listener: RouteListener | None = None

    def __len__(self) -> int:
        return sum(len(f) for f in self._flows)

    def items(self) -> list[tuple[int, tuple, Flow]]:
        """(via, address, flow) of every endpoint."""
        return [(v, a, f) for v, flows in enumerate(self._flows) for a, f in flows.items()]

    def pairs(self) -> list[tuple[tuple, tuple, Flow, Flow]]:
        """(client, tunnel, up, down) of every bound tunnel, as the listener is told of them."""
        return [(a, f.dst, f, self._flows[f.via][f.dst]) for flows in self._flows for a, f in flows.items() if f.up]

    def add_endpoint(self) -> int:
        self._flows.append({})
        self.gets.append(self._flows[-1].get)
        self.get = self.gets[0]
        return len(self._flows) - 1

    def _changed(self, gone: tuple | None, new: tuple | None) -> None:
        self.version += 1
        if self.listener is not None:
            if gone is not None:
                self.listener.unrouted(*gone)
            if new is not None:
                self.listener.routed(*new)

    def rules_changed(self) -> None:
        """The core's rule of what it must see changed on an endpoint (a reload added or removed a
        WireGuard service): every flow is as it was, but what is forwarded without the core is not."""
        self.version += 1
        if self.listener is not None:
            self.listener.rules_changed()

    def bind(self, client: tuple, tunnel: tuple, cvia: int = 0, tvia: int = 0) -> tuple[Flow, Flow]:
        """Route client (arriving on endpoint cvia) to tunnel (on endpoint tvia) and back: the two
        new flows (up, down)."""
        up = self._flows[cvia][client] = Flow(tunnel, tvia, up=True)
        down = self._flows[tvia][tunnel] = Flow(client, cvia)
        self._changed(None, (client, tunnel, up, down))
        return up, down

    def unbind(self, client: tuple, tunnel: tuple, cvia: int = 0, tvia: int = 0) -> None:
        up = self._flows[cvia].pop(client)
        down = self._flows[tvia].pop(tunnel)
        self._changed((client, tunnel, up, down), None)

    def move_tunnel(self, client: tuple, old: tuple, new: tuple, cvia: int = 0, tvia: int = 0) -> None:
        """The tunnel of `client` now receives at `new` (NAT rebinding); its flows go on."""
        up, down = self._flows[cvia][client], self._flows[tvia].pop(old)
        self._changed((client, old, up, down), None)
        self._flows[tvia][new] = down
        up.dst = new
        self._changed(None, (client, new, up, down))

    def move_client(self, tunnel: tuple, old: tuple, new: tuple, cvia: int = 0, tvia: int = 0) -> None:
        """The client of the tunnel at `tunnel` now sends from `new` (a WireGuard client roaming)."""
        up, down = self._flows[cvia].pop(old), self._flows[tvia][tunnel]
        self._changed((old, tunnel, up, down), None)
        self._flows[cvia][new] = up
        down.dst = new
        self._changed(None, (new, tunnel, up, down))
