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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from steptime import BATCH, RANK, TARGETS, best, in_turns, parser, prepare, time_ours  # noqa: E402

NETWORKS = {
    "lora": {},
    "locon (conv_rank 4)": {"network": {"type": "locon", "conv_rank": RANK}},
    "lora + dora": {"network": {"type": "lora", "dora": True}},
    "loha": {"network": {"type": "loha"}},
    "lokr (factor 4)": {"network": {"type": "lokr", "factor": 4}},
    "lora + ema": {"ema": {"decay": 0.999}},
}


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    assets, torch_threads = prepare(args.threads)
    print(f"tiny SD, {torch_threads}, res {args.resolution}, "
          f"batch {BATCH}, rank {RANK}, {args.steps} timed steps after {args.warmup} warmup", flush=True)

    def measure(name: str) -> tuple[float, float, int]:
        """(wall ms/step, CPU ms/step, trainable parameters) of one run."""
        wall, cpu, run = time_ours(assets["sd_model"], assets["shapes"], args.resolution, args.steps, args.warmup,
                                   target_modules=TARGETS, cache_latents=True, **NETWORKS[name])
        return wall, cpu, run["network"]["parameters"]

    results = in_turns(list(NETWORKS), args.repeat, measure)
    base_cpu, base_params = best(results["lora"])[1], results["lora"][0][2]
    print(f"{'network':<22}{'cpu ms/step':>12}{'wall ms/step':>14}{'x LoRA time':>13}{'parameters':>12}"
          f"{'x LoRA params':>15}")
    for name, runs in results.items():
        (wall, cpu), params = best(runs), runs[0][2]
        print(f"{name:<22}{cpu:>12.1f}{wall:>14.1f}{cpu / base_cpu:>12.2f}x{params:>12,}{params / base_params:>14.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
