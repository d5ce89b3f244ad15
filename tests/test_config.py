"""The training config: the seed's YAML as written, defaults, and every bad input with a clear error."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, write_config
from trainer.config import load_config, parse_config
from trainer.errors import ConfigError

SEED = """\
train_data_dir: ./data/style_train
metadata_path: ./data/style_train/metadata.csv
base_model: ./models/Stable-diffusion/v1-5-pruned.safetensors
lora_rank: 8
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: ./output/my_style_lora
save_steps: 100
"""


def test_seed_yaml_parses_as_written(tmp_path):
    cfg = parse_config(SEED, base_dir=tmp_path)
    assert cfg.learning_rate == pytest.approx(2e-4) and isinstance(cfg.learning_rate, float)
    assert (cfg.lora_rank, cfg.batch_size, cfg.epochs, cfg.save_steps) == (8, 4, 10, 100)
    # Relative paths resolve against the config file's folder.
    assert cfg.train_data_dir == tmp_path / "data/style_train"
    assert cfg.base_model == tmp_path / "models/Stable-diffusion/v1-5-pruned.safetensors"
    assert cfg.output_dir == tmp_path / "output/my_style_lora"
    assert cfg.run_name == "my_style_lora" and cfg.effective_alpha == 8.0


def test_training_hash_ignores_cadence_fields(tmp_path):
    a = parse_config(SEED, base_dir=tmp_path)
    b = parse_config(SEED.replace("save_steps: 100", "save_steps: 7") + "log_every: 3\n", base_dir=tmp_path)
    c = parse_config(SEED.replace("2e-4", "3e-4"), base_dir=tmp_path)
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_every_problem_reported_together_with_lines(tmp_path):
    text = SEED.replace("lora_rank: 8", "lora_rank: 0").replace("batch_size: 4", "batch_sise: 4")
    with pytest.raises(ConfigError) as e:
        parse_config(text, base_dir=tmp_path, source="x.yaml")
    by_field = {p.field: p for p in e.value.problems}
    assert by_field["lora_rank"].line == 4 and by_field["lora_rank"].value == 0
    assert by_field["batch_sise"].line == 5 and "batch_size" in by_field["batch_sise"].fix


def test_cross_field_check(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_config(SEED + "cache_latents: true\nrandom_flip: true\n", base_dir=tmp_path)
    assert e.value.problems[0].field == "cache_latents" and e.value.problems[0].line == 10


def _break(case: str, folder: Path, assets: dict) -> tuple[Path, dict]:
    """Build the broken input for one table row; returns (config path, extra config fields)."""
    data = folder / "data"
    import shutil

    shutil.copytree(assets["shapes"], data)
    fields = {"train_data_dir": str(data), "metadata_path": str(data / "metadata.csv")}
    if case == "unknown key":
        fields["wibble"] = 3
    elif case == "typo'd key":
        fields["learning_rte"] = 1e-4
    elif case == "negative learning rate":
        fields["learning_rate"] = -1e-4
    elif case == "rank 0":
        fields["lora_rank"] = 0
    elif case == "batch_size 0":
        fields["batch_size"] = 0
    elif case == "missing data dir":
        fields["train_data_dir"] = str(folder / "nope")
        fields["metadata_path"] = None
    elif case == "empty data dir":
        (folder / "empty").mkdir()
        fields["train_data_dir"] = str(folder / "empty")
        fields["metadata_path"] = None
    elif case == "metadata names a missing image":
        with (data / "metadata.csv").open("a") as f:
            f.write("ghost.png,a ghost\n")
    elif case == "unreadable image":
        (data / "000_red_circle.png").write_bytes(b"not a png at all")
    elif case == "wrong metadata columns":
        (data / "metadata.csv").write_text("path,description\n000_red_circle.png,x\n")
    elif case == "base_model missing":
        fields["base_model"] = str(folder / "models/none")
    elif case == "base_model not a model":
        (folder / "junk.safetensors").write_bytes(b"garbage!garbage!")
        fields["base_model"] = str(folder / "junk.safetensors")
    elif case == "output_dir is a file":
        (folder / "outfile").write_text("x")
        fields["output_dir"] = str(folder / "outfile")
    path = write_config(folder, assets, **fields)
    if case == "YAML syntax error":
        path.write_text(path.read_text() + "learning_rate: [1e-4\n")
    elif case == "YAML list instead of a mapping":
        path.write_text("".join(f"- {line}\n" for line in path.read_text().splitlines()))
    return path, fields


BAD_INPUTS = [
    # case, field named in the error, words the message or fix must hold
    ("unknown key", "wibble", "unknown key"),
    ("typo'd key", "learning_rte", "did you mean 'learning_rate'"),
    ("negative learning rate", "learning_rate", "positive"),
    ("rank 0", "lora_rank", "positive"),
    ("batch_size 0", "batch_size", "positive"),
    ("missing data dir", "train_data_dir", "does not exist"),
    ("empty data dir", "train_data_dir", "dataset is empty"),
    # named by its line: the file name is the metadata's content, which errors never echo
    ("metadata names a missing image", "train_data_dir", "image file is missing: the image on line 26 of"),
    ("unreadable image", "train_data_dir", "not a readable image (UnidentifiedImageError): the image on line 2 of"),
    ("wrong metadata columns", "metadata_path", "file_name,text"),
    ("base_model missing", "base_model", "does not exist"),
    ("base_model not a model", "base_model", "not a model checkpoint"),
    ("output_dir is a file", "output_dir", "is a file"),
    ("YAML syntax error", "<yaml>", "YAML syntax error"),
    ("YAML list instead of a mapping", "<top level>", "expected a mapping"),
]


@pytest.mark.parametrize("case,field,words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_clearly_and_writes_nothing(case, field, words, tmp_path, assets):
    path, _ = _break(case, tmp_path, assets)
    before = sorted(p for p in tmp_path.rglob("*"))
    proc = subprocess.run([str(BIN / "lora-train"), "validate", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert f"{field}:" in err and words in err and "fix:" in err, err
    assert str(path) in err  # where: the file (and line when known)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["rank 0", "metadata names a missing image"])
def test_training_a_bad_config_exits_2_with_no_outputs(case, tmp_path, assets):
    path, _ = _break(case, tmp_path, assets)
    proc = subprocess.run([str(BIN / "lora-train"), "--config", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "fix:" in proc.stderr and not (tmp_path / "out").exists()


def test_skip_bad_images_skips_and_reports(tmp_path, assets):
    path, _ = _break("unreadable image", tmp_path, assets)
    path.write_text(path.read_text() + "skip_bad_images: true\n")
    proc = subprocess.run([str(BIN / "lora-train"), "validate", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "skipped the image on line 2 of" in proc.stdout and "23 samples" in proc.stdout


def test_txt_captions_when_no_metadata(tmp_path, assets):
    from trainer.data.images import scan_image_dataset

    data = tmp_path / "kohya"
    data.mkdir()
    import shutil

    for src in sorted(assets["shapes"].glob("*.png"))[:3]:
        shutil.copy(src, data / src.name)
        (data / src.name).with_suffix(".txt").write_text(f"caption of {src.stem}\n")
    scan = scan_image_dataset(data, None)
    assert not scan.problems and len(scan.samples) == 3
    assert scan.samples[0].caption.startswith("caption of ")


def test_alternative_metadata_columns(tmp_path, assets):
    from trainer.data.images import scan_image_dataset

    import shutil

    shutil.copytree(assets["shapes"], tmp_path / "d")
    (tmp_path / "d/metadata.csv").write_text("image,caption\n000_red_circle.png,a red circle\n")
    scan = scan_image_dataset(tmp_path / "d", tmp_path / "d/metadata.csv")
    assert [s.caption for s in scan.samples] == ["a red circle"]


def test_single_file_without_config_folder_says_what_to_provide(tmp_path, assets):
    from safetensors.torch import save_file
    import torch

    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(2)}, str(ckpt))
    path = write_config(tmp_path, assets, base_model=str(ckpt))
    proc = subprocess.run([str(BIN / "lora-train"), "validate", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "base_model_config" in proc.stderr and "model_index.json" in proc.stderr


FOREIGN_KEYS = [  # (keys set on a tiny SD config, the field refused, the families it names)
    ({"guidance_scale": 3.5}, "guidance_scale", "FLUX.1"),
    ({"max_sequence_length": 256}, "max_sequence_length", "FLUX.1"),
    ({"timestep_density": "uniform"}, "timestep_density", "FLUX.1"),
    ({"quantization": "fp8"}, "quantization", "FLUX.1 and causal language model"),
    ({"chat_template": "{{ messages }}"}, "chat_template", "causal language model"),
    ({"packing": True}, "packing", "causal language model"),
]


@pytest.mark.parametrize("fields,field,owners", FOREIGN_KEYS, ids=[f[1] for f in FOREIGN_KEYS])
def test_another_familys_key_on_an_sd_config_exits_2(fields, field, owners, tmp_path, assets):
    path = write_config(tmp_path, assets, **fields)
    proc = subprocess.run([str(BIN / "lora-train"), "validate", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{field}: applies only to {owners}" in proc.stderr, proc.stderr
    assert "base_model is a Stable Diffusion" in proc.stderr
    assert "fix: remove it, or train a" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_foreign_keys_at_their_default_or_null_are_no_error(tmp_path, assets):
    """Setting a key to its default (or null) changes nothing, so an output folder's config.yaml (every key
    written out) validates as it is; every problem of a bad config is reported at once."""
    quiet = write_config(tmp_path, assets, logit_mean=0.0, mode_scale=1.29, max_seq_length=512, truncation="cut",
                         guidance_scale=None)
    proc = subprocess.run([str(BIN / "lora-train"), "validate", str(quiet)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (tmp_path / "b").mkdir()
    loud = write_config(tmp_path / "b", assets, clip_skip=2, guidance_scale=3.5, logit_std=0.5, max_seq_length=256)
    proc = subprocess.run([str(BIN / "lora-train"), "validate", str(loud)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "3 problems" in proc.stderr and "clip_skip" not in proc.stderr  # clip_skip is SD's own
    for field in ("guidance_scale", "logit_std", "max_seq_length"):
        assert f"{field}: applies only to" in proc.stderr


def test_every_shipped_config_loads():
    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = sorted(p for p in root.glob("*.yaml") if p.name != "agentd.yaml")
    assert shipped, "configs/ ships example training configs"
    for p in shipped:
        cfg = load_config(p)
        assert cfg.output_dir.is_absolute()
        # SD/SDXL single files load from the shipped architecture configs (trainer/families/model_configs): an example
        # that sets base_model_config for one teaches users a key they do not need.
        if cfg.base_model.suffix in (".safetensors", ".ckpt") and cfg.mode != "text":
            assert cfg.base_model_config is None, f"{p.name}: base_model_config is not needed for {cfg.base_model.name}"
        assert "also needs base_model_config" not in p.read_text(), p.name


def test_schema_and_path_problems_in_one_pass_each_with_its_line(tmp_path, assets):
    # A bad type on line 4 and a train_data_dir (line 1) that does not exist: both, in line order; the path
    # checks run on the rest of the config (lora_rank's default standing in) and a problem of the model
    # found there (its path is fine) is not invented.
    from trainer.checks.preflight import preflight

    path = tmp_path / "bad.yaml"
    path.write_text(f"train_data_dir: ./missing\nbase_model: {assets['sd_model']}\noutput_dir: ./out\n"
                    "lora_rank: eight\n")
    with pytest.raises(ConfigError) as e:
        preflight(path)
    assert [(p.field, p.line) for p in e.value.problems] == [("train_data_dir", 1), ("lora_rank", 4)]
    assert f"{path}:1: train_data_dir: folder does not exist" in e.value.render()
    # A required key missing leaves nothing to check the paths with: the schema problems alone.
    path.write_text("train_data_dir: ./missing\noutput_dir: ./out\n")
    with pytest.raises(ConfigError) as e:
        preflight(path)
    assert [p.field for p in e.value.problems] == ["base_model"]


def test_foreground_device_follows_the_config_and_the_flag_overrides_it(tmp_path, assets, capsys):
    from trainer.cli import main
    from trainer.gpus import GpuFacts, NoSuchDevice, foreground_device

    def gpu(index, name, free):
        return GpuFacts(index=index, uuid=f"GPU-{index}aa", name=name, memory_total_mib=24576, memory_used_mib=0,
                        memory_free_mib=free, utilization_pct=0, temperature_c=40, cuda_version="12.4", processes=[])

    gpus = [gpu(0, "NVIDIA GeForce RTX 3090", 20000), gpu(1, "NVIDIA GeForce RTX 4090", 9000),
            gpu(2, "NVIDIA GeForce RTX 4090", 22000)]
    assert foreground_device(None, None, gpus) == (None, None)
    assert foreground_device(None, 1, gpus) == ("cuda:1", "device: 1 -> cuda:1 (NVIDIA GeForce RTX 4090)")
    assert foreground_device(None, "GPU-0", gpus)[0] == "cuda:0"
    assert foreground_device(None, "*4090*", gpus)[0] == "cuda:2"  # the freer of the two, as the gate would
    assert foreground_device("cpu", "*4090*", gpus) == ("cpu", "--device cpu overrides the config's device: *4090*")
    with pytest.raises(NoSuchDevice, match="matches no GPU"):
        foreground_device(None, "*a100*", gpus)
    # lora-train on this GPU-less box: the config's device: is refused as the daemon refuses it (exit 2,
    # with the line), and --device overrides it (a bad config elsewhere then stops it: nothing trains here).
    path = write_config(tmp_path, assets, device="*a100*", lora_rank=0)
    assert main(["--config", str(path)]) == 2
    assert "lora_rank" in capsys.readouterr().err
    path = write_config(tmp_path, assets, device="*a100*")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        assert main(["--config", str(path), "--device", "nosuch"]) == 1  # torch refuses the device name
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    out, err = capsys.readouterr()
    assert "--device nosuch overrides the config's device: *a100*" in out and "FAILED" in err
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "device: device '*a100*' matches no GPU on this box" in err and ":" in err.split("device:")[0]
