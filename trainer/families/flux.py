"""Family `flux`: FLUX.1 [dev] and [schnell] (black-forest-labs) and checkpoints built on them.

The model: `FluxTransformer2DModel` (19 double-stream + 38 single-stream blocks, ~11.9 B parameters),
the Flux VAE (16 latent channels, `scaling_factor` 0.3611 and `shift_factor` 0.1159, latents packed
2x2 into 64-channel tokens), CLIP-L (its pooled output) and the T5-XXL encoder (its token sequence,
`max_sequence_length` tokens: 512 for dev, 256 for schnell). dev is guidance-distilled: its transformer
takes a guidance value (`guidance_scale`, 1.0 while training); schnell has no guidance embedding.

Objective: rectified flow. x_t = (1 - t) x_0 + t noise, the transformer predicts noise - x_0; t comes
from `timestep_density` (uniform, logit_normal, mode) and is shifted as diffusers' scheduler shifts it
at sampling time: dev's `use_dynamic_shifting` makes the shift depend on the image's token count
(resolution), schnell's is fixed.

Detected from a diffusers folder whose `model_index.json` says `FluxPipeline`, or from a single file
holding `double_blocks.` and `single_blocks.` (BFL's original layout, as flux1-dev.safetensors; also
under ComfyUI's `model.diffusion_model.` prefix). Such a file holds the transformer only: its
architecture comes from the configs shipped in `trainer/families/model_configs/flux-dev|flux-schnell` (dev when
the file has `guidance_in.` keys), so detection, checks and the VRAM estimate need no config folder;
the VAE, text encoders and tokenizers it lacks are loaded from `base_model_config` (any FLUX.1
diffusers folder).

Memory (so a 24 GB card trains at 1024 px): every caption's text embeddings are computed once before
training and both text encoders then leave the GPU (`cache_text_embeddings`, default on); the frozen
transformer blocks are stored in fp8 (`quantization: fp8`, `trainer.families.fp8`); gradient checkpointing;
LoRA weights and optimizer state in fp32; bf16 mixed precision by default (fp16 is refused: Flux's
activations overflow its range).

`train_text_encoder: true` adds a LoRA on CLIP-L (`text_encoder_target_modules`, its attention by default;
`text_encoder_lr`), whose pooled output is then computed every step; T5-XXL is never trained (a target
naming its layers is refused: CLIP-L only, or none) and its outputs stay cached.

The LoRA file uses diffusers' key names (`transformer.<module>.lora_A.weight`, `.lora_B.weight`,
`.alpha`; CLIP-L's under `text_encoder.text_model.`): what diffusers' `FluxPipeline.load_lora_weights`
reads and what ComfyUI maps onto its BFL-layout Flux model (`transformer.` + diffusers module name, fused
qkv slices included) and its CLIP-L.

Light (no torch at import): the loader and the task are in `trainer.families.flux_task`; the Linear layer
names checks need come from meta models built here (torch imported inside the functions).
"""
from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path

from trainer.errors import Problem
import trainer.families.memory as memory
from trainer.families.diffusion import IMAGE_KEYS, DiffusionFamily, latent_factor
from trainer.families.peft_lora import matches
from trainer.families.probe import Probe, probe
from trainer.quiet import quiet_libraries

ALL_LINEAR = "all-linear"
VARIANTS = ("dev", "schnell")
MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}
T5_LIMIT = 512  # T5-XXL's tokenizer length; FluxPipeline refuses longer prompts
DEFAULT_GUIDANCE = 1.0
SHIPPED = Path(__file__).resolve().parent / "model_configs"


class FluxFamily(DiffusionFamily):
    NAME = "flux"
    TITLE = "FLUX.1"
    PIPELINE_CLASSES = ("FluxPipeline",)
    SINGLE_FILE_SIGNATURE = "double_blocks."
    LORA_VERSIONS = ("flux1", "flux1-dev", "flux1-schnell")
    LORA_KEY_PREFIXES = ("transformer.single_transformer_blocks.", "lora_unet_double_blocks_",
                         "lora_unet_single_blocks_")
    DEFAULT_RESOLUTION = 1024
    # Attention projections of the double blocks (image and text streams) and of the single blocks, as
    # diffusers' and ai-toolkit's Flux LoRA recipes adapt by default.
    DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    DEFAULT_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP-L's attention (train_text_encoder)
    VRAM_SHAPE_FIELDS = ("resolution", "max_sequence_length", "quantization", "cache_text_embeddings")
    # Family-specific keys it reads (families.key_problems); quantization: fp8 (trainer.families.fp8) or no,
    # not bitsandbytes'.
    OWN_KEYS = {**IMAGE_KEYS, **dict.fromkeys(("guidance_scale", "max_sequence_length", "timestep_density",
                                               "logit_mean", "logit_std", "mode_scale")),
                "quantization": ("fp8", "no")}
    # What to say instead of "train another family" when a key of another family is set on a Flux config.
    KEY_FIXES = {"min_snr_gamma": "to weight mid-noise steps use timestep_density: logit_normal (the default) or "
                                  "mode (Flux trains a rectified flow; Min-SNR is defined for DDPM schedules)"}
    ACT_FACTOR = 0.58  # activations under bf16 autocast vs fp32: the UNet families' measured factor, assumed (gpu_check tells)

    def detect(self, p: Probe) -> bool:
        if p.kind == "folder":
            return p.class_name in self.PIPELINE_CLASSES
        if not (p.kind == "file" and _has(p, "double_blocks.") and _has(p, "single_blocks.")):
            return False
        # FLUX.1 takes 64 input channels (16 latent x 2x2); Fill (384) and Canny/Depth (128) need other inputs.
        img_in = next((shape for k, shape in p.shapes.items() if k.endswith("img_in.weight")), None)
        return not (img_in and len(img_in) == 2 and img_in[1] != 64)

    def defaults(self, p: Probe, cfg) -> dict:
        v = variant(cfg, p)
        out = {**super().defaults(p, cfg), "max_sequence_length": MAX_SEQUENCE_LENGTH[v],
               "timestep_density": "logit_normal", "quantization": "fp8"}
        if v == "dev":
            out["guidance_scale"] = DEFAULT_GUIDANCE
        if "mixed_precision" not in cfg.model_fields_set:
            out["mixed_precision"] = "bf16"  # Flux's weights are bf16; fp32 doubles activations for nothing
        return out

    def check(self, cfg, p: Probe, describe) -> list[Problem]:
        problems: list[Problem] = []
        v = variant(cfg, p)
        if p.kind == "file":
            problems += _single_file_problems(cfg, describe)
        if cfg.mixed_precision == "fp16":
            problems.append(Problem(
                "mixed_precision", "fp16 is refused for Flux: its transformer was trained in bf16 and its activations "
                "exceed fp16's range (65504), which gives NaN losses and black images",
                "use mixed_precision: bf16 (the default for Flux), or no (fp32, twice the memory)", "fp16"))
        if v == "schnell" and cfg.guidance_scale is not None:
            problems.append(Problem(
                "guidance_scale", "FLUX.1 [schnell] has no guidance embedding (it is timestep-distilled, not "
                "guidance-distilled): there is nothing to feed the value to", "remove guidance_scale (it applies "
                "to FLUX.1 [dev] and its fine-tunes)", cfg.guidance_scale))
        if cfg.max_sequence_length is not None and cfg.max_sequence_length > T5_LIMIT:
            problems.append(Problem(
                "max_sequence_length", f"is above T5-XXL's limit of {T5_LIMIT} tokens (the length Flux was trained "
                "with; FluxPipeline refuses longer prompts)", f"use at most {T5_LIMIT} ({MAX_SEQUENCE_LENGTH[v]} is "
                f"FLUX.1 [{v}]'s default)", cfg.max_sequence_length))
        if problems:
            return problems
        folder = self.config_dir(cfg)
        factor = (latent_factor(folder) or 8) * 2  # VAE downscale x 2x2 packing
        if cfg.resolution % factor:
            lower, upper = max(factor, cfg.resolution // factor * factor), (cfg.resolution // factor + 1) * factor
            problems.append(Problem(
                "resolution", f"must be a multiple of {factor} for {self.TITLE} (the VAE downscales by {factor // 2} "
                "and latents are packed 2x2)", f"use {lower} or {upper}", cfg.resolution))
        problems += target_problems(cfg, folder)
        if cfg.train_text_encoder:
            problems += text_encoder_target_problems(cfg, folder)
        return problems

    def config_dir(self, cfg) -> Path:
        """The diffusers-layout folder with the model's component configs (for estimates and checks): the model
        folder itself; for a single file the shipped config of its variant (the file is a FLUX.1 transformer;
        base_model_config only supplies the standard VAE, encoders and tokenizers)."""
        if cfg.base_model.is_dir():
            return cfg.base_model
        return shipped_config(variant(cfg))

    def load_base(self, cfg, device, dtype):
        from trainer.families.flux_task import load_flux_base

        return load_flux_base(cfg, device, dtype, variant(cfg), shipped_config(variant(cfg)))

    def make_task(self, cfg, base, device):
        from trainer.families.flux_task import FluxTask

        return FluxTask(cfg, base, device, expand_targets(cfg.target_modules))

    def vram_summary(self, model_dir: Path, targets: tuple[str, ...], te_targets: tuple[str, ...]):
        return memory.flux_model_summary(model_dir, tuple(expand_targets(list(targets))), te_targets)

    def vram_per_sample_bytes(self, summary, shape: dict) -> float:
        return memory.flux_per_sample_bytes(summary, shape)

    def preload(self) -> None:
        from trainer.families.flux_task import preload

        preload()


FAMILY = FluxFamily()
# The `all-linear` preset: every Linear of the double and single blocks (attention, MLPs, the modulation
# layers; `proj_out` also names the final projection). About 5x the LoRA parameters of the default.
ALL_LINEAR_TARGETS = FluxFamily.DEFAULT_TARGETS + [
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
    "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear"]


def _has(p: Probe, part: str) -> bool:
    return any(k.startswith(part) or f".{part}" in k for k in p.keys)


def variant(cfg, p: Probe | None = None) -> str:
    """dev or schnell: the transformer's guidance embedding (config.json) or a file's `guidance_in.` keys."""
    p = p or probe(cfg.base_model)
    if p.kind == "file":
        return "dev" if _has(p, "guidance_in.") else "schnell"
    config = _transformer_config(cfg.base_model)
    return "dev" if config.get("guidance_embeds") else "schnell"


def _transformer_config(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def shipped_config(which: str) -> Path:
    """The shipped diffusers-layout config folder of FLUX.1 [dev] or [schnell]."""
    return SHIPPED / f"flux-{which}"


def expand_targets(targets: list[str]) -> list[str]:
    return list(ALL_LINEAR_TARGETS) if list(targets) == [ALL_LINEAR] else list(targets)


def text_encoder_target_problems(cfg, folder: Path) -> list[Problem]:
    """train_text_encoder adapts CLIP-L only: each text_encoder_target_modules entry must match a Linear of
    CLIP-L; one that names T5-XXL's layers (or nothing) is refused."""
    clip, t5 = encoder_linear_names(folder)
    problems = []
    for t in cfg.text_encoder_target_modules:
        if any(matches(n, [t]) for n in clip):
            continue
        in_t5 = any(matches(n, [t]) for n in t5)
        problems.append(Problem(
            "text_encoder_target_modules" if cfg.text_encoder_target_modules else "train_text_encoder",
            f"{t!r} {'is a layer of T5-XXL, which is never trained' if in_t5 else 'matches no Linear of CLIP-L'}: "
            "train_text_encoder adapts CLIP-L only (T5-XXL is 4.7 B parameters; it is encoded once and freed)",
            f"choose CLIP-L only (text_encoder_target_modules from CLIP-L's q_proj, k_proj, v_proj, out_proj, fc1, "
            f"fc2; the default: {', '.join(FluxFamily.DEFAULT_TE_TARGETS)}), or none (train_text_encoder: false)",
            cfg.text_encoder_target_modules))
    return problems


def _single_file_problems(cfg, describe) -> list[Problem]:
    folder = cfg.base_model_config
    fix = ("set base_model_config to a FLUX.1 diffusers folder (model_index.json, vae/, text_encoder/, "
           "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), e.g. a saved FLUX.1-schnell snapshot: the "
           "transformer's weights come from base_model and its architecture from the shipped config")
    if folder is None:
        return [Problem("base_model_config", "a single-file Flux checkpoint holds the transformer only; the VAE, "
                        "CLIP-L, T5-XXL and their tokenizers must come from a local folder", fix, None)]
    cp = probe(folder)
    if cp.kind != "folder" or cp.class_name not in FluxFamily.PIPELINE_CLASSES:
        return [Problem("base_model_config", f"is {describe(cp)}, not a FluxPipeline folder", fix, str(folder))]
    return []


def target_problems(cfg, folder: Path) -> list[Problem]:
    """Each target_modules entry must match a Linear of the transformer (built from its config on the meta
    device: no weights); otherwise name the closest real module names."""
    names = transformer_linear_names(folder)
    suffixes = sorted({".".join(n.split(".")[-k:]) for n in names for k in (1, 2, 3)
                       if not n.split(".")[-k:][0].isdigit()})
    problems = []
    for t in expand_targets(cfg.target_modules):
        if not any(matches(n, [t]) for n in names):
            close = difflib.get_close_matches(t, suffixes, n=4, cutoff=0.4)
            problems.append(Problem(
                "target_modules", f"{t!r} matches no Linear module of the Flux transformer",
                f"use real module names{': closest are ' + ', '.join(close) if close else ''} (defaults: "
                f"{', '.join(FluxFamily.DEFAULT_TARGETS)}; or [{ALL_LINEAR}] for every Linear of the blocks)",
                cfg.target_modules))
    return problems


@functools.lru_cache(maxsize=8)
def _linear_names(config_path: str, stamp: float) -> tuple[str, ...]:
    import torch
    from diffusers import FluxTransformer2DModel

    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


@functools.lru_cache(maxsize=8)
def _encoder_linear_names(config_path: str, stamp: float, kind: str) -> tuple[str, ...]:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = {k: v for k, v in json.loads(Path(config_path).read_text(encoding="utf-8")).items()
              if k != "architectures"}
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**config)) if kind == "clip" else T5EncoderModel(T5Config(**config))
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def encoder_linear_names(folder: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(CLIP-L's, T5's) Linear layer names, from their configs on the meta device."""
    quiet_libraries()
    clip, t5 = Path(folder) / "text_encoder" / "config.json", Path(folder) / "text_encoder_2" / "config.json"
    return (_encoder_linear_names(str(clip), clip.stat().st_mtime, "clip"),
            _encoder_linear_names(str(t5), t5.stat().st_mtime, "t5"))


def transformer_linear_names(folder: Path) -> tuple[str, ...]:
    """Qualified names of the transformer's Linear layers, from its config on the meta device (no weights)."""
    quiet_libraries()
    path = Path(folder) / "transformer" / "config.json"
    return _linear_names(str(path), path.stat().st_mtime)
