"""What the step-time benches share (bench_train.py, bench_sdxl.py, bench_flux.py, bench_network.py): the
fixed training settings, the clock, one timed `trainer.api.run_job`, the command-line options, the set-up
and the runs in alternating order.

Timing is steady state: model loading, caching and the first `--warmup` steps are excluded; the clock is
read when each optimizer step has finished and the median step interval is reported, as wall time and as
CPU time of this process (the ratios use CPU time: on a shared box the wall clock also measures the
neighbours).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Hashable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RANK, BATCH, LR, SEED = 4, 4, 1e-4, 7
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process): read at the end of every optimizer step."""
    return time.perf_counter(), time.process_time()


def steady_ms(stamps: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) ms per step from end-of-step stamps, skipping the first `warmup` steps.

    Medians, not means: a step that another process stalled says nothing about the code. CPU time is
    what the comparison uses: on a shared machine the wall clock also measures the neighbours."""
    t = stamps[warmup - 1:] if warmup > 0 else stamps
    wall = statistics.median(b[0] - a[0] for a, b in zip(t, t[1:]))
    cpu = statistics.median(b[1] - a[1] for a, b in zip(t, t[1:]))
    return 1000 * wall, 1000 * cpu


def time_ours(model: Path, shapes: Path, resolution: int, steps: int, warmup: int, *, batch: int = BATCH,
              **fields) -> tuple[float, float, dict]:
    """(wall ms/step, CPU ms/step, the run's run.json) of `trainer.api.run_job` (what `lora-train` runs) on
    the shapes with the benches' rank, learning rate and seed; `fields` are the bench's own config keys."""
    import threading

    import yaml

    from trainer import api

    stamps: list[tuple[float, float]] = []

    class Clock:
        def emit(self, ev):
            if ev["type"] == "step":
                stamps.append(now())

    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        cfg = {"train_data_dir": str(shapes), "metadata_path": str(shapes / "metadata.csv"),
               "base_model": str(model), "resolution": resolution, "lora_rank": RANK, "batch_size": batch,
               "learning_rate": LR, "max_train_steps": warmup + steps, "save_steps": 10_000,
               "log_every": 10_000, "seed": SEED, "resume": "never", "output_dir": str(Path(tmp) / "out"),
               **fields}
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(cfg))
        result = api.run_job(api.preflight(path), Clock(), threading.Event(), device="cpu")
        assert result.outcome == "succeeded", result
        run = json.loads((Path(tmp) / "out/run.json").read_text())
    return (*steady_ms(stamps, warmup), run)


def textbook_steps(loader, loss_of: Callable, params: list, optimizer, total: int,
                   warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) ms/step of a textbook diffusers LoRA loop: `total` steps over the `loader`
    (again from its start when it runs out), each `loss_of(batch)` then what every diffusers example script
    does after the loss: backward, grad clipping at 1.0, the optimizer and a constant lr scheduler step,
    zero_grad, loss.item() (the scripts log the gathered loss every step)."""
    import torch
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    stamps: list[tuple[float, float]] = []
    while len(stamps) < total:
        for batch in loader:
            loss = loss_of(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            loss.item()
            stamps.append(now())
            if len(stamps) >= total:
                break
    return steady_ms(stamps, warmup)


def parser(doc: str, *, several_resolutions: bool = False) -> argparse.ArgumentParser:
    """The options every step-time bench takes: --steps, --warmup, --resolution, --repeat, --threads
    (`several_resolutions`: --resolution may be repeated, default [32]; else one, default 32)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    if several_resolutions:
        p.add_argument("--resolution", type=int, action="append",
                       help="training resolution; repeat the option for several (default: 32; 64 is ~8x slower)")
    else:
        p.add_argument("--resolution", type=int, default=32, help="training resolution (default 32)")
    p.add_argument("--repeat", type=int, default=2,
                   help="run the whole set this many times, alternating the order (default 2)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1; 0: torch's choice). With tiny models, 2+ threads on a "
                        "shared 2-core box spend most of a step in OpenMP barriers when another process "
                        "holds a core: 10x slower and noisy")
    return p


def prepare(threads: int) -> tuple[dict, str]:
    """Offline hub, quiet libraries, `threads` torch threads (0: torch's choice), the tiny demo models and
    data built once; returns (demo assets, "torch VERSION, N threads") for the bench's first line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from trainer.dev.tiny import demo_assets
    from trainer.quiet import quiet_libraries

    quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    return dict(demo_assets()), f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def in_turns(keys: Sequence[Hashable], repeat: int, measure: Callable[[Hashable], tuple],
             label: Callable[[Hashable], str] | None = None) -> dict[Hashable, list[tuple]]:
    """Every key's measurements, the whole set `repeat` times, every other time in reverse order so that
    drifting load does not favour one side; with `label`, a progress line per run (`wall` and `cpu` are
    the first two figures of a measurement)."""
    results: dict[Hashable, list[tuple]] = {}
    for rep in range(repeat):
        for key in keys if rep % 2 == 0 else keys[::-1]:
            result = measure(key)
            results.setdefault(key, []).append(result)
            if label is not None:
                print(f"  [{rep + 1}/{repeat}] {label(key)} wall {result[0]:7.1f}  cpu {result[1]:7.1f} ms/step",
                      flush=True)
    return results


def best(runs: list[tuple]) -> tuple[float, float]:
    """(wall, CPU) ms/step: the least of each over the repeats."""
    return min(r[0] for r in runs), min(r[1] for r in runs)


def print_vs_textbook(results: dict, names: list[str], repeat: int, started: float) -> None:
    """The closing table of a bench against the textbook loop: per run its best CPU and wall ms/step and the
    CPU ratio to the textbook's; then how long the bench took since `started` (a perf_counter reading)."""
    print(f"\nbest of {repeat}; the ratio is on CPU time (wall time on a shared machine measures the load too)")
    print(f"{'run':<11s} {'cpu ms/step':>12s} {'wall ms/step':>13s} {'vs textbook':>12s}")
    base = best(results["textbook"])[1]
    for name in names:
        wall, cpu = best(results[name])
        print(f"{name:<11s} {cpu:12.1f} {wall:13.1f} {cpu / base:11.2f}x")
    print(f"\nbench took {time.perf_counter() - started:.0f} s")
