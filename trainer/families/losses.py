"""The loss options diffusion users bring from kohya's sd-scripts, as helpers every diffusion task shares.

- `make_noise`: Gaussian noise, plus `noise_offset` (a per-channel constant: lets the model learn very
  dark and very bright images) and `multires_noise_iterations`/`_discount` (pyramid noise: low-frequency
  components at decreasing weights, renormalised to unit variance), as sd-scripts does.
- `diffusion_loss`: the MSE between prediction and target, per sample, with a mask (masked loss: only
  where the mask is white counts), per-sample weights (`prior_loss_weight` for regularization images) and
  Min-SNR weighting (`min_snr_gamma`, Hang et al. 2023: weight min(SNR, gamma) / SNR for epsilon
  prediction, / (SNR + 1) for v-prediction).

Every random draw comes from the sample's own generator (`trainer.data.randomness`, keyed by the global
sample index), so a resumed run is bit-identical and W data-parallel ranks draw what one would. With every
option off, `make_noise` draws each sample's `torch.randn` and `diffusion_loss` is exactly
`F.mse_loss(pred, target)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_noise(shape: tuple, generators: list, noise_offset: float = 0.0,
               multires_iterations: int = 0, multires_discount: float = 0.3) -> torch.Tensor:
    """Noise for latents of `shape` (B, C, H, W), on the CPU (the caller moves it): sample k's from
    generators[k] alone (`trainer.data.randomness`), so a sample's noise does not depend on its batch."""
    return torch.stack([_sample_noise(tuple(shape[1:]), g, noise_offset, multires_iterations, multires_discount)
                        for g in generators])


def _sample_noise(shape: tuple, generator: torch.Generator, noise_offset: float, multires_iterations: int,
                  multires_discount: float) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator)
    c, h, w = shape
    if noise_offset:
        noise = noise + noise_offset * torch.randn((c, 1, 1), generator=generator)
    if multires_iterations:
        upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
        for i in range(multires_iterations):
            r = float(torch.rand(1, generator=generator)) * 2 + 2  # each level 2-4x coarser, drawn per sample
            hi, wi = max(1, int(h / r ** i)), max(1, int(w / r ** i))
            noise = noise + upsample(torch.randn((1, c, hi, wi), generator=generator))[0] * multires_discount ** i
            if hi == 1 or wi == 1:
                break
        # Renormalised per sample (sd-scripts divides by the batch's std): the same whatever the batch.
        noise = noise / noise.std()
    return noise


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, *, timesteps: torch.Tensor | None = None,
                   alphas_cumprod: torch.Tensor | None = None, min_snr_gamma: float | None = None,
                   v_prediction: bool = False, masks: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """The scalar training loss of a batch (see the module docstring). `masks`: (B, 1, h, w) in [0, 1] at
    latent size; `weights`: (B,) per-sample loss weights."""
    pred, target = pred.float(), target.float()
    if masks is None and weights is None and not min_snr_gamma:
        return F.mse_loss(pred, target)
    loss = F.mse_loss(pred, target, reduction="none")
    if masks is not None:
        loss = loss * masks.to(loss.device, loss.dtype)  # kohya: masked, then averaged over the whole latent
    loss = loss.mean(dim=list(range(1, loss.dim())))
    if weights is not None:
        loss = loss * weights.to(loss.device, loss.dtype)
    if min_snr_gamma:
        s = snr(alphas_cumprod, timesteps)
        loss = loss * (torch.clamp(s, max=min_snr_gamma) / (s + 1 if v_prediction else s))
    return loss.mean()


def latent_masks(masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Per-sample pixel masks (1, H, W) averaged down to the latent `size` (h, w): (B, 1, h, w)."""
    return F.interpolate(torch.stack(masks), size=size, mode="area")
