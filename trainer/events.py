"""Job events: the one update interface a training job reports through.

A job calls `reporter.emit(event)` with a plain dict (`{"type": ..., "time": ...}`); the console, the
events.jsonl file, the daemon's journal and `agentd run`'s stream are all reporters. `format_event`
turns an event into the one plain line a Jenkins console shows; it imports nothing heavy, so the
`agentd` client uses it too.

Event types: started, resumed, warning, step (every optimizer step; `logged` marks the ones the
console shows, every `log_every`), checkpoint, artifact, finished (outcome succeeded|failed|cancelled),
and from the daemon: queued, gated, state.
"""
from __future__ import annotations

import sys
import time
from typing import Protocol


class Reporter(Protocol):
    def emit(self, event: dict) -> None: ...


def event(kind: str, **fields) -> dict:
    return {"type": kind, "time": round(time.time(), 3), **fields}


class FanOut:
    """Send each event to several reporters."""

    def __init__(self, *reporters: Reporter):
        self.reporters = [r for r in reporters if r is not None]

    def emit(self, ev: dict) -> None:
        for r in self.reporters:
            r.emit(ev)


def _duration(seconds) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_event(ev: dict) -> str | None:
    """One plain console line for an event, or None for events the console does not show."""
    t = ev.get("type")
    if t == "step":
        if not ev.get("logged", True):
            return None
        return (f"step {ev['step']}/{ev['total']}  epoch {ev['epoch']}  loss {ev['loss']:.4f} "
                f"(mean {ev['loss_mean']:.4f})  lr {ev['lr']:.2e}  {ev.get('it_s') or 0:.2f} it/s  "
                f"ETA {_duration(ev.get('eta_s'))}")
    if t == "started":
        res = f", resuming from step {ev['resumed_from']}" if ev.get("resumed_from") else ""
        return (f"training {ev['name']}: {ev['total_steps']} steps on {ev['device']} "
                f"({ev['samples']} samples, batch {ev['batch_size']} x {ev['grad_accum']}){res}")
    if t == "resumed":
        return f"resumed from step {ev['from_step']} ({ev['checkpoint']})"
    if t == "warning":
        return f"WARNING: {ev['message']}"
    if t == "checkpoint":
        return f"checkpoint step {ev['step']} -> {ev['path']}"
    if t == "artifact":
        return f"artifact: {ev['path']}"
    if t == "finished":
        outcome = ev["outcome"]
        if outcome == "succeeded":
            loss = ev.get("final_loss")
            return f"succeeded{f' (final loss {loss:.4f})' if loss is not None else ''} -> {ev.get('output_dir', '')}"
        if outcome == "cancelled":
            at = f" at step {ev['step']}" if ev.get("step") is not None else ""
            return f"cancelled{at}; checkpoint saved, run again to resume"
        return f"FAILED: {ev.get('error', 'unknown error')}"
    if t == "queued":
        ahead = ev.get("ahead", ev["position"] - 1)
        return f"queued as {ev['job_id']} (position {ev['position']}: {ahead} job{'s' if ahead != 1 else ''} ahead)"
    if t == "gated":
        return f"waiting for GPU memory: {ev['reason']}"
    if t == "state":
        return f"job {ev['job_id']} {ev['state']}" + (f": {ev['detail']}" if ev.get("detail") else "")
    if t == "message":
        return ev["text"]
    return None


class ConsoleReporter:
    """Plain lines when stdout is not a TTY (the Jenkins console); a rich progress bar on a TTY."""

    def __init__(self, stream=None, tty: bool | None = None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._progress = None
        self._task = None

    def emit(self, ev: dict) -> None:
        if self.tty and ev.get("type") == "step":
            self._rich_step(ev)
            return
        line = format_event(ev)
        if line is None:
            return
        if self._progress is not None:
            self._progress.console.print(line)
        else:
            print(line, file=self.stream, flush=True)
        if ev.get("type") == "finished" and self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _rich_step(self, ev: dict) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self._progress is None:
            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=ev["total"], info="")
        info = f"epoch {ev['epoch']} loss {ev['loss']:.4f} (mean {ev['loss_mean']:.4f}) {ev.get('it_s') or 0:.2f} it/s"
        self._progress.update(self._task, completed=ev["step"], info=info)
