"""The control server: a Unix socket whose file mode decides who may connect, and
`agentd.permissions` what each peer may do.

Each connection gets a thread (at most MAX_CONNECTIONS at once); a connection carries one request
(and, for submit/attach/logs --follow, the event stream that follows it). Bad input never takes the
daemon down and costs one log line: malformed JSON, JSON nested too deep, an oversized or unterminated
line, an unknown op, a field of the wrong type or a wrong protocol version is answered "bad request:
<what>" and the connection closed; a peer's repeated bad requests and refusals are summarised
(`PeerLog`). A client must send its request line within `idle_client_timeout_s` of connecting (however
it trickles it), and one that stops reading its reply or stream is dropped after SEND_TIMEOUT_S.
The peer's uid, groups and user (SO_PEERCRED, SO_PEERGROUPS) decide what it may do and are recorded as
the owner of each job it submits.
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
import time
from pathlib import Path

from agentd.permissions import Owner, Policy, Requester, decide, new_capability
from agentd.protocol import REQUEST_FIELDS, LineReader, ProtocolError, check_request, encode, error
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
    """`socket_group` or `operator_group` cannot be used (the socket cannot be given to the group, or the
    group does not exist); the message says why and how to fix it."""


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


def permission_policy(operator_group: str | None, build_user: str | None) -> Policy:
    """The permission policy of this daemon: its own uid, the operator group's gid, the build user's uid.
    Raises SocketGroupError when operator_group names no group."""
    gid = None
    if operator_group:
        try:
            gid = grp.getgrnam(operator_group).gr_gid
        except KeyError:
            raise SocketGroupError(f"operator_group {operator_group!r} does not exist: create it (groupadd "
                                   f"{operator_group}) or fix operator_group in agentd.yaml") from None
    build_uid = None
    if build_user:
        try:
            build_uid = pwd.getpwnam(build_user).pw_uid
        except KeyError:
            pass  # the Jenkins link reports a missing agent_user; no job can come from that user meanwhile
    return Policy(daemon_uid=os.geteuid(), operator_group=operator_group, operator_gid=gid, build_uid=build_uid)


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


class PeerLog:
    """The log lines about one peer's bad requests and refusals, bounded: per uid and kind, the first
    `burst` lines of a `window_s` window are logged, the rest only counted and summarised in one line
    ("N more bad requests from uid U") when the window ends, so no socket member can flood the log."""

    MAX_KEYS = 1024  # (uid, kind) windows held at once; past it every window is summarised early

    def __init__(self, emit=None, burst: int = 5, window_s: float = 60.0, clock=time.monotonic):
        self.emit = emit or log.warning
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._windows: dict[tuple[int, str], list] = {}  # (uid, kind) -> [start, logged, counted]
        self._lock = threading.Lock()

    def note(self, uid: int, kind: str, line: str) -> None:
        """One `kind` event ("bad requests", "refusals") from `uid`, described by `line`."""
        now = self.clock()
        with self._lock:
            self._summarise(now, everything=len(self._windows) >= self.MAX_KEYS)
            window = self._windows.setdefault((uid, kind), [now, 0, 0])
            if window[1] < self.burst:
                window[1] += 1
                self.emit(line)
            else:
                window[2] += 1

    def flush(self) -> None:
        """Summarise the windows that ended (the daemon's main loop calls this every tick)."""
        with self._lock:
            self._summarise(self.clock())

    def _summarise(self, now: float, everything: bool = False) -> None:
        for key, (start, _, counted) in list(self._windows.items()):
            if everything or now - start >= self.window_s:
                del self._windows[key]
                if counted:
                    uid, kind = key
                    self.emit(f"{counted} more {kind} from uid {uid} ({_user_name(uid)}) in {now - start:.0f} s "
                              "(not logged one by one)")


MAX_CONNECTIONS = 512  # connections served at once; more are answered "busy" (a thread each)
SEND_TIMEOUT_S = 60.0  # a client that stops reading its reply or stream for this long is dropped


class ControlServer:
    def __init__(self, daemon, sock: socket.socket, *, max_bytes: int, idle_timeout: float, policy: Policy):
        self.daemon = daemon
        self.sock = sock
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.policy = policy
        self.peer_log = PeerLog()
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
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
            if not self._slots.acquire(blocking=False):
                self._send(conn, error("busy", f"agentd is serving {MAX_CONNECTIONS} connections; try again"))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()

    # --- one connection ---------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_one(conn)
        finally:
            self._slots.release()

    def _serve_one(self, conn: socket.socket) -> None:
        peer = {}
        try:
            peer = peer_credentials(conn)
            reader = LineReader(conn, self.max_bytes)
            msg = reader.read_message(deadline=time.monotonic() + self.idle_timeout)
            if msg is None:
                return
            op = check_request(msg)
            who = Requester(peer["uid"], peer["user"], frozenset(peer["groups"]), msg.get("capability"))
            job_id = msg.get("job_id") if "job_id" in REQUEST_FIELDS[op] else None
            if job_id is not None:
                record = self.daemon.scheduler.journal.get(job_id)
                if record is None:
                    raise SubmitRefused("not_found", f"no job {job_id}")
                refusal = decide(op, who, self.policy, job_id, Owner.of(record))
            elif op == "sweep_stop":
                owner = self.daemon.sweeps.owner(msg["name"], self.policy.build_uid)
                if owner is None:
                    raise SubmitRefused("not_found", f"no sweep {msg['name']!r} running on this daemon")
                refusal = decide(op, who, self.policy, f"sweep {msg['name']}", owner)
            else:
                refusal = decide(op, who, self.policy)
            if refusal:
                self._refuse(conn, op, who, job_id, refusal)
                return
            conn.settimeout(SEND_TIMEOUT_S)
            getattr(self, f"op_{op}")(conn, msg, who)
        except ProtocolError as e:
            self.peer_log.note(peer.get("uid", -1), "bad requests",
                               f"{e.message} (from {peer.get('user')}, uid {peer.get('uid')}, pid {peer.get('pid')})")
            self._send(conn, error(e.code, e.message))
        except SubmitRefused as e:
            self._send(conn, error(e.code, e.message, **e.details))
        except socket.timeout:
            log.debug("dropping a client that sent no request line for %.0f s", self.idle_timeout)
        except OSError:
            pass  # the client went away (reset, broken pipe)
        except Exception as e:  # a bug in one handler must not take the daemon down
            log.exception("control request failed")
            self._send(conn, error("internal", f"{type(e).__name__}: {e}"))

    def _refuse(self, conn: socket.socket, op: str, who: Requester, job_id: str | None, reason: str) -> None:
        """Refused: journaled with the requester, logged (bounded), answered; nothing else changes."""
        self.daemon.scheduler.journal.add_refusal(op=op, job_id=job_id, uid=who.uid, user=who.user, reason=reason)
        self.peer_log.note(who.uid, "refusals", f"refused {op}{' ' + job_id if job_id else ''} for {who.name} "
                                                f"(uid {who.uid}): {reason}")
        self._send(conn, error("not_permitted", reason))

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

    # --- ops (who may call each: agentd.permissions.PERMISSIONS, checked before they run) -----------
    def op_ping(self, conn, msg, who) -> None:
        self._send(conn, {"ok": True, "pid": os.getpid(), "version": self.daemon.version})

    def op_submit(self, conn, msg, who: Requester) -> None:
        # A build's job gets a capability: only the client holding it (and operators) may act on the job.
        capability, digest = new_capability() if self.policy.is_build(who) else (None, None)
        job_id, attached = self.daemon.scheduler.submit(
            config_path=msg["config_path"], config_text=msg["config_text"], env=msg.get("env") or {},
            submitter=peer_credentials(conn), priority=msg.get("priority"), capability_sha256=digest,
            rendezvous={k: msg[k] for k in ("nodes", "node_rank", "rdzv_endpoint") if msg.get(k) is not None} or None)
        if attached:  # someone's job already trains into that folder: following it is an owner's act
            refusal = decide("attach", who, self.policy, job_id, Owner.of(self.daemon.scheduler.journal.get(job_id)))
            if refusal:
                self._refuse(conn, "attach", who, job_id, f"{job_id} already trains into the same output_dir. "
                                                          + refusal)
                return
            capability = None
        reply = {"ok": True, "job_id": job_id, "attached": attached}
        if capability:
            reply["capability"] = capability
        self._send(conn, reply)
        if not msg.get("detach"):
            self._stream(conn, job_id, 0)

    def op_eval(self, conn, msg, who: Requester) -> None:
        """`agentd eval RUN`: a job that evaluates a finished run, queued, gated, journaled and cancellable like
        a training job, with the same access checks on the run's config (permission: submit's, see
        agentd.permissions)."""
        capability, digest = new_capability() if self.policy.is_build(who) else (None, None)
        job_id, _ = self.daemon.scheduler.submit(
            config_path=msg["config_path"], config_text=msg["config_text"], env={},
            submitter=peer_credentials(conn), capability_sha256=digest,
            evaluate={"run": msg["run"], "against": msg.get("against")})
        reply = {"ok": True, "job_id": job_id, "attached": False}
        if capability:
            reply["capability"] = capability
        self._send(conn, reply)
        self._stream(conn, job_id, 0)

    def op_attach(self, conn, msg, who) -> None:
        job_id = msg["job_id"]
        rec = self.daemon.scheduler.journal.get(job_id)
        self._send(conn, {"ok": True, "job_id": job_id, "state": rec["state"]})
        self._stream(conn, job_id, msg.get("after_seq") or 0)

    def op_logs(self, conn, msg, who) -> None:
        job_id = msg["job_id"]
        self._send(conn, {"ok": True, "job_id": job_id})
        self._stream(conn, job_id, msg.get("after_seq") or 0, follow=bool(msg.get("follow")))

    def op_cancel(self, conn, msg, who) -> None:
        job_id = msg["job_id"]
        state = self.daemon.scheduler.cancel(job_id)
        log.info("cancel of %s requested by %s", job_id, who.name)
        self._send(conn, {"ok": True, "job_id": job_id, "state": state})

    def op_pause(self, conn, msg, who) -> None:
        job_id = msg["job_id"]
        state = self.daemon.scheduler.pause(job_id)
        log.info("pause of %s requested by %s", job_id, who.name)
        self._send(conn, {"ok": True, "job_id": job_id, "state": state})

    def op_resume(self, conn, msg, who) -> None:
        job_id = msg["job_id"]
        state = self.daemon.scheduler.resume(job_id)
        log.info("resume of %s requested by %s", job_id, who.name)
        self._send(conn, {"ok": True, "job_id": job_id, "state": state})

    def op_status(self, conn, msg, who) -> None:
        self._send(conn, {"ok": True, "status": self.daemon.status()})

    def op_jobs(self, conn, msg, who) -> None:
        self._send(conn, {"ok": True, "jobs": self.daemon.jobs(msg.get("limit") or 50)})

    # --- sweeps (agentd.sweep; who may: agentd.permissions.PERMISSIONS, a sweep's owner is its submitter) ---
    def op_sweep_run(self, conn, msg, who) -> None:
        """Start a sweep; then stream its trials' events ({"trial": N, "event": ...}) and its own
        (sweep_trial, sweep_finished) until it ends on this box."""
        path, text, base_text = msg["sweep_path"], msg["sweep_text"], msg["base_text"]
        env = {k: str(v) for k, v in (msg.get("env") or {}).items()}
        run = self.daemon.sweeps.run(path, text, base_text, peer_credentials(conn), env)
        self._send(conn, {"ok": True, "sweep": run.name, "folder": str(run.sweep.folder), "warnings": run.warnings,
                          "attached": run.attached})
        if not msg.get("detach"):
            self._stream_sweep(conn, run)

    def op_sweep_follow(self, conn, msg, who) -> None:
        run = self.daemon.sweeps.get(str(msg.get("name", "")))
        if run is None:
            raise SubmitRefused("not_found", f"no sweep {msg.get('name')!r} running on this daemon")
        self._send(conn, {"ok": True, "sweep": run.name})
        self._stream_sweep(conn, run)

    def op_sweep_status(self, conn, msg, who) -> None:
        self._send(conn, {"ok": True, "sweep": self.daemon.sweeps.status(str(msg.get("name", "")))})

    def op_sweep_report(self, conn, msg, who) -> None:
        self._send(conn, {"ok": True, **self.daemon.sweeps.report(str(msg.get("name", "")), bool(msg.get("html")))})

    def op_sweep_stop(self, conn, msg, who) -> None:
        name = str(msg.get("name", ""))
        state = self.daemon.sweeps.stop(name)
        log.info("stop of sweep %s requested by %s", name, who.name)
        self._send(conn, {"ok": True, "sweep": name, "state": state})

    def _stream_sweep(self, conn, run) -> None:
        q = run.subscribe()
        try:
            while True:
                try:
                    m = q.get(timeout=1.0)
                except queue.Empty:
                    if _peer_gone(conn):
                        return
                    continue
                if m is None or not self._send(conn, m):
                    return
        finally:
            run.unsubscribe(q)

    def op_release(self, conn, msg, who) -> None:
        """action promote {run, name, to, force, reason, alias} | list {name} | rollback {name, to} | verify {name};
        any socket member may ask (agentd.permissions); what each may do with which run:
        agentd.release.service.PERMISSIONS."""
        self._send(conn, self._release_call(conn, msg, str(msg.get("action", ""))))

    def op_backup(self, conn, msg, who) -> None:
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
        by = submitter.get("user") or f"uid {submitter['uid']}"
        path = msg.get("run") if action == "promote" else msg.get("dir") if action == "restore" else None
        try:
            if path is not None and (not isinstance(path, str) or not os.path.isabs(path)):
                raise ReleaseError(f"{action} needs an absolute path, got {path!r}", "bad_request")
            check_permission(action, Path(path) if path else None, submitter)
            if action == "promote":
                result = releases.promote(Path(path), name=msg.get("name"), to=msg.get("to"),
                                          force=bool(msg.get("force")), reason=msg.get("reason"), by=by,
                                          alias=msg.get("alias") or "production")
            elif action == "list":
                result = releases.list(str(msg.get("name", "")))
            elif action == "rollback":
                result = releases.rollback(str(msg.get("name", "")), _version(msg.get("to")), by=by)
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
            log.info("release %s by %s refused: %s", action, by, e)
            return error(e.code, str(e), **e.details)
        return {"ok": True, **result}

    def op_drain(self, conn, msg, who) -> None:
        self.daemon.scheduler.set_draining(True)
        log.info("drain requested by %s", who.name)
        self._send(conn, {"ok": True, "draining": True})

    def op_undrain(self, conn, msg, who) -> None:
        self.daemon.scheduler.set_draining(False)
        log.info("undrain requested by %s", who.name)
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
        timeout = conn.gettimeout()
        conn.setblocking(False)
        try:
            data = conn.recv(1, socket.MSG_PEEK)
            return data == b""
        except BlockingIOError:
            return False
        finally:
            conn.settimeout(timeout)  # keep the send timeout: a client that stops reading is dropped
    except OSError:
        return True
