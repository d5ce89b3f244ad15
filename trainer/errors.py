"""Errors the trainer reports to users, and the exit codes that tell a build how a command ended.

A `ConfigError` carries every problem found in one pass, so a user fixes a config in one edit
instead of one error per run. Each problem names the field, the value, the YAML line when known,
and how to fix it.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of `lora-train` and the `agentd` commands (a Jenkins build step fails on any but 0)."""

    SUCCEEDED = 0  # the job succeeded (or the command did what it was asked)
    FAILED = 1  # the job failed, or the daemon refused the request
    INVALID_CONFIG = 2  # the config (or another input) has problems, all printed; nothing was written
    CANCELLED = 3  # cancelled (a checkpoint is saved: the same command resumes it)
    UNREACHABLE = 4  # `agentd run` and the job commands: the daemon did not answer (not running, or gone)
    INFRA_FAILURE = 5  # the GPU or driver failed and the daemon's retries are used up: retry the build
    WORSE = 6  # trained and saved, but the evaluation decided "worse" than what it was compared with (UNSTABLE)
    NOT_PERMITTED = 77  # EX_NOPERM: the daemon refused: not your job, or an operator's act (agentd.permissions)
    BAD_SETTINGS = 78  # EX_CONFIG: agentd's own settings are invalid; systemd does not restart on it


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

    def __reduce__(self):
        # Pickled whole (a data-parallel rank sends its ConfigError to the launcher), not as its rendered text.
        return type(self), (self.problems, self.source)

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


class OutOfMemory(Exception):
    """A job ran out of device memory. The message is the advice for the user: where, the estimate and the
    measured peak, that the last checkpoint is kept, and what to change."""


class RendezvousFailed(RuntimeError):
    """The ranks of a job did not all meet at its rendezvous within the timeout (a box of a multi-box job never
    started its part, or cannot reach node 0's endpoint): an infrastructure failure (exit 5), not retried by the
    daemon (the other boxes' parts are not its to restart). The message names the endpoint and the node count."""


# What gloo and NCCL say on the ranks left when a peer rank went away (killed, crashed, its box gone): the
# effect of another rank's failure, never its cause (trainer.training.distributed reports the cause; agentd.failures
# re-queues a job that only lost a rank).
PEER_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "ncclremoteerror",
                     "collective operation timeout")


def is_peer_lost(error_text: str) -> bool:
    text = error_text.lower()
    return any(m in text for m in PEER_LOST_MARKERS)


class TrainingInterrupted(Exception):
    """Raised inside the loop when a stop was requested; the job has saved a checkpoint."""


class TrainingPaused(TrainingInterrupted):
    """Raised inside the loop when a pause was requested (`agentd pause`); the job has saved a checkpoint
    and continues from it, bit-identically, when resumed."""


class DescribedError(ValueError):
    """A reading error whose message agentd wrote itself (a kind, a position, a count): it holds no byte
    of the file, so `content_free` passes it through as is."""


def content_free(e: BaseException) -> str:
    """An error from reading a file a config names, told by kind and position only, never by its bytes.

    Library messages often quote the input (a JSON excerpt, a Jinja template line, a serde "unknown
    variant `…`", a pickle opcode), and the daemon reads files for submitters: the user can open their own
    file at the position given. Errors agentd raises with its own words (`DescribedError`) pass through.
    """
    import json

    if isinstance(e, DescribedError):
        return str(e)
    if isinstance(e, json.JSONDecodeError):  # msg is the parser's fixed phrase, e.g. "Expecting value"
        return f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text (undecodable byte at offset {e.start})"
    if isinstance(e, OSError):
        return e.strerror or type(e).__name__
    lineno = getattr(e, "lineno", None)
    if type(e).__name__ == "TemplateSyntaxError":  # jinja2 quotes the offending token and the line itself
        return f"Jinja syntax error at line {lineno} of the template" if lineno else "Jinja syntax error"
    if type(e).__name__ == "UndefinedError":  # "'<name from the template>' is undefined"
        return "the template uses a variable or attribute that is not defined (UndefinedError)"
    mark = getattr(e, "problem_mark", None)  # a YAML error
    if mark is not None:
        return f"{type(e).__name__} at line {mark.line + 1} column {mark.column + 1}"
    import re

    at = re.search(r"at line (\d+) column (\d+)", str(e))  # serde (tokenizers, safetensors): keep the place only
    if at:
        return f"{type(e).__name__}: the file does not parse at line {at[1]} column {at[2]}"
    return type(e).__name__
