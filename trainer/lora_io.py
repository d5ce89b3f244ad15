"""The LoRA on disk: kohya key names, so A1111, ComfyUI and diffusers' `load_lora_weights` all read it.

    lora_unet_<module path with '_'>.lora_down.weight   (peft's lora_A)
    lora_unet_<module path with '_'>.lora_up.weight     (peft's lora_B)
    lora_unet_<module path with '_'>.alpha              (scale = alpha / rank; we write the real alpha)
    lora_te_<...>                                       text encoder modules, same scheme
    lora_lm_<...>                                       text mode: the causal LM's modules, same scheme

The mapping is built from the live model's module names in both directions, so it never guesses
how to turn '_' back into '.'.
"""
from __future__ import annotations

import torch

PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "model": "lora_lm"}
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"


class LoraFormatError(ValueError):
    pass


def _lora_params(models: dict[str, torch.nn.Module]):
    """Yield (kohya module name, lora_A param, lora_B param) for every LoRA layer in the models."""
    for part, model in models.items():
        params = dict(model.named_parameters())
        for name, a in params.items():
            if name.endswith(_A):
                module = name[: -len(_A)]
                yield f"{PREFIXES[part]}_{module.replace('.', '_')}", a, params[module + _B]


def to_kohya(models: dict[str, torch.nn.Module], alpha: float) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for kname, a, b in _lora_params(models):
        out[f"{kname}.lora_down.weight"] = a.detach().float().cpu().contiguous()
        out[f"{kname}.lora_up.weight"] = b.detach().float().cpu().contiguous()
        out[f"{kname}.alpha"] = torch.tensor(float(alpha))
    return out


def load_kohya(models: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a kohya-format LoRA into the models' LoRA layers; every key must match in name and shape."""
    expected = {k: (a, b) for k, a, b in _lora_params(models)}
    given = {k.rsplit(".", 2)[0] for k in state if k.endswith((".lora_down.weight", ".lora_up.weight"))}
    missing = sorted(set(expected) - given)
    extra = sorted(given - set(expected))
    if missing or extra:
        hint = ("the file was trained with other target_modules or train_text_encoder settings"
                if extra or missing else "")
        raise LoraFormatError(
            f"{source}: LoRA layers do not match this config ({len(missing)} missing, {len(extra)} unexpected; "
            # Only this config's own layer names are quoted: the file's key names are its content.
            f"e.g. missing {missing[:2]}): {hint}; set target_modules/train_text_encoder "
            "to what the file was trained with")
    with torch.no_grad():
        for kname, (a, b) in expected.items():
            down, up = state[f"{kname}.lora_down.weight"], state[f"{kname}.lora_up.weight"]
            if down.shape != a.shape or up.shape != b.shape:
                raise LoraFormatError(
                    f"{source}: {kname} has rank {down.shape[0]}, the config asks for rank {a.shape[0]}: "
                    f"set lora_rank: {down.shape[0]}")
            a.copy_(down.to(a.dtype))
            b.copy_(up.to(b.dtype))


def read_lora_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise LoraFormatError(f"{path}: not a readable safetensors LoRA ({e})") from None
