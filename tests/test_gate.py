"""The VRAM gate, fed by the real NVML probe over a fake NVML, and the estimator for the advice."""
from __future__ import annotations

import os

import pytest

from agentd.gate import CPU_SLOT, gate_decision, node_blocked_reason
from trainer.gpus import GpuFacts, NvmlProbe
from fake_nvml import FakeGpu, FakeNvml
from test_vram import image_args, write_sd15_configs
from trainer.checks.vram import estimate_vram, recommend_batch_size

OWN = {os.getpid()}
MARGIN = 1024


def probe_of(*gpus: FakeGpu) -> tuple[FakeNvml, NvmlProbe]:
    nvml = FakeNvml(list(gpus))
    return nvml, NvmlProbe(nvml)


def decide(probe, estimate_mib, *, busy=frozenset(), max_foreign=None, own=OWN, margin=MARGIN):
    return gate_decision(estimate_mib, probe.list_gpus(), set(busy), margin, max_foreign, set(own))


def test_fits_starts():
    _, probe = probe_of(FakeGpu("NVIDIA GeForce RTX 3090", total_mib=24576))
    d = decide(probe, 8000)
    assert d.outcome == "start" and d.slot == 0 and d.device == "cuda:0"
    assert d.needed_mib == 9024 and "RTX 3090" in d.reason


def test_busy_gpu_waits_then_starts_when_memory_frees():
    nvml, probe = probe_of(FakeGpu("NVIDIA GeForce RTX 3090", total_mib=24576, reserved_mib=300))
    nvml.add_process(0, pid=4242, used_mib=20000)
    d = decide(probe, 8000)
    assert d.outcome == "wait" and d.slot is None
    # Says needed vs free and who holds the memory.
    assert "needs 9024 MiB" in d.reason and "4276 MiB free of 24576" in d.reason
    assert "pid 4242" in d.reason and "20000 MiB" in d.reason
    nvml.remove_process(0, 4242)
    d = decide(probe, 8000)
    assert d.outcome == "start" and d.slot == 0


def test_our_own_processes_are_not_listed_as_foreign_holders():
    nvml, probe = probe_of(FakeGpu(total_mib=24576))
    nvml.add_process(0, pid=os.getpid(), used_mib=20000)     # e.g. our warm model cache
    d = decide(probe, 8000)
    assert d.outcome == "wait" and f"pid {os.getpid()}" not in d.reason


def test_slot_running_an_agentd_job_is_not_used():
    _, probe = probe_of(FakeGpu(total_mib=81920), FakeGpu(total_mib=24576))
    d = decide(probe, 8000, busy={0})
    assert d.outcome == "start" and d.slot == 1
    d = decide(probe, 8000, busy={0, 1})
    assert d.outcome == "wait" and "running another agentd job" in d.reason


def test_never_fits_fails_at_once_with_a_batch_size_the_estimator_says_fits(tmp_path):
    model = write_sd15_configs(tmp_path / "sd15")
    args = image_args(batch_size=16, resolution=512)
    est = estimate_vram(model, **args)
    _, probe = probe_of(FakeGpu("NVIDIA GeForce RTX 3070", total_mib=8192))
    d = decide(probe, est.total_mib)
    assert d.outcome == "never_fits" and d.largest_total_mib == 8192
    assert "8192 MiB" in d.reason and str(est.total_mib + MARGIN) in d.reason

    assert "sharding" not in d.reason  # one device: nothing to say about data parallel
    two = gate_decision(est.total_mib, probe_of(FakeGpu(total_mib=8192), FakeGpu(total_mib=8192))[1].list_gpus(),
                        set(), MARGIN, None, set(OWN), world=2)
    assert two.outcome == "never_fits" and "more GPUs do not make it fit (sharding the base over GPUs is not " \
        "offered)" in two.reason  # devices: 2 replicates the base: the same advice (smaller batch ...) follows

    batch, accum = recommend_batch_size(est, d.largest_total_mib, MARGIN, 16, 1)
    assert 1 <= batch < 16 and batch * accum >= 16
    smaller = estimate_vram(model, **{**args, "batch_size": batch})
    assert smaller.total_mib + MARGIN <= 8192
    assert decide(probe, smaller.total_mib).outcome == "start"


def test_foreign_memory_threshold_blocks_a_slot():
    nvml, probe = probe_of(FakeGpu("NVIDIA A100-SXM4-80GB", total_mib=81920))
    nvml.add_process(0, pid=777, used_mib=25000)
    assert decide(probe, 8000).outcome == "start"                       # plenty free, no threshold
    d = decide(probe, 8000, max_foreign=20000)
    assert d.outcome == "wait"
    assert "max_foreign_vram_mib 20000" in d.reason and "pid 777" in d.reason
    nvml.add_process(0, pid=os.getpid(), used_mib=30000)                 # ours: does not count
    nvml.remove_process(0, 777)
    assert decide(probe, 8000, max_foreign=20000).outcome == "start"


def test_best_fit_among_gpus_with_different_free_memory():
    nvml, probe = probe_of(FakeGpu("NVIDIA A100-SXM4-80GB", total_mib=81920),
                           FakeGpu("NVIDIA GeForce RTX 4090", total_mib=24576),
                           FakeGpu("NVIDIA RTX A6000", total_mib=49152))
    d = decide(probe, 12000)
    assert d.outcome == "start" and d.slot == 1          # the smallest that fits keeps the big ones free
    d = decide(probe, 30000)
    assert d.outcome == "start" and d.slot == 2
    nvml.add_process(2, pid=555, used_mib=30000)         # the A6000 fills up: the A100 is next best
    d = decide(probe, 30000)
    assert d.outcome == "start" and d.slot == 0


def test_unhealthy_slot_is_skipped_and_the_other_keeps_working():
    nvml, probe = probe_of(FakeGpu(total_mib=24576), FakeGpu(total_mib=24576))
    nvml.lose_device(1)
    d = decide(probe, 8000)
    assert d.outcome == "start" and d.slot == 0
    assert any("GPU is lost" in line for line in d.per_gpu)
    d = decide(probe, 8000, busy={0})
    assert d.outcome == "wait"
    nvml.lose_device(0)
    d = decide(probe, 8000)
    assert d.outcome == "unavailable" and "GPU is lost" in d.reason


def test_driver_gone_is_unavailable_not_cpu_only():
    nvml, probe = probe_of(FakeGpu(total_mib=24576))
    probe.list_gpus()
    nvml.unload_driver()
    d = decide(probe, 8000)
    assert d.outcome == "unavailable" and "Driver Not Loaded" in d.reason


def test_cpu_only_box_has_one_slot_that_always_starts():
    d = gate_decision(10 ** 9, [], set(), MARGIN, 20000, OWN)
    assert d.outcome == "start" and d.slot == CPU_SLOT and d.device == "cpu"
    d = gate_decision(100, [], {CPU_SLOT}, MARGIN, None, OWN)
    assert d.outcome == "wait" and "CPU slot" in d.reason


def test_unknown_free_memory_is_used_only_when_nothing_known_fits():
    nvml, probe = probe_of(FakeGpu(total_mib=24576), FakeGpu(total_mib=81920))
    nvml.fail_metric(1, "nvmlDeviceGetMemoryInfo")
    assert decide(probe, 8000).slot == 0
    d = decide(probe, 30000)
    assert d.outcome == "start" and d.slot == 1 and "without the memory check" in d.reason


def _facts(index, free, total=24576, healthy=True, procs=()):
    from trainer.gpus import GpuProcess
    return GpuFacts(index=index, uuid=None, name=None, memory_total_mib=total,
                    memory_used_mib=None if free is None else total - free, memory_free_mib=free,
                    utilization_pct=None, temperature_c=None, cuda_version=None,
                    processes=[GpuProcess(pid, None, mib) for pid, mib in procs], healthy=healthy,
                    error=None if healthy else f"GPU {index}: GPU is lost")


@pytest.mark.parametrize("gpus, max_foreign, draining, expect", [
    ([], 20000, False, None),
    ([], None, True, "draining"),
    ([_facts(0, 20000)], 20000, False, None),
    ([_facts(0, None, healthy=False)], None, False, "no healthy GPU"),
    ([_facts(0, 1000, procs=[(9, 23000)])], 20000, False, "max_foreign_vram_mib"),
    ([_facts(0, 1000, procs=[(9, 23000)]), _facts(1, 24000)], 20000, False, None),
    ([_facts(0, 1000, procs=[(os.getpid(), 23000)])], 20000, False, None),
])
def test_node_blocked_reason(gpus, max_foreign, draining, expect):
    reason = node_blocked_reason(gpus, max_foreign, draining, OWN)
    if expect is None:
        assert reason is None
    else:
        assert expect in reason


def test_a_job_only_a_lost_gpu_could_hold_waits_instead_of_failing():
    nvml, probe = probe_of(FakeGpu(total_mib=81920), FakeGpu(total_mib=24576))
    probe.list_gpus()
    nvml.lose_device(0)
    d = decide(probe, 40000)
    assert d.outcome == "wait" and "too small" in d.reason and "GPU is lost" in d.reason
    assert decide(probe, 100000).outcome == "never_fits"


# W slots at once (a config's `devices: W`): every one passes the gate, or the job takes none.
# (free MiB per GPU, None = NVML gives no figure; busy; allowed; world) -> (outcome, slots)
RESERVE = [
    ("two free GPUs, W=2", [20000, 20000], set(), None, 2, "start", (0, 1)),
    ("best fit: the two tightest that fit", [20000, 10000, 12000], set(), None, 2, "start", (1, 2)),
    ("one busy: no partial grab", [20000, 20000], {1}, None, 2, "wait", ()),
    ("one too full: no partial grab", [20000, 5000], set(), None, 2, "wait", ()),
    ("no figure counts only after the known fits", [20000, None, 20000], set(), None, 2, "start", (0, 2)),
    ("no figure completes a reservation", [20000, None, 5000], set(), None, 2, "start", (0, 1)),
    ("more than the box has never fits", [20000, 20000], set(), None, 3, "never_fits", ()),
    ("a devices: list narrows the choice", [20000, 20000, 20000], set(), {1, 2}, 2, "start", (1, 2)),
    ("a listed GPU busy: waits", [20000, 20000, 20000], {2}, {1, 2}, 2, "wait", ()),
    ("W=1 unchanged", [20000, 10000], set(), None, 1, "start", (1,)),
]


@pytest.mark.parametrize("why,free,busy,allowed,world,outcome,slots", RESERVE, ids=[r[0] for r in RESERVE])
def test_several_slots_are_reserved_together_or_not_at_all(why, free, busy, allowed, world, outcome, slots):
    nvml, probe = probe_of(*(FakeGpu(total_mib=24576) for _ in free))
    for i, mib in enumerate(free):
        if mib is None:
            nvml.fail_metric(i, "nvmlDeviceGetMemoryInfo")
        else:
            nvml.add_process(i, pid=4000 + i, used_mib=24576 - mib)
    d = gate_decision(8000, probe.list_gpus(), busy, MARGIN, None, set(OWN) | {4000 + i for i in range(len(free))},
                      allowed=allowed, world=world)
    assert (d.outcome, d.slots) == (outcome, slots), d.reason
    if outcome == "wait" and world > 1:
        assert f"waiting for {world} GPUs at once" in d.reason and "each" in d.reason


# CPU slots (-1, -2, ...; settings cpu_slots): (cpu slots, busy, world) -> (outcome, slots)
CPU_RESERVE = [
    ((-1, -2), set(), 2, "start", (-1, -2)),
    ((-1, -2), {-1}, 2, "wait", ()),
    ((-1, -2), {-1}, 1, "start", (-2,)),
    ((-1, -2), set(), 3, "never_fits", ()),
    ((-1,), {-1}, 1, "wait", ()),
]


@pytest.mark.parametrize("cpu,busy,world,outcome,slots", CPU_RESERVE)
def test_cpu_slots_are_reserved_together_or_not_at_all(cpu, busy, world, outcome, slots):
    d = gate_decision(100, [], busy, MARGIN, None, OWN, world=world, cpu_indices=cpu)
    assert (d.outcome, d.slots) == (outcome, slots), d.reason
    assert outcome != "start" or d.device == "cpu"
    assert outcome != "never_fits" or "cpu_slots" in d.reason
