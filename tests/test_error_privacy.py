"""Errors about a file a config names describe it (kind, position, count) and never echo its bytes.

The daemon reads files for submitters; a library message that quotes its input (a Jinja template line, a
serde "invalid type: string …", a pickle opcode, a class name from model_index.json) would hand a file's
content to whoever named it. Each reader here is fed a file holding a secret, and the secret must not come
back, while the message still says where to look.
"""
from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from tests.test_text_chat import chat_config, problems_of

SECRET = "zq7SECRETtoken9x"


def leaked(text: str) -> list[str]:
    """Any 6-character run of the secret found in `text` (not only the whole of it)."""
    return [SECRET[i:i + 6] for i in range(len(SECRET) - 5) if SECRET[i:i + 6] in text]


def safetensors_bytes(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_the_model_probe_describes_files_by_kind_and_count(tmp_path):
    # The names a description may quote are the families' table's (describe), the facts the probe's.
    from trainer.families import describe
    from trainer.families.probe import probe

    st = tmp_path / "keys.safetensors"  # a valid header whose tensor names are the secret
    st.write_bytes(safetensors_bytes({f"{SECRET}.w{i}": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
                                      for i in range(3)}) + b"\0" * 4)
    text = describe(probe(st))
    assert not leaked(text) and "3 tensors" in text and "none under a key prefix agentd knows" in text, text
    known = tmp_path / "known.safetensors"
    known.write_bytes(safetensors_bytes({"model.diffusion_model.x": {"dtype": "F32", "shape": [1],
                                                                     "data_offsets": [0, 4]}}) + b"\0" * 4)
    assert "keys under model.diffusion_model." in describe(probe(known))
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 40) + f'{{"a": {SECRET} {SECRET}}}'.encode().ljust(40))
    text = describe(probe(bad_json))
    assert not leaked(text) and "not valid JSON" in text and "line 1 column" in text, text
    ckpt = tmp_path / "model.ckpt"  # a pickle that stops at an unknown opcode (pickletools quotes it)
    ckpt.write_bytes(pickle.dumps({"a.b": 1}, protocol=2)[:-1] + SECRET.encode())
    text = describe(probe(ckpt))
    assert not leaked(text) and "pickle cannot be parsed" in text, text

    diffusers = tmp_path / "pipe"
    diffusers.mkdir()
    (diffusers / "model_index.json").write_text(json.dumps({"_class_name": SECRET}))
    text = describe(probe(diffusers))
    assert not leaked(text) and "a pipeline class agentd does not train" in text, text
    (diffusers / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert "StableDiffusionPipeline" in describe(probe(diffusers))  # agentd's own name: still said
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": [SECRET + "ForCausalLM", SECRET]}))
    text = describe(probe(lm))
    assert not leaked(text) and "2 entries, 1 a causal LM" in text, text


def test_lora_checkpoint_and_estimate_readers_do_not_quote_the_file(tmp_path):
    from trainer.runs.checkpoint import read_state
    from trainer.errors import content_free
    from trainer.families.lora_io import LoraFormatError, read_lora_file
    from trainer.families.memory import VramEstimateError, _read_json

    lora = tmp_path / "lora.safetensors"  # serde's "invalid type: string \"…\"" quotes the value
    lora.write_bytes(safetensors_bytes({"w": SECRET}))
    with pytest.raises(LoraFormatError) as info:
        read_lora_file(lora)
    assert not leaked(str(info.value)) and str(lora) in str(info.value), str(info.value)
    config = tmp_path / "config.json"
    config.write_text(f'{{"hidden_size": {SECRET}}}')
    with pytest.raises(VramEstimateError) as info:
        _read_json(config)
    assert not leaked(str(info.value)) and "line 1 column 17" in str(info.value), str(info.value)
    (tmp_path / "state.json").write_bytes(b"\xff" + SECRET.encode())
    with pytest.raises(ValueError) as info:
        read_state(tmp_path)
    assert content_free(info.value) == "not UTF-8 text (undecodable byte at offset 0)"


def test_chat_template_errors_give_the_line_not_the_template(assets, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text("{{ bos_token }}\n{% " + SECRET + " %}\n")  # Jinja: "Encountered unknown tag '…'" + line
    text = problems_of(chat_config(tmp_path / "syntax", assets, chat_template=str(template)))
    assert not leaked(text) and "Jinja syntax error at line 2 of the template" in text, text
    assert text.startswith("1 problem in"), text  # parsed once, not once per record
    template.write_text("{{ " + SECRET + ".x }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    text = problems_of(chat_config(tmp_path / "undefined", assets, chat_template=str(template)))
    assert not leaked(text) and "UndefinedError" in text, text
    template.write_bytes(b"\xfe" + SECRET.encode())
    text = problems_of(chat_config(tmp_path / "bytes", assets, chat_template=str(template)))
    assert not leaked(text) and "undecodable byte at offset 0" in text, text


def test_a_tokenizer_that_does_not_parse_is_a_problem_with_its_position(assets, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(assets["chat_model"], model)
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": SECRET}
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    text = problems_of(chat_config(tmp_path, assets, base_model=str(model)))
    assert not leaked(text) and "cannot load the tokenizer" in text and "does not parse at line 1 column" in text, text
