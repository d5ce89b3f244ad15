"""Network types (issue 26): LoCon, DoRA, LoHa, LoKr on the tiny SD and SDXL, their files as the tools people
load them with read them, and every nonsensical combination refused before anything loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_config
from tests.test_train_text import write_text_config
from trainer.checks.preflight import preflight
from trainer.errors import ConfigError

# The runs are shared (`runs`): keep these tests on one xdist worker so each type is trained once.
pytestmark = pytest.mark.xdist_group("network")


def _loha_file(folder: Path) -> Path:
    from safetensors.torch import save_file

    path = folder / "loha.safetensors"
    save_file({f"lora_unet_x.{k}": torch.zeros(4, 4) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}, str(path),
              {"ss_network_module": "lycoris.kohya"})
    return path


# (case, config fields, text mode, field, words in the message, words in the fix)
BAD = [
    ("unknown type", {"network": {"type": "glora"}}, False, "network.type", "", "use one of"),
    ("conv_rank with lora", {"network": {"type": "lora", "conv_rank": 4}}, False, "network.conv_rank",
     "does not apply to network type lora", "type: locon"),
    ("dora with loha", {"network": {"type": "loha", "dora": True}}, False, "network.dora",
     "does not apply to network type loha", "lora or locon"),
    ("dora with lokr", {"network": {"type": "lokr", "dora": True}}, False, "network.dora",
     "does not apply to network type lokr", "lora or locon"),
    ("factor with locon", {"network": {"type": "locon", "factor": 4}}, False, "network.factor",
     "only to lokr", "type: lokr"),
    ("lokr factor divides no layer", {"network": {"type": "lokr", "factor": 7}}, False, "network.factor",
     "7 divides no dimension of the adapted layers (e.g. down_blocks.", "-1"),
    ("dropout with loha", {"network": {"type": "loha"}, "lora_dropout": 0.1}, False, "lora_dropout",
     "not to loha", "remove lora_dropout"),
    ("init file of another type", {"network": {"type": "lora"}, "init_lora_weights": "LOHA"}, False,
     "init_lora_weights", "is a loha network (its tensor names; lycoris.kohya), but network.type is lora",
     "type: loha"),
    ("ema decay outside (0, 1)", {"ema": {"decay": 1.0}}, False, "ema.decay", "strictly between 0 and 1",
     "0.999"),
    ("type the family cannot train", {"network": {"type": "locon"}}, True, "network.type",
     "locon cannot be trained on", "use network type lora"),
]


@pytest.mark.parametrize("case,fields,text,field,words,fix", BAD, ids=[c[0] for c in BAD])
def test_nonsensical_networks_are_refused_with_field_line_and_fix(case, fields, text, field, words, fix,
                                                                    tmp_path, assets):
    if fields.get("init_lora_weights") == "LOHA":
        fields = {**fields, "init_lora_weights": str(_loha_file(tmp_path))}
    path = (write_text_config if text else write_config)(tmp_path, assets, **fields)
    with pytest.raises(ConfigError) as e:
        preflight(path)
    problems = [p for p in e.value.problems if p.field == field]
    assert problems, e.value.render()
    p = problems[0]
    assert words in p.message and fix in p.fix, e.value.render()
    # Where: the file, and the line when the config itself is wrong (model-dependent checks name the file).
    assert str(path) in e.value.render() and (p.line is not None or field in ("network.type", "network.factor",
                                                                              "init_lora_weights"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------
# One 3-step run per type and model, shared by the assertions below.

TYPES = {"locon": {"type": "locon", "conv_rank": 2, "conv_alpha": 1}, "dora": {"type": "lora", "dora": True},
         "loha": {"type": "loha"}, "lokr": {"type": "lokr", "factor": 4}}


SD_STEPS = 6  # the tiny SD runs: checkpoints at 3 and 6, the SIGKILL test kills between them
EMA = {"decay": 0.9, "use_for": "samples"}


def run_config(folder: Path, assets, model: str, kind: str) -> Path:
    steps = SD_STEPS if model == "sd_model" else 2
    return write_config(folder, assets, base_model=str(assets[model]), network=TYPES[kind], max_train_steps=steps,
                        save_steps=3, learning_rate="1e-2", name="net", seed=5,
                        ema=EMA if model == "sd_model" else {"decay": 0.9, "use_for": "export"})


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """{(model, type): output folder} of a run of each type on the tiny SD (6 steps, EMA as a second file) and
    SDXL (2 steps, EMA in place of the raw file)."""
    from trainer.training.job import LoraTrainingJob

    out = {}
    for model in ("sd_model", "sdxl_model"):
        for kind in TYPES:
            folder = tmp_path_factory.mktemp(f"{model}-{kind}")
            result = LoraTrainingJob(preflight(run_config(folder, assets, model, kind))).run()
            assert result.outcome == "succeeded" and result.steps == (SD_STEPS if model == "sd_model" else 2)
            out[model, kind] = folder / "out"
    return out


def _file(out: Path, name: str = "net"):
    from safetensors import safe_open

    with safe_open(str(out / f"{name}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("model", ["sd_model", "sdxl_model"])
def test_each_type_trains_and_writes_lycoris_keys_and_metadata(model, runs):
    from trainer.checks.vram import estimate_for_config
    from trainer.config import load_config

    expected = {"locon": ({"lora_down.weight", "lora_up.weight", "alpha"}, {"algo": "lora", "conv_dim": "2",
                                                                            "conv_alpha": "1.0"}),
                "dora": ({"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
                         {"algo": "lora", "dora_wd": "True"}),
                "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}, {"algo": "loha"}),
                "lokr": ({"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}, {"algo": "lokr", "factor": "4", "decompose_both": "False"})}
    for kind, (suffixes, args) in expected.items():
        tensors, meta = _file(runs[model, kind])
        assert suffixes <= {k.split(".", 1)[1] for k in tensors}, kind
        assert all(k.startswith("lora_unet_") for k in tensors)
        assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == args
    for kind in TYPES:  # run.json, the report's header and the VRAM estimate count the parameters the file has
        out = runs[model, kind]
        tensors, _ = _file(out)
        count = sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha"))
        net = json.loads((out / "run.json").read_text())["network"]
        assert net["parameters"] == count and net["type"] == ("LoRA + DoRA" if kind == "dora" else kind[:2].title()
                                                              + kind[2:].title())
        assert f"{net['type']}, {count:,} parameters (EMA for " in (out / "report.html").read_text()
        estimate = estimate_for_config(load_config(out / "config.yaml"))
        assert estimate.params["lora_unet"] == count and any("ema:" in n for n in estimate.notes)
    tensors, _ = _file(runs[model, "locon"])  # SDXL's file: the EMA in place (same keys)
    convs = [k for k in tensors if "_resnets_" in k and k.endswith("conv1.lora_down.weight")]
    assert convs and all(tensors[k].shape[0] == 2 and tensors[k].dim() == 4 for k in convs)  # conv_rank 2, 3x3
    assert any("samplers_0_conv.lora_down.weight" in k for k in tensors)  # kohya's up/downsampler convolutions
    assert all(float(tensors[k.replace("lora_down.weight", "alpha")]) == 1.0 for k in convs)  # conv_alpha


def _unet_input(unet):
    g = torch.Generator().manual_seed(0)
    side = 4
    sample = torch.randn(1, unet.config.in_channels, side, side, generator=g)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return sample, ctx


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_loha_lokr_dora_files_reload_into_peft_as_the_loaders_apply_them(kind, runs, assets):
    """peft with the file loaded gives the outputs of the base with each layer's weight changed the way A1111's
    network_hada.py / network_lokr.py / network.py (alpha / dim; scale 1 without a decomposed factor) and
    ComfyUI's output-axis weight_decompose compute it from the file's tensors."""
    from diffusers import UNet2DConditionModel

    import trainer.families.lora_io as lora_io
    import trainer.families.peft_lora as peft_lora
    from trainer.config import load_config
    from trainer.families import resolved

    out = runs["sd_model", kind]
    tensors, _ = _file(out)
    cfg = resolved(load_config(out / "config.yaml"))
    load = lambda: UNet2DConditionModel.from_pretrained(assets["sd_model"], subfolder="unet").eval()  # noqa: E731
    with torch.no_grad():
        ref = load()
        modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in ref.named_modules() if n}
        layers = {k.split(".", 1)[0] for k in tensors}
        for key in layers:
            w = modules[key].weight
            t = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(key + ".")}
            delta, dim = _delta(t, w.shape)
            scale = float(t["alpha"]) / dim if dim else 1.0
            merged = w + scale * delta.reshape(w.shape)
            if "dora_scale" in t:  # peft's and LyCORIS's wd_on_out: the merged weight's norm per output channel
                norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(t["dora_scale"].shape)
                merged = merged * (t["dora_scale"] / norm)
            w.copy_(merged)
        live = load()
        peft_lora.inject(live, cfg, cfg.target_modules)
        lora_io.load_kohya({"unet": live}, tensors, "test")
        sample, ctx = _unet_input(ref)
        a = ref(sample, 10, encoder_hidden_states=ctx).sample
        b = live(sample, 10, encoder_hidden_states=ctx).sample
        base = load()(sample, 10, encoder_hidden_states=ctx).sample
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, diff  # measured: about 1e-6 (fp32 rounding)
    assert (a - base).abs().max().item() > 100 * max(diff, 1e-7)  # the network changes the output


def _delta(t: dict, shape) -> tuple[torch.Tensor, int | None]:
    """The layer's weight change from its file tensors and the rank alpha divides by (None: unscaled), as
    A1111's network_lora/network_hada/network_lokr compute them."""
    if "hada_w1_a" in t:
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]), t["hada_w1_b"].shape[0]
    if "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        dim = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
        if len(shape) == 4 and w2.dim() == 2:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2), dim
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    return up.flatten(1) @ down.flatten(1), down.shape[0]


@pytest.mark.parametrize("kind", ["locon", "dora"])
def test_diffusers_load_lora_weights_applies_locon_and_dora_files(kind, runs, assets):
    """diffusers' StableDiffusionPipeline.load_lora_weights reads the kohya keys (conv layers included); it drops
    a DoRA file's dora_scale (diffusers 0.42 lora_pipeline.py: "not compatible in Diffusers at the moment") and
    applies its low-rank part; unload restores the base."""
    from diffusers import StableDiffusionPipeline

    out = runs["sd_model", kind]
    tensors, _ = _file(out)
    pipe = StableDiffusionPipeline.from_pretrained(assets["sd_model"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    render = lambda: pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",  # noqa: E731
                          generator=torch.Generator().manual_seed(1)).images[0]
    before = render()
    pipe.load_lora_weights(str(out), weight_name="net.safetensors")
    applied = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A.default_0"))
    assert applied == sum(1 for k in tensors if k.endswith(".lora_down.weight"))
    if kind == "locon":
        assert any("resnets" in n and n.endswith("conv1.lora_A.default_0") for n, _ in pipe.unet.named_modules())
    after = render()
    assert abs(after - before).max() > 1e-3
    pipe.unload_lora_weights()
    assert abs(render() - before).max() == 0


def test_ema_is_exported_beside_or_in_place_of_the_raw_network(runs):
    raw, _ = _file(runs["sd_model", "loha"])
    ema, meta = _file(runs["sd_model", "loha"], "net-ema")
    assert raw.keys() == ema.keys() and meta["ss_network_module"] == "lycoris.kohya"
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # an average lags the trained weights
    assert not (runs["sdxl_model", "loha"] / "net-ema.safetensors").exists()  # use_for: export, in place


def _run_job(path: str) -> None:
    from trainer.training.job import LoraTrainingJob

    LoraTrainingJob(preflight(path)).run()


@pytest.mark.parametrize("kind", list(TYPES))
def test_sigkill_mid_run_then_rerun_is_bit_identical_with_ema(kind, runs, assets, tmp_path):
    """A job process SIGKILLed after its step-3 checkpoint, then run again: the network, its EMA (the -ema file)
    and every loss equal the uninterrupted run's. The job runs in a forked process (already imported: no
    interpreter start-up to pay for) and is killed with a real signal."""
    import multiprocessing
    import os
    import signal
    import time

    from trainer.runs.outputs import read_loss_csv

    path = run_config(tmp_path, assets, "sd_model", kind)
    loss = tmp_path / "out/logs/loss.csv"
    child = multiprocessing.get_context("fork").Process(target=_run_job, args=(str(path),))
    child.start()
    deadline = time.monotonic() + 120
    while not (loss.exists() and len(loss.read_text().splitlines()) > 4):  # header + 4 steps: past step 3's save
        assert child.is_alive() and time.monotonic() < deadline, "the job ended before it could be killed"
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL and not (tmp_path / "out/net.safetensors").exists()
    _run_job(str(path))
    ref = runs["sd_model", kind]
    for name in ("net", "net-ema"):
        a, b = _file(ref, name)[0], _file(tmp_path / "out", name)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows = read_loss_csv(loss)
    assert [int(r["step"]) for r in rows] == list(range(1, SD_STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_loss_csv(ref / "logs/loss.csv")]


@pytest.mark.parametrize("net", [{"type": "loha"}, {"type": "lokr", "factor": 4}, {"type": "lora", "dora": True}],
                         ids=["loha", "lokr", "dora"])
def test_text_mode_peft_folder_and_merged_export_per_type(net, assets, tmp_path):
    """Text mode: each type's PEFT adapter folder loads with peft (PeftModel.from_pretrained) and the merged export
    with transformers, to the same logits; the estimate counts the trained parameters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_train_text import load_base, logits_of
    from trainer.checks.vram import estimate_for_config
    from trainer.config import load_config
    from trainer.training.job import LoraTrainingJob

    path = write_text_config(tmp_path, assets, network=net, max_train_steps=3, learning_rate="3e-2",
                             export_merged=True, name="lm")
    result = LoraTrainingJob(preflight(path)).run()
    out = tmp_path / "out"
    assert result.outcome == "succeeded" and str(out / "lm-merged") in result.artifacts
    base = load_base(assets)
    before = logits_of(base)
    adapted = logits_of(PeftModel.from_pretrained(base, str(out / "lm-peft")).eval())
    merged = logits_of(AutoModelForCausalLM.from_pretrained(out / "lm-merged", local_files_only=True).eval())
    assert (adapted - before).abs().max() > 1e-3
    assert (adapted - merged).abs().max() < 1e-4  # measured: ~1e-6 (fp32 rounding)
    params = json.loads((out / "run.json").read_text())["network"]["parameters"]
    assert estimate_for_config(load_config(out / "config.yaml")).params["lora_model"] == params


def test_ema_for_samples_validates_with_the_average_and_export_writes_it_in_place(assets, tmp_path):
    """Two runs that differ only in ema.use_for train identically; validation loss is the EMA's with `samples`
    (so it differs), and `export`'s <name>.safetensors is exactly `samples`' <name>-ema.safetensors."""
    from trainer.runs.outputs import read_loss_csv
    from trainer.training.job import LoraTrainingJob

    outs = {}
    for use_for in ("samples", "export"):
        folder = tmp_path / use_for
        folder.mkdir()
        path = write_config(folder, assets, network={"type": "loha"}, max_train_steps=3, save_steps=3,
                            learning_rate="1e-2", name="net", validation_split=0.25, validate_every_n_steps=3,
                            ema={"decay": 0.5, "use_for": use_for}, sample_prompts=["a red circle --s 2"])
        assert LoraTrainingJob(preflight(path)).run().outcome == "succeeded"
        outs[use_for] = folder / "out"
    rows = {k: read_loss_csv(v / "logs/loss.csv") for k, v in outs.items()}
    assert [r["loss"] for r in rows["samples"]] == [r["loss"] for r in rows["export"]]
    assert rows["samples"][-1]["val_loss"] != rows["export"][-1]["val_loss"]
    a, b = _file(outs["samples"], "net-ema")[0], _file(outs["export"])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert list((outs["samples"] / "samples").rglob("*.png"))  # the samples round ran with the EMA swapped in


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_init_lora_weights_continues_a_network_of_the_same_type(kind, runs, assets, tmp_path):
    from tests.conftest import lora_at_step_zero

    trained = runs["sd_model", kind] / "net.safetensors"
    path = write_config(tmp_path, assets, network=TYPES[kind], init_lora_weights=str(trained))
    start = lora_at_step_zero(path)
    given, _ = _file(runs["sd_model", kind])
    assert start.keys() == given.keys() and all(torch.equal(start[k], given[k]) for k in given)
