"""Family `sd`: Stable Diffusion 1.x and 2.x (one CLIP text encoder, a UNet with 4 input channels).

Detected from a diffusers folder whose `model_index.json` says `StableDiffusionPipeline` (and whose UNet
takes 4 channels: a 9-channel inpainting UNet is not this family), or from a single file holding
`cond_stage_model.` keys (the original LDM layout) and no SDXL `conditioner.` keys.

This module is light (no torch): the loader and the task are in `trainer.families.sd_task`.
"""
from __future__ import annotations

from pathlib import Path

import trainer.families.memory as memory
from trainer.families.diffusion import IMAGE_KEYS, UNET_KEYS, DiffusionFamily
from trainer.families.probe import Probe


class SdFamily(DiffusionFamily):
    NAME = "sd"
    TITLE = "Stable Diffusion 1.x/2.x"
    PIPELINE_CLASSES = ("StableDiffusionPipeline",)
    SINGLE_FILE_SIGNATURE = "cond_stage_model."
    LORA_VERSIONS = ("sd_v1", "sd_v2", "sd_v2_768_v")
    LORA_KEY_PREFIXES = ("lora_te_",)  # one text encoder (SDXL writes lora_te1_/lora_te2_)
    DEFAULT_RESOLUTION = 512
    # The UNet attention projections: what most SD LoRA trainers (kohya, diffusers' example) adapt by default.
    DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
    DEFAULT_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
    # Every network type: its UNet has the convolutions LoCon adds, its LoRA file is kohya's (LyCORIS's keys).
    NETWORK_TYPES = ("lora", "locon", "loha", "lokr")
    DORA = True
    OWN_KEYS = {**IMAGE_KEYS, **UNET_KEYS}  # family-specific keys it reads (families.key_problems)
    VRAM_SHAPE_FIELDS = ("resolution", "cache_latents")  # the settings besides the model that shape its memory
    ACT_FACTOR = 0.58  # activations under mixed precision, as a fraction of fp32 (see trainer.checks.vram)

    def detect(self, p: Probe) -> bool:
        if p.unet_in_channels not in (None, 4):
            return False  # inpainting (9) / depth (5) UNets need other inputs
        if p.kind == "folder":
            return p.class_name in self.PIPELINE_CLASSES
        return p.kind == "file" and p.has_prefix(self.SINGLE_FILE_SIGNATURE) and not p.has_prefix("conditioner.")

    def shipped_config_name(self, p: Probe) -> str:
        """The shipped config for a single file: SD2 when its text encoder is OpenCLIP (`cond_stage_model.model.`),
        as the 768 px v-prediction release (what diffusers assumes too; for 2.x base at 512 px set
        base_model_config to a saved SD2-base folder); else SD1.5."""
        return "sd2-768-v" if p.has_prefix("cond_stage_model.model.") else "sd15"

    def load_base(self, cfg, device, dtype):
        from trainer.families.sd_task import load_sd_base

        return load_sd_base(cfg, device, dtype, self.loading_config_dir(cfg))

    def make_task(self, cfg, base, device):
        from trainer.families.sd_task import SdTask

        return SdTask(cfg, base, device)

    def vram_summary(self, model_dir: Path, targets: tuple[str, ...], te_targets: tuple[str, ...]):
        return memory.unet_model_summary(model_dir, targets, te_targets)

    def vram_network_counts(self, model_dir: Path, targets, te_targets, network, rank: int,
                            alpha: float) -> dict[str, int]:
        return memory.image_network_counts(model_dir, targets, te_targets, network, rank, alpha)

    def vram_per_sample_bytes(self, summary, shape: dict) -> float:
        return memory.unet_per_sample_bytes(summary, shape)

    def preload(self) -> None:
        from trainer.families.sd_task import preload

        preload()


FAMILY = SdFamily()
