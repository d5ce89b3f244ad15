"""Family `sdxl`, the heavy half: `SdxlTask` is `SdTask` with SDXL's conditioning.

- Two text encoders: CLIP-L (`text_encoder`) and OpenCLIP-G with a projection (`text_encoder_2`). The
  UNet's context is both encoders' penultimate hidden states, concatenated (768 + 1280 = 2048); the
  pooled embedding is the second encoder's projected output (diffusers' `encode_prompt`, kohya's
  sdxl_train_util).
- Per-sample `time_ids` = (original height, width, crop top, left, target height, width): what the data
  pipeline did to that image (`trainer.data.images.ImageItem`), not the training resolution repeated.
- LoRA on both text encoders with `train_text_encoder` (their own `text_encoder_lr`); kohya key prefixes
  `lora_te1_` / `lora_te2_`; `ss_base_model_version` `sdxl_base_v1-0`.
- The VAE stays fp32 (SDXL's VAE overflows in fp16: `force_upcast` in its config).
- v-prediction and zero-terminal-SNR checkpoints train as their scheduler config says (`prediction_type`,
  `rescale_betas_zero_snr` carried over into the training DDPM scheduler).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.families.sd_task import SdBase, SdTask, freeze_and_place
from trainer.quiet import quiet_libraries


@dataclass
class SdxlBase(SdBase):
    text_encoder_2: torch.nn.Module = None
    tokenizer_2: object = None

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}


def preload() -> None:
    quiet_libraries()
    from diffusers import StableDiffusionXLPipeline  # noqa: F401
    from transformers import CLIPTextModelWithProjection  # noqa: F401


def training_scheduler(config):
    """DDPM over the checkpoint's noise schedule (SDXL folders ship Euler for inference), keeping its
    prediction type and zero-terminal-SNR rescaling."""
    from diffusers import DDPMScheduler

    keep = {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                   "trained_betas", "prediction_type", "rescale_betas_zero_snr", "steps_offset",
                                   "timestep_spacing") if k in config}
    return DDPMScheduler(**keep, clip_sample=False)


def load_sdxl_base(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype,
                   single_file_config: Path | None = None) -> SdxlBase:
    """Load SDXL from a diffusers folder or a single-file (SGM layout) checkpoint, offline, frozen.
    `single_file_config`: for a single file, the config folder it loads with (the family's `loading_config_dir`)."""
    quiet_libraries()
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = cfg.base_model
    if path.is_dir():
        kw = dict(local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        import json

        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    else:
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(path), config=str(single_file_config), local_files_only=True)
        tokenizer, tokenizer_2 = pipe.tokenizer, pipe.tokenizer_2
        text_encoder, text_encoder_2, vae, unet = pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.unet
        scheduler_config = dict(pipe.scheduler.config)
    freeze_and_place([unet, text_encoder, text_encoder_2], vae, device, weight_dtype)
    return SdxlBase(unet, vae, text_encoder, tokenizer, training_scheduler(scheduler_config), str(path),
                    "sdxl_base_v1-0", text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


class SdxlTask(SdTask):
    LORA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        base = self.base
        hidden, pooled = [], None
        for tok, te in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            ids = tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                      return_tensors="pt").input_ids.to(self.device)
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled}

    def unet_kwargs(self, encoded: dict[str, torch.Tensor], geometry: list[tuple]) -> dict:
        time_ids = torch.tensor([[*orig, *crop, *target] for orig, crop, target in geometry],
                                dtype=encoded["pooled"].dtype, device=self.device)
        return {"encoder_hidden_states": encoded["hidden"],
                "added_cond_kwargs": {"text_embeds": encoded["pooled"], "time_ids": time_ids}}

    def pipeline(self, scheduler):
        from diffusers import StableDiffusionXLPipeline

        base = self.base
        return StableDiffusionXLPipeline(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder,
                                         text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                                         tokenizer_2=base.tokenizer_2, scheduler=scheduler)

    def _prompt_embeds(self, pipe, prompt) -> dict[str, torch.Tensor]:
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt.prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=prompt.negative or None)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}
