"""SDXL through the families table: training from YAML, its LoRA in diffusers' SDXL pipeline (every module
applied), time ids from the data pipeline, resume, the warm cache, single-file checkpoints in the original
layout, shipped configs and the offline CLIP tokenizer, and the bad inputs of model families."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, write_config
from tests.ldm_single_file import write_single_file
from tests.test_resume import kill_foreground_after, loss_rows, train_foreground

PREFIXES = ("lora_unet", "lora_te1", "lora_te2")


def sdxl_config(folder: Path, assets: dict, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_config(folder, assets, **{"base_model": str(assets["sdxl_model"]), **fields})


def kohya_modules(tensors: dict, prefix: str) -> set[str]:
    return {k.rsplit(".", 2)[0] for k in tensors if k.startswith(prefix + "_") and k.endswith(".lora_down.weight")}


def lora_layers(model: torch.nn.Module) -> int:
    """Modules that carry a LoRA adapter after diffusers' load_lora_weights (peft tuner layers)."""
    return sum(1 for _, m in model.named_modules() if len(getattr(m, "lora_A", None) or {}) > 0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, assets) -> Path:
    """A tiny SDXL LoRA on the UNet and both text encoders (their own learning rate), from YAML."""
    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    folder = tmp_path_factory.mktemp("sdxl")
    path = sdxl_config(folder, assets, train_text_encoder=True, text_encoder_lr="5e-3", max_train_steps=6)
    result = LoraTrainingJob(preflight(path)).run()
    assert result.outcome == "succeeded"
    return result.lora_path


def test_family_is_detected_and_its_defaults_filled(assets, tmp_path):
    from trainer.checks.preflight import preflight

    path = sdxl_config(tmp_path, assets, resolution=None)
    cfg = preflight(path).config
    assert (cfg.model_family, cfg.mode, cfg.resolution) == ("sdxl", "image", 1024)
    assert cfg.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_lora_loads_in_the_sdxl_pipeline_with_every_module_applied(trained, assets):
    from diffusers import StableDiffusionXLPipeline

    from trainer.families.lora_io import read_lora_file

    tensors, meta = read_lora_file(trained)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    modules = {p: kohya_modules(tensors, p) for p in PREFIXES}
    assert all(modules.values()), {p: len(m) for p, m in modules.items()}
    # A1111/ComfyUI names: the CLIP module tree from text_model down, for both encoders.
    assert all(m.startswith(("lora_te1_text_model_encoder_", "lora_te2_text_model_encoder_"))
               for p in PREFIXES[1:] for m in modules[p])

    pipe = StableDiffusionXLPipeline.from_pretrained(assets["sdxl_model"])
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a red circle on white background", num_inference_steps=2, height=32, width=32,
                    generator=torch.Generator().manual_seed(0), output_type="np").images[0]

    before = render()
    pipe.load_lora_weights(str(trained))
    applied = {"lora_unet": lora_layers(pipe.unet), "lora_te1": lora_layers(pipe.text_encoder),
               "lora_te2": lora_layers(pipe.text_encoder_2)}
    assert applied == {p: len(m) for p, m in modules.items()}  # none dropped silently
    with_lora = render()
    pipe.unload_lora_weights()
    after = render()
    assert abs(with_lora - before).max() > 1e-4
    assert abs(after - before).max() < 1e-6


def test_text_encoders_have_their_own_learning_rate(assets, tmp_path):
    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    job = LoraTrainingJob(preflight(sdxl_config(tmp_path, assets, train_text_encoder=True, learning_rate="2e-3",
                                                text_encoder_lr="1e-4")))
    job.setup()
    try:
        groups = job.optimizer.param_groups
        assert [g["lr"] for g in groups] == [pytest.approx(2e-3), pytest.approx(1e-4)]
        te_params = {id(p) for m in (job.task.base.text_encoder, job.task.base.text_encoder_2)
                     for p in m.parameters() if p.requires_grad}
        assert {id(p) for p in groups[1]["params"]} == te_params and len(te_params) > 0
    finally:
        job.cleanup()


def test_time_ids_are_what_the_data_pipeline_did(assets, tmp_path):
    """A 64x48 (w x h) image at resolution 32, center crop: original (48, 64), resized to 43x32, cropped
    at left 5: time_ids (48, 64, 0, 5, 32, 32) reach the UNet."""
    from PIL import Image

    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(data / "wide.png")
    (data / "wide.txt").write_text("a red square")
    path = sdxl_config(tmp_path, assets, train_data_dir=str(data), metadata_path=None, batch_size=1,
                       cache_latents=False)
    job = LoraTrainingJob(preflight(path))
    job.setup()
    seen = []
    hook = job.task.base.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist()), with_kwargs=True)
    try:
        job.task.loss([0], job.dataset, [torch.Generator().manual_seed(0)], job.autocast)
    finally:
        hook.remove()
        job.cleanup()
    assert seen == [[[48.0, 64.0, 0.0, 5.0, 32.0, 32.0]]]


def test_resume_after_sigkill_is_bit_identical(assets, tmp_path):
    fields = dict(max_train_steps=6, save_steps=2, keep_checkpoints=5, seed=5, cache_latents=False)
    reference = sdxl_config(tmp_path / "ref", assets, **fields)
    assert train_foreground(reference).returncode == 0
    killed = sdxl_config(tmp_path / "killed", assets, **fields)
    kill_foreground_after(killed, 5)
    resumed = train_foreground(killed)
    assert resumed.returncode == 0 and "resumed from step 4" in resumed.stdout, resumed.stdout + resumed.stderr
    from safetensors.torch import load_file

    a, b = (load_file(str(c.parent / "out/out.safetensors")) for c in (reference, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in loss_rows(reference)] == [r["loss"] for r in loss_rows(killed)]


def test_warm_cache_serves_an_sdxl_base_and_gives_the_same_lora(assets, tmp_path):
    from safetensors.torch import load_file

    from trainer.training.job import LoraTrainingJob
    from trainer.training.model_cache import BaseModelCache
    from trainer.checks.preflight import preflight

    cache = BaseModelCache(1)
    outs = []
    for name in ("cold", "warm"):
        path = sdxl_config(tmp_path / name, assets, train_text_encoder=True, max_train_steps=3)
        outs.append(LoraTrainingJob(preflight(path), base_cache=cache).run().lora_path)
    assert cache.hits == 1 and cache.misses == 1
    a, b = (load_file(str(p)) for p in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (key,) = cache.keys()
    base, how, _ = cache.get(key, lambda: None)
    assert how == "device"
    for m in (base.unet, base.text_encoder, base.text_encoder_2):
        assert not [n for n, _ in m.named_parameters() if "lora" in n] and not m.training


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_in_the_original_layout_round_trips_and_trains(family, assets, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    folder = assets["sd_model" if family == "sd" else "sdxl_model"]
    cls = StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline
    extra = dict(safety_checker=None, requires_safety_checker=False) if family == "sd" else {}
    pipe = cls.from_pretrained(folder, **extra)
    single = write_single_file(pipe, tmp_path / "model.safetensors")
    back = cls.from_single_file(str(single), config=str(folder), local_files_only=True, **extra)
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for comp in components:
        want, got = getattr(pipe, comp).state_dict(), getattr(back, comp).state_dict()
        assert want.keys() == got.keys(), comp
        assert all(torch.equal(want[k], got[k]) for k in want), comp

    path = write_config(tmp_path, assets, base_model=str(single), base_model_config=str(folder),
                        max_train_steps=2, train_text_encoder=True)
    checked = preflight(path)
    assert checked.config.model_family == family
    result = LoraTrainingJob(checked).run()
    assert result.outcome == "succeeded" and result.steps == 2


def test_shipped_configs_have_the_released_parameter_counts():
    from trainer.families.shipped import shipped_dir
    from trainer.checks.vram import model_param_counts

    sdxl = model_param_counts(shipped_dir("sdxl-base"), "sdxl")
    assert sdxl == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                    "text_encoder_2": 694_659_840}
    sd15 = model_param_counts(shipped_dir("sd15"), "sd")
    assert sd15 == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


def test_clip_tokenizer_is_built_offline_from_open_clips_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    from trainer.families.shipped import materialize

    folder = materialize("sdxl-base", cache=tmp_path)
    for sub, pad_id in (("tokenizer", 49407), ("tokenizer_2", 0)):
        tok = CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True)
        assert len(tok) == 49408 and tok.pad_token_id == pad_id
        # The ids every CLIP tokenizer gives (openai/clip-vit-large-patch14).
        assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert materialize("sdxl-base", cache=tmp_path) == folder  # built once


def sdxl_signature_file(path: Path) -> Path:
    """A file with SDXL's single-file key signature and no real weights (what `validate` reads)."""
    from safetensors.torch import save_file

    save_file({"conditioner.embedders.1.model.positional_embedding": torch.zeros(2, 2),
               "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(2, 2),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 4, 1, 1)}, str(path))
    return path


def test_validate_estimates_an_sdxl_single_file_from_the_shipped_config(assets, tmp_path):
    ckpt = sdxl_signature_file(tmp_path / "sdxl_base.safetensors")
    path = write_config(tmp_path, assets, base_model=str(ckpt), resolution=1024, batch_size=4,
                        mixed_precision="bf16", gradient_checkpointing=True)
    proc = subprocess.run([str(BIN / "agentd"), "validate", str(path), "--vram", "24GiB", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    est = report["estimate"]
    assert report["model_family"] == "sdxl" and est["family"] == "sdxl"
    assert est["params"]["frozen_unet"] == 2_567_463_684 and est["params"]["frozen_text_encoder_2"] == 694_659_840
    assert 7 * 1024 < est["total_mib"] < 40 * 1024
    (target,) = report["targets"]
    assert target["recommended_batch_size"] is not None and 1 <= target["recommended_batch_size"] <= 4


def _bad(case: str, folder: Path, assets: dict) -> dict:
    """The config fields (and files) of one bad-input case."""
    if case == "unsupported pipeline class":
        model = folder / "sd3"
        model.mkdir()
        (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
        return {"base_model": str(model)}
    if case == "inpainting UNet":
        model = folder / "inpaint"
        shutil.copytree(assets["sd_model"], model)
        unet = json.loads((model / "unet/config.json").read_text())
        (model / "unet/config.json").write_text(json.dumps({**unet, "in_channels": 9}))
        return {"base_model": str(model)}
    if case == "model_family contradicts the files":
        return {"base_model": str(assets["sdxl_model"]), "model_family": "sd"}
    if case == "unknown model_family":
        return {"model_family": "flux2"}
    if case == "SDXL single file with an SD1.5 base_model_config":
        return {"base_model": str(sdxl_signature_file(folder / "xl.safetensors")),
                "base_model_config": str(assets["sd_model"])}
    if case == "train_text_encoder on a causal LM":
        text = folder / "text"
        shutil.copytree(assets["text_data"], text)
        return {"base_model": str(assets["llm_model"]), "train_data_dir": str(text), "metadata_path": None,
                "train_text_encoder": True}
    if case == "resolution off the latent grid":
        return {"base_model": str(assets["sdxl_model"]), "resolution": 40}
    if case == "a LoRA for another family":
        from safetensors.torch import save_file

        lora = folder / "sd15_lora.safetensors"
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(lora),
                  metadata={"ss_base_model_version": "sd_v1"})
        return {"base_model": str(assets["sdxl_model"]), "init_lora_weights": str(lora)}
    raise AssertionError(case)


BAD = [
    ("unsupported pipeline class", "base_model", ["_class_name: a pipeline class agentd does not train",
                                                  "sdxl (Stable Diffusion XL)"]),  # never a string of the file
    ("inpainting UNet", "base_model", ["9 input channels", "no supported model family"]),
    ("model_family contradicts the files", "model_family", ["says sd", "a sdxl model"]),
    ("unknown model_family", "model_family", ["not a supported model family", "causal_lm"]),
    ("SDXL single file with an SD1.5 base_model_config", "base_model_config",
     ["_class_name: StableDiffusionPipeline)", "Stable Diffusion XL checkpoint"]),
    ("train_text_encoder on a causal LM", "train_text_encoder", ["no separate text encoder"]),
    ("resolution off the latent grid", "resolution", ["multiple of 16", "use 32 or 48"]),
    ("a LoRA for another family", "init_lora_weights", ["LoRA for sd", "sdxl model"]),
]


@pytest.mark.parametrize("case,field,words", BAD, ids=[b[0] for b in BAD])
def test_bad_family_inputs_exit_2_and_write_nothing(case, field, words, assets, tmp_path):
    fields = _bad(case, tmp_path, assets)
    path = write_config(tmp_path, assets, **fields)
    before = sorted(tmp_path.rglob("*"))
    proc = subprocess.run([str(BIN / "lora-train"), "validate", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{field}:" in proc.stderr and "fix:" in proc.stderr, proc.stderr
    for w in words:
        assert w in proc.stderr, (w, proc.stderr)
    assert sorted(tmp_path.rglob("*")) == before and not (tmp_path / "out").exists()


def test_v_prediction_and_zero_terminal_snr_come_from_the_scheduler(assets, tmp_path):
    from trainer.families.sdxl_task import load_sdxl_base
    from trainer.checks.preflight import preflight

    model = tmp_path / "vpred"
    shutil.copytree(assets["sdxl_model"], model)
    sched = model / "scheduler/scheduler_config.json"
    cfg = json.loads(sched.read_text())
    sched.write_text(json.dumps({**cfg, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    checked = preflight(sdxl_config(tmp_path, assets, base_model=str(model)))
    base = load_sdxl_base(checked.config, torch.device("cpu"), torch.float32)
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(base.noise_scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR


def test_ckpt_single_files_are_detected_without_unpickling(tmp_path):
    """A .ckpt (torch zip) is read for its key names with pickletools: no code from the file runs."""
    from trainer.families import detect
    from trainer.families.probe import probe

    for keys, family in ((["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                           "model.diffusion_model.input_blocks.0.0.weight"], "sd"),
                         (["conditioner.embedders.1.model.positional_embedding",
                           "model.diffusion_model.input_blocks.0.0.weight"], "sdxl")):
        path = tmp_path / f"{family}.ckpt"
        torch.save({"state_dict": {k: torch.zeros(1) for k in keys}}, str(path))
        assert detect(probe(path)) == family


def test_preflight_of_an_sdxl_config_imports_no_torch(assets, tmp_path):
    """`agentd run` and `validate`-level questions stay torch-free: detection reads headers and JSON only."""
    path = sdxl_config(tmp_path, assets)
    code = ("import sys; from trainer.checks.preflight import preflight; c = preflight(sys.argv[1]).config; "
            "print(c.model_family, 'torch' in sys.modules)")
    proc = subprocess.run([str(BIN / "python"), "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["sdxl", "False"]


def test_samples_render_with_the_sdxl_pipeline(assets, tmp_path):
    from PIL import Image

    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    path = sdxl_config(tmp_path, assets, max_train_steps=1, sample_prompts=["a blue circle --s 2"])
    result = LoraTrainingJob(preflight(path)).run()
    pngs = sorted((result.output_dir / "samples").rglob("*.png"))
    assert pngs, list(result.output_dir.rglob("*"))
    with Image.open(pngs[-1]) as im:
        assert im.size == (32, 32)


@pytest.mark.parametrize("name,family", [("sd15", "sd"), ("sd2-512", "sd"), ("sd2-768-v", "sd"),
                                         ("sdxl-base", "sdxl")])
def test_every_shipped_config_is_detected_and_builds(name, family):
    """Each shipped config folder is of its family, builds on the meta device, and says its prediction type."""
    from trainer.families import detect
    from trainer.families.probe import probe
    from trainer.families.shipped import shipped_dir
    from trainer.checks.vram import model_param_counts

    folder = shipped_dir(name)
    assert detect(probe(folder)) == family
    counts = model_param_counts(folder, family)
    assert counts["unet"] > 800_000_000 and counts["vae"] == 83_653_863
    scheduler = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if name == "sd2-768-v" else "epsilon")
