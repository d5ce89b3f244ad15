"""The Jenkins link: keep this box's node in Jenkins true to the daemon's state, with python-jenkins.

What it keeps true, on every sync (at start, every ``sync_interval_s``, and when the daemon asks):

* the node exists (created again when a controller restart or an admin removed it), usage mode
  EXCLUSIVE (only builds whose label expression matches), executors = the daemon's slot count, labels =
  configured + derived from the GPUs, a description with the GPU summary and agentd's version. The node's
  ``config.xml`` is read and posted back only when one of those differs (idempotent);
* temporarily offline, with a reason, while the daemon asks for it (the VRAM gate cannot take a job, a
  GPU is unhealthy, ``agentd drain``), and online again when that clears. ``temporarilyOffline`` is read
  and ``toggleOffline`` posted only when it must change: python-jenkins' ``enable_node``/``disable_node``
  look at ``offline``, which is also true for a merely disconnected agent, and would toggle the wrong way.
  Reasons are prefixed with ``agentd:``; a node an administrator marked offline by hand (any other
  reason) is left offline, and ``status()`` shows it;
* for ``launcher: inbound``: agent.jar is downloaded from the controller (cached, fetched again when the
  controller's version changes), the agent secret is read from the node's JNLP file, and agent.jar is kept
  running by :class:`~agentd.jenkins.agent_process.AgentProcess`.

Faults (controller down, timeouts, 5xx, bad credentials) never raise out of :meth:`JenkinsLink.sync` or
the background thread: the link records a state (``disabled``, ``connecting``, ``online``, ``offline``,
``auth-error``, ``error``) and a token-free ``last_error``, and retries with exponential backoff and
jitter. The credentials are checked first with ``get_whoami`` because python-jenkins' ``node_exists``
answers False on *any* error, so a bad token would otherwise look like a missing node.
"""

from __future__ import annotations

import json
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
from agentd.jenkins.settings import JenkinsSettings, Secret, token_source

log = logging.getLogger(__name__)

T = TypeVar("T")

OFFLINE_PREFIX = "agentd: "
JNLP_LAUNCHER = jenkins.LAUNCHER_JNLP
SSH_LAUNCHER = jenkins.LAUNCHER_SSH
_SSH_HOST_KEY_STRATEGY = "hudson.plugins.sshslaves.verifiers.KnownHostsFileKeyVerificationStrategy"
_MAX_JAR_BYTES = 128 * 1024 * 1024

# Jenkins permissions each operation needs, for the 403 message.
_PERMISSIONS = {
    "read": "Overall/Read",
    "read controller version": "Overall/Read",
    "read node": "Overall/Read",
    "create node": "Agent/Create",
    "read node config": "Agent/ExtendedRead",
    "reconfigure node": "Agent/Configure",
    "mark node offline": "Agent/Disconnect",
    "mark node online": "Agent/Connect",
    "read agent secret": "Agent/Connect",
    "download agent.jar": "Overall/Read",
    "trigger build": "Job/Build",
}


class LinkError(Exception):
    """A Jenkins operation failed. The message is for people and never contains the token."""


class AuthError(LinkError):
    """401/403: the message says which credential or permission to check."""


# -- pure decisions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    """The node as agentd wants it. ``launcher_fields`` are the launcher's child elements to enforce."""

    name: str
    description: str
    executors: int
    labels: tuple[str, ...]
    remote_fs: str
    launcher_class: str
    launcher_fields: tuple[tuple[str, str], ...]
    manage_launcher: bool = True
    mode: str = "EXCLUSIVE"

    def create_params(self) -> dict:
        """``launcher_params`` for python-jenkins' ``create_node`` (a fresh dict: it mutates its argument)."""
        fields = dict(self.launcher_fields)
        if self.launcher_class == SSH_LAUNCHER:
            params: dict = {"host": fields["host"], "port": int(fields["port"]),
                            "credentialsId": fields["credentialsId"],
                            "sshHostKeyVerificationStrategy": {"stapler-class": _SSH_HOST_KEY_STRATEGY,
                                                               "$class": _SSH_HOST_KEY_STRATEGY}}
            if "javaPath" in fields:
                params["javaPath"] = fields["javaPath"]
            return params
        return {"webSocket": fields.get("webSocket") == "true",
                "workDirSettings": {"disabled": False, "workDirPath": "", "internalDir": "remoting",
                                    "failIfWorkDirIsMissing": False}}


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


def _launcher_element(spec: NodeSpec) -> ET.Element:
    launcher = ET.Element("launcher", {"class": spec.launcher_class})
    if spec.launcher_class == JNLP_LAUNCHER:
        work_dir = ET.SubElement(launcher, "workDirSettings")
        for tag, text in (("disabled", "false"), ("internalDir", "remoting"),
                          ("failIfWorkDirIsMissing", "false")):
            ET.SubElement(work_dir, tag).text = text
    for tag, text in spec.launcher_fields:
        ET.SubElement(launcher, tag).text = text
    if spec.launcher_class == SSH_LAUNCHER:
        ET.SubElement(launcher, "sshHostKeyVerificationStrategy", {"class": _SSH_HOST_KEY_STRATEGY})
    return launcher


def plan_reconfig(config_xml: str, spec: NodeSpec) -> tuple[list[str], str]:
    """Compare a node's ``config.xml`` with the spec: (names of the fields that differ, updated XML).

    An empty list means nothing to do. Labels compare as sets (order and spacing do not matter); other
    elements of the XML (node properties, retention strategy, unknown launcher fields) are kept as they are.
    """
    root = ET.fromstring(config_xml)
    changed: list[str] = []

    def enforce(tag: str, value: str, same: Callable[[str], bool]) -> None:
        element = root.find(tag)
        if element is None:
            element = ET.SubElement(root, tag)
        if not same(element.text or ""):
            element.text = value
            changed.append(tag)

    enforce("description", spec.description, lambda text: text == spec.description)
    enforce("remoteFS", spec.remote_fs, lambda text: text == spec.remote_fs)
    enforce("numExecutors", str(spec.executors), lambda text: text.strip() == str(spec.executors))
    enforce("mode", spec.mode, lambda text: text.strip() == spec.mode)
    enforce("label", " ".join(spec.labels), lambda text: set(text.split()) == set(spec.labels))

    if spec.manage_launcher:
        launcher = root.find("launcher")
        if launcher is None or launcher.get("class") != spec.launcher_class:
            if launcher is not None:
                root.remove(launcher)
            root.append(_launcher_element(spec))
            changed.append("launcher")
        else:
            for tag, text in spec.launcher_fields:
                element = launcher.find(tag)
                if element is None:
                    element = ET.SubElement(launcher, tag)
                if (element.text or "").strip() != text:
                    element.text = text
                    changed.append(f"launcher.{tag}")
    xml = "<?xml version='1.1' encoding='UTF-8'?>\n" + ET.tostring(root, encoding="unicode")
    return changed, xml


def offline_action(info: Mapping, want_offline: bool, message: str) -> Optional[str]:
    """What to post so the node's *temporary* offline state matches: 'toggle', 'change-cause' or None.

    ``info`` is the node's api/json. Decides on ``temporarilyOffline``, never on ``offline`` (which is also
    true when the agent is merely disconnected). A node marked offline by someone else (a reason without
    the ``agentd:`` prefix) is neither brought online nor relabelled.
    """
    temporarily_offline = bool(info.get("temporarilyOffline"))
    reason = info.get("offlineCauseReason") or ""
    ours = reason.startswith(OFFLINE_PREFIX.strip())
    if want_offline:
        if not temporarily_offline:
            return "toggle"
        if ours and reason != message:
            return "change-cause"
        return None
    if temporarily_offline and ours:
        return "toggle"
    return None


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


# -- the link ---------------------------------------------------------------------------------------


class JenkinsLink:
    """Registers this box as a Jenkins node and keeps it true; see the module docstring.

    The daemon constructs it with the settings, the token (``read_token(settings)``), a callable returning
    the current GPU facts and the slot count, then calls :meth:`start` / :meth:`stop`,
    :meth:`request_offline` / :meth:`request_online` when the gate or drain changes, :meth:`resync` when the
    GPUs change, :meth:`status` for ``agentd status`` and :meth:`trigger_build` for the folder trigger.
    """

    def __init__(self, settings: JenkinsSettings, token: Optional[Secret],
                 gpus: Callable[[], Sequence[GpuFactsLike]],
                 slots: Union[int, Callable[[], int], None] = None, *,
                 version: str = __version__,
                 agent_factory: Optional[Callable[[JenkinsSettings, Path], AgentProcess]] = None,
                 rng: Optional[random.Random] = None):
        self._settings = settings
        self._token = token
        self._gpus = gpus
        self._slots = slots
        self._version = version
        self._agent_factory = agent_factory or AgentProcess.from_settings
        self._rng = rng or random.Random()
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
        self._want_offline_reason: Optional[str] = None
        self._state = "connecting" if settings.enabled else "disabled"
        self._last_error: Optional[str] = None
        self._failures = 0
        self._last_attempt: Optional[float] = None
        self._last_ok: Optional[float] = None
        self._next_sync_at: Optional[float] = None
        self._controller_version: Optional[str] = None
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
        """Ask for the node to be temporarily offline with ``reason`` (applied by the loop, soon)."""
        with self._lock:
            self._want_offline_reason = reason.strip() or "unavailable"
        self._wake.set()

    def request_online(self) -> None:
        """Ask for the node to take builds again (applied by the loop, soon)."""
        with self._lock:
            self._want_offline_reason = None
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
            self._settings = settings
            self._token = token
            self._ssh_host = socket.getfqdn() if settings.launcher == "ssh" else None
            self._client = None
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
            self._apply_offline_state(self._node_info())

    def set_online(self) -> None:
        """Bring the node back online now (and keep it so). Raises :class:`LinkError` on failure."""
        self.request_online()
        with self._io_lock:
            self._apply_offline_state(self._node_info())

    def agent_secret(self) -> Secret:
        """The inbound agent's secret, from ``computer/NAME/jenkins-agent.jnlp``.

        Raises :class:`LinkError`."""
        with self._io_lock:
            return self._fetch_secret()

    def download_agent_jar(self, dest_dir: Path) -> Path:
        """agent.jar from the controller into ``dest_dir``: reused while the controller version is the same,
        verified as a jar before it replaces the cached one. Raises :class:`LinkError`."""
        with self._io_lock:
            version = self._op("read controller version", lambda c: c.get_version())
            return self._ensure_jar(Path(dest_dir), version)[0]

    def trigger_build(self, job: str, params: Mapping[str, str]) -> int:
        """Queue a parameterized build of ``job``; returns the queue item number.

        Raises :class:`LinkError` (an :class:`AuthError` for 401/403)."""
        if not self._settings.enabled:
            raise LinkError("the Jenkins link is disabled (no jenkins.url)")
        with self._io_lock:
            try:
                queue_id = self._op("trigger build", lambda c: c.build_job(job, dict(params)))
            except LinkError as e:
                if "HTTP 404" in str(e):
                    raise LinkError(f"Jenkins job {job!r} not found") from None
                raise
        log.info("triggered Jenkins job %s with %s (queue item %s)", job, dict(params), queue_id)
        return queue_id

    def status(self) -> dict:
        """The link's state for ``agentd status`` (token-free)."""
        settings = self._settings
        with self._lock:
            now = time.monotonic()
            observed = dict(self._observed)
            status = {
                "state": self._state,
                "url": settings.url,
                "node": settings.node_name,
                "user": settings.user,
                "token_source": token_source(settings) if settings.enabled else None,
                "launcher": settings.launcher,
                "authenticated_as": self._whoami,
                "controller_version": self._controller_version,
                "agent_jar_version": self._jar_version,
                "last_error": self._last_error,
                "consecutive_failures": self._failures,
                "last_attempt_at": self._last_attempt,
                "last_ok_at": self._last_ok,
                "next_sync_in_s": (round(max(0.0, self._next_sync_at - now), 1)
                                   if self._next_sync_at else None),
                "requested_offline": self._want_offline_reason is not None,
                "requested_offline_reason": self._want_offline_reason,
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
                state = self._reconcile()
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
            self._last_error = None
            self._failures = 0
            self._last_ok = time.time()
        if recovered:
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

    def _reconcile(self) -> str:
        settings = self._settings
        try:
            gpus = list(self._gpus())
            slots = self._slots() if callable(self._slots) else self._slots
        except Exception as e:
            raise LinkError(f"GPU probe failed: {type(e).__name__}: {e}") from None
        if slots is None:
            slots = max(1, len(gpus))
        spec = desired_spec(settings, gpus, slots, self._version, self._ssh_host)

        version = self._op("read controller version", lambda c: c.get_version())
        with self._lock:
            self._controller_version = version

        info = self._node_info()
        if info is None:
            log.info("creating Jenkins node %s (labels %s, %d executors, exclusive)",
                     spec.name, " ".join(spec.labels), spec.executors)
            self._op("create node", lambda c: c.create_node(
                spec.name, numExecutors=spec.executors, nodeDescription=spec.description,
                remoteFS=spec.remote_fs, labels=" ".join(spec.labels), exclusive=True,
                launcher=spec.launcher_class, launcher_params=spec.create_params()))
            info = self._node_info() or {}
        else:
            config = self._op("read node config", lambda c: c.get_node_config(spec.name))
            try:
                changed, new_config = plan_reconfig(config, spec)
            except ET.ParseError as e:
                raise LinkError(f"node {spec.name}'s config.xml is not XML ({e})") from None
            if changed:
                log.info("reconfiguring Jenkins node %s: %s changed", spec.name, ", ".join(changed))
                self._op("reconfigure node", lambda c: c.reconfig_node(spec.name, new_config))

        info = self._apply_offline_state(info)
        with self._lock:
            self._observed = {
                "labels": list(spec.labels), "executors": spec.executors,
                "offline": info.get("offline"), "temporarilyOffline": info.get("temporarilyOffline"),
                "offlineCauseReason": info.get("offlineCauseReason") or None,
            }
        if settings.launcher == "inbound":
            self._ensure_agent(version)
        return "offline" if info.get("temporarilyOffline") else "online"

    def _apply_offline_state(self, info: Optional[Mapping]) -> dict:
        """Post toggleOffline / changeOfflineCause when the node's temporary-offline state must change."""
        if info is None:
            raise LinkError(f"node {self._settings.node_name} does not exist in Jenkins (yet)")
        with self._lock:
            reason = self._want_offline_reason
        message = OFFLINE_PREFIX + reason if reason is not None else ""
        action = offline_action(info, reason is not None, message)
        if action is None:
            if reason is None and info.get("temporarilyOffline"):
                log.debug("node %s is held offline by someone else: %s", self._settings.node_name,
                          info.get("offlineCauseReason"))
            return dict(info)
        name = quote(self._settings.node_name.encode("utf-8"))
        msg = quote(message.encode("utf-8"))
        if action == "toggle":
            path = jenkins.TOGGLE_OFFLINE % {"name": name, "msg": msg}
            what = "mark node offline" if reason is not None else "mark node online"
        else:
            path = f"computer/{name}/changeOfflineCause?offlineMessage={msg}"
            what = "mark node offline"
        log.info("Jenkins node %s: %s%s", self._settings.node_name, what, f" ({message})" if message else "")
        self._op(what, lambda c: c.jenkins_open(requests.Request("POST", urljoin(c.server, path))))
        return self._node_info() or dict(info)

    def _node_info(self) -> Optional[dict]:
        """The node's api/json, or None when Jenkins answers 404 (other errors raise, unlike node_exists)."""
        path = jenkins.NODE_INFO % {"name": quote(self._settings.node_name.encode("utf-8")), "depth": 0}

        def get(client: jenkins.Jenkins) -> Optional[dict]:
            try:
                return json.loads(client.jenkins_open(requests.Request("GET", urljoin(client.server, path))))
            except jenkins.NotFoundException:
                return None

        return self._op("read node", get)

    # -- inbound agent -------------------------------------------------------------------------------

    def _ensure_agent(self, version: str) -> None:
        settings = self._settings
        jar, jar_changed = self._ensure_jar(Path(settings.agent_jar_dir), version)
        secret = self._fetch_secret()
        if self._agent is None:
            self._agent = self._agent_factory(settings, jar)
        secret_changed = self._agent.set_secret(secret)
        if not self._agent.running:
            self._agent.start()
        elif jar_changed or secret_changed:
            log.info("restarting agent.jar (%s changed)", "agent.jar" if jar_changed else "agent secret")
            self._agent.restart()

    def _fetch_secret(self) -> Secret:
        name = quote(self._settings.node_name.encode("utf-8"))

        def get(client: jenkins.Jenkins) -> str:
            try:
                return client.jenkins_open(requests.Request(
                    "GET", urljoin(client.server, f"computer/{name}/jenkins-agent.jnlp")))
            except jenkins.NotFoundException:  # Jenkins before 2.2xx named it slave-agent.jnlp
                return client.jenkins_open(requests.Request(
                    "GET", urljoin(client.server, f"computer/{name}/slave-agent.jnlp")))

        return Secret(parse_jnlp_secret(self._op("read agent secret", get)))

    def _ensure_jar(self, dest_dir: Path, version: str) -> tuple[Path, bool]:
        """(path, downloaded now). The stamp file records which controller version the jar came from."""
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
