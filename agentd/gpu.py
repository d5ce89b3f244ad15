"""The daemon's GPU probe: the one its settings ask for (the probe itself is `trainer.gpus`)."""
from __future__ import annotations

from typing import Any

from trainer.gpus import NoGpuProbe, Probe, default_probe


def probe_from_settings(settings: Any = None) -> Probe:
    """The probe the daemon's settings ask for.

    ``settings.gpu_probe`` (if the settings have it): "nvml" (default) or "none" (force CPU-only, e.g. on
    a box whose GPUs are reserved for something else).
    """
    kind = str(getattr(settings, "gpu_probe", "nvml") or "nvml").lower()
    if kind == "none":
        return NoGpuProbe("GPU probing disabled in settings (gpu_probe: none); running CPU-only")
    return default_probe()
