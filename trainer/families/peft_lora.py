"""A job's network on a frozen base, through peft: which modules it adapts, adding it, training it, removing it.

Every family's task does the same four things with peft, so they live here once:
- `matches(name, targets)`: peft's rule for a list of target names (a module matches when its qualified
  name equals a target or ends with "." + target), also used where no model is built (checks, estimates);
- `inject(model, cfg, targets)`: add the config's network (`network.type`: LoRA/LoCon with optional DoRA
  through peft's LoraConfig, LoHa through LoHaConfig, LoKr through LoKrConfig; rank, alpha, dropout) to the
  targets (peft's init draws from the global RNG: the task seeds it with the config's seed first, so a cold
  and a warm daemon start from the same network). LoCon adds kohya's convolution set (`conv_layers`);
- `trainable(model)`: the LoRA parameters, trainable and fp32 (so is the optimizer state) over a
  half-precision or fp8 base;
- `remove(model)`: take the LoRA out again, leaving the base exactly as loaded (the warm cache reuses it);
- `disabled(*models)`: the base's outputs for a while (peft's `disable_adapter`: every LoRA layer bypassed,
  nothing reloaded), e.g. the evaluation's base arm.

Light: torch and peft are imported inside the functions.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterable

from trainer.errors import ConfigError, Problem

# kohya's LoCon set (sd-scripts networks/lora.py, UNET_TARGET_REPLACE_MODULE_CONV2D_3X3): every Linear and Conv2d
# inside these UNet blocks; the 3x3 convolutions get conv_dim/conv_alpha, the 1x1 shortcuts and the
# time-embedding projections network_dim/network_alpha (its create_modules: `is_linear or is_conv2d_1x1`).
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
# The trainable tensors of each peft adapter type, by a part of their parameter names.
ADAPTER_PARAM_MARKS = ("lora_", "hada_", "lokr_")


def matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the full name, or a suffix after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def conv_layers(model) -> dict[str, bool]:
    """kohya's LoCon layers of `model` (see CONV_BLOCKS): {qualified name: is a 3x3 (conv_rank) convolution}."""
    import torch

    found = {}
    for name, block in model.named_modules():
        if type(block).__name__ in CONV_BLOCKS:
            for child, m in block.named_modules():
                if child and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    found[f"{name}.{child}"] = isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    return found


def _pattern(name: str) -> str:
    """A peft rank/alpha_pattern key that matches exactly the module `name` (peft reads the keys as regexes)."""
    return "^" + re.escape(name) + "$"


def inject(model, cfg, targets, **options):
    """Add the config's network (`cfg.network`) to `targets` (a list, or peft's "all-linear") of `model`;
    returns its peft config. `options`: further LoraConfig fields (init_lora_weights, task_type ...), for the
    LoRA types (LoHa and LoKr start from peft's own init: one factor zero, so the model starts unchanged)."""
    from peft import inject_adapter_in_model

    config = peft_config(model, cfg, targets, **options)
    inject_adapter_in_model(config, model)
    return config


def peft_config(model, cfg, targets, **options):
    """The peft config of `cfg.network` on `model` (see `inject`)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    net, rank, alpha = cfg.network, cfg.lora_rank, cfg.effective_alpha
    if targets == ["all-linear"]:
        targets = "all-linear"  # peft's keyword, not a module name
    if net.type == "locon" and targets != "all-linear":
        convs = conv_layers(model)
        if convs:
            # A string is one regex peft full-matches against each module name: the named targets (peft's
            # suffix rule) or one of the convolution set's exact names.
            targets = "|".join([rf"(.*\.)?{re.escape(t)}" for t in targets] + [re.escape(n) for n in convs])
            conv_rank = net.conv_rank or rank
            conv_alpha = net.conv_alpha or float(conv_rank)
            options["rank_pattern"] = {_pattern(n): conv_rank for n, k3 in convs.items() if k3}
            options["alpha_pattern"] = {_pattern(n): conv_alpha for n, k3 in convs.items() if k3}
    if net.type in ("lora", "locon"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                          use_dora=net.dora, **options)
    # The options LoHa/LoKr configs share with LoraConfig (init_lora_weights and the patterns are LoRA's).
    task = {k: v for k, v in options.items() if k in ("task_type", "base_model_name_or_path")}
    if net.type == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, **task)
    layers = adaptable(model, targets)
    problems = factor_problems(net.factor, layers)
    if problems:  # preflight found it already (on the model's config); kept for an API caller that skipped it
        raise ConfigError(problems)
    return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, decompose_factor=net.factor,
                      decompose_both=net.decompose_both, alpha_pattern=_lokr_unscaled(layers, rank, net), **task)


def adaptable(model, targets) -> dict[str, tuple[int, int]]:
    """The Linear/Conv2d layers of `model` the targets name: {name: (in, out) dimension}."""
    import torch

    out = {}
    for name, m in model.named_modules():
        if name and (targets == "all-linear" or matches(name, targets)):
            if isinstance(m, torch.nn.Linear):
                out[name] = (m.in_features, m.out_features)
            elif isinstance(m, torch.nn.Conv2d):
                out[name] = (m.in_channels // m.groups, m.out_channels)
    return out


def factor_problems(factor: int, layers: dict[str, tuple[int, int]]) -> list[Problem]:
    """A LoKr factor must divide some layer's dimensions (`layers`: `adaptable`), else every layer falls back to
    the square-root split and the factor means nothing (peft's and LyCORIS's `factorization`)."""
    if factor > 0 and layers and not any(d % factor == 0 for dims in layers.values() for d in dims):
        name, (i, o) = next(iter(layers.items()))
        return [Problem("network.factor", f"{factor} divides no dimension of the adapted layers "
                        f"(e.g. {name}: {i} in, {o} out)",
                        "use a factor that divides the layer widths (e.g. 4 or 8), or -1", factor)]
    return []


def _lokr_unscaled(layers: dict[str, tuple[int, int]], rank: int, net) -> dict[str, float]:
    """The LoKr layers whose two Kronecker factors are both full matrices: LyCORIS (lokr.py: "use scale = 1"),
    A1111 (network_lokr: no dim, scale 1.0) and ComfyUI (no dim, alpha 1.0) apply those unscaled, so peft's
    alpha is set to the rank there (scale 1) and the file means the same thing in every tool. peft's own rule
    of when a factor stays full (peft/tuners/lokr/layer.py update_layer)."""
    from peft.tuners.lokr.layer import factorization

    full = {}
    for name, (i, o) in layers.items():
        in_m, in_n = factorization(i, net.factor)
        out_l, out_k = factorization(o, net.factor)
        use_w1 = not (net.decompose_both and rank < max(out_l, in_m) / 2)
        use_w2 = not (rank < max(out_k, in_n) / 2)
        if use_w1 and use_w2:
            full[_pattern(name)] = float(rank)
    return full


def trainable(model) -> list:
    """The network's parameters of `model`, made trainable and fp32 even when the frozen base is half precision."""
    params = []
    for n, p in model.named_parameters():
        if any(mark in n for mark in ADAPTER_PARAM_MARKS):
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def remove(model) -> None:
    """Remove the LoRA layers from `model`: frozen, in eval mode, as loaded."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    if "peft_config" in model.__dict__:
        del model.peft_config  # else the next job's inject_adapter_in_model sees a stale adapter config
    model.requires_grad_(False)
    model.eval()


@contextmanager
def disabled(*models):
    """Bypass every LoRA layer of `models` inside the block (peft's BaseTunerLayer.enable_adapters, what
    PeftModel.disable_adapter does), then enable them again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
