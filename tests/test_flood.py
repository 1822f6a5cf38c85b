"""Issues 7 and 17 (hostile internet), the short version of `make flood` (tests/flood.py):
under a replay flood of captured control datagrams (of a known session, and of a
session the outside does not know, from the inside's own address), a spray of new
source ports from one host and from 200 addresses, each at 2000/s for 3 s on loopback, the established client loses
< 1 % of its datagrams, >= 90 % of the new clients arriving during the flood
are answered within 1 s (resending every 0.25 s), and both agents stay alive
under 200 MB RSS. About 10 s per scenario."""

from __future__ import annotations

import pytest

from flood import checks, report, run_scenario

SECONDS = 3.0
RATE = 2000.0
CLIENTS_PER_SECOND = 4.0  # 12 new clients: one may miss
FLOW_RATE = 200.0  # 600 datagrams of the established client during the flood


@pytest.mark.parametrize("kind", ["replay", "spray", "ureplay", "mspray"])
def test_agents_under_flood_keep_serving_old_and_new_clients(kind, tmp_path):
    r = run_scenario(kind, seconds=SECONDS, rate=RATE, cps=CLIENTS_PER_SECOND, keepalive=2.0,
                     flow_rate=FLOW_RATE, tmp=tmp_path)
    text = report(r)
    print(text)
    # the flood really happened (a loose bound: the sender shares the cores)
    assert r["flood"]["sent"] >= 0.5 * RATE * SECONDS, text
    if kind in ("replay", "ureplay"):
        assert r["captured"] >= 4, text
    assert r["est"]["sent"] >= 0.5 * FLOW_RATE * SECONDS, text
    assert r["new"]["total"] == int(SECONDS * CLIENTS_PER_SECOND), text
    missed = [name for name, ok in checks(r) if not ok]
    assert not missed, f"missed: {'; '.join(missed)}\n{text}"
