"""The VRAM gate: pure decisions about where (and whether) a job may start. No I/O, no clock.

The scheduler probes the GPUs (`trainer.gpus`), estimates the job (`trainer.checks.vram`, through `trainer.api`), and asks
`gate_decision` what to do. The answer is one of:

- ``start``       - run on ``slot`` now;
- ``wait``        - nothing fits right now; ``reason`` says, per GPU, what was needed vs free and which
                    foreign processes hold the memory (the scheduler repeats the decision when the probe
                    changes, and applies ``gate_timeout``);
- ``never_fits``  - the job needs more than the largest GPU here has in total (margin included): fail at
                    once; ``largest_total_mib`` lets the caller compute a batch size that would fit;
- ``unavailable`` - this box has GPUs but every one is unhealthy (lost, driver gone).

Rules (and why):

- A job needs ``estimate_mib + margin_mib`` of free memory. The margin absorbs estimator error,
  allocator fragmentation and memory other processes take while the job loads.
- One agentd job per GPU: slots in ``busy_indices`` are skipped even if memory looks free, because the
  running job's memory peaks later than its start.
- Best fit: among the GPUs that fit, the one with the *least* free memory is chosen (ties: lowest index).
  This keeps the roomiest GPU free for a bigger job that may come next - the usual best-fit packing.
- ``max_foreign_vram_mib`` (the seed's `nvidia-smi` check): a GPU where processes that are not ours
  (pids outside ``own_pids``) hold more than this many MiB is blocked whatever its free memory. When
  the process list is unknown, all used memory counts as foreign (see `GpuFacts.foreign_mib`).
- Unhealthy GPUs are skipped; the others keep working.
- A healthy GPU whose NVML reports no free-memory figure (some GPUs do not) is used only when no GPU
  with a known figure fits, and the reason says the memory check was skipped.
- ``allowed`` (a config's ``device:``, see `trainer.gpus.match_device`): only those GPUs are considered;
  the others are listed as "not the requested device".
- ``own_mib``: what agentd itself holds on each GPU (a warm base model, the CUDA context). It is never
  counted as foreign, even when NVML cannot list processes.
- No GPU at all (``gpus == []``, a CPU-only box): the CPU slots (``cpu_indices``: -1, -2, ...; settings
  ``cpu_slots``). The gate starts on free ones: the VRAM estimate says nothing about host RAM, and there is
  nothing else to wait for.
- ``world`` (a config's ``devices:``, W ranks): W slots at once, each passing every rule above, or none
  (no partial grab: a job holding some slots while waiting for others could deadlock with another such
  job). The W best fits are taken; fewer than W healthy GPUs (among ``allowed``) never fits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

from trainer.gpus import GpuFacts

CPU_SLOT = -1


def cpu_slot_index(n: int) -> int:
    """The index of the n-th CPU slot (0-based): -1, -2, ... (NVML indices are never negative)."""
    return CPU_SLOT - n


def is_cpu_slot(index: int) -> bool:
    return index < 0

Outcome = Literal["start", "wait", "never_fits", "unavailable"]


@dataclass(frozen=True)
class GateDecision:
    outcome: Outcome
    reason: str
    needed_mib: int
    """estimate + margin: the free memory a slot must have."""
    slots: tuple[int, ...] = ()
    """NVML indices of the chosen GPUs (``start`` only, one per rank); CPU slot indices on a CPU-only box."""
    largest_total_mib: Optional[int] = None
    """The largest healthy GPU's total memory (for ``never_fits`` advice)."""
    per_gpu: tuple[str, ...] = field(default_factory=tuple)
    """One line per GPU: why it was or was not chosen (for `agentd run`'s wait messages)."""

    @property
    def slot(self) -> Optional[int]:
        """The first chosen slot (the only one for a one-device job)."""
        return self.slots[0] if self.slots else None

    @property
    def device(self) -> Optional[str]:
        """The torch device for ``slot`` ("cuda:N" assumes CUDA_DEVICE_ORDER=PCI_BUS_ID, see trainer.gpus)."""
        if self.slot is None:
            return None
        return "cpu" if is_cpu_slot(self.slot) else f"cuda:{self.slot}"


def _gpu_label(g: GpuFacts) -> str:
    return f"GPU {g.index} ({g.name})" if g.name else f"GPU {g.index}"


def _holders(g: GpuFacts, own_pids: Iterable[int]) -> str:
    """'held by pid 4242 python 20000 MiB, pid 99 ? N/A' - the foreign processes, biggest first."""
    procs = sorted(g.foreign_processes(set(own_pids)), key=lambda p: -(p.used_mib or 0))
    if not procs:
        return ""
    items = [f"pid {p.pid} {p.name or '?'} {p.used_mib if p.used_mib is not None else 'N/A'} MiB"
             for p in procs]
    return "; held by " + ", ".join(items)


def gate_decision(estimate_mib: int, gpus: list[GpuFacts], busy_indices: set[int], margin_mib: int,
                  max_foreign_vram_mib: Optional[int], own_pids: set[int], allowed: Optional[set[int]] = None,
                  own_mib: Optional[dict[int, int]] = None, world: int = 1,
                  cpu_indices: tuple[int, ...] = (CPU_SLOT,)) -> GateDecision:
    """Decide where a job that needs ``estimate_mib`` (plus ``margin_mib``) on each of ``world`` slots may
    start. Pure.

    See the module docstring for the rules. ``busy_indices`` holds the slots running agentd jobs (CPU slot
    indices included); ``cpu_indices``: the CPU slots of a box without GPUs.
    """
    estimate_mib, margin_mib = int(estimate_mib), int(margin_mib)
    needed = estimate_mib + margin_mib
    each = " each" if world > 1 else ""
    need_text = f"needs {needed} MiB{each} (estimate {estimate_mib} + margin {margin_mib})" + (
        f" on {world} GPUs" if world > 1 else "")

    if not gpus:
        free = [i for i in cpu_indices if i not in busy_indices]
        lines = tuple(f"CPU slot {-i}: {'busy' if i in busy_indices else 'free'}" for i in cpu_indices)
        if world > len(cpu_indices):
            return GateDecision("never_fits", f"this job needs {world} CPU slots; this box has "
                                f"{len(cpu_indices)} (settings cpu_slots)", needed, per_gpu=lines)
        if len(free) < world:
            return GateDecision("wait", f"no GPU on this box; {len(free)} of the {world} CPU slots this job "
                                "needs are free (the others run other jobs)", needed, per_gpu=lines)
        return GateDecision("start", "no GPU on this box: running on the CPU slot" + ("s" if world > 1 else "")
                            + " (the VRAM gate does not apply)", needed, slots=tuple(free[:world]),
                            per_gpu=lines)

    lines: list[str] = []
    if allowed is not None:
        lines = [f"{_gpu_label(g)}: not the requested device" for g in gpus if g.index not in allowed]
        gpus = [g for g in gpus if g.index in allowed]
    healthy = [g for g in gpus if g.healthy]
    if not healthy:
        errors = "; ".join(g.error or f"{_gpu_label(g)}: unhealthy" for g in gpus)
        what = "requested GPU" if allowed is not None else "GPU"
        return GateDecision("unavailable", f"no healthy {what}: {errors}", needed,
                            per_gpu=tuple(g.error or f"{_gpu_label(g)}: unhealthy" for g in gpus))

    totals = [g.memory_total_mib for g in healthy if g.memory_total_mib is not None]
    largest = max(totals) if totals else None
    # Never fits: bigger than every GPU here, the unhealthy ones included (one may come back).
    known = [g for g in gpus if g.memory_total_mib is not None]
    if len(healthy) < world:
        what = "requested GPUs" if allowed is not None else "GPUs"
        return GateDecision("never_fits", f"this job needs {world} GPUs; {len(healthy)} healthy {what} here",
                            needed, largest_total_mib=largest)
    if known and len(totals) == len(healthy) and needed > max(g.memory_total_mib for g in known):
        big = max(known, key=lambda g: g.memory_total_mib)
        replicated = ("; data parallel keeps a whole copy of the base on each GPU, so more GPUs do not make it fit "
                      "(sharding the base over GPUs is not offered)") if world > 1 else ""
        return GateDecision("never_fits", f"this job {need_text}, more than the largest GPU here has in "
                            f"total: {_gpu_label(big)} {big.memory_total_mib} MiB{replicated}", needed,
                            largest_total_mib=largest)

    fits: list[GpuFacts] = []
    unknown_free: list[GpuFacts] = []
    for g in gpus:
        label = _gpu_label(g)
        if not g.healthy:
            lines.append(g.error or f"{label}: unhealthy")
            continue
        if g.index in busy_indices:
            lines.append(f"{label}: running another agentd job")
            continue
        foreign = g.foreign_mib(own_pids, (own_mib or {}).get(g.index, 0))
        if max_foreign_vram_mib is not None and foreign is not None and foreign > max_foreign_vram_mib:
            lines.append(f"{label}: other processes hold {foreign} MiB, over max_foreign_vram_mib "
                         f"{max_foreign_vram_mib}{_holders(g, own_pids)}")
            continue
        if g.memory_total_mib is not None and needed > g.memory_total_mib:
            lines.append(f"{label}: too small ({g.memory_total_mib} MiB in total)")
            continue
        if g.memory_free_mib is None:
            unknown_free.append(g)
            lines.append(f"{label}: free memory not reported by NVML")
            continue
        if g.memory_free_mib >= needed:
            fits.append(g)
            lines.append(f"{label}: {g.memory_free_mib} MiB free, fits")
        else:
            total = g.memory_total_mib if g.memory_total_mib is not None else "N/A"
            lines.append(f"{label}: {g.memory_free_mib} MiB free of {total}{_holders(g, own_pids)}")

    chosen = sorted(fits, key=lambda g: (g.memory_free_mib, g.index))[:world]
    if len(chosen) == world:
        where = ", ".join(f"{_gpu_label(g)}: {g.memory_free_mib} MiB free" for g in chosen)
        return GateDecision("start", f"{where}; job {need_text}", needed, slots=tuple(g.index for g in chosen),
                            largest_total_mib=largest, per_gpu=tuple(lines))
    if len(chosen) + len(unknown_free) >= world:
        blind = unknown_free[:world - len(chosen)]
        return GateDecision("start", f"{', '.join(_gpu_label(g) for g in blind)}: NVML reports no free-memory "
                            f"figure; starting without the memory check (job {need_text})", needed,
                            slots=tuple(g.index for g in chosen + blind), largest_total_mib=largest,
                            per_gpu=tuple(lines))
    if world > 1:
        return GateDecision("wait", f"waiting for {world} GPUs at once: {len(chosen)} fit now; job {need_text}; "
                            + "; ".join(lines), needed, largest_total_mib=largest, per_gpu=tuple(lines))
    return GateDecision("wait", f"waiting for GPU memory: job {need_text}; " + "; ".join(lines), needed,
                        largest_total_mib=largest, per_gpu=tuple(lines))


def node_blocked_reason(gpus: list[GpuFacts], max_foreign_vram_mib: Optional[int], draining: bool,
                        own_pids: set[int] = frozenset(), own_mib: Optional[dict[int, int]] = None) -> Optional[str]:
    """Why Jenkins should see this node offline now, or None when it can take jobs. Pure.

    Offline when the daemon is draining, when the box has GPUs but none is healthy, or when every
    healthy GPU is blocked by foreign memory over ``max_foreign_vram_mib``. A CPU-only box (no GPUs) is
    not blocked. One GPU still usable keeps the node online: its jobs wait in the gate, not in Jenkins.
    """
    if draining:
        return "agentd is draining: finishing the running jobs, accepting no new ones"
    if not gpus:
        return None
    healthy = [g for g in gpus if g.healthy]
    if not healthy:
        return "no healthy GPU: " + "; ".join(g.error or f"{_gpu_label(g)}: unhealthy" for g in gpus)
    if max_foreign_vram_mib is None:
        return None
    blocked = []
    for g in healthy:
        foreign = g.foreign_mib(own_pids, (own_mib or {}).get(g.index, 0))
        if foreign is None or foreign <= max_foreign_vram_mib:
            return None
        blocked.append(f"{_gpu_label(g)} {foreign} MiB{_holders(g, own_pids)}")
    return (f"other processes hold more than max_foreign_vram_mib ({max_foreign_vram_mib} MiB) on every "
            f"GPU: " + "; ".join(blocked))
