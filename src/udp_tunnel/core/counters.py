"""Every counter an agent keeps, named once.

A core counts in its `stats` (a Counter) under `drop_<reason>` for a datagram or
registration it refused, and under an event's name for what happened; the I/O
layer counts network errors under `error_<site>_<ERRNO>` and contained bugs
under `internal_<Exception>`. `udp-tunnel status` and the metrics show them by
these names; tests check that the code produces no other name and that every
name here is produced somewhere.
"""

from __future__ import annotations

OUTSIDE, INSIDE, BOTH = "outside", "inside", "both"

# reason -> (the agents that count it, what it means)
DROPS: dict[str, tuple[str, str]] = {
    "auth": (BOTH, "a control message whose tag no key verifies (wrong key?)"),
    "malformed": (BOTH, "a control-looking datagram that does not parse"),
    "replay": (BOTH, "a control message seen before (replayed)"),
    "closed_tunnel": (OUTSIDE, "a keepalive of a tunnel the inside closed (replayed)"),
    "session": (OUTSIDE, "a keepalive naming a tunnel of another inside session"),
    "rate": (OUTSIDE, "a challenge over its budget (per session, for tunnels' addresses, per source, in all)"),
    "sessions": (OUTSIDE, "a new inside session while the table of sessions is full"),
    "limit": (BOTH, "a new client or tunnel over --max-clients"),
    "stale_tunnel": (OUTSIDE, "an active tunnel this agent does not know (not after a restart)"),
    "stale_client": (OUTSIDE, "an active tunnel whose client is a tunnel's address"),
    "spoofed_activation": (OUTSIDE, "a spare the inside took into use without a client from here"),
    "unbound_tunnel": (OUTSIDE, "data from the address of a tunnel without a client (spare, orphan, just evicted)"),
    "no_service": (OUTSIDE, "data from a stranger to the tunnel port, where no service listens"),
    "hold_full": (OUTSIDE, "a new client's datagram over the hold bounds"),
    "hold_expired": (OUTSIDE, "a new client's datagram held longer than the hold time"),
    "clock": (OUTSIDE, "a legacy keepalive whose clock is off by more than --max-clock-skew"),
    "wg_not_handshake": (OUTSIDE, "WireGuard mode: a new source that is not a handshake initiation"),
    "wg_bad_mac1": (OUTSIDE, "WireGuard mode: an initiation whose MAC1 is wrong"),
    "wg_unknown_session": (OUTSIDE, "WireGuard mode: transport data of no known session"),
    "wg_replay": (OUTSIDE, "WireGuard mode: a copy of an initiation already admitted"),
    "wg_roam_limit": (OUTSIDE, "WireGuard mode: a roaming client's move to a source at its limit"),
    "unregistered_spare": (INSIDE, "data on a spare the outside never registered (spoofed)"),
    "unannounced": (INSIDE, "data on a spare whose client the outside never announced (spoofed)"),
    "unknown_service": (INSIDE, "a client announced for a service this agent does not serve"),
}

# event -> (the agents that count it, what it counts)
EVENTS: dict[str, tuple[str, str]] = {
    "registrations": (BOTH, "tunnels registered"),
    "challenges": (OUTSIDE, "registration challenges sent"),
    "rebinds": (OUTSIDE, "tunnels that moved to a new public address (NAT rebinding)"),
    "held": (OUTSIDE, "new clients' datagrams held while no spare was ready"),
    "hellos": (BOTH, "restart HELLOs sent (outside) or believed (inside)"),
    "wg_roams": (OUTSIDE, "WireGuard clients whose tunnel followed them to a new address"),
    "wg_roam_waits": (OUTSIDE, "roaming datagrams forwarded while the old address was still busy"),
    "evictions": (OUTSIDE, "tunnels of one-shot flows removed to make room for clients that keep talking"),
    "outside_restarts": (INSIDE, "restarts of the outside agent seen"),
    "mappings_changed": (INSIDE, "NAT mappings seen to change"),
    "stall_keepalives": (INSIDE, "keepalives sent early because a client seemed silent"),
    "socket_errors": (INSIDE, "tunnels dropped because no socket could be opened"),
    "client_moves": (INSIDE, "clients announced again at a new address (WireGuard roaming)"),
    "announces": (OUTSIDE, "ANNOUNCEs sent down tunnels: a client, again, moved, or let go"),
}

# Where the I/O layer meets network errors: error_<site>_<ERRNO>.
ERROR_SITES: dict[str, tuple[str, str]] = {
    "receive": (OUTSIDE, "receiving on the listening socket"),
    "send": (OUTSIDE, "sending to a client or a tunnel"),
    "tunnel": (INSIDE, "receiving or sending on a tunnel socket"),
    "service": (INSIDE, "receiving or sending on a service socket"),
    "open_tunnel": (INSIDE, "opening a tunnel socket"),
    "open_service": (INSIDE, "opening a service socket"),
}

INTERNAL = "internal_"  # internal_<ExceptionName>: a bug met a datagram, contained


def drop(reason: str) -> str:
    return "drop_" + reason


def error(site: str, errno_name: str) -> str:
    return f"error_{site}_{errno_name}"


def parse_error(key: str) -> tuple[str, str] | None:
    """(site, errno name) of an error counter's key, None for any other key."""
    if key.startswith("error_"):
        for site in ERROR_SITES:
            if key.startswith(f"error_{site}_"):
                return site, key[len(site) + 7:]
    return None


def for_role(table: dict[str, tuple[str, str]], role: str) -> list[str]:
    """The names of `table` that an agent of `role` counts."""
    return [name for name, (who, _) in table.items() if who in (role, BOTH)]
