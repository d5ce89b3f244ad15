"""The control-socket protocol: newline-delimited JSON, versioned, every message bounded.

Request:   {"v": 1, "op": "submit" | "attach" | "cancel" | "pause" | "resume" | "status" | "jobs" | "logs" |
                        "drain" | "undrain" | "ping" | "sweep_run" | "sweep_follow" | "sweep_status" |
                        "sweep_report" | "sweep_stop" | "eval" | "release" | "backup", ...op fields}
           each op's fields and their types: REQUEST_FIELDS (a job op may carry `capability`, the token a
           build's submit reply handed back: agentd.permissions); sweep_run streams {"trial": N, "event": ...}
           lines (agentd.sweep); release: action promote {run, name, to, force, reason, alias} | list |
           rollback {to} | verify, name; backup: (nothing) | restore {name, version, dir} (agentd.release)
Reply:     {"v": 1, "ok": true, ...}   or   {"v": 1, "ok": false, "error": {"code": ..., "message": ...}}
Stream:    after a submit/attach/logs-follow reply, {"v": 1, "event": {...}} lines until the job ends
           (the last event has type "finished"), then the server closes the connection.

Error codes: bad_json, too_large, bad_version, unknown_op, bad_request (each of these five: a malformed
request, answered "bad request: <what>"), invalid_config, not_found, not_permitted (agentd.permissions),
bad_state (pause of a job that is not running, resume of one that is not paused), draining, busy (too many
connections at once: agentd.server.MAX_CONNECTIONS), internal; releases: refused (the promotion gate;
`metrics` holds the deltas), release_failed (`target` names it), not_configured, target_auth, target_refused.
"""
from __future__ import annotations

import json
import socket
import time

PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 1 << 20


# Each op's fields: name -> (type, required). Unknown fields are ignored (a newer client may send more);
# an optional field may be null. A new op adds its row here and one in agentd.permissions.PERMISSIONS.
_JOB = {"job_id": (str, True), "capability": (str, False)}
REQUEST_FIELDS: dict[str, dict[str, tuple[type, bool]]] = {
    "ping": {},
    # nodes, node_rank, rdzv_endpoint: this box's part of one job over several boxes (all three or none;
    # trainer.api.Rendezvous.parse checks them)
    "submit": {"config_path": (str, True), "config_text": (str, True), "env": (dict, False),
               "detach": (bool, False), "priority": (int, False), "nodes": (int, False), "node_rank": (int, False),
               "rdzv_endpoint": (str, False)},
    "attach": {**_JOB, "after_seq": (int, False)},
    "logs": {**_JOB, "after_seq": (int, False), "follow": (bool, False)},
    "cancel": _JOB,
    "pause": _JOB,
    "resume": _JOB,
    "status": {},
    "jobs": {"limit": (int, False)},
    "drain": {},
    "undrain": {},
    "eval": {"run": (str, True), "config_path": (str, True), "config_text": (str, True), "against": (str, False)},
    "sweep_run": {"sweep_path": (str, True), "sweep_text": (str, True), "base_text": (str, True),
                  "env": (dict, False), "detach": (bool, False)},
    "sweep_follow": {"name": (str, True)},
    "sweep_status": {"name": (str, True)},
    "sweep_report": {"name": (str, True), "html": (bool, False)},
    "sweep_stop": {"name": (str, True)},
    # agentd.release: `to` is a list of target names for promote, a version (vK) for rollback
    "release": {"action": (str, True), "name": (str, False), "run": (str, False), "to": (object, False),
                "force": (bool, False), "reason": (str, False), "alias": (str, False)},
    "backup": {"restore": (bool, False), "name": (str, False), "version": (str, False), "dir": (str, False)},
}
TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "an object"}


class ProtocolError(Exception):
    """A malformed request: answered "bad request: <what>" (the message says what)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = f"bad request: {message}"


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

    def read_line(self, deadline: float | None = None) -> bytes | None:
        """The next line without its newline; None at EOF. Raises ProtocolError('too_large'), and
        socket.timeout once the monotonic `deadline` passes (a client that trickles a byte at a time
        cannot hold the connection longer than one that sends nothing)."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.max_bytes:
                raise ProtocolError("too_large", f"message exceeds {self.max_bytes} bytes")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("no complete line before the deadline")
                self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                if self.buf:
                    raise ProtocolError("bad_json", "the connection ended in the middle of a line")
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) > self.max_bytes:
            raise ProtocolError("too_large", f"message exceeds {self.max_bytes} bytes")
        return line

    def read_message(self, deadline: float | None = None) -> dict | None:
        line = self.read_line(deadline)
        if line is None:
            return None
        return decode(line)


def decode(line: bytes) -> dict:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("bad_json", "not a JSON line") from None
    except RecursionError:  # the decoder recurses once per nesting level
        raise ProtocolError("bad_json", "JSON nested too deep") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_json", "a message must be a JSON object")
    return msg


def check_request(msg: dict) -> str:
    """Validate a request: envelope, op and the types of its fields (REQUEST_FIELDS); returns its op."""
    if msg.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {_short(msg.get('v'))} not supported; "
                                           f"this daemon speaks v{PROTOCOL_VERSION} (upgrade the client or daemon)")
    op = msg.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "missing 'op' (a string)")
    fields = REQUEST_FIELDS.get(op)
    if fields is None:
        raise ProtocolError("unknown_op", f"unknown op {_short(op)}; ops: {', '.join(sorted(REQUEST_FIELDS))}")
    for name, (kind, required) in fields.items():
        value = msg.get(name)
        if value is None:
            if required:
                raise ProtocolError("bad_request", f"{op} needs {name} ({TYPE_NAMES[kind]})")
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError("bad_request", f"{op}: {name} must be {TYPE_NAMES[kind]}, not {_short(value)}")
        if kind is dict and not all(isinstance(v, str) for v in value.values()):
            raise ProtocolError("bad_request", f"{op}: {name} must map names to strings")
    return op


def _short(value, limit: int = 40) -> str:
    """A value as a reply quotes it: never more than `limit` characters of what a client sent."""
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "..."
