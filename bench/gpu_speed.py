"""GPU speed: our trainer (trainer.api.run_job, a real job) vs the textbook diffusers/transformers + peft loop,
on the same GPU, the same random-weight model folder, in one run. Called by `gpu_check.py --speed`.

Cases (full size; `--quick` shrinks them, `--cpu-smoke` runs the same code on the tiny models on the CPU):

    sd15          SD1.5 (shipped config) at 512 px, batch 4, bf16, no caches: img/s
    sdxl          SDXL base (shipped config) at 1024 px, batch 1, bf16, no caches: it/s
    flux-bf16     FLUX.1 [dev] (shipped config) at 1024 px, batch 1, bf16 base, checkpointing, cached
                  latents/text embeddings: s/step
    flux-fp8      the same with the base stored in fp8: s/step
    llm-8b        a Llama-3-8B-shaped causal LM (inline config below: the trainer ships no LLM config) at
                  2048 tokens, batch 1, bf16: tok/s and MFU against the GPU's dense bf16 peak
    sd15-w2       ours with `devices: [0]` vs `devices: [0, 1]` (same global batch 4): needs 2 GPUs

Ours: the model folder is written once with random weights (each component built from the shipped config),
then `trainer.api.run_job` trains on it; the time per step is the median gap between `step` events after
the warm-up steps (loading and caching excluded). Textbook: the loop of diffusers' train_text_to_image_lora
/ train_dreambooth_lora_flux and of a transformers + peft script, written out below, loading the same
folder with `from_pretrained`: frozen base in bf16, `add_adapter(LoraConfig)` / `get_peft_model`, fp32 LoRA,
AdamW, autocast; the time per step is measured the same way (median after the warm-up, synchronized).
The Flux T5 encoder is written with 2 layers (its output width unchanged): both sides cache the text
embeddings, so T5 never runs in a timed step and a full T5-XXL would only cost disk and load time.
"""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK = 16

# Meta-Llama-3-8B's config.json (architecture fields): 8.0 B parameters.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False)

# Dense bf16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' data sheets: H100/H200 SXM 989.4,
# H100 PCIe 756.5, A100 312. Matched on torch.cuda.get_device_name; anything else: MFU N/A.
BF16_PEAK_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.5), ("H100", 989.4), ("A100", 312.0)]


def bf16_peak_tflops(device_name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def llm_flops_per_token(params: int, layers: int, hidden: int, seq: int) -> float:
    """Model FLOPs per trained token of a LoRA step (recomputation not counted, as MFU defines it): forward
    2N and backward through the activations 2N (the frozen weights get no gradient, so not the usual 6N),
    plus attention scores and values, 4·L·s·d forward and twice that backward."""
    return 4 * params + 12 * layers * seq * hidden


@dataclass
class Shape:
    name: str
    family: str          # sd | sdxl | flux | causal_lm
    size: int            # px, or tokens
    batch: int
    quantization: str = "no"


def shapes(quick: bool, smoke: bool) -> list[Shape]:
    if smoke:
        return [Shape("sd15", "sd", 32, 4), Shape("sdxl", "sdxl", 32, 1), Shape("flux-bf16", "flux", 32, 1),
                Shape("flux-fp8", "flux", 32, 1, "fp8"), Shape("llm-8b", "causal_lm", 64, 1)]
    return [Shape("sd15", "sd", 256 if quick else 512, 4), Shape("sdxl", "sdxl", 512 if quick else 1024, 1),
            Shape("flux-bf16", "flux", 512 if quick else 1024, 1),
            Shape("flux-fp8", "flux", 512 if quick else 1024, 1, "fp8"),
            Shape("llm-8b", "causal_lm", 1024 if quick else 2048, 1)]


def flux_text_tokens(shape: Shape) -> int:
    """T5 tokens per caption on both sides: FLUX.1 [dev]'s 512; 16 on the tiny Flux of the CPU smoke."""
    return 512 if shape.size >= 512 else 16


# --- the model folders: random weights from the shipped configs -----------------------------------------


def _component(library: str, cls_name: str):
    import importlib

    return getattr(importlib.import_module(library), cls_name)


def random_pipeline(shipped: str, tokenizers_from: Path, dest: Path, quick: bool, device: str,
                    dtype=torch.bfloat16) -> Path:
    """A diffusers folder: every model component built from trainer/families/model_configs/<shipped> with
    random weights stored in `dtype` (made on `device`: fast init), the tokenizers and model_index of the tiny pipeline of the
    same family (the vocabulary size does not change a step's cost). `quick` shrinks Flux to 4+8 blocks."""
    from trainer.families.shipped import shipped_dir

    src = shipped_dir(shipped)
    shutil.copytree(tokenizers_from, dest)
    index = json.loads((src / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or not (src / name / "config.json").exists():
            continue
        library, cls_name = spec
        shutil.rmtree(dest / name, ignore_errors=True)
        config = json.loads((src / name / "config.json").read_text())
        if name == "text_encoder_2" and cls_name == "T5EncoderModel":
            config["num_layers"] = 2  # cached embeddings: T5 never runs in a timed step (module docstring)
        if quick and name == "transformer":
            config.update(num_layers=4, num_single_layers=8)
        cls = _component(library, cls_name)
        with torch.device(device):
            model = cls.from_config(config) if library == "diffusers" else cls(cls.config_class.from_dict(config))
        model.to(dtype).save_pretrained(dest / name)
        del model
        if name.startswith("text_encoder") and cls_name.startswith("CLIP"):  # the real prompt length (77)
            tok = dest / name.replace("text_encoder", "tokenizer") / "tokenizer_config.json"
            tok.write_text(json.dumps(dict(json.loads(tok.read_text()),
                                           model_max_length=config["max_position_embeddings"])))
    shutil.copytree(src / "scheduler", dest / "scheduler", dirs_exist_ok=True)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))
    return dest


def random_llm(tokenizer_from: Path, dest: Path, quick: bool, device: str, dtype=torch.bfloat16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    shutil.copytree(tokenizer_from, dest)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**dict(LLAMA_8B, **({"num_hidden_layers": 4} if quick else {}))))
    model.to(dtype).save_pretrained(dest)
    return dest


def tiny_folder(family: str, root: Path) -> Path:
    from trainer.dev.tiny import build_tiny_flux, demo_assets

    if family == "flux":
        path = root / "tiny-flux"
        return path if path.exists() else build_tiny_flux(path)
    return demo_assets()[{"sd": "sd_model", "sdxl": "sdxl_model", "causal_lm": "llm_model"}[family]]


# --- ours: one real job through the one door --------------------------------------------------------------


class StepClock:
    def __init__(self):
        self.stamps: list[float] = []

    def emit(self, ev) -> None:
        if ev["type"] == "step":
            self.stamps.append(time.perf_counter())


def median_step_s(stamps: list[float], warmup: int) -> float:
    t = stamps[max(warmup - 1, 0):]
    return statistics.median(b - a for a, b in zip(t, t[1:]))


def text_data(folder: Path, tokens: int) -> Path:
    """Text records longer than `tokens` characters (the tiny tokenizer is one token per character): cut to
    max_seq_length, every sample is exactly that long."""
    folder.mkdir(parents=True)
    line = ("the red circle is red. the blue square is blue. " * (tokens // 40 + 2))
    (folder / "train.jsonl").write_text("\n".join(json.dumps({"text": line}) for _ in range(8)) + "\n")
    return folder


def run_ours(shape: Shape, model: Path, data: dict, work: Path, steps: int, warmup: int,
             devices, precision: str) -> float:
    """Seconds per optimizer step of a real job (trainer.api.run_job), steady state."""
    import yaml

    from trainer import api

    work.mkdir(parents=True)
    cfg = {"base_model": str(model), "output_dir": str(work / "out"), "lora_rank": RANK,
           "batch_size": shape.batch, "learning_rate": 1e-4, "max_train_steps": warmup + steps,
           "save_steps": 100_000, "log_every": 100_000, "seed": 1, "resume": "never",
           "mixed_precision": precision}
    if shape.family == "causal_lm":
        cfg.update(mode="text", train_data_dir=str(data["text"]), max_seq_length=shape.size,
                   target_modules=LLM_TARGETS)
    else:
        cfg.update(train_data_dir=str(data["shapes"]), metadata_path=str(data["shapes"] / "metadata.csv"),
                   resolution=shape.size, target_modules=FLUX_TARGETS if shape.family == "flux" else UNET_TARGETS)
    if shape.family == "flux":  # as the textbook Flux loop: cached latents and embeddings, checkpointing
        cfg.update(cache_latents=True, cache_text_embeddings=True, gradient_checkpointing=True,
                   quantization=shape.quantization, max_sequence_length=flux_text_tokens(shape))
    if devices is not None:
        cfg["devices"] = devices
    path = work / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    clock = StepClock()
    result = api.run_job(api.preflight(path), clock, threading.Event())
    if result.outcome != "succeeded":
        raise RuntimeError(f"ours: {shape.name} ended {result.outcome}: {result}")
    return median_step_s(clock.stamps, warmup)


# --- the textbook loops ---------------------------------------------------------------------------------


def _lora_params(model) -> list:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def _timed(step, steps: int, warmup: int, cuda: bool) -> float:
    stamps = []
    for _ in range(warmup + steps):
        loss = step()
        loss.backward()
        step.opt.step()
        step.opt.zero_grad(set_to_none=True)
        loss.item()  # the loop's logging line: syncs, as a per-step loss print does
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return median_step_s(stamps, warmup)


def textbook_unet(shape: Shape, folder: Path, steps: int, warmup: int, device: str, dtype) -> float:
    """diffusers' train_text_to_image_lora(_sdxl).py without accelerate: VAE encode, text encoder(s), noise,
    UNet with `add_adapter(LoraConfig)`, MSE, AdamW."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sdxl = shape.family == "sdxl"
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype).to(device)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae",  # SDXL's VAE overflows in half: fp32
                                        torch_dtype=torch.float32 if sdxl else dtype).to(device)
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=dtype).to(device)
    te2 = (CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", torch_dtype=dtype)
           .to(device) if sdxl else None)
    for m in (unet, vae, te, te2):
        if m is not None:
            m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    params = _lora_params(unet)
    unet.train()
    b, res, kind = shape.batch, shape.size, device.split(":")[0]

    def step():
        with torch.no_grad():
            images = torch.randn(b, 3, res, res, device=device, dtype=vae.dtype)
            latents = (vae.encode(images).latent_dist.sample() * vae.config.scaling_factor).to(dtype)
            ids = torch.randint(0, te.config.vocab_size, (b, te.config.max_position_embeddings), device=device)
            if sdxl:
                out1, out2 = te(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
                context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
                added = {"text_embeds": out2[0],
                         "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * b, device=device, dtype=dtype)}
            else:
                context, added = te(ids)[0], None
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        with torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(latents + noise, t, context, added_cond_kwargs=added).sample
        return torch.nn.functional.mse_loss(pred.float(), noise.float())

    step.opt = torch.optim.AdamW(params, lr=1e-4)
    return _timed(step, steps, warmup, kind == "cuda")


def textbook_flux(shape: Shape, folder: Path, steps: int, warmup: int, device: str, dtype) -> float:
    """diffusers' train_dreambooth_lora_flux.py, the cached path (latents and prompt embeddings computed
    once: random tensors of their shapes here), gradient checkpointing; fp8: diffusers' own fp8 storage,
    `enable_layerwise_casting(storage_dtype=float8_e4m3fn, compute_dtype=bf16)`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig

    tr = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).to(device)
    tr.requires_grad_(False)
    if shape.quantization == "fp8":
        tr.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    tr.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=FLUX_TARGETS))
    params = _lora_params(tr)
    tr.enable_gradient_checkpointing()
    tr.train()
    ch, side, seq = tr.config.in_channels // 4, shape.size // 8, flux_text_tokens(shape)
    latents = torch.randn(1, ch, side, side, device=device)
    embeds = torch.randn(1, seq, tr.config.joint_attention_dim, device=device, dtype=dtype)
    pooled = torch.randn(1, tr.config.pooled_projection_dim, device=device, dtype=dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side // 2, side // 2, device, dtype)
    txt_ids = torch.zeros(seq, 3, device=device, dtype=dtype)
    kind = device.split(":")[0]

    def step():
        noise = torch.randn_like(latents)
        sigma = torch.rand(1, device=device)
        noisy = (1 - sigma) * latents + sigma * noise
        with torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32):
            pred = tr(hidden_states=FluxPipeline._pack_latents(noisy, 1, ch, side, side), timestep=sigma,
                      guidance=torch.full((1,), 3.5, device=device) if tr.config.guidance_embeds else None,
                      pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                      return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - latents, 1, ch, side, side)
        return torch.nn.functional.mse_loss(pred.float(), target.float())

    step.opt = torch.optim.AdamW(params, lr=1e-4)
    return _timed(step, steps, warmup, kind == "cuda")


def textbook_llm(shape: Shape, folder: Path, steps: int, warmup: int, device: str, dtype) -> float:
    """A transformers + peft script: AutoModelForCausalLM.from_pretrained, get_peft_model(LoraConfig), AdamW,
    labels = input ids."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules=LLM_TARGETS))
    params = _lora_params(model)
    model.train()
    kind = device.split(":")[0]

    def step():
        ids = torch.randint(0, model.config.vocab_size, (shape.batch, shape.size), device=device)
        with torch.autocast(kind, dtype=dtype, enabled=dtype != torch.float32):
            return model(input_ids=ids, labels=ids).loss

    step.opt = torch.optim.AdamW(params, lr=1e-4)
    return _timed(step, steps, warmup, kind == "cuda")


TEXTBOOK = {"sd": textbook_unet, "sdxl": textbook_unet, "flux": textbook_flux, "causal_lm": textbook_llm}


# --- the table ------------------------------------------------------------------------------------------


def figures(shape: Shape, step_s: float) -> tuple[float, str]:
    """(the case's figure, its unit) from seconds per step: higher is better except s/step."""
    if shape.family == "sd":
        return shape.batch / step_s, "img/s"
    if shape.family == "sdxl":
        return 1 / step_s, "it/s"
    if shape.family == "flux":
        return step_s, "s/step"
    return shape.batch * shape.size / step_s, "tok/s"


def run(quick: bool, smoke: bool) -> list[dict]:
    """Every speed case, ours then the textbook loop, each on a fresh GPU; returns the table's rows."""
    import gc

    from trainer.dev.tiny import demo_assets

    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke:
        raise SystemExit("speed cases need a CUDA GPU; --cpu-smoke runs their code on tiny models on the CPU")
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    precision = "bf16" if cuda else "no"
    steps, warmup = (2, 1) if smoke else (5, 2) if quick else (10, 3)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    assets = demo_assets()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-speed-") as tmp:
        root = Path(tmp)
        data = {"shapes": assets["shapes"], "text": text_data(root / "text", 4096)}
        folders: dict[str, Path] = {}
        for shape in shapes(quick, smoke):
            if shape.family not in folders:
                tiny = tiny_folder(shape.family, root)
                if smoke:
                    folders[shape.family] = tiny
                elif shape.family == "causal_lm":
                    folders[shape.family] = random_llm(tiny, root / "llm", quick, device)
                else:
                    shipped = {"sd": "sd15", "sdxl": "sdxl-base", "flux": "flux-dev"}[shape.family]
                    folders[shape.family] = random_pipeline(shipped, tiny, root / shipped, quick, device)
                if cuda:  # the init's fp32 copies: give them back before the job's VRAM gate looks
                    torch.cuda.empty_cache()
            folder = folders[shape.family]
            row = {"case": shape.name, "size": shape.size, "batch": shape.batch}
            try:
                ours = run_ours(shape, folder, data, root / f"ours-{shape.name}", steps, warmup, None, precision)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                book = TEXTBOOK[shape.family](shape, folder, steps, warmup, device, dtype)
            except Exception as e:  # one case failing (OOM, a missing kernel) must not lose the others' figures
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                rows.append(row)
                continue
            finally:
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            (o, unit), (t, _) = figures(shape, ours), figures(shape, book)
            row.update(unit=unit, ours=o, textbook=t, ratio=(t / o) if unit == "s/step" else (o / t))
            if shape.family == "causal_lm":
                from transformers import AutoConfig

                c = AutoConfig.from_pretrained(folder)
                n = sum(p.numel() for p in _meta_llm(c).parameters())
                peak = bf16_peak_tflops(gpu) if cuda else None
                per_token = llm_flops_per_token(n, c.num_hidden_layers, c.hidden_size, shape.size)
                row["mfu"] = {k: (row[k] * per_token / (peak * 1e12) if peak else None) for k in ("ours", "textbook")}
            rows.append(row)
            print(line(row), flush=True)
        rows.append(data_parallel_row(folders.get("sd") or tiny_folder("sd", root), data, root, steps, warmup,
                                      precision, cuda, smoke, quick))
        print(line(rows[-1]), flush=True)
    return rows


def _meta_llm(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def data_parallel_row(folder: Path, data: dict, root: Path, steps: int, warmup: int, precision: str,
                      cuda: bool, smoke: bool, quick: bool) -> dict:
    """SD1.5, global batch 4: `devices: [0]` vs `devices: [0, 1]` through run_job (CPU smoke: 1 vs 2 gloo
    ranks). The W=2 step times come from rank 0's step events, which follow the all-reduce."""
    shape = Shape("sd15-w2", "sd", 32 if smoke else 256 if quick else 512, 4)
    row = {"case": "sd15 W=2 vs W=1", "size": shape.size, "batch": shape.batch}
    if cuda and torch.cuda.device_count() < 2:
        row["skipped"] = f"needs 2 GPUs, this box has {torch.cuda.device_count()}"
        return row
    one, two = ([0], [0, 1]) if cuda else (None, 2)
    w1 = run_ours(shape, folder, data, root / "w1", steps, warmup, one, precision)
    w2 = run_ours(shape, folder, data, root / "w2", steps, warmup, two, precision)
    row.update(unit="img/s", ours=shape.batch / w2, textbook=shape.batch / w1, ratio=w1 / w2,
               labels=["W=2", "W=1"])
    return row


def line(r: dict) -> str:
    head = f"{r['case']:16s} {r['size']:5d} b{r['batch']}"
    if "skipped" in r:
        return f"{head}  skipped: {r['skipped']}"
    if "error" in r:
        return f"{head}  error: {r['error']}"
    mfu = ""
    if "mfu" in r:
        m = r["mfu"]
        mfu = ("  MFU N/A (unknown GPU peak)" if m["ours"] is None
               else f"  MFU {100 * m['ours']:.1f}% vs {100 * m['textbook']:.1f}%")
    better = "higher is better" if r["unit"] != "s/step" else "lower is better"
    a, b = r.get("labels", ["ours", "textbook"])
    return (f"{head}  {a:>4s} {r['ours']:9.3f}  {b:>8s} {r['textbook']:9.3f} {r['unit']:6s} "
            f"({better}) x{r['ratio']:.2f}{mfu}")


def table(rows: list[dict], gpu: str) -> str:
    out = [f"speed on {gpu}: ours (trainer.api.run_job) vs the textbook loop; x = ours' speed-up "
           "(the W row: ours on 2 GPUs vs ours on 1, same global batch)",
           f"{'case':16s} {'size':>5s} batch  figures"]
    out += [line(r) for r in rows]
    return "\n".join(out)
