"""Supervisor for the inbound agent: ``java -jar agent.jar -url URL -name NAME -secret @FILE -workDir DIR``.

agent.jar reconnects to the controller by itself, so this only restarts it when the *process* exits, with
exponential backoff and jitter; the backoff resets once a run lasted ``stable_s``. The secret goes into a
0600 file passed as ``-secret @FILE`` and never into argv (which any local user can read in /proc) nor the
environment. The child runs in its own session so that stopping it also stops what it started; its output
lines go to the ``agentd.jenkins.agent`` logger (the daemon's journal).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from agentd.jenkins.backoff import backoff_delay
from agentd.jenkins.settings import JenkinsSettings, Secret
from agentd.jenkins.versions import MIN_CONTROLLER_VERSION

log = logging.getLogger(__name__)
agent_log = logging.getLogger("agentd.jenkins.agent")

SECRET_FILE_NAME = "agent.secret"


def build_agent_command(java: Union[str, Sequence[str]], jar: Path, url: str, name: str, secret_file: Path,
                        work_dir: Path, websocket: bool = False) -> list[str]:
    """The agent's argv. ``java`` may carry options (``"java -Xmx512m"``) or be a stand-in for tests."""
    base = shlex.split(java) if isinstance(java, str) else list(java)
    if not base:
        raise ValueError("the java command is empty")
    command = base + ["-jar", str(jar), "-url", url, "-name", name,
                      "-secret", f"@{secret_file}", "-workDir", str(work_dir)]
    if websocket:
        command.append("-webSocket")
    return command


def write_secret_file(path: Path, secret: Secret, mode: int = 0o600) -> bool:
    """Write the secret to ``path`` with ``mode`` (folder 0700 when created here), atomically. True when
    it changed.

    The file is created with its final mode from the start (never briefly world-readable) and renamed
    into place, so agent.jar never reads a half-written secret. ``mode`` is 0640 when agent.jar runs as
    the build user: the folder's group (setgid, the build user's group) lets that user read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    content = (secret.reveal() + "\n").encode("utf-8")
    try:
        if path.read_bytes() == content and (path.stat().st_mode & 0o777) == mode:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; make it exact
        os.write(fd, content)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return True


# What an agent.jar prints when it does not know an option agentd passed (remoting's Launcher.main catches
# args4j's CmdLineException, prints the error and its usage, and returns: the process exits 0).
_USAGE_TEXT = re.compile(r'^"?-\S+"? is not a valid option|^java -jar (agent|slave)\.jar \[options\.\.\.\]')


def usage_problem(line: Optional[str], command: Sequence[str]) -> Optional[str]:
    """The message for an agent.jar that exited 0 after printing ``line`` of its usage text."""
    if line is None:
        return None
    options = " ".join(arg for arg in command if arg.startswith("-") and arg != "-jar")
    return (f"agent.jar printed its usage and exited ({line.strip()!r}): this agent.jar (the controller's "
            f"remoting) does not accept the options agentd starts it with ({options}); upgrade Jenkins to "
            f"{MIN_CONTROLLER_VERSION} or later. agentd does not restart it until the controller serves another agent.jar")


def _log_level_for(line: str) -> int:
    """agent.jar logs with java.util.logging: map its level word to ours so errors stand out."""
    head = line.lstrip()[:8]
    if head.startswith("SEVERE"):
        return logging.ERROR
    if head.startswith("WARNING"):
        return logging.WARNING
    return logging.INFO


class AgentProcess:
    """Keeps one agent.jar process running until :meth:`stop`.

    Typical use (:class:`~agentd.jenkins.agent_jar.InboundAgent` does this): ``set_secret(secret)``, ``start()``; ``restart()`` after a new
    agent.jar was downloaded; ``stop()`` on shutdown. All methods are thread-safe.
    """

    def __init__(self, *, java: Union[str, Sequence[str]], jar: Path, url: str, name: str, work_dir: Path,
                 secret_file: Path, websocket: bool = False, restart_min_s: float = 1.0,
                 restart_max_s: float = 60.0, stable_s: float = 60.0, stop_timeout_s: float = 10.0,
                 env: Optional[Mapping[str, str]] = None, rng: Optional[random.Random] = None,
                 user: Optional[str] = None):
        self.command = build_agent_command(java, jar, url, name, secret_file, work_dir, websocket)
        self.jar = Path(jar)
        self.work_dir = Path(work_dir)
        self.secret_file = Path(secret_file)
        self.restart_min_s = restart_min_s
        self.restart_max_s = restart_max_s
        self.stable_s = stable_s
        self.stop_timeout_s = stop_timeout_s
        # agent.jar runs every build: it gets the build user and an allow-listed environment (agentd.privileges),
        # never the daemon's (credentials, NOTIFY_SOCKET, token variables). `env` adds explicit variables.
        self.user = user
        self._extra_env = dict(env or {})
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._restart_now = False
        self._thread: Optional[threading.Thread] = None
        self._proc: Optional[subprocess.Popen] = None
        self._secret: Optional[Secret] = None
        self._state = "stopped"
        self._since = time.time()
        self._started_at: Optional[float] = None
        self._restarts = 0
        self._last_exit_code: Optional[int] = None
        self._last_error: Optional[str] = None
        self._next_start_at: Optional[float] = None
        self._usage_line: Optional[str] = None       # a usage text line agent.jar printed this run
        self._gave_up_reason: Optional[str] = None   # set when agent.jar exited with its usage text

    @classmethod
    def from_settings(cls, settings: JenkinsSettings, jar: Path, **overrides) -> "AgentProcess":
        """An agent configured from the ``jenkins:`` settings (the URL is the controller's root URL)."""
        kwargs = dict(java=settings.java, jar=jar, url=settings.url or "", name=settings.node_name,
                      work_dir=Path(settings.remote_fs),
                      secret_file=Path(settings.agent_jar_dir) / SECRET_FILE_NAME,
                      websocket=settings.websocket, restart_min_s=settings.agent_restart_min_s,
                      restart_max_s=settings.agent_restart_max_s, stable_s=settings.agent_stable_s,
                      stop_timeout_s=settings.agent_stop_timeout_s, user=settings.agent_user)
        kwargs.update(overrides)
        return cls(**kwargs)

    # -- control -------------------------------------------------------------------------------------

    def set_secret(self, secret: Secret) -> bool:
        """Store the agent secret in the 0600 file. True when it changed (the caller then restarts)."""
        with self._lock:
            self._secret = secret
        return write_secret_file(self.secret_file, secret, 0o640 if self.user else 0o600)

    def start(self) -> None:
        """Start supervising (idempotent). The secret must have been set."""
        with self._lock:
            if self._thread and self._thread.is_alive():
                return
            if self._secret is None:
                raise RuntimeError("set_secret() before start()")
            self._stopping.clear()
            self._wake.clear()
            self._gave_up_reason = None
            self._thread = threading.Thread(target=self._supervise, name="agentd-jenkins-agent", daemon=True)
            self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the agent: SIGTERM to its process group, SIGKILL after ``stop_timeout_s``, reap it."""
        with self._lock:
            self._stopping.set()
            self._wake.set()
            proc = self._proc
            thread = self._thread
            if self._state != "stopped":
                self._set_state("stopping")
        if proc is not None:
            self._terminate(proc)
        if thread is not None:
            thread.join(timeout if timeout is not None else self.stop_timeout_s + 5)
        with self._lock:
            self._set_state("stopped")

    def restart(self) -> None:
        """Restart now without backoff (e.g. a new agent.jar or secret). Does nothing when not running."""
        with self._lock:
            if not (self._thread and self._thread.is_alive()):
                return
            self._restart_now = True
            self._wake.set()
            proc = self._proc
        if proc is not None:
            self._terminate(proc)

    @property
    def running(self) -> bool:
        """True while the supervisor is active (the child may be between restarts)."""
        thread = self._thread
        return bool(thread and thread.is_alive())

    def status(self) -> dict:
        """State for ``agentd status``. Safe to show: argv holds no secret, only the secret file's path."""
        with self._lock:
            now = time.time()
            return {
                "state": self._state,
                "pid": self._proc.pid if self._proc is not None and self._proc.poll() is None else None,
                "restarts": self._restarts,
                "last_exit_code": self._last_exit_code,
                "since": self._since,
                "uptime_s": (round(now - self._started_at, 1)
                             if self._state == "running" and self._started_at else None),
                "next_restart_in_s": (round(max(0.0, self._next_start_at - time.monotonic()), 1)
                                      if self._state == "backoff" and self._next_start_at else None),
                "last_error": self._last_error,
                "gave_up_reason": self._gave_up_reason,
                "jar": str(self.jar),
                "command": list(self.command),
            }

    # -- supervision ---------------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self._since = time.time()

    def _spawn(self) -> Optional[subprocess.Popen]:
        with self._lock:
            if self._stopping.is_set():
                return None
            self._set_state("starting")
            self.work_dir.mkdir(parents=True, exist_ok=True)
            identity = self._identity()
            proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    text=True, errors="replace", bufsize=1, cwd=self.work_dir, **identity)
            self._proc = proc
            self._started_at = time.time()
            self._set_state("running")
        log.info("agent.jar started (pid %d): %s", proc.pid, shlex.join(self.command))
        return proc

    def _identity(self) -> dict:
        """Popen's user/group/groups/env/umask for agent.jar. Raises PermissionError (an OSError, reported as
        the agent's last error) when the build user is missing or cannot use its files."""
        from agentd.privileges import (BuildUser, agent_environment, agent_files_problem,
                                       may_switch_to, own_effective_capabilities)

        if self.user is None:
            return {"env": agent_environment(os.environ, None, self._extra_env)}
        try:
            user = BuildUser.lookup(self.user)
        except LookupError as e:
            raise PermissionError(str(e)) from None
        problem = (may_switch_to(user, os.geteuid(), own_effective_capabilities())
                   or agent_files_problem(user, self.jar, self.secret_file, self.work_dir))
        if problem:
            raise PermissionError(problem)
        # umask 0007: what builds write (their outputs, the workspace) stays readable and writable by the
        # group of the socket (the daemon, operators), and by nobody else.
        identity = {"env": agent_environment(os.environ, user, self._extra_env), "umask": 0o007}
        self._spawned_as = None
        if os.geteuid() != user.uid:
            identity.update(user=user.uid, group=user.gid, extra_groups=list(user.groups))
            self._spawned_as = user  # then only that user may signal it (agentd.privileges.signal_group_as)
        return identity

    def _killpg(self, pgid: int, sig: int) -> None:
        user = getattr(self, "_spawned_as", None)
        if user is None:
            os.killpg(pgid, sig)
        else:
            from agentd.privileges import signal_group_as

            signal_group_as(user, pgid, sig)

    def _forward_output(self, proc: subprocess.Popen) -> None:
        secret = self._secret.reveal() if self._secret else None
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if secret and secret in line:  # agent.jar does not print it; make sure of it anyway
                line = line.replace(secret, "***")
            if self._usage_line is None and _USAGE_TEXT.search(line):
                self._usage_line = line
            agent_log.log(_log_level_for(line), "%s", line)

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as e:
                proc = None
                with self._lock:
                    self._last_error = f"cannot start {self.command[0]}: {e.strerror or e}"
                    self._set_state("failed")
                log.error("agent.jar: %s", self._last_error)
            if proc is None and self._stopping.is_set():
                break
            if proc is not None:
                reader = threading.Thread(target=self._forward_output, args=(proc,), daemon=True,
                                          name="agentd-jenkins-agent-output")
                reader.start()
                code = proc.wait()
                reader.join(timeout=2)
                if not reader.is_alive() and proc.stdout is not None:
                    proc.stdout.close()   # the pipe is done (a grandchild may still hold it: then leave it)
                with self._lock:
                    self._last_exit_code = code
                    self._proc = None
                    if not self._stopping.is_set() and not self._restart_now:
                        self._last_error = f"agent.jar exited with code {code}"
                        # Exit 0 with a usage text: this agent.jar cannot take agentd's options, and
                        # restarting it would only print the usage again, forever.
                        problem = usage_problem(self._usage_line, self.command) if code == 0 else None
                        if problem:
                            self._gave_up_reason = self._last_error = problem
                            self._set_state("failed")
                    self._usage_line = None
                if self._gave_up_reason:
                    log.error("agent.jar: %s", self._gave_up_reason)
                    break
            ran = time.monotonic() - started
            with self._lock:
                if self._stopping.is_set():
                    break
                self._restarts += 1
                if self._restart_now:
                    self._restart_now = False
                    self._wake.clear()
                    failures = 0
                    log.info("agent.jar restarting on request")
                    continue
                failures = 1 if ran >= self.stable_s else failures + 1
                delay = backoff_delay(failures, self.restart_min_s, self.restart_max_s, self._rng)
                self._next_start_at = time.monotonic() + delay
                self._set_state("backoff")
            log.warning("agent.jar exited (code %s) after %.1fs; restarting in %.1fs",
                        self._last_exit_code, ran, delay)
            self._wake.wait(delay)
            with self._lock:
                self._wake.clear()
                self._restart_now = False
        with self._lock:
            if self._gave_up_reason is None:   # "failed" stays visible in status after giving up
                self._set_state("stopped")
        log.info("agent.jar supervisor stopped")

    def _terminate(self, proc: subprocess.Popen) -> None:
        """SIGTERM the child's process group, SIGKILL it after the timeout; always reap."""
        if proc.poll() is not None:
            return
        try:
            self._killpg(proc.pid, signal.SIGTERM)  # start_new_session: the group id is the child's pid
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("agent.jar (pid %d) ignored SIGTERM for %.0fs; killing it",
                        proc.pid, self.stop_timeout_s)
            try:
                self._killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
