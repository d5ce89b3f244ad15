"""The training config: one YAML file in, one validated `TrainConfig` out.

The seed's keys work exactly as written (`train_data_dir, metadata_path, base_model, lora_rank,
batch_size, epochs, learning_rate, output_dir, save_steps`); everything else has a documented default.

Rules a user can rely on:
- Relative paths resolve against the folder that holds the config file (not the current directory),
  so a config committed next to its data works from any workspace.
- Numbers may be written the way YAML 1.1 reads as strings (`2e-4`); they mean the number.
- Unknown keys are errors that name the closest valid key. What depends on the model is checked where
  the families' table is (`trainer.families.resolve`, at preflight): a `model_family` that is none, and a
  model family's own keys (guidance_scale for Flux, chat_template for causal LMs ...) set on a config of
  another family (`trainer.families.key_problems`, from each family's OWN_KEYS).
- Every problem is found before any model loads and reported together (`ConfigError`),
  each with the field, the value, the YAML line and the fix.

Cross-field checks live in one place: `TrainConfig._cross_field_checks`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from trainer.errors import ConfigError, Problem
from trainer.yaml_schema import line_of, read_yaml_mapping, resolve_relative, validate_model

# Fields that do not change the trained model: editing them must not block a resume.
NON_TRAINING_FIELDS = frozenset({
    "name", "output_dir", "save_steps", "log_every", "keep_checkpoints", "resume",
    "skip_bad_images", "recommended_batch_size", "sample_prompts", "sample_every_n_steps",
    "sample_every_n_epochs", "sample_at_start", "sample_sampler", "validation_data_dir",
    "validate_every_n_steps", "history_dir", "keep_runs", "compare_with", "priority", "device", "release",
    # Where it trains: `devices` splits the same batch (batch_size_per_device, which does not, is a training field).
    "devices", "allow_world_size_change",
    "validation_file", "export_merged", "eval",
    # Where the disk caches live, and whether they are used: entries are exact (tested bit-identical).
    "cache_dir", "cache_latents_to_disk", "cache_text_embeddings_to_disk",
})
PATH_FIELDS = ("train_data_dir", "metadata_path", "cache_dir", "mask_dir", "base_model", "base_model_config",
               "init_lora_weights", "output_dir", "history_dir", "compare_with", "validation_data_dir",
               "validation_file", "sample_prompts")  # sample_prompts: only when it is a file name (a list stays a list)
RESUME_POLICIES = ("auto", "never", "strict")
# kohya's sampler names (sd-scripts' --sample_sampler); trainer.families.sd_task maps each to a diffusers scheduler.
SAMPLERS = ("ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
            "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a", "ddpm")


CAPTION_OPTIONS = ("shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator",
                   "caption_dropout_rate", "caption_tag_dropout_rate", "caption_prefix", "caption_suffix")
SUBSET_PATH_FIELDS = ("image_dir", "metadata_path", "mask_dir")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# kohya's `optimizer_type` names (case-insensitive there) -> ours, each -> (module to import, class path, pip
# package): trainer.training.optim builds it, trainer.checks.preflight checks the library is there.
OPTIMIZER_LIBRARIES = {
    "adamw": ("torch", "torch.optim.AdamW", "torch"),
    "adamw8bit": ("bitsandbytes", "bitsandbytes.optim.AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "prodigyopt.Prodigy", "prodigyopt"),
    "adafactor": ("transformers", "transformers.optimization.Adafactor", "transformers"),
}
OPTIMIZERS = tuple(OPTIMIZER_LIBRARIES)
# kohya's `lr_scheduler` names; trainer.training.optim.lr_factor computes each.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


class OptimizerConfig(_Strict):
    """Optimizer settings (trainer.training.optim builds it; the libraries are bitsandbytes, prodigyopt, transformers)."""

    name: Literal[OPTIMIZERS] = "adamw"
    """adamw (torch). adamw8bit: bitsandbytes, CUDA only, ~75% less optimizer memory. prodigy: prodigyopt,
    learns its own step size (set learning_rate: 1.0). adafactor: transformers, factored second moments
    (least memory), fixed learning_rate (relative_step off)."""
    weight_decay: float = Field(1e-2, ge=0)
    """Decoupled weight decay. 0.01 is the diffusers/kohya default; 0 for tiny datasets."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """First-moment decay."""
    beta2: float = Field(0.999, ge=0, lt=1)
    """Second-moment decay."""
    eps: float = Field(1e-8, gt=0)
    """Denominator epsilon; raise to 1e-6 for fp16 stability."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the optimizer's constructor (kohya's optimizer_args), e.g.
    {d_coef: 2, use_bias_correction: true} for Prodigy, {scale_parameter: false} for Adafactor."""


# The network types (kohya's network_module + LyCORIS's algo): trainer.families.peft_lora builds each with peft.
NETWORK_TYPES = ("lora", "locon", "loha", "lokr")


class NetworkConfig(_Strict):
    """What kind of network is trained on the frozen base (kohya's network_module/network_args). lora_rank,
    lora_alpha and lora_dropout (the flat keys) are its rank, alpha and dropout for every type."""

    type: Literal[NETWORK_TYPES] = "lora"
    """lora: low-rank A/B on the attention (target_modules) layers. locon: LoRA on those plus the UNet's
    ResNet-block and up/downsampler layers (kohya's conv_dim set: 3x3 convolutions at conv_rank, their 1x1
    shortcuts and time-embedding projections at lora_rank); the usual choice for styles. loha: LyCORIS LoHa
    (Hadamard product of two low-rank pairs: more expressive per parameter). lokr: LyCORIS LoKr (Kronecker
    product of two small factors: the smallest files). Image families with a UNet (sd, sdxl) train every type;
    causal LMs lora, loha and lokr (no convolutions); Flux lora (its diffusers-format file carries LoRA only)."""
    dora: bool = False
    """DoRA (weight-decomposed LoRA: a trained magnitude per output channel; LyCORIS's dora_wd). lora and
    locon only; not on Flux."""
    conv_rank: Optional[int] = Field(None, gt=0)
    """locon: rank of the 3x3 convolutions (kohya's conv_dim). Default: lora_rank."""
    conv_alpha: Optional[float] = Field(None, gt=0)
    """locon: alpha of the 3x3 convolutions (kohya's conv_alpha; scale = conv_alpha / conv_rank). Default:
    conv_rank."""
    factor: int = -1
    """lokr: the Kronecker factor (LyCORIS's factor): each dimension d is split as factor x d/factor when factor
    divides it; -1 (default) splits it near its square root."""
    decompose_both: bool = False
    """lokr: also factor the smaller Kronecker matrix into two rank-lora_rank matrices (LyCORIS's
    decompose_both)."""

    @property
    def module(self) -> str:
        """kohya's ss_network_module for this type (what A1111, ComfyUI and kohya's tools read)."""
        return "networks.lora" if self.type == "lora" and not self.dora else "lycoris.kohya"

    @property
    def title(self) -> str:
        return {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}[self.type] \
            + (" + DoRA" if self.dora else "")


class EmaConfig(_Strict):
    """An exponential moving average of the trained network (trainer.training.ema), kept in fp32 in the checkpoint."""

    decay: float = 0.999
    """Each update keeps this much of the average: shadow = decay x shadow + (1 - decay) x weights. 0.999 averages
    over about the last 1000 updates; use a smaller decay (0.99) for short runs. Strictly between 0 and 1."""
    update_every: int = Field(1, gt=0)
    """Update the average every N optimizer steps."""
    use_for: Literal["samples", "export", "both"] = "samples"
    """samples: samples and validation loss use the EMA weights, and it is exported as a second file
    <name>-ema.safetensors beside the raw <name>.safetensors. export: <name>.safetensors holds the EMA weights in
    place of the raw ones (those stay in the last checkpoint); samples and validation use the raw weights.
    both: the two."""


class SubsetConfig(_Strict):
    """One folder of a `datasets:` list (kohya's [[datasets.subsets]]). Caption options left out here
    take the top-level value."""

    image_dir: Path
    """Folder that holds this subset's images (directly, not in N_name subfolders)."""
    metadata_path: Optional[Path] = None
    """CSV with file_name,text for this folder. Absent: caption files beside the images."""
    num_repeats: int = Field(1, gt=0)
    """Times each image is seen per epoch (kohya's N in N_name): balances small concepts against big ones."""
    caption_extension: Optional[str] = None
    """Caption file suffix (default: the top-level caption_extension, .txt)."""
    class_tokens: Optional[str] = None
    """Caption for images without a caption file (kohya: the name part of N_name)."""
    is_reg: bool = False
    """Regularization (class) images: their loss counts prior_loss_weight times."""
    mask_dir: Optional[Path] = None
    """masked_loss: folder of mask images named like the images (white = train, black = ignore)."""
    shuffle_caption: Optional[bool] = None
    """See the top-level key of the same name."""
    keep_tokens: Optional[int] = Field(None, ge=0)
    """See the top-level key of the same name."""
    keep_tokens_separator: Optional[str] = None
    """See the top-level key of the same name."""
    caption_separator: Optional[str] = None
    """See the top-level key of the same name."""
    caption_dropout_rate: Optional[float] = Field(None, ge=0, le=1)
    """See the top-level key of the same name."""
    caption_tag_dropout_rate: Optional[float] = Field(None, ge=0, le=1)
    """See the top-level key of the same name."""
    caption_prefix: Optional[str] = None
    """See the top-level key of the same name."""
    caption_suffix: Optional[str] = None
    """See the top-level key of the same name."""


# What the evaluation computes (trainer.eval), higher is better for all but perplexity. The names are the keys
# of eval/metrics.json and eval/decision.json, of `gate:` and of summary.csv's eval_<metric> columns.
IMAGE_METRICS = ("clip_t", "clip_i", "dino", "aesthetic")
TEXT_METRICS = ("perplexity", "exact_match", "rouge_l")
LOWER_IS_BETTER = frozenset({"perplexity"})
# What an `eval:` block gives for each metric to be computed (EvalConfig.metrics), for fixes that name it
METRIC_NEEDS = ("clip_t: clip_model; clip_i: clip_model + reference_dir; dino: dino_model + reference_dir; "
                "aesthetic: aesthetic_head + clip_model; exact_match/rouge_l: eval_file; lm_eval.<task>: lm_eval_tasks")
COMPARE_KINDS = ("previous", "production", "base")
EVAL_PATH_FIELDS = ("reference_dir", "clip_model", "dino_model", "aesthetic_head", "eval_file", "lm_eval_task_dir",
                    "prompts")  # prompts: only when it is a file name


class GateRule(_Strict):
    """How one metric decides: the candidate is `no worse` while the lower end of the 95% interval of its
    paired difference to the comparison stays above -margin, `better` when it is above 0."""

    margin: float = Field(0.0, ge=0)
    """The drop (in the metric's own scale: CLIP-T 0..100, cosines -1..1, perplexity, fractions) still
    counted as no worse. 0: any drop the interval is sure of is worse."""


class EvalConfig(_Strict):
    """The evaluation run after training (and by `lora-train eval` / `agentd eval`): metrics per arm
    (candidate, comparison, base without the adapter) on the same prompts x seeds, and an A/B decision.
    Metric models are local folders only: nothing is downloaded."""

    prompts: Union[list[str], Path] = Field(default_factory=list)
    """Image mode: prompts in kohya's prompt syntax (like sample_prompts), a list or a text file, one per line;
    `{trigger}` becomes `trigger`. E.g. ["a {trigger} in the snow --s 20", "a {trigger} on a beach"]."""
    trigger: Optional[str] = None
    """What `{trigger}` in the prompts becomes. Default: the class tokens of the first training subset."""
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3], min_length=1)
    """One image per prompt and seed and arm, from a CPU torch.Generator seeded with it: every arm sees the
    same noise. More seeds: narrower intervals, longer evaluation."""
    reference_dir: Optional[Path] = None
    """Held-out images of the concept for CLIP-I and DINO (never training images: checked by content hash)."""
    clip_model: Optional[Path] = None
    """A local transformers CLIP folder (CLIPModel, e.g. clip-vit-large-patch14): CLIP-T (100 x cosine of
    image and prompt embeddings, torchmetrics' CLIPScore scale without its floor at 0), and CLIP-I with
    reference_dir (cosine, -1..1)."""
    dino_model: Optional[Path] = None
    """A local transformers ViT or DINOv2 folder: DINO similarity (cosine of CLS embeddings) to reference_dir."""
    aesthetic_head: Optional[Path] = None
    """A LAION-style aesthetic MLP head (.safetensors or .pth state dict) on clip_model's image embeddings."""
    compare_with: str = "previous"
    """The comparison arm: previous (the newest earlier run's LoRA; none: the base), production (the released
    LoRA, from agentd's release registry), base (the model without the adapter), or a run folder."""
    gate: dict[str, GateRule] = Field(default_factory=dict)
    """Per metric, the margin of its decision, e.g. {clip_t: {margin: 1.0}, dino: {margin: 0.02}}. The metrics
    named here decide the overall verdict (none named: every metric, margin 0); the others are reported.
    A metric named here must be one the config computes."""
    every_n_checkpoints: Optional[int] = Field(None, gt=0)
    """Also score every N-th checkpoint still kept (candidate arm only, the same prompts and seeds) and name the
    best by the first gate metric (else the first metric): metrics.json's "checkpoints", and a console line."""
    bootstrap: int = Field(1000, ge=100)
    """Bootstrap resamples of the paired per-prompt differences (seeded: the same scores give the same interval)."""
    eval_file: Optional[Path] = None
    """Text mode: a JSONL of {"prompt": ..., "answer": ...} records: greedy answers (as samples are made: in the
    chat template when the model trains on chat data), scored by exact match (normalised) and ROUGE-L F1."""
    lm_eval_tasks: list[str] = Field(default_factory=list)
    """Text mode: EleutherAI lm-evaluation-harness task names found in lm_eval_task_dir (offline)."""
    lm_eval_task_dir: Optional[Path] = None
    """The folder of lm-evaluation-harness task YAMLs (and their local data) for lm_eval_tasks."""

    def metrics(self, mode: str | None) -> list[str]:
        """The metrics this block computes (for `mode`; None: either mode's)."""
        image = [m for m, needs in (("clip_t", self.clip_model), ("clip_i", self.clip_model and self.reference_dir),
                                    ("dino", self.dino_model and self.reference_dir),
                                    ("aesthetic", self.aesthetic_head and self.clip_model)) if needs]
        text = ["perplexity"] + (["exact_match", "rouge_l"] if self.eval_file else []) \
            + [f"lm_eval.{t}" for t in self.lm_eval_tasks]
        return {"image": image, "text": text}.get(mode, image + text)


class ReleaseRequest(_Strict):
    """`release:` of a training config: agentd releases the LoRA when the job succeeds (agentd.release; the
    targets and their credentials are the daemon's, in agentd.yaml). `lora-train` ignores it."""

    name: Optional[str] = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    """Release name (a slug: a-z, 0-9, -, _). Default: the run's name."""
    to: Optional[list[str]] = None
    """Release targets by their names in agentd.yaml. Default: the daemon's release.default_to."""
    when: Literal["better", "always", "never"] = "better"
    """better: when the promotion gate passes (the evaluation against production is better or no worse, or
    there is no production yet); always: past the gate (recorded as forced by this config); never: not at all."""
    keep: bool = False
    """Also copy the LoRA to the box's backup target (release.backup) whether or not it is released, so that
    retention may prune this run's checkpoints once that copy verifies."""


class TrainConfig(_Strict):
    """A LoRA training job. Paths are absolute after loading (resolved against the config's folder)."""

    _lines: dict = PrivateAttr(default_factory=dict)  # (key, subkey, ...) -> YAML line, when read from a file

    # --- what to train on -------------------------------------------------------------------------
    mode: Optional[Literal["image", "text"]] = None
    """image (diffusion models, diffusers) or text (causal LMs, transformers). Default: what the base
    model is (its model family); set it only to have the config say what it expects."""
    model_family: Optional[str] = None
    """sd (SD 1.x/2.x), sdxl or causal_lm (see trainer.families). Default: detected from base_model
    (model_index.json's pipeline class, config.json's architectures, or a single file's key names);
    when set it must agree with the files."""
    train_data_dir: Optional[Path] = None
    """Folder of training images (image mode); text mode: a .json/.jsonl file or a folder of them (or of .txt
    files), read as dataset_format says. Image mode, kohya's layout: when it
    holds no images itself, each `N_name` subfolder is a subset seen N times per epoch, `name` being the
    caption (class tokens) of images without a caption file. Or use `datasets:` instead."""
    datasets: Optional[list[SubsetConfig]] = None
    """Image mode: several folders, each with its own repeats, captions and is_reg (instead of
    train_data_dir), e.g. [{image_dir: data/cat, num_repeats: 3}, {image_dir: data/reg, is_reg: true}]."""
    caption_extension: str = ".txt"
    """Caption file suffix beside each image (kohya's --caption_extension)."""
    prior_loss_weight: float = Field(1.0, ge=0)
    """Loss weight of regularization (is_reg) images relative to training images."""
    metadata_path: Optional[Path] = None
    """CSV with `file_name,text` columns (also `filename|image|file` and `caption|prompt|text`).
    Absent: a `.txt` caption beside each image (kohya's convention)."""
    base_model: Path
    """Diffusers folder (model_index.json) or a single-file `.safetensors`/`.ckpt` checkpoint."""
    base_model_config: Optional[Path] = None
    """For a single-file base_model: a local diffusers-format folder with its configs and tokenizer.
    Not needed for SD 1.5, SD 2.x (768-v) and SDXL base single files (their architecture configs ship in
    trainer/families/model_configs); needed for a Flux single file (its VAE, text encoders and tokenizers) and for a
    fine-tune whose configs differ from the shipped ones (e.g. SD 2.x base at 512 px)."""
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
    enable_bucket: bool = False
    """Aspect-ratio buckets (kohya): each image goes to the bucket of nearest aspect ratio with area <=
    resolution^2, is scaled to cover it and cropped minimally; each batch is from one bucket. Off: every
    image is a resolution x resolution crop."""
    min_bucket_reso: int = Field(256, gt=0)
    """Smallest bucket side in pixels."""
    max_bucket_reso: int = Field(1024, gt=0)
    """Largest bucket side in pixels."""
    bucket_reso_steps: int = Field(64, gt=0)
    """Bucket sides are multiples of this (a multiple of the VAE's factor, 8; 64 suits every UNet)."""
    bucket_no_upscale: bool = False
    """Never enlarge an image: smaller images get a bucket of their own size (rounded down to the step)."""

    # --- captions (kohya's options; random draws come from each sample's own generator, so they resume) ---
    shuffle_caption: bool = False
    """Shuffle the caption's tags (split on caption_separator) each time it is seen, after keep_tokens."""
    caption_separator: str = ", "
    """What separates tags in a caption."""
    keep_tokens: int = Field(0, ge=0)
    """Leading tags never shuffled or dropped (e.g. the trigger word)."""
    keep_tokens_separator: str = ""
    """Instead of keep_tokens: tags before this marker (e.g. "|||") are kept in place."""
    caption_dropout_rate: float = Field(0.0, ge=0, le=1)
    """Probability of training an image with an empty caption (helps unconditional guidance)."""
    caption_tag_dropout_rate: float = Field(0.0, ge=0, le=1)
    """Probability of dropping each (non-kept) tag."""
    caption_prefix: str = ""
    """Text put before every caption (joined with a space), before shuffling."""
    caption_suffix: str = ""
    """Text put after every caption (joined with a space), before shuffling."""

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
    """Continue from an existing LoRA (.safetensors written by this trainer or kohya-style), of the same
    network type."""
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    """The network type and its options, e.g. {type: locon, conv_rank: 8, conv_alpha: 4} or {type: lokr,
    factor: 8}. Default: plain LoRA."""
    ema: Optional[EmaConfig] = None
    """Keep an EMA of the network's weights, e.g. {decay: 0.999, update_every: 1, use_for: samples}. Costs 4 bytes
    per network parameter of GPU memory (8 while samples or the export swap it in). Default: none."""

    # --- optimisation -----------------------------------------------------------------------------
    batch_size: int = Field(1, gt=0)
    """Samples per micro-batch, over all devices: with `devices: W` each rank trains batch_size / W of them,
    so the same config on 1 or W GPUs trains the same model. See `agentd validate` for the largest that fits."""
    batch_size_per_device: Optional[int] = Field(None, gt=0)
    """Instead of batch_size: samples per micro-batch on each device, so the batch grows with `devices`
    (micro-batch = W x this). Leave out to keep the batch whatever the device count."""
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
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"
    """Schedule after warmup (kohya's names): constant, constant_with_warmup (same here), linear, cosine,
    cosine_with_restarts (lr_restart_cycles hard restarts), polynomial (lr_scheduler_power)."""
    lr_restart_cycles: int = Field(1, gt=0)
    """cosine_with_restarts: number of cosine cycles (1 = plain cosine)."""
    lr_scheduler_power: float = Field(1.0, gt=0)
    """polynomial: the decay's power (1 = linear)."""
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
    cache_text_embeddings: bool = True
    """With frozen text encoders: encode each distinct caption once instead of every step (SDXL's two
    encoders are a large part of a step). Costs host memory per caption; ignored with train_text_encoder."""
    compile: bool = False
    """torch.compile the UNet (CUDA): faster steps after minutes of compiling at the start of each job."""
    cache_latents_to_disk: bool = False
    """Also keep the latents on disk (cache_dir), keyed by image content, VAE and crop: the next job on the
    same data never runs the VAE for them. Implies cache_latents."""
    cache_text_embeddings_to_disk: bool = False
    """Also keep the text-encoder outputs on disk (cache_dir), keyed by caption tokens and encoder weights
    (kohya's cache_text_encoder_outputs_to_disk). Needs fixed captions and frozen encoders."""
    cache_dir: Optional[Path] = None
    """Disk cache folder. Default: $AGENTD_CACHE_DIR, else the daemon's cache dir ($CACHE_DIRECTORY),
    else ~/.cache/agentd. `agentd gc` prunes entries unused for retention_days."""
    noise_offset: float = Field(0.0, ge=0)
    """Add this much per-channel constant noise (kohya --noise_offset; ~0.05-0.1 gives darker darks and
    brighter brights)."""
    multires_noise_iterations: int = Field(0, ge=0)
    """Multi-resolution (pyramid) noise levels added to the noise; 6-10 is usual, 0 is off."""
    multires_noise_discount: float = Field(0.3, ge=0, le=1)
    """Weight decay per pyramid level of multires noise."""
    min_snr_gamma: Optional[float] = Field(None, gt=0)
    """Min-SNR loss weighting (Hang et al. 2023): 5 is the paper's value; faster convergence. Off: null."""
    clip_skip: Optional[int] = Field(None, ge=1)
    """Use the text encoder's N-th hidden state from the end (2 for anime-style models); 1 = last."""
    masked_loss: bool = False
    """Train only where a mask is white: the mask is the image's alpha channel (alpha_mask) or a file of
    the same name in the subset's mask_dir."""
    alpha_mask: bool = False
    """masked_loss: take the mask from each image's alpha channel."""
    mask_dir: Optional[Path] = None
    """masked_loss: folder of masks named like the images (for train_data_dir; subsets have their own)."""
    seed: int = 42
    """Seeds data order, noise and LoRA init. Same seed + data + config = same LoRA."""
    deterministic: bool = False
    """torch deterministic algorithms: bitwise-reproducible on CUDA too, somewhat slower."""
    max_seq_length: int = Field(512, gt=0)
    """Text mode: tokens per sample (longer samples are cut or dropped, see truncation); at most the
    model's max_position_embeddings. Left out: 512, or the model's max_position_embeddings when smaller
    (`validate` says which)."""
    dataset_format: Literal["auto", "text", "alpaca", "sharegpt", "messages"] = "auto"
    """Text mode: the records of train_data_dir (a .json/.jsonl file or a folder of them):
    text ({"text"}; also .txt files), alpaca (instruction/input/output), sharegpt (conversations of
    from/value), messages (OpenAI role/content). auto decides from the first record and says so."""
    chat_template: Optional[str] = None
    """Text mode, chat formats: a Jinja chat template, inline or a file name (relative to the config).
    Default: the model's own (tokenizer_config.json / chat_template.jinja), which is what it was tuned with."""
    train_on_prompt: bool = False
    """Text mode, chat formats: also train on system/user tokens. false trains on the assistant turns only
    (every turn of a multi-turn conversation), the usual choice."""
    truncation: Literal["cut", "drop"] = "cut"
    """Text mode: a sample longer than max_seq_length is cut to it (keeps the data, may cut an answer)
    or dropped (keeps only whole samples)."""
    packing: bool = False
    """Text mode: concatenate samples into rows of max_seq_length (no padding: faster on short samples),
    position ids restarting per sample and attention kept within a sample where the model supports it."""
    validation_file: Optional[Path] = None
    """Text mode: held-out records (a .json/.jsonl file or folder, same format as the training data) for
    the validation loss, instead of validation_split."""
    export_merged: bool = False
    """Text mode: also save <name>-merged/, the base with the LoRA merged in (merge_and_unload), a
    transformers folder with the tokenizer and chat template: as big as the base model."""
    quantization: Optional[Literal["4bit", "8bit", "fp8", "no"]] = None
    """How the frozen base's weights are stored (the LoRA weights stay fp32); each family allows its own:
    causal LMs (QLoRA, CUDA + bitsandbytes): 4bit (NF4, double quantization, bf16 compute) or 8bit, ~4x / 2x
    less weight memory, somewhat slower steps, gradient checkpointing on; default: none (no).
    Flux: fp8 (e4m3 with a per-row scale, upcast one layer at a time: trainer.families.fp8, any device) for the
    transformer blocks, half of bf16's weight memory (what fits a 24 GB card), outputs within a few percent
    of bf16's; default fp8, no keeps the training dtype. SD/SDXL: not available (their bases fit as they are)."""

    # --- Flux (trainer.families.flux; defaults come from the family) --------------------------------
    guidance_scale: Optional[float] = Field(None, gt=0)
    """FLUX.1 [dev]: the value fed to the transformer's distilled-guidance embedding while training.
    Default 1.0 (what Flux LoRA trainers use: the LoRA then responds to any sampling guidance). schnell has
    no guidance embedding: setting it there is refused."""
    max_sequence_length: Optional[int] = Field(None, gt=0)
    """Flux: T5 tokens per caption. Default: 512 for dev, 256 for schnell (as they were trained); at most 512.
    Shorter is faster and lighter but cuts long captions."""
    timestep_density: Optional[Literal["uniform", "logit_normal", "mode"]] = None
    """Flux: how training noise levels t are drawn before the scheduler's shift (SD3 paper). Default
    logit_normal (more steps at mid noise, where learning happens); uniform covers all levels evenly; mode
    (with mode_scale) leans to the middle or the ends."""
    logit_mean: float = 0.0
    """timestep_density logit_normal: mean of the normal whose sigmoid is t (> 0: noisier steps)."""
    logit_std: float = Field(1.0, gt=0)
    """timestep_density logit_normal: its standard deviation (smaller: more concentrated around the mean)."""
    mode_scale: float = 1.29
    """timestep_density mode: the SD3 paper's s (1.29: its recommended value; 0: uniform)."""

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
    """auto: continue an interrupted run of the same training config; when the last run finished or its
    training fields/data changed, start a new run (the previous one moves to runs/<run-id>/); a finished,
    unchanged config does nothing. strict: refuse instead of starting a new run when the config changed.
    never: always start a new run. Or a path to a checkpoint folder to resume from."""
    history_dir: Optional[Path] = None
    """Where previous runs are kept (each in <run-id>/). Default: <output_dir>/runs."""
    keep_runs: int = Field(10, gt=0)
    """Previous runs kept in history_dir; the oldest beyond this are deleted."""
    compare_with: Optional[Path] = None
    """A run folder (an output_dir or runs/<run-id>) the report compares with. Default: the newest previous run."""
    release: Optional[ReleaseRequest] = None
    """agentd only: release the LoRA to the box's release targets when the job succeeds ({name, to, when})."""
    recommended_batch_size: Optional[int] = Field(None, gt=0)
    """Advisory (the seed's field): warn when batch_size is larger."""
    priority: int = 0
    """agentd's queue: higher runs first, FIFO within a priority (`agentd run --priority N` overrides);
    a lower one still runs once it has waited the daemon's max_wait_s."""
    devices: Optional[Union[int, Literal["all"], list[Union[int, str]]]] = None
    """Train one job data-parallel on several devices: a count (2), a list of GPU indices or UUIDs
    ([0, 1] or [GPU-8f2c..., GPU-1a3b...]), or all. Each rank holds the frozen base and trains its share of
    every micro-batch; only the LoRA gradients are averaged. On a machine without GPUs, N CPU ranks (gloo).
    Default: one device. Cannot be combined with device."""
    allow_world_size_change: bool = False
    """Let `resume` continue a checkpoint written with another device count (not bit-exact: the per-rank
    float sums differ); recorded in run.json. Default: such a resume is refused."""
    device: Optional[Union[int, str]] = None
    """agentd only: the GPU to train on - an NVML index (0), a GPU UUID (GPU-8f2c...) or a name pattern
    ("*4090*"). Default: any GPU the VRAM gate picks. A pattern that matches no GPU is refused with the list."""
    sample_prompts: Union[list[str], Path] = Field(default_factory=list)
    """Prompts to sample with the LoRA (images; text mode: completions): a list, or a text file with one
    prompt per line in kohya's syntax (`a cat --n blurry --w 512 --h 512 --s 20 --l 7.5 --d 42 --ss euler_a`).
    Always sampled at the end; see sample_every_n_steps/epochs and sample_at_start."""
    sample_every_n_steps: Optional[int] = Field(None, gt=0)
    """Also sample every N optimizer steps (each round costs a few denoising runs per prompt)."""
    sample_every_n_epochs: Optional[int] = Field(None, gt=0)
    """Also sample at the end of every N epochs."""
    sample_at_start: bool = False
    """Sample before the first step too (the base model's look, for comparison)."""
    sample_sampler: Literal[SAMPLERS] = "ddim"
    """Sampler for sample images (kohya names); a prompt's `--ss` overrides it."""

    # --- validation -------------------------------------------------------------------------------
    validation_split: Optional[float] = None
    """Fraction of the data (0 < x <= 0.5) held out for validation loss, chosen by a fixed seed from the
    data alone, so runs of the same data validate on the same samples."""
    validation_data_dir: Optional[Path] = None
    """A separate validation set (same layout as train_data_dir) instead of validation_split."""
    validate_every_n_steps: Optional[int] = Field(None, gt=0)
    """Validation loss every N optimizer steps (and at the end). Default: at every checkpoint (save_steps)."""
    early_stopping_patience: Optional[int] = Field(None, gt=0)
    """Stop (successfully) when the validation loss has not improved for this many validations."""

    # --- evaluation (trainer.eval, trainer.training.evaluation) -------------------------------------
    eval: Optional[EvalConfig] = None
    """Quality metrics and an A/B decision after training (eval/metrics.json, eval/decision.json, the report,
    summary.csv's eval_<metric>; `agentd run` exits 6 on "worse"). See the README's Evaluation section."""

    @model_validator(mode="after")
    def _cross_field_checks(self) -> "TrainConfig":
        problems: list[tuple[str, str, str, Any]] = []
        problems += self._dataset_checks()
        if self.latents_cached and self.random_flip:
            problems.append(("cache_latents", "cannot be combined with random_flip: cached latents "
                             "are computed once, unflipped", "set random_flip: false or cache_latents: false",
                             True))
        if self.latents_cached and not self.center_crop:
            problems.append(("cache_latents", "cannot be combined with random crops (center_crop: false)",
                             "set center_crop: true or cache_latents: false", True))
        if self.resume not in RESUME_POLICIES and not self.resume.strip():
            problems.append(("resume", "is empty", "use auto, never, strict or a checkpoint folder path",
                             self.resume))
        if self.validation_split is not None and not 0 < self.validation_split <= 0.5:
            problems.append(("validation_split", "must be in (0, 0.5]", "hold out a fraction such as 0.1, "
                             "or remove the key", self.validation_split))
        if self.validation_split is not None and self.validation_data_dir is not None:
            problems.append(("validation_split", "cannot be combined with validation_data_dir",
                             "keep one of the two", self.validation_split))
        problems += self._text_checks() + self._eval_checks()
        problems += self._network_checks()
        problems += self._devices_checks()
        if self.early_stopping_patience and self.validation_split is None and self.validation_data_dir is None \
                and self.validation_file is None:
            problems.append(("early_stopping_patience", "needs a validation set",
                             "set validation_split, validation_data_dir or validation_file",
                             self.early_stopping_patience))
        if problems:
            # Raised as ValueError so pydantic reports it with the other errors; the field rides along.
            raise ValueError(json.dumps(problems))
        return self

    def _eval_checks(self) -> list[tuple[str, str, str, Any]]:
        """An eval gate on a metric nothing computes (the model folders themselves: trainer.eval.checks)."""
        if self.eval is None:
            return []
        computed = self.eval.metrics(self.mode)
        return [(f"eval.gate.{name}", f"no model computes this metric (computed: {', '.join(computed) or 'none'})",
                 f"give the model it needs ({METRIC_NEEDS}), or remove it from gate", name)
                for name in self.eval.gate if name not in computed]

    def _devices_checks(self) -> list[tuple[str, str, str, Any]]:
        """`devices` on its own terms (what the box has is checked where it is known: trainer.checks.devices)."""
        problems: list[tuple[str, str, str, Any]] = []
        if self.devices is not None and self.device is not None:
            problems.append(("devices", "cannot be combined with device", "keep devices (several) or device (one)",
                             self.devices))
        if isinstance(self.devices, int) and self.devices < 1:
            problems.append(("devices", "must be at least 1", "give a count, a list of GPUs, or all", self.devices))
        if isinstance(self.devices, list):
            if not self.devices:
                problems.append(("devices", "is an empty list", "list GPU indices or UUIDs, or give a count",
                                 self.devices))
            twice = sorted({str(d) for d in self.devices if self.devices.count(d) > 1})
            if twice:
                problems.append(("devices", f"lists {', '.join(twice)} more than once",
                                 "list each GPU once", self.devices))
        if self.batch_size_per_device is not None and "batch_size" in self.model_fields_set:
            problems.append(("batch_size_per_device", "cannot be combined with batch_size",
                             "keep batch_size (the same batch on any device count) or batch_size_per_device "
                             "(the batch grows with devices)", self.batch_size_per_device))
        return problems

    def _text_checks(self) -> list[tuple[str, str, str, Any]]:
        """Text-mode keys that cannot work together."""
        problems: list[tuple[str, str, str, Any]] = []
        if self.validation_file is not None and (self.validation_split is not None
                                                 or self.validation_data_dir is not None):
            problems.append(("validation_file", "cannot be combined with validation_split or validation_data_dir",
                             "keep one validation source", str(self.validation_file)))
        # Text keys on an image config (and any family's keys on another's): trainer.families.key_problems.
        return problems

    def _network_checks(self) -> list[tuple[str, str, str, Any]]:
        """network options that do not belong to its type, and an EMA decay that averages nothing (which types a model family trains:
        trainer.families.network_problems; a LoKr factor against the layers: trainer.families.peft_lora)."""
        net, problems = self.network, []
        for key, types in (("conv_rank", ("locon",)), ("conv_alpha", ("locon",)), ("dora", ("lora", "locon")),
                           ("decompose_both", ("lokr",)), ("factor", ("lokr",))):
            if key in net.model_fields_set and getattr(net, key) != NetworkConfig.model_fields[key].default \
                    and net.type not in types:
                fix = {"conv_rank": "set network.type: locon (LoRA on the convolutions too), or remove conv_rank",
                       "conv_alpha": "set network.type: locon, or remove conv_alpha",
                       "dora": f"use type lora or locon with dora, or remove dora ({net.type} has no DoRA form)"}.get(
                    key, f"set network.type: lokr, or remove {key}")
                problems.append((f"network.{key}", f"does not apply to network type {net.type} (only to "
                                 f"{' and '.join(types)})", fix, getattr(net, key)))
        if self.ema is not None and not 0 < self.ema.decay < 1:
            problems.append(("ema.decay", "must be strictly between 0 and 1 (0: no averaging, 1: the average never "
                             "moves)", "use e.g. 0.999 (about the last 1000 updates) or 0.99 for short runs",
                             self.ema.decay))
        if net.type in ("loha", "lokr") and self.lora_dropout:
            problems.append(("lora_dropout", f"applies to the LoRA path (network types lora and locon), not to "
                             f"{net.type}", "remove lora_dropout, or train type lora/locon", self.lora_dropout))
        if net.type == "lokr" and (net.factor == 0 or net.factor < -1):
            problems.append(("network.factor", "must be -1 (split near the square root) or a positive number",
                             "use e.g. factor: 8 (LyCORIS's usual value) or -1", net.factor))
        return problems

    def _dataset_checks(self) -> list[tuple[str, str, str, Any]]:
        """Datasets, buckets and caption options that cannot work together."""
        problems: list[tuple[str, str, str, Any]] = []
        if self.train_data_dir is None and not self.datasets:
            problems.append(("train_data_dir", "is missing", "set train_data_dir to your data folder, or list "
                             "folders under datasets:", None))
        if self.train_data_dir is not None and self.datasets:
            problems.append(("datasets", "cannot be combined with train_data_dir",
                             "keep one: train_data_dir (one folder, or N_name subfolders) or datasets (a list)",
                             f"{len(self.datasets)} subsets"))
        if self.min_bucket_reso > self.max_bucket_reso:
            problems.append(("min_bucket_reso", f"is larger than max_bucket_reso ({self.max_bucket_reso})",
                             "make min_bucket_reso <= max_bucket_reso (kohya's defaults: 256 and 1024)",
                             self.min_bucket_reso))
        if self.enable_bucket and self.resolution is not None and self.bucket_reso_steps > self.resolution:
            problems.append(("bucket_reso_steps", f"is larger than resolution ({self.resolution}): no bucket fits",
                             "set bucket_reso_steps to a step below the resolution (kohya's 64 suits 512 px and up; "
                             "8 for tiny test images)", self.bucket_reso_steps))
        subsets = self.datasets or []
        # cache_text_embeddings is on by default and then quietly yields to varying captions; asked for
        # explicitly (or on disk) it cannot work with them.
        for key in ("cache_text_embeddings", "cache_text_embeddings_to_disk"):
            if getattr(self, key) and key in self.model_fields_set:
                for why in self._text_varies():
                    problems.append((key, f"cannot be combined with {why}: cached outputs are computed once per "
                                     "caption, so the caption (or the encoder) must not change",
                                     f"turn {why} off, or remove {key}", True))
        if self.masked_loss and not self.alpha_mask and self.mask_dir is None \
                and not (subsets and all(s.mask_dir for s in subsets)):
            problems.append(("masked_loss", "has no mask source", "set alpha_mask: true (masks from the images' "
                             "alpha channel) or mask_dir (a folder of masks named like the images)", True))
        return problems

    @property
    def base_quantization(self) -> str | None:
        """`quantization` with no as None: the format the frozen base is stored in (None: the training dtype)."""
        return None if self.quantization == "no" else self.quantization

    @property
    def latents_cached(self) -> bool:
        """cache_latents, or cache_latents_to_disk (which implies it)."""
        return self.cache_latents or self.cache_latents_to_disk

    def _text_varies(self) -> list[str]:
        """What makes the text-encoder outputs change between steps (then they cannot be cached)."""
        subsets = self.datasets or []
        why = [k for k in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate")
               if getattr(self, k) or any(getattr(s, k) for s in subsets)]
        return why + (["train_text_encoder"] if self.train_text_encoder else [])

    @property
    def text_outputs_cached(self) -> bool:
        """Whether the text-encoder outputs are cached (cache_text_embeddings, or its _to_disk form, and
        nothing makes them vary)."""
        return (self.cache_text_embeddings or self.cache_text_embeddings_to_disk) and not self._text_varies()

    @property
    def caption_options(self) -> dict:
        """The top-level caption options (a subset's own values override them: trainer.data.images)."""
        return {k: getattr(self, k) for k in CAPTION_OPTIONS}

    def located(self, problems: list[Problem]) -> list[Problem]:
        """`problems` with the YAML line of their field where they have none (path and data problems are
        found after parsing, by field name)."""
        return [p if p.line is not None else dataclasses.replace(p, line=line_of(p.field, self._lines))
                for p in problems]

    # --- derived values ---------------------------------------------------------------------------
    @property
    def run_name(self) -> str:
        return self.name or self.output_dir.name

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

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


def default_cache_dir() -> Path:
    """Where the disk caches live when a config leaves `cache_dir` out (latents, text embeddings, the shipped
    model configs, the tiny test models): $AGENTD_CACHE_DIR (what `agentd serve` sets), else the daemon's
    ($CACHE_DIRECTORY, systemd's), else ~/.cache/agentd."""
    for var in ("AGENTD_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    return Path.home() / ".cache" / "agentd"


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
    return _validated(raw, lines, base_dir, source)


def readable_part(path: str | Path, error: ConfigError, overrides: dict | None = None) -> TrainConfig | None:
    """The config at `path` without the top-level keys `error` (its schema problems) names, their defaults in
    their place, when that is valid: what the path and data checks can still look at, so one pass reports
    every problem. None when the problems are not in removable keys (a key missing, the YAML unreadable)."""
    path = Path(path)
    bad = {re.split(r"[.\[]", p.field)[0] for p in error.problems}
    try:
        raw, lines = read_yaml_mapping(path.read_text(encoding="utf-8"), str(path), empty_fix="")
        raw.update(overrides or {})
        if not bad <= raw.keys():
            return None
        return _validated({k: v for k, v in raw.items() if k not in bad}, lines, path.resolve().parent, str(path))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None


def _validated(raw: dict, lines: dict[tuple, int], base_dir: Path, source: str) -> TrainConfig:
    cfg = validate_model(TrainConfig, _resolve_paths(raw, base_dir), lines, source)
    cfg._lines = lines
    return cfg


def _resolve_paths(raw: dict, base_dir: Path) -> dict:
    raw = resolve_relative(raw, PATH_FIELDS, base_dir)
    if isinstance(raw.get("datasets"), list):
        raw["datasets"] = [resolve_relative(d, SUBSET_PATH_FIELDS, base_dir) if isinstance(d, dict) else d
                           for d in raw["datasets"]]
    template = raw.get("chat_template")
    if isinstance(template, str) and template.strip() and "{%" not in template and "{{" not in template:
        raw = resolve_relative(raw, ("chat_template",), base_dir)  # a file name; inline Jinja stays as written
    if isinstance(raw.get("eval"), dict):
        ev = resolve_relative(raw["eval"], EVAL_PATH_FIELDS, base_dir)
        raw["eval"] = resolve_relative(ev, ("compare_with",), base_dir) \
            if ev.get("compare_with") not in COMPARE_KINDS else ev
    resume = raw.get("resume")
    if isinstance(resume, str) and resume not in RESUME_POLICIES and resume.strip():
        raw = resolve_relative(raw, ("resume",), base_dir)
    return raw


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (written into every output folder: the config that made it)."""
    return yaml.safe_dump(cfg.resolved(), sort_keys=False)
