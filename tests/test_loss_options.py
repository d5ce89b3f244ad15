"""Loss options and optimizers users bring from kohya: the helpers' math against hand-worked values, and real
(tiny) training runs with each option and optimizer."""
from __future__ import annotations

import math

import pytest
import torch

from tests.test_datasets import config, image
from trainer.families.losses import diffusion_loss, make_noise
from trainer.training.optim import lr_factor
from trainer.checks.preflight import preflight


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_noise_options():
    shape = (2, 4, 8, 8)
    plain = make_noise(shape, gens(1, 2))
    assert torch.equal(plain[1], torch.randn(shape[1:], generator=torch.Generator().manual_seed(2)))  # options off
    offset = make_noise(shape, gens(1, 2), noise_offset=0.1)
    diff = offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)  # a per-channel constant
    assert 0 < diff.abs().max() < 0.6
    pyramid = make_noise(shape, gens(1, 2), multires_iterations=6, multires_discount=0.3)
    assert pyramid[0].std().item() == pytest.approx(1.0, abs=1e-5) and not torch.equal(pyramid, plain)
    again = make_noise(shape, gens(1, 2), multires_iterations=6, multires_discount=0.3)
    assert torch.equal(pyramid, again)  # every draw from the generators: resumable
    # A sample's noise is its generator's alone: the same in any batch (what data-parallel ranks rely on).
    alone = make_noise((1, 4, 8, 8), gens(2), noise_offset=0.1, multires_iterations=6)
    assert torch.equal(alone[0], make_noise(shape, gens(1, 2), noise_offset=0.1, multires_iterations=6)[1])


def test_min_snr_mask_and_weights():
    alphas = torch.tensor([0.99, 0.5, 0.01])  # SNR 99, 1, 1/99
    pred, target = torch.ones(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)  # per-sample MSE 1
    steps = torch.tensor([0, 1, 2])
    eps = diffusion_loss(pred, target, timesteps=steps, alphas_cumprod=alphas, min_snr_gamma=5.0)
    assert eps.item() == pytest.approx((5 / 99 + 1 + 1) / 3)  # min(SNR, 5) / SNR
    v = diffusion_loss(pred, target, timesteps=steps, alphas_cumprod=alphas, min_snr_gamma=5.0, v_prediction=True)
    assert v.item() == pytest.approx((5 / 100 + 1 / 2 + (1 / 99) / (1 / 99 + 1)) / 3)  # min(SNR, 5) / (SNR + 1)
    mask = torch.zeros(3, 1, 2, 2)
    mask[:, :, 0, 0] = 1
    assert diffusion_loss(pred, target, masks=mask).item() == pytest.approx(0.25)  # kohya: masked, whole-latent mean
    weights = torch.tensor([1.0, 0.5, 0.0])
    assert diffusion_loss(pred, target, weights=weights).item() == pytest.approx(0.5)
    assert torch.equal(diffusion_loss(pred, target), torch.nn.functional.mse_loss(pred, target))


def test_lr_schedules_by_kohya_name():
    total = 100
    assert lr_factor(0, 10, total, "constant_with_warmup") == pytest.approx(0.1)
    assert lr_factor(55, 10, total, "cosine") == pytest.approx(0.5)
    # Two hard restarts: each half of the run is one full cosine.
    assert lr_factor(10, 10, total, "cosine_with_restarts", cycles=2) == pytest.approx(1.0)
    assert lr_factor(32, 10, total, "cosine_with_restarts", cycles=2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 44 / 90)))
    assert lr_factor(55, 10, total, "cosine_with_restarts", cycles=2) == pytest.approx(1.0)
    assert lr_factor(55, 10, total, "polynomial", power=2.0) == pytest.approx(0.25)
    assert lr_factor(55, 10, total, "linear") == pytest.approx(0.5)


@pytest.mark.parametrize("fields", [
    {"optimizer": {"name": "prodigy"}, "learning_rate": 1.0},
    {"optimizer": {"name": "adafactor"}},
    {"optimizer": {"name": "adamw", "args": {"amsgrad": True}}, "lr_scheduler": "cosine_with_restarts",
     "lr_restart_cycles": 2},
    {"clip_skip": 2, "noise_offset": 0.1, "multires_noise_iterations": 4, "min_snr_gamma": 5.0},
], ids=["prodigy", "adafactor", "adamw-args-restarts", "loss-options"])
def test_each_option_trains(fields, assets, tmp_path):
    from trainer.training.job import LoraTrainingJob

    for i in range(3):
        image(tmp_path / "data" / f"{i}.png", (32, 32), colour=(200, 40 * i, 40), caption="a red circle")
    checked = preflight(config(tmp_path, assets, train_data_dir="data", max_train_steps=3, **fields))
    job = LoraTrainingJob(checked)
    result = job.run()
    assert result.outcome == "succeeded" and result.steps == 3 and math.isfinite(result.final_loss)
    name = checked.config.optimizer.name
    assert type(job.optimizer).__name__.lower() == {"adamw": "adamw", "prodigy": "prodigy", "adafactor": "adafactor"}[name]


def test_clip_skip_takes_the_penultimate_layer(assets, tmp_path):
    from trainer.families import family

    image(tmp_path / "data/0.png", (32, 32), caption="a red circle")
    checked = preflight(config(tmp_path, assets, train_data_dir="data", clip_skip=2))
    fam = family("sd")
    base = fam.load_base(checked.config, torch.device("cpu"), torch.float32)
    task = fam.make_task(checked.config, base, torch.device("cpu"))
    try:
        with torch.no_grad():
            got = task.encode_text(["a red circle"])["hidden"]
            ids = base.tokenizer(["a red circle"], padding="max_length", max_length=base.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            out = base.text_encoder(ids, output_hidden_states=True)
            want = getattr(base.text_encoder, "text_model", base.text_encoder).final_layer_norm(out.hidden_states[-2])
        assert torch.equal(got, want) and not torch.equal(got, out.last_hidden_state)
    finally:
        task.detach()


def test_masked_loss_from_alpha_and_from_a_mask_folder(assets, tmp_path):
    from PIL import Image

    from trainer.families import family
    from trainer.training.job import LoraTrainingJob

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        im = Image.new("RGBA", (32, 32), (200, 40, 40, 0))
        im.paste((200, 40, 40, 255), (0, 0, 16, 32))  # the left half opaque: trained; the right half ignored
        im.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red circle")
    checked = preflight(config(tmp_path, assets, train_data_dir="data", masked_loss=True, alpha_mask=True))
    item = family("sd").make_dataset(checked.config, checked.scan.samples).load_item(0)
    assert item.mask.shape == (1, 32, 32) and item.mask[0, :, :15].min() == 1 and item.mask[0, :, 17:].max() == 0
    assert LoraTrainingJob(checked).run().outcome == "succeeded"

    (tmp_path / "masks").mkdir()
    Image.new("L", (32, 32), 255).save(tmp_path / "masks/0.png")  # 1.png has no mask
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        preflight(config(tmp_path, assets, train_data_dir="data", masked_loss=True, mask_dir="masks"))
    assert "has no mask in" in str(e.value) and "1.png" in str(e.value)
    with pytest.raises(ConfigError) as e:
        preflight(config(tmp_path, assets, train_data_dir="data", masked_loss=True))
    assert "masked_loss: has no mask source" in str(e.value)
