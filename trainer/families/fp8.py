"""An 8-bit frozen base: Linear weights stored as fp8 (`float8_e4m3fn`), upcast one layer at a time.

Why this and not a quantization library: bitsandbytes' 8-bit layers are CUDA-first, optimum-quanto is
in maintenance mode and torchao's float8 training targets Hopper/Ada matmuls; all three would be a
large dependency for what a frozen LoRA base needs, which is only "store 1 byte per weight, compute in
the mixed-precision dtype". fp8 storage is plain torch (>= 2.1), runs the same on the CPU (the tests)
and on any CUDA GPU, and keeps the frozen weights' memory at half of bf16.

Scheme: per output channel, `scale = max|w_row| / 448` (448 is e4m3's largest finite value) and
`w8 = (w / scale).to(float8_e4m3fn)`; forward computes `x @ (w8 * scale).T + b` in the input's dtype.
e4m3 keeps 3 mantissa bits, so each weight has a relative rounding error of at most 2**-4 (6.25%);
over a dot product of many weights these errors average out: a layer's outputs stay within a few
percent of the full-precision layer's (tests/test_flux.py states and checks the tolerance).

Memory: the upcast weight exists only inside one layer's forward (and is recomputed in backward by
`_Fp8Matmul`, which saves the 1-byte weight, never the upcast copy), so the peak holds one layer's
weight in the compute dtype, not the whole model's.

peft wraps `Fp8Linear` like any `nn.Linear` (it subclasses it); `compute_dtype` tells peft to keep the
LoRA weights in fp32 instead of casting them to the base weight's fp8 dtype.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale per output row) of a 2-D weight."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_weight(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w8.to(torch.float32) * scale[:, None]).to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """x @ dequant(w8).T + b, saving only the 1-byte weight for backward (the frozen weight gets no grad)."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias):
        ctx.save_for_backward(w8, scale)
        ctx.x_dtype = x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w = dequantize_weight(w8, scale, dtype)
        return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        w8, scale = ctx.saved_tensors
        grad_x = grad_out @ dequantize_weight(w8, scale, grad_out.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in fp8 with a per-row scale (see the module docstring)."""

    def __init__(self, linear: torch.nn.Linear):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = quantize_weight(linear.weight)
        self.weight = torch.nn.Parameter(w8, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(),
                                                                        requires_grad=False)
        self.compute_dtype = torch.float32  # read by peft: LoRA weights on this layer stay fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-row scale"


def quantize_linears(model: torch.nn.Module, should: Callable[[str], bool], device=None) -> int:
    """Replace every `nn.Linear` of `model` whose qualified name passes `should` by an `Fp8Linear`, in
    place, moving each to `device` first (one layer at a time: the full-precision model may live in host
    memory and never fit on the GPU whole). Returns the number of parameters now stored in 8 bits."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is torch.nn.Linear and should(full):
                if device is not None:
                    child = child.to(device)
                setattr(module, child_name, Fp8Linear(child))
                count += child.weight.numel()
    return count
