"""`agentd serve` on a box with fake GPUs: the real daemon (agentd.daemon.serve) with the real NvmlProbe
over tests/fake_nvml.py, each GPU slot training on the CPU (there is no CUDA here).

    python tests/fake_gpu_daemon.py SETTINGS.yaml '[{"name": "NVIDIA GeForce RTX 4090"}, {}]'

Everything but the GPU is the product's own code: settings, journal, scheduler, gate, socket, link.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentd.commands import load_settings_or_exit  # noqa: E402
from agentd.daemon import Daemon, serve  # noqa: E402
from trainer.gpus import NvmlProbe  # noqa: E402
from agentd.scheduler import Slot  # noqa: E402
from tests.fake_nvml import FakeGpu, FakeNvml  # noqa: E402


def _cpu_backed_slots(self):
    # The slots the daemon would make for these GPUs (named cuda:N), training on the CPU device.
    return [Slot(g.index, "cpu", label=f"cuda:{g.index}") for g in self.probe.list_gpus()]


if __name__ == "__main__":
    settings = load_settings_or_exit(sys.argv[1])
    gpus = [FakeGpu(**spec) for spec in json.loads(sys.argv[2])]
    Daemon._make_slots = _cpu_backed_slots
    sys.exit(serve(settings, probe=NvmlProbe(FakeNvml(gpus))))
