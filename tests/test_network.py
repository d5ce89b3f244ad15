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


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """{(model, type): output folder} of a 3-step run of each type on the tiny SD and SDXL."""
    from trainer.training.job import LoraTrainingJob

    out = {}
    for model in ("sd_model", "sdxl_model"):
        for kind, net in TYPES.items():
            folder = tmp_path_factory.mktemp(f"{model}-{kind}")
            path = write_config(folder, assets, base_model=str(assets[model]), network=net, max_train_steps=3,
                                save_steps=3, learning_rate="1e-2", name="net")
            result = LoraTrainingJob(preflight(path)).run()
            assert result.outcome == "succeeded" and result.steps == 3
            out[model, kind] = folder / "out"
    return out


def _file(out: Path):
    from safetensors import safe_open

    with safe_open(str(out / "net.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("model", ["sd_model", "sdxl_model"])
def test_each_type_trains_and_writes_lycoris_keys_and_metadata(model, runs):
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
    tensors, _ = _file(runs[model, "locon"])
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
