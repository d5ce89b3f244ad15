"""The VRAM gate inside the real scheduler: a fake NVML (no GPU here) behind the real NvmlProbe.

The fake GPUs' slots train on the CPU device; everything else is the daemon's own code: the journal,
the scheduler's dispatcher and runner threads, the estimator reading the tiny model's configs.
"""
from __future__ import annotations

import time

import pytest

from agentd.journal import Journal
from agentd.scheduler import Scheduler, Slot
from tests.conftest import write_config
from tests.fake_nvml import FakeGpu, FakeNvml
from tests.waiting import wait_for
from trainer.checks.vram import calibrated, estimate_for_config, recommend_batch_size
from trainer.gpus import NvmlProbe


def make_scheduler(tmp_path, nvml, slots, **kw) -> Scheduler:
    from agentd.daemon import _estimator

    journal = Journal(tmp_path / "journal.sqlite3")
    s = Scheduler(journal, slots, probe=NvmlProbe(nvml), estimator=_estimator(journal), gate_poll_s=0.1,
                  vram_margin_mib=kw.pop("margin", 256), **kw)
    s.start()
    return s


def submit(s: Scheduler, tmp_path, assets, name: str, **fields) -> str:
    folder = tmp_path / name
    folder.mkdir()
    cfg = write_config(folder, assets, max_train_steps=2, save_steps=2, **fields)
    job_id, _ = s.submit(config_path=str(cfg), config_text=cfg.read_text(), env={}, submitter={"uid": 0})
    return job_id


def wait_state(s: Scheduler, job_id: str, states, timeout=120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = s.journal.get(job_id)
        if rec["state"] in states:
            return rec
        time.sleep(0.05)
    raise AssertionError(f"{job_id} stayed {s.journal.get(job_id)['state']}")


def events(s: Scheduler, job_id: str, kind: str) -> list[dict]:
    return [e for e in s.journal.events(job_id) if e["type"] == kind]


def gated_events(s: Scheduler, job_id: str) -> list[dict]:
    """The job's gated events, waited for: the scheduler journals the first one just after the gated state."""
    return wait_for(lambda: events(s, job_id, "gated"), what=f"{job_id}'s gated event")


def gpu_slots(n: int) -> list[Slot]:
    return [Slot(i, "cpu", label=f"gpu{i}") for i in range(n)]


@pytest.fixture
def nvml():
    return FakeNvml([FakeGpu("NVIDIA GeForce RTX 3090", total_mib=24576)])


def test_fits_starts(tmp_path, assets, nvml):
    s = make_scheduler(tmp_path, nvml, gpu_slots(1))
    try:
        job = submit(s, tmp_path, assets, "a")
        rec = wait_state(s, job, ("succeeded", "failed"))
        assert rec["state"] == "succeeded" and rec["slot"] == "gpu0"
        assert rec["estimate_mib"] > 0 and rec["shape_key"]
    finally:
        s.shutdown(30)


def test_busy_gpu_waits_then_starts_when_memory_frees(tmp_path, assets, nvml):
    nvml.add_process(0, pid=4242, used_mib=24000)  # someone else's training
    s = make_scheduler(tmp_path, nvml, gpu_slots(1))
    try:
        job = submit(s, tmp_path, assets, "a")
        wait_state(s, job, ("gated",))
        gated = gated_events(s, job)
        assert "pid 4242" in gated[0]["reason"] and "MiB free" in gated[0]["reason"]
        assert s.snapshot()["queue"][0].state == "gated"
        nvml.remove_process(0, 4242)
        assert wait_state(s, job, ("succeeded", "failed"))["state"] == "succeeded"
        assert s.snapshot()["counters"].gate_waits == 1
    finally:
        s.shutdown(30)


def test_never_fits_fails_at_once_with_a_batch_size_that_fits(tmp_path, assets):
    from trainer.config import load_config

    # Size a GPU so batch 16 at 128 px cannot fit but a smaller batch can (per the estimator).
    folder = tmp_path / "probe"
    folder.mkdir()
    cfg = load_config(write_config(folder, assets, resolution=128, batch_size=16, cache_latents=False))
    est = estimate_for_config(cfg)
    margin = 256
    total = est.total_at(4) + margin
    assert est.total_at(16) + margin > total, "the test needs batch 16 not to fit"
    nvml = FakeNvml([FakeGpu("Small GPU", total_mib=total, reserved_mib=0)])
    s = make_scheduler(tmp_path, nvml, gpu_slots(1), margin=margin)
    try:
        job = submit(s, tmp_path, assets, "big", resolution=128, batch_size=16, cache_latents=False)
        rec = wait_state(s, job, ("failed",), timeout=20)
        assert "more than the largest GPU" in rec["error"]
        assert "recommended: batch_size" in rec["error"]
        batch = int(rec["error"].split("recommended: batch_size ")[1].split()[0])
        accum = int(rec["error"].split("gradient_accumulation_steps ")[1].split()[0])
        assert est.total_at(batch) + margin <= total and batch < 16 and batch * accum >= 16
        assert recommend_batch_size(est, total, margin, 16)[0] == batch
        assert rec["started"] is None  # nothing loaded
    finally:
        s.shutdown(30)


def test_gate_timeout(tmp_path, assets, nvml):
    nvml.add_process(0, pid=4242, used_mib=24000)
    s = make_scheduler(tmp_path, nvml, gpu_slots(1), gate_timeout_s=0.5)
    try:
        job = submit(s, tmp_path, assets, "a")
        rec = wait_state(s, job, ("failed",), timeout=30)
        assert rec["error"].startswith("gate_timeout")
        # The next job still runs once the memory is back.
        nvml.remove_process(0, 4242)
        assert wait_state(s, submit(s, tmp_path, assets, "b"), ("succeeded", "failed"))["state"] == "succeeded"
    finally:
        s.shutdown(30)


def test_foreign_memory_threshold_blocks_a_gpu_with_room(tmp_path, assets, nvml):
    nvml.add_process(0, pid=777, used_mib=2000)  # plenty still free, but over the threshold
    s = make_scheduler(tmp_path, nvml, gpu_slots(1), max_foreign_vram_mib=1000)
    try:
        job = submit(s, tmp_path, assets, "a")
        wait_state(s, job, ("gated",))
        gated = gated_events(s, job)
        assert "max_foreign_vram_mib 1000" in gated[0]["reason"]
        nvml.remove_process(0, 777)
        assert wait_state(s, job, ("succeeded", "failed"))["state"] == "succeeded"
    finally:
        s.shutdown(30)


def test_two_gpus_best_fit_and_unhealthy_slot_skipped(tmp_path, assets):
    nvml = FakeNvml([FakeGpu("Roomy", total_mib=48000), FakeGpu("Snug", total_mib=24576)])
    s = make_scheduler(tmp_path, nvml, gpu_slots(2))
    try:
        rec = wait_state(s, submit(s, tmp_path, assets, "a"), ("succeeded", "failed"))
        assert rec["state"] == "succeeded" and rec["slot"] == "gpu1"  # the tighter fit
        nvml.lose_device(1)
        rec = wait_state(s, submit(s, tmp_path, assets, "b"), ("succeeded", "failed"))
        assert rec["state"] == "succeeded" and rec["slot"] == "gpu0"  # the other GPU keeps working
    finally:
        s.shutdown(30)


def test_calibration_uses_the_recorded_peak(tmp_path, assets, nvml):
    s = make_scheduler(tmp_path, nvml, gpu_slots(1))
    try:
        first = submit(s, tmp_path, assets, "a")
        rec = wait_state(s, first, ("succeeded",))
        s.journal.update(first, peak_mib=5000.0)  # what a CUDA run records (CPU slots measure none)
        second = submit(s, tmp_path, assets, "b")
        rec2 = s.journal.get(second)
        assert rec2["shape_key"] == rec["shape_key"]
        assert rec2["estimate_mib"] == 5000 + 700  # the measured peak + the fixed CUDA overhead
        wait_state(s, second, ("succeeded",))
    finally:
        s.shutdown(30)
