"""Text mode end to end on the tiny Llama: it learns, the PEFT adapter folder loads, bad targets are clear."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, lora_at_step_zero
from trainer.checks.preflight import preflight

# The tests share one in-process run (`trained`: its result): keep them on one xdist worker so it is
# trained once.
pytestmark = pytest.mark.xdist_group("train-text")


def write_text_config(folder: Path, assets: dict, **fields) -> Path:
    base = {
        "mode": "text", "train_data_dir": str(assets["text_data"]), "base_model": str(assets["llm_model"]),
        "lora_rank": 8, "batch_size": 4, "learning_rate": "1e-2", "max_train_steps": 6, "save_steps": 20,
        "seed": 7, "max_seq_length": 64, "output_dir": str(folder / "out"),
    }
    base.update(fields)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}, sort_keys=False))
    return path


def logits_of(model, text: str = "the red circle is red.") -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model.config.name_or_path, local_files_only=True)
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def load_base(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets["llm_model"], local_files_only=True).eval()


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One 40-step seeded run shared by the tests below."""
    from trainer.training.job import LoraTrainingJob

    folder = tmp_path_factory.mktemp("text")
    path = write_text_config(folder, assets, max_train_steps=40, name="lm", sample_prompts=["the red "])
    result = LoraTrainingJob(preflight(path)).run()
    return result, folder / "out"


def test_forty_steps_learn(trained):
    from trainer.runs.outputs import read_loss_csv

    result, out = trained
    assert result.outcome == "succeeded" and result.steps == 40
    losses = [float(r["loss"]) for r in read_loss_csv(out / "logs/loss.csv")]
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05


def test_outputs(trained):
    from safetensors import safe_open

    result, out = trained
    peft_dir = out / "lm-peft"
    assert str(peft_dir) in result.artifacts
    assert (out / "samples/step-00000040/00.txt").read_text().startswith("the red ")
    with safe_open(str(out / "lm.safetensors"), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_lm_model_layers_") for k in keys)
    assert meta["agentd_mode"] == "text" and meta["ss_network_dim"] == "8"
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8 and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]


def test_peft_folder_loads_and_changes_logits(trained, assets):
    from peft import PeftModel
    from safetensors.torch import load_file

    _, out = trained
    base = load_base(assets)
    before = logits_of(base)
    model = PeftModel.from_pretrained(base, str(out / "lm-peft")).eval()
    with_lora = logits_of(model)
    assert (with_lora - before).abs().max() > 1e-3
    with model.disable_adapter():
        assert torch.allclose(logits_of(model), before, atol=1e-6)
    # Same weights as the trainer's own file.
    kohya = load_file(str(out / "lm.safetensors"))
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(a, kohya["lora_lm_model_layers_0_self_attn_q_proj.lora_down.weight"])


def test_batch_pads_with_ignored_labels_and_appends_eos(trained, assets, tmp_path):
    from trainer.training.job import LoraTrainingJob

    (tmp_path / "cut").mkdir()
    cut = preflight(write_text_config(tmp_path / "cut", assets, max_seq_length=4)).scan.samples[0]
    job = LoraTrainingJob(preflight(write_text_config(tmp_path, assets)))
    full = job.checked.scan.samples[0]
    job.setup()
    try:
        tok = job.task.base.tokenizer
        eos = tok.eos_token_id
        batch = job.task.batch([cut, full])
    finally:
        job.cleanup()
    text = tok("the red circle is red.")["input_ids"]
    assert tok.pad_token_id == eos  # the tiny tokenizer has none, like Llama's
    # A text that fits ends with EOS (the model learns to stop); one cut at max_seq_length gets none.
    assert list(full.ids) == text + [eos] and all(full.trained)
    assert list(cut.ids) == text[:4]
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (2, len(text) + 1)
    assert ids[0, :4].tolist() == text[:4] and mask[0].tolist() == [1] * 4 + [0] * (len(text) - 3)
    assert labels[0, 4:].tolist() == [-100] * (len(text) - 3) and labels[1].tolist() == text + [eos]


def test_warm_base_is_clean_after_the_job(assets, tmp_path):
    from trainer.training.job import LoraTrainingJob
    from trainer.training.model_cache import BaseModelCache

    cache = BaseModelCache()
    path = write_text_config(tmp_path, assets, max_train_steps=2)
    LoraTrainingJob(preflight(path), base_cache=cache).run()
    (key,) = cache.keys()
    base, how, _ = cache.get(key, lambda: None)
    assert how == "device"  # still warm on the job's device (within warm_vram_ttl_s)
    assert not [n for n, _ in base.model.named_parameters() if "lora" in n]
    assert not any(p.requires_grad for p in base.model.parameters()) and not base.model.training
    assert torch.equal(logits_of(base.model), logits_of(load_base(assets)))


def test_init_lora_weights_continues_from_file(trained, assets, tmp_path):
    from trainer.families.lora_io import read_lora_file

    _, out = trained
    path = write_text_config(tmp_path, assets, init_lora_weights=str(out / "lm.safetensors"), seed=99)
    at_step0 = lora_at_step_zero(path)
    saved, _ = read_lora_file(out / "lm.safetensors")
    assert at_step0.keys() == saved.keys() and all(torch.equal(at_step0[k], saved[k]) for k in saved)


def test_model_derived_defaults_fit_the_model(tmp_path):
    # Left out, target_modules and max_seq_length follow the model: a GPT-2 (no q_proj, 128 positions) gets
    # peft's targets for it and 128, not the Llama-style targets and 512 it would then refuse.
    from trainer.config import parse_config
    from trainer.families import resolve

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2/config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], '
                                               '"n_positions": 128}')
    text = f"mode: text\ntrain_data_dir: data.jsonl\nbase_model: gpt2\noutput_dir: out\n"
    cfg, fam, _, problems = resolve(parse_config(text, base_dir=tmp_path))
    assert fam.NAME == "causal_lm" and not problems
    assert (cfg.target_modules, cfg.max_seq_length) == (["c_attn"], 128)
    # Written by the user, they stay as written (and are checked against the model).
    cfg, _, _, _ = resolve(parse_config(text + "target_modules: [c_proj]\nmax_seq_length: 64\n", base_dir=tmp_path))
    assert (cfg.target_modules, cfg.max_seq_length) == (["c_proj"], 64)


def test_bad_target_modules_name_the_model_layers(assets, tmp_path):
    from trainer.config import load_config
    from trainer.errors import ConfigError
    from trainer.families.causal_lm_task import check_text_targets

    path = write_text_config(tmp_path, assets, target_modules=["c_attn", "q_proj"])
    # Found by preflight from config.json alone (no weights), before anything is written.
    with pytest.raises(ConfigError) as info:
        preflight(path)
    text = info.value.render()
    assert "target_modules" in text and "['c_attn'] match no module" in text
    assert "q_proj" in text and "gate_proj" in text and "fix:" in text
    assert not (tmp_path / "out").exists()
    problems = check_text_targets(load_config(path))
    assert [p.field for p in problems] == ["target_modules"] and "c_attn" in problems[0].message
    # A container is not a layer.
    path = write_text_config(tmp_path, assets, target_modules=["self_attn"])
    problems = check_text_targets(load_config(path))
    assert "name containers" in problems[0].message


def test_example_config_loads():
    from trainer.config import load_config

    path = ROOT / "configs/llm_adapter.yaml"
    cfg = load_config(path)
    # The example names its targets (effective_targets, which returned them, is gone: the table fills defaults).
    assert cfg.mode == "text" and cfg.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.base_model.resolve() == (ROOT / "models/llm/Llama-3.2-1B").resolve()  # relative to configs/
    assert cfg.output_dir.is_absolute() and cfg.learning_rate == pytest.approx(2e-4)
    # Every knob carries a comment saying its trade-off.
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", " ")):
            assert "#" in line, line


def test_resume_after_stop_is_bit_identical(assets, tmp_path):
    """Stopped at step 3 and resumed == never stopped (dropout on, so the global RNG state matters too)."""
    import threading

    from safetensors.torch import load_file

    from trainer.training.job import LoraTrainingJob

    fields = dict(max_train_steps=6, lora_dropout=0.1, lr_scheduler="cosine")
    (tmp_path / "a").mkdir()
    straight = write_text_config(tmp_path / "a", assets, **fields)
    assert LoraTrainingJob(preflight(straight)).run().outcome == "succeeded"

    (tmp_path / "b").mkdir()
    path = write_text_config(tmp_path / "b", assets, **fields)
    stop = threading.Event()

    class StopAt3:
        def emit(self, ev):
            if ev["type"] == "step" and ev["step"] == 3:
                stop.set()

    assert LoraTrainingJob(preflight(path), StopAt3(), stop).run().outcome == "cancelled"
    resumed = LoraTrainingJob(preflight(path)).run()
    assert resumed.outcome == "succeeded" and resumed.resumed_from == 3
    a = load_file(str(tmp_path / "a/out/out.safetensors"))
    b = load_file(str(tmp_path / "b/out/out.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
