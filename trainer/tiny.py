"""Tiny models and data built locally, for the demo, the tests and the benchmarks (no model hub).

- `build_tiny_sd(folder)`: a random Stable Diffusion pipeline in diffusers format (UNet, VAE, CLIP text
  encoder with a CLIP tokenizer made from a small local vocabulary, DDPM scheduler), a few hundred
  thousand parameters, saved with `save_pretrained` so the real loading code is what runs.
- `build_tiny_llm(folder)`: a random small causal LM (Llama architecture, so text mode's default
  q/k/v/o_proj targets apply) with a local character-level tokenizer that has no pad token (like
  real Llama tokenizers: the trainer must supply one).
- `build_shapes_dataset(folder)`: coloured shapes on plain backgrounds with captions in metadata.csv:
  a pattern a LoRA learns in a few dozen steps.
- `demo_assets()`: all of the above, built once into a cache folder and reused.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

ASSETS_VERSION = "5"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
WORDS = sorted({*COLOURS, *SHAPES, "a", "on", "white", "black", "background", "photo", "of", "style", "painting"})


def cache_root() -> Path:
    return Path(os.environ.get("AGENTD_CACHE_DIR") or Path.home() / ".cache" / "agentd")


def _write_clip_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer over a small word list; returns the vocabulary size."""
    letters = sorted({c for w in WORDS for c in w})
    vocab: dict[str, int] = {}
    for tok in ["!", *letters, *(c + "</w>" for c in letters), *(w + "</w>" for w in WORDS)]:
        vocab.setdefault(tok, len(vocab))
    merges = []
    # Merges that build each word left to right, so every word becomes one token.
    for w in WORDS:
        cur = w[0]
        for i, c in enumerate(w[1:], start=1):
            nxt = c + ("</w>" if i == len(w) - 1 else "")
            merges.append(f"{cur} {nxt}")
            merged = cur + nxt
            vocab.setdefault(merged, len(vocab))
            cur = merged
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    unique = list(dict.fromkeys(merges))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(unique) + "\n")
    return len(vocab)


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.quiet import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    tok_dir = tmp / "_tok"
    vocab_size = _write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012,
                              steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp / "model", safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    (tmp / "model").rename(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_tiny_llm(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, 4 heads) and a character-level tokenizer, saved locally."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trainer.quiet import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    torch.manual_seed(seed)
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    # No pad token on purpose: real Llama tokenizers have none, and the trainer sets pad = eos.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def build_shapes_dataset(folder: Path, count: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Shapes of four colours on white, with captions 'a red circle on white background' in metadata.csv."""
    import random

    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = ["file_name,text"]
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        im = Image.new("RGB", (size, size), (255, 255, 255))
        d = ImageDraw.Draw(im)
        m = rng.randint(size // 8, size // 4)
        box = (m, m, size - m, size - m)
        if shape == "circle":
            d.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle(box, fill=COLOURS[colour])
        else:
            d.polygon([(size // 2, m), (m, size - m), (size - m, size - m)], fill=COLOURS[colour])
        name = f"{i:03d}_{colour}_{shape}.png"
        im.save(folder / name)
        rows.append(f"{name},a {colour} {shape} on white background")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder


def build_text_dataset(folder: Path, count: int = 16) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": f"the {c} {s} is {c}."}) for c in COLOURS for s in SHAPES][:count]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def demo_assets(root: Path | None = None) -> dict[str, Path]:
    """The tiny SD model, tiny LM and both datasets, built once under the cache folder (atomic per part)."""
    root = Path(root or cache_root()) / f"tiny-v{ASSETS_VERSION}"
    parts = {
        "sd_model": (root / "tiny-sd", build_tiny_sd),
        "shapes": (root / "shapes", build_shapes_dataset),
        "llm_model": (root / "tiny-llm", build_tiny_llm),
        "text_data": (root / "text", build_text_dataset),
    }
    out = {}
    for key, (path, build) in parts.items():
        done = path.with_name(path.name + ".done")
        if not done.exists():
            tmp = path.with_name(path.name + f".build-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
            done.touch()
        out[key] = path
    return out
