"""VRAM estimate for a LoRA training job, from the model's config files alone (no weights are loaded).

Why: a job that loads for minutes and then dies of out-of-memory (or kills someone else's job) is the
worst failure on a shared GPU box. Existing estimators (``accelerate estimate-memory``) count weights,
gradients and optimizer states at batch 1 and ignore activations - which is what actually runs out
at 512 px and batch 4. This one counts all four.

Formula (all terms in bytes, summed, then rounded up to MiB)::

    total = weights + lora_states + batch_size * per_sample + overhead

    weights      = frozen parameters x dtype bytes
                   dtype bytes: 4 for mixed_precision "no"; 2 for "fp16"/"bf16": under mixed precision
                   the trainer (the families' tasks) casts the frozen UNet, text encoders and
                   causal LM to the weight dtype, as diffusers' and kohya's LoRA scripts do. The VAE always
                   stays in fp32 (fp16 SD1.x VAE encodes overflow) and stays resident, also with
                   cache_latents: the daemon keeps the whole base warm for the next job.
    lora_states  = LoRA parameters x 16: fp32 weights (4) + fp32 gradients (4) + AdamW's two fp32
                   moments (8); + 4 with `ema` (its fp32 average). LoRA params stay fp32 under mixed
                   precision (diffusers' cast_training_params); for a Linear(in, out) LoRA adds rank x
                   (in + out), for a Conv2d rank x (in x k x k + out). Other network types (LoCon's
                   convolutions, DoRA's magnitudes, LoHa, LoKr) are counted exactly: the peft config the job
                   builds, injected into meta-device models (`trainer.families.memory.image_network_counts`).
                   DoRA's weight norm is detached and computed one layer at a time (peft), so it adds no
                   saved activations.
    per_sample   = activations kept for backward for one sample, x BACKWARD_FACTOR (1.2: gradients of
                   activations and kernel workspaces alive at the start of backward)
    overhead     = OVERHEAD_MIB (700 MiB): the CUDA context (300-500 MiB depending on GPU and driver,
                   not counted by torch.cuda.max_memory_allocated but taken from the free memory NVML
                   reports), cuBLAS/cuDNN handles and the caching allocator's rounding.

Each model family (trainer.families) supplies its parameter summary and per-sample activations
(`vram_summary`, `vram_per_sample_bytes`; the formulas are in `trainer.families.memory`). Around them:

- QLoRA (`quantization: 4bit|8bit`, causal LMs): the linear layers' weights (not the output head) at
  QUANTIZED_BYTES each (NF4 with double quantization: 0.516 bytes; 8-bit: 1 byte), every other weight and
  the activations in half precision (the compute dtype), gradient checkpointing on.
- fp8 (`quantization: fp8`, Flux): the blocks' Linear weights at 1 byte; the text encoders are not resident
  while training when their outputs are cached; the estimate's total is at least the text precompute's
  peak (the encoders and the VAE + overhead: the transformer waits in host memory while they run).
- Mixed precision: activations x the family's ACT_FACTOR (0.58 for UNet families and Flux, 0.67 for causal
  LMs) of the fp32 bytes - "halved-ish": most tensors are saved in half precision, but norms and the loss
  run in fp32 under autocast (measured with bf16 autocast; the logits term is not reduced).

Not counted: the VAE encoder's activations when latents are not cached (no gradients, freed before
the UNet runs, smaller than the UNet's backward peak), another base model kept warm on the same GPU
(the scheduler frees or counts that), and padding below max_seq_length (text samples are assumed full
length: the worst case).

Calibration: after a GPU job the measured peak (``torch.cuda.max_memory_allocated``) is stored with the
estimate's ``key``; `calibrated` then replaces the formula by that measurement for the same model and
shape. `bench/gpu_check.py` prints estimate vs measured on a real GPU.

This module imports torch, diffusers and transformers only inside the functions that build meta models,
so `recommend_batch_size` and friends are cheap to import.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from trainer import families
from trainer.checks.devices import batch_sharers
from trainer.errors import ConfigError
from trainer.families.memory import ModelSummary, VramEstimateError

MIB = 1024 * 1024

common_card_sizes_gib = (8, 12, 16, 24, 48, 80)

OVERHEAD_MIB = 700
BACKWARD_FACTOR = 1.2
LORA_BYTES_PER_PARAM = 16          # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq
EMA_BYTES_PER_PARAM = 4            # ema: the fp32 average (trainer.training.ema)

FP8_BYTES = 1.0
# Bytes per quantized weight: NF4 is 4 bits + one 8-bit absmax per 64 weights + (double quantization) one
# fp32 constant per 256 absmax blocks; LLM.int8 is 1 byte + one fp32 scale per row (negligible).
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}

@dataclass(frozen=True)
class VramEstimate:
    """The estimated peak GPU memory of a training job, with its parts.

    ``breakdown`` (MiB): weights, lora+grads+optimizer, activations, overhead (or, once calibrated,
    measured_peak and overhead). ``per_sample_mib``: what one more sample in the batch adds.
    ``key``: identifies the base model and every setting that shapes memory (for calibration records).
    """

    total_mib: int
    breakdown: dict[str, int]
    per_sample_mib: float
    batch_size: int
    mode: str
    params: dict[str, int] = field(default_factory=dict)
    key: str = ""
    notes: tuple[str, ...] = ()
    measured_peak_mib: Optional[int] = None
    family: str = ""

    def total_at(self, batch_size: int) -> int:
        """Estimated total at another batch size (everything else unchanged): linear in the batch."""
        return int(math.ceil(self.total_mib + (batch_size - self.batch_size) * self.per_sample_mib))

    def describe(self) -> str:
        """One line for users: '7412 MiB = weights 2100 + lora+grads+optimizer 13 + ...'."""
        parts = " + ".join(f"{k} {v}" for k, v in self.breakdown.items())
        src = " (calibrated from a measured peak)" if self.measured_peak_mib is not None else ""
        return (f"{self.total_mib} MiB at batch {self.batch_size}{src} = {parts} MiB; "
                f"{self.per_sample_mib:.0f} MiB per extra sample")

    def to_dict(self) -> dict[str, Any]:
        return {"total_mib": self.total_mib, "breakdown": dict(self.breakdown),
                "per_sample_mib": round(self.per_sample_mib, 1), "batch_size": self.batch_size,
                "mode": self.mode, "params": dict(self.params), "key": self.key, "notes": list(self.notes),
                "measured_peak_mib": self.measured_peak_mib, "family": self.family}


def model_summary(model_dir: Path, family: str, target_modules: Iterable[str],
                  text_encoder_target_modules: Iterable[str] = ()) -> ModelSummary:
    """Parameter counts and activation terms for a model folder (cached while its configs are unchanged),
    as the model's family (trainer.families) reads them."""
    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise VramEstimateError(f"{model_dir} is a single-file checkpoint: the estimate needs its diffusers "
                                f"config folder (set base_model_config)")
    if family not in families.FAMILIES:
        raise VramEstimateError(f"unknown model family {family!r}; supported: {families.supported()}")
    return families.FAMILIES[family].vram_summary(model_dir, tuple(target_modules), tuple(text_encoder_target_modules))


def model_param_counts(model_dir: Path, family: str) -> dict[str, int]:
    """Frozen parameter count per component ('unet', 'vae', 'text_encoder'... or 'model' for a causal LM)."""
    return dict(model_summary(model_dir, family, ()).frozen)


# ------------------------------------------------------------------------------------------------
# The estimate


def estimate_vram(model_dir: Path, *, family: str, resolution: int | None, batch_size: int, lora_rank: int,
                  target_modules: list[str], train_text_encoder: bool,
                  text_encoder_target_modules: list[str], mixed_precision: str,
                  gradient_checkpointing: bool, cache_latents: bool,
                  max_seq_length: int = 512, quantization: str | None = None,
                  max_sequence_length: int | None = None,
                  cache_text_embeddings: bool = False, network: Any = None, lora_alpha: float | None = None,
                  ema: bool = False) -> VramEstimate:
    """Estimate the peak GPU memory of a LoRA training job. See the module docstring for the formula.

    ``model_dir``: the model's config folder as its ``family`` (trainer.families) reads it: a diffusers
    folder (model_index.json, unet/, vae/, text_encoder/...) or a transformers causal-LM folder
    (config.json). Raises VramEstimateError when it cannot be read.
    """
    if mixed_precision not in ("no", "fp16", "bf16"):
        raise VramEstimateError(f"mixed_precision must be no, fp16 or bf16, not {mixed_precision!r}")
    if batch_size < 1 or lora_rank < 1:
        raise VramEstimateError("batch_size and lora_rank must be at least 1")
    te_targets = list(text_encoder_target_modules) if train_text_encoder else []
    # `quantization`: 4bit/8bit (bitsandbytes, causal LMs: QLoRA) or fp8 (trainer.families.fp8, Flux's blocks); no: none.
    fp8 = quantization == "fp8"
    quantization = quantization if quantization in QUANTIZED_BYTES else None  # the bitsandbytes formats
    gradient_checkpointing = gradient_checkpointing or quantization is not None  # QLoRA turns it on
    summary = model_summary(model_dir, family, target_modules, te_targets)  # reports an unknown family
    fam = families.FAMILIES[family]
    # QLoRA computes in bf16/fp16 whatever mixed_precision says: the unquantized weights and activations too.
    half = mixed_precision != "no" or quantization is not None
    weight_bytes = 2 if half else 4
    act_bytes = 4.0 * fam.ACT_FACTOR if half else 4.0
    notes: list[str] = []

    frozen = dict(summary.frozen)
    weights = sum(v * (4 if k == "vae" else weight_bytes) for k, v in frozen.items())
    if quantization is not None:
        per_param = QUANTIZED_BYTES[quantization]
        weights -= summary.quantizable * (weight_bytes - per_param)
        notes.append(f"quantization {quantization}: {summary.quantizable:,} linear-layer weights at "
                     f"{per_param:.3f} bytes each, the rest in half precision")
    if fp8 and summary.quantizable:
        weights -= summary.quantizable * (weight_bytes - FP8_BYTES)
        notes.append(f"quantization fp8: {summary.quantizable:,} weights of the transformer blocks at 1 byte "
                     f"(the rest in {'bf16' if weight_bytes == 2 else 'fp32'})")
    # A text encoder whose LoRA trains (flux: CLIP-L with train_text_encoder) stays on the GPU.
    offloaded = [k for k in summary.offloadable if k in frozen and k not in summary.lora_per_rank] \
        if cache_text_embeddings else []
    precompute = 0.0
    if offloaded:
        encoders = sum(frozen[k] * weight_bytes for k in offloaded)
        weights -= encoders
        # While the encoders run, the (quantized) transformer waits in host memory (trainer.families.flux_task).
        transformer = frozen.get("transformer", 0) * weight_bytes
        if fp8:
            transformer -= summary.quantizable * (weight_bytes - FP8_BYTES)
        precompute = weights - transformer + encoders
        notes.append(f"cache_text_embeddings: {' and '.join(offloaded)} encode every caption before training "
                     f"(the transformer waits in host memory meanwhile), then leave the GPU "
                     f"({_mib(encoders)} MiB not resident while training)")
    elif summary.offloadable:
        notes.append("text encoders resident on the GPU for the whole job (cache_text_embeddings is off)")
    if summary.flux_blocks:
        notes.append(f"gradient_checkpointing {'on' if gradient_checkpointing else 'off'}; LoRA weights, "
                     f"gradients and AdamW state in fp32; {mixed_precision} mixed precision")
    if cache_latents and "vae" in frozen:
        notes.append("cache_latents: the VAE encodes each image once, but stays resident (fp32) in the warm base")

    lora_counts = {k: v * lora_rank for k, v in summary.lora_per_rank.items()}
    if network is not None and (network.type != "lora" or network.dora):
        # The family's exact count of the network peft builds (`trainer.families.memory.image_network_counts`).
        lora_counts = fam.vram_network_counts(model_dir, target_modules, te_targets, network, lora_rank,
                                              float(lora_alpha or lora_rank))
        notes.append(f"network {network.title}: {sum(lora_counts.values()):,} parameters")
    lora_total = sum(lora_counts.values())
    if lora_total == 0:
        notes.append(f"no module matches target_modules {target_modules}: nothing would be trained")
    lora_bytes = lora_total * (LORA_BYTES_PER_PARAM + (EMA_BYTES_PER_PARAM if ema else 0))
    if ema:
        notes.append("ema: an fp32 copy of the network (4 bytes per parameter; 4 more while samples or the export "
                     "swap it in, outside training's peak)")

    shape = {"resolution": resolution, "max_seq_length": max_seq_length,
             "quantization": "fp8" if fp8 else quantization, "max_sequence_length": max_sequence_length,
             "cache_text_embeddings": cache_text_embeddings,
             "cache_latents": cache_latents,
             "gradient_checkpointing": gradient_checkpointing, "train_text_encoder": train_text_encoder,
             "act_bytes": act_bytes}
    per_sample = fam.vram_per_sample_bytes(summary, shape) * BACKWARD_FACTOR

    breakdown = {
        "weights": _mib(weights),
        "lora+grads+optimizer": _mib(lora_bytes),
        "activations": _mib(per_sample * batch_size),
        "overhead": OVERHEAD_MIB,
    }
    params = {f"frozen_{k}": v for k, v in frozen.items()}
    params.update({f"lora_{k}": v for k, v in lora_counts.items()})
    key = _shape_key(family, summary, batch_size=batch_size, lora_rank=lora_rank,
                     target_modules=list(target_modules), te_targets=te_targets, mixed_precision=mixed_precision,
                     gradient_checkpointing=gradient_checkpointing,
                     **{k: shape[k] for k in fam.VRAM_SHAPE_FIELDS},
                     # Only when set, so the keys of plain-LoRA calibration records stay what they were.
                     **({"network": network.model_dump()} if network is not None and (network.type != "lora"
                                                                                       or network.dora) else {}),
                     **({"ema": True} if ema else {}))
    total = sum(breakdown.values())
    if precompute:
        peak = _mib(precompute) + OVERHEAD_MIB
        notes.append(f"text precompute peak {peak} MiB (VAE + text encoders + overhead)"
                     + ("; it is the larger peak, so the total" if peak > total else ""))
        total = max(total, peak)
    return VramEstimate(total_mib=total, breakdown=breakdown,
                        per_sample_mib=per_sample / MIB, batch_size=batch_size, mode=fam.MODE, params=params,
                        key=key, notes=tuple(notes), family=family)


def estimate_for_config(cfg: Any, **overrides: Any) -> VramEstimate:
    """`estimate_vram` of one device for a trainer.config.TrainConfig (with `devices:`, one rank's share of the
    batch); ``overrides`` replace its fields (e.g. batch_size).

    The config is resolved against its model family first (detection reads config files only); the
    family says which folder holds the model's configs (a single file's base_model_config)."""
    try:
        cfg = families.resolved(cfg)
    except ConfigError as e:
        raise VramEstimateError("; ".join(p.message for p in e.problems)) from None
    model_dir = families.family(cfg.model_family).config_dir(cfg)
    if model_dir is None:
        raise VramEstimateError(f"{cfg.base_model} is a single-file checkpoint: the estimate needs its diffusers "
                                f"config folder (set base_model_config)")
    # One device's memory: a `devices:` job's device trains its share of each micro-batch (trainer.checks.devices).
    device_batch = cfg.batch_size_per_device or max(1, cfg.batch_size // batch_sharers(cfg.devices, None))
    args = dict(family=cfg.model_family, resolution=cfg.resolution, batch_size=device_batch,
                lora_rank=cfg.lora_rank, target_modules=list(cfg.target_modules),
                train_text_encoder=cfg.train_text_encoder,
                text_encoder_target_modules=list(cfg.text_encoder_target_modules or []),
                mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
                cache_latents=cfg.cache_latents, max_seq_length=cfg.max_seq_length,
                quantization=cfg.base_quantization,
                max_sequence_length=cfg.max_sequence_length, cache_text_embeddings=cfg.cache_text_embeddings,
                network=cfg.network, lora_alpha=cfg.lora_alpha, ema=cfg.ema is not None)
    args.update(overrides)
    return estimate_vram(Path(model_dir), **args)


def _mib(nbytes: float) -> int:
    return int(math.ceil(nbytes / MIB))


def _shape_key(family: str, summary: ModelSummary, **shape: Any) -> str:
    """Same key = same model architecture (parameter counts; fine-tunes of one base share it) and the
    same memory-relevant settings, batch size included (for calibration records)."""
    data = {"family": family, "frozen": summary.frozen, "lora_per_rank": summary.lora_per_rank, **shape}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Advice and calibration


def recommend_batch_size(estimate_fn_or_params: Union[VramEstimate, Callable[[int], int], dict],
                         free_mib: int, margin_mib: int, batch_size: int,
                         grad_accum: int = 1) -> Optional[tuple[int, int]]:
    """The largest batch <= ``batch_size`` whose estimate + margin fits in ``free_mib``, with the
    gradient accumulation that keeps the effective batch: accum = ceil(batch_size x grad_accum / batch).

    ``estimate_fn_or_params`` is a VramEstimate (scaled linearly with its per-sample cost), a function
    batch -> MiB, or the keyword arguments of `estimate_vram` (re-estimated per batch size).
    Returns None when even batch 1 does not fit.
    """
    if isinstance(estimate_fn_or_params, VramEstimate):
        need: Callable[[int], int] = estimate_fn_or_params.total_at
    elif isinstance(estimate_fn_or_params, dict):
        params = dict(estimate_fn_or_params)
        need = lambda b: estimate_vram(**{**params, "batch_size": b}).total_mib  # noqa: E731
    else:
        need = estimate_fn_or_params
    effective = batch_size * max(1, grad_accum)
    for b in range(batch_size, 0, -1):
        if need(b) + margin_mib <= free_mib:
            return b, int(math.ceil(effective / b))
    return None


def recommend_for_cards(estimate: VramEstimate, margin_mib: int, batch_size: int, grad_accum: int = 1,
                        cards_gib: Iterable[int] = common_card_sizes_gib
                        ) -> dict[int, Optional[tuple[int, int]]]:
    """`recommend_batch_size` for common card sizes (GiB -> (batch, accum) or None): for planning on a
    machine without a GPU, or ``--vram 24GiB``. A card's whole memory counts as free (the CUDA context
    is already in the estimate's overhead)."""
    return {gib: recommend_batch_size(estimate, gib * 1024, margin_mib, batch_size, grad_accum)
            for gib in cards_gib}


def calibrated(estimate: VramEstimate, recorded_peak_mib: Optional[int]) -> VramEstimate:
    """The estimate corrected by a measured peak for the same base model and shape (same ``key``).

    ``recorded_peak_mib`` is ``torch.cuda.max_memory_allocated`` of an earlier run at the same batch size;
    it replaces the formula's tensor terms, and the fixed overhead (CUDA context, which that figure does
    not include) is added back. The per-sample slope stays the formula's, for batch-size advice.
    None (no record): the estimate unchanged.
    """
    if recorded_peak_mib is None:
        return estimate
    peak = int(math.ceil(recorded_peak_mib))
    overhead = estimate.breakdown.get("overhead", OVERHEAD_MIB)
    return replace(estimate, total_mib=peak + overhead,
                   breakdown={"measured_peak": peak, "overhead": overhead},
                   measured_peak_mib=peak,
                   notes=estimate.notes + (f"formula said {estimate.total_mib} MiB",))
