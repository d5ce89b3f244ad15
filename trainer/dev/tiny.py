"""Tiny models and data built locally, for the demo, the tests and the benchmarks (no model hub).

- `build_tiny_sd(folder)`: a random Stable Diffusion pipeline in diffusers format (UNet, VAE, CLIP text
  encoder with a CLIP tokenizer made from a small local vocabulary, DDPM scheduler), a few hundred
  thousand parameters, saved with `save_pretrained` so the real loading code is what runs.
- `build_tiny_sdxl(folder)`: a random SDXL pipeline (UNet with text_time added conditioning, CLIP-L-like
  `CLIPTextModel` + OpenCLIP-G-like `CLIPTextModelWithProjection`, two tokenizers, VAE, Euler scheduler),
  the same shapes as diffusers' own SDXL tests.
- `build_tiny_flux(folder, variant="dev")`: a random FLUX.1 pipeline (transformer, 16-channel VAE, CLIP-L
  and T5 with tokenizers made offline; T5's is a Unigram model trained with `tokenizers`).
- `build_tiny_llm(folder)`: a random small causal LM (Llama architecture, so text mode's default
  q/k/v/o_proj targets apply) with a local character-level tokenizer that has no pad token (like
  real Llama tokenizers: the trainer must supply one).
- `build_tiny_chat_llm(folder)`: the same tiny Llama with a ChatML chat template and special tokens
  (<|im_start|>, <|im_end|> = EOS), and `build_chat_datasets(folder)`: one question/answer set written
  in every text format (alpaca.json, sharegpt.jsonl, messages.jsonl, text.jsonl).
- `build_tiny_clip(folder)`, `build_tiny_vit(folder)`, `build_tiny_dinov2(folder)`: random CLIP / ViT / DINOv2
  models with their image processors (and CLIP's tokenizer), the metric models of an evaluation;
  `build_tiny_aesthetic_head(folder)`: a LAION-style head (Linear layers) on the tiny CLIP's embeddings.
- `build_shapes_dataset(folder)`: coloured shapes on plain backgrounds with captions in metadata.csv:
  a pattern a LoRA learns in a few dozen steps.
- `demo_assets()`: all of the above, built once into a cache folder and reused.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trainer.config import default_cache_dir

ASSETS_VERSION = "5"
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
WORDS = sorted({*COLOURS, *SHAPES, "a", "on", "white", "black", "background", "photo", "of", "style", "painting"})


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


class _PipelineBuild:
    """One tiny pipeline being built: seeded, with the CLIP tokenizer over the small vocabulary, in a sibling
    `.tmp` folder that `save` moves into place whole (a half-written model never stands at `folder`)."""

    def __init__(self, folder: Path, seed: int):
        import torch
        from transformers import CLIPTokenizer

        from trainer.quiet import quiet_libraries

        quiet_libraries()
        self.folder = Path(folder)
        self.tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        torch.manual_seed(seed)
        self.tok_dir = self.tmp / "_tok"
        self.vocab_size = _write_clip_tokenizer(self.tok_dir)
        self.tokenizer = CLIPTokenizer(str(self.tok_dir / "vocab.json"), str(self.tok_dir / "merges.txt"),
                                       model_max_length=16)

    def save(self, pipe) -> Path:
        pipe.save_pretrained(self.tmp / "model", safe_serialization=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.tmp / "model").rename(self.folder)
        shutil.rmtree(self.tmp, ignore_errors=True)
        return self.folder


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    build = _PipelineBuild(folder, seed)
    vocab_size, tokenizer = build.vocab_size, build.tokenizer
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
    return build.save(pipe)


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """A tiny random StableDiffusionXLPipeline saved with save_pretrained: text encoders of hidden 32 and 48
    (different, as CLIP-L's 768 and OpenCLIP-G's 1280 are: single-file loaders tell them apart by width),
    concatenated to the UNet's cross-attention width 80; pooled projection 48; time ids embedded in 8."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    build = _PipelineBuild(folder, seed)
    tok_dir, vocab_size, tokenizer = build.tok_dir, build.vocab_size, build.tokenizer
    # SDXL's second tokenizer pads with "!" (OpenCLIP's convention), the first with <|endoftext|>.
    tokenizer_2 = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16,
                                pad_token="!")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 48, cross_attention_dim=32 + 48, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32,
        scaling_factor=0.13025,
    )
    te_config = dict(vocab_size=vocab_size, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab_size - 2,
                     eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **te_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=48, **te_config))
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                       beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler)
    return build.save(pipe)


def _t5_tokenizer(words: list[str]):
    """A T5 tokenizer (SentencePiece-style Unigram, '▁' word boundaries, </s> appended) trained offline
    on captions made of `words` with the `tokenizers` library: what T5-XXL's tokenizer is, small."""
    import itertools

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    corpus = [" ".join(p) for p in itertools.permutations(words[:8], 3)] + [" ".join(words)] * 8
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=96, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", eos)])
    # model_max_length 512: T5-XXL's, the longest max_sequence_length FluxPipeline accepts.
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def build_tiny_flux(folder: Path, seed: int = 0, variant: str = "dev") -> Path:
    """A random FLUX.1 pipeline in diffusers format: a transformer with 2 double and 2 single blocks,
    the Flux VAE layout (16 latent channels, its scaling and shift factors, no quant convs), CLIP-L
    and T5 encoders with tokenizers made offline, the flow-matching scheduler of `variant` (dev: guidance
    embedding and resolution-dependent shift; schnell: neither). ~0.2 M parameters."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    build = _PipelineBuild(folder, seed)
    vocab_size, tokenizer = build.vocab_size, build.tokenizer
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    tokenizer_2 = _t5_tokenizer(WORDS)
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, dropout_rate=0.0))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=variant == "dev", axes_dims_rope=(2, 2, 4))
    if variant == "dev":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    return build.save(pipe)


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


TINY_CLIP_PROJECTION = 16


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIPModel (32 px images, 8 px patches) with a CLIP tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    folder = Path(folder)
    vocab_size = _write_clip_tokenizer(folder)
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY_CLIP_PROJECTION)) \
        .save_pretrained(folder, safe_serialization=True)
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _tiny_vision(folder: Path, seed: int, config_cls: str, model_cls: str) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=32, patch_size=8)
    getattr(transformers, model_cls)(config).save_pretrained(folder, safe_serialization=True)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return Path(folder)


def build_tiny_vit(folder: Path, seed: int = 0) -> Path:
    """A random ViTModel (a DINO v1 checkpoint is this class) with its image processor."""
    return _tiny_vision(folder, seed, "ViTConfig", "ViTModel")


def build_tiny_dinov2(folder: Path, seed: int = 0) -> Path:
    """A random Dinov2Model with an image processor."""
    return _tiny_vision(folder, seed, "Dinov2Config", "Dinov2Model")


def build_tiny_aesthetic_head(folder: Path, seed: int = 0) -> Path:
    """`head.safetensors`: LAION's improved-aesthetic-predictor layout (layers.N Linear layers, no
    activations) shrunk to the tiny CLIP's embedding size."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    sizes = [TINY_CLIP_PROJECTION, 8, 4, 1]
    state = {}
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layer = torch.nn.Linear(a, b)
        state[f"layers.{2 * i}.weight"], state[f"layers.{2 * i}.bias"] = layer.weight.data, layer.bias.data
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(state, str(Path(folder) / "head.safetensors"))
    return Path(folder)


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


CHAT_TEMPLATE = (  # ChatML, as Qwen's instruct models use it: the assistant turn ends with <|im_end|> (= EOS)
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def build_tiny_chat_llm(folder: Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny random Llama chat model: a character-level fast tokenizer with ChatML's special tokens
    (<|im_start|>, <|im_end|> as EOS) and a ChatML chat template in tokenizer_config.json.
    (`hidden`/`layers` make a larger one for benchmarks.)"""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from trainer.quiet import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    torch.manual_seed(seed)
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<s>": 1, "<|im_start|>": 2, "<|im_end|>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    tok.decoder = decoders.Fuse()  # characters join back without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024 if hidden > 32 else 256,
        bos_token_id=1, eos_token_id=3, pad_token_id=0, tie_word_embeddings=False))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


CHAT_FACTS = [(c, s) for c in COLOURS for s in SHAPES]


def build_chat_datasets(folder: Path) -> Path:
    """The same small question/answer set in each text format: alpaca.json (a JSON list, with history on
    some records), sharegpt.jsonl and messages.jsonl (multi-turn, with a system turn), text.jsonl."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alpaca, sharegpt, messages, text = [], [], [], []
    for i, (colour, shape) in enumerate(CHAT_FACTS):
        q1, a1 = f"colour of the {shape}?", f"{colour}."
        q2, a2 = "and its shape?", f"a {shape}."
        record = {"instruction": q1, "input": "", "output": a1}
        if i % 3 == 0:
            record.update(input="be brief", history=[[q2, a2]])
        alpaca.append(record)
        sharegpt.append({"conversations": [{"from": "system", "value": "answer in one word."},
                                           {"from": "human", "value": q1}, {"from": "gpt", "value": a1},
                                           {"from": "human", "value": q2}, {"from": "gpt", "value": a2}]})
        messages.append({"messages": [{"role": "system", "content": "answer in one word."},
                                      {"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                      {"role": "user", "content": q2}, {"role": "assistant", "content": a2}]})
        text.append({"text": f"the {shape} is {colour}."})
    (folder / "alpaca.json").write_text(json.dumps(alpaca, indent=1))
    for name, rows in (("sharegpt", sharegpt), ("messages", messages), ("text", text)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def demo_assets(root: Path | None = None) -> dict[str, Path]:
    """The tiny SD model, tiny LM and both datasets, built once under the cache folder (atomic per part)."""
    root = Path(root or default_cache_dir()) / f"tiny-v{ASSETS_VERSION}"
    parts = {
        "sd_model": (root / "tiny-sd", build_tiny_sd),
        "sdxl_model": (root / "tiny-sdxl", build_tiny_sdxl),
        "shapes": (root / "shapes", build_shapes_dataset),
        "llm_model": (root / "tiny-llm", build_tiny_llm),
        "text_data": (root / "text", build_text_dataset),
        "chat_model": (root / "tiny-chat-llm", build_tiny_chat_llm),
        "chat_data": (root / "chat", build_chat_datasets),
        "clip_model": (root / "tiny-clip", build_tiny_clip),
        "vit_model": (root / "tiny-vit", build_tiny_vit),
        "dino_model": (root / "tiny-dinov2", build_tiny_dinov2),
        "aesthetic_head": (root / "tiny-aesthetic", build_tiny_aesthetic_head),
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
