"""Job events: one typed class per event kind, one name per fact, from the trainer to every reader.

A job calls `reporter.emit(ev)` with an `Event` (build one with its class, `Step(step=3, ...)`, or by
kind name, `event("step", step=3, ...)`); the console, logs/events.jsonl, the daemon's journal and
`agentd run`'s stream are all reporters. Everything that leaves the process is `ev.to_dict()`
(`{"type": kind, "time": ..., **fields}`), and `from_dict` turns such a dict back into the typed event,
so the same field names hold end to end (a step's total is `total_steps` everywhere, as in `started`).

An event also reads like a read-only mapping (`ev["step"]`, `ev.get("logged")`, `{**ev}`), for the
places that only look at one field.

Adding a kind (others do: samples, validation, run-started...): write a `@dataclass(kw_only=True)`
subclass of `Event` with `kind = "name"` and its fields, and a `line()` if the console shows it. The
class registers itself by its `kind` when its module is imported; nothing else changes. The daemon's
own kinds (queued, gated, state, infra_retry) live in `agentd.events`, which its readers import.
Unknown kinds (from a newer daemon, or a module not imported) become `UnknownEvent` (kept, not shown).

`format_event` turns an event (typed or dict) into the one plain line a Jenkins console shows; this
module imports nothing heavy, so the `agentd` client uses it too. `trainer.console` renders events for a
person (those lines, or a live display on a terminal).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Protocol

KINDS: dict[str, type["Event"]] = {}


def _now() -> float:
    return round(time.time(), 3)


@dataclass(kw_only=True)
class Event(Mapping):
    """Fields every event has. `seq` and `job_id` are set by the daemon when it journals the event."""

    kind: ClassVar[str] = ""
    time: float = field(default_factory=_now)
    seq: int | None = None
    job_id: str | None = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("kind"):
            KINDS[cls.kind] = cls

    def to_dict(self) -> dict:
        out = {"type": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("seq", "job_id"):
                continue
            out[f.name] = value
        return out

    def line(self) -> str | None:
        """The console line for this event, or None when the console does not show it."""
        return None

    def with_fields(self, **changes) -> "Event":
        return dataclasses.replace(self, **changes)

    # read-only mapping view of to_dict()
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def format_duration(seconds, unknown: str = "?") -> str:
    """H:MM:SS (an ETA, an uptime, a wait); `unknown` when there is no figure."""
    if seconds is None:
        return unknown
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def text_columns(rows: list) -> list[str]:
    """Rows of text cells as plain-text columns, two spaces apart, each column as wide as its widest cell
    (the console's tables: an evaluation's metrics, a sweep's trials)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


# --- the trainer's events ------------------------------------------------------------------------
@dataclass(kw_only=True)
class Started(Event):
    kind: ClassVar[str] = "started"
    name: str
    total_steps: int
    device: str
    samples: int
    batch_size: int
    grad_accum: int
    resumed_from: int | None = None
    output_dir: str | None = None
    # How the base model was had: "cold" | "host" (moved back to the device) | "device" | "shared" (a data-parallel
    # rank's: the daemon's warm copy, in shared memory)
    warm: str | None = None
    warm_move_s: float | None = None  # seconds the move from host memory to the device took
    ranks: int = 1  # data-parallel ranks training the job (all boxes); `device` is rank 0's

    def line(self) -> str:
        res = f", resuming from step {self.resumed_from}" if self.resumed_from else ""
        more = self.ranks - 1
        where = f"{self.device} + {more} more data-parallel rank{'s' if more > 1 else ''}" if more else self.device
        base = ""
        if self.warm == "host":
            base = f"; base model warm in host memory, moved to {self.device} in {self.warm_move_s or 0:.2f} s"
        elif self.warm == "device":
            base = "; base model warm on the device"
        elif self.warm == "shared":
            moved = f", moved to {self.device} in {self.warm_move_s:.2f} s" if self.warm_move_s is not None else ""
            base = f"; base model shared from the daemon's host memory{moved}"
        return (f"training {self.name}: {self.total_steps} steps on {where} "
                f"({self.samples} samples, batch {self.batch_size} x {self.grad_accum}){res}{base}")


@dataclass(kw_only=True)
class Resumed(Event):
    kind: ClassVar[str] = "resumed"
    from_step: int
    checkpoint: str
    reason: str | None = None

    def line(self) -> str:
        return f"resumed from step {self.from_step} ({self.checkpoint})"


@dataclass(kw_only=True)
class WarningEvent(Event):
    kind: ClassVar[str] = "warning"
    message: str

    def line(self) -> str:
        return f"WARNING: {self.message}"


@dataclass(kw_only=True)
class Step(Event):
    """One optimizer step. `logged` marks the steps the console shows (every `log_every`)."""

    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    epoch: str
    loss: float
    loss_mean: float
    lr: float
    it_s: float | None = None
    eta_s: float | None = None
    logged: bool = True

    def line(self) -> str | None:
        if not self.logged:
            return None
        return (f"step {self.step}/{self.total_steps}  epoch {self.epoch}  loss {self.loss:.4f} "
                f"(mean {self.loss_mean:.4f})  lr {self.lr:.2e}  {self.it_s or 0:.2f} it/s  "
                f"ETA {format_duration(self.eta_s)}")


@dataclass(kw_only=True)
class Checkpoint(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str

    def line(self) -> str:
        return f"checkpoint step {self.step} -> {self.path}"


@dataclass(kw_only=True)
class Artifact(Event):
    kind: ClassVar[str] = "artifact"
    path: str

    def line(self) -> str:
        return f"artifact: {self.path}"


@dataclass(kw_only=True)
class Finished(Event):
    """The job's end. outcome: succeeded | failed | cancelled. `infra`: the failure was the machine's
    (a GPU fault whose infrastructure retries are exhausted, no healthy GPU left, a multi-box rendezvous that
    not every box joined), not the job's (`agentd run` exits 5); `error` says which."""

    kind: ClassVar[str] = "finished"
    outcome: str
    error: str | None = None
    output_dir: str | None = None
    final_loss: float | None = None
    step: int | None = None
    artifacts: list[str] = field(default_factory=list)
    infra: bool = False

    def line(self) -> str:
        if self.outcome == "succeeded":
            loss = f" (final loss {self.final_loss:.4f})" if self.final_loss is not None else ""
            return f"succeeded{loss} -> {self.output_dir or ''}"
        if self.outcome == "cancelled":
            at = f" at step {self.step}" if self.step is not None else ""
            return f"cancelled{at}; checkpoint saved, run again to resume"
        if self.infra:
            return f"FAILED (infrastructure): {self.error or 'unknown error'}"
        return f"FAILED: {self.error or 'unknown error'}"


@dataclass(kw_only=True)
class Message(Event):
    kind: ClassVar[str] = "message"
    text: str

    def line(self) -> str:
        return self.text


@dataclass(kw_only=True)
class Run(Event):
    """Which run of the output folder this is (trainer.runs.history): new, resume, or nothing to do."""

    kind: ClassVar[str] = "run"
    action: str
    reason: str | None = None
    run_id: str | None = None
    previous: str | None = None

    def line(self) -> str:
        return self.reason or f"run {self.run_id}: {self.action}"


@dataclass(kw_only=True)
class Sample(Event):
    """A sampling round (trainer.training.sampling): the files written and how long it took (not in step time)."""

    kind: ClassVar[str] = "sample"
    step: int
    files: list[str] = field(default_factory=list)
    seconds: float | None = None

    def line(self) -> str:
        return f"samples at step {self.step}: {len(self.files)} file(s) in {self.seconds or 0:.2f} s"


@dataclass(kw_only=True)
class Validation(Event):
    """The validation loss at a step (trainer.training.validation_loss), at fixed noise and timesteps."""

    kind: ClassVar[str] = "validation"
    step: int
    val_loss: float
    best: float | None = None
    samples: int | None = None
    seconds: float | None = None

    def line(self) -> str:
        best = f" (best {self.best:.4f})" if self.best is not None else ""
        return (f"validation loss {self.val_loss:.4f}{best} at step {self.step} on {self.samples} samples, "
                f"{self.seconds or 0:.2f} s")


@dataclass(kw_only=True)
class Evaluation(Event):
    """The evaluation's result (trainer.training.evaluation): per metric the arms' means, the paired difference
    with its 95% interval and the decision; overall better | no worse | worse | unknown (`agentd run` exits 6
    on worse)."""

    kind: ClassVar[str] = "evaluation"
    overall: str
    against: str
    reason: str = ""
    rows: list[dict] = field(default_factory=list)  # metric, candidate, comparison, base, delta, lo, hi, decision
    seconds: float | None = None

    def line(self) -> str:
        head = f"evaluation against {self.against}: {self.overall.upper()} ({self.reason}; {self.seconds or 0:.1f} s)"
        if not self.rows:
            return head
        table = [("metric", "candidate", "comparison", "base", "delta [95% CI]", "decision")] + [
            (r["metric"], f"{r['candidate']:.4g}", f"{r['comparison']:.4g}", f"{r['base']:.4g}",
             f"{r['delta']:+.4g} [{r['lo']:+.4g}, {r['hi']:+.4g}]", r["decision"]) for r in self.rows]
        return "\n".join([head] + ["  " + line for line in text_columns(table)])


@dataclass(kw_only=True)
class UnknownEvent(Event):
    """A kind this version does not know (e.g. from a newer daemon): kept, not shown."""

    type: str = "unknown"
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.data)


# --- building and reading events -----------------------------------------------------------------
def event(kind: str, **fields) -> Event:
    """The typed event of `kind` with `fields` (a TypeError names a field the kind does not have)."""
    try:
        cls = KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown event kind {kind!r}; known: {', '.join(sorted(KINDS))}") from None
    return cls(**fields)


def from_dict(data: Mapping) -> Event:
    """The typed event for a dict from the journal, events.jsonl or the socket. Fields this version does
    not know are dropped; a step written by an older version (`total`) reads as `total_steps`."""
    if isinstance(data, Event):
        return data
    cls = KINDS.get(data.get("type", ""))
    if cls is None:
        return UnknownEvent(type=str(data.get("type")), data=dict(data))
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in data.items() if k in names}
    if cls is Step and "total_steps" not in values and "total" in data:
        values["total_steps"] = data["total"]
    try:
        return cls(**values)
    except TypeError:  # a required field missing: keep it, do not crash the reader
        return UnknownEvent(type=cls.kind, data=dict(data))


def format_event(ev: Mapping) -> str | None:
    """One plain console line for an event (typed or its dict), or None for events the console hides."""
    return from_dict(ev).line()


class Reporter(Protocol):
    def emit(self, event: Event) -> None: ...


class FanOut:
    """Send each event to several reporters."""

    def __init__(self, *reporters: Reporter):
        self.reporters = [r for r in reporters if r is not None]

    def emit(self, ev: Event) -> None:
        for r in self.reporters:
            r.emit(ev)
