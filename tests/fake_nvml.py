"""A fake of NVML as the `pynvml` module (nvidia-ml-py) presents it, for machines with no NVIDIA driver.

It mirrors pynvml, not our code: the same function names and call signatures, the same return types
(memory info with ``total/free/used`` in bytes, utilization with ``gpu/memory``, process entries that
are pynvml's own ``nvmlFriendlyObject`` with ``pid/usedGpuMemory/gpuInstanceId/computeInstanceId``,
``nvmlDeviceGetUUID`` returning bytes as nvidia-ml-py 13 does, a CUDA driver version like 12040), and
the same errors: the real ``pynvml.NVMLError(code)``, which pynvml turns into its per-code subclasses
(``NVMLError_GpuIsLost``...). Calls before ``nvmlInit`` (or after the last ``nvmlShutdown``) raise
``NVML_ERROR_UNINITIALIZED`` like the real library.

Control it like a box:

    nvml = FakeNvml([FakeGpu("NVIDIA GeForce RTX 3090", total_mib=24576)])
    nvml.add_process(0, pid=4242, used_mib=20000)   # someone else's job
    nvml.remove_process(0, 4242)
    nvml.lose_device(0)                              # "GPU is lost" from then on
    nvml.fail_metric(0, "nvmlDeviceGetTemperature")  # that call: "Not Supported"
    nvml.fail_init(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)   # no driver
    nvml.unload_driver() / nvml.load_driver()
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pynvml

MIB = 1024 * 1024


@dataclass
class FakeProcess:
    pid: int
    used_mib: Optional[int]  # None: NVML reports "not available" (WDDM); pynvml hands that over as None
    graphics: bool = False


@dataclass
class FakeGpu:
    name: str = "NVIDIA GeForce RTX 3090"
    total_mib: int = 24576
    reserved_mib: int = 300          # what the driver itself holds: "used" even with no process
    utilization_pct: int = 0
    temperature_c: int = 40
    uuid: Optional[str] = None
    processes: list[FakeProcess] = field(default_factory=list)
    lost: bool = False
    failing: dict[str, int] = field(default_factory=dict)  # function name -> NVML error code

    @property
    def used_mib(self) -> int:
        return self.reserved_mib + sum(p.used_mib or 0 for p in self.processes)


class _Handle:
    """Stands for pynvml's c_nvmlDevice_t: an opaque token passed back to device calls."""

    def __init__(self, index: int):
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


class FakeNvml:
    """The fake module. NVML_* constants, NVMLError and its subclasses come from the real pynvml."""

    def __init__(self, gpus: Optional[list[FakeGpu]] = None, *, driver_version: str = "550.54.15",
                 cuda_driver_version: int = 12040):
        self.gpus: list[FakeGpu] = []
        self.set_gpus(gpus if gpus is not None else [FakeGpu()])
        self.driver_version = driver_version
        self.cuda_driver_version = cuda_driver_version
        self._refcount = 0
        self._init_error: Optional[int] = None
        self._driver_loaded = True
        self.calls: list[str] = []

    # Real constants and error classes (NVML_ERROR_*, NVML_TEMPERATURE_GPU, NVMLError_GpuIsLost...).
    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "NVMLError", "NVMLLibraryMismatchError")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    # --- control ----------------------------------------------------------------------------------
    def set_gpus(self, gpus: list[FakeGpu]) -> None:
        for i, g in enumerate(gpus):
            if g.uuid is None:
                g.uuid = f"GPU-{i:08x}-fake-4e6f-9a1b-00000000000{i}"
        self.gpus = list(gpus)

    def add_process(self, index: int, pid: int, used_mib: Optional[int], *, graphics: bool = False) -> None:
        self.gpus[index].processes.append(FakeProcess(pid, used_mib, graphics))

    def remove_process(self, index: int, pid: int) -> None:
        self.gpus[index].processes = [p for p in self.gpus[index].processes if p.pid != pid]

    def lose_device(self, index: int) -> None:
        self.gpus[index].lost = True

    def fail_metric(self, index: int, function: str, code: int = pynvml.NVML_ERROR_NOT_SUPPORTED) -> None:
        self.gpus[index].failing[function] = code

    def fail_init(self, code: Optional[int]) -> None:
        """Make nvmlInit raise NVMLError(code) (None: succeed again)."""
        self._init_error = code

    def unload_driver(self) -> None:
        """The driver goes away under a running process: calls answer Driver Not Loaded / Uninitialized."""
        self._driver_loaded = False
        self._init_error = pynvml.NVML_ERROR_DRIVER_NOT_LOADED

    def load_driver(self) -> None:
        self._driver_loaded = True
        self._init_error = None

    # --- library lifecycle --------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        self.nvmlInitWithFlags(0)

    def nvmlInitWithFlags(self, flags: int) -> None:
        self.calls.append("nvmlInit")
        if self._init_error is not None:
            raise pynvml.NVMLError(self._init_error)
        self._refcount += 1

    def nvmlShutdown(self) -> None:
        self._check()
        if self._refcount > 0:
            self._refcount -= 1

    def _check(self) -> None:
        if not self._driver_loaded:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        if self._refcount <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: _Handle, function: str) -> FakeGpu:
        self._check()
        self.calls.append(function)
        if not isinstance(handle, _Handle) or not 0 <= handle.index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[handle.index]
        if gpu.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if function in gpu.failing:
            raise pynvml.NVMLError(gpu.failing[function])
        return gpu

    # --- system queries ---------------------------------------------------------------------------
    def nvmlSystemGetDriverVersion(self) -> str:
        self._check()
        return self.driver_version

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._check()
        return self.cuda_driver_version

    # --- device queries ---------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check()
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[index].lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return self._device(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: _Handle) -> bytes:
        # nvidia-ml-py 13's nvmlDeviceGetUUID has no str conversion: it returns the raw char buffer.
        return self._device(handle, "nvmlDeviceGetUUID").uuid.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: Optional[int] = None) -> Any:
        gpu = self._device(handle, "nvmlDeviceGetMemoryInfo")
        total, used = gpu.total_mib * MIB, min(gpu.used_mib, gpu.total_mib) * MIB
        if version:
            mem = pynvml.c_nvmlMemory_v2_t()
            mem.version, mem.reserved = version, gpu.reserved_mib * MIB
        else:
            mem = pynvml.c_nvmlMemory_t()
        mem.total, mem.used, mem.free = total, used, total - used
        return mem

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> Any:
        gpu = self._device(handle, "nvmlDeviceGetUtilizationRates")
        util = pynvml.c_nvmlUtilization_t()
        util.gpu, util.memory = gpu.utilization_pct, gpu.utilization_pct
        return util

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        gpu = self._device(handle, "nvmlDeviceGetTemperature")
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list:
        gpu = self._device(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [_process_object(p) for p in gpu.processes if not p.graphics]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list:
        gpu = self._device(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        return [_process_object(p) for p in gpu.processes if p.graphics]


def _process_object(p: FakeProcess) -> Any:
    """What pynvml returns per process: nvmlStructToFriendlyObject(c_nvmlProcessInfo_v3_t)."""
    return pynvml.nvmlFriendlyObject({
        "pid": p.pid,
        "usedGpuMemory": None if p.used_mib is None else p.used_mib * MIB,
        "gpuInstanceId": 0xFFFFFFFF,
        "computeInstanceId": 0xFFFFFFFF,
    })
