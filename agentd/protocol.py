"""The control-socket protocol: newline-delimited JSON, versioned, every message bounded.

Request:   {"v": 1, "op": "submit" | "attach" | "cancel" | "pause" | "resume" | "status" | "jobs" | "logs" |
                        "drain" | "undrain" | "release" | "backup" | "ping", ...op fields}
           submit: config_path, config_text, env, detach, priority (int, optional: overrides the config's)
           pause/resume/cancel/attach: job_id
           release: action promote {run, name, to, force, reason, alias} | list | rollback {to} | verify, name
           backup: (nothing) | restore {name, version, dir}
Reply:     {"v": 1, "ok": true, ...}   or   {"v": 1, "ok": false, "error": {"code": ..., "message": ...}}
Stream:    after a submit/attach/logs-follow reply, {"v": 1, "event": {...}} lines until the job ends
           (the last event has type "finished"), then the server closes the connection.

Error codes: bad_json, too_large, bad_version, unknown_op, bad_request, invalid_config, not_found,
bad_state (pause of a job that is not running, resume of one that is not paused), draining, internal;
releases: refused (the promotion gate; `metrics` holds the deltas), release_failed (`target` names it),
not_permitted, not_configured, target_auth, target_refused.
"""
from __future__ import annotations

import json
import socket

PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 1 << 20


class ProtocolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def encode(msg: dict) -> bytes:
    return (json.dumps({"v": PROTOCOL_VERSION, **msg}, separators=(",", ":"), default=str) + "\n").encode()


def error(code: str, message: str, **extra) -> dict:
    return {"ok": False, "error": {"code": code, "message": message, **extra}}


class LineReader:
    """Reads newline-terminated messages from a socket, never buffering more than `max_bytes`."""

    def __init__(self, sock: socket.socket, max_bytes: int = DEFAULT_MAX_BYTES):
        self.sock = sock
        self.max_bytes = max_bytes
        self.buf = b""

    def read_line(self) -> bytes | None:
        """The next line without its newline; None at EOF. Raises ProtocolError('too_large')."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.max_bytes:
                raise ProtocolError("too_large", f"message exceeds {self.max_bytes} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) > self.max_bytes:
            raise ProtocolError("too_large", f"message exceeds {self.max_bytes} bytes")
        return line

    def read_message(self) -> dict | None:
        line = self.read_line()
        if line is None:
            return None
        return decode(line)


def decode(line: bytes) -> dict:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_json", "not a JSON line") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", "a message must be a JSON object")
    return msg


def check_request(msg: dict) -> str:
    """Validate the envelope of a request; returns its op."""
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {msg.get('v')!r} not supported; "
                                           f"this daemon speaks v{PROTOCOL_VERSION} (upgrade the client or daemon)")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "missing 'op'")
    return op
