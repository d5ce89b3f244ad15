"""What a training job does beside training: validation loss, samples, early stopping, the report.

`RunWatch` holds it so the loop in `trainer.training.job` only calls four hooks:

    start()                          after setup: sample_at_start (a fresh run only)
    validate(step)                   after an optimizer step: the validation loss when due, else None
    after_step(step, epoch_done)     samples when due; True when early stopping says stop
    finish() / report()              the last samples round and grid; loss.png and report.html

Side work is timed on its own (events `sample` and `validation` carry `seconds`) and the loop restarts
its step clock after it, so step time and it/s never include sampling or validation.
"""
from __future__ import annotations

import time
from pathlib import Path

from trainer.data.prompts import load_prompts
from trainer.events import event
from trainer.runs import history, report
from trainer.runs.samples import rounds, write_grid
from trainer.training import sampling, validation_loss
from trainer.training.ema import for_samples


class RunWatch:
    def __init__(self, job):
        self.job = job
        self.cfg = job.cfg
        self.samples_dir = Path(self.cfg.output_dir) / "samples"
        self.prompts = load_prompts(self.cfg)[0] if self.cfg.sample_prompts else []
        n_train = job.train_size
        self.val_indices = list(range(n_train, len(job.dataset)))
        self.val_history = self._val_history_so_far()
        self.best = min(self.val_history) if self.val_history else None
        self.stopped_early = False
        self.sampled_steps: set[int] = {s for s, _ in rounds(self.samples_dir)}
        self.sampling_s = 0.0
        self.validation_s = 0.0

    def _val_history_so_far(self) -> list[float]:
        """Validation losses already in loss.csv (a resumed run continues its early-stopping count)."""
        from trainer.runs.outputs import read_loss_csv

        if not self.job.logs.loss_path.exists():
            return []
        return [float(r["val_loss"]) for r in read_loss_csv(self.job.logs.loss_path) if r.get("val_loss")]

    # --- hooks ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.job.state.global_step == 0 and sampling.due(self.cfg, 0):
            self._sample(0)

    def validate(self, step: int) -> float | None:
        if not self.val_indices or not validation_loss.due(self.cfg, step, self.job.total_steps):
            return None
        t0 = time.perf_counter()
        with for_samples(self.job.ema):  # the EMA weights when ema.use_for says samples (and validation)
            loss = validation_loss.evaluate(self.job.task, self.job.dataset, self.val_indices, self.cfg.batch_size,
                                            self.job.autocast)
        seconds = time.perf_counter() - t0
        self.validation_s += seconds
        self.val_history.append(loss)
        self.best = loss if self.best is None else min(self.best, loss)
        self.job.reporter.emit(event("validation", step=step, val_loss=loss, best=self.best,
                                     samples=len(self.val_indices), seconds=round(seconds, 3)))
        if validation_loss.should_stop(self.val_history, self.cfg.early_stopping_patience):
            self.stopped_early = True
            self.job.reporter.emit(event("warning", message=(
                f"early stopping at step {step}: validation loss has not improved for "
                f"{self.cfg.early_stopping_patience} validations (best {self.best:.4g})")))
        return loss

    def after_step(self, step: int, epoch_done: int | None) -> bool:
        if step != self.job.total_steps and not self.stopped_early \
                and sampling.due(self.cfg, step, epoch_done=epoch_done, total_steps=self.job.total_steps):
            self._sample(step)
        return self.stopped_early

    def finish(self) -> list[Path]:
        """The final sampling round (once per step) and the grid."""
        step = self.job.state.global_step
        if self.prompts and step not in self.sampled_steps:
            self._sample(step)
        grid = write_grid(self.samples_dir, self.prompts) if self.prompts else None
        if grid:
            self.job.run_start.record(grid)
        return [grid] if grid else []

    def report(self) -> list[Path]:
        """logs/loss.png and report.html (with the comparison when there is a previous run)."""
        out = Path(self.cfg.output_dir)
        png = report.write_loss_png(out)
        self.job.run_start.record(png)
        previous = self.cfg.compare_with or history.newest_previous(history.history_dir(self.cfg))
        page = report.write_report(out, previous)
        self.job.run_start.record(page)
        return [png, page]

    def summary(self) -> dict:
        return {"val_loss": self.val_history[-1] if self.val_history else None, "best_val_loss": self.best,
                "sampling_s": round(self.sampling_s, 3), "validation_s": round(self.validation_s, 3)}

    # --- sampling -----------------------------------------------------------------------------------
    def _sample(self, step: int) -> None:
        from trainer.runs.checkpoint import isolated_rng

        def warn(message: str) -> None:
            self.job.reporter.emit(event("warning", message=message))

        with isolated_rng():
            try:
                self.job.task.eval()
                with for_samples(self.job.ema):
                    files, seconds = sampling.sample_round(self.job.task, self.prompts, self.samples_dir, step, warn)
            finally:
                self.job.task.train()
        self.sampled_steps.add(step)
        self.sampling_s += seconds
        self.job.run_start.record(*files)
        self.job.reporter.emit(event("sample", step=step, files=[str(f) for f in files], seconds=round(seconds, 3)))
