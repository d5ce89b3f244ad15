"""Validation loss: the held-out set (`trainer.data.holdout`), scored at fixed timesteps and fixed noise.

Each
held-out sample draws its noise, timestep and latent sample from its own generator, keyed by
(`VALIDATION_SEED`, its dataset index) (`trainer.data.randomness`): the same draws at every validation and in every run of the same data, so two
runs' validation losses at equal steps are comparable (and equal for the same config). Validation
runs under `torch.no_grad()` with the global RNGs left as they were, so it never changes training.
Text mode: the same next-token loss on held-out texts.
"""
from __future__ import annotations

from trainer.data.holdout import VALIDATION_SEED


def due(cfg, step: int, total_steps: int) -> bool:
    """Validate after optimizer step `step`: every validate_every_n_steps (default save_steps), and at the end."""
    every = cfg.validate_every_n_steps or cfg.save_steps
    return step == total_steps or step % every == 0


def should_stop(history: list[float], patience: int | None) -> bool:
    """Early stopping: the last `patience` validations all failed to beat the best one before them."""
    if not patience or len(history) <= patience:
        return False
    best_before = min(history[:-patience])
    return all(v >= best_before for v in history[-patience:])


def evaluate(task, dataset, indices: list[int], batch_size: int, autocast) -> float:
    """Mean validation loss over `indices` (weighted by batch size), at fixed noise and timesteps."""
    import torch

    from trainer.data.images import bucket_batches
    from trainer.data.randomness import sample_generators
    from trainer.runs.checkpoint import isolated_rng

    total, count = 0.0, 0
    task.eval()
    try:
        with torch.no_grad(), isolated_rng():
            # Batches of one bucket each (one batch shape); without buckets, consecutive slices.
            for batch in bucket_batches(dataset.samples, indices, batch_size):
                # Each held-out sample's own fixed draws (its dataset index as its key): the same every time.
                generators = sample_generators(VALIDATION_SEED, batch)
                total += float(task.loss(batch, dataset, generators, autocast)) * len(batch)
                count += len(batch)
    finally:
        task.train()
    return total / max(1, count)
