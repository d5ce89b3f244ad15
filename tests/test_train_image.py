"""The image LoRA trainer end to end on the tiny model: it learns, its outputs load, it continues a LoRA."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.conftest import BIN, lora_at_step_zero, write_config
from trainer.checks.preflight import preflight

# The tests share one in-process run (`trained`: its result and events): keep them on one xdist worker so
# it is trained once.
pytestmark = pytest.mark.xdist_group("train-image")


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One 60-step seeded run shared by the tests below."""
    from trainer.training.job import LoraTrainingJob

    folder = tmp_path_factory.mktemp("trained")
    path = write_config(folder, assets, max_train_steps=60, save_steps=20, keep_checkpoints=2, log_every=10,
                        name="shapes")
    events = []

    class Collect:
        def emit(self, ev):
            events.append(ev)

    result = LoraTrainingJob(preflight(path), Collect()).run()
    return result, events, folder / "out"


def test_sixty_steps_learn(trained):
    from trainer.runs.outputs import read_loss_csv

    result, events, out = trained
    assert result.outcome == "succeeded" and result.steps == 60
    losses = [float(r["loss"]) for r in read_loss_csv(out / "logs/loss.csv")]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_outputs_layout_and_provenance(trained):
    from safetensors import safe_open

    result, events, out = trained
    lora = out / "shapes.safetensors"
    assert result.lora_path == lora
    with safe_open(str(lora), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0" and meta["ss_steps"] == "60"
    # Checkpoints at 20, 40, 60; two kept.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000040", "step-00000060"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "succeeded" and run["final_loss"] == pytest.approx(result.final_loss)
    assert run["config"]["learning_rate"] == pytest.approx(2e-3) and len(run["training_hash"]) == 16
    assert run["dataset"]["samples"] == 24 and run["versions"]["torch"] and run["device"]["type"] == "cpu"
    assert (out / "config.yaml").exists() and (out / "logs/summary.csv").read_text().startswith("final_loss,")
    lines = (out / "logs/events.jsonl").read_text().splitlines()
    types = [json.loads(x)["type"] for x in lines]
    assert types.count("step") == 60 and types[-1] == "finished" and "checkpoint" in types
    # No temporary files left behind anywhere.
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # Console cadence: step events marked logged every log_every (10) steps.
    assert [e["step"] for e in events if e["type"] == "step" and e["logged"]] == [10, 20, 30, 40, 50, 60]


def test_lora_loads_into_diffusers_pipeline_and_unloads(trained, assets):
    from diffusers import StableDiffusionPipeline

    _, _, out = trained
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd_model"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a red circle on white background", num_inference_steps=3, height=32, width=32,
                     output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = render()
    pipe.load_lora_weights(str(out / "shapes.safetensors"))
    with_lora = render()
    pipe.unload_lora_weights()
    after = render()
    assert abs(with_lora - before).max() > 1e-3
    assert abs(after - before).max() < 1e-6


def test_init_lora_weights_continues_from_file(trained, assets, tmp_path):
    from trainer.families.lora_io import read_lora_file

    _, _, out = trained
    path = write_config(tmp_path, assets, init_lora_weights=str(out / "shapes.safetensors"), seed=99)
    at_step0 = lora_at_step_zero(path)
    saved, _ = read_lora_file(out / "shapes.safetensors")
    assert at_step0.keys() == saved.keys()
    assert all(torch.equal(at_step0[k], saved[k]) for k in saved)


def test_init_lora_with_other_rank_is_a_clear_error(trained, assets, tmp_path):
    from trainer.training.job import LoraTrainingJob
    from trainer.families.lora_io import LoraFormatError

    _, _, out = trained
    path = write_config(tmp_path, assets, init_lora_weights=str(out / "shapes.safetensors"), lora_rank=8)
    with pytest.raises(LoraFormatError, match="set lora_rank: 4"):
        LoraTrainingJob(preflight(path)).run()


def test_text_encoder_lora_and_plain_console(assets, tmp_path):
    """lora-train in a subprocess (stdout not a TTY): one plain line per logged step, then the outcome."""
    path = write_config(tmp_path, assets, train_text_encoder=True, max_train_steps=4, log_every=2,
                        cache_latents=False, random_flip=True, lr_scheduler="cosine", lr_warmup_steps=1,
                        gradient_accumulation_steps=2, batch_size=2)
    proc = subprocess.run([str(BIN / "lora-train"), "--config", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/4", "4/4"]
    assert "loss" in steps[0] and "it/s" in steps[0] and "ETA" in steps[0] and "lr" in steps[0]
    assert lines[-1].startswith("succeeded")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out/out.safetensors"), framework="pt") as f:
        assert any(k.startswith("lora_te_") for k in f.keys())


def test_v_prediction_scheduler_trains_against_velocity(assets, tmp_path):
    """A base whose scheduler says prediction_type: v_prediction (SD 2.x-768 style) is trained on velocity."""
    import shutil

    from trainer.training.job import LoraTrainingJob

    vmodel = tmp_path / "vmodel"
    shutil.copytree(assets["sd_model"], vmodel)
    sched = vmodel / "scheduler/scheduler_config.json"
    sched.write_text(sched.read_text().replace('"epsilon"', '"v_prediction"'))
    losses = {}
    for name, model in (("eps", assets["sd_model"]), ("v", vmodel)):
        (tmp_path / name).mkdir()
        result = LoraTrainingJob(preflight(write_config(tmp_path / name, assets, base_model=str(model),
                                                        max_train_steps=2))).run()
        losses[name] = result.final_loss
    # Same seed, data and weights: only the target differs.
    assert losses["eps"] != losses["v"]


def test_a_half_precision_folder_is_placed_in_the_jobs_dtype(assets):
    """A diffusers folder saved in fp16/bf16 and trained with `mixed_precision: no`: the UNet and text encoder
    compute in fp32 and the VAE is fp32 (they kept the folder's dtype: "expected m1 and m2 to have the same
    dtype (BFloat16 != float)" inside the UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from trainer.families.sd_task import freeze_and_place

    path = assets["sd_model"]
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.bfloat16)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=torch.bfloat16)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float16)
    freeze_and_place([unet, text_encoder], vae, torch.device("cpu"), torch.float32)
    assert {p.dtype for m in (unet, text_encoder, vae) for p in m.parameters()} == {torch.float32}
    latents = torch.zeros(1, unet.config.in_channels, 8, 8)
    hidden = text_encoder(torch.tensor([[0, 1, 2]]))[0]
    assert unet(latents, 1, hidden).sample.dtype == torch.float32
    freeze_and_place([unet, text_encoder], vae, torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in vae.parameters()} == {torch.float32}
