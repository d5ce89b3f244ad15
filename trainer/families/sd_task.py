"""Family `sd`, the heavy half: a LoRA on a Stable Diffusion UNet (and optionally its CLIP text encoder).

The frozen base (`SdBase`) is loaded once and may be kept warm by the daemon between jobs; the
task adds LoRA layers to it for one job and removes them in `detach()`, so nothing of one job's LoRA
reaches the next.

Loss: the standard noise-prediction MSE (or v-prediction when the scheduler's `prediction_type` is
`v_prediction`) at a uniformly sampled timestep. All randomness of a step (latent sampling, noise,
timesteps) comes from the `generator` the loop passes in, whose state is checkpointed: that is what
makes a resumed run bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainer.config import TrainConfig
from trainer.data import ImageDataset
from trainer import lora_io
from trainer.quiet import quiet_libraries

log = logging.getLogger(__name__)


@dataclass
class SdBase:
    """The frozen parts of a Stable Diffusion model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object
    source: str
    base_model_version: str = "sd_v1"


def preload() -> None:
    """Import what loading a base model needs (diffusers imports its classes lazily, on first use)."""
    quiet_libraries()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from peft import LoraConfig, inject_adapter_in_model  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def load_sd_base(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype) -> SdBase:
    """Load the base from a diffusers folder or a single-file checkpoint, offline, frozen, on `device`."""
    quiet_libraries()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = cfg.base_model
    if path.is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(cfg.base_model_config), local_files_only=True,
            safety_checker=None, requires_safety_checker=False)
        tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    # The VAE stays fp32: encoding in fp16 overflows in SD1.x's VAE (a known NaN source).
    vae.to(device)
    for m in (unet, text_encoder):
        m.to(device) if weight_dtype == torch.float32 else m.to(device, dtype=weight_dtype)
    version = "sd_v2" if getattr(unet.config, "cross_attention_dim", 768) == 1024 else "sd_v1"
    return SdBase(unet, vae, text_encoder, tokenizer, scheduler, str(path), version)


class SdTask:
    """One job's LoRA on an `SdBase`: trainable parameters, the loss, and the LoRA's file format."""

    def __init__(self, cfg: TrainConfig, base: SdBase, device: torch.device):
        from peft import LoraConfig, inject_adapter_in_model

        self.cfg, self.base, self.device = cfg, base, device
        # LoRA init (A: kaiming uniform) draws from the global RNG: seed it so the same config gives
        # the same starting LoRA, cold or warm daemon.
        torch.manual_seed(cfg.seed)
        unet_lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=cfg.effective_targets, init_lora_weights="gaussian")
        inject_adapter_in_model(unet_lora, base.unet)
        self.models = {"unet": base.unet}
        if cfg.train_text_encoder:
            te_lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.effective_te_targets, init_lora_weights="gaussian")
            inject_adapter_in_model(te_lora, base.text_encoder)
            self.models["text_encoder"] = base.text_encoder
        for m in self.models.values():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    # Trainable LoRA weights stay fp32 even when the frozen base is half precision.
                    p.data = p.data.float()
                    p.requires_grad_(True)
        if cfg.gradient_checkpointing:
            # Recompute each block's activations in backward: much less memory, ~30% more compute.
            base.unet.enable_gradient_checkpointing()
        self.latent_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # --- parameters and the LoRA file -------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.base.unet.parameters() if p.requires_grad],
                   "lr": self.cfg.learning_rate}]
        if "text_encoder" in self.models:
            groups.append({"params": [p for p in self.base.text_encoder.parameters() if p.requires_grad],
                           "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def train(self):
        for m in self.models.values():
            m.train()

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The LoRA in kohya format (what A1111, ComfyUI and diffusers' load_lora_weights read)."""
        return lora_io.to_kohya(self.models, self.cfg.effective_alpha)

    def load_lora_state(self, kohya: dict[str, torch.Tensor], source: str) -> None:
        lora_io.load_kohya(self.models, kohya, source)

    def lora_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": self.base.base_model_version,
                "ss_resolution": f"({self.cfg.resolution}, {self.cfg.resolution})",
                "ss_network_train_unet_only": str(not self.cfg.train_text_encoder)}

    def detach(self) -> None:
        """Remove this job's LoRA layers, leaving the base exactly as loaded (for the warm cache)."""
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        if self.cfg.gradient_checkpointing:
            self.base.unet.disable_gradient_checkpointing()
        for m in self.models.values():
            recurse_remove_peft_layers(m)
            if "peft_config" in m.__dict__:
                del m.peft_config  # else the next job's inject_adapter_in_model sees a stale adapter config
            m.requires_grad_(False)
            m.eval()
        self.latent_cache.clear()

    # --- data -------------------------------------------------------------------------------------
    def prepare(self, dataset: ImageDataset) -> None:
        """With cache_latents: encode every image once; keep the latent distribution (mean, std), sample it
        per step."""
        if not self.cfg.cache_latents:
            return
        with torch.no_grad():
            for i in range(len(dataset)):
                pixels, _ = dataset.load(i)
                dist = self.base.vae.encode(pixels[None].to(self.device, torch.float32)).latent_dist
                self.latent_cache[i] = (dist.mean[0].cpu(), dist.std[0].cpu())

    def _latents(self, indices: list[int], dataset: ImageDataset, generator: torch.Generator) -> torch.Tensor:
        if self.latent_cache:
            mean = torch.stack([self.latent_cache[i][0] for i in indices])
            std = torch.stack([self.latent_cache[i][1] for i in indices])
        else:
            pixels = torch.stack([dataset.load(i, generator)[0] for i in indices]).to(self.device)
            with torch.no_grad():
                dist = self.base.vae.encode(pixels).latent_dist
            mean, std = dist.mean.cpu(), dist.std.cpu()
        # Sampling the latent distribution with our generator (not the VAE's internal RNG) keeps it resumable.
        eps = torch.randn(mean.shape, generator=generator)
        return ((mean + std * eps) * self.base.vae.config.scaling_factor).to(self.device)

    def loss(self, indices: list[int], dataset: ImageDataset, generator: torch.Generator,
             autocast) -> torch.Tensor:
        base = self.base
        latents = self._latents(indices, dataset, generator)
        captions = [dataset.samples[i].caption for i in indices]
        ids = base.tokenizer(captions, padding="max_length", truncation=True,
                             max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids
        # Noise and timesteps are drawn on the CPU generator and moved: identical on every device.
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        steps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (len(indices),),
                              generator=generator).to(self.device)
        noisy = base.noise_scheduler.add_noise(latents, noise, steps)
        if base.noise_scheduler.config.prediction_type == "v_prediction":
            target = base.noise_scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        with autocast():
            hidden = base.text_encoder(ids.to(self.device))[0]
            pred = base.unet(noisy, steps, hidden).sample
        return F.mse_loss(pred.float(), target.float())

    def export_extra(self, output_dir: Path) -> list[Path]:
        return []  # the kohya-format <name>.safetensors is the one format A1111, ComfyUI and diffusers read

    # --- samples ----------------------------------------------------------------------------------
    def eval(self) -> None:
        for m in self.models.values():
            m.eval()

    def render_sample(self, prompt, path: Path) -> Path:
        """One image of `prompt` (a `trainer.sampling.SamplePrompt`: negative, size, steps, guidance, seed,
        sampler) with the LoRA as trained so far, saved as `path`.png."""
        import diffusers
        from diffusers import StableDiffusionPipeline

        from trainer.sampling import SCHEDULERS

        base = self.base
        cls_name, extra = SCHEDULERS[prompt.sampler]
        scheduler = getattr(diffusers, cls_name).from_config(base.noise_scheduler.config, **extra)
        pipe = StableDiffusionPipeline(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder,
                                       tokenizer=base.tokenizer, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            image = pipe(prompt.prompt, negative_prompt=prompt.negative or None, num_inference_steps=prompt.steps,
                         guidance_scale=prompt.guidance, height=prompt.height, width=prompt.width,
                         generator=torch.Generator().manual_seed(prompt.seed)).images[0]
        out = Path(path).with_suffix(".png")
        image.save(out)
        return out
