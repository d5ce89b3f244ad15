"""Samples while training: when to sample, and one round of the prompts through the family's task.

The prompts are `trainer.data.prompts`; the files they become, `trainer.runs.samples` (`samples/step-<N>/`,
`samples/grid.png`). A prompt that fails to sample (out of memory, a sampler that rejects the options) is
a warning event, never a failed job. The rendering itself is the model family's `Task.render_sample` hook.
"""
from __future__ import annotations

import time
from pathlib import Path

from trainer.data.prompts import SamplePrompt
from trainer.runs.samples import round_dir


def due(cfg, step: int, *, epoch_done: int | None = None, total_steps: int | None = None) -> bool:
    """Whether to sample after optimizer step `step` (pure). `epoch_done`: the 1-based epoch that just
    ended at this step, if one did. The final step always samples (when there are prompts)."""
    if not cfg.sample_prompts:
        return False
    if step == 0:
        return cfg.sample_at_start
    if total_steps is not None and step == total_steps:
        return True
    if cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
        return True
    return bool(cfg.sample_every_n_epochs and epoch_done and epoch_done % cfg.sample_every_n_epochs == 0)


def sample_round(task, prompts: list[SamplePrompt], samples_dir: Path, step: int, warn) -> tuple[list[Path], float]:
    """Render every prompt once (one call to the task's hook per prompt); a prompt that fails becomes
    a `warn(message)` call. Returns the files written and the seconds it took."""
    t0 = time.perf_counter()
    folder = round_dir(samples_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, p in enumerate(prompts):
        try:
            written.append(task.render_sample(p, folder / f"{i:02d}"))
        except Exception as e:  # out of memory, a sampler that rejects the options: a warning, not a failure
            _free_cuda_after(e)
            warn(f"sample {i} ({p.prompt[:40]!r}) at step {step} failed: {type(e).__name__}: {str(e)[:200]}")
    return written, time.perf_counter() - t0


def _free_cuda_after(e: Exception) -> None:
    if "out of memory" in str(e).lower():
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass
