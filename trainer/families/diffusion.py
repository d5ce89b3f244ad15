"""What the diffusion families (sd, sdxl, flux) share before any weights load (`DiffusionFamily`): where
their component configs are (the model folder, `base_model_config`, or for a single file the family's
shipped config, `trainer/families/model_configs/`), the preflight checks that read them, and the image
dataset.

Light: no torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import trainer.families.memory as memory
import trainer.families.peft_lora as peft_lora
from trainer.errors import Problem
from trainer.families.base import Family
from trainer.families.probe import Probe, probe
from trainer.families.shipped import TOKENIZER_FIX, materialize, shipped_dir, tokenizer_problem


# Config keys only the diffusion (image) families read: a text config that sets one is refused
# (`trainer.families.key_problems`). Each family's OWN_KEYS starts from these.
IMAGE_KEYS: dict[str, tuple | None] = dict.fromkeys((
    "datasets", "metadata_path", "caption_extension", "prior_loss_weight", "resolution", "center_crop",
    "random_flip", "skip_bad_images", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
    "bucket_no_upscale", "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
    "caption_dropout_rate", "caption_tag_dropout_rate", "caption_prefix", "caption_suffix",
    "text_encoder_target_modules", "text_encoder_lr", "cache_latents", "cache_latents_to_disk",
    "cache_text_embeddings", "cache_text_embeddings_to_disk", "compile", "noise_offset",
    "multires_noise_iterations", "multires_noise_discount", "masked_loss", "alpha_mask", "mask_dir",
    "sample_sampler"))
# Keys of the UNet families (sd, sdxl) that a rectified-flow transformer (flux) has no use for.
UNET_KEYS: dict[str, tuple | None] = dict.fromkeys(("clip_skip", "min_snr_gamma"))


class DiffusionFamily(Family):
    """An image family read by diffusers: SINGLE_FILE_SIGNATURE names the tensor-name prefix its single-file
    checkpoints hold; `shipped_config_name(probe)` the shipped config such a file loads with (None: none)."""

    MODE = "image"
    HAS_TEXT_ENCODER = True
    SINGLE_FILE_SIGNATURE: str
    DEFAULT_RESOLUTION: int

    def shipped_config_name(self, p: Probe) -> str | None:
        return None

    def defaults(self, p: Probe, cfg) -> dict:
        return {"resolution": self.DEFAULT_RESOLUTION, "target_modules": list(self.DEFAULT_TARGETS),
                "text_encoder_target_modules": list(self.DEFAULT_TE_TARGETS)}

    def config_dir(self, cfg) -> Path | None:
        """The diffusers-format folder with the model's component configs: the model folder itself, or for a
        single file its `base_model_config`, else the family's shipped config for the file's key layout
        (the JSON files in the package: enough for checks and estimates; loading uses `loading_config_dir`)."""
        if cfg.base_model.is_dir():
            return cfg.base_model
        if cfg.base_model_config is not None:
            return cfg.base_model_config
        name = self.shipped_config_name(probe(cfg.base_model))
        return shipped_dir(name) if name else None

    def loading_config_dir(self, cfg) -> Path | None:
        """The complete config folder `from_single_file` loads a single-file base_model with (tokenizer files
        included); None for a model folder."""
        if cfg.base_model.is_dir():
            return None
        if cfg.base_model_config is not None:
            return cfg.base_model_config
        return materialize(self.shipped_config_name(probe(cfg.base_model)))

    def check(self, cfg, p: Probe, describe) -> list[Problem]:
        """Preflight for a UNet family: the config folder of a single file, the resolution."""
        problems: list[Problem] = []
        if p.kind == "file":
            problems += self._single_file_config_problems(cfg, describe)
        factor = latent_factor(self.config_dir(cfg)) if not problems else None
        if factor and cfg.resolution % (factor * 8):
            step = factor * 8
            lower, upper = max(step, cfg.resolution // step * step), (cfg.resolution // step + 1) * step
            problems.append(Problem(
                "resolution", f"must be a multiple of {step} for this model ({self.TITLE}: the VAE downscales by "
                f"{factor} and the UNet halves the latent 3 times)", f"use {lower} or {upper}", cfg.resolution))
        if factor and cfg.enable_bucket:
            problems += _bucket_problems(cfg, factor)
        if factor and cfg.network.type == "lokr" and cfg.network.factor > 0:
            layers = memory.unet_target_dims(self.config_dir(cfg), cfg.target_modules)
            problems += peft_lora.factor_problems(cfg.network.factor, layers)
        return problems

    def _single_file_config_problems(self, cfg, describe) -> list[Problem]:
        folder = cfg.base_model_config
        if folder is None:
            problem = tokenizer_problem(self.shipped_config_name(probe(cfg.base_model)))
            if problem:
                return [Problem("base_model", problem, TOKENIZER_FIX, str(cfg.base_model))]
            return []  # the shipped config of this architecture (trainer/families/model_configs/) is used
        cp = probe(folder)
        if cp.kind != "folder" or not cp.class_name:
            return [Problem("base_model_config", "is not a diffusers-format folder (no model_index.json)",
                            "point it at a folder with model_index.json and component configs", str(folder))]
        if cp.class_name not in self.PIPELINE_CLASSES:
            return [Problem(
                "base_model_config", f"is {describe(cp)}, but base_model is a {self.TITLE} checkpoint "
                f"(its keys hold {self.SINGLE_FILE_SIGNATURE!r})",
                f"point base_model_config at a {' or '.join(self.PIPELINE_CLASSES)} folder, or remove it",
                str(folder))]
        return []

    def scan_dataset(self, cfg):
        from trainer.data.images import scan_image_subsets

        return scan_image_subsets(cfg)  # train_data_dir (plain or N_name folders) or datasets:, with buckets

    def make_dataset(self, cfg, samples):
        from trainer.data.images import ImageDataset

        return ImageDataset(samples, cfg.resolution, cfg.center_crop, cfg.random_flip, alpha_mask=cfg.alpha_mask,
                            masked_loss=cfg.masked_loss, prior_loss_weight=cfg.prior_loss_weight)


def latent_factor(folder: Path | None) -> int | None:
    """Pixels per latent pixel: 2 ** (VAE levels - 1) (8 for every released SD/SDXL VAE)."""
    if folder is None:
        return None
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _bucket_problems(cfg, factor: int) -> list[Problem]:
    """Bucket sides are multiples of bucket_reso_steps, which must keep the latent whole."""
    step = cfg.bucket_reso_steps
    if step % factor:
        return [Problem("bucket_reso_steps", f"must be a multiple of {factor} (the VAE downscales by {factor}: a "
                        "bucket side must give a whole latent)", f"use {max(factor, step // factor * factor)} or "
                        f"{(step // factor + 1) * factor} (64, kohya's default, suits every UNet)", step)]
    return [Problem(key, f"must be a multiple of bucket_reso_steps ({step})",
                    f"use {getattr(cfg, key) // step * step or step}", getattr(cfg, key))
            for key in ("min_bucket_reso", "max_bucket_reso") if getattr(cfg, key) % step]
