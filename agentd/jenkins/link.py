"""The Jenkins link: the background loop that keeps this box's node in Jenkins true, and its status.

What it keeps true, on every sync (at start, every ``sync_interval_s``, and when the wanted state changes),
one reconcile pass (:mod:`~agentd.jenkins.reconcile`):

* the node exists (created again when a controller restart or an admin removed it), usage mode
  EXCLUSIVE (only builds whose label expression matches), executors = the daemon's slot count, labels =
  configured + derived from the GPUs, a description with the GPU summary and agentd's version. The node's
  ``config.xml`` is read and posted back only when one of those differs; the fields agentd does not own
  are written back byte for byte (:func:`~agentd.jenkins.node_config.plan_reconfig`);
* temporarily offline, with a reason, while the daemon asks for it (the VRAM gate cannot take a job, a
  GPU is unhealthy, ``agentd drain``), and online again when that clears. ``temporarilyOffline`` is read
  and ``toggleOffline`` posted only when it must change: python-jenkins' ``enable_node``/``disable_node``
  look at ``offline``, which is also true for a merely disconnected agent, and would toggle the wrong way.
  agentd remembers, in ``state_dir``, that *it* took the node offline and why
  (:class:`~agentd.jenkins.offline.OfflineMarkStore`), so it brings the node back even when the controller
  changed the cause text: before Jenkins 2.482 a reconnect clears the cause and a broken connection
  replaces it, and from 2.483 the text comes back HTML-escaped. A node an administrator marked offline by
  hand is left offline, and ``status()`` shows it;
* for ``launcher: inbound``: agent.jar downloaded, given its secret and kept running
  (:class:`~agentd.jenkins.agent_jar.InboundAgent`).

Politeness: an idle box costs the controller two requests per ``sync_interval_s`` (the node's api/json and
config.xml). :meth:`JenkinsLink.request_offline` / :meth:`~JenkinsLink.request_online`, which the daemon
calls every tick, wake the loop only when the wanted state changes (online <-> offline, or another *kind*
of reason, :func:`~agentd.jenkins.offline.reason_kind`), never for new numbers inside a reason.

Controller versions: :data:`~agentd.jenkins.versions.MIN_CONTROLLER_VERSION` is the oldest supported; below
it the link reports ``unsupported-version`` and does not start agent.jar (see
:func:`~agentd.jenkins.versions.version_problem`). A response without ``X-Jenkins`` (a proxy stripped it)
leaves the version unknown: the link keeps working and says so.

Faults (controller down, timeouts, 5xx, bad credentials) never raise out of :meth:`JenkinsLink.sync` or
the background thread: the link records a state (``disabled``, ``connecting``, ``online``, ``offline``,
``unsupported-version``, ``auth-error``, ``error``) and a token-free ``last_error`` (the session's
:class:`~agentd.jenkins.session.LinkError` text), and retries with exponential backoff and jitter.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from agentd.jenkins.agent_jar import InboundAgent
from agentd.jenkins.backoff import backoff_delay
from agentd.jenkins.labels import GpuFactsLike
from agentd.jenkins.offline import OfflineMarkStore, jenkins_unescape, offline_message, reason_kind
from agentd.jenkins.reconcile import apply_offline_state, desired_spec, ensure_node
from agentd.jenkins.session import AuthError, JenkinsSession, LinkError, describe_error, log
from agentd.jenkins.settings import token_source
from agentd.jenkins.versions import MIN_CONTROLLER_VERSION, unknown_version_note, version_problem


class JenkinsLink:
    """Registers this box as a Jenkins node and keeps it true; see the module docstring.

    The daemon constructs it with the session (settings and token), a callable returning the current GPU
    facts and the slot count (and ``state_dir`` for the offline mark), then calls :meth:`start` /
    :meth:`stop`, :meth:`request_offline` / :meth:`request_online` every tick (cheap: only a change of
    wanted state wakes the loop) and :meth:`status` for ``agentd status``. GPU facts and slots are read
    again on every sync.
    """

    def __init__(self, session: JenkinsSession, gpus: Callable[[], Sequence[GpuFactsLike]],
                 slots: Union[int, Callable[[], int], None] = None, *,
                 rng: Optional[random.Random] = None,
                 state_dir: Optional[Path] = None):
        settings = session.settings
        self._settings = settings
        self._session = session
        self._gpus = gpus
        self._slots = slots
        self._rng = rng or random.Random()
        self._ssh_host = socket.getfqdn() if settings.launcher == "ssh" else None
        self._agent = InboundAgent(settings, session) if settings.launcher == "inbound" else None
        self._lock = threading.Lock()          # the fields below
        self._wake = threading.Event()         # run a sync now (honoured when the last one succeeded)
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._want_offline_reason: Optional[str] = None
        self._mark = OfflineMarkStore(state_dir, settings.url or "", settings.node_name)
        self._state = "connecting" if settings.enabled else "disabled"
        self._last_error: Optional[str] = None
        self._failures = 0
        self._last_attempt: Optional[float] = None
        self._last_ok: Optional[float] = None
        self._next_sync_at: Optional[float] = None
        self._controller_version: Optional[str] = None
        self._version_seen = False             # a response was read (so a None version means "no header")
        self._observed: dict = {}
        if settings.enabled and not settings.verify_tls and settings.ca_bundle is None:
            log.warning("jenkins.verify_tls is off: the controller's certificate is not checked")

    # -- daemon-facing API ---------------------------------------------------------------------------

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
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if self._agent is not None:
            self._agent.stop()

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

    def status(self) -> dict:
        """The link's state for ``agentd status`` (token-free). Keys are stable; new ones are only added."""
        settings = self._settings
        agent = self._agent
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
                "authenticated_as": self._session.authenticated_as,
                "controller_version": version,
                "min_controller_version": MIN_CONTROLLER_VERSION,
                "controller_version_note": (unknown_version_note() if self._version_seen and version is None
                                            else version_problem(version, settings.launcher)),
                "agent_jar_version": agent.jar_version if agent is not None else None,
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
        status["agent"] = agent.status() if agent is not None else None
        return status

    # -- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
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
            # After a failure only stop cuts the wait short: gate/GPU events arriving during an outage
            # must not turn the backoff into a tight loop.
            (self._wake if ok else self._stopping).wait(delay)
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
            with self._session.lock:
                state, problem = self._reconcile()
        except AuthError as e:
            self._record_failure("auth-error", str(e))
            return False
        except LinkError as e:
            self._record_failure("error", str(e))
            return False
        except Exception as e:  # a bug or an unexpected library error must not kill the daemon's loop
            log.exception("Jenkins link: unexpected error during sync")
            self._record_failure("error", self._session.redact(
                f"unexpected {type(e).__name__}: {describe_error(e)}"))
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
        message = self._session.redact(message)
        with self._lock:
            repeated = message == self._last_error and state == self._state
            self._state = state
            self._last_error = message
            self._failures += 1
            failures = self._failures
        # Log a new error loudly once; repeats of the same error go to debug (no journal flooding).
        log.log(logging.DEBUG if repeated else logging.WARNING,
                "Jenkins link %s (attempt %d): %s", state, failures, message)

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
        spec = desired_spec(settings, gpus, slots, ssh_host=self._ssh_host)

        info, version, created = ensure_node(self._session, spec, self._controller_version)
        self._note_version(version)
        with self._lock:
            wanted = offline_message(self._want_offline_reason)
        info = apply_offline_state(self._session, spec.name, info, wanted, self._mark)
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
        if self._agent is not None:
            agent_problem = self._agent.keep_running(version, fresh_node=created)
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
