"""Family `flux`, the heavy half: a LoRA on a FLUX.1 transformer (see `trainer.families.flux`).

The frozen base (`FluxBase`) is loaded once and may be kept warm by the daemon. Its text encoders live
in host memory (`FluxTextEncoders` is not a module, so the warm cache never moves them to the GPU): the
task moves one at a time to the device to encode, then back. With `quantization: fp8` the Linear
layers of the transformer blocks are stored in fp8 (`trainer.families.fp8`), quantized one layer at a time as
they move to the device, so a bf16 transformer (24 GB) never has to fit on the GPU whole.

Loss (rectified flow, as diffusers' train_dreambooth_lora_flux.py): latents = (VAE latent - shift) x
scale; t from `timestep_density`, shifted like the scheduler (dev: exponential shift with mu from the
image's token count; schnell: its fixed shift); x_t = (1 - t) latents + t noise, packed 2x2 into tokens;
the transformer (guidance `guidance_scale` for dev) predicts noise - latents; MSE. Every random draw
(latent sampling, noise, t) comes from the sample's own generator (`trainer.data.randomness`): a resumed
run is bit-identical on the CPU, and W data-parallel ranks draw what one rank would.

The kohya loss options come from `trainer.families.losses` as for the UNet families: `noise_offset` and multires
noise (`make_noise`), masked loss and `prior_loss_weight` (`diffusion_loss`, on the unpacked latents);
Min-SNR weighting is for noise-prediction schedules and is refused for Flux (the `min_snr_gamma` key is the
UNet families' own).

Caches (`prepare`): with `cache_text_embeddings` (default; off by itself when caption options vary the
text) every distinct caption and sample prompt is encoded once, each on its own (a row never depends on
its batch); with `cache_latents` every image once.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import TrainConfig
import trainer.families.latent_cache as latent_cache
import trainer.families.lora_io as lora_io
import trainer.families.losses as losses
import trainer.families.peft_lora as peft_lora
from trainer.data.prompts import DEFAULT_STEPS, load_prompts
from trainer.data.randomness import randn_per_sample
from trainer.quiet import quiet_libraries

log = logging.getLogger(__name__)

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")  # what quantization: fp8 stores in 8 bits
LORA_PREFIX = "transformer."
CLIP_LORA_PREFIX = "text_encoder."  # diffusers' (and ComfyUI's) prefix for a CLIP-L LoRA in a Flux LoRA file


@dataclass
class FluxTextEncoders:
    """CLIP-L (pooled) and T5-XXL (sequence) with their tokenizers. A plain object, not a module: the warm
    cache's device moves skip it, so the encoders stay in host memory except while they encode."""

    clip: torch.nn.Module
    clip_tokenizer: object
    t5: torch.nn.Module
    t5_tokenizer: object


@dataclass
class FluxBase:
    transformer: torch.nn.Module
    vae: torch.nn.Module
    text: FluxTextEncoders
    scheduler_config: dict
    variant: str
    source: str
    quantized_params: int = 0  # parameters stored in fp8 (quantization: fp8)


def preload() -> None:
    quiet_libraries()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: F401
    from peft import LoraConfig, inject_adapter_in_model  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast  # noqa: F401


def load_flux_base(cfg: TrainConfig, device: torch.device, weight_dtype: torch.dtype, variant: str,
                   transformer_config: Path) -> FluxBase:
    """The frozen base, offline: transformer (8-bit blocks with quantization: fp8) and VAE (fp32) on
    `device`, the text encoders in host memory in `weight_dtype`. `variant` (dev|schnell) and
    `transformer_config` (the shipped config folder a single-file transformer loads with) come from the
    family (`trainer.families.flux`)."""
    quiet_libraries()
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    from trainer.families.fp8 import quantize_linears

    parts = cfg.base_model if cfg.base_model.is_dir() else cfg.base_model_config
    if cfg.base_model.is_dir():
        transformer = FluxTransformer2DModel.from_pretrained(parts, subfolder="transformer", torch_dtype=weight_dtype,
                                                             local_files_only=True)
    else:
        transformer = FluxTransformer2DModel.from_single_file(
            str(cfg.base_model), config=str(transformer_config), subfolder="transformer",
            torch_dtype=weight_dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(parts, subfolder="vae", local_files_only=True, torch_dtype=torch.float32)
    clip = CLIPTextModel.from_pretrained(parts, subfolder="text_encoder", local_files_only=True, dtype=weight_dtype)
    t5 = T5EncoderModel.from_pretrained(parts, subfolder="text_encoder_2", local_files_only=True, dtype=weight_dtype)
    clip_tok = CLIPTokenizer.from_pretrained(parts, subfolder="tokenizer", local_files_only=True)
    t5_tok = T5TokenizerFast.from_pretrained(parts, subfolder="tokenizer_2", local_files_only=True)
    scheduler_config = json.loads((Path(parts) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    for m in (transformer, vae, clip, t5):
        m.requires_grad_(False)
        m.eval()
    quantized = 0
    if cfg.quantization == "fp8":
        # Layer by layer onto the device: the bf16 blocks never have to fit there together.
        quantized = quantize_linears(transformer, lambda n: n.startswith(BLOCK_PREFIXES), device)
    transformer.to(device)
    vae.to(device)
    log.info("flux %s base %s: %s transformer parameters in fp8", variant, cfg.base_model, f"{quantized:,}")
    return FluxBase(transformer, vae, FluxTextEncoders(clip, clip_tok, t5, t5_tok), scheduler_config, variant,
                    str(cfg.base_model), quantized)


def shifted_sigmas(u: torch.Tensor, scheduler_config: dict, image_seq_len: int) -> torch.Tensor:
    """The noise level for t ~ density `u` in (0, 1), shifted as FlowMatchEulerDiscreteScheduler shifts its
    sampling schedule: with `use_dynamic_shifting` (dev) exp(mu) / (exp(mu) + 1/u - 1), where mu grows
    linearly with the image's token count from base_shift (base_image_seq_len tokens) to max_shift
    (max_image_seq_len) - more noise at higher resolution; otherwise the fixed shift s u / (1 + (s - 1) u)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler_config
    u = u.clamp(1e-5, 1 - 1e-5)
    if c.get("use_dynamic_shifting"):
        mu = calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    s = float(c.get("shift", 1.0))
    return s * u / (1 + (s - 1) * u)


class FluxTask:
    """One job's LoRA on a `FluxBase`: trainable parameters, the loss, the LoRA file and samples."""

    def __init__(self, cfg: TrainConfig, base: FluxBase, device: torch.device, targets: list[str]):
        """`targets`: the transformer's target modules, the `all-linear` preset expanded (`flux.expand_targets`)."""
        self.cfg, self.base, self.device = cfg, base, device
        self.targets = targets
        # LoRA init draws from the global RNG: seeded, so a cold and a warm daemon start from the same LoRA.
        torch.manual_seed(cfg.seed)
        peft_lora.inject(base.transformer, cfg, targets, init_lora_weights="gaussian")
        # train_text_encoder: a LoRA on CLIP-L (T5-XXL is never trained), its pooled output computed every step.
        self.train_clip = cfg.train_text_encoder
        if self.train_clip:
            peft_lora.inject(base.text.clip, cfg, cfg.text_encoder_target_modules, init_lora_weights="gaussian")
        self.params = peft_lora.trainable(base.transformer)
        self.te_params = peft_lora.trainable(base.text.clip) if self.train_clip else []
        # T5's outputs are cached when the captions are fixed (train_text_encoder only stops CLIP-L's caching).
        self.cache_t5 = cfg.text_outputs_cached or (
            self.train_clip and (cfg.cache_text_embeddings or cfg.cache_text_embeddings_to_disk)
            and cfg._text_varies() == ["train_text_encoder"])
        self.placed = {"clip": False, "t5": False}  # which encoders are on the device now
        if cfg.gradient_checkpointing:
            base.transformer.enable_gradient_checkpointing()
        # torch.compile of the transformer's forward (opt-in, as for the UNet families: minutes first, then faster).
        self.transformer = torch.compile(base.transformer) if cfg.compile else base.transformer
        self.guidance = cfg.guidance_scale if base.transformer.config.guidance_embeds else None
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.latent_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: list | None = None  # masked_loss: the masks of the batch `_latents` loaded

    # --- parameters and the LoRA file -------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        groups = [{"params": self.params, "lr": self.cfg.learning_rate}]
        if self.te_params:
            groups.append({"params": self.te_params, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return groups

    def _trained(self) -> dict[str, torch.nn.Module]:
        """The modules with a LoRA, by their key prefix in the LoRA file."""
        out = {LORA_PREFIX: self.base.transformer}
        if self.train_clip:
            out[CLIP_LORA_PREFIX] = self.base.text.clip
        return out

    def train(self) -> None:
        for m in self._trained().values():
            m.train()

    def eval(self) -> None:
        for m in self._trained().values():
            m.eval()

    def _lora_layers(self) -> dict[str, tuple]:
        """{key in the LoRA file: (lora_A weight, lora_B weight)} of every LoRA layer, in model order. CLIP-L's
        keys keep the `text_model.` level that transformers >= 5.6 dropped from CLIPTextModel (ComfyUI and older
        stacks read text_encoder.text_model.encoder...; diffusers reads both)."""
        return {prefix + path: (a, b) for prefix, model in self._trained().items()
                for path, a, b, _ in lora_io.peft_layers(model)}

    def lora_state(self) -> dict[str, torch.Tensor]:
        """diffusers' Flux LoRA layout: transformer.<module>.lora_A/.lora_B weights and .alpha (scale =
        alpha / rank), and text_encoder.<module>... for a CLIP-L LoRA, which FluxPipeline.load_lora_weights and
        ComfyUI both read."""
        return lora_io.layer_tensors(self._lora_layers(), self.cfg.effective_alpha, lora_io.DIFFUSERS_SUFFIXES)

    def load_lora_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        lora_io.load_layers(self._lora_layers(), tensors, source, lora_io.DIFFUSERS_SUFFIXES)

    def lora_metadata(self) -> dict[str, str]:
        v = self.base.variant
        return {"ss_base_model_version": "flux1", "agentd_flux_variant": v,
                "modelspec.architecture": f"flux-1-{v}/lora", "ss_resolution": f"({self.cfg.resolution}, "
                f"{self.cfg.resolution})", "ss_network_train_unet_only": str(not self.train_clip),
                "ss_guidance_scale": str(self.guidance), "ss_max_sequence_length": str(self.cfg.max_sequence_length),
                "ss_timestep_density": str(self.cfg.timestep_density),
                "agentd_quantization": str(self.cfg.quantization)}

    def adapters_disabled(self):
        """The base without this LoRA inside the block (the evaluation's base arm), nothing reloaded."""
        return peft_lora.disabled(self.base.transformer, *([self.base.text.clip] if self.train_clip else []))

    def export_extra(self, output_dir: Path) -> list[Path]:
        return []  # <name>.safetensors is read by diffusers and ComfyUI as it is

    def detach(self) -> None:
        """Remove this job's LoRA, caches and device placement of the encoders (the warm base stays as loaded)."""
        if self.cfg.gradient_checkpointing:
            self.base.transformer.disable_gradient_checkpointing()
        for m in self._trained().values():
            peft_lora.remove(m)
        self._place(clip=False, t5=False)
        self.text_cache.clear()
        self.latent_cache.clear()

    # --- text -------------------------------------------------------------------------------------
    def _place(self, clip: bool, t5: bool) -> None:
        """Put each text encoder on the device (True) or in host memory (False)."""
        moved_off = False
        for name, on in (("clip", clip), ("t5", t5)):
            if self.placed[name] != on:
                getattr(self.base.text, name).to(self.device if on else "cpu")
                self.placed[name] = on
                moved_off |= not on
        if moved_off and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _clip_ids(self, captions: list[str]) -> torch.Tensor:
        tok = self.base.text.clip_tokenizer
        return tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids.to(self.device)

    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 sequence (B, L, D), CLIP-L pooled (B, D)) of the captions, as FluxPipeline encodes prompts."""
        text = self.base.text
        t5_ids = text.t5_tokenizer(captions, padding="max_length", truncation=True,
                                   max_length=self.cfg.max_sequence_length, return_tensors="pt").input_ids
        with torch.no_grad():
            pooled = text.clip(self._clip_ids(captions), output_hidden_states=False).pooler_output
            seq = text.t5(t5_ids.to(self.device), output_hidden_states=False)[0]
        return seq, pooled

    def _text(self, captions: list[str], autocast) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_t5:
            missing = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
            if missing:
                self._cache_text(missing, autocast)
            rows = [self.text_cache[c] for c in captions]
            seq = torch.stack([r[0] for r in rows]).to(self.device)
            pooled = torch.stack([r[1] for r in rows]).to(self.device)
        else:
            self._place(clip=True, t5=True)
            with autocast():
                seq, pooled = self._encode(captions)
        if self.train_clip:  # CLIP-L's LoRA trains: its pooled output with gradients, every step
            self._place(clip=True, t5=self.placed["t5"])
            with autocast():
                pooled = self.base.text.clip(self._clip_ids(captions), output_hidden_states=False).pooler_output
        return seq, pooled

    def _cache_text(self, captions: list[str], autocast) -> None:
        """Encode each caption on its own (so its row is the same whichever batch asks), then send the encoders
        back to host memory (CLIP-L stays on the device when its LoRA trains). On a GPU the transformer waits
        in host memory meanwhile: the peak is the encoders (T5-XXL: 9 GB in bf16) or the transformer, never
        both (what makes 1024 px fit in 24 GB)."""
        park = self.device.type == "cuda"
        if park:
            self.base.transformer.to("cpu")
        try:
            self._place(clip=True, t5=True)
            with autocast():
                for c in captions:
                    seq, pooled = self._encode([c])
                    self.text_cache[c] = (seq[0].cpu(), pooled[0].cpu())
        finally:
            self._place(clip=self.train_clip, t5=False)
            if park:
                self.base.transformer.to(self.device)

    # --- data -------------------------------------------------------------------------------------
    def prepare(self, dataset, autocast=None) -> None:
        """Text embeddings of every caption and sample prompt (text_outputs_cached), latents of every image
        (latents_cached); with the _to_disk keys through the content-keyed disk cache (`trainer.families.latent_cache`),
        so a later job on the same data skips the encoders and the VAE. Without the text cache the encoders
        move to the device for the whole job."""
        import contextlib

        cfg = self.cfg
        autocast = autocast or contextlib.nullcontext
        if self.cache_t5:
            captions = [dataset.caption(i) for i in range(len(dataset))] + [p.prompt for p in load_prompts(cfg)[0]]
            captions = [c for c in dict.fromkeys(captions) if c not in self.text_cache]
            disk = latent_cache.TextDiskCache(
                latent_cache.cache_root(cfg), [self.base.text.clip, self.base.text.t5],
                f"{type(self).__name__}/max_sequence_length={cfg.max_sequence_length}") \
                if cfg.cache_text_embeddings_to_disk else None
            for c in captions if disk else []:
                hit = disk.get(disk.key(c))
                if hit is not None:
                    self.text_cache[c] = (hit["seq"], hit["pooled"])
            missing = [c for c in captions if c not in self.text_cache]
            self._cache_text(missing, autocast)
            for c in missing if disk else []:
                disk.put(disk.key(c), {"seq": self.text_cache[c][0], "pooled": self.text_cache[c][1]})
        else:
            self._place(clip=True, t5=True)
        if cfg.latents_cached:
            self.latent_cache.update(latent_cache.encode_latents(cfg, self.base.vae, dataset, self.device)[0])

    def _latents(self, indices: list[int], dataset, generators: list[torch.Generator]) -> torch.Tensor:
        mean, std, _, self._masks = latent_cache.batch_latents(
            self.latent_cache, indices, dataset, generators, self.base.vae, self.device, self.cfg.masked_loss)
        eps = randn_per_sample(tuple(mean.shape[1:]), generators)  # our generators, not the VAE's: resumable
        c = self.base.vae.config
        return ((mean + std * eps - c.shift_factor) * c.scaling_factor).to(self.device)

    def loss_units(self, indices: list[int], dataset) -> int:
        return len(indices)  # the loss is a mean over samples

    def loss(self, indices: list[int], dataset, generators: list[torch.Generator], autocast) -> torch.Tensor:
        from diffusers import FluxPipeline
        from diffusers.training_utils import compute_density_for_timestep_sampling

        cfg = self.cfg
        latents = self._latents(indices, dataset, generators)
        b, ch, h, w = latents.shape
        seq, pooled = self._text([dataset.caption(i, g) for i, g in zip(indices, generators)], autocast)
        noise = losses.make_noise(tuple(latents.shape), generators, cfg.noise_offset, cfg.multires_noise_iterations,
                                  cfg.multires_noise_discount).to(self.device)
        u = torch.cat([compute_density_for_timestep_sampling(cfg.timestep_density, 1, logit_mean=cfg.logit_mean,
                                                             logit_std=cfg.logit_std, mode_scale=cfg.mode_scale,
                                                             generator=g) for g in generators])
        sigmas = shifted_sigmas(u, self.base.scheduler_config, (h // 2) * (w // 2)).to(self.device)
        s = sigmas.view(b, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        packed = FluxPipeline._pack_latents(noisy, b, ch, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, packed.dtype)
        txt_ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=packed.dtype)
        guidance = None if self.guidance is None else torch.full((b,), float(self.guidance), device=self.device)
        with autocast():
            pred = self.transformer(hidden_states=packed, timestep=sigmas, guidance=guidance,
                                         pooled_projections=pooled, encoder_hidden_states=seq, txt_ids=txt_ids,
                                         img_ids=img_ids, return_dict=False)[0]
        weights = [dataset.loss_weight(i) for i in indices]
        return losses.diffusion_loss(
            unpack(pred, b, ch, h, w), noise - latents,
            masks=losses.latent_masks(self._masks, (h, w)) if self._masks else None,
            weights=torch.tensor(weights) if any(x != 1.0 for x in weights) else None)

    # --- samples ----------------------------------------------------------------------------------
    def render_sample(self, prompt, path: Path) -> Path:
        """One image of `prompt` with FluxPipeline and the LoRA as trained so far. Flux samples with its own
        flow-matching Euler scheduler (the prompt's --ss sampler and --n negative do not apply); --l is dev's
        distilled guidance; schnell takes 4 steps unless the prompt says --s."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        base = self.base
        with torch.no_grad():
            seq, pooled = self._text([prompt.prompt], _autocast_for(self.device, base.transformer.dtype))
        dtype = base.transformer.dtype
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config),
                            vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=base.transformer)
        pipe.set_progress_bar_config(disable=True)
        steps = 4 if base.variant == "schnell" and prompt.steps == DEFAULT_STEPS else prompt.steps
        with torch.no_grad():
            latents = pipe(prompt_embeds=seq.to(dtype), pooled_prompt_embeds=pooled.to(dtype),
                           num_inference_steps=steps, guidance_scale=prompt.guidance, height=prompt.height,
                           width=prompt.width, generator=torch.Generator().manual_seed(prompt.seed),
                           output_type="latent", max_sequence_length=self.cfg.max_sequence_length).images
            # Decoded here in fp32 (the VAE's dtype), whatever the transformer computed in.
            latents = FluxPipeline._unpack_latents(latents, prompt.height, prompt.width, pipe.vae_scale_factor)
            latents = latents.float() / base.vae.config.scaling_factor + base.vae.config.shift_factor
            image = pipe.image_processor.postprocess(base.vae.decode(latents).sample, output_type="pil")[0]
        out = Path(path).with_suffix(".png")
        image.save(out)
        return out


    def render_batch(self, prompts: list, paths: list[Path], encoded: dict | None = None) -> list[Path]:
        """One `render_sample` per prompt: Flux's images are rendered one at a time (its evaluation is not
        batched; `encoded` is not used)."""
        return [self.render_sample(p, path) for p, path in zip(prompts, paths)]

def unpack(tokens: torch.Tensor, b: int, ch: int, h: int, w: int) -> torch.Tensor:
    """Inverse of FluxPipeline._pack_latents: (B, h/2 x w/2, 4 ch) tokens back to (B, ch, h, w) latents."""
    return tokens.view(b, h // 2, w // 2, ch, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


def _autocast_for(device: torch.device, dtype: torch.dtype):
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)
