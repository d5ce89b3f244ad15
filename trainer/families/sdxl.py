"""Family `sdxl`: Stable Diffusion XL base and its fine-tunes (Pony, Illustrious, NoobAI ...).

Two text encoders (CLIP-L and OpenCLIP-G with a projection), pooled text embeddings and per-sample
`time_ids` (original size, crop top-left, target size) as added UNet conditioning; the VAE kept in fp32
(SDXL's VAE overflows in fp16). Detected from a diffusers folder whose `model_index.json` says
`StableDiffusionXLPipeline`, or from a single file holding `conditioner.embedders.1` (SGM layout).
The refiner (`StableDiffusionXLImg2ImgPipeline`, no first text encoder) is not this family.

A UNet family like `sd` (its subclass: the same defaults, checks and memory formula). Light (no torch):
the loader and the task are in `trainer.families.sdxl_task`.
"""
from __future__ import annotations

from trainer.families.probe import Probe
from trainer.families.sd import SdFamily


class SdxlFamily(SdFamily):
    NAME = "sdxl"
    TITLE = "Stable Diffusion XL"
    PIPELINE_CLASSES = ("StableDiffusionXLPipeline",)
    SINGLE_FILE_SIGNATURE = "conditioner.embedders.1."
    LORA_VERSIONS = ("sdxl_base_v1-0",)
    LORA_KEY_PREFIXES = ("lora_te1_", "lora_te2_")
    DEFAULT_RESOLUTION = 1024
    # DEFAULT_TARGETS / DEFAULT_TE_TARGETS: sd's (UNet attention and both encoders' CLIP attention, as kohya's
    # and diffusers' SDXL scripts).
    SHIPPED_CONFIG = "sdxl-base"

    def detect(self, p: Probe) -> bool:
        if p.unet_in_channels not in (None, 4):
            return False
        if p.kind == "folder":
            return p.class_name in self.PIPELINE_CLASSES
        return p.kind == "file" and p.has_prefix(self.SINGLE_FILE_SIGNATURE)

    def shipped_config_name(self, p: Probe) -> str:
        return self.SHIPPED_CONFIG

    def claims_version(self, version: str) -> bool:
        return version.startswith("sdxl")

    def load_base(self, cfg, device, dtype):
        from trainer.families.sdxl_task import load_sdxl_base

        return load_sdxl_base(cfg, device, dtype, self.loading_config_dir(cfg))

    def make_task(self, cfg, base, device):
        from trainer.families.sdxl_task import SdxlTask

        return SdxlTask(cfg, base, device)

    def preload(self) -> None:
        from trainer.families.sdxl_task import preload

        preload()


FAMILY = SdxlFamily()
