"""Family `sdxl`: Stable Diffusion XL base and its fine-tunes (Pony, Illustrious, NoobAI ...).

Two text encoders (CLIP-L and OpenCLIP-G with a projection), pooled text embeddings and per-sample
`time_ids` (original size, crop top-left, target size) as added UNet conditioning; the VAE kept in fp32
(SDXL's VAE overflows in fp16). Detected from a diffusers folder whose `model_index.json` says
`StableDiffusionXLPipeline`, or from a single file holding `conditioner.embedders.1` (SGM layout).
The refiner (`StableDiffusionXLImg2ImgPipeline`, no first text encoder) is not this family.

Light (no torch): the loader and the task are in `trainer.families.sdxl_task`.
"""
from __future__ import annotations

import sys
from pathlib import Path

from trainer.errors import Problem
from trainer.families import diffusion, sd
from trainer.families.probe import Probe

NAME = "sdxl"
TITLE = "Stable Diffusion XL"
MODE = "image"
PIPELINE_CLASSES = ("StableDiffusionXLPipeline",)
SINGLE_FILE_SIGNATURE = "conditioner.embedders.1."
LORA_VERSIONS = ("sdxl_base_v1-0",)
HAS_TEXT_ENCODER = True
DEFAULT_RESOLUTION = 1024
DEFAULT_TARGETS = sd.DEFAULT_TARGETS            # UNet attention, as kohya's and diffusers' SDXL scripts
DEFAULT_TE_TARGETS = sd.DEFAULT_TE_TARGETS      # CLIP attention of both encoders
SHIPPED_CONFIG = "sdxl-base"
OWN_KEYS = {**diffusion.IMAGE_KEYS, **diffusion.UNET_KEYS}  # family-specific keys it reads (families.key_problems)
VRAM_SHAPE_FIELDS = ("resolution", "cache_latents")
ACT_FACTOR = sd.ACT_FACTOR


def detect(p: Probe) -> bool:
    if p.unet_in_channels not in (None, 4):
        return False
    if p.kind == "folder":
        return p.class_name in PIPELINE_CLASSES
    return p.kind == "file" and p.has_prefix(SINGLE_FILE_SIGNATURE)


def defaults(p: Probe, cfg) -> dict:
    return {"resolution": DEFAULT_RESOLUTION, "target_modules": list(DEFAULT_TARGETS),
            "text_encoder_target_modules": list(DEFAULT_TE_TARGETS)}


def check(cfg, p: Probe) -> list[Problem]:
    return diffusion.check(cfg, p, sys.modules[__name__])


def shipped_config_name(p: Probe) -> str:
    return SHIPPED_CONFIG


def config_dir(cfg) -> Path | None:
    return diffusion.config_dir(cfg, sys.modules[__name__])


def scan_dataset(cfg):
    return diffusion.scan_dataset(cfg)


def make_dataset(cfg, samples):
    return diffusion.make_dataset(cfg, samples)


def load_base(cfg, device, dtype):
    from trainer.families.sdxl_task import load_sdxl_base

    return load_sdxl_base(cfg, device, dtype)


def make_task(cfg, base, device):
    from trainer.families.sdxl_task import SdxlTask

    return SdxlTask(cfg, base, device)


def lora_claims(keys: set[str], metadata: dict[str, str]) -> bool:
    version = metadata.get("ss_base_model_version")
    if version:
        return version.startswith("sdxl")
    return any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys)


def vram_summary(model_dir: Path, targets: tuple[str, ...], te_targets: tuple[str, ...]):
    from trainer.checks.vram import unet_model_summary

    return unet_model_summary(model_dir, targets, te_targets)


def vram_per_sample_bytes(summary, shape: dict) -> float:
    from trainer.checks.vram import unet_per_sample_bytes

    return unet_per_sample_bytes(summary, shape)


def preload() -> None:
    from trainer.families.sdxl_task import preload as load

    load()
