"""Everything checked before a model loads: the config, the paths it names, and the dataset.

`preflight(path)` is what `lora-train validate`, `agentd validate`, `agentd run` and the daemon call.
It raises one `ConfigError` holding every problem, so nothing is written when the input is bad.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from trainer.config import TrainConfig, load_config
from trainer.data import Scan, fingerprint, scan_image_dataset, scan_text_dataset
from trainer.errors import ConfigError, Problem

SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt"}


@dataclass
class Checked:
    config: TrainConfig
    scan: Scan
    warnings: list[str] = field(default_factory=list)
    source: str | None = None

    @cached_property
    def data_fingerprint(self) -> str:
        """Computed once (a stat of every sample), then reused by resume checks, checkpoints and run.json."""
        return fingerprint(self.scan.samples)


def preflight(config_path: str | Path, overrides: dict | None = None) -> Checked:
    cfg = load_config(config_path, overrides)
    return check_config(cfg, source=str(config_path))


def check_config(cfg: TrainConfig, source: str | None = None) -> Checked:
    problems: list[Problem] = []
    problems += _base_model_problems(cfg)
    out = cfg.output_dir
    if out.exists() and not out.is_dir():
        problems.append(Problem("output_dir", "exists and is a file", "point output_dir at a folder", str(out)))
    elif _nearest_existing(out) is not None and not _nearest_existing(out).is_dir():
        problems.append(Problem("output_dir", f"a parent path is a file: {_nearest_existing(out)}",
                                "choose a folder path", str(out)))
    if cfg.init_lora_weights is not None and not cfg.init_lora_weights.is_file():
        problems.append(Problem("init_lora_weights", "file does not exist",
                                "point it at a .safetensors LoRA, or remove the key", str(cfg.init_lora_weights)))
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        problems.append(Problem("resume", "checkpoint folder does not exist",
                                "use auto, never, or an existing checkpoints/step-N folder", cfg.resume))
    if cfg.mode == "image":
        scan = scan_image_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.skip_bad_images)
    else:
        scan = scan_text_dataset(cfg.train_data_dir)
        if not problems:  # target modules are checked against the model's config (meta device, no weights)
            from trainer.text_task import check_text_targets

            problems += check_text_targets(cfg)
    problems += scan.problems
    if problems:
        raise ConfigError(problems, source)
    warnings = list(scan.warnings)
    if cfg.recommended_batch_size is not None and cfg.batch_size > cfg.recommended_batch_size:
        warnings.append(f"batch_size {cfg.batch_size} is larger than recommended_batch_size "
                        f"{cfg.recommended_batch_size}: it may not fit in GPU memory")
    return Checked(cfg, scan, warnings, source)


def _nearest_existing(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if p.exists():
            return p
    return None


def _base_model_problems(cfg: TrainConfig) -> list[Problem]:
    p = cfg.base_model
    marker = "model_index.json" if cfg.mode == "image" else "config.json"
    if not p.exists():
        return [Problem("base_model", "does not exist",
                        f"point base_model at a diffusers folder ({marker}) or a .safetensors/.ckpt file", str(p))]
    if p.is_dir():
        if not (p / marker).is_file():
            return [Problem("base_model", f"folder is not a {'diffusers' if cfg.mode == 'image' else 'transformers'} "
                            f"model (no {marker})", "point it at the model's top folder", str(p))]
        return []
    if cfg.mode == "text":
        return [Problem("base_model", "text mode needs a transformers model folder (config.json)",
                        "save the model with save_pretrained and point base_model at that folder", str(p))]
    if p.suffix.lower() not in SINGLE_FILE_SUFFIXES or not _looks_like_checkpoint(p):
        return [Problem("base_model", "is not a model checkpoint", "use a diffusers folder or a Stable Diffusion "
                        ".safetensors/.ckpt file", str(p))]
    problems = []
    if cfg.base_model_config is None:
        problems.append(Problem(
            "base_model_config", "a single-file base_model needs a local config folder to load offline",
            "set base_model_config to a diffusers-format folder for the same architecture (model_index.json, "
            "unet/vae/text_encoder configs, scheduler, tokenizer files), e.g. a saved pipeline or HF cache snapshot",
            None))
    elif not (cfg.base_model_config / "model_index.json").is_file():
        problems.append(Problem("base_model_config", "is not a diffusers-format folder (no model_index.json)",
                                "point it at a folder with model_index.json and component configs",
                                str(cfg.base_model_config)))
    return problems


def _looks_like_checkpoint(p: Path) -> bool:
    """Cheap header check: a safetensors JSON header, or a torch zip/pickle file."""
    try:
        with p.open("rb") as f:
            head = f.read(8)
            if p.suffix.lower() == ".safetensors":
                if len(head) < 8:
                    return False
                (n,) = struct.unpack("<Q", head)
                if n <= 0 or n > 100_000_000:
                    return False
                json.loads(f.read(n))
                return True
            return head[:2] == b"PK" or head[:1] == b"\x80"
    except (OSError, ValueError):
        return False
