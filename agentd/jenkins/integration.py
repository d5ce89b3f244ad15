"""Wiring the Jenkins link into the daemon: the link (which owns agent.jar) and the folder trigger.

The daemon's main loop then tells the link when the node must be offline (`request_offline`) or may be
online again, from `agentd.gate.node_blocked_reason` (drain, unhealthy GPUs, foreign VRAM).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from agentd.jenkins.link import JenkinsLink
from agentd.jenkins.settings import TokenError, read_token

log = logging.getLogger("agentd.jenkins")


class TokenProblem:
    """Stands in for the link when the token cannot be read: the daemon serves local jobs and says why."""

    def __init__(self, message: str):
        self.message = message

    def status(self) -> dict:
        return {"state": "auth-error", "last_error": self.message}

    def request_offline(self, reason: str) -> None:
        pass

    def request_online(self) -> None:
        pass

    def resync(self) -> None:
        pass

    def stop(self, timeout: float = 0) -> None:
        pass


def validate_training_config(path: Path) -> str | None:
    """The folder trigger's check: the same preflight as `agentd validate` (None when valid)."""
    from trainer.errors import ConfigError
    from trainer.checks.preflight import preflight

    try:
        preflight(path)
    except ConfigError as e:
        return e.render()
    return None


def start_jenkins(daemon):
    s = daemon.settings.jenkins
    try:
        token = read_token(s)
    except TokenError as e:
        log.error("Jenkins link not started: %s", e)
        return TokenProblem(str(e)), None, None
    # state_dir: the link remembers there that it took the node offline (and why), across restarts.
    link = JenkinsLink(s, token, daemon.gpus, lambda: len(daemon.slots), state_dir=daemon.settings.state_dir)
    link.start()
    # READY=1 comes after the link has been tried once (bounded: a dead controller must not hold up the
    # start; the link keeps retrying in the background).
    deadline = time.monotonic() + s.timeout_s + 5
    while link.status().get("last_attempt_at") is None and time.monotonic() < deadline:
        time.sleep(0.05)
    watcher = None
    if s.watch is not None:
        from agentd.jenkins.watcher import ConfigWatcher

        watcher = ConfigWatcher(s.watch, validate_training_config, link.trigger_build)
        watcher.start()
    return link, None, watcher
