"""EMA of the trained network: an exponential moving average of its parameters, kept in fp32.

    shadow <- decay x shadow + (1 - decay) x live        every `update_every` optimizer steps

(`torch.Tensor.lerp_`, which computes exactly that, in place). Why fp32 even over a half-precision base:
the network's parameters are fp32 already (`trainer.families.peft_lora.trainable`), and an fp32 shadow in the
checkpoint is what makes a resumed run's EMA bit-identical to an uninterrupted one's.

The loop calls four things: `Ema.of(cfg, params)` after the optimizer is built, `update(step)` after each
optimizer step, `state_dict()`/`load_state_dict()` with the checkpoint's optimizer state, and `applied()`
around what should see the averaged weights (the export, samples and validation, as `ema.use_for` says).
`applied()` swaps the shadow into the live parameters and copies the live values back afterwards, exactly.
"""
from __future__ import annotations

import contextlib

import torch


class Ema:
    def __init__(self, params: list[torch.Tensor], decay: float, update_every: int, use_for: str):
        self.params = params
        self.decay, self.update_every, self.use_for = decay, update_every, use_for
        self.shadow = [p.detach().float().clone() for p in params]

    @classmethod
    def of(cls, cfg, params: list[torch.Tensor]) -> "Ema | None":
        """The config's EMA over `params` (None when `ema` is not set)."""
        if cfg.ema is None:
            return None
        return cls(params, cfg.ema.decay, cfg.ema.update_every, cfg.ema.use_for)

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.update_every == 0:
            for s, p in zip(self.shadow, self.params):
                s.lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)

    def for_samples(self) -> bool:
        return self.use_for in ("samples", "both")

    def in_place(self) -> bool:
        """Whether <name>.safetensors holds the EMA (export, both) rather than a second file <name>-ema."""
        return self.use_for in ("export", "both")

    @contextlib.contextmanager
    def applied(self):
        """The EMA weights in the live parameters for the duration of the block; the trained ones after it."""
        with torch.no_grad():
            live = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)


def for_samples(ema: Ema | None):
    """`ema.applied()` when samples and validation use the EMA (`ema.use_for` samples|both), else nothing."""
    return ema.applied() if ema is not None and ema.for_samples() else contextlib.nullcontext()
