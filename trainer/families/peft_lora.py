"""A job's LoRA on a frozen base, through peft: which modules it adapts, adding it, training it, removing it.

Every family's task does the same four things with peft, so they live here once:
- `matches(name, targets)`: peft's rule for a list of target names (a module matches when its qualified
  name equals a target or ends with "." + target), also used where no model is built (checks, estimates);
- `inject(model, cfg, targets)`: add the config's LoRA (rank, alpha, dropout) to the targets (peft's init
  draws from the global RNG: the task seeds it with the config's seed first, so a cold and a warm daemon
  start from the same LoRA);
- `trainable(model)`: the LoRA parameters, trainable and fp32 (so is the optimizer state) over a
  half-precision or fp8 base;
- `remove(model)`: take the LoRA out again, leaving the base exactly as loaded (the warm cache reuses it).

Light: torch and peft are imported inside the functions.
"""
from __future__ import annotations

from typing import Iterable


def matches(name: str, targets: Iterable[str]) -> bool:
    """peft's rule for a list of target names: the full name, or a suffix after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def inject(model, cfg, targets, **options):
    """Add the config's LoRA to `targets` (a list, or peft's "all-linear") of `model`; returns its LoraConfig.
    `options`: further LoraConfig fields (init_lora_weights, task_type ...)."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.effective_alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=targets, **options)
    inject_adapter_in_model(config, model)
    return config


def trainable(model) -> list:
    """The LoRA parameters of `model`, made trainable and fp32 even when the frozen base is half precision."""
    params = []
    for n, p in model.named_parameters():
        if "lora_" in n:
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
