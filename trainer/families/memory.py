"""Each model family's memory formula: parameter counts and activation terms from the model's config files
alone (no weights), for the VRAM estimate (`trainer.checks.vram`, which sums them with the batch, the LoRA
states and the overhead).

Activations (fp32 element counts per sample; x 4 bytes, or x the family's mixed-precision ACT_FACTOR):

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
- flux (S = (resolution / 16)**2 image tokens + max_sequence_length text tokens, h = hidden size 3072):
      S x h x (FLUX_DOUBLE_COEF = 23.8 per double block + FLUX_SINGLE_COEF = 17.0 per single block)
  counted like the UNet's (saved_tensors_hooks, SDPA saving no attention matrix, default LoRA targets);
  with gradient checkpointing 1 x S x h per block plus the largest block recomputed. Weights: with
  `quantization: fp8` the Linear weights of the blocks (`quantizable`) count at 1 byte; the text encoders
  are not resident while training when their outputs are cached (`offloadable`).
- Gradient checkpointing (diffusers' and transformers' per-block checkpointing): only each
  checkpointed block's input is kept (1 x c x A per ResNet/transformer block plus the Transformer2D
  wrapper's 4 x c x A; 1.1h per token per decoder layer), plus the largest single block recomputed
  during backward.

Parameter counts come from the component ``config.json`` files: the model classes are instantiated on
torch's meta device (shapes, no storage, milliseconds for SD1.5) and ``p.numel()`` is summed; LoRA
targets are matched the way peft matches a list of names (`trainer.families.peft_lora.matches`) and only
layer types peft can wrap are counted. Summaries are cached per folder while its config files are unchanged.

Light: torch, diffusers and transformers are imported inside the functions that build meta models.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

from trainer.errors import content_free
from trainer.families.peft_lora import matches

# Activation coefficients, see the module docstring.
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

_IMAGE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

class VramEstimateError(ValueError):
    """The model folder cannot be read for an estimate (missing or unreadable config files)."""


# ------------------------------------------------------------------------------------------------
# Model structure from config files (meta device)


@dataclass(frozen=True)
class ModelSummary:
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
        if not name or not matches(name, targets):
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


def unet_target_dims(model_dir: Path, target_modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{name: (in, out)} of the UNet layers the targets adapt, from unet/config.json (a meta model, no weights):
    what a LoKr factor is checked against (`trainer.families.peft_lora.factor_problems`)."""
    from diffusers import UNet2DConditionModel

    from trainer.families.peft_lora import adaptable

    config = _read_json(Path(model_dir) / "unet" / "config.json")
    return adaptable(_meta(lambda: UNet2DConditionModel.from_config(config)), list(target_modules))


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


def _image_components(root: Path, index: dict):
    """Yield (component, its meta-device model, its transformers config or None) of a diffusers folder's UNet,
    VAE and text encoders (absent or [null, null] entries, e.g. SDXL refiner's text_encoder, skipped)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    import transformers

    for comp in _IMAGE_COMPONENTS:
        entry = index.get(comp)
        if comp != "unet" and not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            continue
        cfg_path = root / comp / "config.json"
        config = _read_json(cfg_path)
        try:
            if comp == "unet":
                yield comp, _meta(lambda: UNet2DConditionModel.from_config(config)), None
            elif comp == "vae":
                yield comp, _meta(lambda: AutoencoderKL.from_config(config)), None
            else:
                cls = getattr(transformers, entry[1], None) or transformers.CLIPTextModel
                te_config = cls.config_class.from_pretrained(root / comp)
                yield comp, _meta(lambda: cls(te_config)), te_config
        except VramEstimateError:
            raise
        except Exception as e:  # a config the installed library cannot build
            raise VramEstimateError(f"cannot build {comp} from {cfg_path}: {content_free(e)}") from None


@functools.lru_cache(maxsize=32)
def _image_summary(model_dir: str, unet_targets: tuple[str, ...], te_targets: tuple[str, ...],
                   fingerprint: str) -> ModelSummary:
    root = Path(model_dir)
    frozen: dict[str, int] = {}
    lora: dict[str, int] = {}
    te_layers = []
    context_tokens = 77
    for comp, model, te_config in _image_components(root, _read_json(root / "model_index.json")):
        if comp == "unet":
            lora[comp] = lora_params_per_rank(model, unet_targets)
            unet = model
        elif te_config is not None:
            lora[comp] = lora_params_per_rank(model, te_targets)
            te_layers.append(_text_layer(te_config, model))
            context_tokens = int(getattr(te_config, "max_position_embeddings", 77) or 77)
        frozen[comp] = _count(model)
    return ModelSummary(frozen=frozen, lora_per_rank=lora, unet_terms=_unet_terms(unet, context_tokens),
                        te_layers=tuple(te_layers), context_tokens=context_tokens)


@functools.lru_cache(maxsize=32)
def _image_network_counts(model_dir: str, unet_targets: tuple[str, ...], te_targets: tuple[str, ...],
                          network_json: str, rank: int, alpha: float, fingerprint: str) -> tuple[tuple[str, int], ...]:
    """((component, network parameters), ...)."""
    root = Path(model_dir)
    counts = {}
    for comp, model, te_config in _image_components(root, _read_json(root / "model_index.json")):
        targets = unet_targets if comp == "unet" else te_targets if te_config is not None else ()
        if targets:
            counts[comp] = _network_count(model, network_json, rank, alpha, list(targets))
    return tuple(counts.items())


def image_network_counts(model_dir: Path, target_modules: Iterable[str], text_encoder_target_modules: Iterable[str],
                         network, rank: int, alpha: float) -> dict[str, int]:
    """{component: parameters} of the config's network (a `trainer.config.NetworkConfig`) exactly as the job
    builds it (peft, on meta-device models): for the types whose count is not rank x a per-layer constant
    (LoCon's convolutions at conv_rank, LoHa, LoKr) and DoRA's magnitudes."""
    files = ["model_index.json"] + [f"{c}/config.json" for c in _IMAGE_COMPONENTS]
    return dict(_image_network_counts(str(model_dir.resolve()), tuple(target_modules),
                                      tuple(text_encoder_target_modules), network.model_dump_json(), rank, alpha,
                                      _folder_fingerprint(model_dir, files)))


def _meta_causal_lm(root: Path) -> tuple[Any, Any]:
    """(transformers config, meta-device model) of a causal-LM folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _read_json(root / "config.json")
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        return config, _meta(lambda: AutoModelForCausalLM.from_config(config))
    except Exception as e:
        raise VramEstimateError(f"cannot build a causal LM from {root / 'config.json'}: "
                                f"{content_free(e)}") from None


def _network_count(model: Any, network_json: str, rank: int, alpha: float, targets: list[str]) -> int:
    """Parameters of the network peft builds on `model` (meta device) for a `trainer.config.NetworkConfig`."""
    import torch
    from peft import inject_adapter_in_model

    from trainer.config import NetworkConfig
    from trainer.families.peft_lora import ADAPTER_PARAM_MARKS, peft_config

    job = SimpleNamespace(network=NetworkConfig.model_validate_json(network_json), lora_rank=rank,
                          effective_alpha=alpha, lora_dropout=0.0)
    with torch.device("meta"):
        inject_adapter_in_model(peft_config(model, job, targets), model)
    return sum(p.numel() for n, p in model.named_parameters() if any(m in n for m in ADAPTER_PARAM_MARKS))


@functools.lru_cache(maxsize=32)
def _text_network_count(model_dir: str, targets: tuple[str, ...], network_json: str, rank: int, alpha: float,
                        fingerprint: str) -> int:
    return _network_count(_meta_causal_lm(Path(model_dir))[1], network_json, rank, alpha, list(targets))


def text_network_counts(model_dir: Path, target_modules: Iterable[str], network, rank: int,
                        alpha: float) -> dict[str, int]:
    """`image_network_counts` for a causal LM: {"model": parameters}."""
    return {"model": _text_network_count(str(model_dir.resolve()), tuple(target_modules), network.model_dump_json(),
                                         rank, alpha, _folder_fingerprint(model_dir, ["config.json"]))}


@functools.lru_cache(maxsize=32)
def _text_summary(model_dir: str, targets: tuple[str, ...], fingerprint: str) -> ModelSummary:
    config, model = _meta_causal_lm(Path(model_dir))
    import torch.nn as nn

    head = model.get_output_embeddings()
    quantizable = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head)
    return ModelSummary(frozen={"model": _count(model)},
                         lora_per_rank={"model": lora_params_per_rank(model, targets)},
                         quantizable=quantizable,
                         text_layers=_text_layer(config, model),
                         vocab_size=int(getattr(config, "vocab_size", 0) or 0))


@functools.lru_cache(maxsize=16)
def _flux_summary(model_dir: str, targets: tuple[str, ...], te_targets: tuple[str, ...],
                  fingerprint: str) -> ModelSummary:
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
    return ModelSummary(frozen=frozen, lora_per_rank=lora, te_layers=(_text_layer(clip_config, clip),),
                         context_tokens=int(clip_config.max_position_embeddings),
                         quantizable=quantizable, offloadable=("text_encoder", "text_encoder_2"),
                         flux_blocks=(int(c.num_attention_heads * c.attention_head_dim), int(c.num_layers),
                                      int(c.num_single_layers)))


def flux_model_summary(model_dir: Path, target_modules: Iterable[str],
                       text_encoder_target_modules: Iterable[str] = ()) -> ModelSummary:
    """The flux family's summary: transformer, VAE, CLIP-L and T5 from their config files (meta device)."""
    files = ["model_index.json"] + [f"{c}/config.json" for c in ("transformer", "vae", "text_encoder", "text_encoder_2")]
    return _flux_summary(str(model_dir.resolve()), tuple(target_modules), tuple(text_encoder_target_modules),
                         _folder_fingerprint(model_dir, files))


def flux_per_sample_bytes(summary: ModelSummary, shape: dict) -> float:
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
            elems += summary.context_tokens * text_layer_elems(n, layer, h_te, shape["gradient_checkpointing"])
    return elems * shape["act_bytes"]


def unet_model_summary(model_dir: Path, target_modules: Iterable[str],
                       text_encoder_target_modules: Iterable[str] = ()) -> ModelSummary:
    """A UNet diffusion family's summary (sd, sdxl): every component in model_index.json."""
    files = ["model_index.json"] + [f"{c}/config.json" for c in _IMAGE_COMPONENTS]
    return _image_summary(str(model_dir.resolve()), tuple(target_modules), tuple(text_encoder_target_modules),
                          _folder_fingerprint(model_dir, files))


def causal_lm_model_summary(model_dir: Path, target_modules: Iterable[str]) -> ModelSummary:
    return _text_summary(str(model_dir.resolve()), tuple(target_modules),
                         _folder_fingerprint(model_dir, ["config.json"]))


def text_layer_elems(n: int, layer: float, h: int, checkpointing: bool) -> float:
    """fp32 activation elements per token for n layers: all of them, or with checkpointing each
    layer's input plus one layer recomputed in backward."""
    if checkpointing:
        return n * TEXT_CKPT_HIDDEN_COEF * h + layer
    return n * layer


def unet_per_sample_bytes(summary: ModelSummary, shape: dict) -> float:
    """Activation bytes of one sample for a UNet family (before BACKWARD_FACTOR): the UNet at the latent
    side resolution / 8, plus the text encoders' layers over the context tokens when they train."""
    latent_side = max(1, shape["resolution"] // 8)
    elems = unet_activation_elems(summary.unet_terms, latent_side, shape["gradient_checkpointing"])
    if shape["train_text_encoder"]:
        for n, layer, h in summary.te_layers:
            elems += summary.context_tokens * text_layer_elems(n, layer, h, shape["gradient_checkpointing"])
    return elems * shape["act_bytes"]


def causal_lm_per_sample_bytes(summary: ModelSummary, shape: dict) -> float:
    """Activation bytes of one full-length sample for a causal LM: its layers, plus the fp32 logits terms."""
    n, layer, h = summary.text_layers
    layers = text_layer_elems(n, layer, h, shape["gradient_checkpointing"]) * shape["act_bytes"]
    logits = TEXT_LOGITS_COEF * summary.vocab_size * 4.0
    return shape["max_seq_length"] * (layers + logits)


