"""The on-disk latent cache across jobs: a cold first job against a warm second job on the same data.

    python bench/bench_latent_cache.py                   # 48 images at 64 px, 1 epoch, 3 repeats
    python bench/bench_latent_cache.py --images 96 --resolution 128 --repeat 1

Each repeat runs, in one process and with the same tiny SD model, data and config (batch 4, rank 4,
`cache_latents_to_disk: true`, `cache_text_embeddings_to_disk: true`), `trainer.api.run_job` (what
`lora-train` and the daemon run) twice on a fresh cache folder:

    cold    the first job: the VAE encodes every image and the entries are written
    warm    the second job on the same data: every latent and text embedding read from disk

Reported (median over repeats): time to the first step (job start -> first step event: run bookkeeping,
the base model load, the cache build) and the epoch's time (first -> last step event), and warm / cold.
The VAE here is the tiny test VAE (16/32 channels): a real SD VAE costs ~100x more per image, so the
time-to-first-step saving grows with it, while the epoch time is the same by design (the latents sit in
memory during the epoch either way).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_data(folder: Path, images: int, size: int) -> Path:
    from trainer.dev.tiny import build_shapes_dataset

    return build_shapes_dataset(folder, count=images, size=size)


def job(assets: dict, data: Path, cache: Path, folder: Path, resolution: int) -> dict:
    import threading

    from tests.conftest import write_config
    from trainer import api

    stamps = []

    class Clock:
        def emit(self, ev):
            if ev.get("type") == "step":
                stamps.append(time.perf_counter())

    folder.mkdir(parents=True)
    path = write_config(folder, assets, train_data_dir=str(data), metadata_path=str(data / "metadata.csv"),
                        resolution=resolution, max_train_steps=None, epochs=1, save_steps=10_000, log_every=10_000,
                        cache_latents_to_disk=True, cache_text_embeddings_to_disk=True, cache_dir=str(cache))
    t0 = time.perf_counter()
    api.run_job(api.preflight(path), Clock(), threading.Event(), device="cpu")
    return {"first_step_s": stamps[0] - t0, "epoch_s": stamps[-1] - stamps[0], "steps": len(stamps)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from trainer.dev.tiny import demo_assets

    assets = demo_assets()
    rows = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        data = make_data(root / "data", args.images, args.resolution)
        for r in range(args.repeat):
            cache = root / f"cache-{r}"
            rows["cold"].append(job(assets, data, cache, root / f"cold-{r}", args.resolution))
            rows["warm"].append(job(assets, data, cache, root / f"warm-{r}", args.resolution))
            shutil.rmtree(cache)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("first_step_s", "epoch_s")} for k, v in rows.items()}
    steps = rows["cold"][0]["steps"]
    print(f"{args.images} images at {args.resolution} px, 1 epoch = {steps} steps, median of {args.repeat}")
    print(f"{'':6} {'time to first step':>20} {'epoch time':>12}")
    for k in ("cold", "warm"):
        print(f"{k:6} {med[k]['first_step_s']:>19.2f}s {med[k]['epoch_s']:>11.2f}s")
    print(f"{'warm/cold':10} {med['warm']['first_step_s'] / med['cold']['first_step_s']:>15.2f}x "
          f"{med['warm']['epoch_s'] / med['cold']['epoch_s']:>11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
