"""The control server: a Unix socket whose file mode is the access control.

Each connection gets a thread; a connection carries one request (and, for submit/attach/logs --follow,
the event stream that follows it). Bad input never takes the daemon down: malformed JSON, an
oversized or unterminated line, an unknown op or a wrong protocol version gets an error reply and
the connection is closed; a client that connects and says nothing is dropped after
`idle_client_timeout_s`. The peer's uid/pid (SO_PEERCRED) is recorded with each submitted job.
"""
from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import queue
import socket
import struct
import threading
from pathlib import Path

from agentd.protocol import LineReader, ProtocolError, check_request, encode, error
from agentd.scheduler import SubmitRefused

log = logging.getLogger("agentd.server")


class SocketInUse(Exception):
    pass


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python has no constant for it


def peer_credentials(conn: socket.socket) -> dict:
    """The connecting process as the kernel saw it at connect(): pid, uid, gid, every group, user name.

    The groups decide what the submitter may read and write (agentd.access), so they come from the
    kernel too (SO_PEERGROUPS), not from the group database, which may have changed since that
    process logged in; the database is the fallback on kernels without SO_PEERGROUPS.
    """
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = None
    return {"pid": pid, "uid": uid, "gid": gid, "groups": _peer_groups(conn, uid, gid), "user": user}


def _peer_groups(conn: socket.socket, uid: int, gid: int) -> list[int]:
    size = 64 * 4
    while size <= 65536 * 4:
        try:
            data = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                size *= 4
                continue
            break
        return sorted(set(struct.unpack(f"{len(data) // 4}I", data)) | {gid})
    from agentd.access import groups_from_database

    return sorted(set(groups_from_database(uid, gid)) | {gid})


class SocketGroupError(Exception):
    """The socket cannot be given to `socket_group`; the message says why and how to fix it."""


def _give_to_group(path: Path, group: str) -> None:
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketGroupError(f"socket_group {group!r} does not exist: create it (groupadd {group}) or fix "
                               "socket_group in agentd.yaml") from None
    try:
        os.chown(path, -1, gid)
    except PermissionError:
        me = _user_name(os.geteuid())
        raise SocketGroupError(
            f"cannot give {path} to group {group}: user {me} is not a member of group {group}, and a process "
            f"may only give its files to groups it belongs to. Fix: add the daemon's user to the group "
            f"(`usermod -aG {group} {me}`; `agentd install-service` does it for the configured socket_group), "
            f"then restart agentd") from None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def bind_socket(path: Path, mode: int, group: str | None) -> socket.socket:
    """Bind the control socket; refuse if a live daemon holds it, clean it if stale."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_socket():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError, socket.timeout, OSError):
            log.info("removing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise SocketInUse(f"{path} is held by a running agentd; stop it first or use another --socket")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 ^ mode)  # the socket is never reachable with looser permissions, even briefly
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, mode)
    if group:
        try:
            _give_to_group(path, group)
        except SocketGroupError:
            sock.close()
            path.unlink(missing_ok=True)
            raise
    sock.listen(64)
    return sock


class ControlServer:
    def __init__(self, daemon, sock: socket.socket, *, max_bytes: int, idle_timeout: float):
        self.daemon = daemon
        self.sock = sock
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closing.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    # --- one connection ---------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.idle_timeout)
            reader = LineReader(conn, self.max_bytes)
            try:
                msg = reader.read_message()
                if msg is None:
                    return
                op = check_request(msg)
                handler = getattr(self, f"op_{op}", None)
                if handler is None:
                    raise ProtocolError("unknown_op", f"unknown op {op!r}; ops: {', '.join(self.ops())}")
                conn.settimeout(None)
                handler(conn, msg)
            except ProtocolError as e:
                self._send(conn, error(e.code, e.message))
            except SubmitRefused as e:
                self._send(conn, error(e.code, e.message, **e.details))
            except socket.timeout:
                log.debug("dropping a client that sent nothing for %.0f s", self.idle_timeout)
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception as e:  # a bug in one handler must not take the daemon down
                log.exception("control request failed")
                self._send(conn, error("internal", f"{type(e).__name__}: {e}"))

    @classmethod
    def ops(cls) -> list[str]:
        return sorted(n[3:] for n in dir(cls) if n.startswith("op_"))

    @staticmethod
    def _send(conn: socket.socket, msg: dict) -> bool:
        try:
            conn.sendall(encode(msg))
            return True
        except OSError:
            return False

    def _stream(self, conn: socket.socket, job_id: str, after_seq: int, follow: bool = True) -> None:
        """Send the job's events after `after_seq`, then the live ones until it ends or the client leaves."""
        sched = self.daemon.scheduler
        backlog, q = sched.subscribe(job_id, after_seq)
        try:
            for ev in backlog:
                if not self._send(conn, {"event": ev}):
                    return
            if q is None or not follow:
                return
            while True:
                try:
                    ev = q.get(timeout=1.0)
                except queue.Empty:
                    if _peer_gone(conn):
                        return  # the client died: the job goes on without it
                    continue
                if ev is None or not self._send(conn, {"event": ev}):
                    return
        finally:
            if q is not None:
                sched.unsubscribe(job_id, q)

    # --- ops --------------------------------------------------------------------------------------
    def op_ping(self, conn, msg) -> None:
        self._send(conn, {"ok": True, "pid": os.getpid(), "version": self.daemon.version})

    def op_submit(self, conn, msg) -> None:
        path, text = msg.get("config_path"), msg.get("config_text")
        if not isinstance(path, str) or not isinstance(text, str):
            raise ProtocolError("bad_request", "submit needs config_path and config_text (strings)")
        env = {k: str(v) for k, v in (msg.get("env") or {}).items()}
        job_id, attached = self.daemon.scheduler.submit(config_path=path, config_text=text, env=env,
                                                        submitter=peer_credentials(conn),
                                                        priority=msg.get("priority"))
        self._send(conn, {"ok": True, "job_id": job_id, "attached": attached})
        if not msg.get("detach"):
            self._stream(conn, job_id, 0)

    def op_attach(self, conn, msg) -> None:
        job_id = str(msg.get("job_id", ""))
        rec = self.daemon.scheduler.journal.get(job_id)
        if rec is None:
            raise SubmitRefused("not_found", f"no job {job_id}")
        self._send(conn, {"ok": True, "job_id": job_id, "state": rec["state"]})
        self._stream(conn, job_id, int(msg.get("after_seq") or 0))

    def op_logs(self, conn, msg) -> None:
        job_id = str(msg.get("job_id", ""))
        if self.daemon.scheduler.journal.get(job_id) is None:
            raise SubmitRefused("not_found", f"no job {job_id}")
        self._send(conn, {"ok": True, "job_id": job_id})
        self._stream(conn, job_id, int(msg.get("after_seq") or 0), follow=bool(msg.get("follow")))

    def op_cancel(self, conn, msg) -> None:
        job_id = str(msg.get("job_id", ""))
        state = self.daemon.scheduler.cancel(job_id)
        self._send(conn, {"ok": True, "job_id": job_id, "state": state})

    def op_pause(self, conn, msg) -> None:
        job_id = str(msg.get("job_id", ""))
        state = self.daemon.scheduler.pause(job_id)
        log.info("pause of %s requested by %s", job_id, peer_credentials(conn).get("user"))
        self._send(conn, {"ok": True, "job_id": job_id, "state": state})

    def op_resume(self, conn, msg) -> None:
        job_id = str(msg.get("job_id", ""))
        state = self.daemon.scheduler.resume(job_id)
        log.info("resume of %s requested by %s", job_id, peer_credentials(conn).get("user"))
        self._send(conn, {"ok": True, "job_id": job_id, "state": state})

    def op_status(self, conn, msg) -> None:
        self._send(conn, {"ok": True, "status": self.daemon.status()})

    def op_jobs(self, conn, msg) -> None:
        limit = int(msg.get("limit") or 50)
        self._send(conn, {"ok": True, "jobs": self.daemon.jobs(limit)})

    def op_release(self, conn, msg) -> None:
        """action promote {run, name, to, force, reason, alias} | list {name} | rollback {name, to} | verify {name};
        who may do what: agentd.release.service.PERMISSIONS."""
        self._send(conn, self._release_call(conn, msg, str(msg.get("action", ""))))

    def op_backup(self, conn, msg) -> None:
        """No fields: back up every released version; restore {name, version, dir}: bring one back."""
        self._send(conn, self._release_call(conn, msg, "restore" if msg.get("restore") else "backup"))

    def _release_call(self, conn, msg: dict, action: str) -> dict:
        from agentd.release import ReleaseError
        from agentd.release.service import check_permission

        releases = self.daemon.releases
        if releases is None:
            return error("not_configured", "releases are not set up on this daemon: add a release: section "
                                           "(registry and targets) to agentd.yaml and restart agentd")
        submitter = peer_credentials(conn)
        who = submitter.get("user") or f"uid {submitter['uid']}"
        path = msg.get("run") if action == "promote" else msg.get("dir") if action == "restore" else None
        try:
            if path is not None and (not isinstance(path, str) or not os.path.isabs(path)):
                raise ReleaseError(f"{action} needs an absolute path, got {path!r}", "bad_request")
            check_permission(action, Path(path) if path else None, submitter)
            if action == "promote":
                result = releases.promote(Path(path), name=msg.get("name"), to=msg.get("to"),
                                          force=bool(msg.get("force")), reason=msg.get("reason"), by=who,
                                          alias=msg.get("alias") or "production")
            elif action == "list":
                result = releases.list(str(msg.get("name", "")))
            elif action == "rollback":
                result = releases.rollback(str(msg.get("name", "")), _version(msg.get("to")), by=who)
            elif action == "verify":
                result = releases.verify(str(msg.get("name", "")))
            elif action == "backup":
                result = releases.backup()
            else:
                version = _version(msg.get("version"))
                if version is None:
                    raise ReleaseError("restore needs a version (vK)", "bad_request")
                result = {"path": str(releases.restore(str(msg.get("name", "")), version, Path(path)))}
        except ReleaseError as e:
            log.info("release %s by %s refused: %s", action, who, e)
            return error(e.code, str(e), **e.details)
        return {"ok": True, **result}

    def op_drain(self, conn, msg) -> None:
        self.daemon.scheduler.set_draining(True)
        self._send(conn, {"ok": True, "draining": True})

    def op_undrain(self, conn, msg) -> None:
        self.daemon.scheduler.set_draining(False)
        self._send(conn, {"ok": True, "draining": False})


def _version(value) -> int | None:
    """`vK`, `K` or None."""
    if value is None or value == "":
        return None
    from agentd.release import ReleaseError

    text = str(value).lower().removeprefix("v")
    if not text.isdigit():
        raise ReleaseError(f"version {value!r}: write it as vK (e.g. v3)", "bad_request")
    return int(text)


def _peer_gone(conn: socket.socket) -> bool:
    try:
        conn.setblocking(False)
        try:
            data = conn.recv(1, socket.MSG_PEEK)
            return data == b""
        except BlockingIOError:
            return False
        finally:
            conn.setblocking(True)
    except OSError:
        return True
