"""Rendering `agentd status`: a missing metric shows N/A, never a crash (plain and rich)."""
from __future__ import annotations

import io

from agentd.status_view import render_plain, rich_renderable


def snapshot(**gpu) -> dict:
    g = {"index": 0, "name": None, "memory_used_mib": None, "memory_total_mib": None, "utilization_pct": None,
         "temperature_c": None, "processes": None, "healthy": True, "error": None, **gpu}
    return {
        "daemon": {"pid": 1, "version": "0.1.0", "uptime_s": 5.0, "socket": "/run/agentd/agentd.sock",
                   "protocol": 1, "draining": False},
        "jenkins": {"state": "error", "last_error": "controller unreachable"},
        "slots": [{"name": "cuda:0", "index": 0, "job": None, "healthy": g["healthy"], "gpu": g}],
        "running": [{"id": "job-000001", "config": "/c.yaml", "slot": "cuda:0", "step": None, "total_steps": None,
                     "loss": None, "it_s": None, "eta_s": None, "submitter": {}, "build_url": None}],
        "queue": [], "recent": [{"id": "job-0", "outcome": "failed", "ended": None, "loss": None, "error": None,
                                 "estimate_mib": None, "peak_mib": None}],
        "counters": {"jobs_finished": {}, "gate_waits": 0}, "model_cache": {"entries": 0, "hits": 0, "misses": 0},
    }


def test_missing_metrics_render_as_na():
    text = render_plain(snapshot())
    assert "N/A/N/A MiB" in text and "loss N/A" in text and "last error: controller unreachable" in text


def test_unhealthy_gpu_says_why():
    text = render_plain(snapshot(healthy=False, error="GPU 0: GPU is lost"))
    assert "UNHEALTHY: GPU 0: GPU is lost" in text


def test_rich_layout_renders_without_a_tty():
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=120).print(rich_renderable(snapshot()))
    assert "job-000001" in out.getvalue() and "N/A" in out.getvalue()


def test_status_line_and_views_read_one_typed_status():
    from agentd.status_model import Status

    s = Status.from_dict({**snapshot(), "jenkins": {"state": "online", "url": "https://ci/", "node_name": "gpubox",
                                                    "agent": {"state": "running", "pid": 42, "restarts": 1}},
                          "queue": [{"id": "job-2", "position": 2, "state": "queued", "priority": 5, "config": "/q",
                                     "submitter": {"uid": 1001, "user": "alice"}}],
                          "paused": [{"id": "job-3", "step": 4, "total_steps": 10,
                                      "submitter": {"uid": 1500, "user": "agentd-build"},
                                      "build_url": "https://ci/job/t/7/"}],
                          "future_section": {"x": 1}})  # a newer daemon's field: ignored
    s.running[0].step, s.running[0].total_steps = 3, 300
    assert s.line() == "training job-000001 step 3/300 · 1 GPU · 1 queued · 1 paused · jenkins online"
    text = render_plain(s)
    assert "node gpubox" in text and "agent.jar: running pid 42 restarts 1" in text
    assert "priority 5" in text and "job-3 at step 4/10" in text
    # every job shows its owner (agentd.permissions): the user, and the build a build's job came from
    assert "job-2 queued priority 5 waited N/A /q by alice" in text
    assert "job-3 at step 4/10 None by agentd-build (https://ci/job/t/7/)" in text
    assert "by uid 1001" in render_plain({**snapshot(), "recent": [{"id": "job-0", "outcome": "failed",
                                                                     "submitter": {"uid": 1001}}]})
    s.running.clear()
    s.slots[0].healthy, s.slots[0].unhealthy_reason = False, "infrastructure failure in job-1: CUDA error"
    assert s.line() == "idle · 1 GPU (1 unhealthy) · 1 queued · 1 paused · jenkins online"
    assert "UNHEALTHY: infrastructure failure in job-1" in render_plain(s.to_dict())


def test_link_version_floor_and_agent_give_up_reach_the_status():
    """What the Jenkins link knows about the controller and agent.jar reaches `agentd status` unrenamed."""
    from agentd.status_model import JenkinsInfo, Status

    link = {"state": "unsupported-version", "url": "https://ci/", "node": "gpubox", "controller_version": "2.426.3",
            "min_controller_version": "2.440.1",
            "controller_version_note": "Jenkins 2.426.3 is older than 2.440.1: upgrade the controller",
            "last_error": "Jenkins 2.426.3 is older than 2.440.1: upgrade the controller",
            "offline_mark": {"url": "https://ci/", "node": "gpubox", "reason": "draining", "at": 1.0},
            "agent": {"state": "failed", "pid": None, "restarts": 0,
                      "gave_up_reason": "agent.jar printed its usage text: it predates -url/-name"}}
    j = JenkinsInfo.from_link(link)
    assert (j.node_name, j.min_controller_version, j.offline_mark["reason"]) == ("gpubox", "2.440.1", "draining")
    status = Status.from_dict(snapshot())
    status.jenkins = j
    text = render_plain(Status.from_dict(status.to_dict()))  # through the JSON form `status --json` prints
    assert "jenkins: unsupported-version https://ci/ node gpubox (Jenkins 2.426.3)" in text
    assert text.count("older than 2.440.1") == 1
    assert "agent.jar: failed" in text and "not restarted: agent.jar printed its usage text" in text
