"""The LoRA on disk: kohya key names, so A1111, ComfyUI and diffusers' `load_lora_weights` all read it.

    lora_unet_<module path with '_'>.lora_down.weight   (peft's lora_A)
    lora_unet_<module path with '_'>.lora_up.weight     (peft's lora_B)
    lora_unet_<module path with '_'>.alpha              (scale = alpha / rank; we write the real alpha)
    lora_te_<...>                                       text encoder modules, same scheme
    lora_te1_<...>, lora_te2_<...>                      SDXL's two text encoders (CLIP-L, OpenCLIP-G)
    lora_lm_<...>                                       text mode: the causal LM's modules, same scheme

The mapping is built from the live model's module names in both directions, so it never guesses
how to turn '_' back into '.'.
"""
from __future__ import annotations

import torch

from trainer.errors import content_free

# Component -> key prefix; a family with other names passes its own (SDXL: text_encoder -> lora_te1).
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "model": "lora_lm"}
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"


class LoraFormatError(ValueError):
    pass


def _kohya_root(model: torch.nn.Module) -> str:
    """The module-path prefix kohya names carry that the live model may lack: transformers >= 5.6 flattened
    CLIPTextModel (no `text_model.` level), but A1111/ComfyUI read `lora_te_text_model_encoder_...`."""
    flattened_clip = type(model).__name__ == "CLIPTextModel" and "text_model" not in dict(model.named_children())
    return "text_model." if flattened_clip else ""


def _lora_params(models: dict[str, torch.nn.Module], prefixes: dict[str, str] | None = None):
    """Yield (kohya module name, lora_A param, lora_B param, name without the kohya root) for every LoRA
    layer in the models."""
    prefixes = prefixes or PREFIXES
    for part, model in models.items():
        params = dict(model.named_parameters())
        root = _kohya_root(model)
        for name, a in params.items():
            if name.endswith(_A):
                module = name[: -len(_A)]
                yield (f"{prefixes[part]}_{(root + module).replace('.', '_')}", a, params[module + _B],
                       f"{prefixes[part]}_{module.replace('.', '_')}")


def to_kohya(models: dict[str, torch.nn.Module], alpha: float,
             prefixes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for kname, a, b, _ in _lora_params(models, prefixes):
        out[f"{kname}.lora_down.weight"] = a.detach().float().cpu().contiguous()
        out[f"{kname}.lora_up.weight"] = b.detach().float().cpu().contiguous()
        out[f"{kname}.alpha"] = torch.tensor(float(alpha))
    return out


def load_kohya(models: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], source: str,
               prefixes: dict[str, str] | None = None) -> None:
    """Copy a kohya-format LoRA into the models' LoRA layers; every key must match in name and shape."""
    expected = {k: (a, b) for k, a, b, _ in _lora_params(models, prefixes)}
    # Files written before the kohya root was restored (lora_te_encoder_...) still load.
    aliases = {short: k for k, _, _, short in _lora_params(models, prefixes) if short != k}
    state = {_rename(k, aliases): v for k, v in state.items()}
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


def _rename(key: str, aliases: dict[str, str]) -> str:
    module, _, rest = key.partition(".")
    return f"{aliases[module]}.{rest}" if module in aliases else key


def read_lora_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise LoraFormatError(f"{path}: not a readable safetensors LoRA ({content_free(e)})") from None
