"""The VRAM estimator: exact parameter counts on tiny real models, monotonic, advice and calibration.

Model folders are built here (no hub): tiny diffusers/transformers models saved with save_pretrained,
and configs-only folders of the real SD1.5 sizes (built on the meta device, no weights written).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from trainer.checks.vram import (VramEstimate, VramEstimateError, calibrated, common_card_sizes_gib,
                          estimate_for_config, estimate_vram, model_param_counts, recommend_batch_size,
                          recommend_for_cards)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                 "CrossAttnUpBlock2D"))
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 vocab_size=49408, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")


def _model_index(folder: Path) -> None:
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"]}))


def tiny_sd_models():
    """A tiny Stable Diffusion (UNet, VAE, CLIP text encoder) with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                in_channels=4, out_channels=4, cross_attention_dim=32, norm_num_groups=8,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=1000, max_position_embeddings=77,
                                      projection_dim=32, bos_token_id=0, pad_token_id=1, eos_token_id=2))
    return unet, vae, te


def write_tiny_sd(folder: Path):
    """Save the tiny SD in a diffusers layout; returns the models for comparison."""
    unet, vae, te = tiny_sd_models()
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    te.save_pretrained(folder / "text_encoder")
    (folder / "tokenizer").mkdir(exist_ok=True)
    _model_index(folder)
    return unet, vae, te


def write_sd15_configs(folder: Path) -> Path:
    """Config files of the real SD1.5 sizes (no weights): built on the meta device, configs saved."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        UNet2DConditionModel(**SD15_UNET).save_config(folder / "unet")
        AutoencoderKL(**SD15_VAE).save_config(folder / "vae")
    CLIPTextConfig(**SD15_CLIP).save_pretrained(folder / "text_encoder")
    _model_index(folder)
    return folder


def tiny_llama(folder: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                         max_position_embeddings=128))
    model.save_pretrained(folder)
    return model


def tiny_gpt2(folder: Path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    return model


def image_args(**over):
    args = dict(family="sd", resolution=512, batch_size=1, lora_rank=8, target_modules=UNET_TARGETS,
                train_text_encoder=False, text_encoder_target_modules=TE_TARGETS, mixed_precision="fp16",
                gradient_checkpointing=False, cache_latents=False)
    args.update(over)
    return args


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    return folder, write_tiny_sd(folder)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return write_sd15_configs(tmp_path_factory.mktemp("sd15"))


# --- parameter counts ------------------------------------------------------------------------------


def test_image_param_counts_equal_the_real_models(tiny_sd):
    folder, (unet, vae, te) = tiny_sd
    assert model_param_counts(folder, "sd") == {"unet": n_params(unet), "vae": n_params(vae),
                                                   "text_encoder": n_params(te)}


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_text_param_counts_equal_the_real_model(tmp_path, builder):
    model = builder(tmp_path)
    assert model_param_counts(tmp_path, "causal_lm") == {"model": n_params(model)}


def test_lora_counts_equal_what_peft_adds(tiny_sd):
    from peft import LoraConfig, inject_adapter_in_model

    folder, _ = tiny_sd
    unet, _, te = tiny_sd_models()
    # Linear attention projections plus Conv2d targets (ResNet convs, proj_in) exercise both layer kinds.
    unet_targets = UNET_TARGETS + ["conv1", "proj_in"]
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=unet_targets))
    te.requires_grad_(False)
    te = inject_adapter_in_model(LoraConfig(r=4, target_modules=TE_TARGETS), te)
    est = estimate_vram(folder, **image_args(lora_rank=4, target_modules=unet_targets,
                                             train_text_encoder=True))
    assert est.params["lora_unet"] == n_trainable(unet) > 0
    assert est.params["lora_text_encoder"] == n_trainable(te) > 0
    assert est.params["frozen_unet"] == n_params(unet) - n_trainable(unet)


@pytest.mark.parametrize("builder, targets", [(tiny_llama, LLM_TARGETS),
                                              (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_text_lora_count_equals_peft(tmp_path, builder, targets):
    from peft import LoraConfig, get_peft_model

    model = builder(tmp_path)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets,
                                                  fan_in_fan_out=builder is tiny_gpt2))
    est = estimate_vram(tmp_path, family="causal_lm", resolution=512, batch_size=1, lora_rank=8,
                        target_modules=targets, train_text_encoder=False, text_encoder_target_modules=[],
                        mixed_precision="bf16", gradient_checkpointing=False, cache_latents=False,
                        max_seq_length=64)
    assert est.params["lora_model"] == n_trainable(peft_model) > 0


# --- the formula -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["no", "fp16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_monotonic_in_batch_and_resolution(sd15, precision, checkpointing):
    grid = {}
    for res in (256, 384, 512, 768, 1024):
        for batch in (1, 2, 3, 4, 8):
            grid[res, batch] = estimate_vram(sd15, **image_args(
                resolution=res, batch_size=batch, mixed_precision=precision,
                gradient_checkpointing=checkpointing))
    for (res, batch), est in grid.items():
        assert est.total_mib == sum(est.breakdown.values())
        bigger_batch = [b for b in (1, 2, 3, 4, 8) if b > batch]
        bigger_res = [r for r in (256, 384, 512, 768, 1024) if r > res]
        if bigger_batch:
            assert grid[res, bigger_batch[0]].total_mib > est.total_mib
        if bigger_res:
            assert grid[bigger_res[0], batch].total_mib > est.total_mib
            assert grid[bigger_res[0], batch].per_sample_mib > est.per_sample_mib


def test_monotonic_in_sequence_length_and_batch_for_text(tmp_path):
    tiny_llama(tmp_path)
    prev = None
    for seq in (64, 128, 256, 512, 1024):
        totals = [estimate_vram(tmp_path, family="causal_lm", resolution=0, batch_size=b, lora_rank=8,
                                target_modules=LLM_TARGETS, train_text_encoder=False,
                                text_encoder_target_modules=[], mixed_precision="bf16",
                                gradient_checkpointing=False, cache_latents=False,
                                max_seq_length=seq) for b in (1, 2, 4, 8, 16, 32)]
        assert [t.per_sample_mib * t.batch_size for t in totals] == sorted(
            t.per_sample_mib * t.batch_size for t in totals)
        assert totals[-1].total_mib > totals[0].total_mib
        if prev is not None:
            assert totals[0].per_sample_mib > prev
        prev = totals[0].per_sample_mib


def test_sd15_figures_are_plausible_and_settings_move_them_the_right_way(sd15):
    base = estimate_vram(sd15, **image_args())
    # SD1.5 in fp16: UNet 859.5M + VAE 83.7M + CLIP-L 123.1M parameters, 2 bytes each.
    assert base.params["frozen_unet"] == 859_520_964
    assert base.params["frozen_text_encoder"] == 123_060_480
    assert base.params["frozen_vae"] == 83_653_863
    # UNet and text encoder in half precision; the VAE stays fp32 (as the trainer keeps it)
    assert base.breakdown["weights"] == math.ceil(((859_520_964 + 123_060_480) * 2 + 83_653_863 * 4) / 2**20)
    assert 3 * 1024 < base.total_mib < 8 * 1024           # 512 px, batch 1, fp16: fits an 8 GB card
    fp32 = estimate_vram(sd15, **image_args(mixed_precision="no"))
    assert fp32.breakdown["weights"] == math.ceil((859_520_964 + 123_060_480 + 83_653_863) * 4 / 2**20)
    assert fp32.per_sample_mib > 1.5 * base.per_sample_mib
    ckpt = estimate_vram(sd15, **image_args(gradient_checkpointing=True))
    assert ckpt.per_sample_mib < 0.5 * base.per_sample_mib
    cached = estimate_vram(sd15, **image_args(cache_latents=True))
    assert cached.breakdown["weights"] == base.breakdown["weights"]  # the warm base keeps its VAE
    assert any("VAE" in n for n in cached.notes)
    with_te = estimate_vram(sd15, **image_args(train_text_encoder=True))
    assert with_te.breakdown["lora+grads+optimizer"] > base.breakdown["lora+grads+optimizer"]
    assert with_te.per_sample_mib > base.per_sample_mib
    rank64 = estimate_vram(sd15, **image_args(lora_rank=64))
    assert rank64.params["lora_unet"] == 8 * base.params["lora_unet"]
    # The key separates shapes (for calibration records) and is stable.
    assert base.key == estimate_vram(sd15, **image_args()).key != rank64.key


def test_no_matching_target_is_reported(sd15):
    est = estimate_vram(sd15, **image_args(target_modules=["no_such_module"]))
    assert est.params["lora_unet"] == 0
    assert any("nothing would be trained" in n for n in est.notes)


def test_unreadable_model_folders_fail_with_a_clear_error(tmp_path):
    with pytest.raises(VramEstimateError, match="model_index.json not found"):
        estimate_vram(tmp_path, **image_args())
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(VramEstimateError, match="base_model_config"):
        estimate_vram(single, **image_args())
    with pytest.raises(VramEstimateError, match="config.json not found"):
        estimate_vram(tmp_path, **{**image_args(), "family": "causal_lm"})


# --- advice and calibration -------------------------------------------------------------------------


def test_recommend_batch_size_keeps_the_effective_batch(sd15):
    est = estimate_vram(sd15, **image_args(batch_size=8))
    free = est.total_at(3) + 1000 + 10        # room for batch 3 with a 1000 MiB margin, not batch 4
    assert recommend_batch_size(est, free, 1000, 8, 1) == (3, 3)          # 3 x 3 >= 8
    assert recommend_batch_size(est, free, 1000, 8, 2) == (3, 6)          # 3 x 6 >= 16
    assert recommend_batch_size(est, 10 ** 6, 1000, 8, 1) == (8, 1)       # everything fits
    assert recommend_batch_size(est, est.total_at(1) + 999, 1000, 8, 1) is None
    # The other two forms: a function and estimate_vram's own arguments (re-estimated per batch).
    assert recommend_batch_size(lambda b: 1000 * b, 5500, 500, 8, 1) == (5, 2)
    params = dict(model_dir=sd15, **image_args(batch_size=8))
    b, accum = recommend_batch_size(params, free, 1000, 8, 1)
    assert estimate_vram(**{**params, "batch_size": b}).total_mib + 1000 <= free
    assert b * accum >= 8


def test_recommendations_for_common_cards(sd15):
    est = estimate_vram(sd15, **image_args(batch_size=16))
    advice = recommend_for_cards(est, 1024, 16, 1)
    assert tuple(advice) == common_card_sizes_gib == (8, 12, 16, 24, 48, 80)
    batches = [a[0] if a else 0 for a in advice.values()]
    assert batches == sorted(batches) and batches[-1] == 16 and batches[0] >= 1
    for gib, rec in advice.items():
        if rec:
            assert est.total_at(rec[0]) + 1024 <= gib * 1024


def test_calibration_uses_the_recorded_peak(sd15):
    est = estimate_vram(sd15, **image_args(batch_size=2))
    assert calibrated(est, None) is est
    cal = calibrated(est, 5000)
    assert isinstance(cal, VramEstimate)
    assert cal.total_mib == 5000 + est.breakdown["overhead"] and cal.measured_peak_mib == 5000
    assert cal.total_mib == sum(cal.breakdown.values())
    assert cal.key == est.key and cal.per_sample_mib == est.per_sample_mib
    assert cal.total_at(3) == math.ceil(cal.total_mib + est.per_sample_mib)
    assert "calibrated" in cal.describe()


def test_estimate_for_a_training_config(sd15, tmp_path):
    from trainer.config import TrainConfig

    cfg = TrainConfig.model_validate(dict(train_data_dir=str(tmp_path), base_model=str(sd15),
                                          output_dir=str(tmp_path / "out"), batch_size=2,
                                          mixed_precision="fp16"))
    est = estimate_for_config(cfg)
    assert est == estimate_vram(sd15, **image_args(batch_size=2))
    assert estimate_for_config(cfg, batch_size=1).total_mib < est.total_mib
