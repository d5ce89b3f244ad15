"""Per-sample randomness keyed by the global sample index.

Every random draw made for one training sample (its crop and flip, caption shuffle and dropout, latent
sampling, noise, timestep) comes from that sample's own generator, seeded from (seed, the sample's global
index: epoch × samples per epoch + its place in the epoch's batch order). So a sample gets the same numbers
whichever rank trains it and whatever else is in its micro-batch: the same config on 1 or W data-parallel
ranks draws the same noise (trainer.training.distributed), and a resumed run draws what an uninterrupted one
would without carrying a generator state in the checkpoint.
"""
from __future__ import annotations

# A 64-bit odd multiplier (the golden ratio's, as splitmix64) spreads the run seed far from the indices,
# so (seed, index) and (seed + 1, index - 1) never share a stream.
_SEED_MIX = 0x9E3779B97F4A7C15


def sample_seed(seed: int, global_index: int) -> int:
    """The seed of one sample's generator (non-negative, below 2**63 as torch requires)."""
    return (seed * _SEED_MIX + global_index) % 2**63


def sample_generators(seed: int, global_indices: list[int]) -> list:
    """One CPU generator per sample, in the order given."""
    import torch

    return [torch.Generator().manual_seed(sample_seed(seed, g)) for g in global_indices]


def randn_per_sample(shape: tuple, generators: list):
    """A (len(generators), *shape) standard normal tensor, row k drawn from generators[k]."""
    import torch

    return torch.stack([torch.randn(shape, generator=g) for g in generators])
