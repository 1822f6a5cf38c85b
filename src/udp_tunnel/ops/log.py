"""Log lines with journald priority prefixes and rate-limited repeats."""

from __future__ import annotations

import sys
import time
from typing import TextIO

ERR, WARNING, INFO, DEBUG = 3, 4, 6, 7
_NAMES = {ERR: "error", WARNING: "warning", INFO: "info", DEBUG: "debug"}


class Log:
    """Writes one line per event. A repeating warning (same key) is written at
    most once per `interval` seconds, with the count of the ones held back."""

    def __init__(self, level: int = INFO, stream: TextIO | None = None,
                 interval: float = 10.0, clock=time.monotonic) -> None:
        self.level = level
        self.stream = stream or sys.stderr
        self.interval = interval
        self.clock = clock
        self.prefix = not self.stream.isatty()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def write(self, prio: int, msg: str) -> None:
        if prio > self.level:
            return
        if self.prefix:
            line = f"<{prio}>{msg}\n"
        else:
            line = f"{time.strftime('%H:%M:%S')} {_NAMES[prio]}: {msg}\n"
        try:
            self.stream.write(line)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def error(self, msg: str) -> None:
        self.write(ERR, msg)

    def warning(self, msg: str) -> None:
        self.write(WARNING, msg)

    def info(self, msg: str) -> None:
        self.write(INFO, msg)

    def debug(self, msg: str) -> None:
        self.write(DEBUG, msg)

    def limited(self, key: str, msg: str, prio: int = WARNING) -> None:
        """Log `msg` unless `key` was logged less than `interval` seconds ago."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        if len(self._last) > 1000:  # keys are a fixed set in practice; stay bounded anyway
            self._last = {key: now}
        self.write(prio, msg + (f" ({held} more like this not shown)" if held else ""))
