"""Test helper: write a diffusers SD/SDXL pipeline as the original single-file checkpoint (LDM/SGM keys).

The inverse of diffusers' `from_single_file` conversion, written from the original layouts:

    UNet     model.diffusion_model.{input_blocks, middle_block, output_blocks, time_embed, label_emb, out}
             (a level's resnets/attentions at input_blocks.{(L+1)i+j+1}.{0,1}, its downsampler at
             input_blocks.{(L+1)(i+1)}.0.op; up level i at output_blocks.{(L+1)i+j}, upsampler at
             output_blocks.{(L+1)i+L}.{1 or 2}; L = layers_per_block; resnet parts in_layers/out_layers/
             emb_layers/skip_connection)
    VAE      first_stage_model.{encoder,decoder}.{down,up}.N.block.M / downsample / upsample, mid.block_1/2,
             mid.attn_1 (q/k/v/proj_out as 1x1 convs), norm_out, nin_shortcut, quant_conv, post_quant_conv
             (decoder levels numbered from the bottom: diffusers' up_blocks.i is up.{n-1-i})
    CLIP-L   cond_stage_model.transformer.text_model.* (SD1.x) / conditioner.embedders.0.transformer.text_model.*
    OpenCLIP conditioner.embedders.1.model.{token_embedding, positional_embedding, transformer.resblocks.N
             (ln_1, attn.in_proj_weight = q|k|v, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj), ln_final,
             text_projection (transposed)}

`write_single_file(pipe, path)` writes it; tests load it back with diffusers and compare every weight.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _resnet(rest: str) -> str:
    part, _, tail = rest.partition(".")
    return f"{RESNET_PARTS[part]}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    L = layers_per_block
    up_has_attention = {int(m.group(1)) for k in state if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in state.items():
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{(L + 1) * i + j + 1}.0.{_resnet(rest)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{(L + 1) * i + j + 1}.1.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(L + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{(L + 1) * i + j}.0.{_resnet(rest)}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            i, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"output_blocks.{(L + 1) * i + j}.1.{rest}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            i = int(m[1])
            new = f"output_blocks.{(L + 1) * i + L}.{2 if i in up_has_attention else 1}.{m[2]}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        else:
            module, _, param = key.rpartition(".")
            new = f"{UNET_TOP[module]}.{param}"
        out["model.diffusion_model." + new] = value
    return out


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and value.dim() == 2:
                value = value[:, :, None, None]  # linear in diffusers, 1x1 conv in the original
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
            new = f"encoder.down.{m[1]}.downsample.{m[2]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
            new = f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(te: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L as the original checkpoints hold it: the transformers module tree under `prefix`."""
    state = te.state_dict()
    flattened = "text_model" not in dict(te.named_children())
    return {prefix + ("text_model." if flattened else "") + k: v for k, v in state.items()
            if not k.endswith("position_ids")}


OPENCLIP_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_to_ldm(te: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection as OpenCLIP's text tower (SDXL's second encoder)."""
    state = {k.removeprefix("text_model."): v for k, v in te.state_dict().items()}
    out = {prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
           prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": state["final_layer_norm.weight"],
           prefix + "ln_final.bias": state["final_layer_norm.bias"],
           prefix + "text_projection": state["text_projection.weight"].T.contiguous()}
    layers = {int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    for n in sorted(layers):
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
            for hf, ldm in OPENCLIP_PARTS.items():
                out[f"{dst}{ldm}.{kind}"] = state[f"{src}{hf}.{kind}"]
    return out


def to_single_file(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original layout (SD 1.x with CLIP-L, or SDXL)."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."))
        state.update(openclip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    else:
        state.update(clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."))
    return state


def write_single_file(pipe, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in to_single_file(pipe).items()}, str(path))
    return path
