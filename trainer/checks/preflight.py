"""Everything checked before a model loads: the config, the paths it names, and the dataset.

`preflight(path)` is what `lora-train validate`, `agentd validate`, `agentd run` and the daemon call.
It raises one `ConfigError` holding every problem, so nothing is written when the input is bad.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from trainer.config import TrainConfig, load_config
from trainer import families
from trainer.runs import history as runs
from trainer.training import sampling, validation_loss as validation
from trainer.data.images import Scan, fingerprint
from trainer.errors import ConfigError, Problem, content_free
from trainer.training.optim import optimizer_problems
from trainer.families.probe import probe, safetensors_header


@dataclass
class Checked:
    config: TrainConfig
    scan: Scan
    warnings: list[str] = field(default_factory=list)
    source: str | None = None
    train_samples: list | None = None  # None: all of scan.samples (no validation split)
    validation_samples: list = field(default_factory=list)

    @cached_property
    def data_fingerprint(self) -> str:
        """Computed once (a stat of every sample), then reused by resume checks, checkpoints and run.json."""
        return fingerprint(self.scan.samples)


def preflight(config_path: str | Path, overrides: dict | None = None) -> Checked:
    cfg = load_config(config_path, overrides)
    return check_config(cfg, source=str(config_path))


def check_config(cfg: TrainConfig, source: str | None = None) -> Checked:
    """Every problem of `cfg` at once (ConfigError), or the checked config completed with its model
    family and the family's defaults (`trainer.families.resolve`)."""
    problems: list[Problem] = _base_model_problems(cfg)
    fam = model_probe = None
    if not problems:
        cfg, fam, model_probe, family_problems = families.resolve(cfg)
        problems += family_problems
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        problems.append(Problem("output_dir", "exists and is a file", "point output_dir at a folder", str(out)))
    elif _nearest_existing(out) is not None and not _nearest_existing(out).is_dir():
        problems.append(Problem("output_dir", f"a parent path is a file: {_nearest_existing(out)}",
                                "choose a folder path", str(out)))
    if cfg.init_lora_weights is not None and not cfg.init_lora_weights.is_file():
        problems.append(Problem("init_lora_weights", "file does not exist",
                                "point it at a .safetensors LoRA, or remove the key", str(cfg.init_lora_weights)))
    if cfg.resume not in ("auto", "never", "strict") and not Path(cfg.resume).is_dir():
        problems.append(Problem("resume", "checkpoint folder does not exist",
                                "use auto, never, strict, or an existing checkpoints/step-N folder", cfg.resume))
    problems += optimizer_problems(cfg)  # a missing optimizer library (the device is checked when the job starts)
    if fam is not None:
        problems += fam.check(cfg, model_probe)
        problems += _init_lora_problems(cfg, fam)
    # Without a family (the model is missing or unknown) the data is still checked, as `mode` says.
    scan = (fam or families.family(cfg.family_name)).scan_dataset(cfg)
    problems += scan.problems
    # The held-out validation set, sample prompts and compare_with (trainer.validation/sampling/runs).
    scan_dir = lambda d: (fam or families.family(cfg.family_name)).scan_dataset(validation.as_train_dir(cfg, d))  # noqa: E731
    train_samples, held_out, val_problems = validation.validation_set(cfg, scan.samples, scan_dir)
    problems += val_problems + sampling.problems(cfg) + runs.problems(cfg)
    if problems:
        raise ConfigError(problems, source)
    warnings = list(scan.warnings)
    if cfg.recommended_batch_size is not None and cfg.batch_size > cfg.recommended_batch_size:
        warnings.append(f"batch_size {cfg.batch_size} is larger than recommended_batch_size "
                        f"{cfg.recommended_batch_size}: it may not fit in GPU memory")
    return Checked(cfg, scan, warnings, source, train_samples, held_out)


def _nearest_existing(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return None


def _base_model_problems(cfg: TrainConfig) -> list[Problem]:
    """The path itself (exists, a folder or a readable checkpoint); what it is, `families.resolve` says."""
    p = probe(cfg.base_model)
    if p.kind == "missing":
        return [Problem("base_model", "does not exist", "point base_model at a model folder (diffusers: "
                        "model_index.json; transformers: config.json) or a .safetensors/.ckpt file",
                        str(cfg.base_model))]
    if p.kind == "unreadable":
        return [Problem("base_model", p.error or "is not a model checkpoint",
                        "use a diffusers or transformers folder, or a .safetensors/.ckpt checkpoint",
                        str(cfg.base_model))]
    return []


def _init_lora_problems(cfg: TrainConfig, fam) -> list[Problem]:
    """A starting LoRA must be for this family (read from its header: no weights, no torch)."""
    path = cfg.init_lora_weights
    if path is None or not path.is_file() or path.suffix.lower() != ".safetensors":
        return []
    try:
        shapes, metadata = safetensors_header(path)
    except (OSError, ValueError, struct.error) as e:
        return [Problem("init_lora_weights", f"is not a readable safetensors LoRA ({content_free(e)})",
                        "point it at a .safetensors LoRA", str(path))]
    other = families.family_of_lora(set(shapes), metadata)
    if other is not None and other != fam.NAME:
        what = metadata.get("ss_base_model_version") or "its key names"
        return [Problem("init_lora_weights", f"is a LoRA for {other} ({families.family(other).TITLE}; "
                        f"{what}), but base_model is a {fam.NAME} model ({fam.TITLE})",
                        f"start from a LoRA trained on a {fam.TITLE} model, or remove init_lora_weights",
                        str(path))]
    return []
