"""Checkpoint save time and size vs training step time: the tiny demo model and an SD1.5-size LoRA.

    python bench/bench_checkpoint.py                    # tiny + SD1.5-size rank 8 and 64 (~2 min)
    python bench/bench_checkpoint.py --skip-sd          # tiny model only (~20 s)
    options: --saves N (timed saves per case, default 3)  --ranks 8,64  --latent 16  --steps N (default 3)
             --gpu-step-s S (assumed GPU step time for SD1.5, default 0.5)  --no-step (estimate, no SD step)
             --dir PATH (where checkpoints are written; default a temp folder; use the real output disk)

Cases:

    tiny          a real `LoraTrainingJob` on the demo model and data (`trainer.dev.tiny.demo_assets()`, the
                  demo config, resolution 32, batch 4, rank 4, cache_latents): setup, a few training steps
                  (median step interval after the first), then `job.save_checkpoint()` timed --saves times
                  (each a new step folder, so pruning to keep_checkpoints runs as in training)
    sd15 rank R   an SD1.5-size UNet (`UNet2DConditionModel`, block_out_channels 320/640/1280/1280,
                  cross_attention_dim 768, attention_head_dim 8, layers_per_block 2, sample_size 64, the
                  standard SD1.5 block types), ~860 M parameters, random fp32 weights built from the config
                  (no download); LoRA rank R (alpha = R) on to_q/to_k/to_v/to_out.0 with
                  `peft.inject_adapter_in_model`; AdamW (so the optimizer state exists), --steps training
                  steps on the CPU at a small size (batch 1, --latent x --latent latents, 77 random text
                  tokens of width 768); then `trainer.runs.checkpoint.save_checkpoint` timed --saves times with
                  what a job writes: the LoRA as kohya tensors (`trainer.families.lora_io.to_kohya`, inside the timed
                  region as in `LoraTrainingJob.save_checkpoint`), the AdamW + LR scheduler state, the RNG
                  states (`capture_rng`) and a state dict like the job's

A save includes everything `save_checkpoint` does: safetensors + 2 torch.save files + JSON, fsync of every
file and folder, sha256 of every file for the manifest, the rename and the pruning. The fsync and sha256
shares are measured separately (by wrapping `os.fsync` and `trainer.runs.checkpoint.file_sha256`).

The CPU step time here is not a GPU step time: the overhead of checkpointing at save_steps N is reported as
save / (N x step) against both the measured CPU step and an ASSUMED GPU step time (--gpu-step-s, default
0.5 s: SD1.5 LoRA at 512 px, batch 4, fp16 on a 24 GB card; an assumption, not a measurement). Torch runs
single-threaded (torch.set_num_threads(1), OMP_NUM_THREADS=1): the 2-core box is shared.
"""
from __future__ import annotations

import argparse
import os

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported: the machine is shared
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class IoClock:
    """Time spent in os.fsync and in the manifest's sha256 while it is active."""

    def __init__(self):
        self.fsync = 0.0
        self.sha = 0.0

    def __enter__(self):
        import trainer.runs.checkpoint as ckpt

        self._fsync, self._sha = os.fsync, ckpt.file_sha256

        def fsync(fd):
            t = time.perf_counter()
            try:
                return self._fsync(fd)
            finally:
                self.fsync += time.perf_counter() - t

        def sha(path):
            t = time.perf_counter()
            try:
                return self._sha(path)
            finally:
                self.sha += time.perf_counter() - t

        os.fsync, ckpt.file_sha256 = fsync, sha
        return self

    def __exit__(self, *exc):
        import trainer.runs.checkpoint as ckpt

        os.fsync, ckpt.file_sha256 = self._fsync, self._sha


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def timed_saves(save, n: int) -> dict:
    """Call `save()` (returns the checkpoint folder) n times; medians of total, fsync and sha256 seconds."""
    total, fsync, sha, size = [], [], [], 0
    for _ in range(n):
        with IoClock() as io:
            t = time.perf_counter()
            path = save()
            total.append(time.perf_counter() - t)
        fsync.append(io.fsync)
        sha.append(io.sha)
        size = folder_bytes(path)
    return {"save_s": statistics.median(total), "fsync_s": statistics.median(fsync),
            "sha_s": statistics.median(sha), "bytes": size, "saves": total}


# ------------------------------------------------------------------------------------------------


def bench_tiny(root: Path, steps: int, saves: int) -> dict:
    import yaml

    from trainer.dev.demo import write_demo_config
    from trainer.training.job import LoraTrainingJob
    from trainer.checks.preflight import preflight

    path = write_demo_config(root / "tiny")
    cfg = yaml.safe_load(path.read_text())
    cfg.update(max_train_steps=steps + 1, save_steps=100_000, log_every=100_000, resume="never",
               output_dir=str(root / "tiny" / "out"))
    path.write_text(yaml.safe_dump(cfg))
    stamps: list[float] = []

    class Clock:
        def emit(self, ev):
            if ev["type"] == "step":
                stamps.append(time.perf_counter())

    job = LoraTrainingJob(preflight(path), Clock(), device="cpu")
    try:
        job.setup()
        job.train()  # steps + 1 steps, then its own final checkpoint and the .safetensors
        step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))

        def save():
            job.state.global_step += 1  # a new folder each time, as in training
            return job.save_checkpoint()

        res = timed_saves(save, saves)
        params = sum(p.numel() for g in job.optimizer.param_groups for p in g["params"])
    finally:
        job.cleanup()
    return {"params": params, "step_s": step_s,
            "step_note": f"res {cfg['resolution']}, batch {cfg['batch_size']}", **res}


def build_sd15_unet():
    import torch
    from diffusers import UNet2DConditionModel

    t = time.perf_counter()
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    unet.requires_grad_(False)
    unet.train()
    n = sum(p.numel() for p in unet.parameters())
    return unet, n, time.perf_counter() - t, torch


def bench_sd15_rank(unet, rank: int, root: Path, args) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers.utils.peft_utils import recurse_remove_peft_layers
    from peft import LoraConfig, inject_adapter_in_model

    import trainer.runs.checkpoint as ckpt
    from trainer.families.lora_io import to_kohya
    from trainer.runs.outputs import library_versions

    torch.manual_seed(rank)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=TARGETS), unet)
    try:
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        n_params = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        gen = torch.Generator().manual_seed(rank)
        lat = args.latent

        def step():
            x = torch.randn(1, 4, lat, lat, generator=gen)
            noise = torch.randn(1, 4, lat, lat, generator=gen)
            ctx = torch.randn(1, 77, 768, generator=gen)
            t = torch.randint(0, 1000, (1,), generator=gen)
            pred = unet(x + noise, t, ctx, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        step_times: list[float] = []
        if args.no_step:
            # One optimizer step without forward/backward, so the AdamW state exists.
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        else:
            for _ in range(max(1, args.steps)):
                t = time.perf_counter()
                step()
                step_times.append(time.perf_counter() - t)
        # The first step pays one-off costs (allocator, lazy init): the median of the rest when there are any.
        step_s = statistics.median(step_times[1:] or step_times) if step_times else None
        state = {"train_state": ckpt.TrainState(global_step=args.steps).state_dict(), "config_hash": "0" * 64,
                 "training_fields": {"base_model": "sd15-random", "lora_rank": rank, "learning_rate": 1e-4},
                 "data_fingerprint": "0" * 64, "versions": library_versions(), "time": ckpt.now()}
        folder = root / f"sd15-r{rank}" / "checkpoints"
        counter = [args.steps]

        def save():
            counter[0] += 1
            optim = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": {}}
            return ckpt.save_checkpoint(folder, counter[0], lora=to_kohya({"unet": unet}),
                                        optim=optim, rng=ckpt.capture_rng(), state=state, keep=2)

        res = timed_saves(save, args.saves)
    finally:
        recurse_remove_peft_layers(unet)
        if hasattr(unet, "peft_config"):
            del unet.peft_config
        unet.requires_grad_(False)
    note = (f"CPU, batch 1, latent {lat}x{lat}, median of {max(1, len(step_times) - 1)}"
            if step_times else "not measured (--no-step)")
    return {"params": n_params, "step_s": step_s, "step_note": note, **res}


# ------------------------------------------------------------------------------------------------


def overhead(save_s: float, step_s: float | None, every: int) -> str:
    if not step_s:
        return "-"
    return f"{100 * save_s / (every * step_s):.2f}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--saves", type=int, default=3, help="timed saves per case (default 3; median reported)")
    p.add_argument("--steps", type=int, default=3, help="training steps before saving (default 3)")
    p.add_argument("--ranks", default="8,64", help="LoRA ranks on the SD1.5-size UNet (default 8,64)")
    p.add_argument("--latent", type=int, default=16,
                   help="latent size of the SD1.5 CPU step (default 16, i.e. 128 px)")
    p.add_argument("--gpu-step-s", type=float, default=0.5,
                   help="ASSUMED SD1.5 GPU step time for the overhead column (default 0.5 s: 512 px, "
                        "batch 4, "
                        "fp16, 24 GB card)")
    p.add_argument("--skip-sd", action="store_true", help="only the tiny model")
    p.add_argument("--no-step", action="store_true",
                   help="SD1.5: skip the training step (one optimizer step on zero grads so states exist)")
    p.add_argument("--dir", help="folder for the checkpoints (default: a temporary folder, removed after)")
    args = p.parse_args(argv)

    import torch

    from trainer.quiet import quiet_libraries
    from trainer.dev.tiny import demo_assets

    quiet_libraries()
    torch.set_num_threads(1)
    demo_assets()
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, torch.set_num_threads(1) and OMP_NUM_THREADS=1 (shared machine), "
          f"{os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; checkpoints under "
          f"{root}; {args.saves} timed saves per case, medians", flush=True)
    started = time.perf_counter()
    rows: list[tuple[str, dict]] = []
    try:
        r = bench_tiny(root, args.steps, args.saves)
        rows.append(("tiny (demo) rank 4", r))
        print(f"  tiny: step {1000 * r['step_s']:.0f} ms, save {1000 * r['save_s']:.0f} ms "
              f"({' '.join(f'{1000 * s:.0f}' for s in r['saves'])}), {r['bytes'] / 2**20:.2f} MiB",
              flush=True)
        if not args.skip_sd:
            unet, n, build_s, _ = build_sd15_unet()
            print(f"  built the SD1.5-size UNet: {n / 1e6:.0f} M parameters fp32 "
                  f"({n * 4 / 2**30:.2f} GiB) in {build_s:.0f} s", flush=True)
            for rank in (int(x) for x in args.ranks.split(",")):
                r = bench_sd15_rank(unet, rank, root, args)
                rows.append((f"SD1.5 UNet rank {rank}", r))
                step = f"{1000 * r['step_s']:.0f} ms" if r["step_s"] else "not measured"
                print(f"  rank {rank}: step {step}, save {1000 * r['save_s']:.0f} ms "
                      f"({' '.join(f'{1000 * s:.0f}' for s in r['saves'])}), {r['bytes'] / 2**20:.1f} MiB",
                      flush=True)
            del unet
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print("save = one trainer.runs.checkpoint.save_checkpoint (LoRA + AdamW/scheduler + RNG + state, fsync, "
          "sha256 manifest, rename, prune);\noverhead @N = save / (N x step), i.e. the share of training "
          "time spent checkpointing at save_steps N (500 is the default)")
    print(f"{'case':<22s} {'LoRA params':>11s} {'ckpt MiB':>9s} {'save ms':>8s} {'fsync ms':>9s} "
          f"{'sha ms':>7s} {'step ms':>8s} {'ovh @500':>9s} {'ovh @100':>9s}  step measured on")
    for name, r in rows:
        step = f"{1000 * r['step_s']:8.0f}" if r["step_s"] else f"{'-':>8s}"
        print(f"{name:<22s} {r['params']:11,d} {r['bytes'] / 2**20:9.2f} {1000 * r['save_s']:8.0f} "
              f"{1000 * r['fsync_s']:9.0f} {1000 * r['sha_s']:7.0f} {step} "
              f"{overhead(r['save_s'], r['step_s'], 500):>9s} {overhead(r['save_s'], r['step_s'], 100):>9s}  "
              f"{r['step_note']}")
    sd = [(n, r) for n, r in rows if n.startswith("SD1.5")]
    if sd:
        g = args.gpu_step_s
        print()
        print(f"SD1.5 against an ASSUMED GPU step of {g} s (512 px, batch 4, fp16 on a 24 GB card; an "
              "assumption, not measured here;\n--gpu-step-s to change). The save time is this box's CPU + "
              "disk; on the GPU box add the device-to-host copy of the LoRA and AdamW state (small)")
        print(f"{'case':<22s} {'save ms':>8s} {'ovh @500':>9s} {'ovh @100':>9s}  {'every save costs':>16s}")
        for name, r in sd:
            print(f"{name:<22s} {1000 * r['save_s']:8.0f} {overhead(r['save_s'], g, 500):>9s} "
                  f"{overhead(r['save_s'], g, 100):>9s}  {r['save_s'] / g:10.1f} steps")
    print(f"\nbench took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
