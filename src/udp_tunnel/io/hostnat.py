"""Where this host sends a packet, and whether it NATs it on the way.

The kernel data path sends a rewritten datagram out with bpf_redirect_neigh,
which skips netfilter: a source NAT this host would apply in POSTROUTING
(an agent on the home router, whose own traffic is masqueraded on the WAN
interface) would not happen. Such a direction must stay with the agent. This
module answers the two questions that decision needs:

- `route_get(dst, src)`: the route the kernel picks for a packet from `src`
  to `dst` (rtnetlink RTM_GETROUTE through io/rtnl.py, the same lookup as `ip route get`):
  whether `dst` is a local address, and the egress interface.
- `NatRules.load()`: the host's source NAT rules (masquerade and snat) from
  `nft -j list ruleset` (which also shows what iptables-nft added), and from
  legacy iptables when its nat tables are loaded (`iptables-legacy-save`);
  `applies(src, ifname)` says which rule would rewrite a packet from `src`
  leaving through `ifname`, looking at the rule's output interface and source
  address matches (a rule with other matches is taken to apply: when unsure,
  the direction stays in user space). When the rules cannot be read (the nat
  tables are in use but no tool to list them is installed), every direction
  counts as NATed.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import shutil
import socket
import subprocess
from typing import NamedTuple

from udp_tunnel.io.rtnl import RTN_LOCAL, Netlink

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Route(NamedTuple):
    kind: int  # RTN_*: RTN_LOCAL for an address of this host
    oif: str | None  # the egress interface
    prefsrc: IPAddress | None  # the source address the kernel would choose

    @property
    def local(self) -> bool:
        return self.kind == RTN_LOCAL


def route_get(dst: IPAddress, src: IPAddress | None = None) -> Route | None:
    """The kernel's route for a packet from src (a local address, or None) to dst; None if there is none."""
    family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
    try:
        with Netlink() as nl:
            r = nl.route_get(family, str(dst), None if src is None else str(src))
    except OSError:
        if src is not None:  # e.g. src is no longer an address of this host: ask without it
            return route_get(dst, None)
        return None
    oif = None
    if r.oif is not None:
        try:
            oif = socket.if_indextoname(r.oif)
        except OSError:
            pass
    return Route(r.type, oif, ipaddress.ip_address(r.prefsrc) if r.prefsrc else None)


class NatRule(NamedTuple):
    versions: frozenset[int]  # IP versions it applies to
    oif_in: tuple[str, ...] | None  # it applies only to these output interfaces (patterns), or to any
    oif_out: tuple[str, ...]  # never to these
    src_in: tuple[Network, ...] | None  # only to these sources, or to any
    src_out: tuple[Network, ...]
    text: str  # for the log: where it comes from

    def applies(self, src: IPAddress | None, ifname: str | None) -> bool:
        if src is not None and src.version not in self.versions:
            return False
        if ifname is not None:
            if self.oif_in is not None and not any(fnmatch.fnmatchcase(ifname, p) for p in self.oif_in):
                return False
            if any(fnmatch.fnmatchcase(ifname, p) for p in self.oif_out):
                return False
        if src is not None:
            if self.src_in is not None and not any(src in n for n in self.src_in if n.version == src.version):
                return False
            if any(src in n for n in self.src_out if n.version == src.version):
                return False
        return True


class NatRules:
    def __init__(self, rules: list[NatRule], unknown: str | None = None) -> None:
        self.rules = rules
        self.unknown = unknown  # why the rules could not be read (then everything counts as NATed)

    @classmethod
    def load(cls) -> NatRules:
        rules: list[NatRule] = []
        unknown = None
        nft = shutil.which("nft")
        if nft:
            try:
                r = subprocess.run([nft, "-j", "list", "ruleset"], capture_output=True, text=True, timeout=10)
                if r.returncode == 0:
                    rules += parse_nft(json.loads(r.stdout or "{}"))
                else:
                    unknown = f"nft -j list ruleset failed: {r.stderr.strip()[:200]}"
            except (OSError, subprocess.TimeoutExpired, ValueError) as e:
                unknown = f"nft -j list ruleset failed: {e}"
        elif _nf_nat_in_use():
            unknown = "the kernel's NAT is loaded but there is no nft command to list the rules"
        for version, names, tools in ((4, "/proc/net/ip_tables_names", ("iptables-legacy-save", "iptables-save")),
                                      (6, "/proc/net/ip6_tables_names",
                                       ("ip6tables-legacy-save", "ip6tables-save"))):
            try:
                with open(names) as f:
                    tables = f.read().split()
            except OSError:
                tables = []
            if "nat" not in tables:
                continue
            tool = next((shutil.which(t) for t in tools if shutil.which(t)), None)
            if tool is None:
                unknown = f"legacy iptables has a nat table (IPv{version}) but no {tools[0]} to list it"
                continue
            try:
                r = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True, timeout=10)
                rules += parse_iptables(r.stdout, version)
            except (OSError, subprocess.TimeoutExpired) as e:
                unknown = f"{tool} failed: {e}"
        return cls(rules, unknown)

    def applies(self, src: IPAddress | None, ifname: str | None) -> str | None:
        """Why a packet from src leaving through ifname would be source-NATed by this host, or None."""
        if self.unknown:
            return self.unknown
        for r in self.rules:
            if r.applies(src, ifname):
                return r.text
        return None


def _nf_nat_in_use() -> bool:
    return any(os.path.exists(f"/sys/module/{m}") for m in ("nf_nat", "nft_masq", "nft_nat"))


def _names(right) -> tuple[str, ...]:
    if isinstance(right, str):
        return (right,)
    if isinstance(right, dict) and "set" in right:
        return tuple(x for x in right["set"] if isinstance(x, str))
    return ()


def _nets(right) -> tuple[Network, ...]:
    items = right["set"] if isinstance(right, dict) and "set" in right else [right]
    out = []
    for x in items:
        try:
            if isinstance(x, str):
                out.append(ipaddress.ip_network(x, strict=False))
            elif isinstance(x, dict) and "prefix" in x:
                out.append(ipaddress.ip_network(f"{x['prefix']['addr']}/{x['prefix']['len']}", strict=False))
            elif isinstance(x, dict) and "range" in x:
                lo, hi = (ipaddress.ip_address(a) for a in x["range"])
                out.extend(ipaddress.summarize_address_range(lo, hi))
        except (ValueError, KeyError, TypeError):
            return ()  # a set we cannot read: take the match to be anything (the rule applies)
    return tuple(out)


def parse_nft(ruleset: dict) -> list[NatRule]:
    """The source NAT rules in `nft -j list ruleset` output."""
    rules = []
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not rule:
            continue
        exprs = rule.get("expr", [])
        if not any(isinstance(e, dict) and ("masquerade" in e or "snat" in e) for e in exprs):
            continue
        family = rule.get("family", "ip")
        versions = frozenset({"ip": {4}, "ip6": {6}}.get(family, {4, 6}))
        oif_in, oif_out, src_in, src_out = None, [], None, []
        for e in exprs:
            m = e.get("match") if isinstance(e, dict) else None
            if not m:
                continue
            left, right, op = m.get("left", {}), m.get("right"), m.get("op", "==")
            if not isinstance(left, dict):
                continue
            if left.get("meta", {}).get("key") in ("oifname", "oif"):
                names = _names(right)
                if op in ("==", "in"):
                    oif_in = names if oif_in is None else tuple(n for n in oif_in if n in names)
                elif op == "!=":
                    oif_out += names
            elif left.get("payload", {}).get("field") == "saddr" and left["payload"].get("protocol") in ("ip",
                                                                                                            "ip6"):
                nets = _nets(right)
                if not nets:
                    continue
                if op in ("==", "in"):
                    src_in = nets if src_in is None else src_in + nets
                elif op == "!=":
                    src_out += nets
        where = f"nft {family} {rule.get('table')} {rule.get('chain')} handle {rule.get('handle')}"
        rules.append(NatRule(versions, oif_in, tuple(oif_out), src_in, tuple(src_out), where))
    return rules


def parse_iptables(text: str, version: int) -> list[NatRule]:
    """The source NAT rules in `iptables-save -t nat` output."""
    rules = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] != "-A" or "-j" not in words:
            continue
        target = words[words.index("-j") + 1] if words.index("-j") + 1 < len(words) else ""
        if target not in ("MASQUERADE", "SNAT"):
            continue
        oif_in, oif_out, src_in, src_out = None, [], None, []
        for i, w in enumerate(words[:-1]):
            neg = i > 0 and words[i - 1] == "!"
            if w in ("-o", "--out-interface"):
                name = words[i + 1].replace("+", "*")  # iptables' wildcard
                if neg:
                    oif_out.append(name)
                else:
                    oif_in = (name,)
            elif w in ("-s", "--source"):
                try:
                    nets = tuple(ipaddress.ip_network(x, strict=False) for x in words[i + 1].split(","))
                except ValueError:
                    continue
                if neg:
                    src_out += nets
                else:
                    src_in = nets
        rules.append(NatRule(frozenset({version}), oif_in, tuple(oif_out), src_in, tuple(src_out),
                             f"iptables (IPv{version}) {line.strip()}"))
    return rules
