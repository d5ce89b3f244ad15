"""What the evaluation stage costs next to training: the tiny SD run with an `eval:` block.

    python bench/bench_eval.py                      # 20 steps, 32 px, 4 prompts x 2 seeds x 3 arms, 10 sampler steps
    python bench/bench_eval.py --steps 40 --prompts 8 --seeds 4 --sample-steps 20

Runs `trainer.api.run_job` in-process (what `lora-train` runs) twice on one output folder, so the second run
has three arms (candidate, the first run's LoRA, the base), with the tiny CLIP, DINOv2 and aesthetic head
(`trainer.dev.tiny`). Reported from the job's own events: training seconds (`started` to the last `step`),
evaluation seconds (the `evaluation` event, which times the stage apart from training), images rendered,
seconds per image, and the ratio evaluation / training. The expected cost of the stage is images x (sampler
steps x 2 UNet forwards for classifier-free guidance + 1 VAE decode) + the metric models' forwards, the UNet
forwards batched up to 8 images per call (trainer.training.evaluation.RENDER_BATCH).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(folder: Path, assets: dict, steps: int, prompts: int, seeds: int, sample_steps: int) -> dict:
    from tests.conftest import write_config
    from trainer import api

    block = {"prompts": [f"a {c} shape --s {sample_steps}" for c in ("red", "green", "blue", "yellow") * 4][:prompts],
             "seeds": list(range(seeds)), "clip_model": str(assets["clip_model"]),
             "dino_model": str(assets["dino_model"]), "reference_dir": str(folder / "refs"),
             "aesthetic_head": str(assets["aesthetic_head"] / "head.safetensors")}
    stamps: dict = {}

    class Clock:
        def emit(self, ev):
            kind = ev.get("type")
            if kind == "started":
                stamps["start"] = time.perf_counter()
            elif kind == "step":
                stamps["last_step"] = time.perf_counter()
            elif kind == "evaluation":
                stamps["eval_s"] = ev.get("seconds")
                stamps["arms"] = 3 if ev.get("against") != "base" else 2

    path = write_config(folder, assets, max_train_steps=steps, save_steps=10_000, log_every=10_000, eval=block,
                        resume="never")
    api.run_job(api.preflight(path), Clock(), threading.Event(), device="cpu")
    images = prompts * seeds * stamps["arms"]
    train_s = stamps["last_step"] - stamps["start"]
    return {"train_s": train_s, "eval_s": stamps["eval_s"], "images": images,
            "s_per_image": stamps["eval_s"] / images, "ratio": stamps["eval_s"] / train_s}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch
    from PIL import Image

    if args.threads:
        torch.set_num_threads(args.threads)
    from trainer.dev.tiny import demo_assets

    assets = demo_assets()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "refs").mkdir()
        for i, colour in enumerate(((220, 40, 40), (40, 70, 220))):
            Image.new("RGB", (32, 32), colour).save(folder / "refs" / f"{i}.png")
        for label in ("first run (against the base: 2 arms)", "second run (3 arms)"):
            r = run(folder, assets, args.steps, args.prompts, args.seeds, args.sample_steps)
            print(f"{label}: training {r['train_s']:.2f} s, evaluation {r['eval_s']:.2f} s for {r['images']} images "
                  f"({r['s_per_image'] * 1000:.0f} ms/image), evaluation / training = {r['ratio']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
