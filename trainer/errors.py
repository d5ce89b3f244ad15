"""Errors the trainer reports to users.

A `ConfigError` carries every problem found in one pass, so a user fixes a config in one edit
instead of one error per run. Each problem names the field, the value, the YAML line when known,
and how to fix it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    field: str
    message: str
    fix: str = ""
    value: object = None
    line: int | None = None

    def render(self, source: str | None = None) -> str:
        where = source or "config"
        if self.line is not None:
            where += f":{self.line}"
        text = f"{where}: {self.field}: {self.message}"
        if self.value is not None:
            text += f" (got {self.value!r})"
        if self.fix:
            text += f"\n    fix: {self.fix}"
        return text


class ConfigError(Exception):
    """One or more problems with a training config, found before any model loads."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in {self.source or 'the training config'}:"
        return "\n".join([head] + ["  " + p.render(self.source) for p in self.problems])

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "problems": [
                {"field": p.field, "message": p.message, "fix": p.fix, "line": p.line,
                 "value": None if p.value is None else repr(p.value)}
                for p in self.problems
            ],
        }


class TrainingInterrupted(Exception):
    """Raised inside the loop when a stop was requested; the job has saved a checkpoint."""


class TrainingPaused(TrainingInterrupted):
    """Raised inside the loop when a pause was requested (`agentd pause`); the job has saved a checkpoint
    and continues from it, bit-identically, when resumed."""
