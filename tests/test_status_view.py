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
