"""systemd service notifications (the sd_notify(3) protocol), written by hand: no dependency.

The protocol: one datagram of newline-separated `KEY=VALUE` lines sent to the AF_UNIX socket named in
$NOTIFY_SOCKET (a path, or an abstract name written with a leading '@'). systemd sets that variable only
for Type=notify services; when it is unset every call here is a cheap no-op, so the daemon can call these
functions unconditionally (foreground runs, tests).

What the daemon sends (see systemd/agentd.service):
- READY=1 once the control socket accepts connections, the journal is open and the Jenkins link has
  been tried; systemd counts the start as failed if it does not come within TimeoutStartSec=.
- STATUS=... a one-line summary shown by `systemctl status agentd`, kept current.
- WATCHDOG=1 from the main loop only, and only while it is healthy: a hung loop stops the pings and
  systemd aborts and restarts the service (WatchdogSec= + Restart=on-failure).
- STOPPING=1 when shutdown begins, so `systemctl status` says "deactivating" while the checkpoint is
  written.

Sending never raises: a lost notification must not take the daemon down (systemd handles a missing
READY=1 or a missing WATCHDOG=1 itself, by its timeouts).
"""
from __future__ import annotations

import os
import socket
import time
from typing import Callable, Optional

_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _send(address: Optional[str], lines: tuple[str, ...]) -> bool:
    if not address or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket: the name starts with a NUL byte
    elif not address.startswith("/"):
        return False  # e.g. "vsock:..." (systemd >= 253 in VMs); not used for a service on the host
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # systemd reads the socket promptly; the timeout only guards the main loop (which
            # also sends the watchdog pings) against blocking forever on a full queue.
            sock.settimeout(2.0)
            sock.connect(address)
            sock.send("\n".join(lines).encode("utf-8"))
        return True
    except (OSError, ValueError):  # ValueError: an embedded NUL in a path name
        return False


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=idle") as one datagram to $NOTIFY_SOCKET.

    Returns True when the datagram was sent, False when $NOTIFY_SOCKET is unset or sending failed.
    Never raises.
    """
    return _send(os.environ.get("NOTIFY_SOCKET"), lines)


def watchdog_interval() -> Optional[float]:
    """Seconds between WATCHDOG=1 pings, or None when systemd expects none.

    systemd passes the watchdog timeout in $WATCHDOG_USEC and, when it sets $WATCHDOG_PID, means it
    for that process only (a child that inherited the environment must not ping). The interval is half
    the timeout, as sd_watchdog_enabled(3) recommends, so one late loop iteration is not fatal.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID")
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    # A newline inside STATUS would start a new KEY=VALUE assignment in the datagram.
    return " ".join(str(text).split())


class Notifier:
    """What the daemon's main loop holds: readiness, status, watchdog and stopping notifications.

    It reads $NOTIFY_SOCKET and the watchdog settings once, at construction. With
    `unset_environment=True` it then removes them from os.environ so that processes the daemon starts
    (agent.jar, and the Jenkins builds it runs) do not inherit them.

    Typical use:

        n = Notifier()
        ... open journal, bind control socket, try Jenkins ...
        n.ready("idle · 1 GPU · jenkins online")
        while running:
            ... one loop iteration (must come back well within the watchdog interval) ...
            n.status(current_status_line())    # sent only when it changed
            n.watchdog_tick()                  # sent only when the interval has elapsed
        n.stopping("stopping: checkpointing job 12")
    """

    def __init__(self, unset_environment: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address: Optional[str] = os.environ.get("NOTIFY_SOCKET") or None
        self.interval: Optional[float] = watchdog_interval()
        self._clock = clock
        self._last_status: Optional[str] = None
        self._last_ping: Optional[float] = None
        if unset_environment:
            for name in _ENV_VARS:
                os.environ.pop(name, None)

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send raw `KEY=VALUE` lines; False when disabled or on a send error."""
        return _send(self.address, lines)

    def ready(self, status: str) -> bool:
        """READY=1 with the first status line. Starts the watchdog clock (systemd arms it now too)."""
        status = _one_line(status)
        sent = self.send("READY=1", f"STATUS={status}")
        if sent:
            self._last_status = status
        self._last_ping = self._clock()
        return sent

    def status(self, text: str) -> bool:
        """STATUS=text, sent only when it differs from the last status sent. True when sent."""
        text = _one_line(text)
        if text == self._last_status:
            return False
        sent = self.send(f"STATUS={text}")
        if sent:  # on failure the next call retries
            self._last_status = text
        return sent

    def watchdog_tick(self) -> bool:
        """WATCHDOG=1 when the interval has elapsed since the last ping. True when sent.

        Call it from the main loop only, after an iteration that completed normally: pinging from a
        side thread would keep a hung main loop alive.
        """
        if self.interval is None or not self.enabled:
            return False
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self.interval:
            return False
        self._last_ping = now
        return self.send("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        """STOPPING=1 with a status line; send it as soon as shutdown starts."""
        status = _one_line(status)
        sent = self.send("STOPPING=1", f"STATUS={status}")
        if sent:
            self._last_status = status
        return sent
