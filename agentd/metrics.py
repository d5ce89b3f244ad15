"""Optional Prometheus metrics (prometheus-client), served on 127.0.0.1 by default.

The daemon hands over the same typed status (`agentd.status_model.Status`) that `agentd status`
renders and systemd's STATUS= line summarises; each scrape reports the latest one. Nothing here keeps
state of its own, so a GPU or a job that disappears from the status disappears from the metrics, and
a restart of the daemon starts from the status's own counters. A metric the status has as None (N/A)
is left out, never reported as 0.

Series (all prefixed agentd_):

    agentd_queue_length                                     gauge
    agentd_jobs_running                                     gauge
    agentd_jobs_paused                                      gauge
    agentd_job_step{job,gpu}                                gauge   optimizer steps done (gpu: the slot)
    agentd_job_total_steps{job,gpu}                         gauge
    agentd_job_loss{job,gpu}                                gauge   last logged loss
    agentd_gpu_memory_used_bytes{gpu,name}                  gauge   all processes
    agentd_gpu_memory_total_bytes{gpu,name}                 gauge
    agentd_gpu_agentd_memory_bytes{gpu,name}                gauge   what agentd itself holds (warm cache...)
    agentd_slot_healthy{slot}                               gauge   0 after an infrastructure failure
    agentd_model_cache_device_bytes                         gauge   warm base models still on a GPU
    agentd_jobs_finished_total{outcome}                     counter (succeeded, failed, cancelled: always)
    agentd_gate_waits_total                                 counter
    agentd_infra_retries_total                              counter jobs re-queued after a GPU fault
    agentd_snapshot_timestamp_seconds                       gauge   when update() last ran (staleness)
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Iterator, Optional

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from agentd.status_model import Status

OUTCOMES = ("succeeded", "failed", "cancelled")
MIB = 2 ** 20


def _bytes(mib) -> Optional[float]:
    return None if mib is None else float(mib) * MIB


class _StatusCollector:
    """Builds every series from the latest status at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: Optional[Status] = None
        self._updated: Optional[float] = None

    def set(self, status: Status) -> None:
        with self._lock:
            self._status = status
            self._updated = time.time()

    def describe(self) -> list[Metric]:
        return []  # series vary with the status; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            st, updated = self._status, self._updated
        st = st or Status()

        if updated is not None:
            yield GaugeMetricFamily("agentd_queue_length", "Jobs waiting in the queue", value=len(st.queue))
            yield GaugeMetricFamily("agentd_jobs_paused", "Jobs paused (agentd pause)", value=len(st.paused))
        yield GaugeMetricFamily("agentd_jobs_running", "Jobs running now", value=len(st.running))
        fields = (("step", "agentd_job_step", "Optimizer steps done by the running job"),
                  ("total_steps", "agentd_job_total_steps", "Optimizer steps the running job will do"),
                  ("loss", "agentd_job_loss", "Last logged training loss of the running job"))
        slot_index = {sl.name: sl.index for sl in st.slots}
        for attr, name, doc in fields:
            family = GaugeMetricFamily(name, doc, labels=["job", "gpu"])
            for job in st.running:
                value = getattr(job, attr)
                if value is not None:
                    family.add_metric([job.id, str(slot_index.get(job.slot, job.slot))], float(value))
            yield family

        used = GaugeMetricFamily("agentd_gpu_memory_used_bytes", "GPU memory in use (all processes)",
                                 labels=["gpu", "name"])
        total = GaugeMetricFamily("agentd_gpu_memory_total_bytes", "GPU memory size", labels=["gpu", "name"])
        own = GaugeMetricFamily("agentd_gpu_agentd_memory_bytes", "GPU memory agentd itself holds",
                                labels=["gpu", "name"])
        healthy = GaugeMetricFamily("agentd_slot_healthy", "1 while the slot takes jobs, 0 once it failed",
                                    labels=["slot"])
        for sl in st.slots:
            healthy.add_metric([sl.name], 1.0 if sl.healthy else 0.0)
            if sl.gpu is None:
                continue
            labels = [str(sl.index), str(sl.gpu.get("name") or "")]
            for family, value in ((used, sl.gpu.get("memory_used_mib")), (total, sl.gpu.get("memory_total_mib")),
                                  (own, sl.agentd_vram_mib)):
                if value is not None:
                    family.add_metric(labels, _bytes(value))
        yield from (used, total, own, healthy)
        yield GaugeMetricFamily("agentd_model_cache_device_bytes", "Warm base models still on a GPU",
                                value=_bytes(st.model_cache.device_mib) or 0.0)

        finished = {o: 0.0 for o in OUTCOMES}  # present from the start, so rate() and alerts work
        finished.update({str(k): float(v) for k, v in st.counters.jobs_finished.items()})
        family = CounterMetricFamily("agentd_jobs_finished", "Jobs finished, by outcome", labels=["outcome"])
        for outcome, count in sorted(finished.items()):
            family.add_metric([outcome], count)
        yield family
        yield CounterMetricFamily("agentd_gate_waits", "Times a job waited at the VRAM gate",
                                  value=float(st.counters.gate_waits))
        yield CounterMetricFamily("agentd_infra_retries", "Jobs re-queued after an infrastructure failure",
                                  value=float(st.counters.infra_retries))
        if updated is not None:
            yield GaugeMetricFamily("agentd_snapshot_timestamp_seconds",
                                    "Unix time of the last status snapshot", value=updated)


class Metrics:
    """The daemon's metrics endpoint, with its own registry (the process-global one stays untouched,
    so tests and several instances never collide).

        m = Metrics()
        m.start("127.0.0.1", 9464)   # port 0: any free port, see m.port
        m.update(status)             # the daemon's typed Status, once per main-loop tick
        m.stop()
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _StatusCollector()
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

    def update(self, status: Status) -> None:
        """Report `status` (the daemon's typed status) from now on. It is copied, so the daemon may go on
        building the next one while a scrape reads this one."""
        self._collector.set(copy.deepcopy(status))

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
