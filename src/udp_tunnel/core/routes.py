"""The outside agent's route table: source address -> Flow, for both directions of
every bound tunnel.

The core changes it only through the methods below, and each moves `version`;
the I/O layer reads it (`get`, `version`) and may cache what it read until the
version moves: a cache can't go stale by a forgotten bump. A `listener`, when
set (the kernel data path), is told of every change at the same point.
"""

from __future__ import annotations

from typing import Protocol

from udp_tunnel.core.common import Flow


class RouteListener(Protocol):
    def routed(self, client: tuple, tunnel: tuple, up: Flow, down: Flow) -> None: ...
    def unrouted(self, client: tuple, tunnel: tuple) -> None: ...


class RouteTable:
    __slots__ = ("_flows", "get", "version", "listener")

    def __init__(self) -> None:
        self._flows: dict[tuple, Flow] = {}
        self.get = self._flows.get  # the fast paths' one lookup
        self.version = 0
        self.listener: RouteListener | None = None

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, addr: tuple) -> bool:
        return addr in self._flows

    def items(self):
        return self._flows.items()

    def _changed(self, gone: tuple[tuple, tuple] | None, new: tuple[tuple, tuple, Flow, Flow] | None) -> None:
        self.version += 1
        if self.listener is not None:
            if gone is not None:
                self.listener.unrouted(*gone)
            if new is not None:
                self.listener.routed(*new)

    def bind(self, client: tuple, tunnel: tuple) -> tuple[Flow, Flow]:
        """Route client -> tunnel and back: the two new flows (up, down)."""
        up = self._flows[client] = Flow(tunnel)
        down = self._flows[tunnel] = Flow(client)
        self._changed(None, (client, tunnel, up, down))
        return up, down

    def unbind(self, client: tuple, tunnel: tuple) -> None:
        del self._flows[client]
        del self._flows[tunnel]
        self._changed((client, tunnel), None)

    def move_tunnel(self, client: tuple, old: tuple, new: tuple) -> None:
        """The tunnel of `client` now receives at `new` (NAT rebinding); its flows go on."""
        up, down = self._flows[client], self._flows.pop(old)
        self._flows[new] = down
        up.dst = new
        self._changed((client, old), (client, new, up, down))

    def move_client(self, tunnel: tuple, old: tuple, new: tuple) -> None:
        """The client of the tunnel at `tunnel` now sends from `new` (a WireGuard client roaming)."""
        up, down = self._flows.pop(old), self._flows[tunnel]
        self._flows[new] = up
        down.dst = new
        self._changed((old, tunnel), (new, tunnel, up, down))
