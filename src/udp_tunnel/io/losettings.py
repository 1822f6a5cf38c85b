"""The settings of lo that the kernel data path turns on (io/kernel.py says why each is
needed), and setting them back when the last agent that relies on them stops.

Agents find each other without any file or privilege: each one with the kernel path open
binds an abstract Unix socket `@udp-tunnel-kernel/PID.N` (abstract names, like these
settings, belong to a network namespace, and /proc/thread-self/net/unix lists them), and
one more per setting that it turned on, or found turned on by another agent,
`@udp-tunnel-kernel/PID.N/SETTING=OLD` (OLD: its value before the first agent turned it
on). An agent that stops sets back those it holds, unless another agent is still there
(that one holds them too when it found them turned on by an agent, and sets them back
when it stops). An agent that starts meanwhile is seen by a second look after setting
back: then they are turned on again. An agent killed with SIGKILL sets nothing back:
what it turned on stays on until an agent that holds them stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
from collections.abc import Iterator

MARK = "udp-tunnel-kernel"
CLONE_NEWNET = 0x40000000
_count = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


class LoSettings:
    def __init__(self) -> None:
        self.tag = f"{os.getpid()}.{next(_count)}"
        self.netns = _own_netns()  # the namespace whose settings these are
        try:
            self.presence = _mark(f"{MARK}/{self.tag}")
        except BaseException:
            if self.netns is not None:
                os.close(self.netns)
            raise
        self.held: dict[str, tuple[int, str, socket.socket]] = {}  # setting -> (its file, its old value, mark)
        self.checked: dict[str, str | None] = {}  # setting -> None (on), or why it cannot be

    def turn_on(self, name: str, why: str, notes: list[str]) -> str | None:
        """Turn a setting (a /proc/sys path: net/ipv4/conf/lo/...) on if it is off, saying so in `notes`;
        None, or why it cannot be done."""
        if name not in self.checked:
            path = "/proc/sys/" + name
            dotted = name.replace("/", ".")
            try:
                with open(path) as f:
                    old = f.read().strip()
                if old == "0":
                    self._hold(name, path, "0", write=True)
                    notes.append(f"turned on {dotted} ({why}; set back when the last agent that relies on it stops)")
                elif name not in self.held:
                    theirs = [v for k, v in _marks(self.tag) if k == name]
                    if theirs:  # another agent turned it on and may stop first: hold it too
                        with contextlib.suppress(OSError):
                            self._hold(name, path, theirs[0], write=False)
                self.checked[name] = None
            except OSError as e:
                self.checked[name] = f"{dotted} is off and cannot be turned on ({e.strerror})"
        return self.checked[name]

    def _hold(self, name: str, path: str, old: str, write: bool) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)  # kept open: it is this namespace's setting
        try:
            if write:
                os.write(fd, b"1")
            self.held[name] = (fd, old, _mark(f"{MARK}/{self.tag}/{name.replace('/', '.')}={old}"))
        except OSError:
            os.close(fd)
            raise

    def close(self) -> None:
        """Set back what this agent holds, unless another agent is there; let go of the marks."""
        try:
            with _in_netns(self.netns):
                self.presence.close()
                for _, _, mark in self.held.values():
                    mark.close()
                if self.held and not _marks(self.tag, presence=True):
                    for fd, old, _ in self.held.values():
                        os.pwrite(fd, old.encode(), 0)
                    if _marks(self.tag, presence=True):  # one started meanwhile, and may have found them on
                        for fd, _, _ in self.held.values():
                            os.pwrite(fd, b"1", 0)
        except OSError:
            pass  # can't tell, or can't switch namespaces: they stay on
        finally:
            self.presence.close()
            for fd, _, mark in self.held.values():
                mark.close()
                os.close(fd)
            self.held.clear()
            if self.netns is not None:
                os.close(self.netns)
                self.netns = None


def _mark(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        s.bind("\0" + name)
    except OSError:
        s.close()
        raise
    return s


def _marks(mine: str, presence: bool = False) -> list[tuple[str, str]]:
    """Other agents' marks in this thread's namespace: (setting as a /proc/sys path, old value), or with
    `presence` their presence marks (as ("", ""))."""
    out = []
    with open("/proc/thread-self/net/unix") as f:
        for line in f:
            parts = line.split()
            path = parts[7] if len(parts) >= 8 else ""
            if not path.startswith(f"@{MARK}/") or path.startswith(f"@{MARK}/{mine}"):
                continue
            rest = path[len(MARK) + 2:].split("/", 1)
            if len(rest) == 1:
                if presence:
                    out.append(("", ""))
            elif not presence and "=" in rest[1]:
                setting, _, old = rest[1].rpartition("=")
                out.append((setting.replace(".", "/"), old))
    return out


def _own_netns() -> int | None:
    """This thread's network namespace, held open, or None."""
    try:
        return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


@contextlib.contextmanager
def _in_netns(fd: int | None) -> Iterator[None]:
    """Run the block in the namespace fd (this thread only), if it is not already the one this thread
    is in (tests switch namespaces; agents never do)."""
    if fd is None:
        raise OSError(0, "the namespace is not known")
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(here).st_ino == os.fstat(fd).st_ino:
            yield
            return
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            yield
        finally:
            _libc.setns(here, CLONE_NEWNET)
    finally:
        os.close(here)
