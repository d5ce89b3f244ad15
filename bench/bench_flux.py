"""Flux step time: our trainer vs the textbook diffusers + peft Flux LoRA loop, on the same tiny FLUX.1 [dev].

    python bench/bench_flux.py                        # resolution 32, 512 T5 tokens, 20 timed steps, twice
    python bench/bench_flux.py --resolution 64 --steps 10 --repeat 1

Runs, with the same model (`trainer.dev.tiny.build_tiny_flux`), data, batch size, rank, learning rate, steps,
T5 length (512, dev's default) and targets (the family's default: attention of double and single blocks):

    textbook        the loop of diffusers' examples/dreambooth/train_dreambooth_lora_flux.py, written out
                    below without accelerate: images resized and center-cropped, every step: both prompts
                    encoded (CLIP-L pooled, T5 sequence) with `FluxPipeline.encode_prompt`, vae.encode +
                    sample, (latents - shift) x scale, noise, u from compute_density_for_timestep_sampling,
                    sigmas from the scheduler's (shifted) timesteps, pack, transformer with LoRA
                    (`transformer.add_adapter`) and guidance 1.0, unpack, MSE against noise - latents,
                    backward, grad clipping, AdamW, lr scheduler, loss.item()
    ours            `trainer.api.run_job` (what `lora-train` runs) in fp32 with the bf16/fp8 defaults
                    turned off (mixed_precision no, quantization no) and no caches (cache_text_embeddings and
                    cache_latents false): the same work per step as the textbook loop
    ours+cache      cache_text_embeddings and cache_latents true: both text encoders and the VAE run once per
                    caption / image in setup, never in the steps (the text encoders then leave the GPU)
    ours+fp8        ours+cache on the fp8 base (quantization fp8): the cost of the per-layer upcast, which on
                    the CPU is pure overhead (on a GPU it is what makes Flux fit in 24 GB)

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
from steptime import (LR, RANK, SEED, in_turns, parser, prepare, print_vs_textbook,  # noqa: E402
                      textbook_steps, time_ours)

BATCH = 2
SEQ = 512
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class CaptionedDataset(TextbookDataset):
    """The textbook dataset with the caption itself (the Flux script tokenizes prompts in encode_prompt)."""

    def __getitem__(self, i):
        return {**super().__getitem__(i), "prompt": self.rows[i][1]}


def run_textbook(assets: dict, resolution: int, steps: int, warmup: int) -> tuple[float, float]:
    import copy

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    model = assets["flux"]
    torch.manual_seed(SEED)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
    noise_scheduler_copy = copy.deepcopy(noise_scheduler)
    tokenizer_one = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    tokenizer_two = T5TokenizerFast.from_pretrained(model, subfolder="tokenizer_2")
    text_encoder_one = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    text_encoder_two = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    for m in (transformer, vae, text_encoder_one, text_encoder_two):
        m.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                                       target_modules=TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    pipe = FluxPipeline(scheduler=noise_scheduler, vae=vae, text_encoder=text_encoder_one, tokenizer=tokenizer_one,
                        text_encoder_2=text_encoder_two, tokenizer_2=tokenizer_two, transformer=None)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    data = CaptionedDataset(assets["shapes"], resolution, tokenizer_one)
    loader = torch.utils.data.DataLoader(
        data, shuffle=True, batch_size=BATCH, num_workers=0,
        collate_fn=lambda ex: {"pixel_values": torch.stack([e["pixel_values"] for e in ex]).float(),
                               "prompts": [e["prompt"] for e in ex]})

    def get_sigmas(timesteps, n_dim=4):
        sigmas = noise_scheduler_copy.sigmas
        schedule_timesteps = noise_scheduler_copy.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    transformer.train()

    def loss_of(batch):
        with torch.no_grad():
            prompt_embeds, pooled, text_ids = pipe.encode_prompt(batch["prompts"], prompt_2=None,
                                                                 max_sequence_length=SEQ)
        pixel_values = batch["pixel_values"]
        model_input = vae.encode(pixel_values).latent_dist.sample()
        model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(
            model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", model_input.dtype)
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        u = compute_density_for_timestep_sampling("none", bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
        timesteps = noise_scheduler_copy.timesteps[indices]
        sigmas = get_sigmas(timesteps, n_dim=model_input.ndim)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, model_input.shape[1], model_input.shape[2],
                                            model_input.shape[3])
        guidance = torch.tensor([1.0]).expand(bsz) if transformer.config.guidance_embeds else None
        pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                           img_ids=latent_image_ids, return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, height=model_input.shape[2] * vae_scale_factor,
                                            width=model_input.shape[3] * vae_scale_factor,
                                            vae_scale_factor=vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3("none", sigmas=sigmas)
        target = noise - model_input
        loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(bsz, -1), 1).mean()
        return loss

    return textbook_steps(loader, loss_of, params, optimizer, warmup + steps, warmup)


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    assets, torch_threads = prepare(args.threads)
    from trainer.config import default_cache_dir
    from trainer.dev.tiny import build_tiny_flux

    flux = default_cache_dir() / "bench-flux-dev"
    if not (flux / "model_index.json").exists():
        build_tiny_flux(flux)
    assets["flux"] = flux

    def ours(cached: bool, fp8: bool = False):
        """fp32 with the bf16/fp8 defaults turned off, and uniform timesteps as the textbook loop samples."""
        return time_ours(flux, assets["shapes"], args.resolution, args.steps, args.warmup, batch=BATCH,
                         mixed_precision="no", quantization="fp8" if fp8 else "no", max_sequence_length=SEQ,
                         timestep_density="uniform", cache_latents=cached, cache_text_embeddings=cached)

    names = ["textbook", "ours", "ours+cache", "ours+fp8"]
    runs = {"textbook": lambda: run_textbook(assets, args.resolution, args.steps, args.warmup),
            "ours": lambda: ours(False),
            "ours+cache": lambda: ours(True),
            "ours+fp8": lambda: ours(True, fp8=True)}
    print(f"{torch_threads}, tiny FLUX.1 [dev] at {args.resolution} px, "
          f"batch {BATCH}, rank {RANK}, {SEQ} T5 tokens, {args.steps} timed steps after {args.warmup} warmup; "
          "ms/step (lower is better)", flush=True)
    started = time.perf_counter()
    results = in_turns(names, args.repeat, lambda name: runs[name](), label=lambda name: f"{name:<11s}")
    print_vs_textbook(results, names, args.repeat, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
