"""`agentd serve`: the long-running daemon.

Start order: settings -> journal -> GPU probe and slots -> scheduler (re-queues interrupted jobs
first) -> control socket -> Jenkins link (tried once) -> READY=1. Then the main loop, every tick
(0.5 s): it builds the typed status once (`agentd.status_model.Status`: `agentd status`, STATUS= and
the metrics all read it), alone sends WATCHDOG=1 (only while the scheduler's dispatcher is alive),
moves a warm base model whose `warm_vram_ttl_s` ran out to host memory, runs the daily retention
pass and tells the Jenkins link when the node must go offline.

Signals only set flags (SIGTERM/SIGINT: stop; SIGHUP: reload nothing yet, log). On stop: STOPPING=1,
the control socket closes, running jobs checkpoint at their next step boundary and are journaled
interrupted (bounded by `stop_timeout_s`), queued jobs stay queued, the process exits 0.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import stat
import threading
import time
from dataclasses import asdict
from pathlib import Path

from agentd import __version__
from agentd.settings import Settings
from agentd.status_model import Submitter

log = logging.getLogger("agentd")

STATUS_GPU_TTL_S = 1.0
STATUS_MAX_AGE_S = 0.25  # a status request between ticks rebuilds it when the last one is older than this


class Daemon:
    def __init__(self, settings: Settings, probe=None):
        self.settings = settings
        self.version = __version__
        self.started = time.time()
        self.probe = probe
        self._stop = threading.Event()
        self._gpu_cache: tuple[float, list] = (0.0, [])
        self._last_gc = 0.0
        self.link = None
        self.releases = None
        self._last_backup = 0.0
        self.watcher = None
        self.metrics = None
        self._status = None
        self._status_at = 0.0
        self._status_lock = threading.Lock()
        self._changes = 0  # bumped by the scheduler on every state change: a cached status older is stale
        self._status_changes = -1

    # --- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        from agentd.access import authorizer
        from agentd.gpu import probe_from_settings
        from agentd.journal import Journal
        from agentd.scheduler import Scheduler
        from agentd.server import ControlServer, bind_socket, permission_policy
        from trainer.api import BaseModelCache

        s = self.settings
        policy = permission_policy(s.operator_group, s.jenkins.agent_user)  # a missing group stops us here
        s.state_dir.mkdir(parents=True, exist_ok=True)
        if s.release.enabled:
            from agentd.release.service import Releases

            self.releases = Releases(s.release, s.state_dir, s.cache_dir)  # CredentialError: exit 78
        self.journal = Journal(s.journal_path)
        if self.probe is None:
            self.probe = probe_from_settings(s)
        self.slots = self._make_slots()
        self.base_cache = BaseModelCache(s.model_cache_size, s.warm_vram_ttl_s)
        self.scheduler = Scheduler(
            self.journal, self.slots, base_cache=self.base_cache, probe=self.probe, max_wait_s=s.max_wait_s,
            max_infra_retries=s.max_infra_retries,
            estimator=_estimator(self.journal) if any(sl.index >= 0 for sl in self.slots) else None,
            authorize=authorizer(self.own_folders()), vram_margin_mib=s.vram_margin_mib,
            gate_timeout_s=s.gate_timeout_s, gate_poll_s=s.gate_poll_s, max_foreign_vram_mib=s.max_foreign_vram_mib,
            on_change=self._scheduler_changed, releaser=self._release_after_job,
            resolve_release=self.releases.resolve if self.releases is not None else None)
        recovered = self.scheduler.start()
        if recovered:
            log.info("resuming %d interrupted job(s) first: %s", len(recovered), ", ".join(recovered))
        from agentd.sweep.manager import SweepManager

        self.sweeps = SweepManager(self.scheduler, self.journal, s.state_dir, s.sweep_db_password_file)
        resumed = self.sweeps.start()
        if resumed:
            log.info("resuming sweep(s): %s", ", ".join(resumed))
        sock = bind_socket(s.socket, int(s.socket_mode, 8), s.socket_group)
        self.server = ControlServer(self, sock, max_bytes=s.max_message_bytes, idle_timeout=s.idle_client_timeout_s,
                                    policy=policy)
        self.server.start()
        log.info("agentd %s listening on %s (%s)", self.version, s.socket,
                 ", ".join(sl.name for sl in self.slots))
        self._start_jenkins()
        # Import the training stack now, in the background: the first job then starts as fast as later ones
        # (imports are ~90% of a cold start), while status and the socket answer at once.
        threading.Thread(target=_preload_trainer, name="preload", daemon=True).start()
        if s.metrics.enabled:
            from agentd.metrics import Metrics

            self.metrics = Metrics()
            port = self.metrics.start(s.metrics.host, s.metrics.port)
            log.info("metrics on http://%s:%d/metrics", s.metrics.host, port)

    def _release_after_job(self, cfg, submitter: dict | None) -> list:
        """The release (and backup, `keep: true`) a succeeded job's config asks for (`release: {name, to, when,
        keep}`), as the events its client sees. The job stays succeeded whatever comes of them: a refusal or
        a target failure is reported."""
        from agentd.events import Released
        from agentd.release import ReleaseError
        from agentd.release.service import check_permission

        req, out = cfg.release, Path(cfg.output_dir)
        name = req.name or cfg.run_name
        if self.releases is None:
            return [Released(name=name, outcome="not_configured",
                             message="this daemon has no release targets (release: in agentd.yaml)")]
        by = (submitter or {}).get("user") or str((submitter or {}).get("uid", "a job"))
        events = []
        try:
            check_permission("promote", out, submitter)
        except ReleaseError as e:
            return [Released(name=name, outcome="failed", message=str(e))]
        if req.when != "never":
            try:
                r = self.releases.promote(out, name=req.name, to=req.to, force=req.when == "always", by=by,
                                          reason="release.when: always in the training config"
                                          if req.when == "always" else None)
                forced = " (forced: when: always)" if r["forced"] else ""
                events.append(Released(name=r["name"], outcome="released", version=r["version"],
                                       artifact=r["artifact"], message=f"to {', '.join(r['targets'])}{forced}"))
            except ReleaseError as e:
                events.append(Released(name=name, outcome="refused" if e.code == "refused" else "failed",
                                       message=str(e)))
        if req.keep:
            try:
                k = self.releases.keep(out)
                events.append(Released(name=name, outcome="kept", artifact=k["artifact"],
                                       message=f"backed up to {k['target']}"))
            except ReleaseError as e:
                events.append(Released(name=name, outcome="failed", message=f"keep: {e}"))
        return events

    def own_folders(self) -> dict[str, Path]:
        """The daemon's folders no job may write into or around (agentd.access.daemon_folder_problem)."""
        s = self.settings
        folders = {"state": s.state_dir, "cache": s.cache_dir}
        runtime = s.socket.parent
        try:
            shared = runtime.stat().st_mode & stat.S_ISVTX  # /tmp and the like: not the daemon's own
        except OSError:
            shared = False
        if not shared:
            folders["runtime"] = runtime
        if s.jenkins.enabled and s.jenkins.launcher == "inbound":
            folders["agent"] = Path(s.jenkins.agent_jar_dir)  # agent.jar and its secret
        return folders

    def _make_slots(self):
        from agentd.gate import cpu_slot_index
        from agentd.scheduler import Slot

        wanted = self.settings.slots
        n_cpu = self.settings.cpu_slots
        cpu = [Slot(cpu_slot_index(n), "cpu", label="cpu" if n_cpu == 1 else f"cpu-{n}") for n in range(n_cpu)]
        if wanted == "auto":
            gpus = self.probe.list_gpus()
            if not gpus:
                log.info("no GPU: %s; %d CPU slot(s)", getattr(self.probe, "reason", "none found"), n_cpu)
                return cpu
            return [Slot(g.index, f"cuda:{g.index}") for g in gpus]
        slots = []
        for name in wanted:
            if name == "cpu":
                slots += cpu
            else:
                slots.append(Slot(int(name.split(":", 1)[1]) if ":" in name else 0, name))
        return slots

    def _start_jenkins(self) -> None:
        """The Jenkins link (node registration, agent.jar, offline while blocked, folder trigger)."""
        j = self.settings.jenkins
        if not j.enabled:
            return
        from agentd.jenkins.integration import start_jenkins

        self.link, self.watcher = start_jenkins(self)

    # --- status -----------------------------------------------------------------------------------
    def gpus(self) -> list:
        """GPU facts, probed at most once a second (status must answer fast)."""
        stamp, facts = self._gpu_cache
        if time.monotonic() - stamp > STATUS_GPU_TTL_S:
            facts = self.probe.list_gpus()
            self._gpu_cache = (time.monotonic(), facts)
        return facts

    def build_status(self):
        """The typed status (agentd.status_model.Status), built from the scheduler, probe, link and cache."""
        from agentd.status_model import (DaemonInfo, JenkinsInfo, ModelCacheInfo, RecentJob, SlotInfo, Status,
                                         build)

        sched = self.scheduler.snapshot()
        gpus = {g.index: g for g in self.scheduler.gpu_view(self.gpus())}
        own = _own_mib_per_gpu(self.gpus())
        slots = []
        for sl in self.slots:
            g = gpus.get(sl.index)
            healthy = sl.unhealthy_reason is None and (g.healthy if g else sl.index < 0)
            reason = sl.unhealthy_reason or (g.error if g and not g.healthy else None)
            if sl.index >= 0 and g is None:
                reason = reason or f"GPU {sl.index}: not found by the probe"
            slots.append(SlotInfo(name=sl.name, index=sl.index, healthy=healthy, unhealthy_reason=reason,
                                  job=sched["busy_slots"].get(sl.index), uuid=g.uuid if g else None,
                                  gpu=g.to_dict() if g else None, agentd_vram_mib=own.get(sl.index)))
        recent = [build(RecentJob, _recent_view(r)) for r in self.journal.jobs(("succeeded", "failed", "cancelled"),
                                                                              limit=10, newest_first=True)]
        metrics_url = (f"http://{self.settings.metrics.host}:{self.metrics.port}/metrics" if self.metrics else None)
        return Status(
            daemon=DaemonInfo(pid=os.getpid(), version=self.version, uptime_s=round(time.time() - self.started, 1),
                              socket=str(self.settings.socket), protocol=1, draining=sched["draining"],
                              gpu_probe=getattr(self.probe, "reason", "") if not self.probe.available else "nvml",
                              metrics=metrics_url),
            jenkins=JenkinsInfo.from_link(self.link.status()) if self.link else JenkinsInfo(),
            slots=slots, running=sched["running"], queue=sched["queue"], paused=sched["paused"], recent=recent,
            counters=sched["counters"], model_cache=build(ModelCacheInfo, self.base_cache.info()))

    def _scheduler_changed(self) -> None:
        self._changes += 1  # called under the scheduler's lock: only a counter, no work

    def current_status(self):
        """The status of this tick; rebuilt when the scheduler changed since, or when older than
        STATUS_MAX_AGE_S (GPU and progress figures between ticks)."""
        with self._status_lock:
            if (self._status is None or self._status_changes != self._changes
                    or time.monotonic() - self._status_at > STATUS_MAX_AGE_S):
                changes = self._changes
                self._status = self.build_status()
                self._status_at, self._status_changes = time.monotonic(), changes
            return self._status

    def status(self) -> dict:
        """`agentd status --json` (the control socket's status op)."""
        return self.current_status().to_dict()

    def jobs(self, limit: int) -> list[dict]:
        return [_recent_view(r) | {"state": r["state"], "priority": r.get("priority") or 0}
                for r in self.journal.jobs(limit=limit, newest_first=True)]

    def status_line(self) -> str:
        return self.current_status().line()

    # --- main loop --------------------------------------------------------------------------------
    def request_stop(self, *_):
        self._stop.set()  # signal handlers only set flags; the loop does the work

    def run(self) -> int:
        from agentd.notify import Notifier

        notifier = Notifier(unset_environment=True)
        self.setup()
        notifier.ready(self.status_line())
        while not self._stop.wait(0.5):
            if self.scheduler.is_dispatching():
                notifier.watchdog_tick()
            self.base_cache.offload_expired()  # the polite warm cache: off the GPU after its TTL
            with self._status_lock:
                changes = self._changes
                self._status = self.build_status()
                self._status_at, self._status_changes = time.monotonic(), changes
            notifier.status(self.status_line())
            self._periodic()
        notifier.stopping("stopping: checkpointing running jobs")
        self.shutdown()
        return 0

    def _periodic(self) -> None:
        self.server.peer_log.flush()  # summarise the bad requests and refusals of windows that ended
        now = time.time()
        if now - self._last_gc > 86400:
            self._last_gc = now
            try:
                from agentd.gc import collect

                collect(self.settings, self.journal, dry_run=False, releases=self.releases)
            except Exception:
                log.exception("retention pass failed")
        if self.releases is not None and self.settings.release.backup and now - self._last_backup > 86400:
            self._last_backup = now
            threading.Thread(target=self._backup, name="release-backup", daemon=True).start()
        if self.metrics is not None:
            self.metrics.update(self.current_status())
        if self.link is not None:
            from agentd.gate import node_blocked_reason

            # Slots marked unhealthy after an infrastructure failure count as unhealthy GPUs here.
            gpus = self.scheduler.gpu_view(self.gpus())
            reason = node_blocked_reason(gpus, self.settings.max_foreign_vram_mib, self.scheduler.draining,
                                         {os.getpid()}, _own_mib_per_gpu(gpus))
            if reason:
                self.link.request_offline(reason)
            else:
                self.link.request_online()

    def _backup(self) -> None:
        """The daily backup of released LoRAs (`agentd backup` runs the same on request)."""
        from agentd.release import ReleaseError

        try:
            result = self.releases.backup()
        except ReleaseError as e:
            log.error("daily backup failed: %s", e)
            return
        for problem in result["problems"]:
            log.error("daily backup: %s", problem)

    def shutdown(self) -> None:
        log.info("stopping: running jobs checkpoint at their next step (up to %.0f s)", self.settings.stop_timeout_s)
        self.server.close()
        self.sweeps.shutdown()  # before the jobs stop: their trials resume with the sweep, not told failed
        self.scheduler.shutdown(self.settings.stop_timeout_s)
        for part in (self.watcher, self.link, self.metrics):
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    log.exception("stopping %s failed", type(part).__name__)
        self.settings.socket.unlink(missing_ok=True)
        self.journal.close()
        log.info("stopped")


def _preload_trainer() -> None:
    try:
        from trainer.api import preload_all

        preload_all()  # torch, every family's loading stack (diffusers, transformers, peft), matplotlib
    except Exception:  # the job itself will report a broken install
        log.exception("preloading the trainer failed")


def _own_mib_per_gpu(gpus: list) -> dict[int, int]:
    """VRAM this daemon holds per GPU: NVML's figure for our pid when it lists processes, else CUDA's
    reserved memory (what the gate must not count as someone else's)."""
    from trainer.api import cuda_reserved_mib

    cuda = cuda_reserved_mib()
    out = {}
    for g in gpus:
        mine = [p.used_mib for p in (g.processes or []) if p.pid == os.getpid() and p.used_mib is not None]
        if mine:
            out[g.index] = sum(mine)
        elif g.processes is not None:
            out[g.index] = cuda.get(g.index, 0)
        elif g.index in cuda:
            out[g.index] = cuda[g.index]
    return out


def _recent_view(r: dict) -> dict:
    env = r.get("env") or {}
    return {"id": r["id"], "name": r.get("name"), "config": r.get("config_path"), "outcome": r["state"],
            "created": r.get("created"), "started": r.get("started"), "ended": r.get("ended"),
            "step": r.get("step"), "total_steps": r.get("total_steps"), "loss": r.get("loss"),
            "error": r.get("error"), "output_dir": r.get("output_dir"), "build_url": env.get("BUILD_URL"),
            "estimate_mib": r.get("estimate_mib"), "peak_mib": r.get("peak_mib"),
            "infra_retries": r.get("infra_retries") or 0, "submitter": asdict(Submitter.of(r))}


def _estimator(journal):
    """A job's VRAM estimate for one of its devices (`device_batch`: its share of each micro-batch, when the job
    spreads over several), calibrated by the peak the journal recorded for the same model and shape."""
    def estimate(checked, device_batch=None):
        from trainer.api import calibrated, estimate_for_config

        formula = estimate_for_config(checked.config, **({"batch_size": device_batch} if device_batch else {}))
        return calibrated(formula, journal.recorded_peak(formula.key))

    return estimate


def serve(settings: Settings, probe=None) -> int:
    # NVML numbers GPUs in PCI order; CUDA must too, or "cuda:N" would not be the GPU the probe calls N.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    faulthandler.enable()  # a watchdog abort prints every thread's stack to the journal
    from agentd.privileges import settle_capabilities

    j = settings.jenkins
    agent_user = j.agent_user if j.enabled and j.launcher == "inbound" else None
    settle_capabilities(agent_user)
    if j.enabled and j.launcher == "inbound" and not agent_user:
        log.warning("jenkins.agent_user is not set: agent.jar and every build run as the daemon's user and can "
                    "read what the daemon can (its journal, and the API token unless it comes from a file "
                    "they cannot open); set agent_user: agentd-build (see README, Run it on a GPU box)")
    daemon = Daemon(settings, probe)
    signal.signal(signal.SIGTERM, daemon.request_stop)
    signal.signal(signal.SIGINT, daemon.request_stop)
    signal.signal(signal.SIGHUP, lambda *_: log.info("SIGHUP ignored: restart the service to reload settings"))
    return daemon.run()
