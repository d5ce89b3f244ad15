"""One job on W=2 data-parallel CPU ranks (gloo) vs W=1, the same config and global batch, side by side.

    python bench/bench_distributed.py                 # tiny SD, 32 px, batch 4, 30 steps, W=1 then W=2
    python bench/bench_distributed.py --steps 60 --resolution 64 --repeat 5
    python bench/bench_distributed.py --base DIR --warm-start-only   # another SD folder (e.g. a full-size SD1.5)

Everything runs through `trainer.api.run_job` in this process (the training stack already imported, as in a
daemon): W=1 trains here; W=2 forks two rank processes from torch.multiprocessing's forkserver. Two tables:

1. Speed, no warm cache (as `lora-train`): per W, `start` (run_job to the first step event) and `samples/s`
   (the mean of logs/summary.csv's samples_per_s over the last 10 steps: steady state), and W=2 / W=1.
   On a 2-core machine two ranks of one intra-op thread each use both cores, so the step time halves at best,
   minus the all-reduce and the per-step broadcast; on tiny models the fixed per-step cost (Python, optimizer,
   collectives) dominates, which is why the figure is what it is.
2. Warm start, the daemon's situation (one `BaseModelCache` kept between jobs, the forkserver already up), the
   median over --repeat runs of run_job to the started event (the set-up done: base, task, caches; what the
   warm cache changes) and to the first step event (one step more):
       W=1 warm           the base warm in the cache (the W=1 path the daemon already had)
       W=2 shared         the ranks take the cached base through shared memory (trainer/training/shared_base.py)
       W=2 shared, empty  a fresh cache: the launcher loads the base into it once, then shares it
       W=2 from disk      no cache: each rank loads the base from disk (`lora-train`)
   with the ranks' memory at their first step (/proc: peak RSS, private RSS and shared-memory RSS, the largest
   rank), and the ratios against W=1 warm and W=2 from disk.
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import shutil
import statistics
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
    """A reporter that notes when the first step event arrives, how the base was had (and the move's seconds), and
    the ranks' memory at that moment (bench_warm_cache.py uses it too)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.first_step_s = None
        self.started_s = None
        self.warm = None
        self.move_s = None
        self.memory: dict[str, float] = {}

    def emit(self, ev) -> None:
        if ev.get("type") == "started":
            self.warm, self.move_s = ev.get("warm"), ev.get("warm_move_s")
            self.started_s = time.perf_counter() - self.t0
        if ev.get("type") == "step" and self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.t0
            self.memory = rank_memory()


def rank_memory() -> dict[str, float]:
    """The largest rank's VmHWM (peak RSS), RssAnon (private) and RssShmem (shared memory), MiB: the ranks are
    this process's grandchildren (forked by the forkserver); with W=1 this process itself."""
    me = os.getpid()
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    ranks = [pid for pid, pp in parent.items() if parent.get(pp) == me] or [me]
    out: dict[str, float] = {}
    for pid in ranks:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssShmem"):
                out[key] = max(out.get(key, 0.0), int(value.split()[0]) / 1024)
    return out


def run(folder: Path, assets: dict, devices: int | None, args, steps: int | None = None,
        cache=None) -> tuple[float, float, FirstStep]:
    import yaml

    from trainer import api

    steps = steps or args.steps
    fields = {"train_data_dir": str(assets["shapes"]), "metadata_path": str(assets["shapes"] / "metadata.csv"),
              "base_model": str(args.base or assets["sd_model"]), "resolution": args.resolution, "lora_rank": 4,
              "batch_size": args.batch, "learning_rate": 1e-4, "max_train_steps": steps,
              "save_steps": steps, "log_every": 10, "cache_latents": True, "seed": 1,
              "output_dir": str(folder / "out"), "devices": devices}
    folder.mkdir(parents=True)
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in fields.items() if v is not None}))
    checked = api.preflight(path)
    watch = FirstStep()
    result = api.run_job(checked, watch, threading.Event(), base_cache=cache, device="cpu")
    assert result.outcome == "succeeded", result
    with open(folder / "out/logs/summary.csv") as f:
        row = next(csv.DictReader(f))
    return watch.first_step_s, float(row["samples_per_s"]), watch


def warm_start(root: Path, assets: dict, args) -> dict[str, list[FirstStep]]:
    """Table 2's runs (see the module docstring): each scenario --repeat times, interleaved."""
    from trainer.api import BaseModelCache

    cache = BaseModelCache(1, warm_vram_ttl_s=3600)
    run(root / "prime", assets, 1, args, steps=2, cache=cache)  # the base warm in the cache, as after a job
    run(root / "prime2", assets, 2, args, steps=2)  # the forkserver up (its imports: once per daemon), untimed
    rows: dict[str, list[FirstStep]] = {"W=1 warm": [], "W=2 shared": [], "W=2 shared, empty": [],
                                        "W=2 from disk": []}
    for i in range(args.repeat):
        rows["W=1 warm"].append(run(root / f"w1-{i}", assets, 1, args, steps=2, cache=cache)[2])
        rows["W=2 shared"].append(run(root / f"w2s-{i}", assets, 2, args, steps=2, cache=cache)[2])
        rows["W=2 shared, empty"].append(run(root / f"w2e-{i}", assets, 2, args, steps=2,
                                             cache=BaseModelCache(1))[2])
        gc.collect()  # that fresh cache's base (a full-size one holds GBs of shared memory), before the next run
        rows["W=2 from disk"].append(run(root / f"w2d-{i}", assets, 2, args, steps=2)[2])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="runs per warm-start scenario (the median is printed)")
    p.add_argument("--base", type=Path, help="an SD 1.x diffusers folder instead of the tiny SD")
    p.add_argument("--warm-start-only", action="store_true", help="only table 2")
    args = p.parse_args()
    from trainer.dev.tiny import demo_assets

    assets = demo_assets()
    root = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    try:
        if not args.warm_start_only:
            w1 = run(root / "w1", assets, None, args)
            w2 = run(root / "w2", assets, 2, args)
        warm = warm_start(root, assets, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.base or 'tiny SD'} {args.resolution} px, global batch {args.batch}, {args.steps} steps, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    if not args.warm_start_only:
        print("| W | start s | samples/s |")
        print("|---|---|---|")
        for w, (start, rate, _) in ((1, w1), (2, w2)):
            print(f"| {w} | {start:.2f} | {rate:.1f} |")
        print(f"W=2 / W=1: start {w2[0] / w1[0]:.2f}x, samples/s {w2[1] / w1[1]:.2f}x")
    print(f"\nwarm start (one BaseModelCache kept between jobs), median of {args.repeat}; rank memory at the first "
          "step, the largest rank, MiB")
    print("| scenario | base | to started s | vs W=1 warm | vs W=2 from disk | to first step s | peak RSS | private "
          "| shared |")
    print("|---|---|---|---|---|---|---|---|---|")
    started = {name: statistics.median(r.started_s for r in runs) for name, runs in warm.items()}
    for name, runs in warm.items():
        mem = runs[-1].memory
        print(f"| {name} | {runs[-1].warm} | {started[name]:.2f} | {started[name] / started['W=1 warm']:.2f}x | "
              f"{started[name] / started['W=2 from disk']:.2f}x | "
              f"{statistics.median(r.first_step_s for r in runs):.2f} | {mem.get('VmHWM', 0):.0f} | "
              f"{mem.get('RssAnon', 0):.0f} | {mem.get('RssShmem', 0):.0f} |")


if __name__ == "__main__":
    main()
