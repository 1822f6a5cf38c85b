"""sd_notify(3) without libsystemd: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send `message` to $NOTIFY_SOCKET; False where there is none or it fails."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float:
    """Seconds of the unit's WatchdogSec= meant for this process, or 0."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return 0.0
    return int(usec) / 1e6
