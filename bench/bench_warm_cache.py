"""Time to the first training step with the polite warm cache: cold vs warm-on-device vs warm-from-host.

    python bench/bench_warm_cache.py                  # the tiny demo model, each scenario 3 times
    python bench/bench_warm_cache.py --repeat 5
    python bench/bench_warm_cache.py --config X.yaml  # a real config (on a GPU box: its base model)

In one process (the daemon's situation: the training stack already imported), the same job runs through
`trainer.api.run_job` with the daemon's `BaseModelCache`:

    cold             an empty cache: the base model is loaded from disk onto the job's device
    warm-on-device   right after a job, within warm_vram_ttl_s: the base is still on the device
    warm-from-host   after the TTL ran out (`offload_expired`): the base waits in host memory and is
                     moved back to the device at the job's start (the move is timed separately)

Time to first step = from `api.run_job` to the first step event (config check excluded, as in the daemon).
With CUDA the bench also prints the VRAM this process holds (torch.cuda.memory_reserved) warm on the
device and after the TTL. On a CPU-only box the job's device *is* host memory: warm-from-host then takes
the warm-on-device path (nothing to move), which the table says.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_distributed import FirstStep  # noqa: E402 - beside this file; after the environment above


def one_job(config: Path, out: Path, cache, device: str, seed: int) -> FirstStep:
    import threading

    import yaml

    from trainer import api

    cfg = yaml.safe_load(config.read_text())
    cfg.update(output_dir=str(out), seed=seed, resume="never", max_train_steps=2, save_steps=1000, log_every=1)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    checked = api.preflight(path)
    rep = FirstStep()
    api.run_job(checked, rep, threading.Event(), base_cache=cache, device=device)
    return rep


def vram_mib() -> float | None:
    import torch

    return round(torch.cuda.memory_reserved() / 2**20, 1) if torch.cuda.is_available() else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help="training config (default: the tiny demo config)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()

    import torch

    from trainer.api import BaseModelCache

    work = Path(tempfile.mkdtemp(prefix="bench-warm-"))
    try:
        config = args.config
        if config is None:
            from trainer.dev.demo import write_demo_config

            config = write_demo_config(work / "demo")
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
        one_job(config, work / "prime", BaseModelCache(0), device, 0)  # imports and first-use costs, not timed
        rows = {"cold": [], "warm-on-device": [], "warm-from-host": []}
        moves, how = [], {}
        vram = {}
        for i in range(args.repeat):
            cache = BaseModelCache(1, warm_vram_ttl_s=3600)
            r = one_job(config, work / f"cold{i}", cache, device, i)
            rows["cold"].append(r.first_step_s)
            how["cold"] = r.warm
            r = one_job(config, work / f"dev{i}", cache, device, i)
            rows["warm-on-device"].append(r.first_step_s)
            how["warm-on-device"] = r.warm
            vram["warm on the device"] = vram_mib()
            cache.offload_expired(force=True)  # what the daemon's tick does once warm_vram_ttl_s ran out
            vram["after the TTL (host memory)"] = vram_mib()
            r = one_job(config, work / f"host{i}", cache, device, i)
            rows["warm-from-host"].append(r.first_step_s)
            how["warm-from-host"] = r.warm
            if r.move_s is not None:
                moves.append(r.move_s)
            del cache
        cold = statistics.median(rows["cold"])
        print(f"time to first step on {device} ({torch.__version__}), median of {args.repeat}; "
              f"config {config if args.config else 'tiny demo'}")
        print(f"{'scenario':<16} {'median s':>9} {'vs cold':>8}   base model   every run (s)")
        for name, values in rows.items():
            med = statistics.median(values)
            print(f"{name:<16} {med:>9.3f} {med / cold:>7.2f}x   {how[name] or '?':<12} "
                  + " ".join(f"{v:.3f}" for v in values))
        if moves:
            print(f"host -> {device} move of the base: median {statistics.median(moves):.3f} s")
        else:
            print("warm-from-host: the job's device is host memory here, so nothing moved "
                  "(same path as warm-on-device)")
        if device.startswith("cuda"):
            for k, v in vram.items():
                print(f"VRAM reserved by this process, {k}: {v} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
