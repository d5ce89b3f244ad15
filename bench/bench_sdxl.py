"""SDXL step time: our trainer vs the textbook diffusers + peft SDXL LoRA loop, on the same tiny SDXL and data.

    python bench/bench_sdxl.py                        # resolution 32, 20 timed steps, each run twice
    python bench/bench_sdxl.py --resolution 64 --steps 10 --repeat 1

Runs, with the same model (`trainer.dev.tiny.build_tiny_sdxl`), data, batch size, rank, learning rate, steps:

    textbook        the loop of diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py, written
                    out below without accelerate: images resized and center-cropped with their original size
                    and crop top-left kept, both captions tokenized per batch, every step: vae.encode, noise +
                    timesteps, encode_prompt with both text encoders (penultimate hidden states concatenated,
                    pooled from the second), add_time_ids, unet with LoRA (`unet.add_adapter`) and
                    added_cond_kwargs, MSE, backward, grad clipping, AdamW, lr scheduler, loss.item()
    ours            `trainer.api.run_job` (what `lora-train` runs), no caches: cache_latents false,
                    cache_text_embeddings false (the same work per step as the textbook loop)
    ours+cache      cache_latents and cache_text_embeddings true: the VAE and both text encoders run once per
                    image / caption in setup, not in the steps

Timing as in bench_train.py: steady state (loading, caching and `--warmup` steps excluded), median step,
CPU time of this process for the ratio (wall time on a shared box measures the neighbours), best of
`--repeat` runs in alternating order, single-threaded torch by default.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import TextbookDataset  # noqa: E402
from steptime import (BATCH, LR, RANK, SEED, TARGETS, in_turns, parser, prepare,  # noqa: E402
                      print_vs_textbook, textbook_steps, time_ours)


class TextbookSdxlDataset(TextbookDataset):
    """imagefolder + metadata.csv as the SDXL script prepares it: Resize -> CenterCrop (crop top-left kept),
    original size kept, ToTensor -> Normalize([0.5], [0.5]); the caption tokenized by both tokenizers."""

    def __init__(self, folder: Path, resolution: int, tokenizers):
        super().__init__(folder, resolution, tokenizers[0])
        self.tokenizers = tokenizers

    def __getitem__(self, i):
        path, caption = self.rows[i]
        pixels, original, crop_top_left = self.image(path)
        ids = [self.token_ids(tok, caption) for tok in self.tokenizers]
        return {"pixel_values": pixels, "input_ids_one": ids[0], "input_ids_two": ids[1],
                "original_size": original, "crop_top_left": crop_top_left}


def run_textbook(assets: dict, resolution: int, steps: int, warmup: int) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model = assets["sdxl_model"]
    torch.manual_seed(SEED)
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    te_one = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    te_two = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    for m in (unet, vae, te_one, te_two):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    data = TextbookSdxlDataset(assets["shapes"], resolution, tokenizers)
    loader = torch.utils.data.DataLoader(
        data, shuffle=True, batch_size=BATCH, num_workers=0,
        collate_fn=lambda ex: {"pixel_values": torch.stack([e["pixel_values"] for e in ex]).float(),
                               "input_ids_one": torch.stack([e["input_ids_one"] for e in ex]),
                               "input_ids_two": torch.stack([e["input_ids_two"] for e in ex]),
                               "original_sizes": [e["original_size"] for e in ex],
                               "crop_top_lefts": [e["crop_top_left"] for e in ex]})

    def encode_prompt(ids_list):
        embeds, pooled = [], None
        for te, ids in zip((te_one, te_two), ids_list):
            out = te(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]
            embeds.append(out[-1][-2])
        return torch.cat(embeds, dim=-1), pooled

    def compute_time_ids(original_size, crops_coords_top_left):
        return torch.tensor([list(original_size + crops_coords_top_left + (resolution, resolution))])

    unet.train()

    def loss_of(batch):
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        add_time_ids = torch.cat([compute_time_ids(s, c) for s, c in
                                  zip(batch["original_sizes"], batch["crop_top_lefts"])]).float()
        with torch.no_grad():
            prompt_embeds, pooled = encode_prompt([batch["input_ids_one"], batch["input_ids_two"]])
        pred = unet(noisy, timesteps, prompt_embeds,
                    added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled}, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        return loss

    return textbook_steps(loader, loss_of, params, optimizer, warmup + steps, warmup)


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    assets, torch_threads = prepare(args.threads)

    def ours(cached: bool):
        return time_ours(assets["sdxl_model"], assets["shapes"], args.resolution, args.steps, args.warmup,
                         cache_latents=cached, cache_text_embeddings=cached)

    names = ["textbook", "ours", "ours+cache"]
    runs = {"textbook": lambda: run_textbook(assets, args.resolution, args.steps, args.warmup),
            "ours": lambda: ours(False),
            "ours+cache": lambda: ours(True)}
    print(f"tiny SDXL, {torch_threads}, res {args.resolution}, "
          f"batch {BATCH}, rank {RANK}, {args.steps} timed steps after {args.warmup} warmup", flush=True)
    started = time.perf_counter()
    results = in_turns(names, args.repeat, lambda name: runs[name](), label=lambda name: f"{name:<11s}")
    print_vs_textbook(results, names, args.repeat, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
