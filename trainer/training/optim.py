"""Optimizers and learning-rate schedules users name in their configs (kohya's names).

Optimizers come from the well-kept libraries, never re-implemented here:

    adamw      torch.optim.AdamW
    adamw8bit  bitsandbytes.optim.AdamW8bit (CUDA only: `trainer.checks.preflight.optimizer_problems` refuses it on a CPU device
               before any weights load; the package is optional: `pip install bitsandbytes`)
    prodigy    prodigyopt.Prodigy (learns its step size: the usual learning_rate is 1.0)
    adafactor  transformers.optimization.Adafactor with a fixed learning rate (relative_step off, so the
               schedule below applies, as kohya does with an explicit learning rate)

`optimizer.args` (kohya's optimizer_args) are passed to the constructor as keyword arguments.

Schedules (`lr_factor`, a pure function of the step: the LambdaLR that applies it has no state beyond the
step count, so a resumed run gets the same rates) follow kohya's / diffusers' `get_scheduler` names:
constant, constant_with_warmup, linear, cosine, cosine_with_restarts (`lr_restart_cycles` hard restarts),
polynomial (`lr_scheduler_power`, to 0). Every schedule starts with `lr_warmup_steps` of linear warmup.
"""
from __future__ import annotations

import math

from trainer.config import OPTIMIZER_LIBRARIES

def lr_factor(step: int, warmup: int, total: int, kind: str, cycles: int = 1, power: float = 1.0) -> float:
    """Multiplier on the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "polynomial":
        return (1.0 - progress) ** power
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def build_optimizer(cfg, param_groups: list[dict], device_type: str = "cpu"):
    """The configured optimizer over the task's parameter groups (each with its own "lr")."""
    import importlib

    o = cfg.optimizer
    module_path, _, cls_name = OPTIMIZER_LIBRARIES[o.name][1].rpartition(".")
    cls = getattr(importlib.import_module(module_path), cls_name)
    if o.name == "adafactor":
        kwargs = {"eps": (1e-30, 1e-3), "weight_decay": o.weight_decay, "beta1": None, "scale_parameter": False,
                  "relative_step": False, "warmup_init": False}
    else:
        kwargs = {"betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
    if o.name == "adamw" and device_type == "cuda":
        kwargs["fused"] = True  # one kernel for all LoRA tensors instead of several per tensor (same math)
    return cls(param_groups, **{**kwargs, **o.args})


def build_scheduler(cfg, optimizer, total_steps: int):
    """A LambdaLR applying `lr_factor` (its state is the step count: checkpointed with the optimizer)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, cfg.lr_warmup_steps, total_steps, cfg.lr_scheduler, cfg.lr_restart_cycles, cfg.lr_scheduler_power))
