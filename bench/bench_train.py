"""Step time of our trainer vs the textbook diffusers + peft LoRA loop, on the same tiny SD model and data.

    python bench/bench_train.py                       # resolution 32, 20 timed steps, each run twice
    python bench/bench_train.py --resolution 32 --resolution 64 --steps 10 --repeat 1

Runs, per resolution, with the same model, data, batch size, rank, learning rate and number of steps:

    ours            `trainer.api.run_job` in-process (what `lora-train` runs), cache_latents: false
    ours+cache      the same with cache_latents: true (each image VAE-encoded once, in setup)
    textbook        the loop of diffusers' examples/text_to_image/train_text_to_image_lora.py, written out
                    below without accelerate: a DataLoader over the images (resize, center crop, normalize),
                    captions tokenized per batch, vae.encode every step, noise + timesteps, unet with LoRA
                    added by `unet.add_adapter`, AdamW, grad clipping, lr scheduler, loss.item() per step

Timing is steady state: model loading, latent caching and the first `--warmup` steps are excluded; the
clock is read when each optimizer step has finished (our step events / the textbook loop's end of step)
and the median step interval is reported.

Note the tiny VAE downsamples by 2 (not SD's 8): resolution 32 means 16x16 latents, 64 means 32x32, where
a step is ~8x slower (and the UNet is ~95% of it, so cache_latents saves little on this model).
Torch runs single-threaded by default (`--threads`): these models are too small to gain from more threads,
and on a loaded machine multi-threaded runs measure the scheduler, not the code.
Each measurement runs in this process, one after the other; `--repeat` runs the whole set again, in
reverse order, so drifting load does not favour one side; the table shows the best of the repeats and
every run's figure (other processes on the machine move these numbers a lot).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from steptime import (BATCH, LR, RANK, SEED, TARGETS, best, in_turns, parser, prepare,  # noqa: E402
                      textbook_steps, time_ours)

# ------------------------------------------------------------------------------------------------
# the textbook loop (diffusers' train_text_to_image_lora.py, minus accelerate/logging)


class TextbookDataset:
    """imagefolder + metadata.csv, transformed like the script's torchvision pipeline:
    Resize(res, bilinear) -> CenterCrop(res) -> ToTensor -> Normalize([0.5], [0.5]); captions tokenized."""

    def __init__(self, folder: Path, resolution: int, tokenizer):
        import csv

        with open(folder / "metadata.csv", newline="") as f:
            self.rows = [(folder / r["file_name"], r["text"]) for r in csv.DictReader(f)]
        self.resolution, self.tokenizer = resolution, tokenizer

    def __len__(self):
        return len(self.rows)

    def image(self, path: Path):
        """(pixels in [-1, 1], original (height, width), crop (top, left)) of one image: the script's
        resize, center crop, to-tensor and normalize."""
        import numpy as np
        import torch
        from PIL import Image

        r = self.resolution
        with Image.open(path) as im:
            im = im.convert("RGB")
            original = (im.height, im.width)
            s = r / min(im.size)
            im = im.resize((max(r, round(im.width * s)), max(r, round(im.height * s))), Image.Resampling.BILINEAR)
            top, left = (im.height - r) // 2, (im.width - r) // 2
            im = im.crop((left, top, left + r, top + r))
            pixels = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - 0.5) / 0.5, original, (top, left)

    @staticmethod
    def token_ids(tokenizer, caption: str):
        return tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids[0]

    def __getitem__(self, i):
        path, caption = self.rows[i]
        return {"pixel_values": self.image(path)[0], "input_ids": self.token_ids(self.tokenizer, caption)}


def run_textbook(assets: dict, resolution: int, steps: int, warmup: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    model = assets["sd_model"]
    torch.manual_seed(SEED)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    data = TextbookDataset(assets["shapes"], resolution, tokenizer)
    loader = torch.utils.data.DataLoader(
        data, shuffle=True, batch_size=BATCH, num_workers=0,
        collate_fn=lambda ex: {"pixel_values": torch.stack([e["pixel_values"] for e in ex]).float(),
                               "input_ids": torch.stack([e["input_ids"] for e in ex])})

    unet.train()

    def loss_of(batch):
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                  (latents.shape[0],)).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
        if noise_scheduler.config.prediction_type == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        return loss

    return textbook_steps(loader, loss_of, params, optimizer, warmup + steps, warmup)


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parser(__doc__, several_resolutions=True).parse_args(argv)
    resolutions = args.resolution or [32]
    assets, torch_threads = prepare(args.threads)
    names = ["textbook", "ours", "ours+cache"]
    print(f"{torch_threads}, batch {BATCH}, rank {RANK}, "
          f"{args.steps} timed steps after {args.warmup} warmup; ms/step (lower is better)", flush=True)

    def ours(res: int, cache_latents: bool):
        return time_ours(assets["sd_model"], assets["shapes"], res, args.steps, args.warmup,
                         cache_latents=cache_latents)

    runs = {"ours": lambda r: ours(r, False),
            "ours+cache": lambda r: ours(r, True),
            "textbook": lambda r: run_textbook(assets, r, args.steps, args.warmup)}
    started = time.perf_counter()
    results = in_turns([(res, name) for res in resolutions for name in names], args.repeat,
                       lambda key: runs[key[1]](key[0]), label=lambda key: f"res {key[0]:3d}  {key[1]:<11s}")

    print()
    print(f"best of {args.repeat}; the ratio is on CPU time "
          "(wall time on a shared machine measures the load too)")
    print(f"{'resolution':>10s}  {'run':<11s} {'cpu ms/step':>12s} {'wall ms/step':>13s} "
          f"{'vs textbook':>12s}")
    for res in resolutions:
        base = best(results[(res, "textbook")])[1]
        for name in names:
            wall, cpu = best(results[(res, name)])
            print(f"{res:>10d}  {name:<11s} {cpu:12.1f} {wall:13.1f} {cpu / base:11.2f}x")
    print(f"\nbench took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
