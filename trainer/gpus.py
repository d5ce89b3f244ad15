"""GPU facts: what each GPU has and who holds its memory, collected apart from any rendering.

Vocabulary shared by the daemon (`agentd`: status, Jenkins labels, the VRAM gate) and `lora-train validate`;
it imports nothing from the trainer or the daemon.

Like gpustat/nvitop, collection (`Probe.list_gpus()` -> `GpuFacts`) is separate from display: the
status renderer, the Jenkins labels and the VRAM gate all read the same plain dataclasses.

Rules:
- Any metric may be None (a GPU or driver that does not support it, a permission problem). Renderers
  show None as "N/A"; nothing here raises because a metric is missing.
- A GPU whose queries fail with a device-level error (NVML "GPU is lost", "GPU requires reset",
  "Unknown Error") is reported with ``healthy=False`` and the reason; the other GPUs are still listed.
- If NVML cannot start (no driver: "NVML Shared Library Not Found", "Driver Not Loaded") the probe is
  ``available=False`` with a reason and the box runs CPU-only. If NVML stops answering after GPUs were
  seen (driver unloaded, hung), the GPUs seen before are reported unhealthy - never silently dropped,
  so the gate cannot mistake a broken GPU box for a CPU-only one. Every later call tries to start NVML
  again, so the probe recovers by itself when the driver comes back.

Slot numbers are NVML indices, which follow PCI bus order. CUDA numbers devices "fastest first"
unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is set: the daemon must set that (before CUDA starts) so that
``cuda:N`` is the GPU this probe calls N.

This module does not import torch; pynvml is imported only when an `NvmlProbe` is created without an
injected module.
"""
from __future__ import annotations

import fnmatch
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

MIB = 1024 * 1024

# Free memory a job needs beyond its VRAM estimate before it may start on a GPU (the daemon's
# `vram_margin_mib` default, and the margin `validate` plans with): it absorbs estimator error,
# allocator fragmentation and memory other processes take while the job loads.
VRAM_MARGIN_MIB = 1024

# NVML error codes (the numbers from nvml.h, also pynvml.NVML_ERROR_*), so that this module can classify
# errors without importing pynvml. Checked against nvidia-ml-py 13.
_ERR_UNINITIALIZED = 1
_ERR_NO_PERMISSION = 4
_ERR_DRIVER_NOT_LOADED = 9
_ERR_TIMEOUT = 10
_ERR_IRQ_ISSUE = 11
_ERR_LIBRARY_NOT_FOUND = 12
_ERR_GPU_IS_LOST = 15
_ERR_RESET_REQUIRED = 16
_ERR_LIB_RM_VERSION_MISMATCH = 18
_ERR_UNKNOWN = 999

# Errors that mean this GPU cannot be used (whichever call raised them).
DEVICE_FATAL_CODES = frozenset({_ERR_GPU_IS_LOST, _ERR_RESET_REQUIRED, _ERR_UNKNOWN, _ERR_IRQ_ISSUE,
                                _ERR_TIMEOUT})
# Errors that mean NVML as a whole is gone: re-initialise on the next call.
SESSION_FATAL_CODES = frozenset({_ERR_UNINITIALIZED, _ERR_DRIVER_NOT_LOADED, _ERR_LIBRARY_NOT_FOUND,
                                 _ERR_LIB_RM_VERSION_MISMATCH})
# Everything else (Not Supported, No Permission on one query, Function Not Found, No Data...) only
# loses that one metric.

_INIT_REASONS = {
    _ERR_LIBRARY_NOT_FOUND: "NVML library not found (libnvidia-ml.so.1): no NVIDIA driver; running CPU-only",
    _ERR_DRIVER_NOT_LOADED: "NVIDIA driver not loaded (NVML: Driver Not Loaded); running CPU-only",
    _ERR_NO_PERMISSION: "no permission to use the NVIDIA devices (check /dev/nvidia* access for the "
                        "agentd user); running CPU-only",
    _ERR_LIB_RM_VERSION_MISMATCH: "NVML/driver version mismatch (driver updated without a reboot?); "
                                  "running CPU-only",
}


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU. ``name`` and ``used_mib`` may be unknown (None)."""

    pid: int
    name: Optional[str]
    used_mib: Optional[int]


@dataclass(frozen=True)
class GpuFacts:
    """One GPU as NVML sees it at one moment. Every metric may be None (not supported / unreadable).

    ``processes`` is None when the process list could not be read (distinct from "nobody": []).
    ``healthy`` is False when the GPU itself failed (lost, needs reset); ``error`` then says why.
    """

    index: int
    uuid: Optional[str]
    name: Optional[str]
    memory_total_mib: Optional[int]
    memory_used_mib: Optional[int]
    memory_free_mib: Optional[int]
    utilization_pct: Optional[int]
    temperature_c: Optional[int]
    cuda_version: Optional[str]
    processes: Optional[list[GpuProcess]]
    healthy: bool = True
    error: Optional[str] = None
    driver_version: Optional[str] = None

    def foreign_processes(self, own_pids: set[int] | frozenset[int] = frozenset()) -> list[GpuProcess]:
        """Processes on this GPU that are not ours (not in ``own_pids``)."""
        return [p for p in (self.processes or []) if p.pid not in own_pids]

    def foreign_mib(self, own_pids: set[int] | frozenset[int] = frozenset(), own_mib: int = 0) -> Optional[int]:
        """MiB held by processes that are not ours.

        When the process list is unknown, all used memory but ``own_mib`` (what agentd knows it holds
        itself) counts as foreign (the cautious reading); None only when that is unknown too. A process
        whose own usage is unknown counts as 0.
        """
        if self.processes is None:
            if self.memory_used_mib is None:
                return None
            return max(0, self.memory_used_mib - int(own_mib or 0))
        return sum(p.used_mib or 0 for p in self.foreign_processes(own_pids))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (for the control socket and status)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuFacts":
        data = dict(data)
        procs = data.get("processes")
        if procs is not None:
            data["processes"] = [GpuProcess(**p) for p in procs]
        return cls(**data)


@runtime_checkable
class Probe(Protocol):
    """Where GPU facts come from. `NvmlProbe` in production; tests inject a fake NVML into it."""

    def list_gpus(self) -> list[GpuFacts]:
        """Facts for every GPU, unhealthy ones included. Never raises for a GPU or driver problem."""
        ...

    @property
    def available(self) -> bool:
        """True when GPUs can be queried (as of the last attempt)."""
        ...

    @property
    def reason(self) -> str:
        """Why no GPU is available ("" when available)."""
        ...


class NoGpuProbe:
    """A probe for a box that has (or is configured to use) no GPU: always CPU-only."""

    def __init__(self, reason: str = "GPU probing disabled; running CPU-only"):
        self._reason = reason

    def list_gpus(self) -> list[GpuFacts]:
        return []

    @property
    def available(self) -> bool:
        return False

    @property
    def reason(self) -> str:
        return self._reason


def _psutil_process_name(pid: int) -> Optional[str]:
    """The process's name, or None when it is gone, not ours to read, or in another PID namespace."""
    try:
        import psutil
        return psutil.Process(pid).name()
    except Exception:  # NoSuchProcess, AccessDenied, ZombieProcess, psutil missing
        return None


class _DeviceFailed(Exception):
    pass


class _SessionFailed(Exception):
    pass


@dataclass
class _Known:
    uuid: Optional[str] = None
    name: Optional[str] = None
    memory_total_mib: Optional[int] = None


class NvmlProbe:
    """GPU facts from NVML (the `nvidia-ml-py` package, module `pynvml`).

    ``nvml_module`` is the pynvml module (default: ``import pynvml``); tests pass a fake with the same
    functions and error classes. ``process_name`` maps a pid to a name (default: psutil).
    Safe to call from several threads (status and scheduler): queries are serialised.
    """

    def __init__(self, nvml_module: Any = None, *,
                 process_name: Callable[[int], Optional[str]] = _psutil_process_name):
        self._nvml = nvml_module
        self._process_name = process_name
        self._initialized = False
        self._available = False
        self._reason = "NVML not queried yet"
        self._known: dict[int, _Known] = {}
        self._lock = threading.Lock()
        if self._nvml is None:
            try:
                import pynvml
                self._nvml = pynvml
            except ImportError as e:
                self._reason = f"nvidia-ml-py (pynvml) is not installed ({e}); running CPU-only"
                return
        with self._lock:
            self._list_gpus()   # settles `available` and remembers the GPUs present at start

    # --- Probe protocol ---------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self._available

    @property
    def reason(self) -> str:
        return "" if self._available else self._reason

    def list_gpus(self) -> list[GpuFacts]:
        if self._nvml is None:
            return []
        with self._lock:
            return self._list_gpus()

    def close(self) -> None:
        """Release NVML (optional; the process exiting does the same)."""
        with self._lock:
            if self._initialized:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:
                    pass
                self._initialized = False

    # --- internals --------------------------------------------------------------------------------
    def _list_gpus(self) -> list[GpuFacts]:
        if not self._initialized and not self._init():
            return self._known_as_unhealthy(self._reason)
        try:
            count = self._call(self._nvml.nvmlDeviceGetCount)
            cuda_version, driver_version = self._system_versions()
            gpus = [self._device_facts(i, cuda_version, driver_version) for i in range(count)]
        except _SessionFailed as e:
            try:
                self._nvml.nvmlShutdown()    # balance NVML's init count before the next attempt
            except Exception:
                pass
            self._initialized = False
            self._available = False
            self._reason = f"NVML stopped answering: {e}; will retry"
            return self._known_as_unhealthy(self._reason)
        self._available = bool(gpus)
        if not gpus:
            self._reason = "the NVIDIA driver is loaded but no GPU is visible; running CPU-only"
        return gpus

    def _init(self) -> bool:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            code = getattr(e, "value", None)
            self._reason = _INIT_REASONS.get(code, f"NVML failed to start: {e}; running CPU-only")
            self._available = False
            return False
        except OSError as e:  # a broken library file, on some platforms
            self._reason = f"NVML failed to load: {e}; running CPU-only"
            self._available = False
            return False
        self._initialized = True
        self._available = True
        self._reason = ""
        return True

    def _call(self, fn: Callable, *args: Any) -> Any:
        """Call an NVML function; classify a failure as session-, device- or metric-level."""
        try:
            return fn(*args)
        except self._nvml.NVMLError as e:
            code = getattr(e, "value", None)
            if code in SESSION_FATAL_CODES:
                raise _SessionFailed(str(e)) from e
            if code in DEVICE_FATAL_CODES:
                raise _DeviceFailed(str(e)) from e
            raise

    def _metric(self, fn: Optional[Callable], *args: Any) -> Any:
        """A metric that may be missing: None on a metric-level error or a call this pynvml lacks."""
        if fn is None:
            return None
        try:
            return self._call(fn, *args)
        except self._nvml.NVMLError:
            return None
        except getattr(self._nvml, "NVMLLibraryMismatchError", ()):  # old driver without this call
            return None

    def _system_versions(self) -> tuple[Optional[str], Optional[str]]:
        try:
            cuda = self._metric(getattr(self._nvml, "nvmlSystemGetCudaDriverVersion", None))
            driver = self._metric(getattr(self._nvml, "nvmlSystemGetDriverVersion", None))
        except _DeviceFailed:
            return None, None
        cuda_text = f"{cuda // 1000}.{(cuda % 1000) // 10}" if isinstance(cuda, int) and cuda > 0 else None
        return cuda_text, _text(driver)

    def _device_facts(self, index: int, cuda_version: Optional[str],
                      driver_version: Optional[str]) -> GpuFacts:
        nvml = self._nvml
        known = self._known.setdefault(index, _Known())
        try:
            try:
                handle = self._call(nvml.nvmlDeviceGetHandleByIndex, index)
            except nvml.NVMLError as e:
                raise _DeviceFailed(str(e)) from e
            uuid = _text(self._metric(nvml.nvmlDeviceGetUUID, handle))
            name = _text(self._metric(nvml.nvmlDeviceGetName, handle))
            known.uuid = uuid or known.uuid
            known.name = name or known.name
            mem = self._metric(nvml.nvmlDeviceGetMemoryInfo, handle)
            total = _mib(getattr(mem, "total", None))
            used = _mib(getattr(mem, "used", None))
            free = _mib(getattr(mem, "free", None))
            known.memory_total_mib = total or known.memory_total_mib
            util = self._metric(nvml.nvmlDeviceGetUtilizationRates, handle)
            temperature = self._metric(nvml.nvmlDeviceGetTemperature, handle,
                                       getattr(nvml, "NVML_TEMPERATURE_GPU", 0))
            processes = self._processes(handle)
        except _DeviceFailed as e:
            return GpuFacts(index=index, uuid=known.uuid, name=known.name,
                            memory_total_mib=known.memory_total_mib, memory_used_mib=None,
                            memory_free_mib=None, utilization_pct=None, temperature_c=None,
                            cuda_version=cuda_version, processes=None, healthy=False,
                            error=f"GPU {index}: {e}", driver_version=driver_version)
        return GpuFacts(index=index, uuid=uuid, name=name, memory_total_mib=total, memory_used_mib=used,
                        memory_free_mib=free, utilization_pct=_int(getattr(util, "gpu", None)),
                        temperature_c=_int(temperature), cuda_version=cuda_version, processes=processes,
                        healthy=True, error=None, driver_version=driver_version)

    def _processes(self, handle: Any) -> Optional[list[GpuProcess]]:
        """Compute and graphics processes merged by pid; None when neither list could be read."""
        lists = [self._metric(getattr(self._nvml, fn_name, None), handle)
                 for fn_name in ("nvmlDeviceGetComputeRunningProcesses",
                                 "nvmlDeviceGetGraphicsRunningProcesses")]
        if all(lst is None for lst in lists):
            return None
        used: dict[int, Optional[int]] = {}
        for lst in lists:
            for p in lst or []:
                pid = int(p.pid)
                mib = _mib(getattr(p, "usedGpuMemory", None))
                if pid not in used or (mib is not None and (used[pid] is None or mib > used[pid])):
                    used[pid] = mib
        return [GpuProcess(pid=pid, name=self._process_name(pid), used_mib=mib)
                for pid, mib in sorted(used.items())]

    def _known_as_unhealthy(self, reason: str) -> list[GpuFacts]:
        """GPUs seen before, reported unhealthy while NVML is down (empty on a box that never had one)."""
        return [GpuFacts(index=i, uuid=k.uuid, name=k.name, memory_total_mib=k.memory_total_mib,
                         memory_used_mib=None, memory_free_mib=None, utilization_pct=None,
                         temperature_c=None, cuda_version=None, processes=None, healthy=False,
                         error=reason)
                for i, k in sorted(self._known.items())]


def _mib(value: Any) -> Optional[int]:
    """Bytes -> MiB (floor); None for unknown. NVML's "not available" sentinel arrives as None."""
    if value is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        return None
    if value < 0 or value >= 2 ** 64 - 1:
        return None
    return value // MIB


def _int(value: Any) -> Optional[int]:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> Optional[str]:
    """pynvml returns str for most strings but bytes for some (nvmlDeviceGetUUID in nvidia-ml-py 13)."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def default_probe() -> Probe:
    """The production probe: NVML through pynvml (CPU-only with a reason when there is no driver)."""
    return NvmlProbe()


class NoSuchDevice(ValueError):
    """A config's ``device:`` matches no GPU here; the message lists the GPUs there are."""


def gpu_list(gpus: list[GpuFacts]) -> str:
    return "; ".join(f"{g.index}: {g.name or 'N/A'} ({g.uuid or 'no UUID'})" for g in gpus) or "none (CPU only)"


def match_device(spec, gpus: list[GpuFacts]) -> set[int]:
    """The NVML indices a config's ``device:`` names: an index (0 or "0"), a GPU UUID ("GPU-8f2c...",
    a unique prefix is enough) or a name pattern ("*4090*", case-insensitive). Pure.
    Raises NoSuchDevice naming the GPUs on this box when nothing matches."""
    text = str(spec).strip()
    if text.isdigit():
        found = {g.index for g in gpus if g.index == int(text)}
    elif text.upper().startswith(("GPU-", "MIG-")):
        found = {g.index for g in gpus if g.uuid and g.uuid.lower().startswith(text.lower())}
    else:
        found = {g.index for g in gpus if g.name and fnmatch.fnmatch(g.name.lower(), text.lower())}
    if not found:
        raise NoSuchDevice(f"device {text!r} matches no GPU on this box; GPUs here: {gpu_list(gpus)}. "
                           "Use an index, a GPU UUID or a name pattern such as \"*4090*\"")
    return found


def foreground_device(override: str | None, spec, gpus: list[GpuFacts]) -> tuple[str | None, str | None]:
    """The torch device of a job run in the foreground (`lora-train`) and the line that says why. Pure.

    `override` (``--device``) wins over the config's ``device:`` (`spec`), and says so. Otherwise ``device:``
    means what it means to the daemon (`match_device`: an index, UUID or name pattern), the matching GPU
    with the most free memory standing in for the daemon's VRAM gate; None: the trainer's default.
    Raises NoSuchDevice as the daemon refuses it. "cuda:N" assumes CUDA_DEVICE_ORDER=PCI_BUS_ID (NVML's order)."""
    if override is not None:
        return override, (f"--device {override} overrides the config's device: {spec}" if spec is not None else None)
    if spec is None:
        return None, None
    found = match_device(spec, gpus)
    best = max((g for g in gpus if g.index in found), key=lambda g: (g.memory_free_mib or 0, -g.index))
    return f"cuda:{best.index}", f"device: {spec} -> cuda:{best.index} ({best.name or 'GPU'})"
