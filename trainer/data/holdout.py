"""The held-out validation set: `validation_split` of the data, or the samples of `validation_data_dir` /
`validation_file`.

The split is chosen from the sorted sample paths by a fixed seed, so it depends on the data alone, not on
the run's `seed`: runs of the same data validate on the same samples. The loss on it: `trainer.training.validation_loss`.
"""
from __future__ import annotations

import random
from pathlib import Path

from trainer.errors import Problem

VALIDATION_SEED = 0x5EED  # the split's seed, and the base of the validation noise (trainer.training.validation_loss)


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
    meta = Path(folder) / "metadata.csv"
    return cfg.model_copy(update={"train_data_dir": Path(folder), "metadata_path": meta if meta.is_file() else None,
                                  "datasets": None})
