"""The outside agent's state file is read strictly: a bad one is a warning, never a crash (issue 17, item 10)."""

from __future__ import annotations

import json

import pytest

from agents import converse, free_port
from udp_tunnel.wire import statefile

TID = "5f3a09c2b1d4e877"


def doc(*tunnels) -> bytes:
    return json.dumps({"version": 1, "tunnels": list(tunnels)}).encode()


def test_what_dump_writes_parses_back_to_the_same_entries():
    entries = [(0x5F3A09C2B1D4E877, ("192.0.2.7", 40001)), (0, ("::ffff:198.51.100.3", 1)),
               (2**64 - 1, ("2001:db8::1", 65535)), (7, ("fe80::1%eth0", 9))]
    assert statefile.parse_all(statefile.dump(entries))[0] == entries


def test_a_missing_file_is_no_entries_and_an_empty_list_is_none_either(tmp_path):
    assert statefile.load_all(str(tmp_path / "none")) == ([], {})
    (tmp_path / "s").write_bytes(doc())
    assert statefile.load_all(str(tmp_path / "s")) == ([], {})


@pytest.mark.parametrize("data, problem", [
    (doc([TID, "192.0.2.7", 70000]), "tunnel 1: port 70000 is not in 1-65535"),
    (doc([TID, "192.0.2.7", 0]), "tunnel 1: port 0 is not in 1-65535"),
    (doc([TID, "192.0.2.7", -1]), "tunnel 1: port -1 is not in 1-65535"),
    (doc([TID, "192.0.2.7", True]), "tunnel 1: port True is not in 1-65535"),
    (doc([TID, "192.0.2.7", 9.5]), "tunnel 1: port 9.5 is not in 1-65535"),
    (doc([TID, "192.0.2.7", "9"]), "tunnel 1: port '9' is not in 1-65535"),
    (doc([TID, "192.0.2.7", 9], [TID, "192.0.2.7\u0000", 9]), "tunnel 2: host '192.0.2.7\\x00' is not an IP address"),
    (doc([TID, "192.0.2.7\n", 9]), "tunnel 1: host '192.0.2.7\\n' is not an IP address"),
    (doc([TID, "vps.example.com", 9]), "tunnel 1: host 'vps.example.com' is not an IP address"),
    (doc([TID, "192.0.2.256", 9]), "tunnel 1: host '192.0.2.256' is not an IP address"),
    (doc([TID, "1" * 100, 9]), "tunnel 1: host '" + "1" * 39 + "...1111' is not an IP address"),  # cut short
    (doc([TID, 3221225991, 9]), "tunnel 1: host 3221225991 is not an IP address"),
    (doc([TID, "0.0.0.0", 9]), "tunnel 1: host '0.0.0.0' is not a unicast address"),
    (doc([TID, "::", 9]), "tunnel 1: host '::' is not a unicast address"),
    (doc([TID, "::ffff:0.0.0.0", 9]), "tunnel 1: host '::ffff:0.0.0.0' is not a unicast address"),
    (doc([TID, "255.255.255.255", 9]), "tunnel 1: host '255.255.255.255' is not a unicast address"),
    (doc([TID, "224.0.0.1", 9]), "tunnel 1: host '224.0.0.1' is not a unicast address"),
    (doc([TID, "ff02::1", 9]), "tunnel 1: host 'ff02::1' is not a unicast address"),
    (doc(["5f3a", "192.0.2.7", 9]), "tunnel 1: tunnel id '5f3a' is not 16 hex digits"),
    (doc(["0x5f3a09c2b1d4e877", "192.0.2.7", 9]), "tunnel 1: tunnel id '0x5f3a09c2b1d4e877' is not 16 hex digits"),
    (doc(["5f3a09c2b1d4e8770", "192.0.2.7", 9]), "tunnel 1: tunnel id '5f3a09c2b1d4e8770' is not 16 hex digits"),
    (doc([12, "192.0.2.7", 9]), "tunnel 1: tunnel id 12 is not 16 hex digits"),
    (doc([TID, "192.0.2.7"]), "tunnel 1: not [tunnel id, host, port]"),
    (doc({"tid": TID}), "tunnel 1: not [tunnel id, host, port]"),
    (b'{"version": 1, "tunnels": [["' + TID.encode() + b'", "192.0.2.7", NaN]]}', "is not JSON: NaN is not a number"),
    (b"[" * 100_000 + b"]" * 100_000, "is not JSON: nested too deep"),
    (b"\xff\xfe{}", "is not JSON: 'utf-8' codec can't decode byte 0xff in position 0"),
    (b'{"version": 1, "tunnels": []}\0', "holds a NUL byte"),
    (b'{"version": 2, "tunnels": []}', "is not one this version wrote"),
    (b'{"version": 1, "tunnels": {}}', "is not one this version wrote"),
    (b"[]", "is not one this version wrote"),
    (b"", "is not JSON: Expecting value: line 1 column 1 (char 0)"),
    (b'{"version": 1, "tunnels": [], "wireguard": {"wg": ["zz"]}}',
     "wireguard: 'wg' is not a service with up to 4096 MAC1s"),
    (b'{"version": 1, "tunnels": [], "wireguard": {"wg": ["' + b"ab" * 16 + b'"] }, "x": 1}',
     "is not one this version wrote"),
    (b'{"version": 1, "tunnels": [], "wireguard": []}', "wireguard is not a table of services"),
])
def test_a_bad_state_file_is_refused_as_a_whole_with_one_line_saying_what_is_wrong(tmp_path, data, problem):
    path = tmp_path / "outside.state"
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
        statefile.load_all(str(path))
    message = str(e.value)
    assert message.startswith(f"the state file {path}") and problem in message and "\n" not in message


def test_a_file_with_more_entries_or_bytes_than_the_agent_holds_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(statefile, "MAX_ENTRIES", 3)  # as if one key's agent held 3 tunnels
    four = doc(*[[f"{i:016x}", "192.0.2.7", 9] for i in range(4)])
    with pytest.raises(ValueError, match=r"lists 4 tunnels, more than the agent holds \(3\)$"):
        statefile.parse_all(four, max_entries=3)
    assert len(statefile.parse_all(doc(*[[f"{i:016x}", "192.0.2.7", 9] for i in range(3)]), max_entries=3)[0]) == 3
    assert len(statefile.parse_all(four, max_entries=4)[0]) == 4  # an agent of several keys holds more
    monkeypatch.setattr(statefile, "max_bytes", lambda max_entries: 100)
    path = tmp_path / "big"
    path.write_bytes(doc([TID, "192.0.2.7", 9]) + b" " * 100)
    with pytest.raises(ValueError, match=r"is too big \(101 bytes, at most 100\)$"):
        statefile.load_all(str(path))  # reads at most one byte more than allowed


def test_an_unreadable_state_file_is_a_value_error_of_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot read the state file .*: Is a directory$"):
        statefile.load_all(str(tmp_path))


@pytest.mark.parametrize("entry, problem", [
    ([TID, "127.0.0.1", 70000], "tunnel 1: port 70000 is not in 1-65535"),  # was OverflowError at start-up
    ([TID, "127.0.0.1\u0000", 9], "tunnel 1: host '127.0.0.1\\x00' is not an IP address"),  # was a TypeError
])
def test_the_outside_agent_with_a_bad_state_file_starts_warns_in_one_line_and_serves(lab, tmp_path, entry, problem):
    state = tmp_path / "out.state"
    state.write_bytes(doc(entry))
    svc = lab.echo()
    port = free_port()
    out = lab.agent("outside", ["-l", f"127.0.0.1:{port}", "-t", "1", "--state-file", str(state)])
    lab.agent("inside", ["-s", svc.addr, "-o", f"127.0.0.1:{port}", "-t", "1"])
    out.wait_status(lambda s: s["spares"] >= 1)
    r = converse(("127.0.0.1", port), n_clients=2, per_client=3)
    assert r["done"] == 2 and r["wrong"] == 0
    warnings = [line for line in out.log().splitlines() if "state file" in line]
    assert warnings == [f"<4>the state file {state}: {problem}: tunnels register again at their next keepalive"]
    assert "Traceback" not in out.log() and out.proc.poll() is None
