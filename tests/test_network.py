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
