"""The Jenkins link: keep this box's node in Jenkins true to the daemon's state, with python-jenkins.

What it keeps true, on every sync (at start, every ``sync_interval_s``, and when the wanted state changes):

* the node exists (created again when a controller restart or an admin removed it), usage mode
  EXCLUSIVE (only builds whose label expression matches), executors = the daemon's slot count, labels =
  configured + derived from the GPUs, a description with the GPU summary and agentd's version. The node's
  ``config.xml`` is read and posted back only when one of those differs; the fields agentd does not own
  are written back byte for byte (:func:`plan_reconfig` edits the owned elements in place);
* temporarily offline, with a reason, while the daemon asks for it (the VRAM gate cannot take a job, a
  GPU is unhealthy, ``agentd drain``), and online again when that clears. ``temporarilyOffline`` is read
  and ``toggleOffline`` posted only when it must change: python-jenkins' ``enable_node``/``disable_node``
  look at ``offline``, which is also true for a merely disconnected agent, and would toggle the wrong way.
  agentd remembers, in ``state_dir``, that *it* took the node offline and why (:class:`OfflineMark`), so
  it brings the node back even when the controller changed the cause text: before Jenkins 2.482 a
  reconnect clears the cause and a broken connection replaces it, and from 2.483 the text comes back
  HTML-escaped. A node an administrator marked offline by hand is left offline, and ``status()`` shows it;
* for ``launcher: inbound``: agent.jar is downloaded from the controller (cached, fetched again when the
  controller's version changes), the agent secret is read from the node's JNLP file when agent.jar starts
  or has exited (failed to connect), and agent.jar is kept running by
  :class:`~agentd.jenkins.agent_process.AgentProcess`.

Politeness: an idle box costs the controller two requests per ``sync_interval_s`` (the node's api/json and
config.xml). :meth:`JenkinsLink.request_offline` / :meth:`~JenkinsLink.request_online`, which the daemon
calls every tick, wake the loop only when the wanted state changes (online <-> offline, or another *kind*
of reason, :func:`reason_kind`), never for new numbers inside a reason; the controller's version is read
from the ``X-Jenkins`` header of the node's api/json response, never from an extra ``GET /``.

Controller versions: :data:`MIN_CONTROLLER_VERSION` (2.440.1) is the oldest supported; below it the link
reports ``unsupported-version`` and does not start agent.jar (see :func:`version_problem`). A response
without ``X-Jenkins`` (a proxy stripped it) leaves the version unknown: the link keeps working and says so.

Faults (controller down, timeouts, 5xx, bad credentials) never raise out of :meth:`JenkinsLink.sync` or
the background thread: the link records a state (``disabled``, ``connecting``, ``online``, ``offline``,
``unsupported-version``, ``auth-error``, ``error``) and a token-free ``last_error``, and retries with
exponential backoff and jitter. The credentials are checked first with ``get_whoami`` because
python-jenkins' ``node_exists`` answers False on *any* error, so a bad token would otherwise look like a
missing node.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TypeVar, Union
from urllib.parse import quote, urljoin

import jenkins
import requests

from agentd import __version__
from agentd.jenkins.agent_process import AgentProcess
from agentd.jenkins.backoff import backoff_delay
from agentd.jenkins.labels import GpuFactsLike, derive_labels, node_description
from agentd.jenkins.node_config import (JNLP_LAUNCHER, SSH_LAUNCHER, ConfigError, NodeSpec, plan_reconfig,
                                        xml_encoding)
from agentd.jenkins.offline import (OFFLINE_PREFIX, OfflineMarkStore, jenkins_unescape, offline_action,
                                    offline_message, reason_kind)
from agentd.jenkins.settings import JenkinsSettings, Secret, token_source
from agentd.jenkins.versions import MIN_CONTROLLER_VERSION, unknown_version_note, version_problem

log = logging.getLogger(__name__)

T = TypeVar("T")

# Re-exported: the node's spec and config.xml planning live in node_config, the offline decision in offline.
__all__ = ["JenkinsLink", "LinkError", "AuthError", "Triggered", "NodeSpec", "plan_reconfig",
           "offline_action", "OFFLINE_PREFIX", "JNLP_LAUNCHER", "SSH_LAUNCHER", "desired_spec", "job_problem"]

_MAX_JAR_BYTES = 128 * 1024 * 1024

# Jenkins permissions each operation needs, for the 403 message.
_PERMISSIONS = {
    "read": "Overall/Read",
    "read controller version": "Overall/Read",
    "read node": "Overall/Read",
    "create node": "Agent/Create",
    # GET config.xml needs Agent/ExtendedRead, which Agent/Configure implies; ExtendedRead itself is only
    # offered in the matrix when a system property enables it, so name the one an admin can grant.
    "read node config": "Agent/Configure",
    "reconfigure node": "Agent/Configure",
    "mark node offline": "Agent/Disconnect",
    "mark node online": "Agent/Connect",
    "read agent secret": "Agent/Connect",
    "download agent.jar": "Overall/Read",
    "trigger build": "Job/Build",
    "check job": "Job/Read",
}


class LinkError(Exception):
    """A Jenkins operation failed. The message is for people and never contains the token."""


class AuthError(LinkError):
    """401/403: the message says which credential or permission to check."""


# -- pure decisions ---------------------------------------------------------------------------------


def desired_spec(settings: JenkinsSettings, gpus: Sequence[GpuFactsLike], slots: int,
                 version: str = __version__, ssh_host: Optional[str] = None) -> NodeSpec:
    """The :class:`NodeSpec` for these settings, GPUs and slot count (executors are at least 1)."""
    executors = max(1, int(slots))
    if settings.launcher == "ssh":
        assert settings.ssh is not None  # the settings validator guarantees it
        fields = [("host", settings.ssh.host or ssh_host or socket.getfqdn()),
                  ("port", str(settings.ssh.port)),
                  ("credentialsId", settings.ssh.credentials_id)]
        if settings.ssh.java_path:
            fields.append(("javaPath", settings.ssh.java_path))
        launcher_class, launcher_fields = SSH_LAUNCHER, tuple(fields)
    else:
        launcher_class = JNLP_LAUNCHER
        launcher_fields = (("webSocket", "true" if settings.websocket else "false"),)
    return NodeSpec(
        name=settings.node_name,
        description=node_description(gpus, version, executors),
        executors=executors,
        labels=tuple(derive_labels(gpus, settings.labels)),
        remote_fs=settings.remote_fs,
        launcher_class=launcher_class,
        launcher_fields=launcher_fields,
        manage_launcher=settings.launcher != "none",
    )


def parse_jnlp_secret(jnlp_xml: str) -> str:
    """The agent secret: the first ``<argument>`` of ``<application-desc>`` in the node's JNLP file."""
    try:
        root = ET.fromstring(jnlp_xml)
    except ET.ParseError as e:
        raise LinkError(f"the node's JNLP file is not XML ({e})") from None
    argument = root.find("./application-desc/argument")
    secret = (argument.text or "").strip() if argument is not None else ""
    if not re.fullmatch(r"[0-9A-Za-z+/=_-]{8,}", secret):
        raise LinkError("the node's JNLP file holds no agent secret (is the node an inbound agent?)")
    return secret


def is_jar(path: Path) -> bool:
    """True for a readable zip with a manifest whose entries pass their CRC check (catches truncation)."""
    try:
        with zipfile.ZipFile(path) as jar:
            return "META-INF/MANIFEST.MF" in jar.namelist() and jar.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status behind a python-jenkins/requests error, when there is one."""
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return int(response.status_code)
    match = re.search(r"\[(\d{3})\]", str(exc))  # JenkinsException: "... authentication failed [401]: ..."
    return int(match.group(1)) if match else None


def _is_crumb_rejection(exc: BaseException) -> bool:
    return http_status(exc) == 403 and "crumb" in str(exc).lower()


def describe_error(exc: BaseException, timeout_s: Optional[float] = None) -> str:
    """A short, token-free description of a client-side failure."""
    text = str(exc)
    if isinstance(exc, jenkins.TimeoutException) or isinstance(exc, requests.Timeout):
        return f"timed out{f' after {timeout_s:g}s' if timeout_s else ''}"
    if isinstance(exc, requests.exceptions.SSLError):
        match = re.search(r"\[SSL: [A-Z_]+\] [^'\"(]*", text)
        detail = match.group(0).strip() if match else text[:200]
        hint = " (set jenkins.ca_bundle to the CA's PEM file)" if "CERTIFICATE_VERIFY_FAILED" in text else ""
        return f"TLS error: {detail}{hint}"
    if isinstance(exc, requests.ConnectionError):
        if "refused" in text.lower():
            return "connection refused"
        if "Name or service not known" in text or "getaddrinfo" in text or "resolve" in text.lower():
            return "host name not found"
        return "connection failed: " + text[:200]
    if isinstance(exc, jenkins.NotFoundException):
        return "not found (HTTP 404)"
    status = http_status(exc)
    if status is not None:
        match = re.search(r"\[\d{3}\]: ?([^\n]*)", text)
        reason = f" {match.group(1).strip()}" if match and match.group(1).strip() else ""
        return f"HTTP {status}{reason}"
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first_line[:300]


def _agent_settings(settings: JenkinsSettings) -> tuple:
    """The settings agent.jar runs with: when one changes, the agent must be restarted."""
    return (settings.launcher, settings.url, settings.node_name, settings.remote_fs, settings.websocket,
            str(settings.agent_jar_dir), settings.java, settings.agent_restart_min_s,
            settings.agent_restart_max_s, settings.agent_stable_s, settings.agent_stop_timeout_s)


def job_problem(info: Mapping, job: str, parameters: Sequence[str]) -> Optional[str]:
    """Why ``job`` (its api/json) cannot take a build with these parameters, naming both, or None.

    Jenkins answers a disabled job's buildWithParameters with 409, a job without parameters with an
    error, and silently drops a parameter the job does not define (the build then runs with the
    default): so all three are checked before the first trigger.
    """
    if info.get("buildable") is False or info.get("disabled") is True:
        return f"Jenkins job {job!r} is disabled (not buildable): enable it in Jenkins"
    defined = []
    for holder in list(info.get("property") or []) + list(info.get("actions") or []):
        if isinstance(holder, Mapping):
            defined += [d.get("name") for d in holder.get("parameterDefinitions") or [] if isinstance(d, Mapping)]
    if not defined:
        return (f"Jenkins job {job!r} takes no parameters: make it parameterized with a string parameter "
                f"{', '.join(repr(p) for p in parameters)} (the Jenkinsfile's parameters {{ }} block)")
    missing = [p for p in parameters if p not in defined]
    if missing:
        return (f"Jenkins job {job!r} does not define the parameter {', '.join(repr(p) for p in missing)} "
                f"(it defines {', '.join(repr(d) for d in defined)}): add it to the job, or set "
                "jenkins.watch.parameter to one of those")
    return None


@dataclass(frozen=True)
class Triggered:
    """A trigger's outcome: a new queue item, or an identical build that was already queued (HTTP 303)."""

    queue_id: Optional[int]
    already_queued: bool = False

    def __str__(self) -> str:
        return "already queued" if self.already_queued else f"queue item {self.queue_id}"


# -- the link ---------------------------------------------------------------------------------------


class JenkinsLink:
    """Registers this box as a Jenkins node and keeps it true; see the module docstring.

    The daemon constructs it with the settings, the token (``read_token(settings)``), a callable returning
    the current GPU facts and the slot count (and ``state_dir`` for the offline mark), then calls
    :meth:`start` / :meth:`stop`, :meth:`request_offline` / :meth:`request_online` every tick (cheap: only a
    change of wanted state wakes the loop), :meth:`resync` when the GPUs change, :meth:`status` for
    ``agentd status`` and :meth:`trigger_build` for the folder trigger.
    """

    def __init__(self, settings: JenkinsSettings, token: Optional[Secret],
                 gpus: Callable[[], Sequence[GpuFactsLike]],
                 slots: Union[int, Callable[[], int], None] = None, *,
                 version: str = __version__,
                 agent_factory: Optional[Callable[[JenkinsSettings, Path], AgentProcess]] = None,
                 rng: Optional[random.Random] = None,
                 state_dir: Optional[Path] = None):
        self._settings = settings
        self._token = token
        self._gpus = gpus
        self._slots = slots
        self._version = version
        self._agent_factory = agent_factory or AgentProcess.from_settings
        self._rng = rng or random.Random()
        self._state_dir = state_dir
        self._ssh_host = socket.getfqdn() if settings.launcher == "ssh" else None
        self._io_lock = threading.RLock()      # one python-jenkins session, one user at a time
        self._lock = threading.Lock()          # the fields below
        self._wake = threading.Event()         # run a sync now (honoured when the last one succeeded)
        self._kick = threading.Event()         # run a sync now, even during a retry backoff
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._client: Optional[jenkins.Jenkins] = None
        self._client_authed = False
        self._agent: Optional[AgentProcess] = None
        self._agent_exits_seen = 0             # agent.jar exits already answered with a fresh secret
        self._want_offline_reason: Optional[str] = None
        self._mark = OfflineMarkStore(state_dir, settings.url or "", settings.node_name)
        self._checked_jobs: set[tuple[str, tuple[str, ...]]] = set()
        self._state = "connecting" if settings.enabled else "disabled"
        self._last_error: Optional[str] = None
        self._failures = 0
        self._last_attempt: Optional[float] = None
        self._last_ok: Optional[float] = None
        self._next_sync_at: Optional[float] = None
        self._controller_version: Optional[str] = None
        self._version_seen = False             # a response was read (so a None version means "no header")
        self._jar_version: Optional[str] = None
        self._whoami: Optional[str] = None
        self._observed: dict = {}
        if settings.enabled and not settings.verify_tls and settings.ca_bundle is None:
            log.warning("jenkins.verify_tls is off: the controller's certificate is not checked")

    # -- daemon-facing API ---------------------------------------------------------------------------

    @property
    def settings(self) -> JenkinsSettings:
        return self._settings

    def start(self) -> None:
        """Start the background sync loop (idempotent). Returns at once; faults never raise."""
        with self._lock:
            if self._thread and self._thread.is_alive():
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="agentd-jenkins-link", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop and the agent process. The node is left as it is in Jenkins (its state persists)."""
        self._stopping.set()
        self._wake.set()
        self._kick.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        agent = self._agent
        if agent is not None:
            agent.stop()

    def request_offline(self, reason: str) -> None:
        """Ask for the node to be temporarily offline with ``reason``.

        Wakes the loop only when this changes what is wanted (online -> offline, or another
        :func:`reason_kind`), so the daemon may call this every tick. New numbers inside the same kind of
        reason are never posted: the node's cause keeps the text it was posted with, and ``status()``
        (``requested_offline_reason``) shows the current one.
        """
        reason = reason.strip() or "unavailable"
        with self._lock:
            previous = self._want_offline_reason
            self._want_offline_reason = reason
        if previous is None or reason_kind(previous) != reason_kind(reason):
            self._wake.set()

    def request_online(self) -> None:
        """Ask for the node to take builds again (wakes the loop only if it was wanted offline)."""
        with self._lock:
            previous = self._want_offline_reason
            self._want_offline_reason = None
        if previous is not None:
            self._wake.set()

    def resync(self) -> None:
        """Re-derive labels/executors/description (GPUs or slots changed) and apply them soon."""
        self._wake.set()

    def update_settings(self, settings: JenkinsSettings, token: Optional[Secret]) -> None:
        """New settings or token (daemon reload): next sync uses a fresh session, even during a backoff.

        agent.jar is stopped (and, for inbound, started again by that sync) only when a setting it runs
        with changed: restarting it would abort the builds running on this node.
        """
        with self._io_lock:
            agent = None
            if _agent_settings(settings) != _agent_settings(self._settings):
                agent, self._agent = self._agent, None
            if (settings.url, settings.node_name) != (self._settings.url, self._settings.node_name):
                self._mark = OfflineMarkStore(self._state_dir, settings.url or "", settings.node_name)
            self._settings = settings
            self._token = token
            self._ssh_host = socket.getfqdn() if settings.launcher == "ssh" else None
            self._client = None
            self._checked_jobs.clear()
        if agent is not None:
            agent.stop()
        with self._lock:
            self._failures = 0
            if not settings.enabled:
                self._state = "disabled"
        self._wake.set()
        self._kick.set()

    def set_offline(self, reason: str) -> None:
        """Mark the node temporarily offline now (and keep it so). Raises :class:`LinkError` on failure."""
        self.request_offline(reason)
        with self._io_lock:
            self._apply_offline_state(self._node_info()[0])

    def set_online(self) -> None:
        """Bring the node back online now (and keep it so). Raises :class:`LinkError` on failure."""
        self.request_online()
        with self._io_lock:
            self._apply_offline_state(self._node_info()[0])

    def agent_secret(self) -> Secret:
        """The inbound agent's secret, from ``computer/NAME/jenkins-agent.jnlp``.

        Raises :class:`LinkError`."""
        with self._io_lock:
            return self._fetch_secret()

    def download_agent_jar(self, dest_dir: Path) -> Path:
        """agent.jar from the controller into ``dest_dir``: reused while the controller version is the same,
        verified as a jar before it replaces the cached one. Raises :class:`LinkError`."""
        with self._io_lock:
            version = self._op("read controller version", self._whoami_version)
            return self._ensure_jar(Path(dest_dir), version)[0]

    def trigger_build(self, job: str, params: Mapping[str, str]) -> Triggered:
        """Queue a parameterized build of ``job``.

        Before the first trigger of a job (and after any failed one) its api/json is checked: it exists,
        is buildable and defines every parameter (:func:`job_problem`). Jenkins answers 303 instead of 201
        when an identical build is already queued: that is success, ``Triggered(None, already_queued=True)``.
        Raises :class:`LinkError` (an :class:`AuthError` for 401/403) naming the job and parameter.
        """
        if not self._settings.enabled:
            raise LinkError("the Jenkins link is disabled (no jenkins.url)")
        key = (job, tuple(sorted(params)))
        with self._io_lock:
            try:
                if key not in self._checked_jobs:
                    self._check_job(job, list(params))
                    self._checked_jobs.add(key)
                result = self._op("trigger build", lambda c: self._post_build(c, job, params))
            except LinkError:
                self._checked_jobs.discard(key)
                raise
        log.info("triggered Jenkins job %s with %s: %s", job, dict(params), result)
        return result

    def status(self) -> dict:
        """The link's state for ``agentd status`` (token-free). Keys are stable; new ones are only added."""
        settings = self._settings
        with self._lock:
            now = time.monotonic()
            observed = dict(self._observed)
            version = self._controller_version
            status = {
                "state": self._state,
                "url": settings.url,
                "node": settings.node_name,
                "user": settings.user,
                "token_source": token_source(settings) if settings.enabled else None,
                "launcher": settings.launcher,
                "authenticated_as": self._whoami,
                "controller_version": version,
                "min_controller_version": MIN_CONTROLLER_VERSION,
                "controller_version_note": (unknown_version_note() if self._version_seen and version is None
                                            else version_problem(version, settings.launcher)),
                "agent_jar_version": self._jar_version,
                "last_error": self._last_error,
                "consecutive_failures": self._failures,
                "last_attempt_at": self._last_attempt,
                "last_ok_at": self._last_ok,
                "next_sync_in_s": (round(max(0.0, self._next_sync_at - now), 1)
                                   if self._next_sync_at else None),
                "requested_offline": self._want_offline_reason is not None,
                "requested_offline_reason": self._want_offline_reason,
                "offline_mark": self._mark.as_dict(),
                "labels": observed.get("labels"),
                "executors": observed.get("executors"),
                "node_offline": observed.get("offline"),
                "node_temporarily_offline": observed.get("temporarilyOffline"),
                "node_offline_reason": observed.get("offlineCauseReason"),
            }
        agent = self._agent
        status["agent"] = agent.status() if agent is not None else None
        return status

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            self._kick.clear()
            ok = self.sync()
            if self._stopping.is_set():
                break
            with self._lock:
                failures = self._failures
            if ok:
                delay = self._settings.sync_interval_s
            else:
                delay = backoff_delay(failures, self._settings.retry_min_s, self._settings.retry_max_s,
                                      self._rng)
            with self._lock:
                self._next_sync_at = time.monotonic() + delay
            # After a failure only a settings change (kick) or stop cuts the wait short: gate/GPU events
            # arriving during an outage must not turn the backoff into a tight loop.
            (self._wake if ok else self._kick).wait(delay)
        log.debug("Jenkins link loop stopped")

    def sync(self) -> bool:
        """One reconcile pass. Never raises; True when the node is as wanted. Records state and last_error."""
        if not self._settings.enabled:
            with self._lock:
                self._state = "disabled"
            return True
        with self._lock:
            self._last_attempt = time.time()
        try:
            with self._io_lock:
                state, problem = self._reconcile()
        except AuthError as e:
            self._record_failure("auth-error", str(e))
            return False
        except LinkError as e:
            self._record_failure("error", str(e))
            return False
        except Exception as e:  # a bug or an unexpected library error must not kill the daemon's loop
            log.exception("Jenkins link: unexpected error during sync")
            self._record_failure("error", self._redact(f"unexpected {type(e).__name__}: {describe_error(e)}"))
            return False
        with self._lock:
            recovered = self._failures > 0 or self._state != state
            self._state = state
            self._last_error = problem
            self._failures = 0
            self._last_ok = time.time()
        if recovered:
            if problem:
                log.error("Jenkins link %s: %s", state, problem)
            else:
                log.info("Jenkins link %s: node %s at %s", state, self._settings.node_name, self._settings.url)
        return True

    def _record_failure(self, state: str, message: str) -> None:
        message = self._redact(message)
        with self._lock:
            repeated = message == self._last_error and state == self._state
            self._state = state
            self._last_error = message
            self._failures += 1
            failures = self._failures
        # Log a new error loudly once; repeats of the same error go to debug (no journal flooding).
        log.log(logging.DEBUG if repeated else logging.WARNING,
                "Jenkins link %s (attempt %d): %s", state, failures, message)

    def _redact(self, text: str) -> str:
        token = self._token.reveal() if self._token else ""
        return text.replace(token, "***") if token else text

    # -- reconcile -----------------------------------------------------------------------------------

    def _reconcile(self) -> tuple[str, Optional[str]]:
        """(state, problem): the node made as wanted; problem is what status shows as last_error."""
        settings = self._settings
        try:
            gpus = list(self._gpus())
            slots = self._slots() if callable(self._slots) else self._slots
        except Exception as e:
            raise LinkError(f"GPU probe failed: {type(e).__name__}: {e}") from None
        if slots is None:
            slots = max(1, len(gpus))
        spec = desired_spec(settings, gpus, slots, self._version, self._ssh_host)

        info, version = self._node_info()
        created = info is None
        if created:
            log.info("creating Jenkins node %s (labels %s, %d executors, exclusive)",
                     spec.name, " ".join(spec.labels), spec.executors)
            self._op("create node", lambda c: c.create_node(
                spec.name, numExecutors=spec.executors, nodeDescription=spec.description,
                remoteFS=spec.remote_fs, labels=" ".join(spec.labels), exclusive=True,
                launcher=spec.launcher_class, launcher_params=spec.create_params()))
            info, version = self._node_info()
        else:
            config = self._op("read node config", lambda c: c.jenkins_request(requests.Request(
                "GET", urljoin(c.server, f"computer/{self._quoted_name()}/config.xml"))).content)
            try:
                changed, new_config = plan_reconfig(config, spec)
            except ConfigError as e:
                raise LinkError(f"node {spec.name}'s {e}") from None
            if changed:
                log.info("reconfiguring Jenkins node %s: %s changed", spec.name, ", ".join(changed))
                self._post_config(new_config)
        self._note_version(version)

        info = self._apply_offline_state(info)
        with self._lock:
            self._observed = {
                "labels": list(spec.labels), "executors": spec.executors,
                "offline": info.get("offline"), "temporarilyOffline": info.get("temporarilyOffline"),
                "offlineCauseReason": jenkins_unescape(info.get("offlineCauseReason") or "") or None,
            }
        state = "offline" if info.get("temporarilyOffline") else "online"
        problem = version_problem(version, settings.launcher)
        if problem:
            return "unsupported-version", problem
        if settings.launcher == "inbound":
            agent_problem = self._ensure_agent(version, fresh_node=created)
            if agent_problem:
                return "unsupported-version", agent_problem
        return state, None

    def _note_version(self, version: Optional[str]) -> None:
        with self._lock:
            changed = version != self._controller_version or not self._version_seen
            self._controller_version = version
            self._version_seen = True
        if changed and version is None:
            log.warning("Jenkins link: %s", unknown_version_note())

    def _apply_offline_state(self, info: Optional[Mapping]) -> dict:
        """Post toggleOffline / changeOfflineCause when the node's temporary-offline state must change."""
        if info is None:
            raise LinkError(f"node {self._settings.node_name} does not exist in Jenkins (yet)")
        with self._lock:
            wanted = offline_message(self._want_offline_reason)
        action, mark = offline_action(info, wanted, self._mark.reason)
        if action is None:
            if wanted is None and info.get("temporarilyOffline"):
                log.debug("node %s is held offline by someone else: %s", self._settings.node_name,
                          info.get("offlineCauseReason"))
            self._mark.set(mark)
            return dict(info)
        msg = quote((wanted or "").encode("utf-8"))
        if action == "toggle":
            path = jenkins.TOGGLE_OFFLINE % {"name": self._quoted_name(), "msg": msg}
            what = "mark node offline" if wanted is not None else "mark node online"
        else:
            path = f"computer/{self._quoted_name()}/changeOfflineCause?offlineMessage={msg}"
            what = "mark node offline"
        log.info("Jenkins node %s: %s%s", self._settings.node_name, what, f" ({wanted})" if wanted else "")
        # The mark is written before the POST: if the daemon dies in between, it still knows the node may
        # be offline by its hand (a stale mark only matters while the node is offline with our cause).
        if mark is not None:
            self._mark.set(mark)
        self._op(what, lambda c: c.jenkins_open(requests.Request("POST", urljoin(c.server, path))))
        self._mark.set(mark)
        return self._node_info()[0] or dict(info)

    def _quoted_name(self) -> str:
        return quote(self._settings.node_name.encode("utf-8"))

    def _node_info(self) -> tuple[Optional[dict], Optional[str]]:
        """(the node's api/json or None when Jenkins answers 404, the X-Jenkins version of the response).

        Other errors raise, unlike python-jenkins' node_exists. The version is read from this response,
        so a sync costs no extra ``GET /``; without the header it is None.
        """
        path = jenkins.NODE_INFO % {"name": self._quoted_name(), "depth": 0}

        def get(client: jenkins.Jenkins) -> tuple[Optional[dict], Optional[str]]:
            try:
                response = client.jenkins_request(requests.Request("GET", urljoin(client.server, path)))
            except jenkins.NotFoundException:
                return None, self._controller_version
            return response.json(), response.headers.get("X-Jenkins")

        return self._op("read node", get)

    def _whoami_version(self, client: jenkins.Jenkins) -> Optional[str]:
        response = client.jenkins_request(requests.Request("GET", urljoin(client.server, "me/api/json?tree=id")))
        return response.headers.get("X-Jenkins")

    def _post_config(self, config: bytes) -> None:
        """POST config.xml as the bytes plan_reconfig made, with the charset they are in."""
        headers = {"Content-Type": f"application/xml; charset={xml_encoding(config)}"}
        self._op("reconfigure node", lambda c: c.jenkins_open(requests.Request(
            "POST", urljoin(c.server, f"computer/{self._quoted_name()}/config.xml"), data=config,
            headers=headers)))

    # -- folder trigger ------------------------------------------------------------------------------

    def _check_job(self, job: str, parameters: list[str]) -> None:
        def get(client: jenkins.Jenkins) -> dict:
            try:
                return client.get_job_info(job)
            except jenkins.NotFoundException:
                raise LinkError(f"Jenkins job {job!r} not found (check jenkins.watch.job; folders as "
                                "'folder/job')") from None
            except jenkins.JenkinsException as e:
                if "does not exist" in str(e):   # python-jenkins' get_job_info turns 404 into this
                    raise LinkError(f"Jenkins job {job!r} not found (check jenkins.watch.job; folders as "
                                    "'folder/job')") from None
                raise

        problem = job_problem(self._op("check job", get), job, parameters)
        if problem:
            raise LinkError(problem)

    @staticmethod
    def _post_build(client: jenkins.Jenkins, job: str, params: Mapping[str, str]) -> Triggered:
        try:
            response = client.jenkins_request(requests.Request("POST", client.build_job_url(job, dict(params))))
        except jenkins.NotFoundException:
            raise LinkError(f"Jenkins job {job!r} not found") from None
        except requests.HTTPError as e:
            status = e.response.status_code
            if status == 409:
                raise LinkError(f"Jenkins job {job!r} is disabled (HTTP 409, not buildable): enable it") from None
            if status == 400:
                raise LinkError(f"Jenkins job {job!r} refused the parameters {sorted(params)} (HTTP 400): "
                                "is it parameterized?") from None
            raise
        # requests followed the redirect: a 303 to the job's page means an identical item is queued.
        if any(r.status_code == 303 for r in response.history):
            return Triggered(None, already_queued=True)
        location = response.headers.get("Location", "")
        match = re.search(r"/queue/item/(\d+)/?$", location)
        if response.status_code != 201 or not match:
            raise LinkError(f"Jenkins answered the trigger of job {job!r} with HTTP {response.status_code} and "
                            f"no queue item (Location {location or 'missing'})")
        return Triggered(int(match.group(1)))

    # -- inbound agent -------------------------------------------------------------------------------

    def _ensure_agent(self, version: Optional[str], fresh_node: bool = False) -> Optional[str]:
        """Keep agent.jar running. Returns a problem for status when agent.jar cannot run (usage exit).

        The JNLP secret is fetched only when agent.jar is (re)started, after it exited (it may have failed
        to connect with a stale secret), or when the node was just created; not on every sync.
        """
        settings = self._settings
        jar, jar_changed = self._ensure_jar(Path(settings.agent_jar_dir), version)
        agent = self._agent
        if agent is None:
            agent = self._agent = self._agent_factory(settings, jar)
        status = agent.status()
        gave_up = status.get("gave_up_reason")
        if gave_up and not jar_changed:
            return gave_up                      # not restarted until a different agent.jar arrives
        exits = int(status.get("restarts") or 0)
        need_secret = not agent.running or jar_changed or fresh_node or exits != self._agent_exits_seen
        if not need_secret:
            return None
        self._agent_exits_seen = exits
        secret_changed = agent.set_secret(self._fetch_secret())
        if not agent.running:
            agent.start()
        elif jar_changed or secret_changed:
            log.info("restarting agent.jar (%s changed)", "agent.jar" if jar_changed else "agent secret")
            agent.restart()
        return None

    def _fetch_secret(self) -> Secret:
        name = self._quoted_name()

        def get(client: jenkins.Jenkins) -> str:
            try:
                return client.jenkins_open(requests.Request(
                    "GET", urljoin(client.server, f"computer/{name}/jenkins-agent.jnlp")))
            except jenkins.NotFoundException:  # Jenkins before 2.2xx named it slave-agent.jnlp
                return client.jenkins_open(requests.Request(
                    "GET", urljoin(client.server, f"computer/{name}/slave-agent.jnlp")))

        return Secret(parse_jnlp_secret(self._op("read agent secret", get)))

    def _ensure_jar(self, dest_dir: Path, version: Optional[str]) -> tuple[Path, bool]:
        """(path, downloaded now). The stamp file records which controller version the jar came from
        ("unknown" when the controller does not say: then the cached jar is kept)."""
        version = version or "unknown"
        jar = dest_dir / "agent.jar"
        stamp = dest_dir / "agent.jar.version"
        try:
            cached_version = stamp.read_text().strip()
        except OSError:
            cached_version = None
        if cached_version == version and is_jar(jar):
            return jar, False
        dest_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = dest_dir / f".agent.jar.{os.getpid()}.part"

        def download(client: jenkins.Jenkins) -> tuple[str, int, Optional[str]]:
            url = urljoin(client.server, "jnlpJars/agent.jar")
            response = client.jenkins_request(requests.Request("GET", url), stream=True)
            size = 0
            try:
                with open(tmp, "wb") as out:
                    for chunk in response.iter_content(1 << 16):
                        size += len(chunk)
                        if size > _MAX_JAR_BYTES:
                            raise LinkError(f"{url} is larger than {_MAX_JAR_BYTES >> 20} MiB; not a jar")
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                response.close()
            return response.headers.get("Content-Type", "?"), size, response.headers.get("X-Jenkins")

        try:
            content_type, size, header_version = self._op("download agent.jar", download)
            if not is_jar(tmp):
                url = urljoin(self._settings.url or "", "jnlpJars/agent.jar")
                raise LinkError(f"{url} did not return a jar (Content-Type {content_type}, {size} bytes); "
                                "is jenkins.url the Jenkins root URL?")
            os.chmod(tmp, 0o644)
            os.replace(tmp, jar)
        finally:
            tmp.unlink(missing_ok=True)
        stamp.write_text((header_version or version) + "\n")
        with self._lock:
            self._jar_version = header_version or version
        log.info("downloaded agent.jar (%d bytes) from Jenkins %s", size, header_version or version)
        return jar, True

    # -- python-jenkins plumbing ---------------------------------------------------------------------

    def _new_client(self) -> jenkins.Jenkins:
        settings = self._settings
        if not settings.url:
            raise LinkError("the Jenkins link is disabled (no jenkins.url)")
        if self._token is None:
            raise AuthError(f"no API token for user {settings.user!r}: check {token_source(settings)}")
        client = jenkins.Jenkins(settings.url, username=settings.user, password=self._token.reveal(),
                                 timeout=settings.timeout_s)
        # python-jenkins has no TLS options; its requests session is `_session` (a WrappedSession whose
        # verify=False also overrides REQUESTS_CA_BUNDLE).
        client._session.verify = str(settings.ca_bundle) if settings.ca_bundle else settings.verify_tls
        return client

    def _authenticated_client(self) -> jenkins.Jenkins:
        """The session, checking the credentials with get_whoami once per new session."""
        if self._client is None:
            self._client = self._new_client()
            self._client_authed = False
        client = self._client
        if not self._client_authed:
            try:
                who = client.get_whoami()
            except jenkins.JenkinsException as e:
                self._client = None
                status = http_status(e)
                if status in (401, 403):
                    raise AuthError(self._auth_message(status, "read")) from None
                if isinstance(e, jenkins.TimeoutException):
                    raise LinkError(self._unreachable("check credentials", e)) from None
                raise LinkError(f"check credentials: {describe_error(e, self._settings.timeout_s)}") from None
            except (requests.RequestException, OSError) as e:
                self._client = None
                raise LinkError(self._unreachable("check credentials", e)) from None
            self._client_authed = True
            with self._lock:
                self._whoami = who.get("id") if isinstance(who, dict) else None
        return client

    def _op(self, what: str, call: Callable[[jenkins.Jenkins], T]) -> T:
        """Run one python-jenkins call, turning its exceptions into token-free LinkError/AuthError.

        A 403 about the crumb means the controller forgot our session (it restarted): retry once with a
        new session instead of reporting a permission problem.
        """
        for attempt in (1, 2):
            client = self._authenticated_client()
            try:
                return call(client)
            except LinkError:
                raise
            except jenkins.JenkinsException as e:
                status = http_status(e)
                if attempt == 1 and _is_crumb_rejection(e):
                    log.info("Jenkins rejected the session's crumb (controller restarted?); new session")
                    self._client = None
                    continue
                if status in (401, 403):
                    self._client = None
                    raise AuthError(self._auth_message(status, what)) from None
                if not isinstance(e, jenkins.NotFoundException):
                    self._client = None  # the session may be what is broken: start the next call afresh
                if isinstance(e, jenkins.TimeoutException):
                    raise LinkError(self._unreachable(what, e)) from None
                raise LinkError(f"{what}: {describe_error(e, self._settings.timeout_s)}") from None
            except requests.HTTPError as e:   # python-jenkins re-raises statuses other than 401/403/404/500
                raise LinkError(f"{what}: HTTP {e.response.status_code} {e.response.reason or ''}".rstrip()
                                ) from None
            except (requests.RequestException, OSError) as e:
                self._client = None
                raise LinkError(self._unreachable(what, e)) from None
        raise AssertionError("unreachable")

    def _unreachable(self, what: str, exc: BaseException) -> str:
        return f"cannot reach {self._settings.url} ({what}): {describe_error(exc, self._settings.timeout_s)}"

    def _auth_message(self, status: int, what: str) -> str:
        settings = self._settings
        if status == 401:
            return (f"Jenkins rejected the credentials (HTTP 401) of user {settings.user!r}: "
                    f"check the API token in {token_source(settings)} "
                    "(an API token of that user, from Jenkins > user > Security)")
        permission = _PERMISSIONS.get(what, "the needed permission")
        return (f"user {settings.user!r} is not allowed to {what} (HTTP 403): grant it {permission} "
                f"(the token in {token_source(settings)} was accepted)")
