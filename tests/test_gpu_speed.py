"""bench/gpu_speed.py's pure decisions: the MFU denominator chosen by device name, and the FLOPs per token.

The speed cases themselves need a GPU (`bench/gpu_check.py --speed`); `--cpu-smoke` runs their code on tiny
models but takes ~30 s on this machine, so it is run by hand, not here."""
import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("gpu_speed", Path(__file__).resolve().parents[1] / "bench/gpu_speed.py")
gpu_speed = importlib.util.module_from_spec(spec)
sys.modules["gpu_speed"] = gpu_speed  # its dataclass looks its module up there
spec.loader.exec_module(gpu_speed)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.4),                 # torch.cuda.get_device_name on an H200 SXM
    ("NVIDIA H100 80GB HBM3", 989.4),       # H100 SXM
    ("NVIDIA H100 PCIe", 756.5),            # must not take the SXM figure: "H100" is a prefix of both
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40S", None),                  # unknown peak: MFU says N/A rather than guess
    ("NVIDIA GeForce RTX 4090", None),
])
def test_bf16_peak_by_device_name(name, peak):
    assert gpu_speed.bf16_peak_tflops(name) == peak


def test_llm_flops_per_token_for_llama3_8b_at_2048():
    # 4N (forward + backward through activations; no weight gradients for the frozen base)
    # + 12·L·s·d (attention scores and values, forward and backward)
    n, layers, hidden, seq = 8_030_261_248, 32, 4096, 2048
    assert gpu_speed.llm_flops_per_token(n, layers, hidden, seq) == 4 * n + 12 * layers * seq * hidden
    assert gpu_speed.llm_flops_per_token(n, layers, hidden, seq) == pytest.approx(35.34e9, rel=1e-3)
