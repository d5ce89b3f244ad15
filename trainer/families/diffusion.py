"""What the diffusion families (sd, sdxl; flux next) share before any weights load: where their
component configs are, the preflight checks that read them, and the image dataset.

Light: no torch. Each family module passes itself (`this`) so messages name the family.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

from trainer.errors import Problem
from trainer.families.probe import Probe, probe


def config_dir(cfg) -> Path | None:
    """The diffusers-format folder with the model's component configs: the model folder itself, or for a
    single file its `base_model_config`."""
    if cfg.base_model.is_dir():
        return cfg.base_model
    return cfg.base_model_config


def latent_factor(folder: Path | None) -> int | None:
    """Pixels per latent pixel: 2 ** (VAE levels - 1) (8 for every released SD/SDXL VAE)."""
    if folder is None:
        return None
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check(cfg, p: Probe, this: ModuleType) -> list[Problem]:
    """Preflight for a diffusion family: the config folder of a single file, the resolution."""
    problems: list[Problem] = []
    if p.kind == "file":
        problems += _single_file_config_problems(cfg, this)
    folder = config_dir(cfg)
    factor = latent_factor(folder) if not problems else None
    if factor and cfg.resolution % (factor * 8):
        step = factor * 8
        lower, upper = max(step, cfg.resolution // step * step), (cfg.resolution // step + 1) * step
        problems.append(Problem(
            "resolution", f"must be a multiple of {step} for this model ({this.TITLE}: the VAE downscales by "
            f"{factor} and the UNet halves the latent 3 times)", f"use {lower} or {upper}", cfg.resolution))
    return problems


def _single_file_config_problems(cfg, this: ModuleType) -> list[Problem]:
    folder = cfg.base_model_config
    if folder is None:
        return [Problem(
            "base_model_config", "a single-file base_model needs a local config folder to load offline",
            "set base_model_config to a diffusers-format folder for the same architecture (model_index.json, "
            "unet/vae/text_encoder configs, scheduler, tokenizer files), e.g. a saved pipeline or HF cache snapshot",
            None)]
    cp = probe(folder)
    if cp.kind != "folder" or not cp.class_name:
        return [Problem("base_model_config", "is not a diffusers-format folder (no model_index.json)",
                        "point it at a folder with model_index.json and component configs", str(folder))]
    if cp.class_name not in this.PIPELINE_CLASSES:
        return [Problem(
            "base_model_config", f"is a {cp.class_name} folder, but base_model is a {this.TITLE} checkpoint "
            f"(its keys hold {this.SINGLE_FILE_SIGNATURE!r})",
            f"point base_model_config at a {' or '.join(this.PIPELINE_CLASSES)} folder, or remove it",
            str(folder))]
    return []


def scan_dataset(cfg):
    from trainer.data import scan_image_dataset

    return scan_image_dataset(cfg.train_data_dir, cfg.metadata_path, cfg.skip_bad_images)


def make_dataset(cfg, samples):
    from trainer.data import ImageDataset

    return ImageDataset(samples, cfg.resolution, cfg.center_crop, cfg.random_flip)
