"""Latents (and text embeddings) cached on disk across jobs: the second job runs the VAE zero times, a changed
image or VAE is a miss, `agentd gc` prunes old entries. The VAE's encoder calls are counted by a forward hook
on the real diffusers module."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import torch

from tests.conftest import BIN, write_config


def encoder_calls(job_setup) -> int:
    """How many images the VAE encoder saw while `job_setup()` ran."""
    from diffusers.models.autoencoders.vae import Encoder

    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[0]) if isinstance(m, Encoder) else None)
    try:
        job_setup()
    finally:
        hook.remove()
    return sum(seen)


def setup_job(cfg: Path):
    """A job's setup (which builds its caches) and cleanup: no training needed to count encodes."""
    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    def run():
        job = LoraTrainingJob(preflight(cfg))
        try:
            job.setup()
        finally:
            job.cleanup()
    return run


def data_copy(assets, folder: Path, count: int = 6) -> Path:
    folder.mkdir(parents=True)
    rows = (assets["shapes"] / "metadata.csv").read_text().splitlines()[: count + 1]
    for row in rows[1:]:
        shutil.copy(assets["shapes"] / row.split(",")[0], folder)
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_second_job_never_runs_the_vae_and_changes_are_misses(assets, tmp_path):
    data = data_copy(assets, tmp_path / "data")
    cache = tmp_path / "cache"

    def cfg(name, model=assets["sd_model"]):
        folder = tmp_path / name
        folder.mkdir()
        return write_config(folder, assets, train_data_dir=str(data), metadata_path=str(data / "metadata.csv"),
                            base_model=str(model), cache_latents_to_disk=True, cache_dir=str(cache),
                            cache_text_embeddings_to_disk=True)

    assert encoder_calls(setup_job(cfg("first"))) == 6
    entries = sorted((cache / "latents").rglob("*.safetensors"))
    captions = {row.split(",", 1)[1] for row in (data / "metadata.csv").read_text().splitlines()[1:]}
    assert len(entries) == 6 and len(list((cache / "text").rglob("*.safetensors"))) == len(captions)
    assert encoder_calls(setup_job(cfg("second"))) == 0  # same data, same VAE: all from disk

    from PIL import Image

    first = sorted(data.glob("*.png"))[0]
    with Image.open(first) as im:
        im = im.convert("RGB")
        im.putpixel((0, 0), (0, 0, 0))
        im.save(first)
    assert encoder_calls(setup_job(cfg("changed-image"))) == 1  # exactly the changed image

    model = tmp_path / "other-vae"
    shutil.copytree(assets["sd_model"], model)
    from safetensors.torch import load_file, save_file

    weights = next((model / "vae").glob("*.safetensors"))
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("conv_in.weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(weights))
    assert encoder_calls(setup_job(cfg("changed-vae", model))) == 6  # another VAE: nothing stale reused


def test_cached_run_trains_like_an_uncached_one(assets, tmp_path):
    """Latents from disk are the numbers the VAE gave: the LoRA is bit-identical with and without them."""
    from safetensors.torch import load_file

    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    data = data_copy(assets, tmp_path / "data")
    outs = []
    for name, extra in (("plain", {}), ("cold", {"cache_latents_to_disk": True}), ("warm", {"cache_latents_to_disk": True})):
        folder = tmp_path / name
        folder.mkdir()
        cfg = write_config(folder, assets, train_data_dir=str(data), metadata_path=str(data / "metadata.csv"),
                           cache_dir=str(tmp_path / "cache"), max_train_steps=3, **extra)
        assert LoraTrainingJob(preflight(cfg)).run().outcome == "succeeded"
        outs.append(load_file(str(folder / "out/out.safetensors")))
    assert all(torch.equal(outs[0][k], o[k]) for o in outs[1:] for k in outs[0])


def test_gc_prunes_cache_entries_unused_for_retention_days(assets, tmp_path):
    data = data_copy(assets, tmp_path / "data", count=2)
    cache = tmp_path / "daemon-cache"
    folder = tmp_path / "job"
    folder.mkdir()
    cfg = write_config(folder, assets, train_data_dir=str(data), metadata_path=str(data / "metadata.csv"),
                       cache_latents_to_disk=True)
    env = {**os.environ, "AGENTD_CACHE_DIR": str(cache)}  # what `agentd serve` sets from its cache_dir
    env.pop("CACHE_DIRECTORY", None)
    proc = subprocess.run([str(BIN / "lora-train"), "--config", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    entries = sorted((cache / "latents").rglob("*.safetensors"))
    assert len(entries) == 2
    old = time.time() - 40 * 86400
    os.utime(entries[0], (old, old))  # unused for 40 days; the other was just used
    settings = tmp_path / "agentd.yaml"
    settings.write_text(f"state_dir: {tmp_path / 'state'}\ncache_dir: {cache}\nretention_days: 30\n"
                        f"socket: {tmp_path / 's.sock'}\n")
    dry = subprocess.run([str(BIN / "agentd"), "gc", "--config", str(settings), "--dry-run"], capture_output=True,
                         text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert f"would remove latent-cache {entries[0]}" in dry.stdout and str(entries[1]) not in dry.stdout
    assert entries[0].exists()
    real = subprocess.run([str(BIN / "agentd"), "gc", "--config", str(settings)], capture_output=True, text=True,
                          timeout=120)
    assert real.returncode == 0 and not entries[0].exists() and entries[1].exists()
