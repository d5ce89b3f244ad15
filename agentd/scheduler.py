"""The scheduler: a FIFO queue, one job per slot, the VRAM gate, and jobs run in-process.

Threads: one dispatcher places the head of the queue (the gate decides where and whether); each
placed job runs in its own runner thread, calling the trainer library (`LoraTrainingJob.run`).
Every state change goes to the journal first, then to the job's subscribers (`agentd run`,
`agentd logs --follow`).

Interruptions: `cancel` sets the job's stop flag (it checkpoints at the next step boundary and ends
cancelled); `shutdown` sets every running job's stop flag with reason "shutdown", so they end
*interrupted* and are queued again, first, when the daemon starts next. A daemon that died without
a shutdown leaves jobs "running" in the journal; `Journal.recover_after_start` re-queues them.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from agentd.gate import CPU_SLOT, gate_decision
from agentd.journal import FINAL, Journal
from trainer.events import event

log = logging.getLogger("agentd.scheduler")


@dataclass
class Slot:
    index: int  # NVML index, or CPU_SLOT
    device: str  # torch device string
    label: str | None = None  # shown in status; default: the device

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
    stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: str | None = None  # "cancel" | "shutdown"
    seq: int = 0
    subscribers: list = field(default_factory=list)
    progress: dict = field(default_factory=dict)
    slot: Slot | None = None
    estimate: object = None  # trainer.vram.VramEstimate (GPU slots only)
    gated_since: float | None = None
    last_gate_note: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


class JobChannel:
    """The reporter a running job emits through: journal first, then subscribers."""

    def __init__(self, scheduler: "Scheduler", job: LiveJob):
        self.s, self.job = scheduler, job

    def emit(self, ev: dict) -> None:
        job = self.job
        if ev.get("type") == "finished":
            return  # the scheduler emits the job's end itself, with the journal's outcome
        if ev.get("type") == "step":
            job.progress = {k: ev.get(k) for k in ("step", "total", "epoch", "loss", "loss_mean", "lr", "it_s",
                                                   "eta_s")}
            if not ev.get("logged"):
                return
            self.s.journal.update(job.id, step=ev["step"], total_steps=ev["total"], loss=ev["loss"])
        if ev.get("type") == "started":
            job.progress.update(total=ev.get("total_steps"), step=ev.get("resumed_from") or 0)
        self.s.publish(job, ev)


class Scheduler:
    def __init__(self, journal: Journal, slots: list[Slot], *, base_cache=None, probe=None, estimator=None,
                 vram_margin_mib: int = 1024, gate_timeout_s: float = 3600, gate_poll_s: float = 2.0,
                 max_foreign_vram_mib: int | None = None, on_change=None):
        self.journal = journal
        self.slots = slots
        self.base_cache = base_cache
        self.probe = probe
        self.estimator = estimator  # callable(checked) -> (estimate_mib, shape_key) or None
        self.margin = vram_margin_mib
        self.gate_timeout_s = gate_timeout_s
        self.gate_poll_s = gate_poll_s
        self.max_foreign = max_foreign_vram_mib
        self.on_change = on_change or (lambda: None)
        self.authorize = lambda cfg, checked, submitter, source=None: None  # the daemon sets agentd.access's
        self.live: dict[str, LiveJob] = {}
        self.order: list[str] = []  # queued/gated job ids, head first
        self.busy: dict[int, str] = {}  # slot index -> job id
        self.runners: dict[str, threading.Thread] = {}
        self.draining = False
        self.stopping = False
        self.cond = threading.Condition()
        self.counters = {"jobs_finished": {"succeeded": 0, "failed": 0, "cancelled": 0}, "gate_waits": 0}
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> list[str]:
        """Load the journal's unfinished jobs (interrupted ones first) and start dispatching."""
        recovered = self.journal.recover_after_start()
        for rec in self.journal.jobs(("interrupted", "queued")):
            job = LiveJob(rec["id"], rec, seq=self.journal.last_event_seq(rec["id"]), estimate=self._reestimate(rec))
            self.live[job.id] = job
            self.order.append(job.id)
        self._dispatcher.start()
        return recovered

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
                if job_id in self.order:  # queued stays queued; wake its followers so they re-attach later
                    self._close_subscribers(job)
                elif job.slot is not None and job_id in self.busy.values():
                    # Did not reach a step boundary in time: journal says interrupted, resumes next start.
                    self.journal.transition(job_id, "interrupted", "stop timeout; resumes from last checkpoint",
                                            requeue_first=1)
                    self._close_subscribers(job)

    # --- requests ---------------------------------------------------------------------------------
    def submit(self, *, config_path: str, config_text: str, env: dict, submitter: dict) -> tuple[str, bool]:
        """Queue a job, or return the active job that already trains into the same output folder."""
        from trainer.config import parse_config
        from trainer.errors import ConfigError
        from trainer.preflight import check_config

        try:
            cfg = parse_config(config_text, base_dir=Path(config_path).parent, source=config_path)
            # The submitter's own rights bound what the daemon reads and writes for them (agentd.access):
            # the paths first, so the dataset scan never opens a file they may not read.
            self.authorize(cfg, None, submitter, config_path)
            checked = check_config(cfg, source=config_path)
            self.authorize(cfg, checked, submitter, config_path)
        except ConfigError as e:
            raise SubmitRefused("invalid_config", e.render(), e.to_dict()) from None
        # Outside the lock: the first estimate imports diffusers, and status must not wait for that.
        estimate = self._estimate(checked)
        with self.cond:
            for job in self.live.values():
                if job.record["output_dir"] == str(cfg.output_dir) and job.record["state"] not in FINAL:
                    return job.id, True
            if self.draining or self.stopping:
                raise SubmitRefused("draining", "agentd is draining: it takes no new jobs "
                                    "(`agentd undrain` to reopen)")
            job_id = self.journal.create(config_path=config_path, config_text=config_text,
                                         config_hash=cfg.full_hash(), resolved=cfg.resolved(),
                                         output_dir=str(cfg.output_dir), name=cfg.run_name, submitter=submitter,
                                         env=env, shape_key=estimate.key if estimate else None,
                                         estimate_mib=estimate.total_mib if estimate else None)
            job = LiveJob(job_id, self.journal.get(job_id), estimate=estimate)
            self.live[job_id] = job
            self.order.append(job_id)
            # Position in line: the jobs running now count as ahead of it, so the first job is 1.
            ahead = len(self.busy) + len(self.order) - 1
            self.publish(job, event("queued", job_id=job_id, position=ahead + 1, ahead=ahead))
            self.cond.notify_all()
        self.on_change()
        return job_id, False

    def cancel(self, job_id: str) -> str:
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
            job.stop_reason = "cancel"
            job.stop.set()
            return "cancelling"

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
    def publish(self, job: LiveJob, ev: dict) -> None:
        """Journal the event, send it to the job's followers, and log it as one line (journald's copy).
        Step events arrive here only every `log_every` steps, so the log never floods."""
        from trainer.events import format_event

        with job.lock:
            job.seq += 1
            ev = {**ev, "seq": job.seq, "job_id": job.id}
            line = format_event(ev)
            if line:
                log.log(logging.WARNING if ev["type"] == "warning" else logging.INFO, "%s: %s", job.id, line)
            self.journal.add_event(job.id, job.seq, ev)
            for q in job.subscribers:
                q.put(ev)

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
                        self._finish(self.live[self.order.pop(0)], "failed", f"internal error while scheduling: {e}")
                self.cond.wait(timeout=self.gate_poll_s)

    def _place_head(self) -> None:
        """Start the head of the queue if the gate lets it (strict FIFO: the head waits, others wait too)."""
        while self.order and not self.stopping and not self.draining:
            job = self.live[self.order[0]]
            decision = self._decide(job)
            if decision is None:
                return
            if decision.outcome == "start":
                self.order.pop(0)
                slot = next(s for s in self.slots if s.index == decision.slot)
                self._launch(job, slot, decision.reason if decision.slot != CPU_SLOT else None)
                continue
            if decision.outcome in ("never_fits", "unavailable"):
                self.order.pop(0)
                self._finish(job, "failed", self._advice(job, decision))
                continue
            if not self.busy and self.base_cache is not None and self.base_cache.keys():
                # Our own warm base model may be what holds the memory: drop it and decide again.
                log.info("evicting the warm model cache to make room for %s", job.id)
                self.base_cache.clear()
                _free_cuda()
                continue
            self._note_wait(job, decision)
            return

    def _decide(self, job: LiveJob):
        """The gate's decision for `job`, or None when every slot is busy (nothing to say)."""
        free_slots = [s for s in self.slots if s.index not in self.busy]
        if not free_slots:
            return None
        gpus = [g for g in (self.probe.list_gpus() if self.probe else []) if g.index in {s.index for s in self.slots}]
        if not gpus and any(s.index != CPU_SLOT for s in self.slots):
            # A GPU slot whose GPU vanished from the probe: report it unhealthy through the gate.
            from agentd.gpu import GpuFacts

            gpus = [GpuFacts(index=s.index, uuid=None, name=None, memory_total_mib=None, memory_used_mib=None,
                             memory_free_mib=None, utilization_pct=None, temperature_c=None, cuda_version=None,
                             processes=None, healthy=False, error=f"GPU {s.index}: not found by the probe")
                    for s in self.slots if s.index != CPU_SLOT]
        estimate = job.record.get("estimate_mib") or 0
        return gate_decision(int(estimate), gpus, set(self.busy), self.margin, self.max_foreign, {os.getpid()})

    def _reestimate(self, rec: dict):
        if self.estimator is None:
            return None
        from trainer.config import parse_config
        from trainer.preflight import Checked

        try:
            cfg = parse_config(rec["config_text"], base_dir=Path(rec["config_path"]).parent, source=rec["config_path"])
        except Exception:
            return None  # the job fails with the config error when it runs
        return self._estimate(Checked(cfg, scan=None, source=rec["config_path"]))

    def _estimate(self, checked):
        """The job's VRAM estimate (None on a CPU-only daemon, or when the model's configs cannot be read:
        then the gate starts it on the best free GPU and the out-of-memory handling is the safety net)."""
        if self.estimator is None:
            return None
        try:
            return self.estimator(checked)
        except Exception as e:
            log.warning("no VRAM estimate for %s: %s", checked.source, e)
            return None

    def _advice(self, job: LiveJob, decision) -> str:
        """The never-fits failure, with the batch size (and accumulation) that would fit the largest GPU."""
        from trainer.vram import recommend_batch_size

        text = decision.reason
        cfg = job.record.get("resolved") or {}
        if decision.outcome == "never_fits" and job.estimate is not None and decision.largest_total_mib:
            batch, accum = cfg.get("batch_size", 1), cfg.get("gradient_accumulation_steps", 1)
            fit = recommend_batch_size(job.estimate, decision.largest_total_mib, self.margin, batch, accum)
            if fit:
                text += (f"; recommended: batch_size {fit[0]} with gradient_accumulation_steps {fit[1]} "
                         f"(same effective batch {batch * accum})")
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
            self.publish(job, event("gated", reason=decision.reason, per_gpu=list(decision.per_gpu)))

    def _launch(self, job: LiveJob, slot: Slot, gate_note: str | None) -> None:
        job.slot = slot
        self.busy[slot.index] = job.id
        detail = f"on {slot.name}" + (f" ({gate_note})" if gate_note else "")
        self.journal.transition(job.id, "running", detail, slot=slot.name, requeue_first=0)
        job.record["state"] = "running"
        self.publish(job, event("state", state="running", detail=detail))
        t = threading.Thread(target=self._run, args=(job, slot), name=f"job-{job.id}", daemon=True)
        self.runners[job.id] = t
        t.start()
        self.on_change()

    # --- running ----------------------------------------------------------------------------------
    def _run(self, job: LiveJob, slot: Slot) -> None:
        from trainer.config import parse_config
        from trainer.errors import ConfigError
        from trainer.job import LoraTrainingJob
        from trainer.preflight import check_config

        rec = job.record
        outcome, error, extra = "failed", None, {}
        try:
            was_interrupted = any(t["state"] == "interrupted" for t in self.journal.transitions(job.id))
            # An interrupted job continues from its own checkpoints even when its config said `resume: never`
            # (that asked for a fresh start of the job, not of every restart of it).
            cfg = parse_config(rec["config_text"], base_dir=Path(rec["config_path"]).parent, source=rec["config_path"])
            if was_interrupted and cfg.resume == "never":
                cfg = cfg.model_copy(update={"resume": "auto"})
            checked = check_config(cfg, source=rec["config_path"])
            trainer_job = LoraTrainingJob(
                checked, JobChannel(self, job), job.stop, base_cache=self.base_cache, env=rec.get("env") or {},
                device=slot.device,
                resume_reason="daemon restarted after an interruption" if was_interrupted else "resume: auto")
            result = trainer_job.run()
            if result.outcome == "cancelled":
                outcome = "interrupted" if job.stop_reason == "shutdown" else "cancelled"
                error = f"stopped at step {result.steps}"
            else:
                outcome = "succeeded"
                extra = {"artifacts": result.artifacts, "peak_mib": result.peak_memory_mib, "step": result.steps,
                         "loss": result.final_loss}
        except ConfigError as e:
            error = e.render()
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if _is_oom(e):
                error = self._oom_message(job, e)
                if self.base_cache is not None:
                    self.base_cache.clear()
                _free_cuda()
            log.error("job %s failed: %s\n%s", job.id, error, traceback.format_exc())
        with self.cond:
            self.busy.pop(slot.index, None)
            self.runners.pop(job.id, None)
            if outcome == "interrupted":
                self.journal.transition(job.id, "interrupted", "daemon stopping; resumes from the checkpoint",
                                        requeue_first=1, **_progress_fields(job))
                self.publish(job, event("state", state="interrupted",
                                        detail="daemon stopping; the job resumes when it starts again"))
                self._close_subscribers(job)
            else:
                self._finish(job, outcome, error, **extra)
            self.cond.notify_all()
        self.on_change()

    def _finish(self, job: LiveJob, outcome: str, error: str | None, **fields) -> None:
        fields = {**_progress_fields(job), **{k: v for k, v in fields.items() if v is not None}}
        self.journal.transition(job.id, outcome, error, error=error, **fields)
        job.record = self.journal.get(job.id)
        self.counters["jobs_finished"][outcome] = self.counters["jobs_finished"].get(outcome, 0) + 1
        ev = event("finished", outcome=outcome, error=error, output_dir=job.record["output_dir"],
                   final_loss=job.record.get("loss"), step=job.record.get("step"),
                   artifacts=job.record.get("artifacts") or [])
        self.publish(job, ev)
        self._close_subscribers(job)
        self.live.pop(job.id, None)

    def _oom_message(self, job: LiveJob, e: Exception) -> str:
        est = job.record.get("estimate_mib")
        peak = None
        try:
            import torch

            if torch.cuda.is_available():
                peak = round(torch.cuda.max_memory_allocated() / 2**20)
        except Exception:
            pass
        where = job.slot.name if job.slot else "the device"
        return (f"out of memory on {where} ({type(e).__name__}); estimate {est} MiB, measured peak {peak} MiB; "
                "the last checkpoint is kept; lower batch_size (raise gradient_accumulation_steps to keep the "
                "effective batch), enable gradient_checkpointing or mixed_precision; `agentd validate` "
                "recommends a batch size")

    # --- status -----------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        with self.cond:
            running, queued = [], []
            for job_id in self.busy.values():
                job = self.live[job_id]
                running.append(_job_view(job.record) | {
                    "slot": job.slot.name if job.slot else None, **{k: job.progress.get(k) for k in (
                        "step", "loss", "loss_mean", "lr", "it_s", "eta_s", "epoch")},
                    "total_steps": job.progress.get("total"), "stopping": job.stop.is_set()})
            for pos, job_id in enumerate(self.order, start=1):
                job = self.live[job_id]
                queued.append(_job_view(job.record) | {"position": pos, "state": job.record["state"]})
            return {"running": running, "queue": queued, "draining": self.draining,
                    "busy_slots": {str(k): v for k, v in self.busy.items()},
                    "counters": {"jobs_finished": dict(self.counters["jobs_finished"]),
                                 "gate_waits": self.counters["gate_waits"]}}

    def idle(self) -> bool:
        with self.cond:
            return not self.busy and not self.order


def _job_view(rec: dict) -> dict:
    env = rec.get("env") or {}
    sub = rec.get("submitter") or {}
    return {"id": rec["id"], "name": rec.get("name"), "config": rec.get("config_path"),
            "output_dir": rec.get("output_dir"), "submitted": rec.get("created"), "started": rec.get("started"),
            "submitter": {"uid": sub.get("uid"), "pid": sub.get("pid"), "user": sub.get("user")},
            "build_url": env.get("BUILD_URL"), "estimate_mib": rec.get("estimate_mib")}


def _progress_fields(job: LiveJob) -> dict:
    p = job.progress
    out = {}
    if p.get("step") is not None:
        out["step"] = p["step"]
    if p.get("total") is not None:
        out["total_steps"] = p["total"]
    if p.get("loss") is not None:
        out["loss"] = p["loss"]
    return out


def _is_oom(e: Exception) -> bool:
    try:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _free_cuda() -> None:
    try:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
