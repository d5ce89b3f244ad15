#!/usr/bin/env python
"""GPU check of the VRAM estimator: estimate vs measured peak memory of a few real LoRA training steps.

Run on a GPU box (or a lent GPU):

    .venv/bin/python bench/gpu_check.py                  # tiny SD, SD1.5, SDXL at 1024 px, tiny + 1.1B Llama
    .venv/bin/python bench/gpu_check.py --quick          # tiny models only
    .venv/bin/python bench/gpu_check.py --only sdxl-base # one case
    .venv/bin/python bench/gpu_check.py --only flux-dev  # FLUX.1 [dev] at 1024 px: bf16 vs fp8 base, vs 24 GiB
    .venv/bin/python bench/gpu_check.py --json out.json  # also write the figures
    .venv/bin/python bench/gpu_check.py --speed          # ours vs the textbook loop (gpu_speed.py), <= 8 min
    .venv/bin/python bench/gpu_check.py --speed --quick  # the same, smaller shapes and fewer steps, ~2 min
    .venv/bin/python bench/gpu_check.py --cpu-smoke      # the speed cases' code on tiny models, CPU

For each case it builds the models from configs written inline here (random weights, nothing is
downloaded): the SD1.5 UNet (block_out_channels 320/640/1280/1280, cross_attention_dim 768, ...) with its
VAE and CLIP-L text encoder, SDXL base from the config the trainer ships (trainer/families/model_configs/sdxl-base:
UNet 2.57B, both text encoders, time ids, 1024 px), a tiny SD, a TinyLlama-1.1B-shaped causal LM and a
tiny one. It runs a
few training steps the way the trainer does (frozen parts cast to the weight dtype, fp32 LoRA on the
attention projections, AdamW, autocast), at two batch sizes, with and without gradient checkpointing,
and compares ``torch.cuda.max_memory_allocated`` with the estimate's tensor part (total - overhead),
and the process's memory as NVML sees it (peak reserved + CUDA context) with the estimate's total.
The goal: within 20%.

The Flux case (`flux-dev`, `run_flux_case`): a FLUX.1 [dev] transformer with random weights from the shipped
config (11.9 B parameters), 1024 px, batch 1, rank 16 on the default targets, bf16 autocast, gradient
checkpointing, cached latents and text embeddings (random tensors of their shapes; the text encoders are
not resident while training): once with the bf16 base and once with the 8-bit (fp8) base, each against the
estimate and against a 24 GiB card, with it/s.

The evaluation case (`sd15-eval`, `run_eval_case`): the SD1.5-shaped UNet / VAE / CLIP-L with random weights and
a rank-8 LoRA, through the real evaluation stage (`trainer.training.evaluation.evaluate` on an `SdTask`): 8
prompts x 4 seeds x 3 arms (candidate, a comparison LoRA, the base with the adapters disabled) at 512 px, 20
DDIM steps, scored by the tiny CLIP and DINOv2 (the metric models' cost is small next to 96 generations);
reports the evaluation's seconds, seconds per image and peak memory. `--only tiny-eval` runs the same at 64 px
with the tiny SD (the CPU check of the code path).

Without CUDA it prints the estimates, runs the tiny cases' training steps on the CPU (to check the code
path), and says that measurement needs a GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from trainer.checks.vram import OVERHEAD_MIB, estimate_vram  # noqa: E402

MIB = 1024 * 1024
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64),
                 cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=1000, max_position_embeddings=77, projection_dim=32, bos_token_id=0,
                 pad_token_id=1, eos_token_id=2)

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128)


@dataclass
class Case:
    name: str
    mode: str            # image (SD: UNet, VAE, CLIP) | sdxl (the shipped SDXL config) | text
    configs: tuple
    size: int            # resolution (image) or sequence length (text)
    batches: tuple
    tiny: bool = False


CASES = [
    Case("tiny-sd", "image", (TINY_UNET, TINY_VAE, TINY_CLIP), 128, (1, 4), tiny=True),
    Case("sd15-unet", "image", (SD15_UNET, SD15_VAE, SD15_CLIP), 512, (1, 4)),
    Case("sdxl-base", "sdxl", (), 1024, (1, 2)),
    Case("tiny-llama", "text", (TINY_LLAMA,), 128, (1, 4), tiny=True),
    Case("llama-1.1b", "text", (LLAMA_1B,), 512, (1, 4)),
]


# --- model folders for the estimator (configs only) ---------------------------------------------------


FAMILY = {"image": "sd", "sdxl": "sdxl", "text": "causal_lm"}


def write_configs(case: Case, folder: Path) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, LlamaConfig

    from trainer.families.shipped import shipped_dir

    if case.mode == "sdxl":
        return shipped_dir("sdxl-base")  # the config the trainer ships: what an SDXL single file is built from
    folder.mkdir(parents=True, exist_ok=True)
    if case.mode == "image":
        unet_cfg, vae_cfg, clip_cfg = case.configs
        with torch.device("meta"):
            UNet2DConditionModel(**unet_cfg).save_config(folder / "unet")
            AutoencoderKL(**vae_cfg).save_config(folder / "vae")
        CLIPTextConfig(**clip_cfg).save_pretrained(folder / "text_encoder")
        (folder / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    else:
        LlamaConfig(**case.configs[0]).save_pretrained(folder)
    return folder


def estimate(case: Case, folder: Path, batch: int, precision: str, checkpointing: bool, rank: int):
    return estimate_vram(folder, family=FAMILY[case.mode], resolution=case.size, batch_size=batch, lora_rank=rank,
                         target_modules=LLM_TARGETS if case.mode == "text" else UNET_TARGETS,
                         train_text_encoder=False, text_encoder_target_modules=[],
                         mixed_precision=precision, gradient_checkpointing=checkpointing,
                         cache_latents=False, max_seq_length=case.size)


# --- training steps -----------------------------------------------------------------------------------


DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _lora_fp32(model) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def run_steps(case: Case, batch: int, precision: str, checkpointing: bool, rank: int, steps: int,
              device: str) -> dict:
    """Build the models on ``device``, run ``steps`` LoRA training steps; return peak figures (CUDA)."""
    from peft import LoraConfig

    dtype = DTYPES[precision]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    amp = precision != "no"
    lora = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                      target_modules=LLM_TARGETS if case.mode == "text" else UNET_TARGETS)
    te2 = None
    with torch.device(device):
        if case.mode == "sdxl":
            unet, vae, te, te2 = build_sdxl(dtype)
            unet.add_adapter(lora)
            trainable = _lora_fp32(unet)
            if checkpointing:
                unet.enable_gradient_checkpointing()
            _speed_up(unet, cuda)
            unet.train()
            model = unet
        elif case.mode == "image":
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import CLIPTextConfig, CLIPTextModel

            unet_cfg, vae_cfg, clip_cfg = case.configs
            unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg)
            te = CLIPTextModel(CLIPTextConfig(**clip_cfg))
            for m in (unet, vae, te):
                m.requires_grad_(False)
                m.to(dtype)
            unet.add_adapter(lora)
            trainable = _lora_fp32(unet)
            if checkpointing:
                unet.enable_gradient_checkpointing()
            unet.train()
            model = unet
        else:
            from peft import get_peft_model
            from transformers import LlamaConfig, LlamaForCausalLM

            model = LlamaForCausalLM(LlamaConfig(**case.configs[0])).to(dtype)
            model.requires_grad_(False)
            model = get_peft_model(model, lora)
            trainable = _lora_fp32(model)
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.enable_input_require_grads()
            model.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True if cuda else None)  # as the trainer does on CUDA
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and precision == "fp16")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()      # from here: weights resident, the training peak to come
        weights_alloc = torch.cuda.memory_allocated()
    t0 = time.time()
    first_step_s = 0.0
    losses = []
    for _ in range(steps):
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=amp):
            if case.mode == "sdxl":
                loss = sdxl_loss(unet, vae, te, te2, batch, case.size, device)
            elif case.mode == "image":
                res = case.size
                with torch.no_grad():
                    images = torch.randn(batch, 3, res, res, device=device, dtype=dtype)
                    latents = vae.encode(images).latent_dist.sample() * 0.18215
                    ids = torch.randint(0, te.config.vocab_size, (batch, te.config.max_position_embeddings),
                                        device=device)
                    context = te(ids)[0]
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, 1000, (batch,), device=device)
                pred = unet(latents + noise, timesteps, context).sample
                loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            else:
                ids = torch.randint(0, case.configs[0]["vocab_size"], (batch, case.size), device=device)
                loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if len(losses) == 1:
            if cuda:
                torch.cuda.synchronize()
            first_step_s = time.time() - t0  # it/s is over the steps after the first (allocator, autotune)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - t0
    out = {"seconds": round(seconds, 2), "loss": round(losses[-1], 4),
           "it_s": round((steps - 1) / (seconds - first_step_s), 2) if steps > 1 and seconds > first_step_s else None}
    if cuda:
        torch.cuda.synchronize()
        out.update(weights_alloc_mib=round(weights_alloc / MIB),
                   peak_alloc_mib=round(torch.cuda.max_memory_allocated() / MIB),
                   peak_reserved_mib=round(torch.cuda.max_memory_reserved() / MIB))
    del model, opt, trainable
    if case.mode != "text":
        del unet, vae, te, te2
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def build_sdxl(dtype):
    """SDXL base with random weights, from the shipped configs (on the current default device): UNet and text
    encoders in `dtype`, the VAE fp32 (as the trainer keeps it)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.families.shipped import shipped_dir

    root = shipped_dir("sdxl-base")
    unet = UNet2DConditionModel.from_config(json.loads((root / "unet/config.json").read_text())).to(dtype)
    vae = AutoencoderKL.from_config(json.loads((root / "vae/config.json").read_text()))
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder")).to(dtype)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2")).to(dtype)
    for m in (unet, vae, te, te2):
        m.requires_grad_(False)
    return unet, vae, te, te2


def sdxl_loss(unet, vae, te, te2, batch: int, res: int, device: str):
    """One SDXL training step's loss as trainer.families.sdxl_task computes it (fp32 VAE encode, both
    encoders' penultimate states concatenated, pooled from the second, time ids)."""
    with torch.no_grad(), torch.autocast(device_type=device.split(":")[0], enabled=False):
        images = torch.randn(batch, 3, res, res, device=device)
        latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
    with torch.no_grad():
        ids = torch.randint(0, te.config.vocab_size, (batch, te.config.max_position_embeddings), device=device)
        out1, out2 = te(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
        context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = out2[0]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device, dtype=pooled.dtype)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    noisy = (latents + noise).contiguous(memory_format=torch.channels_last) if device.startswith("cuda") \
        else latents + noise
    pred = unet(noisy, timesteps, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return torch.nn.functional.mse_loss(pred.float(), noise.float())


def _speed_up(unet, cuda: bool) -> None:
    """The trainer's CUDA settings (trainer.families.sd_task.speed_up)."""
    if cuda:
        from trainer.families.sd_task import speed_up

        speed_up(unet, torch.device("cuda"))


# --- Flux (trainer.families.flux): FLUX.1 [dev] at 1024 px, bf16 base vs the 8-bit (fp8) base -------------

FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def flux_estimate(folder: Path, res: int, seq: int, quantize: str, rank: int):
    """The trainer's estimate for this Flux job: bf16, gradient checkpointing, cached text embeddings."""
    return estimate_vram(folder, family="flux", resolution=res, batch_size=1, lora_rank=rank,
                         target_modules=FLUX_TARGETS, train_text_encoder=False, text_encoder_target_modules=[],
                         mixed_precision="bf16", gradient_checkpointing=True, cache_latents=True,
                         quantization=quantize, max_sequence_length=seq, cache_text_embeddings=True)


def flux_steps(transformer_config: dict, quantize: str, res: int, seq: int, rank: int, steps: int,
               device: str) -> dict:
    """Random FLUX.1 weights from `transformer_config` (built on the meta device, materialized in bf16 on
    `device`), the blocks quantized to fp8 with `quantize` fp8 as trainer.families.flux_task does, fp32 LoRA
    on the default targets, gradient checkpointing, then `steps` steps of FluxTask's loss (latents and text
    embeddings cached: random tensors of their shapes) with AdamW. Returns timings and (CUDA) peaks."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model

    from trainer.families import flux
    from trainer.families.flux_task import BLOCK_PREFIXES, shifted_sigmas
    from trainer.families.fp8 import quantize_linears

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        torch.cuda.empty_cache()
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(transformer_config).to(dtype)
    transformer.requires_grad_(False)

    def materialize(module):  # random weights in place; one block at a time, quantized before the next
        module.to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0.0, 0.02)
        if quantize == "fp8":
            quantize_linears(module, lambda n: True)

    for prefix in BLOCK_PREFIXES:
        for block in getattr(transformer, prefix.rstrip(".")):
            materialize(block)
    for name, child in transformer.named_children():  # embedders, final layer: in bf16, never quantized
        if name + "." not in BLOCK_PREFIXES:
            child.to_empty(device=device)
            with torch.no_grad():
                for p in child.parameters():
                    p.normal_(0.0, 0.02)
    vae_config = json.loads((flux.shipped_config("dev") / "vae/config.json").read_text())
    vae = AutoencoderKL.from_config(vae_config).to(device) if transformer_config["num_layers"] > 2 else None
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=FLUX_TARGETS), transformer)
    trainable = _lora_fp32(transformer)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True if cuda else None)
    scheduler = json.loads((flux.shipped_config("dev") / "scheduler/scheduler_config.json").read_text())
    ch, side = transformer.config.in_channels // 4, res // 8
    joint, pooled_dim = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # from here: the base resident, the training peak to come
        weights_alloc = torch.cuda.memory_allocated()
    t0, first_step_s, losses = time.time(), 0.0, []
    for _ in range(steps):
        latents = torch.randn(1, ch, side, side, device=device)
        seq_embeds = torch.randn(1, seq, joint, device=device, dtype=dtype)
        pooled = torch.randn(1, pooled_dim, device=device, dtype=dtype)
        noise = torch.randn_like(latents)
        sigmas = shifted_sigmas(torch.rand(1), scheduler, (side // 2) ** 2).to(device)
        noisy = (1 - sigmas) * latents + sigmas * noise
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=cuda):
            pred = transformer(
                hidden_states=FluxPipeline._pack_latents(noisy, 1, ch, side, side), timestep=sigmas,
                guidance=torch.ones(1, device=device) if transformer.config.guidance_embeds else None,
                pooled_projections=pooled, encoder_hidden_states=seq_embeds,
                txt_ids=torch.zeros(seq, 3, device=device),
                img_ids=FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, device, latents.dtype),
                return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), FluxPipeline._pack_latents(noise - latents, 1, ch, side,
                                                                                     side))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if len(losses) == 1:
            if cuda:
                torch.cuda.synchronize()
            first_step_s = time.time() - t0
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - t0
    out = {"seconds": round(seconds, 2), "loss": round(losses[-1], 4),
           "it_s": round((steps - 1) / (seconds - first_step_s), 3) if steps > 1 and seconds > first_step_s else None}
    if cuda:
        out.update(weights_alloc_mib=round(weights_alloc / MIB),
                   peak_alloc_mib=round(torch.cuda.max_memory_allocated() / MIB),
                   peak_reserved_mib=round(torch.cuda.max_memory_reserved() / MIB))
    del transformer, vae, opt, trainable
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def run_flux_case(steps: int, rank: int, cuda: bool, ctx: int | None) -> list[dict]:
    """FLUX.1 [dev] from the shipped config at 1024 px, batch 1: bf16 base and the 8-bit base, each against
    the estimate and a 24 GiB card. Without CUDA: the estimates, and the same code on a tiny Flux (CPU)."""
    from trainer.families import flux
    from trainer.dev.tiny import build_tiny_flux

    folder = flux.shipped_config("dev")
    rows = []
    tiny = None
    for quantize in ("no", "fp8"):
        est = flux_estimate(folder, 1024, 512, quantize, rank)
        row = {"case": f"flux-dev {'bf16' if quantize == 'no' else 'fp8'} base", "size": 1024, "batch": 1,
               "precision": "bf16", "checkpointing": True, "estimate_mib": est.total_mib,
               "estimate_tensors_mib": est.total_mib - est.breakdown["overhead"], "breakdown": est.breakdown,
               "fits_24gib_estimate": est.total_mib <= 24 * 1024}
        config = json.loads((folder / "transformer/config.json").read_text())
        if not cuda:  # the code path on a tiny Flux: one step on the CPU
            if tiny is None:
                tiny = build_tiny_flux(Path(tempfile.mkdtemp()) / "flux")
            config = json.loads((tiny / "transformer/config.json").read_text())
        try:
            row.update(flux_steps(config, quantize, 1024 if cuda else 32, 512 if cuda else 16, rank,
                                  steps if cuda else 1, "cuda" if cuda else "cpu"))
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {e}"
        if "peak_alloc_mib" in row:
            row["ratio_tensors"] = round(row["estimate_tensors_mib"] / row["peak_alloc_mib"], 3)
            if ctx is not None:
                used = row["peak_reserved_mib"] + ctx
                row["ratio_total"] = round(est.total_mib / used, 3)
                row["fits_24gib_measured"] = used <= 24 * 1024
        rows.append(row)
        print(_line(row) + (f"  it/s {row['it_s']}" if row.get("it_s") else "")
              + (f"  24 GiB: estimate {'fits' if row['fits_24gib_estimate'] else 'does not fit'}"
                 + (f", measured {'fits' if row['fits_24gib_measured'] else 'does not fit'}"
                    if "fits_24gib_measured" in row else "")), flush=True)
    return rows


def cuda_context_mib() -> int | None:
    """Memory the CUDA context takes (device used - torch reserved) right after CUDA starts."""
    try:
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        return round((total - free - torch.cuda.memory_reserved()) / MIB)
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models only")
    ap.add_argument("--only", action="append", help="run only this case (repeatable): " +
                    ", ".join(c.name for c in CASES) + ", flux-dev, tiny-eval, sd15-eval")
    ap.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None,
                    help="default: bf16 where supported, else fp16; fp32 ('no') on the CPU")
    ap.add_argument("--steps", type=int, default=3, help="training steps per case (default 3)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    ap.add_argument("--no-checkpointing-variant", action="store_true",
                    help="skip the gradient-checkpointing runs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--speed", action="store_true",
                    help="the speed cases instead (bench/gpu_speed.py): ours vs the textbook loop, one table; "
                         "with --quick: smaller shapes, fewer steps")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the speed cases' code end to end on tiny models on the CPU (no figures worth reading)")
    args = ap.parse_args(argv)
    _quiet_libraries()
    if args.speed or args.cpu_smoke:
        import gpu_speed

        rows = gpu_speed.run(quick=args.quick, smoke=args.cpu_smoke)
        print(gpu_speed.table(rows, torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_smoke
                              else "cpu (smoke: tiny models, the code path only)"))
        if args.json:
            args.json.write_text(json.dumps({"speed": rows}, indent=2))
        return 0 if all("error" not in r for r in rows) else 1

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    precision = args.precision or ("bf16" if cuda and torch.cuda.is_bf16_supported() else
                                   "fp16" if cuda else "no")
    cases = [c for c in CASES if (c.tiny or not args.quick) and (not args.only or c.name in args.only)]
    variants = [False] if args.no_checkpointing_variant else [False, True]
    ctx = cuda_context_mib() if cuda else None
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; precision {precision}; "
              f"CUDA context {ctx} MiB (the estimate assumes {OVERHEAD_MIB} MiB overhead)")
    else:
        print(f"No CUDA device: printing the estimates and running the tiny cases on the CPU to check the "
              f"training code. Measuring peak memory needs a GPU (torch {torch.__version__}).")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            folder = write_configs(case, Path(tmp) / case.name)
            for ckpt in variants:
                for batch in case.batches:
                    est = estimate(case, folder, batch, precision, ckpt, args.rank)
                    tensor_est = est.total_mib - est.breakdown["overhead"]
                    row = {"case": case.name, "size": case.size, "batch": batch, "precision": precision,
                           "checkpointing": ckpt, "estimate_mib": est.total_mib,
                           "estimate_tensors_mib": tensor_est, "breakdown": est.breakdown}
                    # On the CPU the tiny cases only check the code path: one step, smallest batch.
                    if cuda or (case.tiny and batch == case.batches[0]):
                        steps = args.steps if cuda else 1
                        try:
                            row.update(run_steps(case, batch, precision, ckpt, args.rank, steps, device))
                        except torch.cuda.OutOfMemoryError as e:
                            row["error"] = f"out of memory: {e}"
                    if "peak_alloc_mib" in row:
                        row["ratio_tensors"] = round(tensor_est / row["peak_alloc_mib"], 3)
                        if ctx is not None:
                            row["ratio_total"] = round(est.total_mib / (row["peak_reserved_mib"] + ctx), 3)
                    rows.append(row)
                    print(_line(row), flush=True)
    if not args.quick and (not args.only or "flux-dev" in args.only):
        rows += run_flux_case(args.steps, 16, cuda, ctx)
    for name in ("tiny-eval", "sd15-eval"):
        if (args.only and name in args.only) or (not args.only and (cuda or name == "tiny-eval")
                                                  and (name == "tiny-eval" or not args.quick)):
            rows.append(run_eval_case(name, device, precision))
            print(_eval_line(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cuda": cuda, "context_mib": ctx, "rows": rows}, indent=2))
    if not cuda:
        print("measurement needs a CUDA GPU: run this script on the GPU box to compare estimate and peak")
    else:
        # Tiny models: the tensors are a few MiB, so their ratio is noise; judge the full-size cases.
        ratios = [r["ratio_tensors"] for r in rows
                  if "ratio_tensors" in r and not r["case"].startswith("tiny")]
        if ratios:
            worst = max(ratios, key=lambda r: abs(r - 1))
            print(f"worst estimate/measured (full-size cases): {worst:.2f} "
                  f"({'within' if abs(worst - 1) <= 0.2 else 'OUTSIDE'} 20%)")
    return 0


def run_eval_case(name: str, device: str, precision: str) -> dict:
    """The evaluation stage on an SD1.5-shaped model at 512 px (sd15-eval) or the tiny SD at 64 px (tiny-eval):
    8 prompts x 4 seeds x 3 arms through `trainer.training.evaluation.evaluate`."""
    import contextlib

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.config import parse_config
    from trainer.dev.tiny import demo_assets
    from trainer.families.sd_task import SdBase, SdTask
    from trainer.training.evaluation import Against, evaluate

    assets = demo_assets()
    sd15 = name == "sd15-eval"
    size, steps = (512, 20) if sd15 else (64, 4)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    tok_dir = assets["sd_model"] / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77 if sd15 else 16)
    clip = dict(SD15_CLIP if sd15 else TINY_CLIP, vocab_size=max(tokenizer.vocab_size + 2, 1000))
    clip.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=tokenizer.model_max_length)
    clip.pop("projection_dim", None)
    torch.manual_seed(0)
    base = SdBase(unet=UNet2DConditionModel(**(SD15_UNET if sd15 else TINY_UNET)).to(device, dtype),
                  vae=AutoencoderKL(**(SD15_VAE if sd15 else TINY_VAE)).to(device),
                  text_encoder=CLIPTextModel(CLIPTextConfig(**clip)).to(device, dtype), tokenizer=tokenizer,
                  noise_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                  source=name)
    for m in (base.unet, base.vae, base.text_encoder):
        m.requires_grad_(False)
    with tempfile.TemporaryDirectory() as tmp:
        refs = Path(tmp) / "refs"
        refs.mkdir()
        Image.new("RGB", (size, size), (200, 40, 40)).save(refs / "0.png")
        prompts = [f"a {c} shape --s {steps}" for c in ("red", "green", "blue", "yellow", "red on white", "blue on "
                                                         "black", "green photo", "yellow painting")]
        yaml_text = json.dumps({
            "train_data_dir": str(assets["shapes"]), "base_model": str(assets["sd_model"]), "output_dir": tmp,
            "resolution": size, "lora_rank": 8, "mixed_precision": precision, "model_family": "sd", "mode": "image",
            "target_modules": UNET_TARGETS,
            "eval": {"prompts": prompts, "seeds": [0, 1, 2, 3], "clip_model": str(assets["clip_model"]),
                     "dino_model": str(assets["dino_model"]), "reference_dir": str(refs), "bootstrap": 200}})
        cfg = parse_config(yaml_text, base_dir=Path(tmp))
        task = SdTask(cfg, base, torch.device(device))
        comparison = {k: v + 0.01 * torch.randn_like(v) for k, v in task.lora_state().items()}
        lora = Path(tmp) / "comparison.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in comparison.items()}, str(lora))

        class Quiet:
            def emit(self, ev):
                pass

        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype != torch.float32 else contextlib.nullcontext
        t0 = time.perf_counter()
        with autocast():
            evaluate(task, cfg, Path(tmp), Against("run", lora), Quiet())
        seconds = time.perf_counter() - t0
        images = len(prompts) * 4 * 3
        row = {"case": name, "size": size, "images": images, "sampler_steps": steps, "eval_s": round(seconds, 2),
               "s_per_image": round(seconds / images, 3), "precision": precision}
        if device == "cuda":
            row["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / MIB)
        task.detach()
    return row


def _eval_line(r: dict) -> str:
    peak = f", peak {r['peak_alloc_mib']} MiB" if "peak_alloc_mib" in r else ""
    return (f"{r['case']:11s} {r['size']:4d} px: {r['images']} images ({r['sampler_steps']} steps) evaluated in "
            f"{r['eval_s']:.1f} s, {r['s_per_image']:.2f} s/image{peak}")


def _quiet_libraries() -> None:
    """diffusers/transformers info lines (dtype casts of random models) would drown the figures."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _line(r: dict) -> str:
    head = (f"{r['case']:11s} {r['size']:4d} batch {r['batch']} {r['precision']:4s} "
            f"ckpt={'on ' if r['checkpointing'] else 'off'} estimate {r['estimate_mib']:6d} MiB "
            f"(tensors {r['estimate_tensors_mib']:6d})")
    if "error" in r:
        return head + f"  {r['error']}"
    if "peak_alloc_mib" in r:
        tail = (f"  measured alloc {r['peak_alloc_mib']:6d} reserved {r['peak_reserved_mib']:6d} MiB  "
                f"ratio {r['ratio_tensors']:.2f}")
        if "ratio_total" in r:
            tail += f" (total vs reserved+context {r['ratio_total']:.2f})"
        speed = f"  {r['it_s']} it/s" if r.get("it_s") else ""
        return head + tail + f"  {r['seconds']}s{speed}"
    if "loss" in r:
        return head + f"  CPU steps ok (loss {r['loss']}), no measurement"
    return head


if __name__ == "__main__":
    sys.exit(main())
