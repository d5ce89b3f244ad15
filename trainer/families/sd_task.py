"""Families `sd` and `sdxl`, the heavy half: a LoRA on a Stable Diffusion UNet (and optionally its text
encoders). `SdTask` is SD 1.x/2.x; `trainer.families.sdxl_task.SdxlTask` extends it with SDXL's second
text encoder, pooled embeddings and time ids.

The frozen base (`SdBase`) is loaded once and may be kept warm by the daemon between jobs; the
task adds LoRA layers to it for one job and removes them in `detach()`, so nothing of one job's LoRA
reaches the next.

Loss: the standard noise-prediction MSE (or v-prediction when the scheduler's `prediction_type` is
`v_prediction`) at a uniformly sampled timestep. All randomness of a sample (crop and flip, caption
options, latent sampling, noise, timestep) comes from its own generator, keyed by its global index
(`trainer.data.randomness`): a resumed run is bit-identical to an uninterrupted one, and W data-parallel
ranks draw what one rank would.

Caches (`prepare`): `cache_latents` encodes every image once (its latent distribution is still sampled
per step); `cache_text_embeddings` (when the text encoders are frozen) encodes every distinct caption
once, each on its own, so a cached row never depends on which batch first needed it (a resume sees the
same numbers).

Loss options (`trainer.families.losses`): noise_offset and multires noise in the noise, Min-SNR weighting,
masked loss (the batch's masks at latent size), prior_loss_weight for regularization images; caption
options (`ImageDataset.caption`) and clip_skip in the conditioning.

GPU speed (CUDA only, `speed_up`): channels-last UNet memory format, PyTorch SDPA attention (diffusers'
default AttnProcessor2_0, set explicitly), and with `compile: true` a torch.compile'd UNet forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

import trainer.families.latent_cache as latent_cache
import trainer.families.lora_io as lora_io
import trainer.families.losses as losses
import trainer.families.peft_lora as peft_lora
from trainer.config import TrainConfig
from trainer.data.images import ImageDataset
from trainer.data.randomness import randn_per_sample
from trainer.quiet import quiet_libraries

log = logging.getLogger(__name__)

# kohya's sampler names (trainer.config.SAMPLERS) -> (diffusers scheduler class, extra config), for samples
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "ddpm": ("DDPMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}), "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}), "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}), "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}


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

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by component name (the kohya prefix and the LoRA param group follow it)."""
        return {"text_encoder": self.text_encoder}


def preload() -> None:
    """Import what loading a base model needs (diffusers imports its classes lazily, on first use)."""
    quiet_libraries()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from peft import LoraConfig, inject_adapter_in_model  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401


def freeze_and_place(modules: list[torch.nn.Module], vae: torch.nn.Module, device: torch.device,
                     weight_dtype: torch.dtype) -> None:
    """Frozen, eval mode, on `device`; everything but the VAE in `weight_dtype`, whatever dtype the folder
    stored (an fp16- or bf16-saved model trained with `mixed_precision: no` computes in fp32).

    The VAE is fp32: encoding in fp16 overflows in SD1.x's and SDXL's VAEs (a known NaN source)."""
    for m in [*modules, vae]:
        m.requires_grad_(False)
        m.eval()
    vae.to(device, dtype=torch.float32)
    for m in modules:
        m.to(device, dtype=weight_dtype)


def load_sd_base(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype,
                 single_file_config: Path | None = None) -> SdBase:
    """Load the base from a diffusers folder or a single-file checkpoint, offline, frozen, on `device`.
    `single_file_config`: for a single file, the complete diffusers-format config folder it loads with
    (the family's `loading_config_dir`)."""
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
            str(path), config=str(single_file_config),
            local_files_only=True,
            safety_checker=None, requires_safety_checker=False)
        tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    freeze_and_place([unet, text_encoder], vae, device, weight_dtype)
    version = "sd_v2" if getattr(unet.config, "cross_attention_dim", 768) == 1024 else "sd_v1"
    return SdBase(unet, vae, text_encoder, tokenizer, scheduler, str(path), version)


def speed_up(unet: torch.nn.Module, device: torch.device) -> None:
    """CUDA speed settings that change no result beyond float rounding: TF32 matmuls on Ampere and newer
    (10-bit mantissa inputs, fp32 accumulation: what PyTorch and diffusers recommend for training),
    SDPA attention, channels-last memory format for the UNet's convolutions."""
    if device.type != "cuda":
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    if torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unet.set_attn_processor(AttnProcessor2_0())
    unet.to(memory_format=torch.channels_last)


class SdTask:
    """One job's LoRA on an `SdBase`: trainable parameters, the loss, and the LoRA's file format."""

    # kohya key prefix per component (A1111/ComfyUI/diffusers read these names).
    LORA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te"}

    def __init__(self, cfg: TrainConfig, base: SdBase, device: torch.device):
        self.cfg, self.base, self.device = cfg, base, device
        # LoRA init (A: kaiming uniform) draws from the global RNG: seed it so the same config gives
        # the same starting LoRA, cold or warm daemon.
        torch.manual_seed(cfg.seed)
        peft_lora.inject(base.unet, cfg, cfg.target_modules, init_lora_weights="gaussian")
        self.models = {"unet": base.unet}
        if cfg.train_text_encoder:
            for name, te in base.text_encoders().items():
                peft_lora.inject(te, cfg, cfg.text_encoder_target_modules, init_lora_weights="gaussian")
                self.models[name] = te
        for m in self.models.values():
            peft_lora.trainable(m)
        if cfg.gradient_checkpointing:
            # Recompute each block's activations in backward: much less memory, ~30% more compute.
            base.unet.enable_gradient_checkpointing()
        speed_up(base.unet, device)
        # torch.compile of the UNet's forward (opt-in, CUDA only: minutes of compiling first, then faster
        # steps; on the CPU inductor would need a C++ toolchain and gains little on these models).
        self.unet = torch.compile(base.unet) if cfg.compile and device.type == "cuda" else base.unet
        self.latent_cache: dict[int, tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self.text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.cache_stats: dict[str, int] = {}  # latents_from_disk / latents_encoded (prepare)
        self._masks: list | None = None  # masked_loss: the masks of the batch _latents loaded

    # --- parameters and the LoRA file -------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.base.unet.parameters() if p.requires_grad],
                   "lr": self.cfg.learning_rate}]
        te_params = [p for name, m in self.models.items() if name != "unet"
                     for p in m.parameters() if p.requires_grad]
        if te_params:
            groups.append({"params": te_params, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def train(self):
        for m in self.models.values():
            m.train()

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The network in kohya/LyCORIS format (what A1111, ComfyUI and diffusers' load_lora_weights read)."""
        return lora_io.to_kohya(self.models, self.LORA_PREFIXES)

    def load_lora_state(self, kohya: dict[str, torch.Tensor], source: str) -> None:
        lora_io.load_kohya(self.models, kohya, source, self.LORA_PREFIXES)

    def lora_metadata(self) -> dict[str, str]:
        return {"ss_base_model_version": self.base.base_model_version,
                "ss_resolution": f"({self.cfg.resolution}, {self.cfg.resolution})",
                "ss_network_train_unet_only": str(not self.cfg.train_text_encoder),
                "ss_text_encoder_lr": str(self.cfg.text_encoder_lr or self.cfg.learning_rate),
                "ss_unet_lr": str(self.cfg.learning_rate), **lora_io.network_metadata(self.cfg.network)}

    def detach(self) -> None:
        """Remove this job's LoRA layers, leaving the base exactly as loaded (for the warm cache)."""
        if self.cfg.gradient_checkpointing:
            self.base.unet.disable_gradient_checkpointing()
        for m in self.models.values():
            peft_lora.remove(m)
        self.latent_cache.clear()
        self.text_cache.clear()

    # --- data -------------------------------------------------------------------------------------
    def prepare(self, dataset: ImageDataset, autocast=None) -> None:
        """Build the caches the config asks for (see the module docstring); with the _to_disk keys, through
        the content-keyed disk cache (`trainer.families.latent_cache`), so a later job on the same data skips the VAE
        and the text encoders for what is there."""
        cfg = self.cfg
        if cfg.latents_cached:
            latents, from_disk = latent_cache.encode_latents(cfg, self.base.vae, dataset, self.device)
            self.latent_cache.update({i: (mean, std, dataset.fixed_geometry(i))
                                      for i, (mean, std) in latents.items()})
            self.cache_stats["latents_from_disk"] = from_disk
            self.cache_stats["latents_encoded"] = len(dataset) - from_disk
        if cfg.text_outputs_cached:
            disk = latent_cache.TextDiskCache(latent_cache.cache_root(cfg), list(self.base.text_encoders().values()),
                                              f"{type(self).__name__}/clip_skip={cfg.clip_skip}") \
                if cfg.cache_text_embeddings_to_disk else None
            context = autocast or _no_autocast
            with torch.no_grad(), context():
                for caption in dict.fromkeys(dataset.caption(i) for i in range(len(dataset))):
                    hit = disk.get(disk.key(caption)) if disk else None
                    if hit is None:
                        hit = {k: v[0].cpu() for k, v in self.encode_text([caption]).items()}
                        if disk:
                            disk.put(disk.key(caption), hit)
                    self.text_cache[caption] = hit

    def _latents(self, indices: list[int], dataset: ImageDataset,
                 generators: list[torch.Generator]) -> tuple[torch.Tensor, list[tuple]]:
        """Latents of the samples and, per sample, (original size, crop top-left, target size)."""
        mean, std, items, self._masks = latent_cache.batch_latents(
            self.latent_cache, indices, dataset, generators, self.base.vae, self.device, self.cfg.masked_loss)
        geometry = [self.latent_cache[i][2] for i in indices] if items is None else [_geometry(it) for it in items]
        # Sampling the latent distribution with our generators (not the VAE's internal RNG) keeps it resumable.
        eps = randn_per_sample(tuple(mean.shape[1:]), generators)
        return ((mean + std * eps) * self.base.vae.config.scaling_factor).to(self.device), geometry

    # --- conditioning (SDXL overrides these two) ---------------------------------------------------
    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The text encoder outputs the UNet is conditioned on, per caption (first dimension)."""
        tok = self.base.tokenizer
        ids = tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                  return_tensors="pt").input_ids
        te = self.base.text_encoder
        if not self.cfg.clip_skip or self.cfg.clip_skip == 1:
            return {"hidden": te(ids.to(self.device))[0]}
        # clip_skip N: the N-th hidden state from the end, through the final layer norm (as A1111 and kohya)
        hidden = te(ids.to(self.device), output_hidden_states=True).hidden_states[-self.cfg.clip_skip]
        norm = getattr(te, "text_model", te).final_layer_norm  # transformers 5 flattened CLIPTextModel
        return {"hidden": norm(hidden)}

    def unet_kwargs(self, encoded: dict[str, torch.Tensor], geometry: list[tuple]) -> dict:
        return {"encoder_hidden_states": encoded["hidden"]}

    def _encoded(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if self.text_cache:
            return {k: torch.stack([self.text_cache[c][k] for c in captions]).to(self.device)
                    for k in self.text_cache[captions[0]]}
        return self.encode_text(captions)

    def loss(self, indices: list[int], dataset: ImageDataset, generators: list[torch.Generator],
             autocast) -> torch.Tensor:
        base = self.base
        cfg = self.cfg
        latents, geometry = self._latents(indices, dataset, generators)
        captions = [dataset.caption(i, g) for i, g in zip(indices, generators)]  # caption options
        # Noise and timesteps are drawn on the CPU generators and moved: identical on every device.
        noise = losses.make_noise(tuple(latents.shape), generators, cfg.noise_offset, cfg.multires_noise_iterations,
                                  cfg.multires_noise_discount).to(self.device)
        steps = torch.cat([torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (1,), generator=g)
                           for g in generators]).to(self.device)
        noisy = base.noise_scheduler.add_noise(latents, noise, steps)
        if base.noise_scheduler.config.prediction_type == "v_prediction":
            target = base.noise_scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        if self.device.type == "cuda":
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        with autocast():
            encoded = self._encoded(captions)
            pred = self.unet(noisy, steps, **self.unet_kwargs(encoded, geometry)).sample
        weights = [dataset.loss_weight(i) for i in indices]
        return losses.diffusion_loss(
            pred, target, timesteps=steps, alphas_cumprod=base.noise_scheduler.alphas_cumprod,
            min_snr_gamma=cfg.min_snr_gamma, v_prediction=base.noise_scheduler.config.prediction_type == "v_prediction",
            masks=losses.latent_masks(self._masks, latents.shape[-2:]) if self._masks else None,
            weights=torch.tensor(weights) if any(w != 1.0 for w in weights) else None)

    def adapters_disabled(self):
        """The base without this LoRA inside the block (the evaluation's base arm), nothing reloaded."""
        return peft_lora.disabled(*self.models.values())

    def loss_units(self, indices: list[int], dataset: ImageDataset) -> int:
        return len(indices)  # the loss is a mean over samples

    def export_extra(self, output_dir: Path) -> list[Path]:
        return []  # the kohya-format <name>.safetensors is the one format A1111, ComfyUI and diffusers read

    # --- samples ----------------------------------------------------------------------------------
    def eval(self) -> None:
        for m in self.models.values():
            m.eval()

    def pipeline(self, scheduler):
        """A diffusers pipeline over the live (LoRA-carrying) base, for samples."""
        from diffusers import StableDiffusionPipeline

        base = self.base
        return StableDiffusionPipeline(unet=base.unet, vae=base.vae, text_encoder=base.text_encoder,
                                       tokenizer=base.tokenizer, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)

    def _prompt_embeds(self, pipe, prompt) -> dict[str, torch.Tensor]:
        """The pipeline's text embeddings of one prompt and its negative, as keyword arguments of its call:
        what the call computes from the texts itself (negative "" when none; both, whatever the guidance:
        without classifier-free guidance the pipeline leaves the negative unused)."""
        positive, negative = pipe.encode_prompt(prompt.prompt, self.device, 1, True, prompt.negative or None)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative}

    def render_sample(self, prompt, path: Path) -> Path:
        """One image of `prompt` (a `trainer.data.prompts.SamplePrompt`: negative, size, steps, guidance, seed,
        sampler) with the LoRA as trained so far, saved as `path`.png."""
        return self.render_batch([prompt], [path])[0]

    def render_batch(self, prompts: list, paths: list[Path], encoded: dict | None = None) -> list[Path]:
        """The images of `prompts` (SamplePrompts alike in size, steps, guidance and sampler; text, negative
        and seed may differ) in one pipeline call, saved as `paths`.png. Each image's noise comes from its own
        CPU torch.Generator(seed), as one `render_sample` call's, so the batch renders the same images (to the
        rounding of a batched UNet forward). `encoded`: the caller's cache of text embeddings by (text,
        negative), kept across calls (the evaluation's arms and checkpoints)."""
        import diffusers

        first = prompts[0]
        if any(p.call_settings() != first.call_settings() for p in prompts):
            raise ValueError("render_batch: the prompts differ in size, steps, guidance or sampler")
        cls_name, extra = SCHEDULERS[first.sampler]
        scheduler = getattr(diffusers, cls_name).from_config(self.base.noise_scheduler.config, **extra)
        pipe = self.pipeline(scheduler)
        pipe.set_progress_bar_config(disable=True)
        # Embeddings are reused across calls only while no text encoder carries this job's LoRA: a trained
        # text encoder encodes differently per arm (the base arm disables its LoRA, the comparison arm loads
        # other weights), so each call encodes again (a prompt repeated within the call, once).
        if encoded is None or set(self.models) != {"unet"}:
            encoded = {}
        with torch.no_grad():
            rows = []
            for p in prompts:
                key = (p.prompt, p.negative)
                if key not in encoded:
                    encoded[key] = self._prompt_embeds(pipe, p)
                rows.append(encoded[key])
            embeds = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
            images = pipe(**embeds, num_inference_steps=first.steps, guidance_scale=first.guidance,
                          height=first.height, width=first.width,
                          generator=[torch.Generator().manual_seed(p.seed) for p in prompts]).images
        written = []
        for image, path in zip(images, paths):
            written.append(Path(path).with_suffix(".png"))
            image.save(written[-1])
        return written


def _geometry(item) -> tuple:
    return (item.original_size, item.crop_top_left, item.target_size)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()
