"""What sampling while training costs: the same tiny SD run with and without `sample_every_n_steps: 10`.

    python bench/bench_sampling.py                         # 40 steps, 32 px, 2 prompts x 20 sampler steps, twice
    python bench/bench_sampling.py --steps 60 --prompts 4 --sample-steps 10 --repeat 1

Runs, with the same model, data and config (batch 4, rank 4, cache_latents), `trainer.api.run_job` in-process
(what `lora-train` runs), alternating the order across repeats:

    plain       no samples
    sampling    sample_every_n_steps: 10, `--prompts` prompts of `--sample-steps` DDIM steps each

Reported per run: the median step interval (training only: the job restarts its step clock after a sampling
round, and intervals that contain a round are left out), the wall time of the training loop, the seconds the
`sample` events report, and what sampling should cost: rounds x prompts x (sampler steps x 2 UNet forwards for
classifier-free guidance + 1 VAE decode), from a separately timed UNet forward and VAE decode at the sample
size. The claims checked: step time with sampling / without = 1.00 (sampling is not hidden in step time), and
loop time with - without = the reported sampling seconds = the expected cost (no overhead beyond the work).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(assets: dict, steps: int, prompts: int, sample_steps: int, sampling: bool) -> dict:
    import threading

    from tests.conftest import write_config
    from trainer import api

    extra = {}
    if sampling:
        extra = dict(sample_every_n_steps=10,
                     sample_prompts=[f"shape number {i} --s {sample_steps}" for i in range(prompts)])
    stamps: list[tuple[str, float, dict]] = []

    class Clock:
        def emit(self, ev):
            stamps.append((ev.get("type"), (time.perf_counter(), time.process_time()), dict(ev)))

    with tempfile.TemporaryDirectory() as d:
        path = write_config(Path(d), assets, max_train_steps=steps, save_steps=10_000, log_every=10_000, **extra)
        api.run_job(api.preflight(path), Clock(), threading.Event(), device="cpu")
    steps_t, steps_cpu = [], []
    last, dirty = None, False
    for kind, t, ev in stamps:
        if kind == "sample":
            dirty = True
        if kind == "step":
            if last is not None and not dirty:
                steps_t.append(t[0] - last[0])
                steps_cpu.append(t[1] - last[1])
            last, dirty = t, False
    first = next(t[0] for k, t, _ in stamps if k == "step")
    end = [t[0] for k, t, _ in stamps if k == "step"][-1]
    rounds = [ev for k, _, ev in stamps if k == "sample"]
    inside = [ev for ev in rounds if ev["step"] < steps]  # the final round runs after the loop
    return {"step_ms": 1000 * statistics.median(steps_t), "step_cpu_ms": 1000 * statistics.median(steps_cpu),
            "loop_s": end - first,
            "sampling_s": sum(ev["seconds"] for ev in inside), "rounds": len(inside),
            "final_round_s": sum(ev["seconds"] for ev in rounds if ev["step"] == steps)}


def expected_round_s(assets: dict, prompts: int, sample_steps: int, resolution: int = 32) -> float:
    """prompts x (sample_steps x 2 UNet forwards + 1 VAE decode), timed on the same tiny model."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets["sd_model"], subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(assets["sd_model"], subfolder="vae").eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = torch.randn(2, unet.config.in_channels, resolution // factor, resolution // factor)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        for _ in range(3):
            unet(lat, 10, hidden)
        t0 = time.perf_counter()
        for _ in range(10):
            unet(lat, 10, hidden)  # CFG: one batched call of 2 (conditional + unconditional)
        fwd = (time.perf_counter() - t0) / 10
        t0 = time.perf_counter()
        for _ in range(5):
            vae.decode(lat[:1])
        dec = (time.perf_counter() - t0) / 5
    return prompts * (sample_steps * fwd + dec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from trainer.quiet import quiet_libraries
    from trainer.dev.tiny import demo_assets

    quiet_libraries()
    assets = demo_assets()
    results = {"plain": [], "sampling": []}
    for r in range(args.repeat):
        order = ["plain", "sampling"] if r % 2 == 0 else ["sampling", "plain"]
        for name in order:
            results[name].append(run(assets, args.steps, args.prompts, args.sample_steps, name == "sampling"))
            print(f"  {name:9s} run {r + 1}: {results[name][-1]}", flush=True)
    expect = expected_round_s(assets, args.prompts, args.sample_steps)
    best = {k: min(v, key=lambda x: x["loop_s"]) for k, v in results.items()}
    plain, samp = best["plain"], best["sampling"]
    print(f"\n{args.steps} steps, tiny SD 32 px, batch 4; sampling every 10 steps: {samp['rounds']} rounds in the "
          f"loop x {args.prompts} prompts x {args.sample_steps} DDIM steps (best of {args.repeat})")
    print(f"{'':28s}{'plain':>10s}{'sampling':>10s}{'ratio':>8s}")
    print(f"{'step time (ms, median)':28s}{plain['step_ms']:10.1f}{samp['step_ms']:10.1f}"
          f"{samp['step_ms'] / plain['step_ms']:8.2f}x")
    print(f"{'step CPU time (ms, median)':28s}{plain['step_cpu_ms']:10.1f}{samp['step_cpu_ms']:10.1f}"
          f"{samp['step_cpu_ms'] / plain['step_cpu_ms']:8.2f}x")
    print(f"{'training loop (s)':28s}{plain['loop_s']:10.2f}{samp['loop_s']:10.2f}"
          f"{samp['loop_s'] / plain['loop_s']:8.2f}x")
    extra = samp["loop_s"] - plain["loop_s"]
    print(f"loop time added by sampling: {extra:.2f} s; sampling reported by the sample events: "
          f"{samp['sampling_s']:.2f} s ({samp['sampling_s'] / max(1, samp['rounds']):.2f} s per round); "
          f"expected from UNet/VAE timings: {expect * samp['rounds']:.2f} s ({expect:.2f} s per round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
