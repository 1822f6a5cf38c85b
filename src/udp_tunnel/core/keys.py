"""The keys a core uses, and how they are rotated.

A key file holds the current key first and, while keys are rotated, older ones
after it. On a reload (SIGHUP) the key the file no longer holds stays accepted
for GRACE seconds, so the other end can be reloaded later; then it is
forgotten. The first key encodes, every accepted key verifies.
"""

from __future__ import annotations

from udp_tunnel.wire import proto

GRACE = 600.0  # seconds a replaced key stays accepted after a reload
INF = float("inf")


class KeySet:
    __slots__ = ("file_keys", "accepted", "codec", "forget_at")

    def __init__(self, secret: bytes) -> None:
        self.file_keys = proto.key_list(secret)  # what the key file says
        self.accepted = list(self.file_keys)  # ... and a replaced key during its grace
        self.codec = proto.Codec(*self.accepted)
        self.forget_at = INF

    @property
    def current(self) -> bytes:
        return self.accepted[0]

    def __len__(self) -> int:
        return len(self.accepted)

    def reload(self, secret: bytes, now: float) -> bool:
        """New key file content: True when a key it replaced is kept for the grace time."""
        keys = proto.key_list(secret)
        old = [k for k in self.file_keys if k not in keys]
        self.file_keys = keys
        self._use(keys + old[:1])
        self.forget_at = now + GRACE if old else INF
        return bool(old)

    def expire(self, now: float) -> bool:
        """At forget_at: only the key file's keys are accepted from now on (True when done now)."""
        if now < self.forget_at:
            return False
        self.forget_at = INF
        self._use(self.file_keys)
        return True

    def _use(self, keys: list[bytes]) -> None:
        self.accepted = keys
        self.codec = proto.Codec(*keys)
