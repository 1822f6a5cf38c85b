"""Every counter the code produces is named in core/counters.py, every name there is produced
somewhere, and each shows up in `udp-tunnel status` and in the metrics under its name."""

from __future__ import annotations

import ast
import errno
import io
import pathlib
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from udp_tunnel.core import counters
from udp_tunnel.core.admission import WG_REASONS
from udp_tunnel.core.inside import InsideCore
from udp_tunnel.core.outside import OutsideCore
from udp_tunnel.io.inside import ACTION_SITE, inside_loop
from udp_tunnel.io.outside import outside_loop
from udp_tunnel.ops import metrics, status
from udp_tunnel.ops.log import INFO, Log

SRC = pathlib.Path(__file__).resolve().parent.parent / "src" / "udp_tunnel"


def produced() -> tuple[set[str], set[str], set[str]]:
    """The literal counter keys in the source: stats["..."] (and "drop_" + "..." pieces),
    and the sites given to net_error / net_errno."""
    keys, prefixes, sites = set(), set(), set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == "stats":
                sl = node.slice
                if isinstance(sl, ast.Constant):
                    keys.add(sl.value)
                elif isinstance(sl, ast.BinOp) and isinstance(sl.left, ast.Constant):
                    prefixes.add(sl.left.value)
                elif isinstance(sl, ast.JoinedStr) and isinstance(sl.values[0], ast.Constant):
                    prefixes.add(sl.values[0].value)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("net_error", "net_errno") and isinstance(node.args[0], ast.Constant):
                sites.add(node.args[0].value)
    return keys, prefixes, sites


KEYS, PREFIXES, SITES = produced()


def test_every_literal_counter_in_the_code_is_named_in_counters():
    named = {counters.drop(r) for r in counters.DROPS} | set(counters.EVENTS)
    assert KEYS - named == set()
    assert PREFIXES == {"drop_", "drop_wg_"}  # f"drop_{e.args[0]}" (auth, malformed), "drop_wg_" + why
    assert {"wg_" + w for w in WG_REASONS} <= set(counters.DROPS)


def test_every_name_in_counters_is_produced_by_the_code():
    made = {k[5:] for k in KEYS if k.startswith("drop_")} | {"auth", "malformed"} | {"wg_" + w for w in WG_REASONS}
    assert set(counters.DROPS) - made == set()
    assert set(counters.EVENTS) - KEYS == set()
    assert set(counters.ERROR_SITES) == SITES | set(ACTION_SITE.values())


def loops(tmp_path):
    log = Log(INFO, io.StringIO())
    now = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    out = outside_loop(OutsideCore(secret=b"k", keepalive=5, max_clients=10, family=socket.AF_INET, now=now,
                                   log=log), sock, log)
    core = InsideCore(secret=b"k", keepalive=5, timeout=10, spares=1, max_clients=10, now=now, log=log)
    ins = inside_loop(core, ("127.0.0.1", 9), (socket.AF_INET, ("127.0.0.1", 9)),
                      (socket.AF_INET, ("127.0.0.1", 9)), log)
    return {"outside": out, "inside": ins}


@pytest.mark.parametrize("role", ["outside", "inside"])
def test_each_error_site_shows_in_status_and_in_the_metrics_under_its_name(role, tmp_path):
    loop = loops(tmp_path)[role]
    try:
        sites = counters.for_role(counters.ERROR_SITES, role)
        for k, site in enumerate(sites, 1):
            for _ in range(k):
                loop.net_error(site, OSError(errno.EPERM, "Operation not permitted"))
        loop.internal_error("test", RuntimeError("a bug"))
        loop.publish(time.monotonic())
        snap = loop.snapshot
        snap.update(version="t", pid=1, name=role, key=True)
        families = {f.name: f for f in text_string_to_metric_families(metrics.render(snap))}
        errs = {(s.labels["site"], s.labels["errno"]): s.value for s in families["udp_tunnel_network_errors"].samples}
        assert errs == {(site, "EPERM"): k for k, site in enumerate(sites, 1)}
        dropped = {s.labels["reason"]: s.value for s in families["udp_tunnel_dropped"].samples}
        assert dropped["send_error"] == sum(range(1, len(sites) + 1))
        assert set(dropped) == set(counters.for_role(counters.DROPS, role)) - {
            r for r in counters.DROPS if r.startswith("wg_")} | {"send_error"}
        assert families["udp_tunnel_internal_errors"].samples[0].value == 1
        text = status.render(snap)  # counters in words: error_open_tunnel_EPERM is "error open tunnel EPERM"
        for k, site in enumerate(sites, 1):
            assert f"{k} error {site.replace('_', ' ')} EPERM" in text
        assert "1 internal RuntimeError" in text
    finally:
        loop.close()
