"""Text mode on instruction and chat data: the four formats, the chat template's masks token by token,
packing, eval, the merged export, QLoRA's checks, resume after SIGKILL, and the bad inputs."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN, ROOT, write_train_yaml
from trainer.errors import ConfigError
from trainer.checks.preflight import preflight


def chat_config(folder: Path, assets: dict, data: str | Path = "sharegpt.jsonl", **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {
        "train_data_dir": str(assets["chat_data"] / data) if isinstance(data, str) else str(data),
        "base_model": str(assets["chat_model"]), "lora_rank": 8, "batch_size": 4, "learning_rate": "1e-2",
        "max_train_steps": 3, "save_steps": 20, "seed": 5, "max_seq_length": 160,
        "output_dir": str(folder / "out"),
    }
    return write_train_yaml(folder, {**base, **fields})


def problems_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(path)
    return info.value.render()


def tokenizer(assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets["chat_model"], local_files_only=True)


# --- formats and masks ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,data", [("alpaca", "alpaca.json"), ("sharegpt", "sharegpt.jsonl"),
                                      ("messages", "messages.jsonl"), ("text", "text.jsonl")])
def test_each_format_trains_the_tiny_chat_model(fmt, data, assets, tmp_path):
    from trainer.training.job import LoraTrainingJob
    from trainer.runs.outputs import read_loss_csv

    checked = preflight(chat_config(tmp_path, assets, data))
    assert checked.scan.notes[0].startswith(f"dataset_format auto: {fmt} (decided from ")
    assert len(checked.scan.samples) == 12
    assert not [w for w in checked.warnings if "will not stop" in w]  # its own template ends turns with EOS
    result = LoraTrainingJob(checked).run()
    assert result.outcome == "succeeded" and result.steps == 3
    losses = [float(r["loss"]) for r in read_loss_csv(tmp_path / "out/logs/loss.csv")]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)


def test_labels_are_ignored_exactly_on_the_non_assistant_tokens(assets, tmp_path):
    """Token by token, for a multi-turn conversation (OpenAI messages) and alpaca with history."""
    tok = tokenizer(assets)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def expect(pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        all_ids, labels = [], []
        for text, trained in pieces:
            all_ids += ids(text)
            labels += ids(text) if trained else [-100] * len(ids(text))
        return all_ids, labels

    first = preflight(chat_config(tmp_path / "m", assets, "messages.jsonl")).scan.samples[0]
    want_ids, want_labels = expect([
        ("<|im_start|>system\nanswer in one word.<|im_end|>\n<|im_start|>user\ncolour of the circle?<|im_end|>\n"
         "<|im_start|>assistant\n", False), ("red.<|im_end|>\n", True),
        ("<|im_start|>user\nand its shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("a circle.<|im_end|>\n", True)])
    assert list(first.ids) == want_ids
    assert first.labels() == want_labels  # every assistant turn, with its <|im_end|> (the model learns to stop)

    first = preflight(chat_config(tmp_path / "a", assets, "alpaca.json")).scan.samples[0]
    want_ids, want_labels = expect([
        ("<|im_start|>user\nand its shape?<|im_end|>\n<|im_start|>assistant\n", False),
        ("a circle.<|im_end|>\n", True),
        ("<|im_start|>user\ncolour of the circle?\nbe brief<|im_end|>\n<|im_start|>assistant\n", False),
        ("red.<|im_end|>\n", True)])
    assert list(first.ids) == want_ids and first.labels() == want_labels

    # OpenAI's weight: 0 keeps a turn out of the loss; train_on_prompt trains every token.
    data = tmp_path / "weighted.jsonl"
    data.write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "no", "weight": 0},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "yes"}]}) + "\n")
    sample = preflight(chat_config(tmp_path / "w", assets, data, batch_size=1)).scan.samples[0]
    assert tok.decode([t for t, m in zip(sample.ids, sample.trained) if m]) == "yes<|im_end|>\n"
    sample = preflight(chat_config(tmp_path / "p", assets, data, batch_size=1, train_on_prompt=True)).scan.samples[0]
    assert all(sample.trained) and sample.labels() == list(sample.ids)


def test_validate_prints_the_first_example_with_trained_spans_and_long_samples(assets, tmp_path):
    path = chat_config(tmp_path, assets, "messages.jsonl", max_seq_length=122)
    proc = subprocess.run([str(BIN / "agentd"), "validate", str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "dataset_format auto: messages" in out
    assert "<|im_start|>assistant\n\u27e6red.<|im_end|>\n\u27e7<|im_start|>user" in out
    assert "\u27e6a circle.<|im_end|>\n\u27e7" in out  # every assistant turn (this one fits in 122)
    assert "4 of 12 samples are longer than max_seq_length 122 tokens and are cut to it (truncation: cut)" in out
    # drop leaves them out of the data.
    dropped = preflight(chat_config(tmp_path / "d", assets, "messages.jsonl", max_seq_length=122, truncation="drop"))
    assert len(dropped.scan.samples) == 8 and all(len(s.ids) <= 122 for s in dropped.scan.samples)


# --- packing --------------------------------------------------------------------------------------


def test_packing_restarts_positions_and_isolates_samples(assets, tmp_path):
    """A packed row's logits equal each of its samples run alone (Llama + sdpa: transformers' masking
    utilities turn the restarting position ids into a block-diagonal mask)."""
    from trainer.training.job import LoraTrainingJob

    checked = preflight(chat_config(tmp_path, assets, packing=True, max_seq_length=256))
    rows = checked.scan.samples
    assert any("packing: 12 samples in" in n for n in checked.scan.notes) and len(rows) < 12
    row = rows[0]
    assert len(row.lengths) > 1 and sum(row.lengths) == len(row.ids) <= 256
    job = LoraTrainingJob(checked)
    job.setup()
    try:
        model = job.task.base.model
        batch = job.task.batch([row])
        assert "attention_mask" not in batch
        assert batch["position_ids"][0].tolist() == [p for n in row.lengths for p in range(n)]
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            at = 0
            for n in row.lengths:
                alone = model(input_ids=batch["input_ids"][:, at:at + n]).logits[0]
                assert torch.allclose(packed[at:at + n], alone, atol=1e-5)
                at += n
    finally:
        job.cleanup()


def test_packing_warns_for_a_model_whose_attention_cannot_isolate(assets, tmp_path):
    from transformers import XLMConfig, XLMWithLMHeadModel

    folder = tmp_path / "xlm"
    XLMWithLMHeadModel(XLMConfig(vocab_size=110, emb_dim=32, n_layers=1, n_heads=2, causal=True,
                                 max_position_embeddings=256)).save_pretrained(folder)
    tokenizer(assets).save_pretrained(folder)
    checked = preflight(chat_config(tmp_path, assets, packing=True, base_model=str(folder),
                                    target_modules=["q_lin", "v_lin"]))
    assert any("packed samples can attend to the samples before them" in w for w in checked.warnings)


# --- eval, exports, QLoRA -------------------------------------------------------------------------


def test_validation_file_and_merged_export(assets, tmp_path):
    """Eval loss from validation_file (image mode's keys and events); the merged model loads with
    transformers alone and matches base + PEFT adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.training.job import LoraTrainingJob

    path = chat_config(tmp_path, assets, validation_file=str(assets["chat_data"] / "messages.jsonl"),
                       validate_every_n_steps=2, max_train_steps=4, export_merged=True, name="chat",
                       sample_prompts=["colour of the circle?"])
    result = LoraTrainingJob(preflight(path)).run()
    out = tmp_path / "out"
    assert result.outcome == "succeeded" and str(out / "chat-merged") in result.artifacts
    events = [json.loads(x) for x in (out / "logs/events.jsonl").read_text().splitlines()]
    val = [e for e in events if e["type"] == "validation"]
    assert [e["step"] for e in val] == [2, 4] and all(e["samples"] == 12 and e["val_loss"] > 0 for e in val)
    sample = next((out / "samples").rglob("*.txt")).read_text()
    assert sample.startswith("colour of the circle?")  # sampled as a user turn through the chat template

    merged = AutoModelForCausalLM.from_pretrained(out / "chat-merged", local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out / "chat-merged", local_files_only=True)
    assert tok.chat_template == tokenizer(assets).chat_template  # the template travels with the model
    base = AutoModelForCausalLM.from_pretrained(assets["chat_model"], local_files_only=True).eval()
    adapted = PeftModel.from_pretrained(base, str(out / "chat-peft")).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "colour of the circle?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        with adapted.disable_adapter():
            plain = adapted(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the LoRA changed something
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_quantized_estimate_counts_the_quantized_weights(tmp_path):
    """A Llama-2-7B-shaped config (meta device): NF4 weights are about a quarter of bf16's."""
    from trainer.checks.vram import estimate_vram

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096}))
    args = dict(family="causal_lm", resolution=None, batch_size=1, lora_rank=16, target_modules=["q_proj", "v_proj"],
                train_text_encoder=False, text_encoder_target_modules=[], mixed_precision="bf16",
                gradient_checkpointing=True, cache_latents=False, max_seq_length=1024)
    bf16 = estimate_vram(tmp_path, **args).breakdown["weights"]
    nf4 = estimate_vram(tmp_path, **args, quantization="4bit").breakdown["weights"]
    int8 = estimate_vram(tmp_path, **args, quantization="8bit").breakdown["weights"]
    assert 12_500 < bf16 < 13_000  # 6.74 B parameters x 2 bytes
    assert 3_600 < nf4 < 3_900 and 6_600 < int8 < 6_900  # linear layers at 0.516 / 1 byte; embeddings, head bf16


def test_qlora_trains_and_merges_through_bitsandbytes(assets, tmp_path):
    """The QLoRA path (4-bit NF4 base, fp32 LoRA, checkpointing, merged export dequantized) run for real on
    bitsandbytes' CPU backend. Jobs refuse quantization without CUDA at preflight (above), so this drives the
    loader and the task directly. bitsandbytes' CPU kernels need layers at least 64 wide: a 128-wide model."""
    import contextlib

    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.families import resolved
    from trainer.families.causal_lm_task import TextDataset, TextTask, load_text_base
    from trainer.data.text import scan_text
    from trainer.dev.tiny import build_tiny_chat_llm

    model_dir = build_tiny_chat_llm(tmp_path / "model", hidden=128)
    cfg = resolved(load_config(chat_config(tmp_path, assets, "messages.jsonl", base_model=str(model_dir),
                                           quantization="4bit", export_merged=True, name="q", learning_rate=3e-2)))
    base = load_text_base(cfg, torch.device("cpu"), torch.float32)
    assert type(base.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    task = TextTask(cfg, base, torch.device("cpu"))
    assert task._checkpointing  # gradient checkpointing is on with quantization
    assert {p.dtype for g in task.param_groups() for p in g["params"]} == {torch.float32}  # LoRA stays fp32
    data = TextDataset(scan_text(cfg).samples)
    task.prepare(data, contextlib.nullcontext)
    optimizer = torch.optim.AdamW(task.param_groups())
    task.train()
    losses = []
    for _ in range(3):
        loss = task.loss([0, 1, 2, 3], data, [torch.Generator() for _ in range(4)], contextlib.nullcontext)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    # In training mode: bitsandbytes' CPU backend repacks 4-bit weights for inference on its first eval-mode
    # forward (a CPU-only layout that dequantization does not read); CUDA has no such step.
    peft_dir, merged_dir = task.export_extra(tmp_path / "out")
    ids = torch.tensor([list(data.samples[5].ids)])
    with torch.no_grad():
        qlora = base.model(input_ids=ids, use_cache=False).logits.float()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    assert next(merged.parameters()).dtype == torch.bfloat16  # the compute dtype, dequantized
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    task.detach()
    with torch.no_grad():
        got = merged(input_ids=ids).logits.float()
        plain = base.model(input_ids=ids, use_cache=False).logits.float()
    assert (qlora - plain).abs().max() > 0.1  # the LoRA moved the logits ...
    assert (got - qlora).abs().max() < 0.03  # ... and the merged model reproduces them (bf16 rounding)


# --- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [False, True])
def test_sigkill_and_rerun_is_bit_identical(packing, assets, tmp_path):
    from safetensors.torch import load_file

    from tests.test_resume import kill_foreground_after, loss_rows, train_foreground

    fields = dict(max_train_steps=8, save_steps=3, batch_size=2, lora_dropout=0.1, log_every=1, packing=packing,
                  max_seq_length=128)
    ref = chat_config(tmp_path / "ref", assets, **fields)
    assert train_foreground(ref).returncode == 0
    cfg = chat_config(tmp_path / "job", assets, **fields)
    kill_foreground_after(cfg, 5)  # checkpoint at 3; steps 4-5 are redone
    proc = train_foreground(cfg)
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(str(tmp_path / "ref/out/out.safetensors")), load_file(str(tmp_path / "job/out/out.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in loss_rows(ref)] == [r["loss"] for r in loss_rows(cfg)]
    assert [int(r["step"]) for r in loss_rows(cfg)] == list(range(1, 9))


def test_chat_job_through_the_daemon(assets, tmp_path):
    """`agentd run` on a chat config: the console shows the format decided, the first example, the steps."""
    from tests.daemon_harness import DaemonProc

    (tmp_path / "daemon").mkdir()
    d = DaemonProc(tmp_path / "daemon").start()
    try:
        proc = d.run("run", str(chat_config(tmp_path / "job", assets, "alpaca.json", packing=True)))
    finally:
        d.stop()
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "dataset_format auto: alpaca" in out and "\u27e6red.<|im_end|>\n\u27e7" in out
    assert "step 3/3" in out and "succeeded" in out


# --- bad inputs -------------------------------------------------------------------------------------


def test_bad_records_name_file_line_and_fix(assets, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join([
        json.dumps({"instruction": "q", "output": "a"}),
        '{"instruction": "q", "output": ',
        json.dumps({"instruction": "q", "input": "x"}),
    ]) + "\n")
    text = problems_of(chat_config(tmp_path, assets, data, dataset_format="alpaca"))
    assert f"{data}:2: not valid JSON" in text
    assert f'{data}:3: alpaca record has no "output" string' in text and "fix:" in text

    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]})
                    + "\n")
    text = problems_of(chat_config(tmp_path, assets, data, dataset_format="sharegpt"))
    assert f"{data}:1: turn 1 has an unknown role" in text and "'robot'" in text and "human, user, gpt" in text

    data.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                             {"role": "user", "content": "more"}]}) + "\n")
    text = problems_of(chat_config(tmp_path, assets, data))
    assert f"{data}:1: the last turn is the user's, not the assistant's" in text

    text = problems_of(chat_config(tmp_path, assets, "alpaca.json", dataset_format="sharegpt"))
    assert 'alpaca.json[0]: sharegpt record has no "conversations" list; the records look like alpaca' in text
    assert "keys instruction, input, output" in text and "set dataset_format: alpaca (or auto)" in text

    data.write_text("")
    assert "dataset is empty (no records)" in problems_of(chat_config(tmp_path, assets, data))
    # Every answer beyond the cut: nothing to learn is an error, not a run of zero losses.
    text = problems_of(chat_config(tmp_path, assets, "messages.jsonl", max_seq_length=40))
    assert "no sample keeps a trained token within 40 tokens" in text


def test_bad_settings_exit_2_and_write_nothing(assets, tmp_path, capsys):
    # A chat format on a tokenizer without a chat template (the plain tiny Llama has none).
    path = chat_config(tmp_path, assets, base_model=str(assets["llm_model"]), max_seq_length=300,
                       quantization="4bit")
    proc = subprocess.run([str(BIN / "lora-train"), "--config", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    err = proc.stderr
    assert "chat_template: the data is sharegpt (a chat format) but the model's tokenizer has no chat template" in err
    assert "set chat_template:" in err
    assert "max_seq_length: is larger than the model's maximum position embeddings (256" in err
    assert "quantization: 4bit (bitsandbytes) needs a CUDA GPU" in err
    assert not (tmp_path / "out").exists()
    # An inline chat_template fixes the first one; a template file is read relative to the config.
    (tmp_path / "chatml.jinja").write_text((assets["chat_model"] / "chat_template.jinja").read_text()
                                           if (assets["chat_model"] / "chat_template.jinja").exists()
                                           else tokenizer(assets).chat_template)
    # max_seq_length left out follows the model (256 positions, below the usual 512) and validate says so.
    path = chat_config(tmp_path, assets, base_model=str(assets["llm_model"]), chat_template="chatml.jinja",
                       max_seq_length=None)
    checked = preflight(path)
    assert checked.scan.samples[0].labels().count(-100) > 0
    assert checked.config.max_seq_length == 256 and checked.derived["max_seq_length"] == 256
    from trainer.checks.validate_report import validate_command

    capsys.readouterr()
    assert validate_command(str(path)) == 0
    assert "from the model: " in (out := capsys.readouterr().out) and "max_seq_length 256" in out
    # That template closes turns with <|im_end|>, which this tokenizer does not have: generation would never
    # stop after an answer (the "repeats itself forever" failure), so preflight says so.
    assert any("the tuned model will not stop after its answer" in w for w in checked.warnings)


def test_templates_that_cannot_give_masks_are_refused_per_record(assets, tmp_path):
    from trainer.dev.tiny import CHAT_TEMPLATE

    # A template that renders the turn count up front: earlier turns render differently once more follow.
    counting = "{{ messages|length }}" + CHAT_TEMPLATE
    text = problems_of(chat_config(tmp_path, assets, "messages.jsonl", chat_template=counting))
    assert "messages.jsonl:1: TemplateMismatch: the chat template renders turns 0..2 differently" in text
    # A template that raises (as Llama-2's and Mistral's do on roles that do not alternate) names the record.
    data = tmp_path / "twice.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                             {"role": "assistant", "content": "c"}]}) + "\n")
    strict = ("{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' or loop.index0 % 2 == 1 "
              "and m['role'] != 'assistant' %}{{ raise_exception('Conversation roles must alternate "
              "user/assistant') }}{% endif %}{% endfor %}" + CHAT_TEMPLATE)
    text = problems_of(chat_config(tmp_path, assets, data, chat_template=strict))
    assert f"{data}:1: TemplateError: Conversation roles must alternate user/assistant" in text
    text = problems_of(chat_config(tmp_path, assets, chat_template="missing.jinja"))
    assert "chat_template: cannot read the template file" in text


def test_example_config_loads():
    from trainer.config import load_config

    path = ROOT / "configs/llm_chat_adapter.yaml"
    cfg = load_config(path)
    assert cfg.dataset_format == "sharegpt" and cfg.packing and cfg.export_merged
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", " ")):
            assert "#" in line, line
