"""`agentd import-kohya`: lora-scripts' shipped config and kohya's dataset TOML examples (tests/fixtures/kohya,
copied from those repositories) become YAML that validates; every mapped key lands; bad TOML is refused."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN
from tests.test_datasets import image
from trainer.data.kohya_import import MAPPED, convert

FIXTURES = Path(__file__).parent / "fixtures" / "kohya"


def agentd(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "agentd"), *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture
def lora_scripts_root(tmp_path, assets) -> Path:
    """A lora-scripts checkout's layout: config/default.toml, models/model.ckpt, train/input (kohya paths are
    relative to that root, so the YAML is written there)."""
    (tmp_path / "config").mkdir()
    shutil.copy(FIXTURES / "lora-scripts-default.toml", tmp_path / "config/default.toml")
    (tmp_path / "models").mkdir()
    shutil.copytree(assets["sd_model"], tmp_path / "models/model.ckpt")  # a diffusers folder: detected by content
    for i in range(3):
        image(tmp_path / "train/input" / f"{i}.png", (32 + 8 * i, 32), caption="a red circle, photo")
    return tmp_path


def test_lora_scripts_default_toml_converts_and_validates(lora_scripts_root):
    root = lora_scripts_root
    proc = agentd("import-kohya", "config/default.toml", "-o", "train.yaml", cwd=root)
    assert proc.returncode == 0, proc.stderr
    text = (root / "train.yaml").read_text()
    converted = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all("# kohya: " in line for line in converted if not line.endswith(":"))  # each line says its source
    assert "lora_rank: 32  # kohya: [additional_network] network_dim = 32" in text
    assert "#   [training] xformers = true: PyTorch SDPA" in text  # unsupported keys listed with the reason
    assert "#   [saving] save_every_n_epochs = 1: agentd checkpoints by optimizer steps" in text
    checked = agentd("validate", "train.yaml", "--json", "--vram", "24GiB", cwd=root)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    cfg = yaml.safe_load(text)
    assert cfg["optimizer"]["name"] == "adamw8bit" and cfg["lr_scheduler"] == "cosine_with_restarts"
    assert cfg["train_text_encoder"] is True and cfg["text_encoder_lr"] == pytest.approx(1e-5)
    assert cfg["resolution"] == 512 and cfg["epochs"] == 10 and cfg["clip_skip"] == 2
    # Every key of the shipped file is either converted or listed: nothing dropped silently.
    import tomllib

    shipped = tomllib.loads((FIXTURES / "lora-scripts-default.toml").read_text())
    for section, keys in shipped.items():
        for key in keys:
            assert f"[{section}] {key} = " in text, key


def test_adamw8bit_on_the_cpu_is_refused_before_any_weights_load(lora_scripts_root):
    root = lora_scripts_root
    assert agentd("import-kohya", "config/default.toml", "-o", "train.yaml", cwd=root).returncode == 0
    proc = subprocess.run([str(BIN / "lora-train"), "--config", "train.yaml", "--device", "cpu"], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "adamw8bit (bitsandbytes) runs on CUDA GPUs only" in proc.stderr and "use optimizer name adamw" in proc.stderr
    assert not (root / "output").exists()  # refused before anything was written


@pytest.mark.parametrize("example", ["dataset-dreambooth-and-finetune.toml", "dataset-no-upscale.toml"])
def test_kohya_dataset_examples_convert_and_validate(example, lora_scripts_root):
    root = lora_scripts_root
    shutil.copy(FIXTURES / example, root / "config/dataset.toml")
    for n, folder in enumerate(("C:\\hoge", "C:\\fuga", "C:\\reg")):  # kohya's Windows paths: plain names here
        for i in range(2):
            # a bucket step (64 px) per side at least: the no-upscale example refuses smaller images
            image(root / folder / f"{i}.png", (80, 64), colour=(60 * n, 100 * i, 200))
    proc = agentd("import-kohya", "config/default.toml", "--dataset-config", "config/dataset.toml", "-o",
                  "train.yaml", cwd=root)
    assert proc.returncode == 0, proc.stderr
    text = (root / "train.yaml").read_text()
    checked = agentd("validate", "train.yaml", "--vram", "24GiB", cwd=root)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    cfg = yaml.safe_load(text)
    assert "train_data_dir" not in cfg  # kohya ignores it when a dataset config is given
    assert "train_data_dir = ./train/input: kohya ignores it" in text
    if example.startswith("dataset-dreambooth"):
        assert [d["image_dir"] for d in cfg["datasets"]] == ["C:\\hoge", "C:\\fuga", "C:\\reg"]
        assert [d.get("keep_tokens") for d in cfg["datasets"]] == [2, 3, 1]  # dataset value, subset overrides
        assert cfg["datasets"][2]["is_reg"] is True and cfg["batch_size"] == 4 and cfg["keep_tokens"] == 1
        assert "#   [[datasets]] #2 subsets = 1 subset(s): this dataset's resolution, batch_size differ" in text
    else:
        assert cfg["bucket_no_upscale"] is True and cfg["max_bucket_reso"] == 1536 and cfg["resolution"] == 768
        assert len(cfg["datasets"]) == 1


EXAMPLES = {  # kohya key: (TOML value, agentd value) - one per MAPPED key
    "pretrained_model_name_or_path": ("m.safetensors", "m.safetensors"), "model_train_type": ("sdxl-lora", "sdxl"),
    "train_data_dir": ("data", "data"), "resolution": ("768,768", 768), "prior_loss_weight": (0.5, 0.5),
    "cache_latents": (True, True), "cache_latents_to_disk": (True, True),
    "cache_text_encoder_outputs": (False, False), "cache_text_encoder_outputs_to_disk": (True, True),
    "enable_bucket": (True, True), "min_bucket_reso": (320, 320), "max_bucket_reso": (960, 960),
    "bucket_reso_steps": (32, 32), "bucket_no_upscale": (True, True), "caption_extension": (".caption", ".caption"),
    "shuffle_caption": (True, True), "caption_separator": (";", ";"), "keep_tokens": (2, 2),
    "keep_tokens_separator": ("|||", "|||"), "caption_dropout_rate": (0.1, 0.1),
    "caption_tag_dropout_rate": (0.2, 0.2), "caption_prefix": ("best", "best"), "caption_suffix": ("end", "end"),
    "flip_aug": (True, True), "random_crop": (True, False), "masked_loss": (True, True), "alpha_mask": (True, True),
    "network_dim": (16, 16), "network_alpha": (8, 8.0), "network_weights": ("old.safetensors", "old.safetensors"),
    "network_train_unet_only": (True, False), "unet_lr": (3e-4, 3e-4), "learning_rate": (2e-4, 2e-4),
    "text_encoder_lr": (5e-5, 5e-5), "optimizer_type": ("Prodigy", "prodigy"),
    "optimizer_args": (["d_coef=2", "betas=0.9,0.99", "use_bias_correction=True"],
                       {"d_coef": 2, "betas": [0.9, 0.99], "use_bias_correction": True}),
    "lr_scheduler": ("polynomial", "polynomial"), "lr_warmup_steps": (50, 50), "lr_restart_cycles": (3, 3),
    "lr_scheduler_num_cycles": (4, 4), "lr_scheduler_power": (2.0, 2.0), "train_batch_size": (3, 3),
    "batch_size": (5, 5), "max_train_epochs": (7, 7), "max_train_steps": (900, 900),
    "gradient_accumulation_steps": (2, 2), "gradient_checkpointing": (True, True), "max_grad_norm": (0.5, 0.5),
    "mixed_precision": ("bf16", "bf16"), "seed": (99, 99), "noise_offset": (0.05, 0.05),
    "multires_noise_iterations": (6, 6), "multires_noise_discount": (0.3, 0.3), "min_snr_gamma": (5, 5.0),
    "clip_skip": (2, 2), "output_dir": ("out", "out"), "output_name": ("mine", "mine"),
    "save_every_n_steps": (250, 250), "sample_prompts": ("prompts.txt", "prompts.txt"),
    "sample_sampler": ("k_euler_a", "k_euler_a"), "sample_every_n_steps": (100, 100),
    "sample_every_n_epochs": (2, 2), "sample_at_first": (True, True),
    "timestep_sampling": ("sigmoid", "logit_normal"), "sigmoid_scale": (1.5, 1.5), "guidance_scale": (3.5, 3.5),
    "t5xxl_max_token_length": (256, 256),
}


def test_every_mapped_key_lands(tmp_path):
    import tomllib

    assert set(EXAMPLES) == set(MAPPED)  # a new mapping needs its example here
    for key, (value, expected) in EXAMPLES.items():
        toml = tmp_path / f"{key}.toml"
        extra = 'sample_prompts = "p.txt"\n' if key.startswith("sample_") and key != "sample_prompts" else ""
        toml.write_text(f"[training_arguments]\n{key} = {_toml(value)}\n{extra}")
        assert tomllib.loads(toml.read_text())  # the example is real TOML
        conv = convert(toml)
        target = MAPPED[key][0]
        assert not conv.problems, (key, conv.problems)
        assert conv.values[target] == expected, key
        assert conv.origin[target] == f"[training_arguments] {key} = " + conv.origin[target].split(" = ", 1)[1]
    # All of them at once (flat layout, lora-scripts' newer format) make a config the schema accepts.
    from trainer.config import parse_config
    from trainer.data.kohya_import import to_yaml

    flat = tmp_path / "flat.toml"
    skip = {"learning_rate", "lr_scheduler_num_cycles", "batch_size", "max_train_steps", "model_train_type",
            "cache_text_encoder_outputs_to_disk", "shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
            "cache_latents", "cache_latents_to_disk"}  # the pairs agentd refuses together (cross-field checks)
    flat.write_text("".join(f"{k} = {_toml(v)}\n" for k, (v, _) in EXAMPLES.items() if k not in skip))
    cfg = parse_config(to_yaml(convert(flat), str(flat)), base_dir=tmp_path)
    assert cfg.lora_rank == 16 and cfg.optimizer.name == "prodigy" and cfg.optimizer.args["d_coef"] == 2
    assert cfg.center_crop is False and cfg.train_text_encoder is False and cfg.resolution == 768


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def test_not_toml_and_wrong_types_are_refused_and_nothing_is_written(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[training]\nnetwork_dim = 32\nresolution = "512,512\n')
    proc = agentd("import-kohya", str(bad))
    assert proc.returncode == 2
    assert "is not valid TOML" in proc.stderr and "line 3" in proc.stderr and "column" in proc.stderr
    assert not bad.with_suffix(".yaml").exists()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[additional_network]\nnetwork_dim = "thirty-two"\n[optimizer]\noptimizer_type = "Lion"\n')
    proc = agentd("import-kohya", str(wrong))
    assert proc.returncode == 2
    assert "network_dim: is 'thirty-two' (str); agentd's lora_rank needs an integer" in proc.stderr
    assert "optimizer_type: is 'Lion'" in proc.stderr and "AdamW8bit" in proc.stderr
    assert not wrong.with_suffix(".yaml").exists()
    out = tmp_path / "exists.yaml"
    out.write_text("mine\n")
    good = tmp_path / "good.toml"
    good.write_text("network_dim = 8\n")
    assert agentd("import-kohya", str(good), "-o", str(out)).returncode == 2 and out.read_text() == "mine\n"


def test_kohya_sample_prompt_file_is_read_as_ours(tmp_path, assets):
    from trainer.config import parse_config
    from trainer.data.prompts import load_prompts

    (tmp_path / "prompts.txt").write_text("a red circle --n blurry --w 64 --h 32 --s 5 --l 6.5 --d 42\n")
    (tmp_path / "k.toml").write_text(f'pretrained_model_name_or_path = "{assets["sd_model"]}"\n'
                                     'train_data_dir = "data"\nsample_prompts = "prompts.txt"\nresolution = 32\n')
    cfg = parse_config(to_yaml_of(tmp_path / "k.toml"), base_dir=tmp_path)
    (prompt,), problems = load_prompts(cfg)
    assert not problems
    assert (prompt.prompt, prompt.negative, prompt.width, prompt.height, prompt.steps, prompt.guidance,
            prompt.seed) == ("a red circle", "blurry", 64, 32, 5, 6.5, 42)


def to_yaml_of(path: Path) -> str:
    from trainer.data.kohya_import import import_kohya

    return import_kohya(path)


def test_reg_data_dir_becomes_reg_subsets(lora_scripts_root):
    """kohya's train_data_dir + reg_data_dir of N_name folders: a datasets: list with is_reg on the reg folders."""
    root = lora_scripts_root
    for i in range(2):
        image(root / "train/5_sks girl" / f"{i}.png", (32, 32))
        image(root / "reg/1_girl" / f"{i}.png", (32, 40), colour=(0, 100 * i, 200))
    shutil.rmtree(root / "train/input")
    toml = root / "config/default.toml"
    toml.write_text(toml.read_text().replace('train_data_dir = "./train/input"', 'train_data_dir = "./train"')
                    .replace('reg_data_dir = ""', 'reg_data_dir = "./reg"'))
    proc = agentd("import-kohya", "config/default.toml", "-o", "train.yaml", cwd=root)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load((root / "train.yaml").read_text())
    assert "train_data_dir" not in cfg
    assert cfg["datasets"] == [{"image_dir": "train/5_sks girl", "num_repeats": 5, "class_tokens": "sks girl"},
                               {"image_dir": "reg/1_girl", "num_repeats": 1, "class_tokens": "girl", "is_reg": True}]
    checked = agentd("validate", "train.yaml", "--json", "--vram", "24GiB", cwd=root)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    import json

    assert json.loads(checked.stdout)["dataset"]["samples_per_epoch"] == 20  # 2 x 5 training + as many reg


@pytest.mark.parametrize("args,network", [
    ('network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr", "factor=8"]', {"type": "lokr", "factor": 8}),
    ('network_module = "networks.lora"\nnetwork_args = ["conv_dim=4", "conv_alpha=2", "dora_wd=True"]',
     {"type": "locon", "conv_rank": 4, "conv_alpha": 2.0, "dora": True}),
])
def test_lycoris_and_conv_network_args_become_network_and_train(args, network, tmp_path, assets):
    from trainer.data.kohya_import import to_yaml
    from trainer.training.job import LoraTrainingJob

    from trainer.checks.preflight import preflight

    toml = tmp_path / "kohya.toml"
    toml.write_text(f'pretrained_model_name_or_path = "{assets["sd_model"]}"\ntrain_data_dir = "{assets["shapes"]}"\n'
                    f'resolution = "32,32"\nmax_train_steps = 1\nnetwork_dim = 4\n{args}\n'
                    f'output_dir = "{tmp_path / "out"}"\n')
    conv = convert(toml)
    assert not conv.problems
    text = to_yaml(conv, str(toml))
    assert yaml.safe_load(text)["network"] == network, text
    (tmp_path / "train.yaml").write_text(text + f"metadata_path: {assets['shapes'] / 'metadata.csv'}\n")
    result = LoraTrainingJob(preflight(tmp_path / "train.yaml")).run()
    assert result.outcome == "succeeded" and result.steps == 1


def test_lora_scripts_chinese_preset_is_utf8_with_its_header_and_flux_keys(tmp_path):
    # Written through the command: the file is UTF-8 as the preset wrote it (no \\u8BAD escapes).
    preset = FIXTURES / "lora-scripts-preset-flux.toml"
    out = tmp_path / "flux.yaml"
    proc = agentd("import-kohya", str(preset), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_bytes().decode("utf-8")
    assert "\\u" not in text
    header = text.split("\n\n")[0]
    assert "# Preset: Flux LoRA 训练（低显存） (version 0.1.0, by 秋叶, for flux-lora)" in header
    assert "#   这是一个样例模板，用于 Flux.1 dev 的 LoRA 训练。\n#   时间步采样使用 sigmoid。" in header
    assert "train_data_dir: ./train/猫  # kohya: [data] train_data_dir = ./train/猫" in text
    assert "[metadata]" not in text  # the preset's metadata is the header, not "not supported" keys
    cfg = yaml.safe_load(text)
    assert cfg["caption_prefix"] == "一只猫"
    # sd-scripts' Flux keys where agentd has the feature; the reason where not.
    assert (cfg["timestep_density"], cfg["logit_std"]) == ("logit_normal", 1.2)
    assert (cfg["guidance_scale"], cfg["max_sequence_length"]) == (1.0, 256)
    assert "#   [data] model_prediction_type = raw: needs no key: agentd's Flux loss is on the transformer's raw" in text
    assert "#   [data] apply_t5_attn_mask = true: agentd encodes captions as diffusers' FluxPipeline does" in text
    assert "#   [data] discrete_flow_shift = 3.1582: agentd shifts t as the model's scheduler does" in text
    from trainer.config import parse_config

    assert parse_config(text, base_dir=tmp_path).model_family == "flux"

    # lora-scripts' own Chroma preset (config/presets/chroma.toml, as shipped): another architecture.
    chroma = tmp_path / "chroma.toml"
    chroma.write_text('[metadata]\nname = "Chroma LoRA 训练"\nversion = "1.0"\nauthor = "秋叶"\ntrain_type = '
                      '"flux-lora"\ndescription = "这是一个样例模板，用于使用 Chroma LoRA 训练。"\n\n[data]\n'
                      'model_type = "chroma"\napply_t5_attn_mask = true\ntimestep_sampling = "sigmoid"\n'
                      'model_prediction_type = "raw"\nguidance_scale = 0.0\n', encoding="utf-8")
    from trainer.data.kohya_import import import_kohya

    text = import_kohya(chroma)
    assert "# Preset: Chroma LoRA 训练 (version 1.0, by 秋叶, for flux-lora)" in text
    assert '#   [data] model_type = chroma: another architecture (Chroma' in text
    assert "#   [data] guidance_scale = 0.0: 0 means a model without a guidance embedding" in text
    assert "timestep_density: logit_normal  # kohya: [data] timestep_sampling = sigmoid" in text
