"""Log lines: journald priority prefixes, rate-limited repeats that are never silenced for good."""

from __future__ import annotations

import io

from udp_tunnel.ops.log import DEBUG, INFO, Log


def test_priority_prefix_when_not_a_terminal_and_level_filtering():
    out = io.StringIO()
    log = Log(INFO, out)
    log.info("started")
    log.warning("careful")
    log.debug("noise")
    assert out.getvalue() == "<6>started\n<4>careful\n"


def test_repeats_are_rate_limited_and_counted_then_shown_again():
    now = [100.0]
    out = io.StringIO()
    log = Log(DEBUG, out, interval=10.0, clock=lambda: now[0])
    for _ in range(5):
        log.limited("nospare", "no spare tunnel")
    now[0] += 10.5
    log.limited("nospare", "no spare tunnel")
    log.limited("other", "another warning")
    assert out.getvalue().splitlines() == [
        "<4>no spare tunnel",
        "<4>no spare tunnel (4 more like this not shown)",
        "<4>another warning",
    ]
