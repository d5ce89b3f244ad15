"""The network on disk: kohya/LyCORIS key names, so A1111/Forge, ComfyUI and diffusers' `load_lora_weights` read it.

    lora_unet_<module path with '_'>.lora_down.weight   (peft's lora_A; LoCon: also on convolutions)
    lora_unet_<module path with '_'>.lora_up.weight     (peft's lora_B)
    lora_unet_<module path with '_'>.dora_scale         (DoRA: peft's lora_magnitude_vector, LyCORIS's
                                                         output-axis shape (out, 1[, 1, 1]))
    lora_unet_<...>.hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b      (LoHa)
    lora_unet_<...>.lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b   (LoKr)
    lora_unet_<module path with '_'>.alpha              (scale = alpha / rank; we write the real alpha)
    lora_te_<...>                                       text encoder modules, same scheme
    lora_te1_<...>, lora_te2_<...>                      SDXL's two text encoders (CLIP-L, OpenCLIP-G)
    lora_lm_<...>                                       text mode: the causal LM's modules, same scheme

The names are the ones the loaders read: A1111's extensions-builtin/Lora network_lora.py (lora_up/lora_down),
network_hada.py (hada_w1_a ...), network_lokr.py (lokr_w1, lokr_w2, their _a/_b halves) and network.py
(alpha / dim); ComfyUI's comfy/weight_adapter/lora.py, loha.py, lokr.py and base.py weight_decompose
(dora_scale, on the output axis when its first dimension is the layer's output); LyCORIS's kohya.py writes
the same keys. The mapping is built from the live model's module names in both directions, so it never
guesses how to turn '_' back into '.'. Light: torch is imported inside the functions that need it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.errors import content_free

if TYPE_CHECKING:
    import torch

# Component -> key prefix; a family with other names passes its own (SDXL: text_encoder -> lora_te1).
PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "model": "lora_lm"}
_A, _B = ".lora_A.default.weight", ".lora_B.default.weight"
# (down, up) key suffixes of a layer in diffusers' LoRA layout (Flux's file; kohya's names: FILE_NAMES).
DIFFUSERS_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


# A peft adapter layer's parameter (relative to the layer) -> its key suffix in the file.
FILE_NAMES = {"lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
              "lora_magnitude_vector.default.weight": "dora_scale",
              **{f"{n}.default": n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1",
                                             "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}}


class LoraFormatError(ValueError):
    pass


def network_of(keys) -> tuple[str, bool]:
    """(network type, DoRA) of a file from its key names alone (no torch): LoHa and LoKr by their LyCORIS
    tensor names, LoCon by LoRA keys on the UNet's ResNet blocks or samplers (kohya's conv set)."""
    keys = list(keys)
    dora = any(k.endswith(".dora_scale") for k in keys)
    if any(".hada_" in k for k in keys):
        return "loha", dora
    if any(".lokr_" in k for k in keys):
        return "lokr", dora
    conv = any(k.startswith("lora_unet_") and ("_resnets_" in k or "samplers_" in k) for k in keys)
    return ("locon" if conv else "lora"), dora


def network_metadata(net) -> dict[str, str]:
    """ss_network_module and ss_network_args as LyCORIS's kohya.py writes them (its network_args are
    kohya's --network_args: algo, conv_dim/conv_alpha, factor, decompose_both, dora_wd), for a
    `trainer.config.NetworkConfig`; plain LoRA is sd-scripts' networks.lora with no args."""
    import json

    if net.module == "networks.lora":
        return {"ss_network_module": "networks.lora"}
    args = {"algo": "lora" if net.type == "locon" else net.type}
    if net.type == "locon":
        args.update(conv_dim=str(net.conv_rank) if net.conv_rank else None,
                    conv_alpha=str(net.conv_alpha) if net.conv_alpha else None)
    if net.type == "lokr":
        args.update(factor=str(net.factor), decompose_both=str(net.decompose_both))
    if net.dora:
        args["dora_wd"] = "True"
    return {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps({k: v for k, v in args.items() if v is not None})}


def adapter_layers(model: "torch.nn.Module"):
    """Yield (module path with the kohya root, {file key suffix: parameter}, alpha) for every peft adapter
    layer of `model` (LoRA, DoRA, LoHa, LoKr), in model order."""
    root = kohya_root(model)
    for name, m in model.named_modules():
        ranks = getattr(m, "r", None)
        if not isinstance(ranks, dict) or "default" not in ranks:
            continue
        params = {FILE_NAMES[n]: p for n, p in m.named_parameters() if n in FILE_NAMES}
        alpha = (getattr(m, "lora_alpha", None) or getattr(m, "alpha"))["default"]
        yield root + name, params, float(alpha)


def kohya_root(model: "torch.nn.Module") -> str:
    """The module-path prefix kohya names carry that the live model may lack: transformers >= 5.6 flattened
    CLIPTextModel (no `text_model.` level), but A1111/ComfyUI read `lora_te_text_model_encoder_...`."""
    flattened_clip = type(model).__name__ == "CLIPTextModel" and "text_model" not in dict(model.named_children())
    return "text_model." if flattened_clip else ""


def peft_layers(model: "torch.nn.Module"):
    """Yield (module path with the kohya root, lora_A param, lora_B param, module path) of every peft LoRA
    layer of `model`, in model order."""
    params = dict(model.named_parameters())
    root = kohya_root(model)
    for name, a in params.items():
        if name.endswith(_A):
            module = name[: -len(_A)]
            yield root + module, a, params[module + _B], module


def layer_tensors(layers: dict[str, tuple], alpha: float, suffixes: tuple[str, str]) -> dict[str, "torch.Tensor"]:
    """The file's tensors of `layers` ({key: (lora_A param, lora_B param)}): down, up (fp32) and alpha."""
    import torch

    down, up = suffixes
    out: dict[str, torch.Tensor] = {}
    for key, (a, b) in layers.items():
        out[key + down] = a.detach().float().cpu().contiguous()
        out[key + up] = b.detach().float().cpu().contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def load_layers(layers: dict[str, tuple], state: dict[str, "torch.Tensor"], source: str,
                suffixes: tuple[str, str]) -> None:
    """Copy a LoRA file's tensors into `layers` ({key: (lora_A param, lora_B param)}); every layer must match
    in name and rank (`suffixes`: the file's down and up key suffixes)."""
    import torch

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


def _file_layers(models: dict[str, "torch.nn.Module"], prefixes: dict[str, str] | None = None):
    """Yield (kohya key, {suffix: parameter}, alpha, key without the kohya root) of every adapter layer."""
    prefixes = prefixes or PREFIXES
    for part, model in models.items():
        root = kohya_root(model)
        for path, params, alpha in adapter_layers(model):
            key = f"{prefixes[part]}_{path.replace('.', '_')}"
            yield key, params, alpha, f"{prefixes[part]}_{path[len(root):].replace('.', '_')}"


def _file_shape(suffix: str, param: "torch.Tensor") -> tuple[int, ...]:
    """DoRA's magnitude in LyCORIS's output-axis layout (out, 1[, 1, 1]); every other tensor as peft holds it."""
    if suffix != "dora_scale":
        return tuple(param.shape)
    return (param.numel(), 1) if param.dim() == 1 else (param.numel(), 1, 1, 1)


def to_kohya(models: dict[str, "torch.nn.Module"], prefixes: dict[str, str] | None = None) -> dict[str, "torch.Tensor"]:
    """The models' adapter layers as a kohya/LyCORIS state dict (fp32), each with its alpha."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, params, alpha, _ in _file_layers(models, prefixes):
        for suffix, p in params.items():
            out[f"{key}.{suffix}"] = p.detach().float().cpu().reshape(_file_shape(suffix, p)).contiguous()
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def load_kohya(models: dict[str, "torch.nn.Module"], state: dict[str, "torch.Tensor"], source: str,
               prefixes: dict[str, str] | None = None) -> None:
    """Copy a kohya/LyCORIS file into the models' adapter layers; every layer and tensor must match in name and
    shape (a reshape-free copy: resume stays bit-identical)."""
    import torch

    layers = list(_file_layers(models, prefixes))
    # Files written before the kohya root was restored (lora_te_encoder_...) still load.
    aliases = {short: k for k, _, _, short in layers if short != k}
    state = {_rename(k, aliases): v for k, v in state.items()}
    given = {k.split(".", 1)[0] for k in state if not k.endswith(".alpha")}
    wanted = {k for k, *_ in layers}
    missing, extra = sorted(wanted - given), sorted(given - wanted)
    if missing or extra:
        raise LoraFormatError(
            f"{source}: LoRA layers do not match this config ({len(missing)} missing, {len(extra)} unexpected; "
            # Only this config's own layer names are quoted: the file's key names are its content.
            f"e.g. missing {missing[:2]}): the file was trained with other target_modules, network or "
            "train_text_encoder settings; set them to what the file was trained with")
    with torch.no_grad():
        for key, params, _, _ in layers:
            for suffix, p in params.items():
                given_t = state.get(f"{key}.{suffix}")
                if given_t is None or tuple(given_t.shape) != _file_shape(suffix, p):
                    raise LoraFormatError(_mismatch(source, key, suffix, given_t, p))
                p.copy_(given_t.reshape(p.shape).to(p.dtype))


# The tensors whose first dimension is the layer's rank.
RANK_FIRST = ("lora_down.weight", "hada_w1_b", "hada_w2_b", "lokr_w1_b", "lokr_w2_b")


def _mismatch(source: str, key: str, suffix: str, given: "torch.Tensor | None", param: "torch.Tensor") -> str:
    """Why a file's tensor does not fit this config's layer, and which key to set."""
    if given is not None and suffix in RANK_FIRST and given.shape[1:] == param.shape[1:]:
        which = "network.conv_rank" if param.dim() == 4 and param.shape[2:] != (1, 1) else "lora_rank"
        return (f"{source}: {key} has rank {given.shape[0]}, the config asks for rank {param.shape[0]}: "
                f"set {which}: {given.shape[0]}")
    have = "missing" if given is None else f"shape {tuple(given.shape)}"
    return (f"{source}: {key}.{suffix} is {have}, this config makes it {_file_shape(suffix, param)}: set lora_rank "
            "and network (conv_rank, factor, decompose_both) to what the file was trained with")


def _rename(key: str, aliases: dict[str, str]) -> str:
    module, _, rest = key.partition(".")
    return f"{aliases[module]}.{rest}" if module in aliases else key


def read_lora_file(path) -> tuple[dict[str, "torch.Tensor"], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise LoraFormatError(f"{path}: not a readable safetensors LoRA ({content_free(e)})") from None
