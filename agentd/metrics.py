"""Optional Prometheus metrics (prometheus-client), served on 127.0.0.1 by default.

The daemon hands over the same status snapshot that `agentd status` renders; each scrape reports the
latest one. Nothing here keeps state of its own, so a GPU or a job that disappears from the snapshot
disappears from the metrics, and a restart of the daemon starts from the snapshot's own counters.

Snapshot keys read (all optional; a missing key or a value of the wrong type just leaves its series
out, it never breaks a scrape):

    queue            list of queued jobs (only its length is read); or
    queue_length     int, used when `queue` is absent
    running          list of running jobs (one per busy GPU), or one such dict, or None; each:
                       id (str), gpu (int), step (int), total_steps (int), loss (float), name (str)
    gpus             list of GPUs, each:
                       index (int), name (str), memory_used_bytes (int), memory_total_bytes (int)
    counters         dict:
                       jobs_finished  {outcome: count}, outcome e.g. succeeded | failed | cancelled
                       gate_waits     int, times a job had to wait at the VRAM gate
                     Both are totals that only grow (since daemon start, or from the journal).

Series (all prefixed agentd_):

    agentd_queue_length                                     gauge
    agentd_jobs_running                                     gauge
    agentd_job_step{job,gpu}                                gauge   optimizer steps done
    agentd_job_total_steps{job,gpu}                         gauge
    agentd_job_loss{job,gpu}                                gauge   last logged loss
    agentd_gpu_memory_used_bytes{gpu,name}                  gauge
    agentd_gpu_memory_total_bytes{gpu,name}                 gauge
    agentd_jobs_finished_total{outcome}                     counter (succeeded, failed, cancelled: always)
    agentd_gate_waits_total                                 counter
    agentd_snapshot_timestamp_seconds                       gauge   when update() last ran (staleness)
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Any, Iterator, Mapping, Optional

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

OUTCOMES = ("succeeded", "failed", "cancelled")


def _num(value: Any) -> Optional[float]:
    """A float for a real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Mapping)]
    return []


class _SnapshotCollector:
    """Builds every series from the latest snapshot at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot: Mapping[str, Any] = {}
        self._updated: Optional[float] = None

    def set(self, snapshot: Mapping[str, Any]) -> None:
        with self._lock:
            self._snapshot = snapshot
            self._updated = time.time()

    def describe(self) -> list[Metric]:
        return []  # series vary with the snapshot; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snap, updated = self._snapshot, self._updated

        queue = snap.get("queue")
        length = len(queue) if isinstance(queue, (list, tuple)) else _num(snap.get("queue_length"))
        if length is not None:
            yield GaugeMetricFamily("agentd_queue_length", "Jobs waiting in the queue", value=length)

        running = _dicts(snap.get("running"))
        yield GaugeMetricFamily("agentd_jobs_running", "Jobs running now", value=len(running))
        fields = (("step", "agentd_job_step", "Optimizer steps done by the running job"),
                  ("total_steps", "agentd_job_total_steps", "Optimizer steps the running job will do"),
                  ("loss", "agentd_job_loss", "Last logged training loss of the running job"))
        for key, name, doc in fields:
            family = GaugeMetricFamily(name, doc, labels=["job", "gpu"])
            for job in running:
                value = _num(job.get(key))
                if value is not None:
                    family.add_metric([str(job.get("id", "")), str(job.get("gpu", ""))], value)
            yield family

        used = GaugeMetricFamily("agentd_gpu_memory_used_bytes", "GPU memory in use (all processes)",
                                 labels=["gpu", "name"])
        total = GaugeMetricFamily("agentd_gpu_memory_total_bytes", "GPU memory size",
                                  labels=["gpu", "name"])
        for gpu in _dicts(snap.get("gpus")):
            labels = [str(gpu.get("index", "")), str(gpu.get("name", ""))]
            for family, key in ((used, "memory_used_bytes"), (total, "memory_total_bytes")):
                value = _num(gpu.get(key))
                if value is not None:
                    family.add_metric(labels, value)
        yield used
        yield total

        counters = snap.get("counters")
        counters = counters if isinstance(counters, Mapping) else {}
        finished_in = counters.get("jobs_finished")
        finished = {o: 0.0 for o in OUTCOMES}  # present from the start, so rate() and alerts work
        if isinstance(finished_in, Mapping):
            finished.update({str(k): v for k, v in finished_in.items() if _num(v) is not None})
        family = CounterMetricFamily("agentd_jobs_finished", "Jobs finished, by outcome",
                                     labels=["outcome"])
        for outcome, count in sorted(finished.items()):
            family.add_metric([outcome], float(count))
        yield family
        waits = _num(counters.get("gate_waits"))
        yield CounterMetricFamily("agentd_gate_waits", "Times a job waited at the VRAM gate",
                                  value=waits if waits is not None else 0.0)

        if updated is not None:
            yield GaugeMetricFamily("agentd_snapshot_timestamp_seconds",
                                    "Unix time of the last status snapshot", value=updated)


class Metrics:
    """The daemon's metrics endpoint, with its own registry (the process-global one stays untouched,
    so tests and several instances never collide).

        m = Metrics()
        m.start("127.0.0.1", 9464)   # port 0: any free port, see m.port
        m.update(snapshot)           # after each status change, or once per main-loop pass
        m.stop()
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)
        self._server = None
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> Optional[int]:
        """The port actually bound (useful with port 0), or None before start()."""
        return self._server.server_port if self._server is not None else None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve GET /metrics on host:port from a daemon thread; returns the bound port.

        Bound to loopback by default: the series name jobs and GPUs, and there is no authentication.
        """
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self.port

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Report `snapshot` (the daemon's status snapshot, see the module doc) from now on.

        It is copied, so the daemon may go on changing its own dict while a scrape reads this one.
        """
        self._collector.set(copy.deepcopy(snapshot) if isinstance(snapshot, Mapping) else {})

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
