"""Default locations, without importing the settings schema (clients must start fast)."""
from __future__ import annotations

import os
from pathlib import Path


def env_dir(var: str, fallback: str) -> Path:
    """A systemd-provided directory ($RUNTIME_DIRECTORY, ...; first of a ':' list), else the fallback."""
    value = os.environ.get(var, "").split(":")[0]
    return Path(value or fallback)


def default_socket() -> Path:
    return Path(os.environ.get("AGENTD_SOCKET") or env_dir("RUNTIME_DIRECTORY", "/run/agentd") / "agentd.sock")
