"""The daemon's status as typed objects: built once per main-loop tick, read by everything that shows it.

`agentd status --json` is `Status.to_dict()`; the plain and rich views (`agentd.status_view`) read a
`Status` (the client rebuilds it with `Status.from_dict`); the systemd `STATUS=` line is
`Status.line()`; the Prometheus metrics (`agentd.metrics`) read the same object. A fact therefore has
one name everywhere (the Jenkins node is `jenkins.node_name`, agent.jar is `jenkins.agent`, a job's
total is `total_steps`).

Every metric may be None ("N/A"): a GPU that does not report it, a job that has not logged a step.
`from_dict` keeps only the fields this version knows and fills the others with their defaults, so a
client and a daemon of neighbouring versions still understand each other. No heavy imports here.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional


def build(cls, data: Any):
    """`cls` from a dict: unknown keys dropped, nested dataclasses (and lists of them) rebuilt."""
    if data is None:
        return None
    if not isinstance(data, dict):
        return data
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        inner = _dataclass_in(hint)
        if inner is not None:
            if isinstance(value, list):
                value = [build(inner, v) for v in value]
            else:
                value = build(inner, value)
        values[f.name] = value
    return cls(**values)


def _dataclass_in(hint) -> Optional[type]:
    """The dataclass named by a hint like X, Optional[X] or list[X]; None for plain types."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


@dataclass
class DaemonInfo:
    pid: int = 0
    version: str = ""
    uptime_s: float = 0.0
    socket: str = ""
    protocol: int = 1
    draining: bool = False
    gpu_probe: str = ""
    metrics: Optional[str] = None


@dataclass
class AgentInfo:
    """agent.jar, as the supervisor sees it (inbound launcher only)."""

    state: str = "unknown"  # starting | running | backoff | stopped | ...
    pid: Optional[int] = None
    restarts: int = 0
    last_exit_code: Optional[int] = None
    uptime_s: Optional[float] = None
    next_restart_in_s: Optional[float] = None
    last_error: Optional[str] = None
    gave_up_reason: Optional[str] = None  # why the supervisor stopped restarting it (e.g. a usage-text exit)


@dataclass
class JenkinsInfo:
    state: str = "disabled"  # disabled | connecting | online | offline | auth-error | error | ...
    url: Optional[str] = None
    node_name: Optional[str] = None
    labels: Optional[list[str]] = None
    executors: Optional[int] = None
    last_error: Optional[str] = None
    offline_reason: Optional[str] = None  # why agentd asked Jenkins to take the node offline
    controller_version: Optional[str] = None
    min_controller_version: Optional[str] = None
    controller_version_note: Optional[str] = None  # below the supported floor, or no X-Jenkins header
    offline_mark: Optional[dict] = None  # {url, node, reason, at}: agentd's own offline mark, persisted
    agent: Optional[AgentInfo] = None

    @classmethod
    def from_link(cls, link_status: Optional[dict]) -> "JenkinsInfo":
        """From the Jenkins link's own status dict (`agentd.jenkins.link.JenkinsLink.status`)."""
        if not link_status:
            return cls()
        s = link_status
        agent = s.get("agent")
        return cls(state=s.get("state", "unknown"), url=s.get("url"), node_name=s.get("node") or s.get("node_name"),
                   labels=s.get("labels"), executors=s.get("executors"), last_error=s.get("last_error"),
                   offline_reason=s.get("requested_offline_reason"),
                   controller_version=s.get("controller_version"),
                   min_controller_version=s.get("min_controller_version"),
                   controller_version_note=s.get("controller_version_note"),
                   offline_mark=s.get("offline_mark"),
                   agent=build(AgentInfo, agent) if isinstance(agent, dict) else None)


@dataclass
class SlotInfo:
    name: str = ""
    index: int = -1  # NVML index; -1 the CPU slot
    healthy: bool = True
    unhealthy_reason: Optional[str] = None
    job: Optional[str] = None
    uuid: Optional[str] = None
    gpu: Optional[dict] = None  # trainer.gpus.GpuFacts.to_dict(), None for the CPU slot or a vanished GPU
    agentd_vram_mib: Optional[float] = None  # memory agentd itself holds on this device (None: unknown)


@dataclass
class Submitter:
    """A job's owner (agentd.permissions): who submitted it, as the kernel reported the client."""

    uid: Optional[int] = None
    pid: Optional[int] = None
    user: Optional[str] = None

    @classmethod
    def of(cls, record: dict) -> "Submitter":
        sub = record.get("submitter") or {}
        return cls(uid=sub.get("uid"), pid=sub.get("pid"), user=sub.get("user"))


@dataclass
class RunningJob:
    id: str = ""
    name: Optional[str] = None
    config: Optional[str] = None
    output_dir: Optional[str] = None
    slot: Optional[str] = None
    device_uuid: Optional[str] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    loss_mean: Optional[float] = None
    lr: Optional[float] = None
    it_s: Optional[float] = None
    eta_s: Optional[float] = None
    epoch: Optional[str] = None
    priority: int = 0
    attempt: int = 1
    submitter: Submitter = field(default_factory=Submitter)
    build_url: Optional[str] = None
    started: Optional[float] = None
    estimate_mib: Optional[float] = None
    stopping: Optional[str] = None  # None, or why it is stopping: cancel | pause | shutdown
    part: Optional[str] = None  # a job over several boxes: this box's part, "node 2 of 2, ranks 1-1 of 2"


@dataclass
class QueuedJob:
    id: str = ""
    name: Optional[str] = None
    config: Optional[str] = None
    output_dir: Optional[str] = None
    position: int = 0
    state: str = "queued"  # queued | gated | interrupted
    priority: int = 0
    waited_s: Optional[float] = None
    device: Optional[str] = None  # the config's device: request, if any
    created: Optional[float] = None  # when it was submitted (the journal's `created`, as in RecentJob)
    submitter: Submitter = field(default_factory=Submitter)
    build_url: Optional[str] = None
    estimate_mib: Optional[float] = None


@dataclass
class PausedJob:
    id: str = ""
    name: Optional[str] = None
    config: Optional[str] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    priority: int = 0
    paused_at: Optional[float] = None
    submitter: Submitter = field(default_factory=Submitter)
    build_url: Optional[str] = None


@dataclass
class RecentJob:
    id: str = ""
    name: Optional[str] = None
    config: Optional[str] = None
    outcome: str = ""
    created: Optional[float] = None
    started: Optional[float] = None
    ended: Optional[float] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    loss: Optional[float] = None
    error: Optional[str] = None
    output_dir: Optional[str] = None
    build_url: Optional[str] = None
    estimate_mib: Optional[float] = None
    peak_mib: Optional[float] = None
    infra_retries: int = 0
    submitter: Submitter = field(default_factory=Submitter)


@dataclass
class Counters:
    jobs_finished: dict = field(default_factory=dict)  # outcome -> count
    gate_waits: int = 0
    infra_retries: int = 0


@dataclass
class ModelCacheInfo:
    entries: int = 0
    hits: int = 0
    misses: int = 0
    on_device: int = 0  # entries still on a GPU (within warm_vram_ttl_s of their last job)
    device_mib: float = 0.0  # what those hold
    host_mib: float = 0.0  # what the entries kept in host memory hold
    warm_vram_ttl_s: float = 0.0
    device_expires_in_s: Optional[float] = None  # when the entries on a GPU move to host memory


@dataclass
class Status:
    daemon: DaemonInfo = field(default_factory=DaemonInfo)
    jenkins: JenkinsInfo = field(default_factory=JenkinsInfo)
    slots: list[SlotInfo] = field(default_factory=list)
    running: list[RunningJob] = field(default_factory=list)
    queue: list[QueuedJob] = field(default_factory=list)
    paused: list[PausedJob] = field(default_factory=list)
    recent: list[RecentJob] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    model_cache: ModelCacheInfo = field(default_factory=ModelCacheInfo)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Status":
        return build(cls, data)

    def line(self) -> str:
        """The one-line summary systemd shows (`STATUS=`): what runs, where, the queue, the link."""
        gpu_count = sum(1 for s in self.slots if s.index >= 0)
        where = f"{gpu_count} GPU" if gpu_count else "CPU only"
        unhealthy = sum(1 for s in self.slots if not s.healthy)
        health = f" ({unhealthy} unhealthy)" if unhealthy else ""
        link = f" · jenkins {self.jenkins.state}" if self.jenkins.state != "disabled" else ""
        queued = f" · {len(self.queue)} queued" if self.queue else ""
        paused = f" · {len(self.paused)} paused" if self.paused else ""
        if self.running:
            r = self.running[0]
            more = f" (+{len(self.running) - 1} more)" if len(self.running) > 1 else ""
            head = f"training {r.id} step {r.step or 0}/{r.total_steps or '?'}{more}"
        else:
            head = "draining" if self.daemon.draining else "idle"
        return f"{head} · {where}{health}{queued}{paused}{link}"
