"""The dataset lint `validate` prints: real images on disk, the real tokenizer, the CLI's JSON and text."""
from __future__ import annotations

import json
import shutil
import subprocess

from tests.conftest import BIN
from tests.test_datasets import config, image


def validate(cfg, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "agentd"), "validate", str(cfg), "--vram", "24GiB", *args],
                          capture_output=True, text=True, timeout=300)


def test_lint_reports_each_subset(assets, tmp_path):
    cat = tmp_path / "cat"
    image(cat / "0.png", (32, 32), caption="sks, cat, sitting")
    image(cat / "1.png", (48, 24), caption="sks, cat")                          # 2 tags < keep_tokens 3
    image(cat / "2.png", (12, 12), caption="sks, cat, tiny")                    # shorter side < 32 / 2
    image(cat / "3.png", (32, 32), colour=(0, 150, 0))                          # no caption, no class tokens
    shutil.copy(cat / "0.png", cat / "4.png")                                   # an exact duplicate
    (cat / "4.txt").write_text("sks, cat, red circle white background photo of a red circle on white")  # > 14 tokens
    image(tmp_path / "reg/0.png", (32, 32), colour=(10, 10, 200))
    cfg = config(tmp_path, assets, enable_bucket=True, min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8,
                 keep_tokens=3, datasets=[{"image_dir": "cat", "num_repeats": 2},
                                          {"image_dir": "reg", "is_reg": True, "class_tokens": "cat"}])
    proc = validate(cfg, "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)["dataset"]
    assert report["samples_per_epoch"] == 20  # 5 x 2 training items + as many reg items
    cat_r, reg_r = report["subsets"]
    assert (cat_r["images"], cat_r["repeats"], cat_r["samples_per_epoch"]) == (5, 2, 10)
    assert cat_r["buckets"] == {"32x32": 4, "40x24": 1}  # the 12 px image is upscaled into 32x32
    assert cat_r["without_caption"] == 1 and cat_r["tiny_images"] == ["2.png"]
    assert cat_r["duplicates"] == [["0.png", "4.png"]]
    from transformers import CLIPTokenizerFast

    tok = CLIPTokenizerFast.from_pretrained(str(assets["sd_model"] / "tokenizer"))
    lengths = [len(tok((cat / f"{i}.txt").read_text(), add_special_tokens=False).input_ids) for i in (0, 1, 2, 4)]
    assert cat_r["tokens"] == {"limit": 14, "max": max(lengths), "truncated": sum(n > 14 for n in lengths)}
    assert cat_r["tokens"]["truncated"] >= 1  # the long caption at least (the tiny tokenizer: 16 - 2)
    assert cat_r["top_tags"][0] == ["sks", 4] and ["cat", 4] in cat_r["top_tags"]
    assert reg_r["is_reg"] and reg_r["samples_per_epoch"] == 10
    assert report["regularization"]["reg_items"] == 10 and "repeat to match" in report["regularization"]["note"]
    warnings = "\n".join(report["warnings"])
    scan_warnings = "\n".join(json.loads(proc.stdout)["warnings"])  # from the scan: agentd run prints them too
    assert "datasets[0] (cat): keep_tokens is 3 but 1 caption(s) have fewer tags: 1.png (2 tags)" in scan_warnings
    assert "1 of 5 images have no caption" in warnings and "under half the resolution" in warnings
    assert "are cut" in warnings and "exact duplicates" in warnings

    text = validate(cfg)
    assert text.returncode == 0
    assert "dataset: 20 samples per epoch" in text.stdout and "cat): 5 images x 2 repeats = 10 per epoch" in text.stdout
    assert "top tags: sks (4)" in text.stdout and "regularization: 1 images -> 10 items" in text.stdout


def test_an_image_in_both_training_and_regularization_is_an_error(assets, tmp_path):
    image(tmp_path / "cat/0.png", (32, 32), caption="cat")
    image(tmp_path / "cat/1.png", (32, 32), colour=(0, 200, 0), caption="cat")
    (tmp_path / "reg").mkdir()
    shutil.copy(tmp_path / "cat/0.png", tmp_path / "reg/0.png")
    cfg = config(tmp_path, assets, datasets=[{"image_dir": "cat"}, {"image_dir": "reg", "is_reg": True}])
    proc = validate(cfg)
    assert proc.returncode == 2
    assert "the same image is a training and a regularization image" in proc.stderr
    data = json.loads(validate(cfg, "--json").stdout)
    assert data["valid"] is False and data["dataset"]["errors"]
