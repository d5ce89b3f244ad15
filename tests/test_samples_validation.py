"""Samples while training and validation loss, through the real trainer: kohya prompt files, fixed seeds,
fixed validation noise (equal across runs), side work that never changes training, failures as warnings,
early stopping, text mode, and the bad inputs (exit 2 with the field and the fix)."""
from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import BIN, write_config
from tests.test_train_text import write_text_config
from trainer.errors import ConfigError
from trainer.runs.outputs import read_loss_csv
from trainer.checks.preflight import preflight


def run_job(cfg: Path, stop_at: int | None = None):
    """The real job in-process (as the daemon runs it); `stop_at`: request a stop at that step."""
    from trainer.training.job import LoraTrainingJob

    stop = threading.Event()

    class StopAt:
        def emit(self, ev):
            if stop_at is not None and ev.get("type") == "step" and ev["step"] >= stop_at:
                stop.set()

    return LoraTrainingJob(preflight(cfg), StopAt(), stop).run()


def events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "logs/events.jsonl").read_text().splitlines()]


def test_prompt_file_in_kohyas_syntax(tmp_path, assets):
    from trainer.data.prompts import load_prompts

    f = tmp_path / "prompts.txt"
    f.write_text("# shapes\n\na red circle --n blurry, text --w 48 --h 32 --s 4 --l 5.5 --d 123 --ss euler_a\n"
                 "a blue square\n")
    cfg = preflight(write_config(tmp_path, assets, sample_prompts="prompts.txt", seed=7)).config
    prompts, problems = load_prompts(cfg)
    assert problems == []
    a, b = prompts
    assert (a.prompt, a.negative, a.width, a.height, a.steps, a.guidance, a.seed, a.sampler) == \
        ("a red circle", "blurry, text", 48, 32, 4, 5.5, 123, "euler_a")
    assert (b.prompt, b.width, b.height, b.seed, b.sampler) == ("a blue square", 32, 32, 8, "ddim")


BAD = [
    # case, config fields (None: file written below), field in the error, words
    ("prompt file missing", {"sample_prompts": "nope.txt"}, "sample_prompts", "prompt file does not exist"),
    ("json prompt file", {"sample_prompts": "p.json"}, "sample_prompts", ".json prompt files are not read"),
    ("unknown option", {"sample_prompts": "bad.txt"}, "sample_prompts", "bad.txt:3: option 1 is not a known option"),
    ("bad option value", {"sample_prompts": ["a cat --s many"]}, "sample_prompts", "sample_prompts[0]: the value of --s is not a valid steps"),
    ("split above 0.5", {"validation_split": 0.7}, "validation_split", "must be in (0, 0.5]"),
    ("split of 0", {"validation_split": 0}, "validation_split", "must be in (0, 0.5]"),
    ("split leaves no batch", {"validation_split": 0.5, "batch_size": 16}, "validation_split",
     "leaves 12 of 24 samples for training, fewer than one batch (16)"),
    ("sample every 0 steps", {"sample_every_n_steps": 0, "sample_prompts": ["a"]}, "sample_every_n_steps",
     "greater than 0"),
    ("compare_with not a run", {"compare_with": "."}, "compare_with", "is not a run folder"),
    ("early stopping without validation", {"early_stopping_patience": 2}, "early_stopping_patience",
     "needs a validation set"),
]


@pytest.mark.parametrize("case,fields,field,words", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_name_the_field_and_the_fix(case, fields, field, words, tmp_path, assets):
    (tmp_path / "bad.txt").write_text("a red circle --s 4\n# a comment\na blue square --x 3\n")
    path = write_config(tmp_path, assets, **fields)
    with pytest.raises(ConfigError) as e:
        preflight(path)
    text = e.value.render()
    assert f"{field}:" in text and words in text and "fix:" in text, text
    assert not (tmp_path / "out").exists()


def test_bad_prompt_file_exits_2_from_the_command_line(tmp_path, assets):
    (tmp_path / "bad.txt").write_text("a blue square --q 3\n")
    path = write_config(tmp_path, assets, sample_prompts="bad.txt")
    proc = subprocess.run([str(BIN / "lora-train"), "--config", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "bad.txt:1: option 1 is not a known option" in proc.stderr and "fix:" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_validation_split_depends_on_the_data_alone():
    from trainer.data.images import Sample
    from trainer.data.holdout import split

    samples = [Sample(Path(f"/d/{i:02d}.png"), "") for i in range(20)]
    train, val = split(samples, 0.2)
    assert len(val) == 4 and len(train) == 16 and not set(train) & set(val)
    assert split(list(reversed(samples)), 0.2)[1] == [s for s in reversed(samples) if s in val]


def test_should_stop():
    from trainer.training.validation_loss import should_stop

    assert not should_stop([1.0, 0.9, 0.8], 2)
    assert not should_stop([1.0, 0.9, 0.95], 2)
    assert should_stop([1.0, 0.9, 0.95, 0.91], 2)
    assert not should_stop([1.0, 0.9, 0.95, 0.85], 2)


@pytest.fixture
def validation_dir(tmp_path, assets) -> Path:
    """A separate validation set: 5 of the shapes with .txt captions (no metadata.csv)."""
    import csv

    d = tmp_path / "val"
    d.mkdir()
    rows = list(csv.DictReader((assets["shapes"] / "metadata.csv").open()))[:5]
    for r in rows:
        shutil.copy(assets["shapes"] / r["file_name"], d / r["file_name"])
        (d / r["file_name"]).with_suffix(".txt").write_text(r["text"])
    return d


def test_side_work_never_changes_training_and_validation_is_fixed(tmp_path, assets, validation_dir):
    extras = dict(validation_data_dir=str(validation_dir), validate_every_n_steps=2, sample_every_n_steps=2,
                  sample_at_start=True, sample_prompts=["a red circle --s 3", "a blue square --s 3 --ss euler"])
    plain = write_config(tmp_path / "plain", assets) if (tmp_path / "plain").mkdir() is None else None
    a = write_config(tmp_path / "a", assets, **extras) if (tmp_path / "a").mkdir() is None else None
    b = write_config(tmp_path / "b", assets, **extras) if (tmp_path / "b").mkdir() is None else None
    for cfg in (plain, a, b):
        assert run_job(cfg).outcome == "succeeded"
    rows = {k: read_loss_csv(c.parent / "out/logs/loss.csv") for k, c in (("plain", plain), ("a", a), ("b", b))}
    assert [r["loss"] for r in rows["plain"]] == [r["loss"] for r in rows["a"]] == [r["loss"] for r in rows["b"]]
    val_a = [(r["step"], r["val_loss"]) for r in rows["a"] if r["val_loss"]]
    assert [s for s, _ in val_a] == ["2", "4", "6"]
    assert val_a == [(r["step"], r["val_loss"]) for r in rows["b"] if r["val_loss"]], "same data: same validation"
    assert not any(r["val_loss"] for r in rows["plain"])

    out = a.parent / "out"
    for step in (0, 2, 4, 6):
        assert sorted(p.name for p in (out / f"samples/step-{step:08d}").iterdir()) == ["00.png", "01.png"]
    assert (out / "samples/step-00000000/00.png").read_bytes() == \
        (b.parent / "out/samples/step-00000000/00.png").read_bytes(), "fixed seeds"
    from PIL import Image

    with Image.open(out / "samples/grid.png") as grid:
        assert grid.width > grid.height > 0  # 4 columns (steps 0, 2, 4, 6) x 2 rows
    evs = events(out)
    samples = [e for e in evs if e["type"] == "sample"]
    assert [e["step"] for e in samples] == [0, 2, 4, 6] and all(e["seconds"] > 0 for e in samples)
    assert [e["step"] for e in evs if e["type"] == "validation"] == [2, 4, 6]
    summary = read_loss_csv(out / "logs/summary.csv")[0]
    assert float(summary["val_loss"]) == float(val_a[-1][1]) and float(summary["sampling_s"]) > 0
    run = json.loads((out / "run.json").read_text())
    assert run["dataset"]["validation_samples"] == 5
    manifest = json.loads((out / "run-manifest.json").read_text())["files"]
    assert "samples/step-00000002/01.png" in manifest and "samples/grid.png" in manifest


def test_stopped_and_resumed_with_sampling_and_validation_is_identical(tmp_path, assets):
    extras = dict(validation_split=0.25, batch_size=2, validate_every_n_steps=2, sample_every_n_steps=2,
                  sample_prompts=["a red circle --s 3"], max_train_steps=6, save_steps=2)
    ref = write_config(tmp_path / "ref", assets, **extras) if (tmp_path / "ref").mkdir() is None else None
    cut = write_config(tmp_path / "cut", assets, **extras) if (tmp_path / "cut").mkdir() is None else None
    assert run_job(ref).outcome == "succeeded"
    assert run_job(cut, stop_at=3).outcome == "cancelled"
    assert run_job(cut).outcome == "succeeded"
    r, c = (read_loss_csv(x.parent / "out/logs/loss.csv") for x in (ref, cut))
    assert [(x["step"], x["loss"], x["val_loss"]) for x in r] == [(x["step"], x["loss"], x["val_loss"]) for x in c]
    evs = events(cut.parent / "out")
    assert [e["step"] for e in evs if e["type"] == "validation"] == [2, 4, 6], "each validation once"
    assert (cut.parent / "out/logs/loss.png").is_file()


def test_a_sample_that_fails_is_a_warning(tmp_path, assets):
    cfg = write_config(tmp_path, assets, sample_every_n_steps=3, sample_prompts=["a red circle --s 2", "a square --s 2"])
    (tmp_path / "out/samples/step-00000003/00.png").mkdir(parents=True)  # that image cannot be written
    result = run_job(cfg)
    assert result.outcome == "succeeded"
    warnings = [e["message"] for e in events(tmp_path / "out") if e["type"] == "warning"]
    assert any("sample 0 ('a red circle') at step 3 failed" in w for w in warnings), warnings
    assert (tmp_path / "out/samples/step-00000003/01.png").is_file()
    assert (tmp_path / "out/samples/step-00000006/00.png").is_file()


def test_early_stopping_ends_the_run_successfully(tmp_path, assets):
    cfg = write_config(tmp_path, assets, validation_split=0.25, batch_size=2, validate_every_n_steps=1,
                       early_stopping_patience=1, learning_rate=0.5, max_train_steps=30, save_steps=100)
    result = run_job(cfg)
    assert result.outcome == "succeeded" and result.steps < 30
    evs = events(tmp_path / "out")
    assert any("early stopping at step" in e.get("message", "") for e in evs)
    vals = [e["val_loss"] for e in evs if e["type"] == "validation"]
    assert len(vals) == result.steps and vals[-1] >= min(vals[:-1])
    run = json.loads((tmp_path / "out/run.json").read_text())
    assert run["status"] == "succeeded" and run["steps"]["done"] == result.steps


def test_text_mode_completions_and_held_out_text(tmp_path, assets):
    cfg = write_text_config(tmp_path, assets, validation_split=0.25, validate_every_n_steps=3,
                            sample_prompts=["the red "], sample_every_n_steps=3, batch_size=2)
    assert run_job(cfg).outcome == "succeeded"
    out = tmp_path / "out"
    rows = read_loss_csv(out / "logs/loss.csv")
    assert [r["step"] for r in rows if r["val_loss"]] == ["3", "6"]
    for step in (3, 6):
        assert (out / f"samples/step-{step:08d}/00.txt").read_text().startswith("the red")
    assert not (out / "samples/grid.png").exists()
    assert "the red" in (out / "report.html").read_text()
