"""`udp-tunnel status` against agents that misbehave (issue 17, item 8): whose sockets it asks,
what it prints of an answer, and how much time and memory an answer may take."""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from agents import ROOT
from udp_tunnel import cli
from udp_tunnel.ops import status

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown a socket to another user)")
NOBODY = 65534


def snapshot(**over) -> dict:
    """What an outside agent answers, as small as render() takes it."""
    doc = {"role": "outside", "version": "2.0.0", "pid": 42, "name": "mine", "listen": "127.0.0.1:9999",
           "protocol": "v2", "key": True, "uptime": 5.0, "clients": 1, "spares": 0,
           "stats": {"drop_auth": 2},
           "totals": {"datagrams_in": 1, "bytes_in": 64, "datagrams_out": 1, "bytes_out": 64},
           "tunnels": [{"id": "5f3a09c2b1d4e877", "state": "active", "endpoint": "192.0.2.7:40001",
                        "client": "198.51.100.7:51820", "age": 3.0, "last_keepalive": 1.0, "registered": 3.0,
                        "rebinds": 0, "to_inside": {"datagrams": 1, "bytes": 64, "last": 1.0},
                        "to_client": {"datagrams": 1, "bytes": 64, "last": 1.0}}]}
    doc.update(over)
    return doc


class FakeAgent:
    """A control socket that answers every connection with `answer`, `piece` bytes at a time
    every `pace` seconds (at most for `duration` seconds)."""

    def __init__(self, path: str, answer: bytes, piece: int = 1 << 20, pace: float = 0.0,
                 duration: float = 60.0, owner: int | None = None) -> None:
        self.path, self.answer, self.piece, self.pace, self.duration = path, answer, piece, pace, duration
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        if owner is not None:
            os.chown(path, owner, owner)
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.connections = 0
        self.sent = 0
        self.cut = threading.Event()  # the asker went away before the whole answer was sent
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                end = time.monotonic() + self.duration
                try:
                    for i in range(0, len(self.answer), self.piece):
                        if self.stopping or time.monotonic() > end:
                            break
                        conn.sendall(self.answer[i:i + self.piece])
                        self.sent += len(self.answer[i:i + self.piece])
                        time.sleep(self.pace)
                except OSError:
                    self.cut.set()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def place(monkeypatch):
    """A short private directory where agents put their sockets, the only place status looks in."""
    d = tempfile.mkdtemp(prefix="udpt-st-", dir="/tmp")  # a socket path holds at most 107 bytes
    fakes: list[FakeAgent] = []

    class Place:
        dir = d

        def fake(self, name: str, answer: bytes, **kw) -> FakeAgent:
            f = FakeAgent(os.path.join(d, name), answer, **kw)
            fakes.append(f)
            return f

    monkeypatch.setattr(status, "search_dirs", lambda: [d])
    monkeypatch.setattr(status, "UNIT_GLOB", os.path.join(d, "run", "udp-tunnel*", "control.sock"))
    yield Place()
    for f in fakes:
        f.close()
    shutil.rmtree(d)


def status_cmd(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["status", *args])
    got = capsys.readouterr()
    return code, got.out, got.err


@AS_ROOT
def test_run_as_root_status_asks_root_s_sockets_and_not_another_user_s(place, capsys):
    mine = place.fake("mine.sock", json.dumps(snapshot()).encode())
    theirs = place.fake("theirs.sock", json.dumps(snapshot(name="theirs")).encode(), owner=NOBODY)
    code, out, err = status_cmd(capsys)
    assert code == 0 and "  name: mine\n" in out and "theirs" not in out
    assert mine.connections == 1 and theirs.connections == 0  # never even connected to
    assert err == (f"udp-tunnel: not asked (sockets of other users; --control PATH asks one): "
                   f"{place.dir}/theirs.sock\n")
    code, out, err = status_cmd(capsys, "--control", f"{place.dir}/theirs.sock")  # named: asked
    assert code == 0 and "  name: theirs\n" in out and theirs.connections == 1


@AS_ROOT
def test_a_unit_s_socket_owned_by_its_dynamic_user_is_asked_unless_others_can_write_its_parent(place, capsys):
    run = os.path.join(place.dir, "run")
    unit = os.path.join(run, "udp-tunnel-outside")
    os.makedirs(unit)
    os.chmod(run, 0o755)
    os.chown(unit, NOBODY, NOBODY)
    fake = place.fake("run/udp-tunnel-outside/control.sock", json.dumps(snapshot(name="unit")).encode(),
                      owner=NOBODY)
    code, out, err = status_cmd(capsys)
    assert code == 0 and "  name: unit\n" in out and err == "" and fake.connections == 1
    os.chmod(run, 0o777)  # anyone could have made that directory: not a unit's
    code, out, err = status_cmd(capsys)
    assert code == 1 and fake.connections == 1
    assert err.count("\n") == 1 and f"not asked (sockets of other users; --control PATH asks one): {unit}/" in err


def test_a_trickling_socket_is_given_up_within_the_bound_and_the_others_are_still_shown(place, capsys):
    answer = json.dumps(snapshot(name="slow")).encode()
    slow = place.fake("slow.sock", answer, piece=1, pace=0.1)  # the whole answer would take a minute
    place.fake("fast.sock", json.dumps(snapshot(name="fast")).encode())
    code, out, err = status_cmd(capsys)
    assert code == 0 and "  name: fast\n" in out and "slow" not in out
    assert err == f"udp-tunnel: {place.dir}/slow.sock: no complete answer within 2 s\n"
    assert slow.cut.wait(5) and slow.sent < len(answer)  # status hung up while the agent still trickled
    code, out, err = status_cmd(capsys, "--control", slow.path)
    assert (code, out) == (1, "")
    assert err == f"udp-tunnel: cannot ask the agent at {slow.path}: no complete answer within 2 s\n"


def test_the_whole_command_is_bounded_however_many_sockets_trickle(place, capsys, monkeypatch):
    monkeypatch.setattr(status, "PER_SOCKET", 1.0)
    monkeypatch.setattr(status, "DEADLINE", 1.0)
    answer = json.dumps(snapshot()).encode()
    fakes = [place.fake(f"slow{i}.sock", answer, piece=1, pace=0.1) for i in range(status.PARALLEL + 2)]
    code, out, err = status_cmd(capsys)
    lines = err.splitlines()
    assert code == 1 and out == "" and len(lines) == 1
    assert lines[0].count("no complete answer within 1 s") == status.PARALLEL  # the first eight, side by side
    assert lines[0].count("not asked: 1 s were spent on the other agents") == 2  # the rest: no time left
    assert all(f.sent < len(answer) for f in fakes)


def test_an_answer_with_escape_sequences_prints_them_escaped(place, capsys):
    evil = snapshot(name="evil\x1b]0;pwned\x07", listen="\x1b[2J192.0.2.1:9999",
                    stats={"drop_\x1b[31mred": 3, "rebinds\u202e": 1})
    evil["tunnels"][0].update(id="\x9b31m", client="\u202e198.51.100.7:1\r\n")
    place.fake("evil.sock", json.dumps(evil).encode())
    code, out, err = status_cmd(capsys)
    assert code == 0 and err == ""
    assert "  name: evil\\x1b]0;pwned\\x07\n" in out
    assert "  listen: \\x1b[2J192.0.2.1:9999\n" in out
    assert "  dropped: 3 \\x1b[31mred\n" in out and "  events: 1 rebinds\\u202e\n" in out
    assert "tunnel: \\x9b31m (active)\n" in out and "  client: \\u202e198.51.100.7:1\\x0d\\x0a\n" in out
    assert all(c.isprintable() or c == "\n" for c in out)
    code, out, err = status_cmd(capsys, "--json")  # JSON escapes them itself
    assert code == 0 and json.loads(out)["name"] == "evil\x1b]0;pwned\x07" and out.isascii() and "\x1b" not in out


def test_an_oversized_answer_is_refused_with_a_clear_line(place, capsys):
    big = place.fake("big.sock", b'{"role": "' + b"x" * (32 << 20) + b'"}')
    code, out, err = status_cmd(capsys, "--control", big.path)
    assert (code, out) == (1, "")
    assert err == f"udp-tunnel: cannot ask the agent at {big.path}: the answer is larger than 16 MiB: refused\n"
    assert big.cut.wait(5) and big.sent < 32 << 20  # read up to the limit, then hung up


@pytest.mark.parametrize("answer, problem", [
    (b"[" * 100_000, "the answer is not JSON: nested too deep"),
    (b"\xff{}", "the answer is not JSON: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    (b'{"role": "outside"', "the answer is not JSON: Expecting ',' delimiter: line 1 column 19 (char 18)"),
    (b'{"nothing": 1}', "not an agent's answer"),
])
def test_an_answer_that_is_not_an_agent_s_is_one_line_not_a_traceback(place, capsys, answer, problem):
    place.fake("odd.sock", answer)
    code, out, err = status_cmd(capsys)
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert err.endswith(f"; could not ask {place.dir}/odd.sock: {problem}\n")


def test_an_agent_s_answer_of_the_wrong_shape_is_said_in_one_line(place, capsys):
    place.fake("odd.sock", json.dumps(snapshot(uptime="\x1blong", clients=None)).encode())
    code, out, err = status_cmd(capsys)
    assert code == 0 and err == ""
    assert out == ("agent: ? (an answer this version cannot show: ValueError invalid literal for int() "
                   "with base 10: '\\\\x1blong'; --json prints it)\n")


def test_status_py_offers_functions_and_does_not_import_the_command_line():
    tree = ast.parse(open(os.path.join(ROOT, "src/udp_tunnel/ops/status.py")).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m.startswith("udp_tunnel.") and not m.startswith("udp_tunnel.ops") for m in imported), imported


def test_a_wrong_status_command_line_is_one_line_that_points_to_the_status_help(capsys):
    assert status_cmd(capsys, "--bogus") == (
        2, "", "udp-tunnel: unrecognized arguments: --bogus (see udp-tunnel status --help)\n")
    assert status_cmd(capsys, "x", "--control", "/x") == (
        2, "", "udp-tunnel: give NAME or --control PATH, not both (see udp-tunnel status --help)\n")
