"""Family `sd`: Stable Diffusion 1.x and 2.x (one CLIP text encoder, a UNet with 4 input channels).

Detected from a diffusers folder whose `model_index.json` says `StableDiffusionPipeline` (and whose UNet
takes 4 channels: a 9-channel inpainting UNet is not this family), or from a single file holding
`cond_stage_model.` keys (the original LDM layout) and no SDXL `conditioner.` keys.

This module is light (no torch): the loader and the task are in `trainer.families.sd_task`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from trainer.errors import Problem
from trainer.families import diffusion
from trainer.families.probe import Probe

NAME = "sd"
TITLE = "Stable Diffusion 1.x/2.x"
MODE = "image"
PIPELINE_CLASSES = ("StableDiffusionPipeline",)
SINGLE_FILE_SIGNATURE = "cond_stage_model."
LORA_VERSIONS = ("sd_v1", "sd_v2", "sd_v2_768_v")
HAS_TEXT_ENCODER = True
DEFAULT_RESOLUTION = 512
# The UNet attention projections: what most SD LoRA trainers (kohya, diffusers' example) adapt by default.
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
OWN_KEYS = {**diffusion.IMAGE_KEYS, **diffusion.UNET_KEYS}  # family-specific keys it reads (families.key_problems)
VRAM_SHAPE_FIELDS = ("resolution", "cache_latents")  # the settings besides the model that shape its memory
ACT_FACTOR = 0.58  # activations under mixed precision, as a fraction of fp32 (see trainer.checks.vram)


def detect(p: Probe) -> bool:
    if p.unet_in_channels not in (None, 4):
        return False  # inpainting (9) / depth (5) UNets need other inputs
    if p.kind == "folder":
        return p.class_name in PIPELINE_CLASSES
    return p.kind == "file" and p.has_prefix(SINGLE_FILE_SIGNATURE) and not p.has_prefix("conditioner.")


def defaults(p: Probe, cfg) -> dict:
    return {"resolution": DEFAULT_RESOLUTION, "target_modules": list(DEFAULT_TARGETS),
            "text_encoder_target_modules": list(DEFAULT_TE_TARGETS)}


def check(cfg, p: Probe) -> list[Problem]:
    return diffusion.check(cfg, p, sys.modules[__name__])


def shipped_config_name(p: Probe) -> str:
    """The shipped config for a single file: SD2 when its text encoder is OpenCLIP (`cond_stage_model.model.`),
    as the 768 px v-prediction release (what diffusers assumes too; for 2.x base at 512 px set
    base_model_config to a saved SD2-base folder); else SD1.5."""
    return "sd2-768-v" if p.has_prefix("cond_stage_model.model.") else "sd15"


def config_dir(cfg) -> Path | None:
    """The diffusers-format folder holding this model's component configs."""
    return diffusion.config_dir(cfg, sys.modules[__name__])


def scan_dataset(cfg):
    return diffusion.scan_dataset(cfg)


def make_dataset(cfg, samples):
    return diffusion.make_dataset(cfg, samples)


def load_base(cfg, device, dtype):
    from trainer.families.sd_task import load_sd_base

    return load_sd_base(cfg, device, dtype)


def make_task(cfg, base, device):
    from trainer.families.sd_task import SdTask

    return SdTask(cfg, base, device)


def lora_claims(keys: set[str], metadata: dict[str, str]) -> bool:
    version = metadata.get("ss_base_model_version")
    if version:
        return version in LORA_VERSIONS
    return any(k.startswith("lora_te_") for k in keys)  # one text encoder (SDXL writes lora_te1_/lora_te2_)


def vram_summary(model_dir: Path, targets: tuple[str, ...], te_targets: tuple[str, ...]):
    from trainer.checks.vram import unet_model_summary

    return unet_model_summary(model_dir, targets, te_targets)


def vram_per_sample_bytes(summary, shape: dict) -> float:
    from trainer.checks.vram import unet_per_sample_bytes

    return unet_per_sample_bytes(summary, shape)


def preload() -> None:
    from trainer.families.sd_task import preload as load

    load()
