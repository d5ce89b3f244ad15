"""kohya-style datasets: N_name folders with repeats, datasets: lists with is_reg, aspect-ratio buckets,
caption options, and the bad inputs kohya users hit. Real files, the real scan, real (tiny) training."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import BIN
from trainer.data.images import (CaptionOptions, epoch_batches, epoch_items, make_bucket_resolutions, process_caption,
                          select_bucket)
from trainer.errors import ConfigError
from trainer.checks.preflight import preflight


def image(path: Path, size: tuple[int, int], colour=(200, 40, 40), caption: str | None = None) -> Path:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    im = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(im).ellipse((w // 8, h // 8, w - w // 8, h - h // 8), fill=colour)
    im.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def config(folder: Path, assets, **fields) -> Path:
    base = {"base_model": str(assets["sd_model"]), "resolution": 32, "lora_rank": 4, "batch_size": 2,
            "learning_rate": "2e-3", "max_train_steps": 4, "save_steps": 100, "seed": 3,
            "output_dir": str(folder / "out")}
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({**base, **fields}, sort_keys=False))
    return path


def problems(path: Path) -> list:
    with pytest.raises(ConfigError) as e:
        preflight(path)
    return e.value.problems


# --- buckets: kohya's rule ------------------------------------------------------------------------

def test_bucket_resolutions_follow_kohya():
    resos = make_bucket_resolutions(512, 256, 1024, 64)
    # Worked by hand from the rule: height = min(max, floor(512^2 / width / 64) * 64), kept if >= 256.
    assert resos == sorted({(256, 1024), (1024, 256), (320, 768), (768, 320), (384, 640), (640, 384),
                            (448, 576), (576, 448), (512, 512), (704, 320), (320, 704), (832, 256),
                            (256, 832), (896, 256), (256, 896), (960, 256), (256, 960)})
    assert all(w * h <= 512 * 512 for w, h in resos)


@pytest.mark.parametrize("size, bucket, resized", [
    ((512, 512), (512, 512), (512, 512)),     # its own size is a bucket
    ((1000, 500), (704, 320), (704, 352)),    # aspect 2.0: nearest is 704x320 (2.2); scaled to cover, cropped
    ((300, 1200), (256, 1024), (256, 1024)),  # aspect 0.25 exactly
    ((640, 480), (576, 448), (597, 448)),     # 1.33 -> 576x448 (1.29): height fits, width cropped
])
def test_bucket_assignment_follows_kohya(size, bucket, resized):
    resos = make_bucket_resolutions(512, 256, 1024, 64)
    assert select_bucket(*size, resos, 512, 64) == (bucket, resized)


@pytest.mark.parametrize("size, bucket, resized", [
    ((200, 100), (192, 64), (200, 100)),      # smaller than the area: kept, bucket rounded down to the step
    ((2000, 1000), (640, 320), (640, 320)),   # larger: shrunk to the area, the side that keeps 2.0 exact
])
def test_bucket_no_upscale_follows_kohya(size, bucket, resized):
    resos = make_bucket_resolutions(512, 256, 1024, 64)
    assert select_bucket(*size, resos, 512, 64, no_upscale=True) == (bucket, resized)


def test_mixed_aspect_dataset_trains_one_bucket_per_batch(assets, tmp_path):
    from diffusers import UNet2DConditionModel

    from trainer.training.job import LoraTrainingJob

    for i, size in enumerate([(32, 32), (48, 24), (24, 48), (32, 32), (48, 24), (24, 48), (40, 32)]):
        image(tmp_path / "data" / f"{i}.png", size, caption="a red circle")
    cfg = config(tmp_path, assets, train_data_dir="data", enable_bucket=True, min_bucket_reso=16,
                 max_bucket_reso=64, bucket_reso_steps=8, batch_size=2, max_train_steps=None, epochs=2)
    checked = preflight(cfg)
    buckets = {s.path.name: s.bucket for s in checked.scan.samples}
    assert buckets["0.png"] == (32, 32) and buckets["1.png"] == (40, 24) and buckets["2.png"] == (24, 40)
    for epoch in (0, 1):
        batches = epoch_batches(checked.scan.samples, 3, epoch, 2)
        assert sorted(i for b in batches for i in b) == list(range(7))
        assert all(len({checked.scan.samples[i].bucket for i in b}) == 1 for b in batches)
    assert epoch_batches(checked.scan.samples, 3, 0, 2) != epoch_batches(checked.scan.samples, 3, 1, 2)

    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(tuple(args[0].shape)) if isinstance(m, UNet2DConditionModel) else None)
    try:
        result = LoraTrainingJob(checked).run()
    finally:
        hook.remove()
    assert result.outcome == "succeeded"
    # Latents are half the pixels (the tiny VAE's factor 2): three bucket shapes reached the UNet.
    assert {s[2:] for s in seen} == {(16, 16), (12, 20), (20, 12)}
    assert result.steps == 2 * len(epoch_batches(checked.scan.samples, 3, 0, 2))


# --- repeats ----------------------------------------------------------------------------------------

def test_repeat_folders_count_in_the_epoch(assets, tmp_path):
    from trainer.runs.outputs import read_loss_csv

    for i in range(2):
        image(tmp_path / "data/3_cat" / f"{i}.png", (32, 32))
    for i in range(4):
        image(tmp_path / "data/1_dog" / f"{i}.png", (32, 32), caption="a dog, sitting")
    cfg = config(tmp_path, assets, train_data_dir="data", batch_size=1, max_train_steps=None, epochs=1)
    checked = preflight(cfg)
    samples = checked.scan.samples
    assert len(epoch_items(samples)) == 10  # 3 x 2 cats + 1 x 4 dogs
    captions = {(s.path.parent.name, s.path.name): s.caption for s in samples}
    assert captions[("3_cat", "0.png")] == "cat"  # no caption file: the folder's class tokens
    assert captions[("1_dog", "0.png")] == "a dog, sitting"
    proc = subprocess.run([str(BIN / "lora-train"), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(read_loss_csv(tmp_path / "out/logs/loss.csv")) == 10  # epochs: 1 means 10 samples, batch 1
    import json

    run = json.loads((tmp_path / "out/run.json").read_text())
    assert run["dataset"]["samples"] == 6 and run["dataset"]["samples_per_epoch"] == 10


def test_datasets_list_with_regularization(assets, tmp_path):
    for i in range(3):
        image(tmp_path / "cat" / f"{i}.png", (32, 32), caption="sks cat")
    image(tmp_path / "reg" / "0.png", (32, 32), colour=(40, 40, 200))
    cfg = config(tmp_path, assets, datasets=[{"image_dir": "cat", "num_repeats": 2},
                                             {"image_dir": "reg", "is_reg": True, "class_tokens": "cat"}],
                 prior_loss_weight=0.5)
    checked = preflight(cfg)
    samples = checked.scan.samples
    items = epoch_items(samples)
    reg = [i for i in items if samples[i].is_reg]
    assert len(items) == 12 and len(reg) == 6  # kohya's balance: as many reg items as training items
    from trainer.families import family

    ds = family("sd").make_dataset(checked.config, samples)
    assert [ds.loss_weight(i) for i in range(len(samples))] == [1.0, 1.0, 1.0, 0.5]
    assert ds.caption(3) == "cat"


def test_time_ids_geometry_is_what_the_pipeline_did(assets, tmp_path):
    from trainer.families import family

    image(tmp_path / "data/0.png", (48, 24))
    cfg = config(tmp_path, assets, train_data_dir="data", enable_bucket=True, min_bucket_reso=16,
                 max_bucket_reso=64, bucket_reso_steps=8)
    checked = preflight(cfg)
    item = family("sd").make_dataset(checked.config, checked.scan.samples).load_item(0)
    # 48x24 (aspect 2) -> bucket 40x24 (w x h), resized 48x24, center crop 4 px from the left.
    assert item.original_size == (24, 48) and item.target_size == (24, 40) and item.crop_top_left == (0, 4)
    assert tuple(item.pixels.shape) == (3, 24, 40)


# --- captions ---------------------------------------------------------------------------------------

def test_caption_options_are_kohyas_and_resumable():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1, caption_prefix="masterpiece,")
    caption = "sks, red, circle, white background, photo"
    outs = [process_caption(caption, opts, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(o.startswith("masterpiece, ") for o in outs)  # the prefix is the kept first tag
    assert all(sorted(o.split(", ")) == sorted(["masterpiece", *caption.split(", ")]) for o in outs)
    assert len(set(outs)) > 1
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert process_caption(caption, opts, g1) == process_caption(caption, opts, g2)  # same state, same caption
    assert process_caption(caption, opts) == "masterpiece, " + caption  # no generator: the fixed caption
    sep = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    for s in range(5):
        out = process_caption("a, b ||| c, d, e ||| f", sep, torch.Generator().manual_seed(s))
        assert out.startswith("a, b, ") and out.endswith(", f") and "|||" not in out
    drop = CaptionOptions(caption_dropout_rate=1.0)
    assert process_caption(caption, drop, torch.Generator()) == ""
    tags = CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1)
    dropped = [process_caption(caption, tags, torch.Generator().manual_seed(s)) for s in range(10)]
    assert all(d.startswith("sks") for d in dropped) and min(len(d.split(", ")) for d in dropped) < 5


def test_cached_text_embeddings_with_shuffling_is_an_error(assets, tmp_path):
    image(tmp_path / "data/0.png", (32, 32), caption="a, b")
    cfg = config(tmp_path, assets, train_data_dir="data", shuffle_caption=True, cache_text_embeddings=True)
    (p,) = [p for p in problems(cfg) if p.field == "cache_text_embeddings"]
    assert "shuffle_caption" in p.message and "computed once per caption" in p.message
    # Left at its default, the in-memory cache quietly yields to varying captions.
    cfg = config(tmp_path, assets, train_data_dir="data", shuffle_caption=True)
    assert not preflight(cfg).config.text_outputs_cached


# --- bad input ----------------------------------------------------------------------------------------

def run_validate(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lora-train"), "validate", str(cfg)], capture_output=True, text=True,
                          timeout=300)


def test_bad_repeat_folders_say_how_to_rename(assets, tmp_path):
    image(tmp_path / "data/0_cat/0.png", (32, 32))
    image(tmp_path / "data/abc_dog/0.png", (32, 32))
    (tmp_path / "data/5_empty").mkdir(parents=True)
    cfg = config(tmp_path, assets, train_data_dir="data")
    proc = run_validate(cfg)
    assert proc.returncode == 2
    err = proc.stderr
    assert "'0_cat' has 0 repeats" in err and "rename it to e.g. 1_cat" in err
    assert "'abc_dog' does not start with a repeat count" in err and "1_abc_dog" in err
    assert "N_name folders with no images inside: 5_empty" in err
    assert not (tmp_path / "out").exists()


def test_only_empty_repeat_folders(assets, tmp_path):
    (tmp_path / "data/10_cat").mkdir(parents=True)
    (tmp_path / "data/2_dog").mkdir(parents=True)
    (p,) = problems(config(tmp_path, assets, train_data_dir="data"))
    assert p.field == "train_data_dir" and "10_cat, 2_dog" in p.message


def test_bucket_settings_that_cannot_work(assets, tmp_path):
    image(tmp_path / "data/0.png", (32, 32))
    found = problems(config(tmp_path, assets, train_data_dir="data", enable_bucket=True, min_bucket_reso=512,
                            max_bucket_reso=256))
    assert any(p.field == "min_bucket_reso" and "larger than max_bucket_reso" in p.message for p in found)
    found = problems(config(tmp_path, assets, train_data_dir="data", enable_bucket=True, bucket_reso_steps=5,
                            min_bucket_reso=15, max_bucket_reso=60))
    (p,) = [p for p in found if p.field == "bucket_reso_steps"]
    assert "multiple of 2" in p.message and "VAE downscales by 2" in p.message  # the tiny VAE's factor


def test_train_data_dir_that_is_itself_a_repeat_folder_warns(assets, tmp_path):
    image(tmp_path / "10_cat/0.png", (32, 32), caption="cat")
    checked = preflight(config(tmp_path, assets, train_data_dir="10_cat"))
    assert any("itself a kohya N_name folder" in w and "point train_data_dir at its parent" in w
               for w in checked.warnings)


def test_no_upscale_image_smaller_than_a_step(assets, tmp_path):
    image(tmp_path / "data/0.png", (32, 32))
    image(tmp_path / "data/1.png", (32, 6))
    (p,) = problems(config(tmp_path, assets, train_data_dir="data", enable_bucket=True, bucket_no_upscale=True,
                           min_bucket_reso=16, max_bucket_reso=64, bucket_reso_steps=8))
    assert p.field == "bucket_no_upscale" and "1.png" in p.message and "shorter than bucket_reso_steps (8 px)" in p.message
