"""Validation loss: a held-out set, scored at fixed timesteps and fixed noise.

The set is `validation_split` of the data (chosen from the sorted sample paths by a fixed seed, so it
depends on the data alone, not on the run's `seed`) or the samples of `validation_data_dir`. Each
validation batch `b` draws its noise, timesteps and latent samples from a generator seeded with
`VALIDATION_SEED + b`: the same draws at every validation and in every run of the same data, so two
runs' validation losses at equal steps are comparable (and equal for the same config). Validation
runs under `torch.no_grad()` with the global RNGs left as they were, so it never changes training.
Text mode: the same next-token loss on held-out texts.
"""
from __future__ import annotations

import random

from trainer.errors import Problem

VALIDATION_SEED = 0x5EED


def split(samples: list, fraction: float | None) -> tuple[list, list]:
    """(training samples, validation samples). Deterministic in the samples' paths and the fraction."""
    if not fraction:
        return list(samples), []
    order = sorted(range(len(samples)), key=lambda i: str(samples[i].path))
    n_val = max(1, round(len(samples) * fraction))
    held = set(random.Random(VALIDATION_SEED).sample(order, n_val)) if samples else set()
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def validation_set(cfg, samples: list, scan_dir) -> tuple[list, list, list[Problem]]:
    """(training samples, validation samples, problems). `scan_dir(folder)` scans a dataset folder the
    way the model family scans train_data_dir (a `trainer.data.images.Scan`)."""
    # validation_file (text mode): held-out records, scanned like train_data_dir (a file or a folder).
    key = "validation_data_dir" if cfg.validation_data_dir is not None else "validation_file"
    held = getattr(cfg, key)
    if held is not None:
        scan = scan_dir(held)
        problems = [Problem(key, p.message, p.fix, p.value) for p in scan.problems]
        if not scan.problems and not scan.samples:
            problems.append(Problem(key, "holds no samples",
                                    "put validation samples there (same layout as train_data_dir)", str(held)))
        return list(samples), scan.samples, problems
    train, val = split(samples, cfg.validation_split)
    problems = []
    if val and len(train) < cfg.batch_size:
        problems.append(Problem(
            "validation_split", f"leaves {len(train)} of {len(samples)} samples for training, fewer than one "
            f"batch ({cfg.batch_size})", "lower validation_split or batch_size, or add data",
            cfg.validation_split))
    return train, val, problems


def as_train_dir(cfg, folder):
    """`cfg` reading its data from `folder` (with its own metadata.csv if it has one): how a
    validation_data_dir is scanned with the family's own dataset scanner."""
    from pathlib import Path

    meta = Path(folder) / "metadata.csv"
    return cfg.model_copy(update={"train_data_dir": Path(folder), "metadata_path": meta if meta.is_file() else None,
                                  "datasets": None})


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

    from trainer.runs.checkpoint import isolated_rng
    from trainer.data.images import bucket_batches

    total, count = 0.0, 0
    task.eval()
    try:
        with torch.no_grad(), isolated_rng():
            # Batches of one bucket each (one batch shape); without buckets, consecutive slices.
            for b, batch in enumerate(bucket_batches(dataset.samples, indices, batch_size)):
                generator = torch.Generator().manual_seed(VALIDATION_SEED + b)
                total += float(task.loss(batch, dataset, generator, autocast)) * len(batch)
                count += len(batch)
    finally:
        task.train()
    return total / max(1, count)
