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
# (down, up) key suffixes of a layer in a LoRA file: kohya's names, and diffusers' (the Flux LoRA layout).
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
DIFFUSERS_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


class LoraFormatError(ValueError):
    pass


def kohya_root(model: torch.nn.Module) -> str:
    """The module-path prefix kohya names carry that the live model may lack: transformers >= 5.6 flattened
    CLIPTextModel (no `text_model.` level), but A1111/ComfyUI read `lora_te_text_model_encoder_...`."""
    flattened_clip = type(model).__name__ == "CLIPTextModel" and "text_model" not in dict(model.named_children())
    return "text_model." if flattened_clip else ""


def peft_layers(model: torch.nn.Module):
    """Yield (module path with the kohya root, lora_A param, lora_B param, module path) of every peft LoRA
    layer of `model`, in model order."""
    params = dict(model.named_parameters())
    root = kohya_root(model)
    for name, a in params.items():
        if name.endswith(_A):
            module = name[: -len(_A)]
            yield root + module, a, params[module + _B], module


def _lora_params(models: dict[str, torch.nn.Module], prefixes: dict[str, str] | None = None):
    """Yield (kohya module name, lora_A param, lora_B param, name without the kohya root) for every LoRA
    layer in the models."""
    prefixes = prefixes or PREFIXES
    for part, model in models.items():
        for path, a, b, module in peft_layers(model):
            yield (f"{prefixes[part]}_{path.replace('.', '_')}", a, b, f"{prefixes[part]}_{module.replace('.', '_')}")


def layer_tensors(layers: dict[str, tuple], alpha: float, suffixes: tuple[str, str]) -> dict[str, torch.Tensor]:
    """The file's tensors of `layers` ({key: (lora_A param, lora_B param)}): down, up (fp32) and alpha."""
    down, up = suffixes
    out: dict[str, torch.Tensor] = {}
    for key, (a, b) in layers.items():
        out[key + down] = a.detach().float().cpu().contiguous()
        out[key + up] = b.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def load_layers(layers: dict[str, tuple], state: dict[str, torch.Tensor], source: str,
                suffixes: tuple[str, str]) -> None:
    """Copy a LoRA file's tensors into `layers` ({key: (lora_A param, lora_B param)}); every layer must match
    in name and rank (`suffixes`: the file's down and up key suffixes)."""
    down_suffix, up_suffix = suffixes
    given = {k[: -len(s)] for k in state for s in suffixes if k.endswith(s)}
    missing = sorted(set(layers) - given)
    extra = sorted(given - set(layers))
    if missing or extra:
        raise LoraFormatError(
            f"{source}: LoRA layers do not match this config ({len(missing)} missing, {len(extra)} unexpected; "
            # Only this config's own layer names are quoted: the file's key names are its content.
            f"e.g. missing {missing[:2]}): the file was trained with other target_modules or "
            "train_text_encoder settings; set target_modules/train_text_encoder to what the file was trained with")
    with torch.no_grad():
        for key, (a, b) in layers.items():
            down, up = state[key + down_suffix], state[key + up_suffix]
            if down.shape != a.shape or up.shape != b.shape:
                raise LoraFormatError(
                    f"{source}: {key} has rank {down.shape[0]}, the config asks for rank {a.shape[0]}: "
                    f"set lora_rank: {down.shape[0]}")
            a.copy_(down.to(a.dtype))
            b.copy_(up.to(b.dtype))


def to_kohya(models: dict[str, torch.nn.Module], alpha: float,
             prefixes: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    return layer_tensors({k: (a, b) for k, a, b, _ in _lora_params(models, prefixes)}, alpha, KOHYA_SUFFIXES)


def load_kohya(models: dict[str, torch.nn.Module], state: dict[str, torch.Tensor], source: str,
               prefixes: dict[str, str] | None = None) -> None:
    """Copy a kohya-format LoRA into the models' LoRA layers; every key must match in name and shape."""
    layers = list(_lora_params(models, prefixes))
    # Files written before the kohya root was restored (lora_te_encoder_...) still load.
    aliases = {short: k for k, _, _, short in layers if short != k}
    state = {_rename(k, aliases): v for k, v in state.items()}
    load_layers({k: (a, b) for k, a, b, _ in layers}, state, source, KOHYA_SUFFIXES)


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
