"""The outside agent's memory across a restart: where its tunnels were.

A small JSON file, written atomically (a temporary file, then rename) and
owner-only. It only says where to send a HELLO after a restart, so that the
inside agents register again at once instead of at their next keepalive:
nothing read from it is trusted, registration stays authenticated.
"""

from __future__ import annotations

import json
import os
import tempfile

VERSION = 1


def load(path: str) -> list[tuple[int, tuple]]:
    """(tunnel id, address) pairs; [] when there is no file. Raises ValueError when unreadable."""
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read(1 << 24))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the state file {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or not isinstance(doc.get("tunnels"), list):
        raise ValueError(f"the state file {path} is not one this version wrote")
    out = []
    for entry in doc["tunnels"]:
        try:
            tid, host, port = entry
            out.append((int(tid, 16), (str(host), int(port))))
        except (TypeError, ValueError):
            continue
    return out


def dump(entries: list[tuple[int, tuple]]) -> bytes:
    return json.dumps({"version": VERSION, "tunnels": [[f"{tid:016x}", a[0], a[1]] for tid, a in entries]}).encode()


def save(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
