"""Where an agent keeps its control socket and its state file, when not told."""

from __future__ import annotations

import os

from udp_tunnel.ops import status


def agent_path(given: str | None, name: str, unit_dir: str, unit_file: str, suffix: str) -> str | None:
    """--control / --state-file: PATH, 'none', or by default the unit's directory ($unit_dir) under
    systemd, else NAME+suffix in this user's private runtime directory (made here if needed)."""
    if given == "none":
        return None
    if given:
        return given
    if os.environ.get(unit_dir):
        return os.path.join(os.environ[unit_dir].split(":")[0], unit_file)
    return os.path.join(status.private_dir(status.runtime_dir()), f"{name}{suffix}")


def control_path(given: str | None, name: str) -> str | None:
    return agent_path(given, name, "RUNTIME_DIRECTORY", "control.sock", ".sock")


def state_path(given: str | None, name: str) -> str | None:
    return agent_path(given, name, "STATE_DIRECTORY", "outside.state", ".state")
