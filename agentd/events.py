"""The daemon's own job events: queued, gated, state changes and infrastructure retries; and a sweep's
(agentd.sweep): a trial's state changes and the sweep's end, which `agentd sweep run` prints.

They are `trainer.events` kinds like the trainer's (one typed class per kind, registered in its table by
`kind` when this module is imported): the scheduler publishes them, and the journal, `agentd run` and
`agentd logs` read them back. So every reader of a job's events formats them with this module's
`format_event`, which knows the trainer's kinds and these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from trainer.events import Event, format_event

__all__ = ["Gated", "InfraRetry", "Queued", "Released", "State", "SweepFinished", "SweepTrial", "format_event"]


@dataclass(kw_only=True)
class Queued(Event):
    kind: ClassVar[str] = "queued"
    position: int
    ahead: int
    priority: int = 0

    def line(self) -> str:
        prio = f", priority {self.priority}" if self.priority else ""
        return (f"queued as {self.job_id} (position {self.position}: {self.ahead} "
                f"job{'s' if self.ahead != 1 else ''} ahead{prio})")


@dataclass(kw_only=True)
class Gated(Event):
    kind: ClassVar[str] = "gated"
    reason: str
    per_gpu: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"waiting for GPU memory: {self.reason}"


@dataclass(kw_only=True)
class State(Event):
    """A state change the journal records: running, paused, interrupted, queued (resumed or retried)."""

    kind: ClassVar[str] = "state"
    state: str
    detail: str | None = None

    def line(self) -> str:
        return f"job {self.job_id} {self.state}" + (f": {self.detail}" if self.detail else "")


@dataclass(kw_only=True)
class InfraRetry(Event):
    """An infrastructure failure (not the job's fault): the job re-queued; the slot marked unhealthy when its
    device failed (not when a data-parallel job lost a rank: agentd.failures "lost")."""

    kind: ClassVar[str] = "infra_retry"
    attempt: int  # the retry about to happen (1 = first retry)
    max_retries: int
    slot: str
    error: str
    from_step: int | None = None
    slot_unhealthy: bool = True
    checkpoint_on_first_box: bool = False  # a multi-box part on another box: rank 0's checkpoint, not known here

    def line(self) -> str:
        at = (" from the first box's last checkpoint" if self.checkpoint_on_first_box
              else f" from the checkpoint at step {self.from_step}" if self.from_step else " from the start")
        where = "; slot marked unhealthy" if self.slot_unhealthy else ""
        on = " on a healthy slot" if self.slot_unhealthy else ""
        return f"infrastructure failure on {self.slot}: {self.error}{where}; retry {self.attempt}/{self.max_retries}{at}{on}"


@dataclass(kw_only=True)
class SweepTrial(Event):
    """A sweep's trial changed state: started (as a job), pruning, complete, pruned, failed."""

    kind: ClassVar[str] = "sweep_trial"
    sweep: str
    trial: int
    state: str
    params: dict = field(default_factory=dict)
    value: float | None = None
    detail: str | None = None

    def line(self) -> str:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        value = f" objective {self.value:.6g}" if self.value is not None else ""
        detail = f": {self.detail}" if self.detail else ""
        return f"trial {self.trial:03d} {self.state}{value}" + (f" ({params})" if params else "") + detail


@dataclass(kw_only=True)
class SweepFinished(Event):
    """The sweep ended on this box: finished (nothing left to ask) or stopped (`agentd sweep stop`)."""

    kind: ClassVar[str] = "sweep_finished"
    sweep: str
    outcome: str
    counts: dict = field(default_factory=dict)
    best_trial: int | None = None
    best_value: float | None = None
    report: str | None = None

    def line(self) -> str:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(self.counts.items()))
        best = (f"; best trial {self.best_trial:03d} (objective {self.best_value:.6g})"
                if self.best_trial is not None else "; no complete trial")
        report = f"; report {self.report}" if self.report else ""
        return f"sweep {self.sweep} {self.outcome}: {counts}{best}{report}"


@dataclass(kw_only=True)
class Released(Event):
    """The release a training config asked for (`release:`), after the job succeeded."""

    kind: ClassVar[str] = "release"
    name: str
    outcome: str  # released | kept (backed up, `keep: true`) | refused (the gate) | failed (a target) | not_configured
    version: int | None = None
    artifact: str | None = None
    message: str = ""

    def line(self) -> str:
        if self.outcome == "released":
            said = f"released {self.name} v{self.version} ({self.artifact})"
            return f"{said}: {self.message}" if self.message else said
        if self.outcome == "kept":
            return f"kept {self.name} ({self.artifact}): {self.message}"
        return f"release of {self.name} {self.outcome}: {self.message}"
