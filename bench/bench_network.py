"""Network types: step time and trainable parameters of LoRA, LoCon, LoRA + DoRA, LoHa and LoKr (and LoRA with
EMA) on the tiny SD, each relative to plain LoRA (1.00x).

    python bench/bench_network.py                       # resolution 32, 20 timed steps, each run twice
    python bench/bench_network.py --steps 10 --repeat 1

Every run is `trainer.api.run_job` (what `lora-train` runs) with the same model, data (the 24 shapes), batch 4,
rank 4 on to_q/to_k/to_v/to_out.0, AdamW, lr 1e-4, cached latents; only `network:` (and `ema:`) differ. Timing
as in bench_train.py: the median step after `--warmup` steps, CPU time of this process for the ratio (wall
time on a shared box measures the neighbours), best of `--repeat` runs in alternating order, one torch thread.
Parameters: the run's run.json `network.parameters` (the optimizer's parameters).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import BATCH, LR, RANK, SEED, TARGETS, now, steady_ms  # noqa: E402

NETWORKS = {
    "lora": {},
    "locon (conv_rank 4)": {"network": {"type": "locon", "conv_rank": RANK}},
    "lora + dora": {"network": {"type": "lora", "dora": True}},
    "loha": {"network": {"type": "loha"}},
    "lokr (factor 4)": {"network": {"type": "lokr", "factor": 4}},
    "lora + ema": {"ema": {"decay": 0.999}},
}


def run(assets: dict, fields: dict, resolution: int, steps: int, warmup: int) -> tuple[float, float, int]:
    """(wall ms/step, CPU ms/step, trainable parameters) of one run."""
    import threading

    import yaml

    from trainer import api

    stamps: list[tuple[float, float]] = []

    class Clock:
        def emit(self, ev):
            if ev["type"] == "step":
                stamps.append(now())

    with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
        cfg = {"train_data_dir": str(assets["shapes"]), "metadata_path": str(assets["shapes"] / "metadata.csv"),
               "base_model": str(assets["sd_model"]), "resolution": resolution, "lora_rank": RANK,
               "target_modules": TARGETS, "batch_size": BATCH, "learning_rate": LR,
               "max_train_steps": warmup + steps, "save_steps": 10_000, "log_every": 10_000, "cache_latents": True,
               "seed": SEED, "resume": "never", "output_dir": str(Path(tmp) / "out"), **fields}
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = api.run_job(api.preflight(path), Clock(), threading.Event(), device="cpu")
        assert result.outcome == "succeeded", result
        params = json.loads((Path(tmp) / "out/run.json").read_text())["network"]["parameters"]
    return (*steady_ms(stamps, warmup), params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--resolution", type=int, default=32, help="training side in px (default 32)")
    p.add_argument("--repeat", type=int, default=2, help="runs of the whole set, alternating order (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: torch's choice)")
    args = p.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from trainer.dev.tiny import demo_assets
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    assets = demo_assets()
    print(f"tiny SD, torch {torch.__version__}, {torch.get_num_threads()} threads, res {args.resolution}, "
          f"batch {BATCH}, rank {RANK}, {args.steps} timed steps after {args.warmup} warmup", flush=True)
    results: dict[str, list[tuple[float, float, int]]] = {}
    names = list(NETWORKS)
    for r in range(args.repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            results.setdefault(name, []).append(run(assets, NETWORKS[name], args.resolution, args.steps,
                                                    args.warmup))
    best = {name: min(rs, key=lambda x: x[1]) for name, rs in results.items()}
    base_cpu, base_params = best["lora"][1], best["lora"][2]
    print(f"{'network':<22}{'cpu ms/step':>12}{'wall ms/step':>14}{'x LoRA time':>13}{'parameters':>12}"
          f"{'x LoRA params':>15}")
    for name, (wall, cpu, params) in best.items():
        print(f"{name:<22}{cpu:>12.1f}{wall:>14.1f}{cpu / base_cpu:>12.2f}x{params:>12,}{params / base_params:>14.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
