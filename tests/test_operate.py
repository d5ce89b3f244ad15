"""Operating a shared box, inside the real scheduler (real journal, dispatcher, runner threads, trainer):
priorities and max_wait_s, pause/resume (bit-identical), infrastructure retries, device pick, the
polite warm cache. GPUs are tests/fake_nvml.py behind the real NvmlProbe; their slots train on the CPU.
The pure decisions (run order, failure classes, device match) are tested directly too."""
from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pytest
import torch

from agentd.failures import classify_failure
from agentd.queue_order import Waiting, run_order
from agentd.scheduler import SubmitRefused
from tests.conftest import write_config
from tests.fake_nvml import FakeGpu, FakeNvml
from tests.test_scheduler_gate import events, gpu_slots, make_scheduler, wait_state
from trainer.gpus import NoSuchDevice, NvmlProbe, match_device


def submit(s, tmp_path, assets, name: str, priority=None, **fields) -> str:
    folder = tmp_path / name
    folder.mkdir()
    cfg = write_config(folder, assets, **{"max_train_steps": 2, "save_steps": 2, **fields})
    job_id, _ = s.submit(config_path=str(cfg), config_text=cfg.read_text(), env={}, submitter={"uid": 0},
                         priority=priority)
    return job_id


def started_order(s, ids) -> list[str]:
    rows = [s.journal.get(i) for i in ids]
    return [r["id"] for r in sorted(rows, key=lambda r: r["started"])]


def finished_event(s, job_id: str, timeout: float = 30) -> dict:
    """The job's finished event (journaled just after its final state: poll for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = events(s, job_id, "finished")
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"{job_id}: no finished event")


def hold(s, tmp_path, assets) -> str:
    """A long job on the (single) slot, so that what is submitted next waits in the queue."""
    blocker = submit(s, tmp_path, assets, "blocker", max_train_steps=5000, save_steps=10000)
    wait_state(s, blocker, ("running",))
    return blocker


def two_gpus() -> FakeNvml:
    return FakeNvml([FakeGpu("NVIDIA GeForce RTX 4090", total_mib=24564),
                     FakeGpu("NVIDIA A100-SXM4-80GB", total_mib=81920)])


# --- pure decisions ------------------------------------------------------------------------------
def test_run_order_priority_fifo_requeued_first_and_starvation_bound():
    jobs = [Waiting("a", 0, 10), Waiting("b", 5, 9), Waiting("c", 0, 8), Waiting("d", 5, 7)]
    assert run_order(jobs, max_wait_s=100) == ["b", "d", "a", "c"]  # higher first, FIFO within
    assert run_order(jobs, max_wait_s=9.5) == ["a", "b", "d", "c"]  # a waited past max_wait_s: it goes next
    assert run_order([*jobs, Waiting("r", -3, 0, first=True)], 100)[0] == "r"  # re-queued after a fault


@pytest.mark.parametrize("text, healthy, kind", [
    ("RuntimeError: CUDA error: an illegal memory access was encountered", None, "infra"),
    ("RuntimeError: CUDA error: unspecified launch failure", True, "infra"),
    ("RuntimeError: CUDA error: uncorrectable ECC error encountered", None, "infra"),
    ("RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasSgemm", None, "infra"),
    ("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", None, "oom"),
    ("RuntimeError: CUDA error: device-side assert triggered", None, "job"),
    ("FileNotFoundError: data/0001.png", None, "job"),
    ("RuntimeError: something odd", False, "infra"),  # NVML says the GPU is gone
    # A data-parallel job lost a rank (trainer.training.distributed.RankDied) or, for the others, a peer:
    ("RankDied: a data-parallel rank died: process 1 terminated with signal SIGKILL; the job resumes from its "
     "last checkpoint", None, "lost"),
    ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
     "[127.0.0.1]:29400", None, "lost"),
    ("DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network "
     "error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error", None, "lost"),
    ("RankDied: a data-parallel rank died: process 0 terminated with signal SIGKILL", False, "infra"),  # GPU gone
])
def test_failure_classes(text, healthy, kind):
    assert classify_failure(text, healthy) == kind


def test_device_match_index_uuid_pattern_and_the_list_when_none_match():
    probe = NvmlProbe(two_gpus())
    gpus = probe.list_gpus()
    assert match_device(1, gpus) == {1} and match_device("0", gpus) == {0}
    assert match_device(gpus[1].uuid, gpus) == {1} and match_device(gpus[1].uuid[:12], gpus) == {1}
    assert match_device("*4090*", gpus) == {0} and match_device("nvidia*", gpus) == {0, 1}
    with pytest.raises(NoSuchDevice) as e:
        match_device("*H100*", gpus)
    assert "0: NVIDIA GeForce RTX 4090" in str(e.value) and "1: NVIDIA A100-SXM4-80GB" in str(e.value)


# --- priorities ----------------------------------------------------------------------------------
def test_high_priority_submitted_behind_three_queued_runs_next(tmp_path, assets):
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(1))
    try:
        blocker = hold(s, tmp_path, assets)
        low = [submit(s, tmp_path, assets, f"low{i}") for i in range(3)]
        high = submit(s, tmp_path, assets, "high", priority=5)
        assert [q.id for q in s.snapshot()["queue"]] == [high, *low]
        s.cancel(blocker)
        for j in [high, *low]:
            assert wait_state(s, j, ("succeeded", "failed"))["state"] == "succeeded"
        assert started_order(s, [high, *low]) == [high, *low]
        assert events(s, high, "queued")[0]["priority"] == 5
    finally:
        s.shutdown(30)


def test_max_wait_s_keeps_a_low_priority_job_from_starving(tmp_path, assets):
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(1), max_wait_s=1.0)
    try:
        blocker = hold(s, tmp_path, assets)
        low = submit(s, tmp_path, assets, "low")
        time.sleep(1.3)  # low has now waited longer than max_wait_s
        highs = [submit(s, tmp_path, assets, f"high{i}", priority=10) for i in range(2)]
        assert s.snapshot()["queue"][0].id == low
        s.cancel(blocker)
        for j in [low, *highs]:
            wait_state(s, j, ("succeeded",))
        assert started_order(s, [low, *highs])[0] == low
    finally:
        s.shutdown(30)


def test_priority_that_is_not_an_integer_is_refused(tmp_path, assets):
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(1))
    try:
        folder = tmp_path / "bad"
        folder.mkdir()
        cfg = write_config(folder, assets, priority="high")
        with pytest.raises(SubmitRefused) as e:
            s.submit(config_path=str(cfg), config_text=cfg.read_text(), env={}, submitter={"uid": 0})
        assert e.value.code == "invalid_config" and "priority" in e.value.message and "train.yaml" in e.value.message
        with pytest.raises(SubmitRefused) as e:
            submit(s, tmp_path, assets, "bad2", priority="7")
        assert e.value.code == "bad_request" and "integer" in e.value.message
    finally:
        s.shutdown(30)


# --- pause / resume ------------------------------------------------------------------------------
def lora(out_dir) -> dict:
    from safetensors.torch import load_file

    (path,) = [p for p in out_dir.glob("*.safetensors")]
    return load_file(path)


def test_pause_frees_the_slot_and_resume_continues_bit_identically(tmp_path, assets):
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(1))
    steps = dict(max_train_steps=10, save_steps=100, log_every=1)
    try:
        straight = submit(s, tmp_path, assets, "straight", **steps)
        wait_state(s, straight, ("succeeded",))

        job = submit(s, tmp_path, assets, "paused", **steps)
        deadline = time.monotonic() + 120
        while not [e for e in events(s, job, "step") if e["step"] >= 2] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.pause(job) == "pausing"
        rec = wait_state(s, job, ("paused",))
        assert 2 <= rec["step"] < 10
        assert not s.snapshot()["running"] and s.snapshot()["paused"][0].id == job
        # The slot is free: another job runs while this one is parked.
        other = submit(s, tmp_path, assets, "urgent")
        wait_state(s, other, ("succeeded",))
        with pytest.raises(SubmitRefused) as e:
            s.pause(other)
        assert e.value.code == "bad_state" and "only a running job" in e.value.message
        assert s.resume(job) == "queued"
        wait_state(s, job, ("succeeded",))
        with pytest.raises(SubmitRefused) as e:
            s.resume(job)
        assert e.value.code == "bad_state" and "only a paused job" in e.value.message
        states = [t["state"] for t in s.journal.transitions(job)]
        assert states[-4:] == ["paused", "queued", "running", "succeeded"]
        a, b = lora(tmp_path / "straight/out"), lora(tmp_path / "paused/out")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        run = json.loads((tmp_path / "paused/out/run.json").read_text())
        assert run["resumes"][-1]["why"].startswith("resumed after a pause")
    finally:
        s.shutdown(30)


# --- infrastructure failures ---------------------------------------------------------------------
def test_injected_gpu_fault_marks_the_slot_unhealthy_and_requeues_on_a_healthy_one(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("AGENTD_INJECT_INFRA_FAULT", "4")  # first attempt fails at step 4
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(2), max_infra_retries=2)
    try:
        job = submit(s, tmp_path, assets, "retry", max_train_steps=6, save_steps=2, log_every=1)
        rec = wait_state(s, job, ("succeeded", "failed"))
        assert rec["state"] == "succeeded" and rec["infra_retries"] == 1, rec["error"]
        (retry,) = events(s, job, "infra_retry")
        assert retry["from_step"] == 2 and "illegal memory access" in retry["error"]
        bad = retry["slot"]
        assert rec["slot"] != bad  # ran again on the other GPU
        gpus = {g.index: g for g in s.gpu_view(s.probe.list_gpus())}
        unhealthy = [i for i, g in gpus.items() if not g.healthy]
        assert len(unhealthy) == 1 and "illegal memory access" in gpus[unhealthy[0]].error
        run = json.loads((tmp_path / "retry/out/run.json").read_text())
        assert len(run["infra_retries"]) == 1 and run["resumes"][-1]["from_step"] == 2
        assert "infrastructure retry 1" in run["resumes"][-1]["why"]
        # The next job avoids the unhealthy GPU; a device: pinned to it fails as an infrastructure failure.
        pinned = submit(s, tmp_path, assets, "pinned", device=unhealthy[0])
        rec = wait_state(s, pinned, ("succeeded", "failed"))
        assert rec["state"] == "failed" and "no healthy requested GPU" in rec["error"]
        assert finished_event(s, pinned)["infra"] is True
    finally:
        s.shutdown(30)


def test_retries_exhausted_fail_as_infrastructure(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("AGENTD_INJECT_INFRA_FAULT", "3:9")  # every attempt fails
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(2), max_infra_retries=1)
    try:
        job = submit(s, tmp_path, assets, "doomed", max_train_steps=6, save_steps=2, log_every=1)
        rec = wait_state(s, job, ("succeeded", "failed"))
        assert rec["state"] == "failed" and "1 infrastructure retries exhausted" in rec["error"]
        assert finished_event(s, job)["infra"] is True
    finally:
        s.shutdown(30)


def test_a_job_error_is_not_retried(tmp_path, assets):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(assets["shapes"], data)
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(1))
    try:
        blocker = hold(s, tmp_path, assets)
        job = submit(s, tmp_path, assets, "broken", train_data_dir=str(data), metadata_path=str(data / "metadata.csv"))
        shutil.rmtree(data)  # the job's own problem, found when it runs
        s.cancel(blocker)
        rec = wait_state(s, job, ("succeeded", "failed"))
        assert rec["state"] == "failed" and rec["infra_retries"] == 0 and not events(s, job, "infra_retry")
        assert finished_event(s, job)["infra"] is False
        assert all(g.healthy for g in s.gpu_view(s.probe.list_gpus()))
    finally:
        s.shutdown(30)


# --- device pick ---------------------------------------------------------------------------------
def test_device_pins_the_gpu_and_a_device_that_matches_none_is_refused(tmp_path, assets):
    s = make_scheduler(tmp_path, two_gpus(), gpu_slots(2))
    try:
        job = submit(s, tmp_path, assets, "pinned", device="*a100*")
        assert wait_state(s, job, ("succeeded",))["slot"] == "gpu1"
        uuid = s.probe.list_gpus()[0].uuid
        job = submit(s, tmp_path, assets, "by-uuid", device=uuid)
        assert wait_state(s, job, ("succeeded",))["slot"] == "gpu0"
        with pytest.raises(SubmitRefused) as e:
            submit(s, tmp_path, assets, "nowhere", device="*H100*")
        assert e.value.code == "invalid_config"
        assert "matches no GPU" in e.value.message and "NVIDIA GeForce RTX 4090" in e.value.message
    finally:
        s.shutdown(30)


# --- the polite warm cache -----------------------------------------------------------------------
def test_warm_cache_moves_to_host_after_the_ttl_and_back_at_the_next_job():
    from trainer.training.model_cache import BaseModelCache

    now = [0.0]
    cache = BaseModelCache(1, warm_vram_ttl_s=30, clock=lambda: now[0])
    loads = []

    def load():
        loads.append(1)
        return torch.nn.Linear(512, 512)  # 1 MiB

    base, how, _ = cache.get(("k",), load, "cuda:0" if torch.cuda.is_available() else "cpu")
    assert how == "cold"
    if not torch.cuda.is_available():
        return _host_only_bookkeeping(cache)
    base.to("cuda:0")
    cache.release(("k",))
    now[0] = 29.0
    assert cache.offload_expired() == [] and cache.info()["on_device"] == 1
    now[0] = 31.0
    assert cache.offload_expired() == [("k",)]
    assert all(p.device.type == "cpu" for p in base.parameters())  # off the job device after the TTL
    assert cache.info()["on_device"] == 0 and cache.info()["device_mib"] == 0
    again, how, moved = cache.get(("k",), load, "cuda:0")
    assert again is base and how == "host" and moved is not None and len(loads) == 1
    assert all(p.device.type == "cuda" for p in base.parameters())


def _host_only_bookkeeping(cache):
    """On a CPU-only box the job device is host memory: nothing ever needs to move."""
    cache.release(("k",))
    assert cache.offload_expired(force=True) == []
    info = cache.info()
    assert info["entries"] == 1 and info["on_device"] == 0 and info["host_mib"] > 0


def test_entry_in_use_is_never_moved_and_the_ttl_counts_from_the_job_end(tmp_path, assets):
    from trainer.training.model_cache import BaseModelCache, _Entry

    now = [100.0]
    cache = BaseModelCache(2, warm_vram_ttl_s=5, clock=lambda: now[0])
    # Bookkeeping of an entry on a GPU (its tensors stay on the CPU here: moving them is a no-op).
    cache._items[("gpu",)] = _Entry(torch.nn.Linear(4, 4), "cuda:0", 1.0, users=1)
    now[0] = 1000.0
    assert cache.offload_expired() == []  # still used by a job
    cache.release(("gpu",))
    assert cache.info()["device_expires_in_s"] == 5.0
    now[0] = 1004.0
    assert cache.offload_expired() == [] and cache.info()["device_expires_in_s"] == 1.0
    now[0] = 1005.5
    assert cache.offload_expired() == [("gpu",)]
    assert cache.device_of(("gpu",)) == "cpu" and cache.info()["on_device"] == 0


def test_the_gate_never_counts_agentds_own_vram_as_foreign():
    from agentd.gate import gate_decision, node_blocked_reason

    nvml = FakeNvml([FakeGpu("NVIDIA GeForce RTX 4090", total_mib=24564)])
    nvml.add_process(0, pid=os.getpid(), used_mib=9000)  # our warm base model
    facts = NvmlProbe(nvml).list_gpus()
    assert gate_decision(1000, facts, set(), 256, 2000, {os.getpid()}).outcome == "start"
    # A box whose NVML cannot list processes (containers, some drivers): what we know we hold is ours.
    blind = [replace(g, processes=None) for g in facts]
    assert gate_decision(1000, blind, set(), 256, 2000, {os.getpid()}).outcome == "wait"  # cautious without
    assert gate_decision(1000, blind, set(), 256, 2000, {os.getpid()}, own_mib={0: 9000}).outcome == "start"
    assert node_blocked_reason(blind, 2000, False, {os.getpid()}, {0: 9000}) is None
    assert "max_foreign_vram_mib" in node_blocked_reason(blind, 2000, False, {os.getpid()})


def test_validate_names_the_gpus_when_device_matches_none(tmp_path, assets):
    from trainer.checks.validate_report import device_problem

    folder = tmp_path / "v"
    folder.mkdir()
    cfg = write_config(folder, assets, device="*H100*")
    gpus = NvmlProbe(two_gpus()).list_gpus()
    problem = device_problem(str(cfg), gpus)
    assert "device" in problem and "0: NVIDIA GeForce RTX 4090" in problem and str(cfg) in problem
    assert device_problem(str(write_config(folder, assets, device="*4090*")), gpus) is None
    assert device_problem(str(cfg), []) is None  # no GPU here: the target box decides (the daemon checks)


def test_a_journal_from_an_older_agentd_gains_the_new_columns(tmp_path):
    import sqlite3

    from agentd.journal import Journal

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)  # the jobs table as agentd wrote it before priorities and retries
    db.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, state TEXT NOT NULL, "
               "config_path TEXT NOT NULL, config_text TEXT NOT NULL, config_hash TEXT, resolved TEXT, output_dir TEXT, "
               "name TEXT, submitter TEXT, env TEXT, created REAL NOT NULL, started REAL, ended REAL, "
               "requeue_first INTEGER NOT NULL DEFAULT 0, slot TEXT, step INTEGER, total_steps INTEGER, loss REAL, "
               "error TEXT, artifacts TEXT, estimate_mib REAL, peak_mib REAL, shape_key TEXT)")
    db.execute("INSERT INTO jobs (id, state, config_path, config_text, created) VALUES ('job-000001', 'queued', "
               "'/c.yaml', 'x', 1.0)")
    db.commit()
    db.close()
    j = Journal(path)
    try:
        assert j.get("job-000001")["priority"] == 0 and j.get("job-000001")["infra_retries"] == 0
        new = j.create(config_path="/d.yaml", config_text="y", config_hash="h", resolved={}, output_dir="/o",
                       name="n", submitter={}, env={}, priority=3)
        assert j.get(new)["priority"] == 3
    finally:
        j.close()


def test_a_base_in_use_by_another_job_is_not_shared():
    """Two jobs with the same base at once (two CPU slots, or two GPUs): the second gets a copy of its own, since
    the cached one carries the first job's LoRA layers and sits on its device; once free, it is shared again."""
    from trainer.training.model_cache import BaseModelCache

    cache = BaseModelCache(1, warm_vram_ttl_s=30)
    loaded = []

    def load():
        loaded.append(torch.nn.Linear(4, 4))
        return loaded[-1]

    first, how_first, _ = cache.get(("k",), load, "cpu")
    second, how_second, _ = cache.get(("k",), load, "cpu")
    assert (how_first, how_second) == ("cold", "cold") and first is not second and len(loaded) == 2
    cache.release(("k",))
    cache.release(("k",))
    third, how, _ = cache.get(("k",), load, "cpu")
    assert third is first and how == "device" and len(loaded) == 2


def test_an_infra_retry_says_whether_its_slot_was_marked_unhealthy():
    """A failed device is marked and avoided; a data-parallel job that lost a rank keeps its GPUs (failures "lost")."""
    from agentd.events import InfraRetry

    device = InfraRetry(attempt=1, max_retries=2, slot="cuda:0", error="CUDA error: unspecified launch failure",
                        from_step=4).line()
    assert device.endswith("; slot marked unhealthy; retry 1/2 from the checkpoint at step 4 on a healthy slot")
    lost = InfraRetry(attempt=1, max_retries=2, slot="cuda:0+cuda:1", error="RankDied: a data-parallel rank died",
                      from_step=5, slot_unhealthy=False).line()
    assert lost == ("infrastructure failure on cuda:0+cuda:1: RankDied: a data-parallel rank died; retry 1/2 from "
                    "the checkpoint at step 5")
