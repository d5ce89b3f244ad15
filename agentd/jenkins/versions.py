"""Which Jenkins controllers agentd supports, from the ``X-Jenkins`` header. Pure functions.

The floor is Jenkins 2.440.1 (LTS, February 2024): its agent.jar (remoting 3206) is the first LTS one
whose ``hudson.remoting.Launcher`` takes ``-url``, ``-name`` and ``-webSocket`` (added in remoting 3176),
which agentd uses so that it, not a JNLP file, decides how the agent connects, and the secret stays in a
0600 file (``-secret @FILE``). An older agent.jar prints its usage and exits 0 on those flags. The
older entry point (``-jnlpUrl .../jenkins-agent.jnlp``) makes agent.jar fetch the JNLP file on every
connection, which Jenkins deprecated and, from 2.437, logs a warning for; and the 2.426 line and older get
no security fixes since 2.440.1 came out. So agentd reports ``unsupported-version`` below the floor and
does not start agent.jar, instead of carrying a second, deprecated way to connect.
"""

from __future__ import annotations

import re
from typing import Optional

MIN_CONTROLLER_VERSION = "2.440.1"


def parse_version(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"2.462.3"`` -> (2, 462, 3); weekly ``"2.479"`` -> (2, 479); None when it is not a version."""
    if not text:
        return None
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(part) for part in match.group(1).split(".")) if match else None


def version_problem(version: Optional[str], launcher: str) -> Optional[str]:
    """Why this controller cannot be used with this launcher (with what to do), or None.

    Only agent.jar (``launcher: inbound``) depends on the controller's version; registering the node and
    keeping it online or offline work with any 2.x controller. An unknown version is not a problem here:
    see :func:`unknown_version_note`.
    """
    parsed = parse_version(version)
    if launcher != "inbound" or parsed is None or parsed >= parse_version(MIN_CONTROLLER_VERSION):
        return None
    return (f"Jenkins {version} is older than {MIN_CONTROLLER_VERSION}, the oldest controller agentd supports "
            "for launcher: inbound (its agent.jar lacks the -url/-name options agentd starts it with). "
            f"Upgrade the controller to {MIN_CONTROLLER_VERSION} or a later LTS, or use launcher: ssh "
            "(the controller starts the agent) or launcher: none (agentd only keeps the node's labels and "
            "online state); agent.jar is not started until then")


def unknown_version_note() -> str:
    return ("the controller's responses carry no X-Jenkins header (a reverse proxy stripping it?): its "
            f"version is unknown, so agentd cannot check it is at least {MIN_CONTROLLER_VERSION}")
