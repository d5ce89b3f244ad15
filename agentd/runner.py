"""Jobs through the trainer's door (`trainer.api`): admitted at submit, run in their slot.

The scheduler keeps the queue, the slots, the gate, the state machine and the subscribers; the runner
does what needs the trainer:

- admission: `parse` a config once per job (at submit, or when a restarted daemon recovers the job:
  `recover`), `check` it for its submitter (every problem, the dataset scan, and the submitter's access
  check, `agentd.access`, on the paths before the scan and on the scanned files after it), and `plan` it:
  the VRAM estimate the gate needs, and the run decision (a finished, unchanged config needs no GPU; a
  `resume: strict` refusal is refused at submit);
- the run: `run` checks the job again as it starts (files may have changed since the submit) and trains
  it in its slot with its stop and pause flags and its event channel. The answer is a `RunEnd` for the
  state machine; a config problem or out-of-memory (with its advice) ends as "failed" here, and any other
  failure is raised to the scheduler, which asks whether the machine failed (`agentd.failures`).
"""
from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from trainer import api
from trainer.config import TrainConfig, parse_config
from trainer.errors import ConfigError, OutOfMemory, RendezvousFailed

log = logging.getLogger("agentd.runner")


@dataclass
class Plan:
    """What the daemon knows of a checked job before it queues it."""

    estimate: api.VramEstimate | None  # None: a CPU-only daemon, or the model's configs could not be read
    decision: api.RunDecision | None  # None: not decidable now (the job decides again as it starts)
    previous: api.PreviousRun | None


@dataclass
class RunEnd:
    """How a job's run in its slot ended: outcome succeeded | failed | cancelled | interrupted | paused."""

    outcome: str
    error: str | None = None  # failed: why; cancelled, interrupted, paused: where it stopped
    fields: dict = field(default_factory=dict)  # succeeded: what the journal records (artifacts, peak...)
    infra: bool = False  # failed through no fault of the job and not retried here (`agentd run` exits 5)


class Runner:
    def __init__(self, *, base_cache: api.BaseModelCache | None = None, estimator=None, authorize=None,
                 releaser=None, resolve_release=None):
        self.base_cache = base_cache
        # `compare_with: production` of an evaluation (api.ResolveRelease): resolve_release(name) -> (the released
        # LoRA's local path, "NAME@vN") or None (agentd.release.service.Releases.resolve; None on a daemon
        # without releases)
        self.resolve_release = resolve_release
        # the daemon's release after success (`release:` of a config): releaser(cfg, submitter) -> Released events
        self.releaser = releaser
        self.estimator = estimator  # callable(checked, device_batch) -> VramEstimate, or None on a CPU-only daemon
        # agentd.access.authorizer's check; the default (tests, no daemon) lets everything through
        self.authorize = authorize or (lambda cfg, checked, submitter, source=None: None)

    # --- admission --------------------------------------------------------------------------------
    def parse(self, config_text: str, config_path: str) -> TrainConfig:
        """The job's config, parsed once per job (relative paths against the config file's folder)."""
        return parse_config(config_text, base_dir=Path(config_path).parent, source=config_path)

    def check(self, cfg: TrainConfig, config_path: str, submitter: dict | None) -> api.Checked:
        """Every problem of `cfg` (ConfigError), within what `submitter` may read and write."""
        return api.check_for_submitter(
            cfg, config_path, lambda c, checked: self.authorize(c, checked, submitter, config_path))

    def plan(self, checked: api.Checked, device_batch: int | None = None) -> Plan:
        """The estimate and the run decision; raises ConfigError for a `resume: strict` refusal and for
        `compare_with: production` without a production release (known now: refused at submit, like "nothing
        to do" is answered, instead of after the wait in the queue). `device_batch`: see `estimate`."""
        estimate = self.estimate(checked, device_batch)
        try:
            decision, previous = api.run_decision(checked, self.resolve_release)
        except ConfigError:
            raise
        except Exception as e:  # the job decides again as it starts, and reports what is wrong there
            log.warning("submit: run decision for %s deferred to the job: %s", checked.config.output_dir, e)
            decision = previous = None
        return Plan(estimate, decision, previous)

    def recover(self, rec: dict, device_batch: int | None = None
                ) -> tuple[TrainConfig | None, Exception | None, api.VramEstimate | None]:
        """A recovered job's config (parsed once), or the error it fails with when it runs; and its
        estimate, from the config alone (its dataset is scanned when it runs)."""
        try:
            cfg = self.parse(rec["config_text"], rec["config_path"])
        except Exception as e:
            return None, e, None
        return cfg, None, self.estimate(api.Checked(cfg, scan=None, source=rec["config_path"]), device_batch)

    def estimate(self, checked: api.Checked, device_batch: int | None = None) -> api.VramEstimate | None:
        """The job's VRAM estimate (None on a CPU-only daemon, or when the model's configs cannot be read:
        then the gate starts it on the best free GPU and the out-of-memory handling is the safety net).
        `device_batch`: what one device trains of each micro-batch when the job spreads over several (the plan's
        per-rank batch, over every box of a multi-box job); None: the config decides."""
        if self.estimator is None:
            return None
        try:
            return self.estimator(checked, device_batch)
        except Exception as e:
            log.warning("no VRAM estimate for %s: %s", checked.source, e)
            return None

    # --- the run ----------------------------------------------------------------------------------
    def run(self, job, slots, channel, history: list[str]) -> RunEnd:
        """Train `job` (a scheduler LiveJob) in its reserved `slots` (one per rank), its events going to
        `channel`. `history`: the journal's states of the job so far (the last one is this run's "running")."""
        slot = slots[0]
        api.preload_all()  # waits for the daemon's background preload: no two threads import the stack at once
        rec = job.record
        was_interrupted = "interrupted" in history or "paused" in history or bool(job.infra_retries)
        try:
            if job.config is None:
                raise job.config_error
            cfg = job.config
            # An interrupted job continues from its own checkpoints even when its config said `resume: never`
            # (that asked for a fresh start of the job, not of every restart of it).
            if was_interrupted and cfg.resume == "never":
                cfg = cfg.model_copy(update={"resume": "auto"})
            checked = self.check(cfg, rec["config_path"], rec.get("submitter"))
            if rec.get("evaluate"):  # agentd eval: the finished run's evaluation, in this slot
                request = rec["evaluate"]
                decision = api.evaluate_run(request["run"], channel, against=request.get("against"),
                                            device=slot.device, base_cache=self.base_cache,
                                            resolve_release=self.resolve_release)
                log.info("job %s: evaluation of %s: %s", job.id, request["run"], decision["reason"])
                return RunEnd("succeeded", fields={"artifacts": [str(Path(request["run"]) / "eval" / "decision.json")]})
            rendezvous = rec.get("rendezvous")  # this box's part of a job over several boxes (agentd run --nodes)
            if rendezvous:
                rendezvous = api.Rendezvous.parse(rendezvous["nodes"], rendezvous["node_rank"],
                                                  rendezvous["rdzv_endpoint"])
            result = api.run_job(
                checked, channel, job.stop, device=slot.device, pause=job.pause, base_cache=self.base_cache,
                devices=tuple(s.device for s in slots) if len(slots) > 1 or rendezvous else None,
                rendezvous=rendezvous or None,
                env=rec.get("env") or {}, infra_retries=job.infra_retries,
                resume_reason=_resume_reason(history, job) if was_interrupted else "resume: auto",
                where="+".join(s.name for s in slots), estimate_mib=rec.get("estimate_mib"), sweep=rec.get("sweep"),
                resolve_release=self.resolve_release)
        except ConfigError as e:
            return RunEnd("failed", e.render())
        except OutOfMemory as e:
            log.error("job %s failed: %s\n%s", job.id, e, traceback.format_exc())
            return RunEnd("failed", str(e))
        except RendezvousFailed as e:  # not this box's fault, and a retry here would not bring the other boxes
            log.error("job %s: %s", job.id, e)
            return RunEnd("failed", str(e), infra=True)
        if result.outcome == "paused":
            return RunEnd("paused", f"paused at step {result.steps}")
        if result.outcome == "cancelled":
            return RunEnd("interrupted" if job.stop_reason == "shutdown" else "cancelled",
                          f"{job.stop_note or 'stopped'} at step {result.steps}")
        if cfg.release is not None and self.releaser is not None and (not rendezvous or rendezvous.node_rank == 0):
            for ev in self.releaser(cfg, rec.get("submitter")):
                channel.emit(ev)
        return RunEnd("succeeded", fields={"artifacts": result.artifacts, "peak_mib": result.peak_memory_mib,
                                           "step": result.steps, "loss": result.final_loss})


def _resume_reason(history: list[str], job) -> str:
    if job.infra_retries:
        last = job.infra_retries[-1]
        return (f"infrastructure retry {len(job.infra_retries)} after a failure on {last['slot']}: "
                f"{last['error'].splitlines()[0][:200]}")
    # history ends with this run's "running"; before it: paused -> queued when `agentd resume` queued it.
    if history[-3:-1] == ["paused", "queued"]:
        return "resumed after a pause (agentd resume)"
    return "daemon restarted after an interruption"
