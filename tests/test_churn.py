"""Issue 18 (sustained churn), the short version of `make churn` (tests/churn.py): new
clients from one address, each from a fresh source port, 3 round trips each and gone,
through our agents on loopback (inside --timeout 3, both -t 3, limits raised). About 12 s."""

from __future__ import annotations

from churn import ROUND_TRIPS, run_churn, run_note

RATE = 100.0
SECONDS = 5.0


def test_every_client_of_a_steady_churn_gets_all_its_answers(tmp_path):
    r = run_churn("ours", RATE, SECONDS, tmp_path)
    text = run_note(r)
    print(text)
    clients = int(RATE * SECONDS)
    assert r["planned"] == clients, text
    assert r["started"] == clients, text  # the generator kept up: nobody was left out by it
    assert r["alive"] == [True, True], text
    assert (r["wrong"], r["crossed"]) == (0, 0), text  # no client got anything but its own echoes
    assert (r["complete"], r["some"], r["none"]) == (clients, 0, 0), text
    assert r["answers"] == clients * ROUND_TRIPS, text
