"""One job on W=2 data-parallel CPU ranks (gloo) vs W=1, the same config and global batch, side by side.

    python bench/bench_distributed.py                 # tiny SD, 32 px, batch 4, 30 steps, W=1 then W=2
    python bench/bench_distributed.py --steps 60 --resolution 64

Both run through `trainer.api.run_job` in this process (the training stack already imported, as in a
daemon): W=1 trains here; W=2 spawns two rank processes (each imports torch and loads the base from disk:
the warm cache is this process's memory, which spawned ranks do not share). Printed per W:

    start      run_job to the first step event (W=2: spawning, imports, rendezvous, both ranks loading)
    samples/s  the mean of logs/summary.csv's samples_per_s (the last 10 steps: steady state)

and the ratios W=2 / W=1. On a 2-core machine two ranks of one intra-op thread each use both cores, so the
step time halves at best, minus the all-reduce and the per-step broadcast; on tiny models the fixed per-step
cost (Python, optimizer, collectives) dominates, which is why the figure is what it is.
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class FirstStep:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.first_step_s = None

    def emit(self, ev) -> None:
        if ev.get("type") == "step" and self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.t0


def run(folder: Path, assets: dict, devices: int | None, args) -> tuple[float, float]:
    import yaml

    from trainer import api

    fields = {"train_data_dir": str(assets["shapes"]), "metadata_path": str(assets["shapes"] / "metadata.csv"),
              "base_model": str(assets["sd_model"]), "resolution": args.resolution, "lora_rank": 4,
              "batch_size": args.batch, "learning_rate": 1e-4, "max_train_steps": args.steps,
              "save_steps": args.steps, "log_every": 10, "cache_latents": True, "seed": 1,
              "output_dir": str(folder / "out"), "devices": devices}
    folder.mkdir(parents=True)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in fields.items() if v is not None}))
    checked = api.preflight(path)
    watch = FirstStep()
    result = api.run_job(checked, watch, threading.Event())
    assert result.outcome == "succeeded", result
    with open(folder / "out/logs/summary.csv") as f:
        row = next(csv.DictReader(f))
    return watch.first_step_s, float(row["samples_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=32)
    args = p.parse_args()
    from trainer.dev.tiny import demo_assets

    assets = demo_assets()
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    try:
        w1 = run(root / "w1", assets, None, args)
        w2 = run(root / "w2", assets, 2, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"tiny SD {args.resolution} px, global batch {args.batch}, {args.steps} steps, {os.cpu_count()} cores")
    print("| W | start s | samples/s |")
    print("|---|---|---|")
    for w, (start, rate) in ((1, w1), (2, w2)):
        print(f"| {w} | {start:.2f} | {rate:.1f} |")
    print(f"W=2 / W=1: start {w2[0] / w1[0]:.2f}x, samples/s {w2[1] / w1[1]:.2f}x")


if __name__ == "__main__":
    main()
