"""sd_notify by hand: real AF_UNIX datagram sockets (a path and an abstract '@' name) receive what
agentd.notify sends, from this process and from a child process (as systemd would see it)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest

from agentd import notify as sdn
from agentd.notify import Notifier, notify, watchdog_interval

REPO = Path(__file__).resolve().parent.parent
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Receiver:
    """What systemd does: a bound datagram socket with SO_PASSCRED, so each message carries the
    sender's pid (that is how NotifyAccess=main tells the main process from its children)."""

    def __init__(self, kind: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if kind == "path":
            # A short folder: socket paths are limited to 107 bytes, pytest's tmp_path can be longer.
            self._dir = tempfile.mkdtemp(prefix="agentd-notify-")
            path = os.path.join(self._dir, "notify.sock")
            self.sock.bind(path)
            self.env_value = path
        else:
            name = f"agentd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
            self._dir = None

    def recv(self, timeout: float = 5.0) -> tuple[str, int]:
        """One message and the pid that sent it."""
        self.sock.settimeout(timeout)
        data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid, _uid, _gid = struct.unpack("iii", payload[:12])
        return data.decode(), pid

    def pending(self) -> list[str]:
        """Every message already queued, without waiting."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out

    def close(self) -> None:
        self.sock.close()
        if self._dir:
            for name in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, name))
            os.rmdir(self._dir)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["path", "abstract"])
def receiver(request, monkeypatch):
    r = Receiver(request.param)
    monkeypatch.setenv("NOTIFY_SOCKET", r.env_value)
    yield r
    r.close()


def test_noop_when_notify_socket_unset():
    assert notify("READY=1") is False
    n = Notifier()
    assert not n.enabled
    assert n.ready("idle") is False
    assert n.status("idle") is False
    assert n.watchdog_tick() is False
    assert n.stopping() is False


def test_notify_in_process(receiver):
    assert notify("READY=1", "STATUS=idle · 1 GPU") is True
    message, pid = receiver.recv()
    assert message == "READY=1\nSTATUS=idle · 1 GPU"
    assert pid == os.getpid()


def test_notify_never_raises_without_a_listener(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@agentd-nobody-" + uuid.uuid4().hex)
    assert notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path.sock")
    assert notify("READY=1") is False
    assert sdn._send("/bad\0name", ("READY=1",)) is False  # (the environment cannot hold a NUL)


def test_daemon_sequence_from_a_child_process(receiver):
    """A separate process, as the daemon is to systemd: READY, STATUS, WATCHDOG, STOPPING in order,
    each attributed to that process's pid."""
    script = textwrap.dedent("""
        import time
        from agentd.notify import Notifier
        n = Notifier(unset_environment=True)
        n.ready("idle · 1 GPU · jenkins online")
        n.status("idle · 1 GPU · jenkins online")     # unchanged: not sent
        n.status("training job-1 step 3/10")
        time.sleep(n.interval)                         # 0.1 s: WATCHDOG_USEC=200000
        assert n.watchdog_tick()
        assert not n.watchdog_tick()                   # interval not elapsed again
        n.stopping("stopping: checkpointing job-1")
    """)
    env = dict(os.environ, WATCHDOG_USEC="200000", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    messages = [receiver.recv() for _ in range(4)]
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert [m for m, _ in messages] == [
        "READY=1\nSTATUS=idle · 1 GPU · jenkins online",
        "STATUS=training job-1 step 3/10",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping: checkpointing job-1",
    ]
    assert {pid for _, pid in messages} == {proc.pid}
    assert receiver.pending() == []


def test_status_is_deduplicated_and_one_line(receiver):
    n = Notifier()
    assert n.enabled
    assert n.status("idle") is True
    assert n.status("idle") is False
    assert n.status("training a\nREADY=1") is True  # a newline must not inject an assignment
    assert n.status("training a READY=1") is False  # same text once flattened
    assert receiver.recv()[0] == "STATUS=idle"
    assert receiver.recv()[0] == "STATUS=training a READY=1"
    assert receiver.pending() == []


def test_status_resent_after_a_failed_send(receiver, monkeypatch):
    n = Notifier()
    monkeypatch.setattr(sdn, "_send", lambda address, lines: False)
    assert n.status("idle") is False
    monkeypatch.undo()  # also restores NOTIFY_SOCKET; the Notifier kept its own copy
    assert n.status("idle") is True
    assert receiver.recv()[0] == "STATUS=idle"


def test_watchdog_tick_follows_the_interval(receiver, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")  # WatchdogSec=60 -> ping every 30 s
    now = [1000.0]
    n = Notifier(clock=lambda: now[0])
    assert n.interval == 30.0
    n.ready("idle")
    assert receiver.recv()[0] == "READY=1\nSTATUS=idle"
    sent = []
    for t in (10, 29.9, 30, 31, 59, 60.5, 200):
        now[0] = 1000.0 + t
        sent.append(n.watchdog_tick())
    assert sent == [False, False, True, False, False, True, True]
    assert receiver.pending() == ["WATCHDOG=1"] * 3


def test_no_watchdog_pings_when_not_configured(receiver):
    n = Notifier()
    assert n.interval is None
    assert n.watchdog_tick() is False
    assert receiver.pending() == []


def test_unset_environment(receiver, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier(unset_environment=True)
    assert all(name not in os.environ for name in ENV_VARS)
    assert n.interval == 0.5
    assert n.ready("idle") is True  # still sends: the address was read first
    assert receiver.recv()[0] == "READY=1\nSTATUS=idle"


@pytest.mark.parametrize("usec, pid, expected", [
    (None, None, None),
    ("60000000", None, 30.0),
    ("60000000", "self", 30.0),
    ("60000000", "other", None),   # meant for another process (we inherited it)
    ("60000000", "garbage", None),
    ("0", None, None),
    ("-5", None, None),
    ("sixty", None, None),
    ("", None, None),
])
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        monkeypatch.setenv("WATCHDOG_PID", value)
    assert watchdog_interval() == expected
