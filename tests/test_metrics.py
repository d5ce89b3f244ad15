"""The metrics endpoint: real HTTP on 127.0.0.1, series built from the daemon's status snapshot."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agentd.metrics import Metrics
from agentd.status_model import Status

GiB = 1024 ** 3

def gpu(index: int, used_mib: int) -> dict:
    return {"index": index, "name": "NVIDIA GeForce RTX 3090", "memory_used_mib": used_mib, "memory_total_mib": 24576}


SNAPSHOT = Status.from_dict({
    "queue": [{"id": "job-3"}, {"id": "job-4"}],
    "running": [{"id": "job-2", "name": "style-lora", "slot": "cuda:0", "step": 120, "total_steps": 500,
                 "loss": 0.0831}],
    "paused": [{"id": "job-1"}],
    "slots": [{"name": "cuda:0", "index": 0, "job": "job-2", "gpu": gpu(0, 18 * 1024), "agentd_vram_mib": 17000},
              {"name": "cuda:1", "index": 1, "healthy": False, "unhealthy_reason": "illegal memory access",
               "gpu": gpu(1, 0)}],
    "counters": {"jobs_finished": {"succeeded": 7, "failed": 2, "cancelled": 1}, "gate_waits": 4,
                 "infra_retries": 1},
    "model_cache": {"device_mib": 1024},
})


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.fixture
def metrics():
    m = Metrics()
    m.start("127.0.0.1", 0)
    yield m
    m.stop()


def test_series_reflect_the_snapshot(metrics):
    assert metrics.port and metrics.port > 0
    metrics.update(SNAPSHOT)
    got = scrape(metrics.port)
    job = (("gpu", "0"), ("job", "job-2"))
    gpu0 = (("gpu", "0"), ("name", "NVIDIA GeForce RTX 3090"))
    gpu1 = (("gpu", "1"), ("name", "NVIDIA GeForce RTX 3090"))
    expected = {
        ("agentd_queue_length", ()): 2,
        ("agentd_jobs_running", ()): 1,
        ("agentd_job_step", job): 120,
        ("agentd_job_total_steps", job): 500,
        ("agentd_job_loss", job): pytest.approx(0.0831),
        ("agentd_gpu_memory_used_bytes", gpu0): 18 * GiB,
        ("agentd_gpu_memory_total_bytes", gpu0): 24 * GiB,
        ("agentd_gpu_memory_used_bytes", gpu1): 0,
        ("agentd_gpu_memory_total_bytes", gpu1): 24 * GiB,
        ("agentd_jobs_finished_total", (("outcome", "succeeded"),)): 7,
        ("agentd_jobs_finished_total", (("outcome", "failed"),)): 2,
        ("agentd_jobs_finished_total", (("outcome", "cancelled"),)): 1,
        ("agentd_gate_waits_total", ()): 4,
        ("agentd_infra_retries_total", ()): 1,
        ("agentd_jobs_paused", ()): 1,
        ("agentd_gpu_agentd_memory_bytes", gpu0): 17000 * 2**20,
        ("agentd_slot_healthy", (("slot", "cuda:0"),)): 1,
        ("agentd_slot_healthy", (("slot", "cuda:1"),)): 0,
        ("agentd_model_cache_device_bytes", ()): GiB,
    }
    for key, value in expected.items():
        assert got.get(key) == value, key
    assert ("agentd_snapshot_timestamp_seconds", ()) in got
    assert all(name.startswith("agentd_") for name, _ in got)


def test_update_replaces_the_previous_snapshot(metrics):
    metrics.update(SNAPSHOT)
    later = Status.from_dict({**SNAPSHOT.to_dict(), "queue": [], "running": [], "slots": [SNAPSHOT.to_dict()["slots"][0]],
                              "counters": {"jobs_finished": {"succeeded": 8, "failed": 2, "cancelled": 1},
                                           "gate_waits": 4}})
    metrics.update(later)
    got = scrape(metrics.port)
    assert got[("agentd_queue_length", ())] == 0
    assert got[("agentd_jobs_running", ())] == 0
    assert not [k for k in got if k[0].startswith("agentd_job_")]  # the finished job's series are gone
    assert not [k for k in got if k[0].startswith("agentd_gpu_") and ("gpu", "1") in k[1]]
    assert got[("agentd_jobs_finished_total", (("outcome", "succeeded"),))] == 8


def test_status_is_copied(metrics):
    status = Status.from_dict({"queue": [{"id": "a"}, {"id": "b"}, {"id": "c"}]})
    metrics.update(status)
    status.queue.clear()
    assert scrape(metrics.port)[("agentd_queue_length", ())] == 3


def test_before_the_first_status_and_na_metrics(metrics):
    got = scrape(metrics.port)  # before any update
    assert got[("agentd_jobs_running", ())] == 0
    assert ("agentd_queue_length", ()) not in got  # unknown, not zero
    for outcome in ("succeeded", "failed", "cancelled"):  # present from the start for rate()
        assert got[("agentd_jobs_finished_total", (("outcome", outcome),))] == 0
    assert got[("agentd_gate_waits_total", ())] == 0
    # A GPU whose NVML reports no memory figures and a job that has not logged a loss: left out, not 0.
    metrics.update(Status.from_dict({"slots": [{"name": "cuda:0", "index": 0, "gpu": {"index": 0, "name": "x"}}],
                                     "running": [{"id": "j", "slot": "cuda:0", "step": 3}]}))
    got = scrape(metrics.port)
    assert got[("agentd_job_step", (("gpu", "0"), ("job", "j")))] == 3
    assert not [k for k in got if k[0] in ("agentd_job_loss", "agentd_gpu_memory_used_bytes")]


def test_own_registry_and_loopback(metrics):
    metrics.update(SNAPSHOT)
    assert b"agentd_" not in generate_latest(REGISTRY)  # the process-global registry stays clean
    assert metrics._server.server_address[0] == "127.0.0.1"
    other = Metrics()  # a second instance does not collide
    try:
        other.start("127.0.0.1", 0)
        other.update(Status.from_dict({"queue": [{"id": "x"}] * 9}))
        assert scrape(other.port)[("agentd_queue_length", ())] == 9
        assert scrape(metrics.port)[("agentd_queue_length", ())] == 2
    finally:
        other.stop()


def test_stop_closes_the_port():
    m = Metrics()
    port = m.start()
    m.stop()
    assert m.port is None
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
