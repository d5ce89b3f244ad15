"""One job on several devices (issue 23): the device plan's decisions as a table, and W=2 CPU ranks over gloo
against one rank with the whole batch - the tiny SD with buckets (a bucket's short last batch leaves one rank
an empty share) and random flips, and the tiny causal LM (rows of different lengths: ranks weigh their shares
by predicted tokens); the daemon's W-slot scheduling, kill -9 and lost-rank resumes; one job over two daemons.
Each foreground W=2 run is one per family, shared through `built_once` (its ranks are forked from a forkserver,
which the suite's warm interpreter serves: tests/warm).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN
from tests.test_datasets import config as image_config
from tests.test_datasets import image
from tests.test_train_text import write_text_config
from trainer.checks.devices import DevicesError, Rendezvous, batch_sharers, plan_world, split_advice
from trainer.checks.preflight import preflight
from trainer.errors import ConfigError
from trainer.gpus import GpuFacts

pytestmark = pytest.mark.xdist_group("distributed")

# fp32 on the CPU: W=2 sums each rank's share and then the ranks' gradients, W=1 sums the whole batch at once.
# The same numbers in another order: the LoRA weights agree to float rounding after the steps below.
RTOL, ATOL = 1e-4, 1e-6


def gpu(index: int, uuid: str) -> GpuFacts:
    return GpuFacts(index, uuid, "NVIDIA H100 80GB HBM3", 81559, 0, 81559, 0, 30, "12.4", [])


BOX = [gpu(0, "GPU-aaaa1111"), gpu(1, "GPU-bbbb2222"), gpu(2, "GPU-cccc3333")]


@pytest.mark.parametrize("devices, batch, per_device, gpus, cpus, want", [
    (None, 4, None, BOX, 2, (("cuda:0",), 4, 4)),
    (2, 4, None, BOX, 2, (("cuda:0", "cuda:1"), 2, 4)),
    ("all", 6, None, BOX, 2, (("cuda:0", "cuda:1", "cuda:2"), 2, 6)),
    ([2, "GPU-aaaa"], 4, None, BOX, 2, (("cuda:2", "cuda:0"), 2, 4)),  # indices and UUID prefixes
    (2, 1, 3, BOX, 2, (("cuda:0", "cuda:1"), 3, 6)),  # batch_size_per_device: the batch grows
    (2, 4, None, [], 2, (("cpu", "cpu"), 2, 4)),  # no GPU: CPU ranks
    ("all", 4, None, [], 2, (("cpu", "cpu"), 2, 4)),
])
def test_plan_world(devices, batch, per_device, gpus, cpus, want):
    plan = plan_world(devices, batch, per_device, gpus, cpus)
    assert (plan.devices, plan.per_rank_batch, plan.micro_batch) == want
    assert plan.world_size == len(want[0])


@pytest.mark.parametrize("devices, batch, gpus, cpus, field, text", [
    (4, 4, BOX, 2, "devices", "asks for 4 GPUs, but this box has 3: 0: NVIDIA H100 80GB HBM3 (GPU-aaaa1111); "
                              "1: NVIDIA H100"),
    ([0, "GPU-aaaa1111"], 4, BOX, 2, "devices", "'GPU-aaaa1111' is a GPU already listed"),
    ([7], 4, BOX, 2, "devices", "device '7' matches no GPU on this box; GPUs here: 0:"),
    (3, 4, [], 2, "devices", "asks for 3 CPU ranks, but this box has 2 CPU slot(s) and no GPU"),
    ([0, 1], 4, [], 2, "devices", "lists GPUs, but this box has none (CPU only)"),
    (3, 4, BOX, 2, "batch_size", "4 does not split over 3 devices (each rank trains batch_size / 3): use "
                                 "batch_size 3 or 6, or batch_size_per_device: N for N per device"),
])
def test_plan_world_refusals(devices, batch, gpus, cpus, field, text):
    with pytest.raises(DevicesError) as e:
        plan_world(devices, batch, None, gpus, cpus)
    assert any(p.field == field and text in p.message for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("devices, per_device, want", [
    (None, None, 1), (2, None, 2), ([0, 1, 2], None, 3), ("all", None, 1), (2, 3, 1)])
def test_batch_sharers(devices, per_device, want):
    """How many devices split batch_size, for the VRAM estimate of one device ("all": unknown here, errs high)."""
    assert batch_sharers(devices, per_device) == want


def test_a_devices_job_is_estimated_for_one_device_and_advised_in_config_terms(tmp_path, assets):
    """Each GPU of a devices: 2 job holds the base and half the batch: its estimate (the VRAM gate's figure) is
    that, not the whole batch on every GPU; the advice for a too-small card is the config's batch_size."""
    from trainer.checks.validate_report import plan
    from trainer.checks.vram import estimate_for_config

    from tests.test_vram import write_sd15_configs

    sd15 = write_sd15_configs(tmp_path / "sd15")  # the real SD1.5 sizes, no weights: the estimate reads configs

    def checked(name: str, **fields):
        (tmp_path / name).mkdir()
        return preflight(image_config(tmp_path / name, assets, train_data_dir=str(assets["shapes"]),
                                      base_model=str(sd15), resolution=256, batch_size=4, **fields))

    one, two = checked("one"), checked("two", devices=2)
    whole, half = estimate_for_config(one.config), estimate_for_config(two.config)
    assert (whole.batch_size, half.batch_size) == (4, 2)
    assert abs(half.total_mib - whole.total_at(2)) <= 1 and half.total_mib < whole.total_mib - half.per_sample_mib
    card = half.total_at(1) + 1024 + 1  # one sample per device fits (margin 1024), two do not
    (target,) = plan(two, gpus=None, vram_mib=card, margin_mib=1024)["targets"]
    assert not target["fits_as_configured"]
    # 1 per device x 2 devices: batch_size 2, and twice the accumulation keeps the batch per optimizer step (4)
    assert (target["recommended_batch_size"], target["gradient_accumulation_steps"]) == (2, 2)


def test_plan_world_over_several_boxes():
    """Each box contributes its devices; the batch splits over every box's ranks (2 boxes x 1 = 1 box x 2)."""
    plan = plan_world(1, 2, None, [], 1, Rendezvous.parse(2, 1, "box1:29500"))
    assert (plan.devices, plan.per_rank_batch, plan.micro_batch) == (("cpu",), 1, 2)
    assert (plan.local_size, plan.world_size, plan.first_rank) == (1, 2, 1)
    plan = plan_world(2, 8, None, BOX, 2, Rendezvous.parse(2, 1, "box1:29500"))
    assert (plan.devices, plan.per_rank_batch, plan.first_rank, plan.world_size) == (("cuda:0", "cuda:1"), 2, 2, 4)
    assert plan.rendezvous.part(plan.local_size) == "node 2 of 2, ranks 2-3 of 4"
    with pytest.raises(DevicesError) as e:
        plan_world(2, 6, None, BOX, 2, Rendezvous.parse(2, 0, "box1:29500"))
    assert "6 does not split over 4 devices" in e.value.problems[0].message


@pytest.mark.parametrize("nodes, node_rank, endpoint, want", [
    (2, 0, "10.0.0.1:29500", ("10.0.0.1", 29500, "10.0.0.1:29500")),
    (3, 2, "box-1.lan:1234", ("box-1.lan", 1234, "box-1.lan:1234")),
    (2, 1, "[fd00::1]:29500", ("fd00::1", 29500, "[fd00::1]:29500")),
    (1, 0, "box1:29500", "--nodes must be 2 or more"),
    (2, 2, "box1:29500", "--node-rank must be 0 to 1"),
    (2, -1, "box1:29500", "--node-rank must be 0 to 1"),
    (2, 0, "box1", "--rdzv-endpoint must be HOST:PORT"),
    (2, 0, "box1:0", "--rdzv-endpoint must be HOST:PORT"),
    (2, 0, "box1:http", "--rdzv-endpoint must be HOST:PORT"),
    (2, 0, ":29500", "--rdzv-endpoint must be HOST:PORT"),
])
def test_rendezvous_request_is_checked(nodes, node_rank, endpoint, want):
    if isinstance(want, str):
        with pytest.raises(ValueError, match=want):
            Rendezvous.parse(nodes, node_rank, endpoint)
        return
    r = Rendezvous.parse(nodes, node_rank, endpoint)
    assert (r.host, r.port, r.endpoint) == want
    assert r.request() == {"nodes": nodes, "node_rank": node_rank, "rdzv_endpoint": endpoint}


def test_a_box_with_other_data_or_config_is_refused_by_name():
    from trainer.training.job import other_box_refusal

    assert other_box_refusal([[0, "a", "c1", "d1"], [1, "b", "c1", "d1"]], "x.yaml") is None
    assert other_box_refusal(None, "x.yaml") is None  # not rank 0: it follows rank 0's decision
    (p,) = other_box_refusal([[0, "a", "c1", "d1"], [0, "a", "c1", "d1"], [1, "b", "c1", "d2"]], "x.yaml").problems
    assert p.field == "train_data_dir" and "d2 there, d1 on node 1" in p.message
    assert p.message.startswith("node 2 (b) has another dataset (data fingerprint) than node 1 (a)")
    (p,) = other_box_refusal([[0, "a", "c1", "d1"], [1, "b", "c2", "d1"]], "x.yaml").problems
    assert p.field == "config" and "training config" in p.message and "same config" in p.fix


def test_the_cause_of_a_failed_job_is_the_rank_that_failed_not_the_peers_that_lost_it():
    from trainer.training.distributed import _root_cause

    peer = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:34507")
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    assert _root_cause({0: ("error", peer), 1: ("error", oom)}, noticed=0) is oom  # torch noticed rank 0 first
    assert _root_cause({0: ("error", peer)}, noticed=0) is peer  # the cause never came back: what there is
    assert _root_cause({}, noticed=1) is None


def test_split_advice_nearest_values():
    assert "use batch_size 2 or 4" in split_advice(3, 2)
    assert "use batch_size 8" in split_advice(1, 8)  # no 0


def test_config_refusals(tmp_path, assets):
    """The config's own checks (line numbers from the YAML): devices with device, a GPU listed twice,
    batch_size with batch_size_per_device."""
    path = image_config(tmp_path, assets, train_data_dir=str(assets["shapes"]), devices=[0, 0], device=1,
                        batch_size_per_device=2)
    with pytest.raises(ConfigError) as e:
        preflight(path)
    found = {p.field: p for p in e.value.problems}
    assert "cannot be combined with device" in found["devices"].message or \
        any("cannot be combined with device" in p.message for p in e.value.problems)
    assert any(p.field == "devices" and "lists 0 more than once" in p.message for p in e.value.problems)
    assert found["batch_size_per_device"].line is not None
    assert "cannot be combined with batch_size" in found["batch_size_per_device"].message


def test_pack_shares_a_base_through_one_buffer_per_dtype():
    """`pack` (trainer.training.shared_base) without processes: the rebuilt base equals the original, parameters
    stay parameters (frozen ones frozen), a tensor held twice is one object again, every tensor is a view into its
    dtype's one shared buffer, strides survive (channels-last) and so does each address modulo 64 (CPU kernels' sums
    depend on it), and packing a packed base copies nothing."""
    from types import SimpleNamespace

    from trainer.training.shared_base import pack

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    head = torch.nn.Linear(4, 5)
    tied = torch.nn.Linear(4, 5, bias=False)
    tied.weight = head.weight  # tied weights (an LM's embedding and output layer)
    head.requires_grad_(False)
    body = torch.nn.Sequential(conv, head, tied, torch.nn.BatchNorm1d(4))  # buffers: fp32 stats, int64 count
    base = SimpleNamespace(body=body, table=torch.arange(10, dtype=torch.float64).expand(3, 10), name="x")
    before = {k: v.clone() for k, v in body.state_dict().items()}
    conv_param = conv.weight
    addresses = [t.data_ptr() % 64 for t in [*body.parameters(), *body.buffers()]]

    shared = pack(base)
    assert sorted(shared.buffers) == ["torch.float32", "torch.float64", "torch.int64"]
    assert all(b.is_shared() for b in shared.buffers.values())
    assert conv.weight is conv_param and conv.weight.is_shared()  # the original re-pointed, the same object
    again = pack(base)
    assert {k: b.data_ptr() for k, b in again.buffers.items()} == {k: b.data_ptr() for k, b in shared.buffers.items()}

    rebuilt = shared.unpack()
    state = rebuilt.body.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert torch.equal(rebuilt.table, torch.arange(10, dtype=torch.float64).expand(3, 10)) and rebuilt.name == "x"
    new_conv, new_head, new_tied, _ = rebuilt.body
    assert [t.data_ptr() % 64 for t in [*rebuilt.body.parameters(), *rebuilt.body.buffers()]] == addresses
    assert isinstance(new_conv.weight, torch.nn.Parameter) and new_conv.weight.requires_grad
    assert isinstance(new_head.weight, torch.nn.Parameter) and not new_head.weight.requires_grad
    assert new_tied.weight is new_head.weight
    assert new_conv.weight.is_contiguous(memory_format=torch.channels_last)
    for t in [*rebuilt.body.parameters(), *rebuilt.body.buffers(), rebuilt.table]:
        assert t.untyped_storage().data_ptr() == shared.buffers[str(t.dtype)].data_ptr()


# ------------------------------------------------------------------------------------------------
# W=2 against W=1


@pytest.fixture(scope="module")
def mixed(built_once) -> Path:
    """Seven images of three aspect ratios: three buckets, two of them with an odd count."""
    def build(folder: Path) -> None:
        for i, size in enumerate([(32, 32), (48, 24), (24, 48), (32, 32), (48, 24), (24, 48), (40, 32)]):
            image(folder / f"{i}.png", size, caption="a red circle")
    return built_once("ddp-mixed-aspect", build)


def bucket_config(folder: Path, assets, data: Path, **fields) -> Path:
    return image_config(folder, assets, train_data_dir=str(data), enable_bucket=True, min_bucket_reso=16,
                        max_bucket_reso=64, bucket_reso_steps=8, batch_size=2, max_train_steps=None, epochs=6,
                        random_flip=True, center_crop=False, save_steps=5, name="sd", **fields)


def lm_config(folder: Path, assets, **fields) -> Path:
    return write_text_config(folder, assets, max_train_steps=6, save_steps=3, batch_size=4, name="lm", **fields)


def two_ranks(built_once, name: str, make) -> Path:
    """`make(folder, devices=2)`'s run through `lora-train` (two gloo ranks), once per session."""
    def build(folder: Path) -> None:
        proc = subprocess.run([str(BIN / "lora-train"), "--config", str(make(folder, devices=2))],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        (folder / "console.txt").write_text(proc.stdout)
    return built_once(name, build)


def one_rank(folder: Path, make):
    from trainer.training.job import LoraTrainingJob

    result = LoraTrainingJob(preflight(make(folder))).run()
    assert result.outcome == "succeeded"
    return folder / "out"


def lora(out: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / f"{name}.safetensors")


def losses(out: Path) -> list[float]:
    from trainer.runs.outputs import read_loss_csv

    return [float(r["loss"]) for r in read_loss_csv(out / "logs/loss.csv")]


def load_file_of(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = out.glob("*.safetensors")
    return load_file(path)


def assert_same_training(one: Path, two: Path, name: str) -> None:
    a, b = lora(one, name), lora(two, name)
    assert a.keys() == b.keys()
    moved = [k for k in a if "lora_up" in k and a[k].abs().max() > 0]
    assert moved, "the LoRA did not train"
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=RTOL, atol=ATOL), (k, (a[k] - b[k]).abs().max())
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) and torch.allclose(torch.tensor(la), torch.tensor(lb), rtol=RTOL, atol=ATOL), (la, lb)


def test_sd_with_buckets_two_ranks_train_what_one_does(built_once, assets, mixed, tmp_path):
    two = two_ranks(built_once, "ddp-sd", lambda f, **kw: bucket_config(f, assets, mixed, **kw)) / "out"
    one = one_rank(tmp_path, lambda f: bucket_config(f, assets, mixed))
    assert_same_training(one, two, "sd")
    console = (two.parent / "console.txt").read_text()
    assert console.count("step ") >= len(losses(two))  # rank 0 alone reports: one line per step, not two
    assert "steps on cpu + 1 more data-parallel rank (" in console  # the started line says the job is on 2 ranks
    run = json.loads((two / "run.json").read_text())
    assert run["status"] == "succeeded" and run["config"]["devices"] == 2
    assert run["warm"] == {"ranks": [{"how": "cold", "move_s": None}] * 2}  # lora-train: no cache, each rank loads
    from trainer.runs.checkpoint import list_checkpoints, load_checkpoint, read_state

    newest = list_checkpoints(two / "checkpoints")[0]
    assert read_state(newest)["world_size"] == 2
    rng = load_checkpoint(newest)["rng"]
    assert len(rng["ranks"]) == 2  # every rank's RNG state, in the one atomically renamed folder


def test_causal_lm_two_ranks_train_what_one_does(built_once, assets, tmp_path):
    two = two_ranks(built_once, "ddp-lm", lambda f, **kw: lm_config(f, assets, **kw)) / "out"
    one = one_rank(tmp_path, lambda f: lm_config(f, assets))
    assert_same_training(one, two, "lm")


def test_resume_with_another_world_size_is_refused_unless_allowed(built_once, assets, mixed, tmp_path):
    from trainer.runs.checkpoint import list_checkpoints
    from trainer.training.job import LoraTrainingJob

    two = two_ranks(built_once, "ddp-sd", lambda f, **kw: bucket_config(f, assets, mixed, **kw)) / "out"
    checkpoint = shutil.copytree(list_checkpoints(two / "checkpoints")[-1], tmp_path / "step-5")  # steps remain
    folder = tmp_path / "w1"
    folder.mkdir()
    path = bucket_config(folder, assets, mixed, resume=str(checkpoint))
    with pytest.raises(ConfigError) as e:
        LoraTrainingJob(preflight(path)).run()
    (p,) = e.value.problems
    assert p.field == "resume" and "written by 2 data-parallel rank(s), this run has 1" in p.message
    assert "allow_world_size_change: true" in p.message
    assert not (folder / "out/checkpoints").exists()  # refused before anything was written

    path.write_text(path.read_text() + "allow_world_size_change: true\n")
    result = LoraTrainingJob(preflight(path)).run()
    assert result.outcome == "succeeded" and result.resumed_from is not None
    run = json.loads((folder / "out/run.json").read_text())
    assert run["world_size_change"] == {"from": 2, "to": 1, "checkpoint": str(checkpoint)}


def test_daemon_refuses_more_devices_than_its_slots_at_submit(tmp_path, assets):
    """The box's own device problems are refused at submit (exit 2's invalid_config), listed; nothing queued. So
    are a multi-box part's bad rendezvous fields (bad_request) and a batch that does not split over every box."""
    from agentd.scheduler import SubmitRefused
    from tests.conftest import write_config
    from tests.fake_nvml import FakeGpu, FakeNvml
    from tests.test_scheduler_gate import gpu_slots, make_scheduler, submit

    def part(name: str, rendezvous: dict, **fields):
        (tmp_path / name).mkdir()
        cfg = write_config(tmp_path / name, assets, max_train_steps=2, **fields)
        return s.submit(config_path=str(cfg), config_text=cfg.read_text(), env={}, submitter={"uid": 0},
                        rendezvous=rendezvous)

    nvml = FakeNvml([FakeGpu("NVIDIA GeForce RTX 3090", total_mib=24576), FakeGpu("NVIDIA GeForce RTX 3090",
                                                                                  total_mib=24576)])
    s = make_scheduler(tmp_path, nvml, gpu_slots(2))
    try:
        with pytest.raises(SubmitRefused) as e:
            submit(s, tmp_path, assets, "five", devices=5)
        assert e.value.code == "invalid_config"
        assert "asks for 5 GPUs, but this box has 2: 0: NVIDIA GeForce RTX 3090" in e.value.message
        for name, rendezvous, fields, code, text in [
            ("rank", {"nodes": 2, "node_rank": 2, "rdzv_endpoint": "box1:29500"}, {}, "bad_request",
             "--node-rank must be 0 to 1"),
            ("some", {"nodes": 2, "node_rank": 1}, {}, "bad_request", "missing: --rdzv-endpoint"),
            ("split", {"nodes": 2, "node_rank": 1, "rdzv_endpoint": "box1:29500"}, {"devices": 2, "batch_size": 6},
             "invalid_config", "6 does not split over 4 devices")]:
            with pytest.raises(SubmitRefused) as e:
                part(name, rendezvous, **fields)
            assert e.value.code == code and text in e.value.message, e.value.message
        assert s.journal.jobs() == []  # nothing queued
        # devices: all on this box's 2 GPUs: the gate checks each GPU for its share of the batch (2 of 4), which
        # the config alone cannot say (`all` is the box's count).
        from trainer.checks.vram import estimate_for_config

        job = submit(s, tmp_path, assets, "all", devices="all", batch_size=4)
        (row,) = s.journal.jobs()
        assert row["id"] == job
        half = estimate_for_config(preflight(tmp_path / "all" / "train.yaml").config, batch_size=2)
        assert row["estimate_mib"] == half.total_mib
    finally:
        s.shutdown(30)


def test_daemon_runs_a_two_slot_job_among_one_slot_jobs(built_once, assets, mixed, tmp_path):
    """A 2-GPU box (fake NVML, slots training on the CPU): a W=1 job, then the W=2 job, then a W=1 job.
    The W=2 job takes both slots at once when the first job ends (no partial grab, nothing passes it), the
    others follow in arrival order, all succeed (no deadlock), and its LoRA is the foreground W=2 run's, although
    the daemon was killed (-9) during it and restarted. Its ranks take the base from the daemon's warm cache
    through shared memory, and leave it as it was: the last W=1 job, warm on that base, trains the first one's
    LoRA bit for bit."""
    from tests.daemon_harness import DaemonProc

    foreground = two_ranks(built_once, "ddp-sd", lambda f, **kw: bucket_config(f, assets, mixed, **kw)) / "out"
    (tmp_path / "box").mkdir()
    d = DaemonProc(tmp_path / "box", "max_wait_s: 120\n", fake_gpus=[{}, {}]).start()
    try:
        def submit(name: str, make) -> str:
            folder = tmp_path / name
            folder.mkdir()
            path = make(folder)
            reply = d.request({"op": "submit", "config_path": str(path), "config_text": path.read_text(),
                               "detach": True})
            assert reply["ok"], reply
            return reply["job_id"]

        def small(folder: Path) -> Path:
            return image_config(folder, assets, train_data_dir=str(assets["shapes"]), max_train_steps=2, save_steps=2)

        # One W=1 job behind the W=2 one: two W=1 jobs at once on this box's two CPU-backed slots share the warm
        # base in one process, which the CPU does not support (see the report of issue 23).
        jobs = [submit("a", small), submit("w2", lambda f: bucket_config(f, assets, mixed, devices=2)),
                submit("c", small)]
        w2 = jobs[1]
        running = d.wait_for(lambda: [r for r in d.status()["running"] if r["id"] == w2], what="the W=2 job running")
        status = d.status()
        assert running[0]["slot"] == "cuda:0+cuda:1" and len(status["running"]) == 1  # one job across its slots
        assert [sl["job"] for sl in status["slots"]] == [w2, w2]
        # kill -9 of the daemon after the W=2 job's first checkpoint (its ranks die with it), then a restart:
        # the job resumes from that checkpoint and its LoRA is still bit-identical to the uninterrupted run's.
        d.wait_for(lambda: any((tmp_path / "w2/out/checkpoints").glob("step-*")), what="the W=2 job's checkpoint")
        # Both ranks got the base the first job left warm in the daemon (on a CPU-backed slot: "device").
        shared = {"ranks": [{"how": "shared", "move_s": None}] * 2}
        assert json.loads((tmp_path / "w2/out/run.json").read_text())["warm"] == {**shared, "cache": "device"}
        d.kill()
        d.start()
        # Then one rank of the resumed job is killed (-9) as it starts (the daemon's log names the ranks' pids): a
        # lost rank (agentd/failures.py): the job is re-queued first and resumes from its last checkpoint again,
        # and its slots stay healthy (nothing says a device failed).
        def rank_pids() -> list[list[int]]:
            return [[int(p) for p in line.split("pids ")[1].split()] for line in d.log.read_text().splitlines()
                    if "data-parallel ranks 0-1 of 2 started: pids" in line]
        second = d.wait_for(lambda: rank_pids()[1:], what="the resumed job's ranks")[0]
        os.kill(second[1], signal.SIGKILL)
        d.wait_for(lambda: {r["state"] for r in d.journal_rows("SELECT state FROM jobs")} == {"succeeded"},
                   timeout=180, what="every job succeeded")
        rows = d.journal_rows("SELECT job_id, state, time FROM transitions ORDER BY rowid")
        assert all(sl["healthy"] for sl in d.status()["slots"])
    finally:
        d.stop()
    assert [r["state"] for r in rows if r["job_id"] == w2].count("running") == 3  # killed twice, resumed twice
    started = {r["job_id"]: r["time"] for r in rows if r["state"] == "running"}
    ended = {r["job_id"]: r["time"] for r in rows if r["state"] == "succeeded"}
    queued = {r["job_id"]: r["time"] for r in reversed(rows) if r["state"] == "queued"}  # the first
    assert sorted(jobs, key=started.get) == jobs  # FIFO: nothing passed the W=2 job at the head
    assert started[w2] >= ended[jobs[0]] and started[jobs[2]] >= ended[w2]  # both slots, or none
    first_start = next(r["time"] for r in rows if r["job_id"] == w2 and r["state"] == "running")
    assert first_start - queued[w2] < 120  # within max_wait_s
    run = json.loads((tmp_path / "w2/out/run.json").read_text())
    resumes = run["resumes"]
    # The restarted daemon's cache was empty: its launcher loaded the base there once, and the run after the lost
    # rank, then job c, found it there.
    assert run["warm"] == {**shared, "cache": "device"}
    assert json.loads((tmp_path / "c/out/run.json").read_text())["warm"] == {"ranks": [{"how": "device",
                                                                                         "move_s": None}]}
    first, last = (load_file_of(tmp_path / name / "out") for name in ("a", "c"))
    assert first.keys() == last.keys() and all(torch.equal(first[k], last[k]) for k in first)
    # From a checkpoint (every 5 of its 24 steps; ranks forked from a warm forkserver run ~20 steps/s, so the kill
    # lands after the first one or soon after), not from the start; and no orphaned rank finished the run meanwhile.
    # (the run the rank kill ended as it started may have recorded no resume: the retry's resume says why it ran)
    assert resumes and all(r["from_step"] in (5, 10, 15, 20) for r in resumes), resumes
    assert "infrastructure retry 1 after a failure on cuda:0+cuda:1: RankDied" in resumes[-1]["why"]
    (retry,) = run["infra_retries"]
    assert "a data-parallel rank died: process 1 terminated with signal SIGKILL" in retry["error"], retry
    a, b = lora(foreground, "sd"), lora(tmp_path / "w2/out", "sd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_job_over_two_lora_train_processes(built_once, assets, mixed, tmp_path):
    """By hand, without daemons: `lora-train X.yaml --nodes 2 --node-rank K --rdzv-endpoint` on each "box" trains
    what the one-box W=2 run does. A part whose other box never comes exits 5 naming the endpoint; a flag alone
    is refused (exit 2) before anything runs."""
    from trainer.training.distributed import free_port

    foreground = two_ranks(built_once, "ddp-sd", lambda f, **kw: bucket_config(f, assets, mixed, **kw)) / "out"
    endpoint = f"127.0.0.1:{free_port()}"

    def part(k: int, endpoint: str, name: str, timeout: str = "120", *flags: str) -> subprocess.Popen:
        (tmp_path / name).mkdir()
        path = bucket_config(tmp_path / name, assets, mixed, devices=1)
        return subprocess.Popen([str(BIN / "lora-train"), str(path), "--plain", *(flags or (
            "--nodes", "2", "--node-rank", str(k), "--rdzv-endpoint", endpoint))], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "AGENTD_RDZV_TIMEOUT_S": timeout})

    alone = f"127.0.0.1:{free_port()}"
    procs = [part(0, endpoint, "n0"), part(1, endpoint, "n1"), part(0, alone, "alone", "2"),
             part(0, "", "flag", "2", "--nodes", "2")]
    (out0, err0), (out1, err1), (out_a, err_a), (_, err_f) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [0, 0, 5, 2], err0[-2000:] + err1[-2000:] + err_a[-2000:] + err_f
    a, b = lora(foreground, "sd"), lora(tmp_path / "n0/out", "sd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "rank 0 on the first box" in out1 and "the first box wrote the outputs" in out1 and "step " not in out1 and not (tmp_path / "n1/out/sd.safetensors").exists()
    assert f"rendezvous at {alone} failed" in err_a and "did not all join within 2 s" in err_a, err_a
    assert "needs --nodes, --node-rank and --rdzv-endpoint together" in err_f


def listening(port: int) -> bool:
    """Whether a TCP socket listens on `port` here (the kernel's tables: connecting would count as a rank joining;
    c10d's store listens on IPv6 where it can)."""
    rows = [r for t in ("tcp", "tcp6") for r in Path(f"/proc/net/{t}").read_text().splitlines()[1:]]
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows)  # 0A: LISTEN


def test_one_job_over_two_daemons_trains_what_one_daemon_does(built_once, assets, mixed, tmp_path):
    """Two `agentd serve` "boxes" on this machine, one CPU slot each, the same config (devices: 1) submitted to each
    with --nodes 2 and its --node-rank, meeting at 127.0.0.1: node 0's LoRA is bit-identical to the foreground W=2
    run's (which the daemon test above shows equals the one-daemon W=2 run), although box 1's rank was killed after
    node 0's first checkpoint (both parts re-queued, resumed from it by broadcast). Node 0's part waits at the rendezvous
    (as `agentd status` shows) until node 1's joins; node 1 says on its console that the first box's rank 0 reports,
    and writes nothing into its output_dir. Before that, box 1 runs a part whose other box never starts: it fails,
    exit 5, naming the endpoint (box 1 waits 2 s at a rendezvous: $AGENTD_RDZV_TIMEOUT_S)."""
    from tests.daemon_harness import DaemonProc, Tail
    from trainer.training.distributed import free_port

    foreground = two_ranks(built_once, "ddp-sd", lambda f, **kw: bucket_config(f, assets, mixed, **kw)) / "out"
    boxes = []
    for k, timeout in ((0, "120"), (1, "2")):
        (tmp_path / f"box{k}").mkdir()
        boxes.append(DaemonProc(tmp_path / f"box{k}", env={"AGENTD_RDZV_TIMEOUT_S": timeout}))
    endpoint = f"127.0.0.1:{free_port()}"

    def submit(k: int, box: DaemonProc, endpoint: str, name: str = "") -> Tail:
        folder = tmp_path / (name or f"n{k}")
        folder.mkdir()
        path = bucket_config(folder, assets, mixed, devices=1)
        return Tail(box.agentd("run", str(path), "--plain", "--nodes", "2", "--node-rank", str(k),
                               "--rdzv-endpoint", endpoint))

    try:
        for box in boxes:
            box.start()
        # Meanwhile box 1 runs a part whose other box never starts: it fails after its 2 s, exit 5.
        alone = f"127.0.0.1:{free_port()}"
        lonely = submit(0, boxes[1], alone, "alone")
        first = submit(0, boxes[0], endpoint)
        # Node 1's box waits only 2 s for the store: submitted once node 0's rank 0 serves it.
        boxes[0].wait_for(lambda: listening(int(endpoint.rsplit(":", 1)[1])), what="node 0 serving the rendezvous")
        status = boxes[0].run("status")
        assert "node 1 of 2, ranks 0-0 of 2" in status.stdout, status.stdout
        code, lines = lonely.finish()
        boxes[1].stop()  # box 1 gets the default patience back: its part must meet node 0's again after the kill
        boxes[1].env["AGENTD_RDZV_TIMEOUT_S"] = "120"
        boxes[1].start()
        second = submit(1, boxes[1], endpoint)
        # Box 1's rank is killed (-9) after node 0's first checkpoint: both parts lost a rank (box 0's sees the peer
        # gone), both are re-queued, meet again, and resume from node 0's checkpoint, which box 1 has no copy of
        # (rank 0 broadcasts it): the LoRA is still the uninterrupted run's.
        boxes[0].wait_for(lambda: any((tmp_path / "n0/out/checkpoints").glob("step-*")), what="node 0's checkpoint")
        pid = next(int(line.split("pids ")[1]) for line in boxes[1].log.read_text().splitlines()
                   if "data-parallel ranks 1-1 of 2 started: pids" in line)
        os.kill(pid, signal.SIGKILL)
        (code0, lines0), (code1, lines1) = first.finish(), second.finish()
        assert (code0, code1) == (0, 0), "\n".join(lines0[-20:] + lines1[-20:])
        rendezvous = boxes[1].journal_rows("SELECT rendezvous FROM jobs ORDER BY seq")[-1]["rendezvous"]
        assert json.loads(rendezvous) == {"nodes": 2, "node_rank": 1, "rdzv_endpoint": endpoint}
        assert not (tmp_path / "n1/out").exists() or not any((tmp_path / "n1/out").rglob("*"))
    finally:
        for box in boxes:
            box.stop()
    a, b = lora(foreground, "sd"), lora(tmp_path / "n0/out", "sd")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumes = json.loads((tmp_path / "n0/out/run.json").read_text())["resumes"]
    assert resumes and resumes[-1]["from_step"] in (5, 10, 15, 20), resumes
    assert any("a data-parallel rank died" in line and "retry 1/2 from the first box's last checkpoint" in line
               for line in lines1), lines1
    assert any("by peer" in line and "retry 1/2 from the checkpoint" in line  # gloo: reset or closed by peer
               for line in boxes[0].log.read_text().splitlines()), boxes[0].log.read_text()[-3000:]
    assert any("step " in line for line in lines0) and not any("step " in line for line in lines1)
    assert any("node 2 of 2, ranks 1-1 of 2 of one job over 2 boxes (rendezvous " + endpoint in line
               and "rank 0 on the first box" in line for line in lines1), lines1
    assert code == 5, lines
    text = "\n".join(lines)
    assert f"rendezvous at {alone} failed: the 2 ranks of 2 boxes did not all join within 2 s" in text, text
