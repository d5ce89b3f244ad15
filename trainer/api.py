"""The one door into the trainer: everything the daemon (`agentd`) and `lora-train` call.

Besides this module they import only the shared vocabulary: `trainer.config` (the training config),
`trainer.errors` (problems, typed errors, exit codes), `trainer.events` (typed job events),
`trainer.yaml_schema` (reading YAML into a schema), `trainer.gpus` (GPU facts and the NVML probe) and
`trainer.console` (the job console: plain lines or a live display).

- Checking a config: `preflight` (a config file), `check_for_submitter` (a parsed config, with the
  submitter's access check before and after the dataset scan), `run_decision` (which run it would be).
- Running a job: `run_job` in a slot, with stop and pause flags and an event reporter, returning the
  typed `JobResult` (out-of-memory becomes `OutOfMemory` carrying its advice), as one box's part of a job
  over several (`Rendezvous`: `--nodes`, `--node-rank`, `--rdzv-endpoint`); `preload_all` (the
  training stack, imported once); `BaseModelCache` (the warm base models kept between jobs);
  `cuda_reserved_mib` (what this process's CUDA holds per GPU, for the gate and status).
- Planning memory: `estimate_for_config`, `calibrated` (by a measured peak), `recommend_batch_size`.
- Run folders: `list_checkpoints`, `compare_runs`, `write_report`, `is_run_folder`, `newest_previous`,
  `jenkins_vars` (the CI variables a run records); `atomic_write_text`/`atomic_write_json`, the trainer's
  crash-safe file writes, which the daemon uses for its own files too (one implementation).
- The console: `quiet_third_party` (the libraries' import noise filtered, `trainer.quiet`; the CLIs call
  it before anything loads).
- Commands: `validate_main` (`agentd validate` and `lora-train validate`), `import_kohya`,
  `is_inline_template` (whether a config's chat_template is a file the daemon must check access to).

Importing this module imports no torch, so `agentd run`, `validate` and `compare` answer fast: the
modules that need torch (the training loop, checkpoints) are imported by the functions that use them.
"""
from __future__ import annotations

import dataclasses
import gc
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from trainer.checks.devices import (DevicesError, Rendezvous, WorldPlan, add_rendezvous_args, plan_world,
                                    rendezvous_from_args)
from trainer.checks.preflight import Checked, check_config, preflight
from trainer.checks.validate_report import main as validate_main
from trainer.checks.vram import VramEstimate, calibrated, estimate_for_config, recommend_batch_size
from trainer.config import TrainConfig
from trainer.data.kohya_import import import_kohya
from trainer.data.text import is_inline_template
from trainer.eval.ab_page import votes_summary, write_ab_page
from trainer.errors import ConfigError, OutOfMemory
from trainer.events import Reporter
from trainer.quiet import quiet_third_party
from trainer.runs.history import PreviousRun, RunDecision, decide_for, is_run_folder, newest_previous, refusal
from trainer.runs.outputs import atomic_write_json, atomic_write_text, fsync_dir, jenkins_vars
from trainer.runs.report import compare_runs, write_report
from trainer.training.model_cache import BaseModelCache
from trainer.training.preload import preload_all

if TYPE_CHECKING:
    import threading

    from trainer.training.job import JobResult

__all__ = [
    "Authorize", "BaseModelCache", "ResolveRelease", "Checked", "OutOfMemory", "PreviousRun", "Rendezvous",
    "RunDecision", "VramEstimate", "WorldPlan", "add_rendezvous_args", "rendezvous_from_args", "atomic_write_json", "atomic_write_text", "calibrated",
    "check_for_submitter",
    "compare_runs", "cuda_reserved_mib", "fsync_dir", "estimate_for_config", "import_kohya", "is_inline_template", "is_run_folder",
    "jenkins_vars", "list_checkpoints", "newest_previous", "plan_here", "preflight", "preload_all",
    "quiet_third_party",
    "recommend_batch_size", "evaluate_run", "run_decision", "run_job", "validate_main", "votes_summary",
    "write_ab_page", "write_report",
]

# The daemon's access check (agentd.access): raises ConfigError naming what the submitter may not use.
# Called with checked=None on the config's paths, then with the scanned dataset.
Authorize = Callable[[TrainConfig, Optional[Checked]], None]
# `eval.compare_with: production`: the release NAME's production LoRA as a local path and its "NAME@vN" (for
# decision.json's against.release), or None when there is none yet (agentd's release registry: the trainer
# never reads box settings, and only the registry knows how its versions are named).
ResolveRelease = Callable[[str], Optional[tuple[Path, str]]]


def check_for_submitter(cfg: TrainConfig, source: str, authorize: Authorize | None = None) -> Checked:
    """Every problem of `cfg` (one ConfigError), or the checked config with its dataset scan.

    `authorize` bounds what the trainer reads for the submitter: it runs on the paths first, so the
    scan never opens a file they may not read, and again on the files the scan found."""
    if authorize is not None:
        authorize(cfg, None)
    checked = check_config(cfg, source=source)
    if authorize is not None:
        authorize(cfg, checked)
    return checked


def run_decision(checked: Checked, resolve_release: ResolveRelease | None = None
                 ) -> tuple[RunDecision, PreviousRun | None]:
    """Which run of its output folder `checked` would be (new, resume, or nothing to do), read-only:
    a finished, unchanged config is answered "nothing to do" without a GPU, and a `resume: strict` refusal
    or an `eval.compare_with: production` that `resolve_release` finds no release for is raised as the
    ConfigError the job would raise. Raises what it cannot read."""
    from trainer.training.evaluation import production_release

    production_release(checked.config, resolve_release, source=checked.source)
    decision, previous = decide_for(checked.config, checked.data_fingerprint)
    if decision.action == "refuse":
        raise refusal(checked.config, decision, checked.source)
    return decision, previous


def run_job(checked: Checked, reporter: Reporter | None, stop: "threading.Event", *, device: str | None = None,
            pause: "threading.Event | None" = None, base_cache: BaseModelCache | None = None,
            env: dict | None = None, infra_retries: list[dict] | None = None,
            resume_reason: str = "resume: auto found a checkpoint", where: str | None = None,
            estimate_mib: int | None = None, sweep: dict | None = None,
            resolve_release: ResolveRelease | None = None, devices: tuple[str, ...] | None = None,
            rendezvous: Rendezvous | None = None) -> "JobResult":
    """Train `checked` on `device` until it ends, reporting every event to `reporter`.

    `devices`: one torch device per rank on this box, for a config with `devices:` (agentd passes the devices of the
    slots it reserved); default: the ones `plan_here` picks on this box. Its length must be the config's ranks per box.
    `rendezvous`: this box's part of a job over several boxes (`Rendezvous`): its ranks meet the others' there, and
    only node 0's rank 0 writes and reports (the result on another box has no artifacts). A box that does not join
    within the rendezvous timeout raises `trainer.errors.RendezvousFailed` (an infrastructure failure).

    With `devices:` in the config (more than one), W rank processes train it data-parallel
    (`trainer.training.distributed`); this process joins no process group. With `base_cache` the ranks take the
    base from it through shared memory (`trainer.training.shared_base`: loaded into the cache's host memory once
    if missing), else each rank loads the base from disk.

    `stop` set: the job checkpoints at its next step boundary and returns outcome "cancelled"; `pause` set:
    the same, outcome "paused". Otherwise "succeeded" (or "nothing to do", also "succeeded").
    Raises ConfigError for what is found only as the job starts, `OutOfMemory` when the device ran out
    (its advice names `where` the job ran, the `estimate_mib` it was admitted with and the measured peak;
    the warm cache is emptied and CUDA's cached memory returned first), and any other failure as it is.
    `sweep`: {name, trial, folder} of a sweep's trial, recorded in run.json.
    `resolve_release` (`ResolveRelease`): the production release, for `eval.compare_with: production`;
    without it (or without a release) the job is refused before it starts."""
    from trainer.training.evaluation import production_release
    from trainer.training.job import LoraTrainingJob  # imports torch

    release = production_release(checked.config, resolve_release, source=checked.source)
    plan = plan_here(checked.config, source=checked.source, cpu_slots=len(devices) if devices else None,
                     rendezvous=rendezvous) if checked.config.devices is not None or rendezvous else None
    if plan is not None and devices is not None:
        if len(devices) != plan.local_size:
            raise ValueError(f"{len(devices)} devices given for a job of {plan.local_size} ranks on this box")
        plan = dataclasses.replace(plan, devices=tuple(devices))
    if plan is not None and plan.world_size > 1:
        from trainer.training.distributed import run_ranks
        from trainer.training.shared_base import shared_from_cache

        def train():
            with shared_from_cache(checked, base_cache, plan.devices[0].split(":")[0]) as shared:
                return run_ranks(plan, checked, reporter, stop, pause, dict(
                    env=env, infra_retries=infra_retries, resume_reason=resume_reason, sweep=sweep,
                    release=release, shared_base=shared))
        here = "+".join(plan.devices)
    else:
        job = LoraTrainingJob(checked, reporter, stop, base_cache=base_cache, env=env, device=device, pause=pause,
                              infra_retries=infra_retries, resume_reason=resume_reason, sweep=sweep,
                              release=release)
        train, here = job.run, str(job.device)
    try:
        return train()
    except ConfigError:
        raise
    except Exception as e:  # a rank's out-of-memory comes back as its (pickled) error: the same advice
        if not _is_oom(e):
            raise
        advice = _oom_advice(e, where or here, estimate_mib, peak_here=plan is None or plan.world_size == 1)
        if base_cache is not None:
            base_cache.clear()
        _free_cuda()
        raise OutOfMemory(advice) from e


def evaluate_run(run: str | Path, reporter: Reporter | None, *, against: str | None = None,
                 device: str | None = None, base_cache: BaseModelCache | None = None,
                 resolve_release: ResolveRelease | None = None) -> dict:
    """Evaluate a finished run folder on demand (`lora-train eval`, `agentd eval`): its config.yaml's `eval:`
    block, its LoRA as the candidate, compared with `against` (previous | production | base | a run folder;
    default the block's compare_with). Writes the run's eval/ files and returns eval/decision.json's content.
    Raises ConfigError (the folder is no finished run, its config has no eval:, no production release ...)."""
    from trainer.training.on_demand import evaluate_run as evaluate  # imports torch

    return evaluate(Path(run), reporter, against=against, device=device, base_cache=base_cache,
                    resolve_release=resolve_release)


def plan_here(cfg: TrainConfig, gpus: list | None = None, cpu_slots: int | None = None,
              source: str | None = None, rendezvous: Rendezvous | None = None) -> WorldPlan:
    """The ranks `cfg.devices` asks for on this box (`gpus`: the probe's list, default NVML's; `cpu_slots`:
    CPU ranks allowed without GPUs, default the cores), as this box's part of `rendezvous` when the job spans
    boxes. Raises ConfigError (exit 2) naming the fix."""
    import os

    from trainer.gpus import default_probe

    gpus = default_probe().list_gpus() if gpus is None else gpus
    try:
        return plan_world(cfg.devices, cfg.batch_size, cfg.batch_size_per_device, gpus,
                          cpu_slots or os.cpu_count() or 1, rendezvous)
    except DevicesError as e:
        raise ConfigError(e.problems, source) from None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """A job's checkpoint folders (`output_dir/checkpoints/step-N`), newest first."""
    from trainer.runs.checkpoint import list_checkpoints as checkpoints_in  # imports torch

    return checkpoints_in(Path(output_dir) / "checkpoints")


def cuda_reserved_mib() -> dict[int, int]:
    """MiB this process's CUDA holds on each GPU (its reserved memory: a warm base model, a running job),
    without importing torch for it: empty before the first job imported it."""
    torch = sys.modules.get("torch")
    out: dict[int, int] = {}
    try:
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                out[i] = int(torch.cuda.memory_reserved(i) // 2**20)
    except Exception:
        pass
    return out


def _is_oom(e: Exception) -> bool:
    torch = sys.modules.get("torch")  # the job imported it
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _oom_advice(e: Exception, where: str, estimate_mib: int | None, peak_here: bool = True) -> str:
    """`peak_here`: the job ran in this process (not in rank processes), so CUDA's peak here is its peak."""
    peak = None
    try:
        import torch

        if peak_here and torch.cuda.is_available():
            peak = round(torch.cuda.max_memory_allocated() / 2**20)
    except Exception:
        pass
    return (f"out of memory on {where} ({type(e).__name__}); estimate {estimate_mib} MiB, measured peak {peak} "
            "MiB; the last checkpoint is kept; lower batch_size (raise gradient_accumulation_steps to keep the "
            "effective batch), enable gradient_checkpointing or mixed_precision; `agentd validate` "
            "recommends a batch size")


def _free_cuda() -> None:
    """Return what the failed job held to the driver, so the next job (or another process) can have it."""
    try:
        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
