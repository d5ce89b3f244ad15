"""The NVML probe against a fake NVML that raises pynvml's real errors."""
from __future__ import annotations

import os

import pynvml
import pytest

from agentd.gpu import probe_from_settings
from trainer.gpus import GpuFacts, GpuProcess, NoGpuProbe, NvmlProbe, Probe
from fake_nvml import FakeGpu, FakeNvml


def two_gpu_box() -> FakeNvml:
    return FakeNvml([FakeGpu("NVIDIA GeForce RTX 3090", total_mib=24576, reserved_mib=300,
                             utilization_pct=37, temperature_c=61),
                     FakeGpu("NVIDIA A100-SXM4-80GB", total_mib=81920, reserved_mib=500)])


def test_facts_are_read_from_nvml():
    nvml = two_gpu_box()
    nvml.add_process(0, pid=os.getpid(), used_mib=1200)
    nvml.add_process(0, pid=999_999_999, used_mib=8000)   # no such process here: name unknown
    probe = NvmlProbe(nvml)
    assert isinstance(probe, Probe)
    assert probe.available and probe.reason == ""

    gpus = probe.list_gpus()
    assert [g.index for g in gpus] == [0, 1]
    g0, g1 = gpus
    assert g0.name == "NVIDIA GeForce RTX 3090"
    assert g0.uuid == nvml.gpus[0].uuid and isinstance(g0.uuid, str)   # bytes from pynvml decoded
    assert (g0.memory_total_mib, g0.memory_used_mib, g0.memory_free_mib) == (24576, 9500, 15076)
    assert g0.utilization_pct == 37 and g0.temperature_c == 61
    assert g0.cuda_version == "12.4" and g0.driver_version == "550.54.15"
    assert g0.healthy and g0.error is None
    by_pid = {p.pid: p for p in g0.processes}
    assert by_pid[os.getpid()].used_mib == 1200 and by_pid[os.getpid()].name  # psutil found our name
    assert by_pid[999_999_999] == GpuProcess(pid=999_999_999, name=None, used_mib=8000)
    assert g0.foreign_mib({os.getpid()}) == 8000
    assert g1.processes == [] and g1.memory_free_mib == 81920 - 500


def test_graphics_processes_and_unknown_usage_are_merged():
    nvml = FakeNvml([FakeGpu()])
    nvml.add_process(0, pid=10, used_mib=None)                 # WDDM-style "not available"
    nvml.add_process(0, pid=11, used_mib=256, graphics=True)   # a display server
    (g,) = NvmlProbe(nvml, process_name=lambda pid: f"proc{pid}").list_gpus()
    assert g.processes == [GpuProcess(10, "proc10", None), GpuProcess(11, "proc11", 256)]
    assert g.foreign_mib(set()) == 256


def test_a_failing_metric_becomes_none_not_a_crash():
    nvml = two_gpu_box()
    nvml.fail_metric(0, "nvmlDeviceGetTemperature")                      # Not Supported
    nvml.fail_metric(0, "nvmlDeviceGetUtilizationRates", pynvml.NVML_ERROR_NO_PERMISSION)
    nvml.fail_metric(0, "nvmlDeviceGetComputeRunningProcesses")
    nvml.fail_metric(0, "nvmlDeviceGetGraphicsRunningProcesses")
    nvml.fail_metric(1, "nvmlDeviceGetMemoryInfo")
    g0, g1 = NvmlProbe(nvml).list_gpus()
    assert g0.healthy and g0.temperature_c is None and g0.utilization_pct is None
    assert g0.processes is None                       # unknown, not "nobody"
    assert g0.foreign_mib(set()) == g0.memory_used_mib  # unknown holders: all used memory is foreign
    assert g0.memory_total_mib == 24576
    assert g1.healthy and g1.memory_free_mib is None and g1.memory_total_mib is None
    assert g1.foreign_mib(set()) == 0


def test_lost_gpu_is_unhealthy_and_the_others_are_still_listed():
    nvml = two_gpu_box()
    probe = NvmlProbe(nvml)
    probe.list_gpus()                 # seen healthy once: name and size are remembered
    nvml.lose_device(0)
    g0, g1 = probe.list_gpus()
    assert not g0.healthy and "GPU is lost" in g0.error and "GPU 0" in g0.error
    assert g0.name == "NVIDIA GeForce RTX 3090" and g0.memory_total_mib == 24576
    assert g0.memory_free_mib is None
    assert g1.healthy and g1.memory_free_mib == 81920 - 500
    assert probe.available


def test_lost_gpu_failing_midway_through_the_queries():
    nvml = two_gpu_box()
    nvml.fail_metric(1, "nvmlDeviceGetMemoryInfo", pynvml.NVML_ERROR_GPU_IS_LOST)
    g0, g1 = NvmlProbe(nvml).list_gpus()
    assert g0.healthy
    assert not g1.healthy and g1.error == "GPU 1: GPU is lost"


@pytest.mark.parametrize("code, words", [
    (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML library not found"),
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "driver not loaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
    (pynvml.NVML_ERROR_UNKNOWN, "Unknown Error"),
])
def test_init_failure_means_cpu_only_with_a_reason(code, words):
    nvml = FakeNvml([FakeGpu()])
    nvml.fail_init(code)
    probe = NvmlProbe(nvml)
    assert not probe.available
    assert words in probe.reason and "CPU-only" in probe.reason
    assert probe.list_gpus() == []


def test_init_is_retried_on_later_calls():
    nvml = FakeNvml([FakeGpu()])
    nvml.fail_init(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    probe = NvmlProbe(nvml)
    assert probe.list_gpus() == [] and not probe.available
    nvml.fail_init(None)              # the driver module got loaded
    (g,) = probe.list_gpus()
    assert g.healthy and probe.available and probe.reason == ""


def test_driver_going_away_marks_known_gpus_unhealthy_then_recovers():
    nvml = two_gpu_box()
    probe = NvmlProbe(nvml)
    assert len(probe.list_gpus()) == 2
    nvml.unload_driver()
    gpus = probe.list_gpus()
    assert [g.healthy for g in gpus] == [False, False]     # not silently a CPU-only box
    assert all("Driver Not Loaded" in g.error for g in gpus)
    assert not probe.available and "Driver Not Loaded" in probe.reason
    nvml.load_driver()
    assert [g.healthy for g in probe.list_gpus()] == [True, True]
    assert probe.available


def test_no_visible_gpu():
    probe = NvmlProbe(FakeNvml([]))
    assert probe.list_gpus() == []
    assert not probe.available and "no GPU is visible" in probe.reason


def test_real_pynvml_never_raises_here():
    """On this machine (no driver) the real module must give a reason; on a GPU box, facts."""
    probe = NvmlProbe()
    gpus = probe.list_gpus()
    if probe.available:
        assert gpus and all(isinstance(g, GpuFacts) for g in gpus)
    else:
        assert probe.reason and gpus == []


def test_settings_can_disable_probing_and_facts_round_trip():
    class Settings:
        gpu_probe = "none"
    probe = probe_from_settings(Settings())
    assert isinstance(probe, NoGpuProbe) and not probe.available and "disabled" in probe.reason
    assert isinstance(probe_from_settings(None), NvmlProbe)
    nvml = FakeNvml([FakeGpu()])
    nvml.add_process(0, pid=5, used_mib=100)
    (g,) = NvmlProbe(nvml).list_gpus()
    assert GpuFacts.from_dict(g.to_dict()) == g


def test_gpus_present_at_start_are_remembered_even_if_never_listed():
    nvml = two_gpu_box()
    probe = NvmlProbe(nvml)          # the daemon builds the probe, then the driver dies
    nvml.unload_driver()
    assert [(g.index, g.healthy, g.name) for g in probe.list_gpus()] == [
        (0, False, "NVIDIA GeForce RTX 3090"), (1, False, "NVIDIA A100-SXM4-80GB")]
