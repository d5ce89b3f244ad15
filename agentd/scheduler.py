"""The scheduler: a priority queue, one job per slot (W slots for a config's `devices: W`), the VRAM gate,
and jobs run in-process.

Order: `agentd.queue_order.run_order` (re-queued jobs first, then any job that waited `max_wait_s`,
then higher `priority`, FIFO within a priority). The head of that order waits at the gate; the others
wait behind it. A W-slot job takes its W slots at once, when the gate passes W of them (no partial grab,
so two such jobs can never each hold part of what the other needs). At the head it waits for slots to free;
nothing passes it, so a stream of 1-slot jobs cannot starve it (it starts once the jobs already running
end), and `max_wait_s` brings it to the head behind higher priorities. The price is slots left idle while
it waits, at most the running jobs' remaining time. Its ranks are processes `trainer.api.run_job` spawns
(one per reserved slot's device); the daemon's process joins no process group.

Threads: one dispatcher places the head of the queue (the gate decides where and whether); each
placed job runs in its own thread, through `agentd.runner.Runner` (which also admits jobs at submit:
the config is parsed once per job and kept on its `LiveJob`). Every state change goes to the journal
first, then to the job's subscribers (`agentd run`, `agentd logs --follow`).

Interruptions: `cancel` sets the job's stop flag (it checkpoints at the next step boundary and ends
cancelled); `shutdown` sets every running job's stop flag with reason "shutdown", so they end
*interrupted* and are queued again, first, when the daemon starts next. A daemon that died without
a shutdown leaves jobs "running" in the journal; `Journal.recover_after_start` re-queues them.
`pause` sets the job's pause flag: it checkpoints at the next step boundary, frees its slot and is
parked (state paused, its followers stay attached) until `resume` queues it again.

Infrastructure failures (`agentd.failures.classify_failure`: CUDA errors other than out-of-memory, a
GPU NVML reports unhealthy) mark the slot unhealthy with the reason and re-queue the job first, from
its last checkpoint, up to `max_infra_retries` times; then it fails with `infra` set (`agentd run`
exits 5). An unhealthy slot takes no job until the daemon restarts (a CUDA error such as an illegal
address can leave the process's CUDA context unusable, so only a new process trusts that GPU again).

Fault injection for tests: AGENTD_INJECT_INFRA_FAULT=STEP[:ATTEMPTS] makes the first ATTEMPTS (default
1) attempts of every job raise a CUDA-like "illegal memory access" error when they report step STEP.
Unset (the default) it does nothing.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field, replace

from agentd.events import Gated, InfraRetry, Queued, State
from agentd.failures import classify_failure
from agentd.gate import GateDecision, gate_decision, is_cpu_slot
from agentd.journal import FINAL, Journal
from agentd.queue_order import Waiting, run_order
from agentd.runner import RunEnd, Runner
from agentd.status_model import Counters, PausedJob, QueuedJob, RunningJob, Submitter
from trainer import api
from trainer.config import TrainConfig
from trainer.errors import ConfigError, Problem
from trainer.events import Event, event
from trainer.gpus import VRAM_MARGIN_MIB, GpuFacts, NoSuchDevice, match_device

INJECT_ENV = "AGENTD_INJECT_INFRA_FAULT"

log = logging.getLogger("agentd.scheduler")


@dataclass
class Slot:
    index: int  # NVML index, or a CPU slot's (negative: agentd.gate.cpu_slot_index)
    device: str  # torch device string
    label: str | None = None  # shown in status; default: the device
    unhealthy_reason: str | None = None  # set after an infrastructure failure on it

    @property
    def name(self) -> str:
        return self.label or self.device


class SubmitRefused(Exception):
    def __init__(self, code: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.details = code, message, details or {}


@dataclass
class LiveJob:
    """A queued or running job in memory: its stop flag, its event stream and its live progress."""

    id: str
    record: dict
    config: TrainConfig | None = None  # parsed once per job (agentd.runner): at submit, or when recovered
    config_error: Exception | None = None  # why a recovered job's config did not parse: it fails with it
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # "cancel" | "shutdown" | "pause"
    stop_note: str | None = None  # why a cancel stopped it (a sweep's pruner: "pruned by sweep ...")
    pause: threading.Event = field(default_factory=threading.Event)
    priority: int = 0
    enqueued: float = field(default_factory=time.monotonic)  # when it (re)entered the queue, for max_wait_s
    first: bool = False  # re-queued after an interruption or infrastructure fault: runs before the others
    attempt: int = 1
    infra_retries: list = field(default_factory=list)  # {"attempt", "slot", "error", "at"} per re-queue
    allowed: set | None = None  # NVML indices its config's device: (or devices: list) allows (None: any)
    world: int = 1  # slots it runs on at once (its config's devices:), reserved together
    device_uuid: str | None = None
    seq: int = 0
    subscribers: list = field(default_factory=list)
    progress: dict = field(default_factory=dict)
    slots: list = field(default_factory=list)  # the Slots it runs on (one per rank), empty while not running
    estimate: api.VramEstimate | None = None  # GPU slots only
    gated_since: float | None = None
    last_gate_note: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class JobChannel:
    """The reporter a running job emits through: journal first, then subscribers."""

    def __init__(self, scheduler: "Scheduler", job: LiveJob):
        self.s, self.job = scheduler, job

    def emit(self, ev: Event) -> None:
        job = self.job
        if ev.get("type") == "finished":
            return  # the scheduler emits the job's end itself, with the journal's outcome
        if ev.get("type") == "step":
            self.s.inject_fault(job, ev["step"])
            job.progress = {k: ev.get(k) for k in ("step", "total_steps", "epoch", "loss", "loss_mean", "lr",
                                                   "it_s", "eta_s")}
            if not ev.get("logged"):
                return
            self.s.journal.update(job.id, step=ev["step"], total_steps=ev["total_steps"], loss=ev["loss"])
        if ev.get("type") == "started":
            job.progress.update(total_steps=ev.get("total_steps"), step=ev.get("resumed_from") or 0)
        self.s.publish(job, ev)


class Scheduler:
    def __init__(self, journal: Journal, slots: list[Slot], *, base_cache=None, probe=None, estimator=None,
                 authorize=None, vram_margin_mib: int = VRAM_MARGIN_MIB, gate_timeout_s: float = 3600,
                 gate_poll_s: float = 2.0, max_foreign_vram_mib: int | None = None, on_change=None,
                 max_wait_s: float = 3600, max_infra_retries: int = 2, releaser=None,
                 resolve_release=None):
        """`estimator(checked, device_batch)`: a job's VRAM estimate for one of its devices (None: a CPU-only
        daemon); `authorize`: the submitter's access check (`agentd.access.authorizer`); `releaser`: the release a config's `release:`
        asks for after success (agentd.daemon); `resolve_release`: the production LoRA of a name, for an
        evaluation's `compare_with: production` (agentd.release)."""
        self.journal = journal
        self.slots = slots
        self.base_cache = base_cache
        self.probe = probe
        self.runner = Runner(base_cache=base_cache, estimator=estimator, authorize=authorize, releaser=releaser,
                             resolve_release=resolve_release)
        self.margin = vram_margin_mib
        self.gate_timeout_s = gate_timeout_s
        self.gate_poll_s = gate_poll_s
        self.max_foreign = max_foreign_vram_mib
        self.max_wait_s = max_wait_s
        self.max_infra_retries = max_infra_retries
        self.fault = _parse_fault(os.environ.get(INJECT_ENV))
        self.on_change = on_change or (lambda: None)
        self.live: dict[str, LiveJob] = {}
        self.order: list[str] = []  # queued/gated job ids, head first
        self.busy: dict[int, str] = {}  # slot index -> job id
        self.runners: dict[str, threading.Thread] = {}
        self.draining = False
        self.stopping = False
        self.cond = threading.Condition()
        self.counters = {"jobs_finished": {"succeeded": 0, "failed": 0, "cancelled": 0}, "gate_waits": 0,
                         "infra_retries": 0}
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Load the journal's unfinished jobs (interrupted ones first) and start dispatching."""
        recovered = self.journal.recover_after_start()
        for rec in self.journal.jobs(("interrupted", "queued", "paused")):
            world, listed, device_batch = self._world_or_one(rec, rec.get("rendezvous"))
            config, config_error, estimate = self.runner.recover(rec, device_batch)
            job = LiveJob(rec["id"], rec, config, config_error, seq=self.journal.last_event_seq(rec["id"]),
                          estimate=estimate, priority=rec.get("priority") or 0, first=bool(rec.get("requeue_first")),
                          attempt=(rec.get("infra_retries") or 0) + 1, world=world,
                          allowed=listed or self._allowed_or_none((rec.get("resolved") or {}).get("device")))
            self.live[job.id] = job
            if rec["state"] != "paused":  # a paused job stays parked until `agentd resume`
                self.order.append(job.id)
        self._dispatcher.start()
        return recovered

    def is_dispatching(self) -> bool:
        """Whether the dispatcher thread is alive (the daemon's systemd watchdog pings only while it is)."""
        return self._dispatcher.is_alive()

    def shutdown(self, timeout: float) -> None:
        """Stop taking jobs; running ones checkpoint and end interrupted (bounded by `timeout`)."""
        with self.cond:
            self.stopping = True
            for job_id in self.busy.values():
                job = self.live[job_id]
                job.stop_reason = "shutdown"
                job.stop.set()
            self.cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in list(self.runners.values()):
            t.join(max(0.0, deadline - time.monotonic()))
        with self.cond:
            for job_id in list(self.live):
                job = self.live[job_id]
                if job_id in self.order or job.record["state"] == "paused":
                    # queued stays queued, paused stays paused; wake their followers so they re-attach later
                    self._close_subscribers(job)
                elif job.slots and job_id in self.busy.values():
                    # Did not reach a step boundary in time: journal says interrupted, resumes next start.
                    self.journal.transition(job_id, "interrupted", "stop timeout; resumes from last checkpoint",
                                            requeue_first=1)
                    self._close_subscribers(job)

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, *, config_path: str, config_text: str, env: dict, submitter: dict,
               priority: int | None = None, capability_sha256: str | None = None,
               sweep: dict | None = None, evaluate: dict | None = None,
               rendezvous: dict | None = None) -> tuple[str, bool]:
        """Queue a job, or return the active job that already trains into the same output folder.
        `priority` (agentd run --priority) overrides the config's; `capability_sha256`: a build's job is
        owned by whoever holds that capability (agentd.permissions); `sweep`: {name, trial, folder} of a
        sweep's trial (agentd.sweep), journaled and written into its run.json. `evaluate` ({"run": folder,
        "against": ...}, `agentd eval`): the job evaluates that finished run instead of training (same checks,
        slot and gate). `rendezvous` ({nodes, node_rank, rdzv_endpoint}, `agentd run --nodes`): the job is this box's
        part of one job over several boxes (journaled with it: a restarted daemon resumes the same part)."""
        rdzv = _rendezvous(rendezvous)
        try:
            cfg = self.runner.parse(config_text, config_path)
            checked = self.runner.check(cfg, config_path, submitter)
        except ConfigError as e:
            raise SubmitRefused("invalid_config", e.render(), e.to_dict()) from None
        if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
            raise SubmitRefused("bad_request", f"priority must be an integer, not {priority!r}")
        priority = cfg.priority if priority is None else priority
        allowed = self._allowed(cfg.device, config_path)
        world, listed, device_batch = self._world(cfg, config_path, rdzv)
        # Outside the lock: the first estimate imports diffusers, and status must not wait for that.
        try:
            plan = self.runner.plan(checked, device_batch)
        except ConfigError as e:  # resume: strict refusing a changed config: known now, not after the queue
            raise SubmitRefused("invalid_config", e.render(), e.to_dict()) from None
        estimate, decision, previous = plan.estimate, plan.decision, plan.previous
        with self.cond:
            for job in self.live.values():
                if evaluate is None and job.record["output_dir"] == str(cfg.output_dir) \
                        and job.record["state"] not in FINAL and not job.record.get("evaluate"):
                    return job.id, True
            if self.draining or self.stopping:
                raise SubmitRefused("draining", "agentd is draining: it takes no new jobs "
                                    "(`agentd undrain` to reopen)")
            job_id = self.journal.create(config_path=config_path, config_text=config_text,
                                         config_hash=cfg.full_hash(), resolved=cfg.resolved(),
                                         output_dir=str(cfg.output_dir), name=cfg.run_name, submitter=submitter,
                                         env=env, shape_key=estimate.key if estimate else None,
                                         estimate_mib=estimate.total_mib if estimate else None, priority=priority,
                                         capability_sha256=capability_sha256, sweep=sweep, evaluate=evaluate,
                                         rendezvous=rdzv.request() if rdzv else None)
            job = LiveJob(job_id, self.journal.get(job_id), cfg, estimate=estimate, priority=priority,
                          allowed=listed or allowed, world=world)
            self.live[job_id] = job
            # A finished, unchanged config needs no GPU: answered now, not after waiting for a slot and the gate.
            # Not for a part of a job over several boxes: the other boxes' ranks wait for this one's at the
            # rendezvous, where rank 0 tells them there is nothing to do.
            if evaluate is None and rdzv is None and decision is not None and decision.action == "nothing":
                self.publish(job, event("run", action="nothing", reason=decision.reason, run_id=previous.run_id))
                self._finish(job, "succeeded", None, detail=decision.reason, step=previous.steps,
                             loss=previous.final_loss)
                self.cond.notify_all()
                self.on_change()
                return job_id, False
            self.order.append(job_id)
            # Position in line: the jobs running now count as ahead of it, so the first job is 1.
            ahead = self._running_count() + self._run_order().index(job_id)
            self.publish(job, Queued(job_id=job_id, position=ahead + 1, ahead=ahead, priority=priority))
            self.cond.notify_all()
        self.on_change()
        return job_id, False

    def _allowed(self, device, source: str) -> set[int] | None:
        """The GPUs a config's `device:` names (None: any); refused with the GPU list when none match."""
        if device is None:
            return None
        gpus = self.probe.list_gpus() if self.probe else []
        try:
            return match_device(device, gpus)
        except NoSuchDevice as e:
            err = ConfigError([Problem("device", str(e), "set device: to one of the GPUs listed, or remove it",
                                       device)], source)
            raise SubmitRefused("invalid_config", err.render(), err.to_dict()) from None

    def _world(self, cfg: TrainConfig, source: str, rendezvous: api.Rendezvous | None = None
               ) -> tuple[int, set[int] | None, int | None]:
        """How many slots a job takes at once on this box (its `devices:`, checked against this box's slots: too
        many, a GPU listed twice, a batch that does not split over every box's ranks are refused at submit), the
        GPUs a `devices:` list names (None: any), and what one device trains of each micro-batch (the VRAM
        estimate's batch; None: the whole batch, one device)."""
        if cfg.devices is None and rendezvous is None:
            return 1, None, None
        gpus = [g for g in (self.probe.list_gpus() if self.probe else []) if g.index in {s.index for s in self.slots}]
        try:
            plan = api.plan_here(cfg, gpus, cpu_slots=sum(is_cpu_slot(s.index) for s in self.slots), source=source,
                                 rendezvous=rendezvous)
        except ConfigError as e:
            raise SubmitRefused("invalid_config", e.render(), e.to_dict()) from None
        return plan.local_size, set(plan.gpus) if isinstance(cfg.devices, list) else None, plan.per_rank_batch

    def _world_or_one(self, rec: dict, rendezvous: dict | None) -> tuple[int, set[int] | None, int | None]:
        """`_world` for a recovered job: one whose config no longer parses, or whose devices no longer fit this box,
        runs its checks again as it starts and fails there with the reason."""
        try:
            return self._world(self.runner.parse(rec["config_text"], rec["config_path"]), "",
                               _rendezvous(rendezvous))
        except Exception:
            return 1, None, None

    def _allowed_or_none(self, device) -> set[int] | None:
        try:
            return self._allowed(device, "")
        except SubmitRefused:
            return set()  # the GPU it asked for is gone: it waits as unavailable and fails with the reason

    def cancel(self, job_id: str, why: str | None = None) -> str:
        """Cancel a job; a running one checkpoints at its next step. `why`: the note its end records
        instead of "stopped" (a sweep's pruner)."""
        with self.cond:
            job = self.live.get(job_id)
            if job is None:
                rec = self.journal.get(job_id)
                if rec is None:
                    raise SubmitRefused("not_found", f"no job {job_id}")
                return rec["state"]
            if job_id in self.order:
                self.order.remove(job_id)
                self._finish(job, "cancelled", "cancelled while queued")
                return "cancelled"
            if job.record["state"] == "paused":
                self._finish(job, "cancelled", "cancelled while paused")
                return "cancelled"
            job.stop_reason = "cancel"
            job.stop_note = why
            job.pause.clear()  # a cancel wins over a pending pause
            job.stop.set()
            return "cancelling"

    def pause(self, job_id: str) -> str:
        """Ask a running job to checkpoint at its next step and park (state paused, slot freed)."""
        with self.cond:
            job = self.live.get(job_id)
            state = job.record["state"] if job else (self.journal.get(job_id) or {}).get("state")
            if state is None:
                raise SubmitRefused("not_found", f"no job {job_id}")
            if job is None or job_id not in self.busy.values():
                raise SubmitRefused("bad_state", f"{job_id} is {state}: only a running job can be paused "
                                    "(`agentd cancel` removes a queued one)")
            if job.stop.is_set() or job.pause.is_set():
                return "pausing" if job.pause.is_set() else "stopping"
            job.stop_reason = "pause"
            job.pause.set()
            log.info("%s: pause requested; it checkpoints at its next step", job_id)
        self.on_change()
        return "pausing"

    def resume(self, job_id: str) -> str:
        """Queue a paused job again; it continues from its checkpoint."""
        with self.cond:
            job = self.live.get(job_id)
            state = job.record["state"] if job else (self.journal.get(job_id) or {}).get("state")
            if state is None:
                raise SubmitRefused("not_found", f"no job {job_id}")
            if job is None or state != "paused":
                raise SubmitRefused("bad_state", f"{job_id} is {state}: only a paused job can be resumed")
            job.pause.clear()
            job.stop.clear()
            job.stop_reason = None
            job.enqueued = time.monotonic()
            job.gated_since = None
            self.journal.transition(job_id, "queued", "resumed after a pause")
            job.record["state"] = "queued"
            self.order.append(job_id)
            position = self._running_count() + self._run_order().index(job_id) + 1
            self.publish(job, State(state="queued", detail=f"resumed; position {position} in the queue"))
            self.cond.notify_all()
        self.on_change()
        return "queued"

    def subscribe(self, job_id: str, after_seq: int = 0) -> tuple[list[dict], queue.Queue | None]:
        """Events after `after_seq` so far, and a queue of the live ones (None when the job has ended)."""
        with self.cond:
            job = self.live.get(job_id)
            if job is None:
                if self.journal.get(job_id) is None:
                    raise SubmitRefused("not_found", f"no job {job_id}")
                return self.journal.events(job_id, after_seq), None
            with job.lock:
                q: queue.Queue = queue.Queue()
                job.subscribers.append(q)
                return self.journal.events(job_id, after_seq), q

    def unsubscribe(self, job_id: str, q: queue.Queue) -> None:
        job = self.live.get(job_id)
        if job is not None:
            with job.lock:
                if q in job.subscribers:
                    job.subscribers.remove(q)

    def set_draining(self, draining: bool) -> None:
        with self.cond:
            self.draining = draining
            self.cond.notify_all()
        self.on_change()

    # --- events -----------------------------------------------------------------------------------
    def publish(self, job: LiveJob, ev: Event) -> None:
        """Journal the event, send it to the job's followers, and log it as one line (journald's copy).
        Step events arrive here only every `log_every` steps, so the log never floods."""
        with job.lock:
            job.seq += 1
            ev = ev.with_fields(seq=job.seq, job_id=job.id)
            line = ev.line()
            if line:
                log.log(logging.WARNING if ev.kind in ("warning", "infra_retry") else logging.INFO, "%s: %s",
                        job.id, line)
            data = ev.to_dict()
            self.journal.add_event(job.id, job.seq, data)
            if ev.kind != "step":
                self.on_change()  # before a follower hears of it, so a status it asks for then already shows it
            for q in job.subscribers:
                q.put(data)

    def inject_fault(self, job: LiveJob, step: int) -> None:
        """The test-only fault injection point (see the module doc); does nothing unless configured."""
        if self.fault is not None and step == self.fault[0] and job.attempt <= self.fault[1]:
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected by {INJECT_ENV} "
                               f"at step {step}, attempt {job.attempt})")

    def _close_subscribers(self, job: LiveJob) -> None:
        with job.lock:
            for q in job.subscribers:
                q.put(None)
            job.subscribers.clear()

    # --- dispatching ------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            with self.cond:
                if self.stopping:
                    return
                try:
                    self._place_head()
                except Exception as e:  # one bad job must not stop the queue: fail it, go on with the next
                    log.exception("dispatching failed")
                    if self.order:
                        head = self._run_order()[0]
                        self.order.remove(head)
                        self._finish(self.live[head], "failed", f"internal error while scheduling: {e}")
                self.cond.wait(timeout=self.gate_poll_s)

    def _running_count(self) -> int:
        """Jobs running now (a W-slot job holds W entries of `busy`)."""
        return len(set(self.busy.values()))

    def _run_order(self) -> list[str]:
        now = time.monotonic()
        return run_order([Waiting(j, self.live[j].priority, now - self.live[j].enqueued, self.live[j].first)
                          for j in self.order], self.max_wait_s)

    def _place_head(self) -> None:
        """Start the head of the queue if the gate lets it (the head waits, the others wait behind it)."""
        while self.order and not self.stopping and not self.draining:
            job = self.live[self._run_order()[0]]
            decision = self._decide(job)
            if decision is None:
                return
            if decision.outcome == "start":
                self.order.remove(job.id)
                slots = [next(s for s in self.slots if s.index == i) for i in decision.slots]
                self._launch(job, slots, decision.reason if not is_cpu_slot(decision.slot) else None)
                continue
            if decision.outcome in ("never_fits", "unavailable"):
                self.order.remove(job.id)
                # No healthy GPU (left) is the machine's fault, not the job's: agentd run exits 5.
                self._finish(job, "failed", self._advice(job, decision), infra=decision.outcome == "unavailable")
                continue
            if not self.busy and self.base_cache is not None and self.base_cache.info()["on_device"]:
                # Our own warm base model may be what holds the memory: move it to host memory, decide again.
                log.info("moving the warm model cache to host memory to make room for %s", job.id)
                self.base_cache.offload_expired(force=True)
                continue
            self._note_wait(job, decision)
            return

    def _decide(self, job: LiveJob):
        """The gate's decision for `job`, or None when every slot is busy (nothing to say)."""
        free_slots = [s for s in self.slots if s.index not in self.busy]
        if not free_slots:
            return None
        if all(is_cpu_slot(s.index) for s in self.slots) and all(s.unhealthy_reason for s in self.slots):
            reason = "; ".join(f"{s.name}: {s.unhealthy_reason}" for s in self.slots)
            return GateDecision("unavailable", f"no healthy slot: {reason}", 0)
        gpus = [g for g in (self.probe.list_gpus() if self.probe else []) if g.index in {s.index for s in self.slots}]
        if not gpus and any(not is_cpu_slot(s.index) for s in self.slots):
            # A GPU slot whose GPU vanished from the probe: report it unhealthy through the gate.
            gpus = [GpuFacts(index=s.index, uuid=None, name=None, memory_total_mib=None, memory_used_mib=None,
                             memory_free_mib=None, utilization_pct=None, temperature_c=None, cuda_version=None,
                             processes=None, healthy=False, error=f"GPU {s.index}: not found by the probe")
                    for s in self.slots if not is_cpu_slot(s.index)]
        gpus = self.gpu_view(gpus)
        job.device_uuid = None
        estimate = job.record.get("estimate_mib") or 0
        cpu = tuple(s.index for s in self.slots if is_cpu_slot(s.index) and not s.unhealthy_reason)
        decision = gate_decision(int(estimate), gpus, set(self.busy), self.margin, self.max_foreign, {os.getpid()},
                                 allowed=job.allowed, own_mib=api.cuda_reserved_mib(), world=job.world,
                                 cpu_indices=cpu)
        if decision.outcome == "start":
            job.device_uuid = next((g.uuid for g in gpus if g.index == decision.slot), None)
        return decision

    def gpu_view(self, gpus: list) -> list:
        """The probe's GPUs with what the scheduler knows on top: a slot marked unhealthy after an
        infrastructure failure is unhealthy with that reason, even if NVML still answers for it."""
        reasons = {s.index: s.unhealthy_reason for s in self.slots if s.unhealthy_reason}
        return [replace(g, healthy=False, error=f"{g.error + '; ' if g.error else ''}GPU {g.index}: {reasons[g.index]}")
                if g.index in reasons else g for g in gpus]

    def _advice(self, job: LiveJob, decision) -> str:
        """The never-fits failure, with the batch size (and accumulation) that would fit the largest GPU."""
        text = decision.reason
        cfg = job.record.get("resolved") or {}
        if decision.outcome == "never_fits" and job.estimate is not None and decision.largest_total_mib:
            accum = cfg.get("gradient_accumulation_steps", 1)
            device_batch = job.estimate.batch_size  # a devices: job's estimate is one device's share
            fit = api.recommend_batch_size(job.estimate, decision.largest_total_mib, self.margin, device_batch, accum)
            if fit:
                knob = "batch_size_per_device" if cfg.get("batch_size_per_device") is not None else "batch_size"
                sharers = 1 if knob == "batch_size_per_device" else max(1, cfg.get("batch_size", 1) // device_batch)
                text += (f"; recommended: {knob} {fit[0] * sharers} with gradient_accumulation_steps {fit[1]} "
                         f"(same effective batch {cfg.get('batch_size', 1) * accum})")
            else:
                text += ("; even batch_size 1 does not fit: enable gradient_checkpointing, mixed_precision "
                         "fp16/bf16 or cache_latents, or lower resolution")
        return text

    def _note_wait(self, job: LiveJob, decision) -> None:
        now = time.monotonic()
        if job.gated_since is None:
            job.gated_since = now
            self.counters["gate_waits"] += 1
            self.journal.transition(job.id, "gated", decision.reason)
            job.record["state"] = "gated"
        if now - job.gated_since > self.gate_timeout_s:
            self.order.remove(job.id)
            self._finish(job, "failed", f"gate_timeout: waited {int(now - job.gated_since)} s for GPU memory; "
                                        f"last check: {decision.reason}")
            return
        if now - job.last_gate_note >= max(self.gate_poll_s, 5.0) or job.last_gate_note == 0.0:
            job.last_gate_note = now
            self.publish(job, Gated(reason=decision.reason, per_gpu=list(decision.per_gpu)))

    def _launch(self, job: LiveJob, slots: list[Slot], gate_note: str | None) -> None:
        job.slots = slots
        for slot in slots:
            self.busy[slot.index] = job.id
        where = _slot_names(slots)
        detail = f"on {where}" + (f" ({gate_note})" if gate_note else "")
        self.journal.transition(job.id, "running", detail, slot=where, requeue_first=0)
        job.record["state"] = "running"
        job.first = False
        self.publish(job, State(state="running", detail=detail))
        t = threading.Thread(target=self._run, args=(job, slots), name=f"job-{job.id}", daemon=True)
        self.runners[job.id] = t
        t.start()
        self.on_change()

    # --- running ----------------------------------------------------------------------------------
    def _run(self, job: LiveJob, slots: list[Slot]) -> None:
        try:
            history = [t["state"] for t in self.journal.transitions(job.id)]
            end = self.runner.run(job, slots, JobChannel(self, job), history)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            kind = classify_failure(error, self._gpus_healthy(slots))
            if kind in ("infra", "lost"):
                log.error("job %s: infrastructure failure on %s: %s\n%s", job.id, _slot_names(slots), error,
                          traceback.format_exc())
                self._infra_failure(job, slots, error, devices_failed=kind == "infra")
                return
            log.error("job %s failed: %s\n%s", job.id, error, traceback.format_exc())
            end = RunEnd("failed", error)
        outcome, error = end.outcome, end.error
        with self.cond:
            for slot in slots:
                self.busy.pop(slot.index, None)
            self.runners.pop(job.id, None)
            if outcome == "interrupted":
                self.journal.transition(job.id, "interrupted", "daemon stopping; resumes from the checkpoint",
                                        requeue_first=1, **_progress_fields(job))
                self.publish(job, State(state="interrupted",
                                        detail="daemon stopping; the job resumes when it starts again"))
                self._close_subscribers(job)
            elif outcome == "paused":
                self.journal.transition(job.id, "paused", error, **_progress_fields(job))
                job.record["state"] = "paused"
                job.record["paused_at"] = time.time()
                job.slots = []
                self.publish(job, State(state="paused", detail=f"{error}, checkpoint saved; "
                                        f"`agentd resume {job.id}` continues it"))
            else:
                self._finish(job, outcome, error, infra=end.infra, **end.fields)
            self.cond.notify_all()
        self.on_change()

    def _gpus_healthy(self, slots: list[Slot]) -> bool | None:
        """After a failure: does NVML still see every slot's GPU as healthy? (None: no GPU / not known)"""
        if any(is_cpu_slot(s.index) for s in slots) or self.probe is None:
            return None
        try:
            gpus = {g.index: g for g in self.probe.list_gpus()}
        except Exception:
            return None
        return all(gpus[s.index].healthy if s.index in gpus else False for s in slots)

    def _infra_failure(self, job: LiveJob, slots: list[Slot], error: str, devices_failed: bool = True) -> None:
        """The machine failed, not the job: mark its slots unhealthy (`devices_failed`; a W-slot job's error does
        not say which rank's device failed, so all of them; not for a lost rank, agentd.failures) and re-queue
        the job first (from its last checkpoint) while retries are left; otherwise fail it as an
        infrastructure failure."""
        if self.base_cache is not None and devices_failed:
            self.base_cache.clear()  # the base lived on the failed device
        where = _slot_names(slots)
        with self.cond:
            for slot in slots:
                self.busy.pop(slot.index, None)
                if devices_failed:
                    slot.unhealthy_reason = f"infrastructure failure in {job.id}: {error.splitlines()[0][:300]}"
            self.runners.pop(job.id, None)
            if job.stop.is_set() and job.stop_reason == "cancel":  # a cancel came meanwhile: honour it
                self._finish(job, "cancelled", error)
            elif job.attempt > self.max_infra_retries:
                self._finish(job, "failed", f"infrastructure failure on {where}; {self.max_infra_retries} "
                             f"infrastructure retries exhausted: {error}", infra=True)
            else:
                self.counters["infra_retries"] += 1
                job.infra_retries.append({"attempt": job.attempt, "slot": where, "error": error,
                                          "at": time.time()})
                part = _rendezvous(job.record.get("rendezvous"))
                # A multi-box part on another box resumes from the first box's checkpoint (rank 0 broadcasts it).
                elsewhere = part is not None and part.node_rank > 0
                from_step = None if elsewhere else _last_checkpoint_step(job.record.get("output_dir"))
                job.attempt += 1
                job.first, job.slots, job.gated_since = True, [], None
                job.enqueued = time.monotonic()
                self.journal.transition(job.id, "queued", f"infrastructure retry {job.attempt - 1}/"
                                        f"{self.max_infra_retries} after: {error}", requeue_first=1,
                                        infra_retries=len(job.infra_retries), **_progress_fields(job))
                job.record["state"] = "queued"
                self.order.append(job.id)
                self.publish(job, InfraRetry(attempt=job.attempt - 1, max_retries=self.max_infra_retries,
                                             slot=where, error=error, from_step=from_step,
                                             slot_unhealthy=devices_failed, checkpoint_on_first_box=elsewhere))
            self.cond.notify_all()
        self.on_change()

    def _finish(self, job: LiveJob, outcome: str, error: str | None, infra: bool = False,
                detail: str | None = None, **fields) -> None:
        """`detail`: the transition's note when it is not an error (a "nothing to do" success)."""
        fields = {**_progress_fields(job), **{k: v for k, v in fields.items() if v is not None}}
        self.journal.transition(job.id, outcome, detail or error, error=error, **fields)
        job.record = self.journal.get(job.id)
        self.counters["jobs_finished"][outcome] = self.counters["jobs_finished"].get(outcome, 0) + 1
        ev = event("finished", outcome=outcome, error=error, output_dir=job.record["output_dir"],
                   final_loss=job.record.get("loss"), step=job.record.get("step"),
                   artifacts=job.record.get("artifacts") or [], infra=infra)
        self.publish(job, ev)
        self._close_subscribers(job)
        self.live.pop(job.id, None)

    # --- status -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Running, queued (in run order) and paused jobs as `agentd.status_model` objects, and counters."""
        now = time.monotonic()
        with self.cond:
            running, queued, paused = [], [], []
            for job_id in dict.fromkeys(self.busy.values()):  # a W-slot job once, across its slots
                job = self.live[job_id]
                p, rec = job.progress, job.record
                running.append(RunningJob(
                    **_job_view(rec), slot=_slot_names(job.slots) if job.slots else None, device_uuid=job.device_uuid,
                    step=p.get("step"), total_steps=p.get("total_steps"), loss=p.get("loss"),
                    loss_mean=p.get("loss_mean"), lr=p.get("lr"), it_s=p.get("it_s"), eta_s=p.get("eta_s"),
                    epoch=p.get("epoch"), priority=job.priority, attempt=job.attempt, started=rec.get("started"),
                    part=_rendezvous(rec.get("rendezvous")).part(job.world) if rec.get("rendezvous") else None,
                    stopping=job.stop_reason if (job.stop.is_set() or job.pause.is_set()) else None))
            for pos, job_id in enumerate(self._run_order(), start=1):
                job = self.live[job_id]
                queued.append(QueuedJob(**_job_view(job.record), position=self._running_count() + pos,
                                        state=job.record["state"], priority=job.priority,
                                        waited_s=round(now - job.enqueued, 1),
                                        device=_str_or_none((job.record.get("resolved") or {}).get("device")),
                                        created=job.record.get("created")))
            for job in self.live.values():
                if job.record["state"] == "paused":
                    paused.append(PausedJob(id=job.id, name=job.record.get("name"),
                                            config=job.record.get("config_path"),
                                            step=job.progress.get("step", job.record.get("step")),
                                            total_steps=job.progress.get("total_steps", job.record.get("total_steps")),
                                            priority=job.priority,
                                            paused_at=job.record.get("paused_at"),
                                            submitter=Submitter.of(job.record),
                                            build_url=(job.record.get("env") or {}).get("BUILD_URL")))
            return {"running": running, "queue": queued, "paused": paused, "draining": self.draining,
                    "busy_slots": {k: v for k, v in self.busy.items()},
                    "counters": Counters(jobs_finished=dict(self.counters["jobs_finished"]),
                                         gate_waits=self.counters["gate_waits"],
                                         infra_retries=self.counters["infra_retries"])}

    def idle(self) -> bool:
        with self.cond:
            return not self.busy and not self.order


def _rendezvous(fields: dict | None) -> api.Rendezvous | None:
    """A submit's rendezvous fields ({nodes, node_rank, rdzv_endpoint}, as journaled) as the trainer's value;
    SubmitRefused("bad_request") saying which is wrong or missing."""
    if not fields:
        return None
    missing = ["--" + k.replace("_", "-") for k in ("nodes", "node_rank", "rdzv_endpoint") if fields.get(k) is None]
    if missing:
        raise SubmitRefused("bad_request", "a job over several boxes needs --nodes, --node-rank and --rdzv-endpoint "
                                           f"together; missing: {', '.join(missing)}")
    try:
        return api.Rendezvous.parse(fields["nodes"], fields["node_rank"], fields["rdzv_endpoint"])
    except ValueError as e:
        raise SubmitRefused("bad_request", str(e)) from None


def _job_view(rec: dict) -> dict:
    """The fields running and queued jobs share (`agentd.status_model`)."""
    env = rec.get("env") or {}
    return {"id": rec["id"], "name": rec.get("name"), "config": rec.get("config_path"),
            "output_dir": rec.get("output_dir"), "submitter": Submitter.of(rec),
            "build_url": env.get("BUILD_URL"), "estimate_mib": rec.get("estimate_mib")}


def _slot_names(slots: list[Slot]) -> str:
    """How status and the journal name a job's slots: "cuda:0" or, across several, "cuda:0+cuda:1"."""
    return "+".join(s.name for s in slots)


def _str_or_none(v) -> str | None:
    return None if v is None else str(v)


def _last_checkpoint_step(output_dir: str | None) -> int | None:
    """The newest checkpoint's step in a job's output folder (what a retry resumes from), if any."""
    for p in api.list_checkpoints(output_dir) if output_dir else []:
        try:
            return int(p.name.split("-", 1)[1])
        except ValueError:
            continue
    return None


def _parse_fault(value: str | None) -> tuple[int, int] | None:
    """AGENTD_INJECT_INFRA_FAULT=STEP[:ATTEMPTS] -> (STEP, ATTEMPTS); None when unset or malformed."""
    if not value:
        return None
    try:
        step, _, attempts = value.partition(":")
        return int(step), int(attempts or 1)
    except ValueError:
        log.error("ignoring %s=%r: expected STEP or STEP:ATTEMPTS (integers)", INJECT_ENV, value)
        return None


def _progress_fields(job: LiveJob) -> dict:
    p = job.progress
    out = {}
    if p.get("step") is not None:
        out["step"] = p["step"]
    if p.get("total_steps") is not None:
        out["total_steps"] = p["total_steps"]
    if p.get("loss") is not None:
        out["loss"] = p["loss"]
    return out
