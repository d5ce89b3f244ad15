"""Flux (FLUX.1 dev/schnell) through the family interface: a tiny Flux pipeline built offline trains from
YAML, resumes bit-identically after SIGKILL, reuses a warm base, writes a LoRA that diffusers'
FluxPipeline applies to every module (and ComfyUI's key map covers), on an fp8 base whose layers match
full precision; bad inputs exit 2 with nothing written; the estimate counts the real FLUX.1 [dev]."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import BIN
from tests.test_resume import kill_foreground_after, loss_rows, train_foreground
from trainer.errors import ConfigError
from trainer.checks.preflight import preflight

STEPS, SAVE = 8, 3


@pytest.fixture(scope="module")
def flux_assets(assets, built_once) -> dict[str, Path]:
    """Tiny FLUX.1 [dev] and [schnell] pipelines (built offline, once for the session) and the shapes dataset."""
    from trainer.dev.tiny import build_tiny_flux

    def build(root: Path) -> None:
        build_tiny_flux(root / "flux-dev")
        build_tiny_flux(root / "flux-schnell", variant="schnell")

    root = built_once("flux-models", build)
    return {"dev": root / "flux-dev", "schnell": root / "flux-schnell", "shapes": assets["shapes"]}


def flux_config(folder: Path, fa: dict, variant: str = "dev", **fields) -> Path:
    """A small Flux config (tiny model at 32 px, 16 T5 tokens) with `fields` overriding."""
    folder.mkdir(parents=True, exist_ok=True)
    base = {"train_data_dir": str(fa["shapes"]), "metadata_path": str(fa["shapes"] / "metadata.csv"),
            "base_model": str(fa[variant]), "resolution": 32, "lora_rank": 4, "batch_size": 2,
            "learning_rate": "2e-3", "max_train_steps": STEPS, "save_steps": SAVE, "max_sequence_length": 16,
            "seed": 5, "output_dir": str(folder / "out")}
    base.update(fields)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}, sort_keys=False))
    return path


def read_lora(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


@pytest.fixture(scope="module")
def reference(flux_assets, built_once) -> Path:
    """An uninterrupted `lora-train` run from YAML (the family's defaults: bf16 autocast, fp8 base,
    cached text embeddings) with a sample prompt; trained once for the session (the tests only read it)."""
    def build(folder: Path) -> None:
        cfg = flux_config(folder / "ref", flux_assets,
                          sample_prompts=["a red circle on white background --w 32 --h 32 --s 2 --l 3.5"])
        proc = train_foreground(cfg)
        assert proc.returncode == 0, proc.stderr + proc.stdout

    return built_once("flux-reference", build) / "ref" / "train.yaml"


def test_trains_from_yaml_with_the_family_defaults(reference):
    out = reference.parent / "out"
    assert [int(r["step"]) for r in loss_rows(reference)] == list(range(1, STEPS + 1))
    resolved = yaml.safe_load((out / "config.yaml").read_text())  # the config that made it, defaults filled in
    assert resolved["model_family"] == "flux" and resolved["mixed_precision"] == "bf16"
    assert resolved["quantization"] == "fp8" and resolved["guidance_scale"] == 1.0
    assert resolved["timestep_density"] == "logit_normal" and resolved["target_modules"][:3] == ["to_q", "to_k", "to_v"]
    tensors, meta = read_lora(out / "out.safetensors")
    assert meta["agentd_model_family"] == "flux" and meta["agentd_flux_variant"] == "dev"
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    # 2 double blocks x 8 projections + 2 single blocks x 3 (q, k, v: single blocks have no to_out).
    modules = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_A.weight")}
    assert len(modules) == 2 * 8 + 2 * 3
    assert all(k.startswith("transformer.") for k in tensors)
    assert all(tensors[f"{m}.alpha"].item() == 4.0 for m in modules)
    assert (out / "samples" / "grid.png").exists() and list((out / "samples").glob("step-*/00.png"))


def test_sigkill_and_rerun_is_bit_identical(reference, flux_assets, tmp_path):
    cfg = flux_config(tmp_path / "killed", flux_assets,
                      sample_prompts=["a red circle on white background --w 32 --h 32 --s 2 --l 3.5"])
    kill_foreground_after(cfg, 5)  # after the checkpoint at step 3
    again = train_foreground(cfg)
    assert again.returncode == 0, again.stderr
    assert "resumed from step 3" in again.stdout
    a, _ = read_lora(reference.parent / "out/out.safetensors")
    b, _ = read_lora(cfg.parent / "out/out.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final LoRA tensors differ"
    assert [r["loss"] for r in loss_rows(reference)] == [r["loss"] for r in loss_rows(cfg)]


def test_warm_base_gives_the_same_lora_as_a_cold_one(reference, flux_assets, tmp_path):
    """Two jobs on one BaseModelCache: the second gets the base warm (LoRA removed, text encoders back in host
    memory, fp8 blocks as loaded) and trains exactly what a cold run trains. Both keep their text embeddings
    in the disk cache too: the second job reads them (same numbers as encoding them)."""
    from trainer.training.job import LoraTrainingJob
    from trainer.training.model_cache import BaseModelCache

    cache = BaseModelCache()
    results = []
    for name in ("first", "second"):
        cfg = flux_config(tmp_path / name, flux_assets, sample_prompts=[
            "a red circle on white background --w 32 --h 32 --s 2 --l 3.5"],
            cache_text_embeddings_to_disk=True, cache_dir=str(tmp_path / "disk-cache"))
        job = LoraTrainingJob(preflight(cfg), base_cache=cache)
        results.append((job.run(), job.warm))
        entries = sorted((tmp_path / "disk-cache" / "text").rglob("*.safetensors"))
        assert len(entries) == 12  # the 12 distinct captions (the sample prompt is one of them), first job
    assert [warm for _, warm in results] == ["cold", "device"]
    cold, _ = read_lora(reference.parent / "out/out.safetensors")
    for result, _ in results:
        warm, _ = read_lora(result.lora_path)
        assert all(torch.equal(cold[k], warm[k]) for k in cold)


def test_lora_loads_in_flux_pipeline_on_every_module_and_unloads(flux_assets, tmp_path):
    from diffusers import FluxPipeline
    from peft.tuners.lora import LoraLayer

    from trainer.training.job import LoraTrainingJob

    cfg = flux_config(tmp_path / "strong", flux_assets, learning_rate="3e-2", max_train_steps=4,
                      mixed_precision="no", target_modules=["all-linear"], train_text_encoder=True)
    result = LoraTrainingJob(preflight(cfg)).run()
    tensors, meta = read_lora(result.lora_path)
    stems = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_A.weight")}
    trained = {k[len("transformer."):] for k in stems if k.startswith("transformer.")}
    trained_clip = {k[len("text_encoder."):] for k in stems if k.startswith("text_encoder.")}
    assert len(trained_clip) == 2 * 4 and meta["ss_network_train_unet_only"] == "False"  # CLIP-L: 2 layers x q/k/v/out

    pipe = FluxPipeline.from_pretrained(flux_assets["dev"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a red circle on white background", num_inference_steps=2, height=32, width=32,
                    guidance_scale=3.5, max_sequence_length=16, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipe.load_lora_weights(str(result.lora_path))
    applied = {n for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLayer)}
    assert applied == trained and len(applied) == 2 * 14 + 2 * 6 + 1  # all-linear: every block Linear + proj_out
    applied_clip = {n for n, m in pipe.text_encoder.named_modules() if isinstance(m, LoraLayer)}
    assert {"text_model." + n if not n.startswith("text_model.") else n for n in applied_clip} == trained_clip
    # ComfyUI's CLIP-L key map: text_encoder.text_model.encoder.layers.N.(self_attn.q/k/v/out_proj|mlp.fc1/fc2)
    assert all(re.fullmatch(r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])", m)
               for m in trained_clip)
    assert not any(isinstance(m, LoraLayer) for m in pipe.text_encoder_2.modules())  # T5: never
    with_lora = render()
    pipe.unload_lora_weights()
    after = render()
    assert abs(with_lora - before).max() > 1e-3
    assert abs(after - before).max() < 1e-6


def comfyui_flux_lora_keys(n_double: int, n_single: int) -> set[str]:
    """The LoRA key stems ComfyUI maps onto its (BFL-layout) Flux model for a diffusers-named file: every
    Linear of diffusers' FluxTransformer2DModel under `transformer.` (comfy/lora.py model_lora_keys_unet with
    comfy.utils.flux_to_diffusers, which maps q/k/v into slices of the fused qkv and linear1 weights)."""
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
              "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj",
              "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out"]
    basic = ["proj_out", "x_embedder", "context_embedder", "norm_out.linear",
             "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
             "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
             "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2"]
    keys = {f"transformer.transformer_blocks.{i}.{m}" for i in range(n_double) for m in double}
    keys |= {f"transformer.single_transformer_blocks.{i}.{m}" for i in range(n_single) for m in single}
    return keys | {f"transformer.{m}" for m in basic}


def test_lora_keys_are_the_layout_comfyui_reads(reference):
    tensors, _ = read_lora(reference.parent / "out/out.safetensors")
    known = comfyui_flux_lora_keys(2, 2)
    for key in tensors:  # ComfyUI reads <stem>.lora_A.weight / .lora_B.weight (diffusers) and <stem>.alpha
        stem, _, suffix = key.rpartition(".lora_") if ".lora_" in key else (key.rsplit(".", 1)[0], "", "alpha")
        assert stem in known, key
        assert suffix in ("A.weight", "B.weight", "alpha"), key
        assert tensors[key].dtype == torch.float32


def test_fp8_layer_matches_full_precision_within_tolerance():
    """fp8 e4m3 keeps 3 mantissa bits (relative rounding <= 2**-4 per weight); over a dot product the errors
    average out. Stated tolerance: 5% relative error (L2) of a layer's outputs and input gradients; the whole
    tiny transformer's output within 10%."""
    from trainer.families.fp8 import FP8, Fp8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    q = Fp8Linear(linear)
    assert q.weight.dtype == FP8 and q.weight.element_size() == 1 and not q.weight.requires_grad
    x = torch.randn(16, 256, requires_grad=True)
    y_ref, y = linear(x), q(x)
    assert ((y - y_ref).norm() / y_ref.norm()).item() < 0.05
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    (g,) = torch.autograd.grad(q(x).square().sum(), x)
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x).dtype == torch.bfloat16


def test_fp8_transformer_output_and_training_with_the_8bit_base(flux_assets, tmp_path):
    import copy

    from diffusers import FluxTransformer2DModel

    from trainer.families.fp8 import FP8, quantize_linears
    from trainer.training.job import LoraTrainingJob
    from trainer.runs.outputs import read_loss_csv

    full = FluxTransformer2DModel.from_pretrained(flux_assets["dev"], subfolder="transformer", local_files_only=True)
    quant = copy.deepcopy(full)
    n = quantize_linears(quant, lambda name: name.startswith(("transformer_blocks.", "single_transformer_blocks.")))
    assert n == sum(m.weight.numel() for name, m in full.named_modules()
                    if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_")))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]), return_dict=False)
    with torch.no_grad():
        ref, out = full(**inputs)[0], quant(**inputs)[0]
    assert ((out - ref).norm() / ref.norm()).item() < 0.10

    cfg = flux_config(tmp_path / "fp8", flux_assets, mixed_precision="no", quantization="fp8", lora_rank=8,
                      batch_size=4, learning_rate="1e-2", max_train_steps=30, save_steps=30,
                      timestep_density="uniform", cache_latents=True)
    job = LoraTrainingJob(preflight(cfg))
    job.setup()
    blocks = job.task.base.transformer.transformer_blocks[0].attn.to_q
    assert blocks.base_layer.weight.dtype == FP8  # the 8-bit path is the one training
    assert all(p.dtype == torch.float32 for p in job.task.params)  # LoRA (and AdamW state) in fp32
    try:
        job.train()
    finally:
        job.cleanup()
    losses = [float(r["loss"]) for r in read_loss_csv(cfg.parent / "out/logs/loss.csv")]
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses


def test_schnell_trains_without_guidance_and_samples_in_few_steps(flux_assets, tmp_path):
    from trainer.training.job import LoraTrainingJob

    cfg = flux_config(tmp_path / "schnell", flux_assets, variant="schnell", max_train_steps=2, mixed_precision="no",
                      gradient_checkpointing=True, sample_prompts=["a blue square on white background --w 32 --h 32"])
    checked = preflight(cfg)
    assert checked.config.max_sequence_length == 16 and checked.config.guidance_scale is None
    job = LoraTrainingJob(checked)
    result = job.run()
    _, meta = read_lora(result.lora_path)
    assert meta["agentd_flux_variant"] == "schnell" and meta["ss_guidance_scale"] == "None"
    assert (cfg.parent / "out/samples/step-00000002/00.png").exists()
    defaults = preflight(flux_config(tmp_path / "defaults", flux_assets, variant="schnell",
                                     max_sequence_length=None)).config
    assert defaults.max_sequence_length == 256 and defaults.resolution == 32


def test_init_lora_weights_continues_from_a_flux_lora(reference, flux_assets, tmp_path):
    from tests.conftest import lora_at_step_zero

    start = reference.parent / "out/out.safetensors"
    cfg = flux_config(tmp_path / "continue", flux_assets, init_lora_weights=str(start))
    tensors, _ = read_lora(start)
    loaded = lora_at_step_zero(cfg)
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    other_rank = flux_config(tmp_path / "rank8", flux_assets, init_lora_weights=str(start), lora_rank=8)
    with pytest.raises(ValueError, match="set lora_rank: 4"):
        lora_at_step_zero(other_rank)


BAD_INPUTS = [
    ("dev", {"mixed_precision": "fp16"}, "mixed_precision", "bf16"),
    ("dev", {"train_text_encoder": True, "text_encoder_target_modules": ["q", "wi_0"]}, "text_encoder_target_modules",
     "choose CLIP-L only"),
    ("schnell", {"guidance_scale": 3.5}, "guidance_scale", "remove guidance_scale"),
    ("dev", {"target_modules": ["to_qq", "attn.to_out"]}, "target_modules", "closest are"),
    ("dev", {"max_sequence_length": 600}, "max_sequence_length", "at most 512"),
    ("dev", {"resolution": 30}, "resolution", "use 28 or 32"),
    ("dev", {"min_snr_gamma": 5}, "min_snr_gamma", "timestep_density"),
    ("dev", {"quantization": "4bit"}, "quantization", "use one of: fp8, no"),
    ("dev", {"clip_skip": 2}, "clip_skip", "or Stable Diffusion XL model"),
    ("dev", {"chat_template": "{{ messages }}"}, "chat_template", "train a causal language model"),
]


@pytest.mark.parametrize("variant,fields,field,fix", BAD_INPUTS, ids=[b[2] for b in BAD_INPUTS])
def test_bad_inputs_name_the_field_and_the_fix(variant, fields, field, fix, flux_assets, tmp_path):
    cfg = flux_config(tmp_path / "bad", flux_assets, variant=variant, **fields)
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    problems = [p for p in e.value.problems if p.field == field]
    assert problems and all(fix in p.fix or fix in p.message for p in problems), problems
    if field == "text_encoder_target_modules":  # T5's layers: never trained; CLIP-L only, or none
        assert "T5-XXL, which is never trained" in problems[0].message and "or none" in problems[0].fix
    if field == "target_modules":  # one problem per entry, each naming the closest real module names
        assert len(problems) == 2 and "'to_qq'" in problems[0].message and "to_q" in problems[0].fix
        assert "attn.to_out.0" in problems[1].fix
    assert not (cfg.parent / "out").exists()


def test_bad_config_exits_2_and_writes_nothing(flux_assets, tmp_path):
    cfg = flux_config(tmp_path / "bad", flux_assets, mixed_precision="fp16", max_sequence_length=600)
    proc = train_foreground(cfg)
    assert proc.returncode == 2
    assert "mixed_precision" in proc.stderr and "max_sequence_length" in proc.stderr  # every problem at once
    assert "fix:" in proc.stderr.lower() or "use mixed_precision: bf16" in proc.stderr
    assert not (cfg.parent / "out").exists()


def test_single_file_detection_shipped_configs_and_validate_on_a_24gib_card(flux_assets, tmp_path):
    """A BFL-layout single file (flux1-dev.safetensors' key names; tiny tensors: detection reads names only)
    is FLUX.1 [dev]; its architecture is the shipped config, so `agentd validate --vram 24GiB` estimates the
    real 11.9 B transformer and says what it assumes."""
    from safetensors.torch import save_file

    from trainer.families import flux
    from trainer.checks.vram import model_param_counts

    ckpt = tmp_path / "flux1-dev.safetensors"
    save_file({k: torch.zeros(1) for k in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                                           "guidance_in.in_layer.weight", "img_in.weight")}, str(ckpt))
    cfg = flux_config(tmp_path / "single", flux_assets, base_model=str(ckpt), base_model_config=str(flux_assets["dev"]),
                      resolution=None, max_sequence_length=None, lora_rank=16, gradient_checkpointing=True)
    checked = preflight(cfg)
    assert checked.config.model_family == "flux" and flux.variant(checked.config) == "dev"
    assert checked.config.resolution == 1024 and checked.config.max_sequence_length == 512
    counts = model_param_counts(flux.shipped_config("dev"), "flux")
    assert counts["transformer"] == 11_901_408_320  # FLUX.1 [dev]'s transformer
    assert model_param_counts(flux.shipped_config("schnell"), "flux")["transformer"] == 11_891_178_560
    assert counts["text_encoder_2"] == 4_762_310_656 and counts["text_encoder"] == 123_060_480

    proc = subprocess.run([str(BIN / "agentd"), "validate", str(cfg), "--vram", "24GiB"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "quantization fp8: 11,834,228,736 weights" in out and "gradient_checkpointing on" in out
    assert "cache_text_embeddings" in out and "leave the GPU" in out
    assert "fits as configured" in out
    as_json = subprocess.run([str(BIN / "agentd"), "validate", str(cfg), "--vram", "24GiB", "--json"],
                             capture_output=True, text=True, timeout=300)
    est = json.loads(as_json.stdout)["estimate"]
    assert 12_000 < est["total_mib"] < 24 * 1024 and est["params"]["frozen_transformer"] == 11_901_408_320

    from trainer.checks.vram import estimate_for_config

    clip = estimate_for_config(checked.config, train_text_encoder=True)  # CLIP-L's LoRA: CLIP-L stays resident
    assert clip.params["lora_text_encoder"] == 16 * 12 * 4 * (768 + 768)
    assert clip.total_mib > est["total_mib"] and "text_encoder_2 encode" in " ".join(clip.notes)
    assert "text_encoder and" not in " ".join(clip.notes)

    fill = tmp_path / "flux1-fill-dev.safetensors"  # FLUX.1 Fill: 384 input channels, not this family's inputs
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "single_blocks.0.linear1.weight": torch.zeros(1),
               "img_in.weight": torch.zeros(8, 384)}, str(fill))
    with pytest.raises(ConfigError) as e:
        preflight(flux_config(tmp_path / "fill", flux_assets, base_model=str(fill)))
    assert e.value.problems[0].field == "base_model" and "no supported model family" in e.value.problems[0].message

    no_config = flux_config(tmp_path / "noconf", flux_assets, base_model=str(ckpt))
    with pytest.raises(ConfigError) as e:
        preflight(no_config)
    assert e.value.problems[0].field == "base_model_config"
