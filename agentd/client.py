"""The control-socket client used by every `agentd` subcommand (no torch, no heavy imports)."""
from __future__ import annotations

import socket
from pathlib import Path

from agentd.protocol import DEFAULT_MAX_BYTES, LineReader, ProtocolError, encode


class DaemonUnreachable(Exception):
    """No answer from agentd. `starting` is True when it may just not be up yet (no socket, connection
    refused: a restart or a boot in progress), False when waiting cannot help (permission denied)."""

    def __init__(self, message: str, starting: bool = True):
        super().__init__(message)
        self.starting = starting


class Connection:
    """One request on one connection; for streaming ops, iterate `events()` after `reply`."""

    def __init__(self, sock: socket.socket, reply: dict):
        self.sock = sock
        self.reply = reply
        self.reader = None

    def next_message(self, timeout: float | None = None) -> dict | None:
        """The next streamed message, None at end of stream. Raises socket.timeout on timeout."""
        self.sock.settimeout(timeout)
        return self.reader.read_message()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def open_request(socket_path: Path, msg: dict, timeout: float = 10.0) -> Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except FileNotFoundError:
        sock.close()
        raise DaemonUnreachable(f"agentd is not running (no socket at {socket_path})") from None
    except PermissionError:
        sock.close()
        raise DaemonUnreachable(f"permission denied on {socket_path}: join the socket's group "
                                "(see socket_group in agentd.yaml) or run as its owner", starting=False) from None
    except (ConnectionRefusedError, socket.timeout, OSError) as e:
        sock.close()
        raise DaemonUnreachable(f"agentd is not answering on {socket_path} ({e.__class__.__name__})") from None
    try:
        sock.sendall(encode(msg))
        reader = LineReader(sock, DEFAULT_MAX_BYTES * 16)
        reply = reader.read_message()
    except (OSError, ProtocolError) as e:
        sock.close()
        raise DaemonUnreachable(f"agentd closed the connection ({e})") from None
    if reply is None:
        sock.close()
        raise DaemonUnreachable("agentd closed the connection without a reply")
    conn = Connection(sock, reply)
    conn.reader = reader
    return conn


def request(socket_path: Path, msg: dict, timeout: float = 10.0) -> dict:
    """A one-shot request: send, read the reply, close."""
    conn = open_request(socket_path, msg, timeout)
    conn.close()
    return conn.reply
