"""The training config: one YAML file in, one validated `TrainConfig` out.

The seed's keys work exactly as written (`train_data_dir, metadata_path, base_model, lora_rank,
batch_size, epochs, learning_rate, output_dir, save_steps`); everything else has a documented default.

Rules a user can rely on:
- Relative paths resolve against the folder that holds the config file (not the current directory),
  so a config committed next to its data works from any workspace.
- Numbers may be written the way YAML 1.1 reads as strings (`2e-4`); they mean the number.
- Unknown keys are errors that name the closest valid key.
- Every problem is found before any model loads and reported together (`ConfigError`),
  each with the field, the value, the YAML line and the fix.

Cross-field checks live in one place: `TrainConfig._cross_field_checks`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from trainer.errors import ConfigError, Problem
from trainer.yaml_schema import read_yaml_mapping, resolve_relative, validate_model

# Fields that do not change the trained model: editing them must not block a resume.
NON_TRAINING_FIELDS = frozenset({
    "name", "output_dir", "save_steps", "log_every", "keep_checkpoints", "resume",
    "skip_bad_images", "recommended_batch_size", "sample_prompts", "priority", "device",
})
PATH_FIELDS = ("train_data_dir", "metadata_path", "base_model", "base_model_config",
               "init_lora_weights", "output_dir")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class OptimizerConfig(_Strict):
    """AdamW settings (the only optimizer today; `name` keeps room for more)."""

    name: Literal["adamw"] = "adamw"
    """Optimizer. AdamW is what every LoRA recipe uses."""
    weight_decay: float = Field(1e-2, ge=0)
    """Decoupled weight decay. 0.01 is the diffusers/kohya default; 0 for tiny datasets."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """First-moment decay."""
    beta2: float = Field(0.999, ge=0, lt=1)
    """Second-moment decay."""
    eps: float = Field(1e-8, gt=0)
    """Denominator epsilon; raise to 1e-6 for fp16 stability."""


class TrainConfig(_Strict):
    """A LoRA training job. Paths are absolute after loading (resolved against the config's folder)."""

    # --- what to train on -------------------------------------------------------------------------
    mode: Optional[Literal["image", "text"]] = None
    """image (diffusion models, diffusers) or text (causal LMs, transformers). Default: what the base
    model is (its model family); set it only to have the config say what it expects."""
    model_family: Optional[str] = None
    """sd (SD 1.x/2.x), sdxl or causal_lm (see trainer.families). Default: detected from base_model
    (model_index.json's pipeline class, config.json's architectures, or a single file's key names);
    when set it must agree with the files."""
    train_data_dir: Path
    """Folder of training images (image mode) or text files (text mode)."""
    metadata_path: Optional[Path] = None
    """CSV with `file_name,text` columns (also `filename|image|file` and `caption|prompt|text`).
    Absent: a `.txt` caption beside each image (kohya's convention)."""
    base_model: Path
    """Diffusers folder (model_index.json) or a single-file `.safetensors`/`.ckpt` checkpoint."""
    base_model_config: Optional[Path] = None
    """For a single-file base_model: a local diffusers-format folder with its configs and tokenizer,
    so loading works offline."""
    resolution: Optional[int] = Field(None, ge=8)
    """Training image side in pixels: images are resized (shorter side) then center-cropped to it.
    Default: the family's native size (512 for SD 1.x/2.x, 1024 for SDXL); a multiple of 8 x the VAE's
    downscale factor (64 for real SD models)."""
    center_crop: bool = True
    """Center crop (True) or random crop (False, seeded) after resizing."""
    random_flip: bool = False
    """Flip images horizontally at random (seeded). Not combinable with cache_latents."""
    skip_bad_images: bool = False
    """Skip missing/unreadable images with a warning instead of refusing the dataset."""

    # --- the LoRA ---------------------------------------------------------------------------------
    lora_rank: int = Field(8, gt=0)
    """LoRA rank (network_dim). Higher learns more detail, costs memory and file size."""
    lora_alpha: Optional[float] = Field(None, gt=0)
    """LoRA alpha; scale = alpha/rank. Default: equal to lora_rank (scale 1)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA path."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt. Default: the family's (UNet attention to_q/to_k/to_v/to_out.0 for SD/SDXL,
    q/k/v/o_proj for causal LMs)."""
    train_text_encoder: bool = False
    """Also train a LoRA on the text encoder(s) (SD: CLIP; SDXL: both CLIP-L and OpenCLIP-G)."""
    text_encoder_target_modules: Optional[list[str]] = None
    """Text encoder modules to adapt when train_text_encoder is on. Default: the family's (CLIP attention
    q/k/v/out_proj)."""
    init_lora_weights: Optional[Path] = None
    """Continue from an existing LoRA (.safetensors written by this trainer or kohya-style)."""

    # --- optimisation -----------------------------------------------------------------------------
    batch_size: int = Field(1, gt=0)
    """Samples per micro-batch. See `agentd validate` for the largest that fits your GPU."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step (effective batch = batch_size x this)."""
    epochs: int = Field(1, gt=0)
    """Passes over the dataset (ignored when max_train_steps is set)."""
    max_train_steps: Optional[int] = Field(None, gt=0)
    """Optimizer steps to run; overrides epochs."""
    learning_rate: float = Field(1e-4, gt=0)
    """Peak learning rate. 1e-4 is the usual SD LoRA value; 2e-4 learns faster, risks overfitting."""
    text_encoder_lr: Optional[float] = Field(None, gt=0)
    """Learning rate for the text encoder LoRA. Default: learning_rate."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """AdamW hyper-parameters."""
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """Schedule after warmup."""
    lr_warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 over this many optimizer steps."""
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    """Clip gradients to this norm; null disables clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """no: fp32 (exact, slowest). fp16: CUDA autocast + GradScaler. bf16: autocast (CUDA or CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: much less memory, ~30% slower."""
    cache_latents: bool = False
    """Encode each image with the VAE once instead of every step: faster, frees the VAE."""
    seed: int = 42
    """Seeds data order, noise and LoRA init. Same seed + data + config = same LoRA."""
    deterministic: bool = False
    """torch deterministic algorithms: bitwise-reproducible on CUDA too, somewhat slower."""
    max_seq_length: int = Field(512, gt=0)
    """Text mode: tokens per sample (longer samples are cut)."""

    # --- outputs ----------------------------------------------------------------------------------
    output_dir: Path
    """Where the LoRA, checkpoints, logs and run.json go."""
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """File name of the LoRA (<name>.safetensors). Default: the output_dir's folder name."""
    save_steps: int = Field(500, gt=0)
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = Field(3, gt=0)
    """Newest checkpoints kept; older ones are deleted."""
    log_every: int = Field(1, gt=0)
    """Console/event line every N optimizer steps (loss.csv always has every step)."""
    resume: str = "auto"
    """auto: continue from the newest matching checkpoint in output_dir. never: start fresh.
    Or a path to a checkpoint folder."""
    recommended_batch_size: Optional[int] = Field(None, gt=0)
    """Advisory (the seed's field): warn when batch_size is larger."""
    priority: int = 0
    """agentd's queue: higher runs first, FIFO within a priority (`agentd run --priority N` overrides);
    a lower one still runs once it has waited the daemon's max_wait_s."""
    device: Optional[Union[int, str]] = None
    """agentd only: the GPU to train on - an NVML index (0), a GPU UUID (GPU-8f2c...) or a name pattern
    ("*4090*"). Default: any GPU the VRAM gate picks. A pattern that matches no GPU is refused with the list."""
    sample_prompts: list[str] = Field(default_factory=list)
    """Prompts to render with the trained LoRA at the end (image mode), saved under samples/."""

    @model_validator(mode="after")
    def _cross_field_checks(self) -> "TrainConfig":
        problems: list[tuple[str, str, str, Any]] = []
        if self.model_family is not None:
            from trainer.families import FAMILIES, supported

            if self.model_family not in FAMILIES:
                problems.append(("model_family", "is not a supported model family",
                                 f"use one of: {supported()} (or remove it: it is detected)", self.model_family))
        if self.cache_latents and self.random_flip:
            problems.append(("cache_latents", "cannot be combined with random_flip: cached latents "
                             "are computed once, unflipped", "set random_flip: false or cache_latents: false",
                             True))
        if self.cache_latents and not self.center_crop:
            problems.append(("cache_latents", "cannot be combined with random crops (center_crop: false)",
                             "set center_crop: true or cache_latents: false", True))
        if self.resume not in ("auto", "never") and not self.resume.strip():
            problems.append(("resume", "is empty", "use auto, never or a checkpoint folder path", self.resume))
        if problems:
            # Raised as ValueError so pydantic reports it with the other errors; the field rides along.
            raise ValueError(json.dumps(problems))
        return self

    # --- derived values ---------------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.name or self.output_dir.name

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    @property
    def family_name(self) -> str:
        """`model_family` once preflight resolved it; before that, the default family of `mode`."""
        from trainer.families import default_family

        return self.model_family or default_family(self.mode)

    @property
    def effective_targets(self) -> list[str]:
        if self.target_modules:
            return list(self.target_modules)
        from trainer.families import family

        return list(family(self.family_name).DEFAULT_TARGETS)

    @property
    def effective_te_targets(self) -> list[str]:
        if self.text_encoder_target_modules:
            return list(self.text_encoder_target_modules)
        from trainer.families import family

        return list(family(self.family_name).DEFAULT_TE_TARGETS)

    def resolved(self) -> dict:
        """The config as plain JSON-able data, with defaults filled in and paths absolute."""
        return json.loads(self.model_dump_json())

    def training_fields(self) -> dict:
        return {k: v for k, v in self.resolved().items() if k not in NON_TRAINING_FIELDS}

    def config_hash(self) -> str:
        """Hash of everything that shapes the trained model (not save/log cadence, output paths)."""
        return _hash(self.training_fields())

    def full_hash(self) -> str:
        return _hash(self.resolved())


def _hash(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read, parse and validate a YAML training config. Raises ConfigError with every problem found."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem("<file>", "config file not found", "check the path", str(path))], source)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([Problem("<file>", f"cannot read config file: {e}", "check the file")], source)
    return parse_config(text, base_dir=path.resolve().parent, source=source, overrides=overrides)


def parse_config(text: str, *, base_dir: Path, source: str = "config",
                 overrides: dict | None = None) -> TrainConfig:
    raw, lines = read_yaml_mapping(text, source, empty_fix="write a mapping with at least train_data_dir, "
                                                           "base_model, output_dir")
    if overrides:
        raw.update(overrides)
    raw = _resolve_paths(raw, base_dir)
    return validate_model(TrainConfig, raw, lines, source)


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    raw = resolve_relative(raw, PATH_FIELDS, base_dir)
    resume = raw.get("resume")
    if isinstance(resume, str) and resume not in ("auto", "never") and resume.strip():
        raw = resolve_relative(raw, ("resume",), base_dir)
    return raw


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into every output folder: the config that made it)."""
    return yaml.safe_dump(cfg.resolved(), sort_keys=False)
