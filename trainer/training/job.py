"""A LoRA training job: `setup / train / save_checkpoint / cleanup`, and `train()` is one explicit loop.

The same class runs in the foreground (`lora-train`) and inside the daemon (which passes its warm
model cache, its reporter and a stop flag). The job reports through one interface
(`trainer.events.Reporter`) and honours `stop`: when it is set, the job finishes the optimizer step it
is in, writes a checkpoint and raises `TrainingInterrupted`.

Determinism and resume: each epoch's data order is a permutation derived from (seed, epoch); every
other random draw for a sample (latent sampling, noise, timestep, crop/flip, caption options) comes from
that sample's own generator, keyed by its global index (`trainer.data.randomness`); the global RNGs (of
every rank) are in the checkpoint. So a run resumed from step K is bit-identical on the CPU to one that
never stopped, and W data-parallel ranks (`trainer.training.distributed`, `rank`) train what one would. On resume the checkpoint wins for progress
(step, cursor, optimizer, RNG); the config must match it in every training field, or the job refuses
(see `trainer.runs.checkpoint.choose_resume`).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from trainer import families
from trainer.checks.preflight import Checked, optimizer_problems
from trainer.config import TrainConfig, dump_config
from trainer.data.images import epoch_batches, epoch_items
from trainer.data.randomness import sample_generators
from trainer.errors import ConfigError, Problem, TrainingInterrupted, TrainingPaused
from trainer.events import FanOut, Reporter, event
from trainer.runs import checkpoint as ckpt
from trainer.runs.history import RunManifest, begin_run, refusal
from trainer.runs.outputs import (RunLogs, atomic_write_json, atomic_write_text, git_info, jenkins_vars,
                                  library_versions, save_safetensors_atomic)
from trainer.runs.report import write_loss_png
from trainer.training import optim
from trainer.training.ema import Ema
from trainer.training.ranks import Rank
from trainer.training.model_cache import BaseModelCache, file_identity, move_base
from trainer.training.watch import RunWatch

log = logging.getLogger(__name__)


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def weight_dtype(mixed_precision: str, device_type: str) -> torch.dtype:
    """The dtype the frozen base is held in: the mixed precision's on CUDA, fp32 on the CPU."""
    if device_type != "cuda" or mixed_precision == "no":
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def base_key(cfg: TrainConfig, dtype: torch.dtype) -> tuple:
    """The warm cache's key of the config's base: what was loaded and how, not the device (a warm base kept in
    host memory moves to whichever device the next job has)."""
    return (cfg.model_family, str(cfg.base_model), file_identity(cfg.base_model), str(cfg.base_model_config),
            str(dtype), cfg.base_quantization, cfg.chat_template)  # a fp8 Flux base is another base than a bf16 one


def cacheable(cfg: TrainConfig) -> bool:
    """Whether the base can be kept warm (and shared with ranks): a bitsandbytes-quantized base (QLoRA: 4bit/8bit)
    cannot move between device and host memory; a fp8 Flux base is plain tensors: it can."""
    return cfg.base_quantization in (None, "fp8")


@dataclass
class JobResult:
    outcome: str  # succeeded | cancelled
    output_dir: Path
    lora_path: Path | None
    steps: int
    final_loss: float | None
    resumed_from: int | None = None
    peak_memory_mib: float | None = None
    artifacts: list[str] = field(default_factory=list)
    evaluation: str | None = None  # the evaluation's overall decision (better | no worse | worse | unknown)


class LoraTrainingJob:
    def __init__(self, checked: Checked, reporter: Reporter | None = None, stop: threading.Event | None = None,
                 *, base_cache: BaseModelCache | None = None, env: dict | None = None, device: str | None = None,
                 resume_reason: str = "resume: auto found a checkpoint", pause: threading.Event | None = None,
                 infra_retries: list[dict] | None = None, sweep: dict | None = None,
                 release: tuple[Path, str] | None = None, rank: Rank | None = None, shared_base=None):
        self.checked = checked
        self.cfg: TrainConfig = checked.config
        self.stop = stop or threading.Event()
        self.pause = pause or threading.Event()  # agentd pause: checkpoint at the next step, raise TrainingPaused
        self.infra_retries = list(infra_retries or [])  # the daemon's re-queues after GPU faults (run.json)
        self.sweep = sweep  # {name, trial, folder} when a sweep runs this job as a trial (run.json)
        self.release = release  # eval.compare_with production: (the released LoRA, "NAME@vN"), resolved by the caller
        self.evaluation: dict | None = None  # eval/decision.json once evaluated
        self.warm: str | None = None  # how the base was had: cold | host | device (BaseModelCache.get) | shared
        self.warm_move_s: float | None = None
        self.warm_ranks: list[dict] | None = None  # every rank's {how, move_s} (run.json), on rank 0
        self.base_cache = base_cache
        # A data-parallel rank's base, packed in shared memory by the launcher from the daemon's warm cache
        # (`trainer.training.shared_base.SharedBase`); None: the rank loads the base from disk.
        self.shared_base = shared_base
        self.env = dict(os.environ if env is None else env)
        self.device = pick_device(device)
        self.resume_reason = resume_reason
        self.rank = rank or Rank.single()  # data parallel: rank 0 alone writes and reports
        self.logs = RunLogs(self.cfg.output_dir)
        self.reporter = FanOut(self.logs, reporter) if self.rank.is_main else FanOut()
        self.state = ckpt.TrainState()
        self.resumed_from: int | None = None
        self.task = None
        self.ema: Ema | None = None  # the network's EMA when the config asks (trainer.training.ema)
        self._restored_ema: dict | None = None
        self._base_key = None
        self._started = time.time()
        self._last_saved_step = -1
        self._early_stop = False  # rank 0's early-stopping decision, broadcast to every rank
        self.world_size_change: dict | None = None  # a resume allowed onto another W (run.json)
        self.train_size: int | None = None  # the dataset's first train_size samples train; the rest validate

    # --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        problems = optimizer_problems(cfg, self.device.type)  # AdamW8bit on a CPU: before anything
        if problems:
            raise ConfigError(problems, self.checked.source)
        # Every box trains on the same data with the same training fields, or none starts (before anything is written).
        refused = other_box_refusal(self.rank.gather_object(self._what_trains()), self.checked.source)
        # Which run this is (resume / new / nothing to do / refuse): trainer.runs.history, before anything is written.
        # Rank 0 decides (it moves a previous run away); the other ranks follow its decision.
        if self.rank.is_main and refused is None:
            self.run_start = begin_run(cfg, self.checked.data_fingerprint, self._started)
            choice = self.run_start.decision
            refused = refusal(cfg, choice, self.checked.source) if choice.action == "refuse" else \
                self._world_size_refusal(choice.checkpoint)
        action, resume_path, refused = self.rank.broadcast_object(
            (None, None, refused) if refused is not None or not self.rank.is_main else
            (choice.action, choice.checkpoint, None))
        if refused is not None:
            raise refused
        self.nothing_to_do = action == "nothing"
        if self.nothing_to_do:
            if self.rank.is_main:
                self.reporter.emit(event("run", action="nothing", reason=choice.reason, run_id=self.run_start.run_id))
            return
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.weight_dtype, self.autocast, self._use_scaler = self._precision()
        if not self.rank.is_main:
            self._setup_training(resume_path)
            return

        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_start.manifest = RunManifest.continue_or_start(cfg.output_dir, self.run_start.run_id)
        self.run_start.record("config.yaml", "run.json", "logs/loss.csv", "logs/events.jsonl")
        self.logs.open(None if resume_path is None else self._checkpoint_step(resume_path))
        self.reporter.emit(event("run", action=choice.action, reason=choice.reason, run_id=self.run_start.run_id,
                                 previous=str(self.run_start.moved_to) if self.run_start.moved_to else None))
        for w in [*self.checked.warnings, *choice.warnings, *self._precision_warnings]:
            self.reporter.emit(event("warning", message=w))
        for note in self.checked.scan.notes:  # what the data scan decided (text: format, lengths, first example)
            self.reporter.emit(event("message", text=note))
        atomic_write_text(cfg.output_dir / "config.yaml", dump_config(cfg))
        self._setup_training(resume_path)
        if resume_path is not None:
            self.reporter.emit(event("resumed", from_step=self.state.global_step, checkpoint=str(resume_path),
                                     reason=self.resume_reason))
        self.watch = RunWatch(self)  # validation, samples, early stopping, the report (trainer.training.watch)
        self._write_run_json("running")
        self.reporter.emit(event(
            "started", name=cfg.run_name, total_steps=self.total_steps, device=str(self.device),
            samples=self.train_size, batch_size=self.micro_batch, grad_accum=cfg.gradient_accumulation_steps,
            resumed_from=self.resumed_from, output_dir=str(cfg.output_dir), warm=self.warm,
            warm_move_s=self.warm_move_s, ranks=self.rank.world_size))

    def _setup_training(self, resume_path: Path | None) -> None:
        """What every rank does: the task, optimizer and scheduler, the checkpoint or init LoRA, the caches."""
        cfg = self.cfg
        self.task, self.dataset = self._build_task()
        self.task.train()
        self.optimizer = optim.build_optimizer(cfg, self.task.param_groups(), self.device.type)
        self.total_steps = cfg.max_train_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = optim.build_scheduler(cfg, self.optimizer, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self._use_scaler else None
        if resume_path is not None:
            self._restore(resume_path)
        elif cfg.init_lora_weights is not None:
            from trainer.families.lora_io import read_lora_file

            tensors, _ = read_lora_file(cfg.init_lora_weights)
            self.task.load_lora_state(tensors, str(cfg.init_lora_weights))
        self.ema = Ema.of(cfg, [p for g in self.optimizer.param_groups for p in g["params"]])
        if self.ema is not None and self._restored_ema is not None:
            self.ema.load_state_dict(self._restored_ema)
        self.task.prepare(self.dataset, self.autocast)  # caches (latents, frozen text-encoder outputs) the config asks for
        self.warm_ranks = self.rank.gather_object({"how": self.warm, "move_s": self.warm_move_s})
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @property
    def micro_batch(self) -> int:
        """Samples per micro-batch over all ranks: batch_size, or W x batch_size_per_device."""
        per_device = self.cfg.batch_size_per_device
        return self.cfg.batch_size if per_device is None else per_device * self.rank.world_size

    def _what_trains(self) -> list:
        """What must be the same on every rank of the job: its box (node, host name), the config's training fields
        (their hash) and the dataset's fingerprint."""
        import socket

        return [self.rank.node, socket.gethostname(), self.cfg.config_hash(), self.checked.data_fingerprint]

    def _world_size_refusal(self, checkpoint: Path | None) -> ConfigError | None:
        """The refusal to resume `checkpoint` on this many ranks (None: it is not refused)."""
        if checkpoint is None:
            return None
        written = ckpt.read_state(checkpoint).get("world_size", 1)
        if written == self.rank.world_size:
            return None
        if self.cfg.allow_world_size_change:
            self.world_size_change = {"from": written, "to": self.rank.world_size, "checkpoint": str(checkpoint)}
            return None
        return ConfigError([Problem(
            "resume", f"checkpoint {checkpoint} was written by {written} data-parallel rank(s), this run has "
            f"{self.rank.world_size}: the result would not be bit-exact (per-rank float sums differ); set devices "
            f"to {written} ranks, or allow_world_size_change: true to resume anyway", "", self.cfg.resume)],
            self.checked.source)

    @property
    def checkpoints_dir(self) -> Path:
        return self.cfg.output_dir / "checkpoints"

    @cached_property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the epoch's micro-batches (repeats and buckets counted) / accumulation;
        the same for every epoch (bucket sizes do not change), computed once."""
        return math.ceil(len(self._epoch_batches(0)) / self.cfg.gradient_accumulation_steps)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's micro-batches of training samples (over all ranks), one bucket each, from (seed, epoch)
        alone (`trainer.data.images.epoch_batches`): a resume recomputes its place without re-reading data."""
        return epoch_batches(self.dataset.samples[:self.train_size], self.cfg.seed, epoch, self.micro_batch)

    def _micro_batch_loss(self, indices: list[int], first: int, parts: int) -> float:
        """Backward of this rank's share of one micro-batch whose first sample has global index `first`
        (weighted by its share of the loss units, and by 1/`parts` for accumulation); returns its loss part."""
        share = self.rank.share(list(range(len(indices))))
        if not share:
            return 0.0
        mine = [indices[k] for k in share]
        generators = sample_generators(self.cfg.seed, [first + k for k in share])
        loss = self.task.loss(mine, self.dataset, generators, self.autocast) / parts
        if self.rank.world_size > 1:
            loss = loss * (self.task.loss_units(mine, self.dataset) / self.task.loss_units(indices, self.dataset))
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.item()

    def _checkpoint_step(self, path: Path) -> int:
        return ckpt.read_state(path)["train_state"]["global_step"]

    def _precision(self):
        mp, cuda = self.cfg.mixed_precision, self.device.type == "cuda"
        self._precision_warnings = []
        if mp == "fp16" and not cuda:
            self._precision_warnings.append("mixed_precision fp16 needs a CUDA GPU; training in fp32 on the CPU")
            mp = "no"
        if mp == "no":
            return torch.float32, contextlib.nullcontext, False
        dtype = torch.float16 if mp == "fp16" else torch.bfloat16
        return (weight_dtype(mp, self.device.type), (lambda: torch.autocast(self.device.type, dtype=dtype)),
                mp == "fp16")

    def _build_task(self):
        """The family's base (warm from the daemon's cache when it has it), task and dataset."""
        cfg = self.cfg
        fam = families.family(cfg.model_family)
        # One dataset: the training samples, then the held-out validation samples (trainer.data.holdout).
        train = self.checked.scan.samples if self.checked.train_samples is None else self.checked.train_samples
        self.train_size = len(train)
        dataset = fam.make_dataset(cfg, list(train) + list(self.checked.validation_samples))
        load = lambda: fam.load_base(cfg, self.device, self.weight_dtype)  # noqa: E731
        if self.shared_base is not None:  # a rank: the launcher's shared copy (its cache entry is the launcher's)
            base, self.warm = self.shared_base.unpack(), "shared"
            if self.device.type != "cpu":  # a CPU rank computes on the shared tensors; a GPU rank copies them
                t0 = time.perf_counter()
                move_base(base, self.device)
                self.warm_move_s = round(time.perf_counter() - t0, 3)
        elif self.base_cache is not None and cacheable(cfg):
            self._base_key = base_key(cfg, self.weight_dtype)
            base, self.warm, self.warm_move_s = self.base_cache.get(self._base_key, load, self.device)
        else:
            base, self.warm = load(), "cold"
        log.info("base model %s (%s)", cfg.base_model, self.warm)
        return fam.make_task(cfg, base, self.device), dataset

    def _restore(self, path: Path) -> None:
        """The checkpoint at `path`, as rank 0 reads it: the other ranks take it by broadcast, so another box
        needs no copy of rank 0's files (each rank then takes its own RNG state from `rng.ranks`)."""
        data = self.rank.broadcast_tensors(ckpt.load_checkpoint(path) if self.rank.is_main else None)
        self.task.load_lora_state(data["lora"], str(path))
        self.optimizer.load_state_dict(data["optim"]["optimizer"])
        self.scheduler.load_state_dict(data["optim"]["scheduler"])
        if self.scaler is not None and data["optim"].get("scaler"):
            self.scaler.load_state_dict(data["optim"]["scaler"])
        ranks = data["rng"].get("ranks") or [data["rng"]]  # every rank's RNG state (one: as written by W=1)
        ckpt.restore_rng(ranks[self.rank.rank % len(ranks)])
        self._restored_ema = data["optim"].get("ema")
        self.state = ckpt.TrainState.from_dict(data["state"]["train_state"])
        self.resumed_from = self.state.global_step
        self._last_saved_step = self.state.global_step

    # --------------------------------------------------------------------------------------------
    def train(self) -> JobResult:
        cfg, state = self.cfg, self.state
        accum = cfg.gradient_accumulation_steps
        recent: list[float] = []
        main = self.rank.is_main
        if main:
            self.watch.start()
        t_last, times = time.perf_counter(), []
        epoch_samples = len(epoch_items(self.dataset.samples[:self.train_size]))
        while state.global_step < self.total_steps and not self._early_stop:
            batches = self._epoch_batches(state.epoch)
            starts = [0]  # each micro-batch's first sample's place in the epoch
            for b in batches:
                starts.append(starts[-1] + len(b))
            while state.cursor < len(batches) and state.global_step < self.total_steps and not self._early_stop:
                group = batches[state.cursor: state.cursor + accum]
                first = state.epoch * epoch_samples
                step_loss = sum(self._micro_batch_loss(indices, first + starts[state.cursor + k], len(group))
                                for k, indices in enumerate(group))
                [step_loss] = self.rank.reduce_gradients(self._params(), [step_loss])
                grad_norm = self._optimizer_step()
                state.cursor += len(group)
                state.global_step += 1
                state.loss_sum += step_loss
                if self.ema is not None:
                    self.ema.update(state.global_step)

                now = time.perf_counter()
                times = (times + [now - t_last])[-20:]
                t_last = now
                recent = (recent + [step_loss])[-20:]
                if main:
                    val_loss = self.watch.validate(state.global_step)
                    self._report_step(step_loss, grad_norm, sum(recent) / len(recent), len(times) / sum(times),
                                      val_loss)
                    self.watch.after_step(state.global_step, state.epoch + 1 if state.cursor >= len(batches) else None)
                t_last = time.perf_counter()  # step time never includes validation or sampling

                pause, stop, self._early_stop = self.rank.any_flags(
                    [self.pause.is_set(), self.stop.is_set(), main and self.watch.stopped_early])
                if pause:
                    self.save_checkpoint()
                    raise TrainingPaused(f"paused at step {state.global_step}")
                if stop:
                    self.save_checkpoint()
                    raise TrainingInterrupted(f"stopped at step {state.global_step}")
                if state.global_step % cfg.save_steps == 0:
                    self.save_checkpoint()
            if state.cursor >= len(batches):
                state.epoch += 1
                state.cursor = 0
        if self._last_saved_step != state.global_step:
            self.save_checkpoint()
        if not main:
            return JobResult("succeeded", cfg.output_dir, None, state.global_step, recent[-1] if recent else None)
        return self._finish(recent[-1] if recent else None)

    def _params(self) -> list:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _optimizer_step(self) -> float | None:
        params = self._params()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.cfg.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _report_step(self, loss: float, grad_norm, mean: float, it_s: float, val_loss: float | None = None) -> None:
        cfg, st = self.cfg, self.state
        lr = self.optimizer.param_groups[0]["lr"]
        epochs = cfg.epochs if not cfg.max_train_steps else math.ceil(self.total_steps / self.steps_per_epoch)
        self.logs.step({"step": st.global_step, "epoch": st.epoch + 1, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "samples_per_s": round(it_s * self.micro_batch *
                                                                       cfg.gradient_accumulation_steps, 3),
                        "elapsed_s": round(time.time() - self._started, 3), "val_loss": val_loss})
        logged = st.global_step % cfg.log_every == 0 or st.global_step == self.total_steps
        self.reporter.emit(event("step", step=st.global_step, total_steps=self.total_steps,
                                 epoch=f"{st.epoch + 1}/{epochs}", loss=loss, loss_mean=mean, lr=lr,
                                 it_s=round(it_s, 3), eta_s=round((self.total_steps - st.global_step) / it_s, 1),
                                 logged=logged))

    def save_checkpoint(self) -> Path | None:
        """Every rank's RNG state goes to rank 0, which writes the checkpoint (None on the other ranks)."""
        cfg = self.cfg
        rngs = self.rank.gather_object(ckpt.capture_rng())
        self._last_saved_step = self.state.global_step
        if not self.rank.is_main:
            return None
        rng = rngs[0] if len(rngs) == 1 else {**rngs[0], "ranks": rngs}
        optim = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else {},
                 **({"ema": self.ema.state_dict()} if self.ema is not None else {})}
        meta = {"train_state": self.state.state_dict(), "config_hash": cfg.config_hash(),
                "training_fields": cfg.training_fields(), "data_fingerprint": self.checked.data_fingerprint,
                "versions": library_versions(), "time": ckpt.now(), "world_size": self.rank.world_size}
        path = ckpt.save_checkpoint(self.checkpoints_dir, self.state.global_step, lora=self.task.lora_state(),
                                    optim=optim, rng=rng, state=meta, keep=cfg.keep_checkpoints)
        self.run_start.record(path)
        self.reporter.emit(event("checkpoint", step=self.state.global_step, path=str(path)))
        return path

    def _finish(self, final_loss: float | None) -> JobResult:
        cfg = self.cfg
        lora_path = cfg.output_dir / f"{cfg.run_name}.safetensors"
        artifacts = [str(p) for p in self._export_network(lora_path)]
        artifacts += [str(p) for p in self.watch.finish()]  # the last samples round and the grid
        with self._exported_weights():  # the PEFT folder and the merged export follow <name>.safetensors
            extra = self.task.export_extra(cfg.output_dir)
        artifacts += [str(p) for p in extra]
        if cfg.eval is not None:
            self.evaluation = self._evaluate()
            artifacts += [str(cfg.output_dir / "eval" / f) for f in ("metrics.json", "decision.json")
                          if (cfg.output_dir / "eval" / f).is_file()]
        self.run_start.record(*artifacts, "logs/summary.csv")
        summary = self._summary(final_loss)
        atomic_write_text(self.logs.dir / "summary.csv",
                          ",".join(summary) + "\n" + ",".join("" if v is None else str(v) for v in summary.values())
                          + "\n")
        self._write_run_json("succeeded", final_loss=final_loss, summary=summary, artifacts=artifacts)
        artifacts += [str(p) for p in self.watch.report()]  # reads run.json: written after it
        for a in artifacts:
            self.reporter.emit(event("artifact", path=a))
        return JobResult("succeeded", cfg.output_dir, lora_path, self.state.global_step, final_loss,
                         self.resumed_from, self.peak_memory_mib(), artifacts,
                         self.evaluation["overall"] if self.evaluation else None)

    def _evaluate(self) -> dict:
        """The evaluation stage on the model as trained (trainer.training.evaluation); never raises."""
        from trainer.training.evaluation import against_for, evaluate_or_unknown

        cfg = self.cfg
        subsets = getattr(self.checked.scan, "subsets", None) or []
        against = against_for(cfg, release=self.release)
        return evaluate_or_unknown(self.task, cfg, cfg.output_dir, against, self.reporter,
                                   class_tokens=[s.class_tokens for s in subsets if not s.is_reg],
                                   dataset=self.dataset, val_indices=self.watch.val_indices, autocast=self.autocast,
                                   record=self.run_start.record,
                                   checkpoints=ckpt.list_checkpoints(self.checkpoints_dir))

    def _exported_weights(self):
        """The weights the exports hold: the EMA's when `ema.use_for` says export (or both), else the trained ones."""
        return self.ema.applied() if self.ema is not None and self.ema.in_place() else contextlib.nullcontext()

    def _export_network(self, lora_path: Path) -> list[Path]:
        """<name>.safetensors; with `ema`, the EMA weights in its place or as <name>-ema.safetensors (ema.use_for)."""
        ema = self.ema
        with self._exported_weights():
            save_safetensors_atomic(self.task.lora_state(), lora_path, self._lora_metadata())
        if ema is None or ema.in_place():
            return [lora_path]
        ema_path = lora_path.with_name(f"{lora_path.stem}-ema.safetensors")
        with ema.applied():
            save_safetensors_atomic(self.task.lora_state(), ema_path, self._lora_metadata())
        return [lora_path, ema_path]

    def _summary(self, final_loss) -> dict:
        from trainer.runs.outputs import read_loss_csv

        rows = read_loss_csv(self.logs.loss_path)
        last = [float(r["loss"]) for r in rows[-10:]]
        rates = [float(r["samples_per_s"]) for r in rows[-10:] if r.get("samples_per_s")]
        return {"final_loss": final_loss, "mean_loss_last10": round(sum(last) / len(last), 6) if last else None,
                "samples_per_s": round(sum(rates) / len(rates), 3) if rates else None,
                "peak_memory_mib": self.peak_memory_mib(), "steps": self.state.global_step,
                **self.watch.summary(),  # validation loss, sampling and validation seconds
                **eval_columns(self.evaluation, self.cfg.output_dir)}

    def _lora_metadata(self) -> dict[str, str]:
        cfg = self.cfg
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora_rank),
                "ss_network_alpha": str(cfg.effective_alpha), "ss_steps": str(self.state.global_step),
                "ss_epoch": str(self.state.epoch), "ss_learning_rate": str(cfg.learning_rate),
                "ss_batch_size_per_device": str(cfg.batch_size), "ss_seed": str(cfg.seed),
                "ss_num_train_images": str(len(self.dataset)), "ss_mixed_precision": cfg.mixed_precision,
                "ss_output_name": cfg.run_name, "agentd_config_hash": cfg.config_hash(),
                "agentd_data_fingerprint": self.checked.data_fingerprint, "agentd_mode": cfg.mode,
                "agentd_model_family": cfg.model_family}
        meta.update(self.task.lora_metadata())
        return meta

    def peak_memory_mib(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def _write_run_json(self, status: str, **extra) -> None:
        import json

        cfg = self.cfg
        path = cfg.output_dir / "run.json"
        previous = {}
        if self.resumed_from is not None and path.exists():
            try:
                previous = json.loads(path.read_text())
            except ValueError:
                previous = {}
        resumes = list(previous.get("resumes", []))
        if self.resumed_from is not None and not any(r.get("at") == self._started for r in resumes):
            resumes.append({"from_step": self.resumed_from, "at": self._started, "why": self.resume_reason})
        config_file = self.checked.source
        data = {
            "name": cfg.run_name, "status": status, "run_id": self.run_start.run_id,
            "training_fields": cfg.training_fields(),
            "config": cfg.resolved(), "config_hash": cfg.full_hash(), "training_hash": cfg.config_hash(),
            "config_file": config_file,
            "git": git_info(Path(config_file).resolve().parent) if config_file else None,
            "jenkins": jenkins_vars(self.env),
            "dataset": {"dir": str(cfg.train_data_dir) if cfg.train_data_dir else None, "samples": self.train_size,
                        "subsets": [str(d.image_dir) for d in cfg.datasets or []],
                        "samples_per_epoch": len(epoch_items(self.dataset.samples[:self.train_size])),
                        "validation_samples": len(self.checked.validation_samples),
                        "validation_dir": str(cfg.validation_data_dir or "") or None,
                        "fingerprint": self.checked.data_fingerprint},
            "versions": library_versions(),
            "device": _device_info(self.device),
            "times": {"first_started": previous.get("times", {}).get("first_started", self._started),
                      "started": self._started, "finished": time.time() if status != "running" else None},
            "resumes": resumes,
            "infra_retries": self.infra_retries,
            "world_size": self.rank.world_size,
            "warm": self._warm_info(),
            **({"world_size_change": self.world_size_change} if self.world_size_change else {}),
            "steps": {"done": self.state.global_step, "total": getattr(self, "total_steps", None)},
            "peak_memory_mib": self.peak_memory_mib(),
            "network": self._network_info(),
            **({"sweep": self.sweep} if self.sweep else {}),
            **extra,
        }
        atomic_write_json(path, data)

    def _warm_info(self) -> dict:
        """How each rank had the base (cold | host | device | shared) and the seconds its move to the device
        took; with a shared base, how the launcher had it from the daemon's cache."""
        info = {"ranks": self.warm_ranks}
        if self.shared_base is not None:
            info["cache"] = self.shared_base.cache
        return info

    def _network_info(self) -> dict:
        """What run.json and the report say about the trained network: its type and parameter count."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]] if hasattr(self, "optimizer") else []
        return {"type": self.cfg.network.title, "parameters": sum(p.numel() for p in params),
                "ema": self.cfg.ema.use_for if self.cfg.ema is not None else None}

    def cleanup(self) -> None:
        self.logs.close()
        if self.task is not None:
            self.task.detach()
        self.task = None
        if self.base_cache is not None and self._base_key is not None:
            self.base_cache.release(self._base_key)  # warm on the device for warm_vram_ttl_s, then host memory
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fail(self, outcome: str, error: str) -> None:
        """Record a failed or cancelled end in run.json (the caller reports the event; rank 0 alone writes)."""
        if self.task is not None and self.rank.is_main and self.cfg.output_dir.exists():
            self._write_run_json(outcome, error=error)
            with contextlib.suppress(Exception):  # the chart is a convenience; never mask the real error
                self.run_start.record(write_loss_png(self.cfg.output_dir))

    def run(self) -> JobResult:
        """setup + train + cleanup, with a cancelled or failed end reported and recorded."""
        try:
            self.setup()
            if self.nothing_to_do and not self.rank.is_main:
                return JobResult("succeeded", self.cfg.output_dir, None, 0, None)
            if self.nothing_to_do:
                prev = self.run_start.previous
                self.reporter.emit(event("finished", outcome="succeeded", final_loss=prev.final_loss,
                                         output_dir=str(self.cfg.output_dir), step=prev.steps))
                return JobResult("succeeded", self.cfg.output_dir, None, prev.steps or 0, prev.final_loss)
            result = self.train()
            self.reporter.emit(event("finished", outcome="succeeded", final_loss=result.final_loss,
                                     output_dir=str(self.cfg.output_dir), step=result.steps))
            return result
        except TrainingPaused:
            self.fail("paused", f"paused at step {self.state.global_step}")
            return JobResult("paused", self.cfg.output_dir, None, self.state.global_step, None, self.resumed_from)
        except TrainingInterrupted:
            self.fail("cancelled", "stopped on request")
            self.reporter.emit(event("finished", outcome="cancelled", step=self.state.global_step))
            return JobResult("cancelled", self.cfg.output_dir, None, self.state.global_step, None, self.resumed_from)
        except BaseException as e:
            if not isinstance(e, ConfigError):
                self.fail("failed", f"{type(e).__name__}: {e}")
            raise
        finally:
            self.cleanup()


def other_box_refusal(every: list | None, source: str | None) -> ConfigError | None:
    """Rank 0's refusal when a rank's box trains on other data or another config than rank 0's: `every` is each
    rank's `LoraTrainingJob._what_trains()` in rank order (None on the other ranks: rank 0 decides and broadcasts)."""
    if every is None:
        return None
    _, host, config, data = every[0]
    for node, other_host, other_config, other_data in every[1:]:
        if other_data != data:
            field, what, theirs, ours = "train_data_dir", "dataset (data fingerprint)", other_data, data
        elif other_config != config:
            field, what, theirs, ours = "config", "training config (training fields' hash)", other_config, config
        else:
            continue
        return ConfigError([Problem(
            field, f"node {node + 1} ({other_host}) has another {what} than node 1 ({host}), whose rank 0 the others "
            f"follow: {theirs} there, {ours} on node 1", "give every box the same config and the same files at its "
            "dataset paths (copy or sync them; only node 1 needs the outputs and checkpoints)")], source)
    return None


def eval_columns(decision: dict | None, output_dir: Path) -> dict:
    """summary.csv's evaluation columns: eval_<metric> (the candidate's mean), eval_seconds and eval_decision
    (the Plot plugin draws the numbers across builds)."""
    if decision is None:
        return {}
    import json

    try:
        doc = json.loads((Path(output_dir) / "eval" / "metrics.json").read_text())
    except (OSError, ValueError):
        doc = {"metrics": {}}
    return {**{f"eval_{m}": round(v["candidate"]["mean"], 6) for m, v in doc["metrics"].items()},
            "eval_seconds": doc.get("seconds"), "eval_decision": decision["overall"]}


def _device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch_cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(name=props.name, index=index, total_memory_mib=props.total_memory // 2**20)
    else:
        import platform

        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info
