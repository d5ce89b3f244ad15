"""VRAM estimate for a LoRA training job, from the model's config files alone (no weights are loaded).

Why: a job that loads for minutes and then dies of out-of-memory (or kills someone else's job) is the
worst failure on a shared GPU box. Existing estimators (``accelerate estimate-memory``) count weights,
gradients and optimizer states at batch 1 and ignore activations - which is what actually runs out
at 512 px and batch 4. This one counts all four.

Formula (all terms in bytes, summed, then rounded up to MiB)::

    total = weights + lora_states + batch_size * per_sample + overhead

    weights      = frozen parameters x dtype bytes
                   dtype bytes: 4 for mixed_precision "no"; 2 for "fp16"/"bf16": under mixed precision
                   the trainer (trainer.image_task / text_task) casts the frozen UNet, text encoders and
                   causal LM to the weight dtype, as diffusers' and kohya's LoRA scripts do. The VAE always
                   stays in fp32 (fp16 SD1.x VAE encodes overflow) and stays resident, also with
                   cache_latents: the daemon keeps the whole base warm for the next job.
    lora_states  = LoRA parameters x 16: fp32 weights (4) + fp32 gradients (4) + AdamW's two fp32
                   moments (8). LoRA params stay fp32 under mixed precision (diffusers'
                   cast_training_params); for a Linear(in, out) LoRA adds rank x (in + out), for a
                   Conv2d rank x (in x k x k + out).
    per_sample   = activations kept for backward for one sample, x BACKWARD_FACTOR (1.2: gradients of
                   activations and kernel workspaces alive at the start of backward)
    overhead     = OVERHEAD_MIB (700 MiB): the CUDA context (300-500 MiB depending on GPU and driver,
                   not counted by torch.cuda.max_memory_allocated but taken from the free memory NVML
                   reports), cuBLAS/cuDNN handles and the caching allocator's rounding.

Activations (fp32 element counts per sample; x 4 bytes, or x the mixed-precision factor below):

Each model family (trainer.families) supplies its parameter summary and per-sample activations
(`vram_summary`, `vram_per_sample_bytes`); the two formulas it picks from are:

- UNet families, sd and sdxl (latent side L = resolution / 8, a level's area A_l = (L / 2**l)**2):
      sum over ResNet blocks          3 x (in_channels + out_channels) x A_l
    + sum over Transformer2D models   4 x c x A_l  +  per transformer block (23 x c x A_l + 2 x T x c)
    + down/up samplers                c x A (at the larger of their two resolutions)
    + output head                     3 x c_0 x A_0
  where c is the channel width at that level and T the text context length (77 for CLIP). The
  coefficients are the tensors autograd saves, counted with torch.autograd.graph.saved_tensors_hooks on
  an SD1.5-size UNet and a 3-level SDXL-style UNet (diffusers 0.42, SDPA attention which saves q, k, v,
  output and log-sum-exp, never the attention matrix - as CUDA's flash/memory-efficient kernels do).
  They scale with latent area and UNet width, which is what makes 512 px x batch 4 run out.
  With train_text_encoder the text encoder's activations (text formula below, T tokens) are added.
- causal_lm (S = max_seq_length tokens, h hidden, i MLP width, kv = key/value width,
  V vocabulary, N layers):
      S x N x (5h + 2kv + m x i)  per decoder layer (norms, q/k/v/o inputs, RoPE, SDPA, MLP);
                                  m = 3 for a gated MLP (Llama, Mistral, Qwen...), 5.5 for GPT-2/CLIP's
                                  GELU MLP; + 12h when the config enables dropout (masks, outputs)
    + S x 4V                      logits, fp32 log-probabilities and their gradients in the loss
- QLoRA (`quantization: 4bit|8bit`, causal LMs): the linear layers' weights (not the output head) at
  QUANTIZED_BYTES each (NF4 with double quantization: 0.516 bytes; 8-bit: 1 byte), every other weight and
  the activations in half
  precision (the compute dtype), gradient checkpointing on.
- flux (S = (resolution / 16)**2 image tokens + max_sequence_length text tokens, h = hidden size 3072):
      S x h x (FLUX_DOUBLE_COEF = 23.8 per double block + FLUX_SINGLE_COEF = 17.0 per single block)
  counted like the UNet's (saved_tensors_hooks, SDPA saving no attention matrix, default LoRA targets);
  with gradient checkpointing 1 x S x h per block plus the largest block recomputed; under bf16 x 0.58 (the
  UNet families' measured ACT_FACTOR, assumed for Flux until gpu_check.py measures it). Weights: with
  `quantization: fp8` the Linear weights of the blocks (`quantizable`) at 1 byte; the text encoders
  are not resident while training when their outputs are cached (`offloadable`); the estimate's total is
  at least the text precompute's peak (the encoders and the VAE + overhead: the transformer waits in
  host memory while they run).
- Mixed precision: activations x the family's ACT_FACTOR (0.58 for UNet families, 0.67 for causal LMs)
  of the fp32 bytes - "halved-ish": most
  tensors are saved in half precision, but norms and the loss run in fp32 under autocast (measured
  with bf16 autocast; the logits term is not reduced).
- Gradient checkpointing (diffusers' and transformers' per-block checkpointing): only each
  checkpointed block's input is kept (1 x c x A per ResNet/transformer block plus the Transformer2D
  wrapper's 4 x c x A; 1.1h per token per decoder layer), plus the largest single block recomputed
  during backward.

Not counted: the VAE encoder's activations when latents are not cached (no gradients, freed before
the UNet runs, smaller than the UNet's backward peak), another base model kept warm on the same GPU
(the scheduler frees or counts that), and padding below max_seq_length (text samples are assumed full
length: the worst case).

Parameter counts come from the component ``config.json`` files: the model classes are instantiated on
torch's meta device (shapes, no storage, milliseconds for SD1.5) and ``p.numel()`` is summed; LoRA
targets are matched the way peft matches a list of names (a module matches when its qualified name
equals a target or ends with ``"." + target``) and only layer types peft can wrap are counted.

Calibration: after a GPU job the measured peak (``torch.cuda.max_memory_allocated``) is stored with the
estimate's ``key``; `calibrated` then replaces the formula by that measurement for the same model and
shape. `bench/gpu_check.py` prints estimate vs measured on a real GPU.

This module imports torch, diffusers and transformers only inside the functions that build meta models,
so `recommend_batch_size` and friends are cheap to import.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from trainer.errors import content_free

MIB = 1024 * 1024

common_card_sizes_gib = (8, 12, 16, 24, 48, 80)

OVERHEAD_MIB = 700
BACKWARD_FACTOR = 1.2
LORA_BYTES_PER_PARAM = 16          # fp32 weight + fp32 grad + AdamW exp_avg + exp_avg_sq

# Image-mode activation coefficients (fp32 elements per channel per latent pixel), see the docstring.
RESNET_COEF = 3.0            # x (in + out) channels
TRANSFORMER_WRAPPER_COEF = 4.0
TRANSFORMER_BLOCK_COEF = 23.0
TRANSFORMER_CTX_COEF = 2.0   # x context tokens x channels (cross-attention k, v)
SAMPLER_COEF = 1.0
HEAD_COEF = 3.0
# Checkpointed: what is kept per block.
CKPT_BLOCK_INPUT_COEF = 1.0
# Text-mode activation coefficients (fp32 elements per token per decoder layer).
TEXT_HIDDEN_COEF = 5.0
TEXT_KV_COEF = 2.0
TEXT_GATED_MLP_COEF = 3.0
TEXT_MLP_COEF = 5.5
TEXT_DROPOUT_COEF = 12.0
TEXT_LOGITS_COEF = 4.0
TEXT_CKPT_HIDDEN_COEF = 1.1
# Flux activation coefficients (fp32 elements per token per hidden unit), see the docstring.
FLUX_DOUBLE_COEF = 23.8
FLUX_SINGLE_COEF = 17.0
FP8_BYTES = 1.0
# Bytes per quantized weight: NF4 is 4 bits + one 8-bit absmax per 64 weights + (double quantization) one
# fp32 constant per 256 absmax blocks; LLM.int8 is 1 byte + one fp32 scale per row (negligible).
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}

_IMAGE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class VramEstimateError(ValueError):
    """The model folder cannot be read for an estimate (missing or unreadable config files)."""


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


# ------------------------------------------------------------------------------------------------
# Model structure from config files (meta device)


@dataclass(frozen=True)
class _ModelSummary:
    """Everything the formula needs from a model folder, in plain numbers (cached per folder)."""

    frozen: dict[str, int]                 # component -> parameter count
    lora_per_rank: dict[str, int]          # component -> LoRA params per unit of rank
    unet_terms: tuple[tuple[int, float, float, float], ...] = ()  # see _unet_terms
    text_layers: tuple[int, float, int] = (0, 0.0, 0)   # causal LM: layers, elements/token/layer, hidden
    vocab_size: int = 0
    te_layers: tuple[tuple[int, float, int], ...] = ()  # the same per text encoder
    context_tokens: int = 77
    quantizable: int = 0                   # causal LM: parameters in the linear layers bitsandbytes quantizes;
                                           # flux: in the blocks' Linear layers quantization: fp8 stores in fp8
    offloadable: tuple[str, ...] = ()      # components off the GPU while training once their outputs are cached
    flux_blocks: tuple[int, int, int] = () # flux: (hidden size, double blocks, single blocks)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VramEstimateError(f"{path} not found: the estimate needs the model's config files "
                                f"(a diffusers folder for image mode, a transformers folder for text mode)")
    except (OSError, ValueError) as e:
        raise VramEstimateError(f"cannot read {path}: {content_free(e)}")


def _matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the full name, or a suffix after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_params_per_rank(model: Any, target_modules: Iterable[str]) -> int:
    """LoRA parameters added per unit of rank when ``target_modules`` of ``model`` are adapted.

    Counts the layer types peft's LoRA wraps: Linear (in + out), Conv2d (in x kh x kw / groups + out),
    transformers' Conv1D (GPT-2; weight is (in, out)) and Embedding (num + dim). Works on meta models.
    Multiply by the rank for the count; peft's default adds no bias.
    """
    import torch.nn as nn

    targets = list(target_modules)
    total = 0
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if isinstance(module, nn.Linear):
            total += module.in_features + module.out_features
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += module.in_channels * kh * kw // module.groups + module.out_channels
        elif isinstance(module, nn.Embedding):
            total += module.num_embeddings + module.embedding_dim
        elif type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
            n_in, n_out = module.weight.shape
            total += n_in + n_out
    return total


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta(build: Callable[[], Any]) -> Any:
    import torch

    with torch.device("meta"):
        return build()


_DROPOUT_FIELDS = ("resid_pdrop", "attn_pdrop", "embd_pdrop", "hidden_dropout", "attention_dropout",
                   "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout")


def _text_layer(config: Any, model: Any) -> tuple[int, float, int]:
    """(layers, fp32 activation elements per token per layer, hidden) for a transformers model.

    Per layer: 5h + 2kv + m x i (+ 12h with dropout), where m is 3 for a gated MLP (Llama's
    gate/up/down with SiLU) and 5.5 otherwise (GPT-2/CLIP's GELU written out in Python saves its
    intermediates). Measured with saved_tensors_hooks on Llama and GPT-2 (transformers 5).
    """
    h = int(config.hidden_size)
    n = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    i = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h)
    gated = any(name.endswith(("gate_proj", "gate_up_proj")) for name, _ in model.named_modules())
    dropout = any(float(getattr(config, f, 0) or 0) > 0 for f in _DROPOUT_FIELDS)
    per_layer = (TEXT_HIDDEN_COEF * h + TEXT_KV_COEF * kv_heads * head_dim
                 + (TEXT_GATED_MLP_COEF if gated else TEXT_MLP_COEF) * i
                 + (TEXT_DROPOUT_COEF * h if dropout else 0.0))
    return n, per_layer, h


def _unet_terms(unet: Any, context_tokens: int) -> tuple[tuple[int, float, float, float], ...]:
    """The UNet's activation terms, one per block: (level, full, checkpointed, constant).

    ``full`` and ``checkpointed`` are fp32 elements per pixel of that level (without / with gradient
    checkpointing); ``constant`` is what does not scale with area (cross-attention k and v over the
    T context tokens). Coefficients: see the module docstring.
    """
    terms: list[tuple[int, float, float, float]] = []

    def block(b: Any, level: int) -> None:
        for r in getattr(b, "resnets", None) or []:
            c_in, c_out = int(r.in_channels), int(r.out_channels or r.in_channels)
            terms.append((level, RESNET_COEF * (c_in + c_out), CKPT_BLOCK_INPUT_COEF * c_in, 0.0))
        for a in getattr(b, "attentions", None) or []:
            if a is None:
                continue
            c = int(getattr(a, "in_channels", None) or getattr(a, "inner_dim", None) or a.query_dim)
            terms.append((level, TRANSFORMER_WRAPPER_COEF * c, TRANSFORMER_WRAPPER_COEF * c, 0.0))
            for _ in getattr(a, "transformer_blocks", None) or [None]:
                terms.append((level, TRANSFORMER_BLOCK_COEF * c, CKPT_BLOCK_INPUT_COEF * c,
                              TRANSFORMER_CTX_COEF * context_tokens * c))

    level = 0
    for b in unet.down_blocks:
        block(b, level)
        for d in getattr(b, "downsamplers", None) or []:
            terms.append((level, SAMPLER_COEF * d.channels, SAMPLER_COEF * d.channels, 0.0))
            level += 1
    if getattr(unet, "mid_block", None) is not None:
        block(unet.mid_block, level)
    for b in unet.up_blocks:
        block(b, level)
        for u in getattr(b, "upsamplers", None) or []:
            level -= 1
            terms.append((level, SAMPLER_COEF * u.channels, SAMPLER_COEF * u.channels, 0.0))
    c0 = int(unet.config.block_out_channels[0])
    terms.append((0, HEAD_COEF * c0, HEAD_COEF * c0, 0.0))
    return tuple(terms)


def unet_activation_elems(terms: Iterable[tuple[int, float, float, float]], latent_side: int,
                          checkpointing: bool) -> float:
    """fp32 activation elements of one sample for a latent of ``latent_side`` x ``latent_side``.

    Without checkpointing: the sum of every block's term. With it: what the checkpoints keep plus
    the largest single block, which backward recomputes while the checkpoints are still held.
    """
    full = kept = biggest = 0.0
    for level, f, k, const in terms:
        area = (latent_side / 2 ** level) ** 2
        block = f * area + const
        full += block
        kept += k * area
        biggest = max(biggest, block)
    return kept + biggest if checkpointing else full


def _folder_fingerprint(model_dir: Path, files: Iterable[str]) -> str:
    h = hashlib.sha256()
    for rel in files:
        p = model_dir / rel
        if p.is_file():
            h.update(rel.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=32)
def _image_summary(model_dir: str, unet_targets: tuple[str, ...], te_targets: tuple[str, ...],
                   fingerprint: str) -> _ModelSummary:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import transformers

    root = Path(model_dir)
    index = _read_json(root / "model_index.json")
    frozen: dict[str, int] = {}
    lora: dict[str, int] = {}
    te_layers = []
    context_tokens = 77
    for comp in _IMAGE_COMPONENTS:
        entry = index.get(comp)
        if comp != "unet" and not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            continue  # absent, or [null, null] (e.g. SDXL refiner's text_encoder)
        cfg_path = root / comp / "config.json"
        config = _read_json(cfg_path)
        try:
            if comp == "unet":
                model = _meta(lambda: UNet2DConditionModel.from_config(config))
                lora[comp] = lora_params_per_rank(model, unet_targets)
            elif comp == "vae":
                model = _meta(lambda: AutoencoderKL.from_config(config))
            else:
                cls = getattr(transformers, entry[1], None) or transformers.CLIPTextModel
                te_config = cls.config_class.from_pretrained(root / comp)
                model = _meta(lambda: cls(te_config))
                lora[comp] = lora_params_per_rank(model, te_targets)
                te_layers.append(_text_layer(te_config, model))
                context_tokens = int(getattr(te_config, "max_position_embeddings", 77) or 77)
        except VramEstimateError:
            raise
        except Exception as e:  # a config the installed library cannot build
            raise VramEstimateError(f"cannot build {comp} from {cfg_path}: {content_free(e)}") from None
        frozen[comp] = _count(model)
        if comp == "unet":
            unet = model
    return _ModelSummary(frozen=frozen, lora_per_rank=lora, unet_terms=_unet_terms(unet, context_tokens),
                         te_layers=tuple(te_layers), context_tokens=context_tokens)


@functools.lru_cache(maxsize=32)
def _text_summary(model_dir: str, targets: tuple[str, ...], fingerprint: str) -> _ModelSummary:
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(model_dir)
    _read_json(root / "config.json")
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        model = _meta(lambda: AutoModelForCausalLM.from_config(config))
    except Exception as e:
        raise VramEstimateError(f"cannot build a causal LM from {root / 'config.json'}: "
                                f"{content_free(e)}") from None
    import torch.nn as nn

    head = model.get_output_embeddings()
    quantizable = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return _ModelSummary(frozen={"model": _count(model)},
                         lora_per_rank={"model": lora_params_per_rank(model, targets)},
                         quantizable=quantizable,
                         text_layers=_text_layer(config, model),
                         vocab_size=int(getattr(config, "vocab_size", 0) or 0))


@functools.lru_cache(maxsize=16)
def _flux_summary(model_dir: str, targets: tuple[str, ...], te_targets: tuple[str, ...],
                  fingerprint: str) -> _ModelSummary:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    import torch.nn as nn

    root = Path(model_dir)
    builders = {
        "transformer": lambda c: FluxTransformer2DModel.from_config(c),
        "vae": lambda c: AutoencoderKL.from_config(c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**{k: v for k, v in c.items() if k != "architectures"})),
        "text_encoder_2": lambda c: T5EncoderModel(T5Config(**{k: v for k, v in c.items() if k != "architectures"})),
    }
    frozen: dict[str, int] = {}
    for comp, build in builders.items():
        config = _read_json(root / comp / "config.json")
        try:
            model = _meta(lambda: build(config))
        except Exception as e:  # a config the installed library cannot build
            raise VramEstimateError(f"cannot build {comp} from {root / comp / 'config.json'}: "
                                    f"{content_free(e)}") from None
        frozen[comp] = _count(model)
        if comp == "transformer":
            transformer = model
        elif comp == "text_encoder":
            clip, clip_config = model, model.config
    quantizable = sum(m.weight.numel() for n, m in transformer.named_modules()
                      if type(m) is nn.Linear and n.startswith(("transformer_blocks.", "single_transformer_blocks.")))
    c = transformer.config
    lora = {"transformer": lora_params_per_rank(transformer, targets)}
    if te_targets:  # train_text_encoder: a LoRA on CLIP-L (T5-XXL is never trained)
        lora["text_encoder"] = lora_params_per_rank(clip, te_targets)
    return _ModelSummary(frozen=frozen, lora_per_rank=lora, te_layers=(_text_layer(clip_config, clip),),
                         context_tokens=int(clip_config.max_position_embeddings),
                         quantizable=quantizable, offloadable=("text_encoder", "text_encoder_2"),
                         flux_blocks=(int(c.num_attention_heads * c.attention_head_dim), int(c.num_layers),
                                      int(c.num_single_layers)))


def flux_model_summary(model_dir: Path, target_modules: Iterable[str],
                       text_encoder_target_modules: Iterable[str] = ()) -> _ModelSummary:
    """The flux family's summary: transformer, VAE, CLIP-L and T5 from their config files (meta device)."""
    files = ["model_index.json"] + [f"{c}/config.json" for c in ("transformer", "vae", "text_encoder", "text_encoder_2")]
    return _flux_summary(str(model_dir.resolve()), tuple(target_modules), tuple(text_encoder_target_modules),
                         _folder_fingerprint(model_dir, files))


def flux_per_sample_bytes(summary: _ModelSummary, shape: dict) -> float:
    """Activation bytes of one sample for Flux (before BACKWARD_FACTOR): image tokens at resolution / 16 per
    side plus max_sequence_length text tokens, through every double and single block."""
    h, n_double, n_single = summary.flux_blocks
    tokens = (shape["resolution"] // 16) ** 2 + (shape["max_sequence_length"] or 512)
    per_block = tokens * h
    if shape["gradient_checkpointing"]:
        elems = per_block * (CKPT_BLOCK_INPUT_COEF * (n_double + n_single) + max(FLUX_DOUBLE_COEF, FLUX_SINGLE_COEF))
    else:
        elems = per_block * (FLUX_DOUBLE_COEF * n_double + FLUX_SINGLE_COEF * n_single)
    if shape["train_text_encoder"]:  # CLIP-L with its LoRA, over its context tokens
        for n, layer, h_te in summary.te_layers:
            elems += summary.context_tokens * _text_layer_elems(n, layer, h_te, shape["gradient_checkpointing"])
    return elems * shape["act_bytes"]


def unet_model_summary(model_dir: Path, target_modules: Iterable[str],
                       text_encoder_target_modules: Iterable[str] = ()) -> _ModelSummary:
    """A UNet diffusion family's summary (sd, sdxl): every component in model_index.json."""
    files = ["model_index.json"] + [f"{c}/config.json" for c in _IMAGE_COMPONENTS]
    return _image_summary(str(model_dir.resolve()), tuple(target_modules), tuple(text_encoder_target_modules),
                          _folder_fingerprint(model_dir, files))


def causal_lm_model_summary(model_dir: Path, target_modules: Iterable[str]) -> _ModelSummary:
    return _text_summary(str(model_dir.resolve()), tuple(target_modules),
                         _folder_fingerprint(model_dir, ["config.json"]))


def model_summary(model_dir: Path, family: str, target_modules: Iterable[str],
                  text_encoder_target_modules: Iterable[str] = ()) -> _ModelSummary:
    """Parameter counts and activation terms for a model folder (cached while its configs are unchanged),
    as the model's family (trainer.families) reads them."""
    from trainer.families import FAMILIES, supported

    model_dir = Path(model_dir)
    if model_dir.is_file():
        raise VramEstimateError(f"{model_dir} is a single-file checkpoint: the estimate needs its diffusers "
                                f"config folder (set base_model_config)")
    if family not in FAMILIES:
        raise VramEstimateError(f"unknown model family {family!r}; supported: {supported()}")
    return FAMILIES[family].vram_summary(model_dir, tuple(target_modules), tuple(text_encoder_target_modules))


def model_param_counts(model_dir: Path, family: str) -> dict[str, int]:
    """Frozen parameter count per component ('unet', 'vae', 'text_encoder'... or 'model' for a causal LM)."""
    return dict(model_summary(model_dir, family, ()).frozen)


# ------------------------------------------------------------------------------------------------
# The estimate


def _text_layer_elems(n: int, layer: float, h: int, checkpointing: bool) -> float:
    """fp32 activation elements per token for n layers: all of them, or with checkpointing each
    layer's input plus one layer recomputed in backward."""
    if checkpointing:
        return n * TEXT_CKPT_HIDDEN_COEF * h + layer
    return n * layer


def unet_per_sample_bytes(summary: _ModelSummary, shape: dict) -> float:
    """Activation bytes of one sample for a UNet family (before BACKWARD_FACTOR): the UNet at the latent
    side resolution / 8, plus the text encoders' layers over the context tokens when they train."""
    latent_side = max(1, shape["resolution"] // 8)
    elems = unet_activation_elems(summary.unet_terms, latent_side, shape["gradient_checkpointing"])
    if shape["train_text_encoder"]:
        for n, layer, h in summary.te_layers:
            elems += summary.context_tokens * _text_layer_elems(n, layer, h, shape["gradient_checkpointing"])
    return elems * shape["act_bytes"]


def causal_lm_per_sample_bytes(summary: _ModelSummary, shape: dict) -> float:
    """Activation bytes of one full-length sample for a causal LM: its layers, plus the fp32 logits terms."""
    n, layer, h = summary.text_layers
    layers = _text_layer_elems(n, layer, h, shape["gradient_checkpointing"]) * shape["act_bytes"]
    logits = TEXT_LOGITS_COEF * summary.vocab_size * 4.0
    return shape["max_seq_length"] * (layers + logits)


def estimate_vram(model_dir: Path, *, family: str, resolution: int | None, batch_size: int, lora_rank: int,
                  target_modules: list[str], train_text_encoder: bool,
                  text_encoder_target_modules: list[str], mixed_precision: str,
                  gradient_checkpointing: bool, cache_latents: bool,
                  max_seq_length: int = 512, quantization: str | None = None,
                  max_sequence_length: int | None = None,
                  cache_text_embeddings: bool = False) -> VramEstimate:
    """Estimate the peak GPU memory of a LoRA training job. See the module docstring for the formula.

    ``model_dir``: the model's config folder as its ``family`` (trainer.families) reads it: a diffusers
    folder (model_index.json, unet/, vae/, text_encoder/...) or a transformers causal-LM folder
    (config.json). Raises VramEstimateError when it cannot be read.
    """
    from trainer.families import FAMILIES

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
    fam = FAMILIES[family]
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
    lora_total = sum(lora_counts.values())
    if lora_total == 0:
        notes.append(f"no module matches target_modules {target_modules}: nothing would be trained")
    lora_bytes = lora_total * LORA_BYTES_PER_PARAM

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
                     **{k: shape[k] for k in fam.VRAM_SHAPE_FIELDS})
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
    """`estimate_vram` for a trainer.config.TrainConfig; ``overrides`` replace its fields (e.g. batch_size).

    The config is resolved against its model family first (detection reads config files only); the
    family says which folder holds the model's configs (a single file's base_model_config)."""
    from trainer.errors import ConfigError
    from trainer.families import family, resolved

    try:
        cfg = resolved(cfg)
    except ConfigError as e:
        raise VramEstimateError("; ".join(p.message for p in e.problems)) from None
    model_dir = family(cfg.model_family).config_dir(cfg)
    if model_dir is None:
        raise VramEstimateError(f"{cfg.base_model} is a single-file checkpoint: the estimate needs its diffusers "
                                f"config folder (set base_model_config)")
    args = dict(family=cfg.model_family, resolution=cfg.resolution, batch_size=cfg.batch_size,
                lora_rank=cfg.lora_rank, target_modules=cfg.effective_targets,
                train_text_encoder=cfg.train_text_encoder,
                text_encoder_target_modules=cfg.effective_te_targets,
                mixed_precision=cfg.mixed_precision, gradient_checkpointing=cfg.gradient_checkpointing,
                cache_latents=cfg.cache_latents, max_seq_length=cfg.max_seq_length,
                quantization=cfg.base_quantization,
                max_sequence_length=cfg.max_sequence_length, cache_text_embeddings=cfg.cache_text_embeddings)
    args.update(overrides)
    return estimate_vram(Path(model_dir), **args)


def _mib(nbytes: float) -> int:
    return int(math.ceil(nbytes / MIB))


def _shape_key(family: str, summary: _ModelSummary, **shape: Any) -> str:
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
