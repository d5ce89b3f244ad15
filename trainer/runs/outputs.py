"""The output folder of a job, and writing files so a crash never leaves a half-written one.

    <output_dir>/<name>.safetensors   the LoRA (kohya keys, ss_* metadata)
    <output_dir>/config.yaml          the resolved config that made it
    <output_dir>/run.json             provenance (see `provenance`)
    <output_dir>/checkpoints/step-N/  resumable state (trainer.runs.checkpoint)
    <output_dir>/logs/loss.csv        one row per optimizer step (val_loss on the steps that validated)
    <output_dir>/logs/events.jsonl    every event

Whole files (LoRA, run.json, config.yaml, checkpoints) are written to a temporary name in the same
folder, fsynced, then renamed. The two logs are appended line by line and flushed; a crash can cut at
most the last line, and a resume rewrites both (atomically) to hold each step up to the checkpoint once.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

LOSS_COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "elapsed_s", "val_loss"]
# Events tied to a step: a resume from step N drops the ones after N (they will happen again).
STEP_EVENTS = ("step", "checkpoint", "validation", "sample")
JENKINS_VARS = ("JOB_NAME", "BUILD_NUMBER", "BUILD_URL", "BUILD_TAG", "GIT_COMMIT", "GIT_BRANCH", "WORKSPACE",
                "NODE_NAME")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process umask (read from /proc, since setting the
    umask to learn it would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = 0o022
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600; outputs get the umask's mode like every other file, so that the submitter's
        # group can read what the daemon wrote for them (the unit's UMask=0007).
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


class RunLogs:
    """logs/loss.csv and logs/events.jsonl, with each step exactly once across resumes."""

    def __init__(self, output_dir: Path):
        self.dir = Path(output_dir) / "logs"
        self.loss_path = self.dir / "loss.csv"
        self.events_path = self.dir / "events.jsonl"
        self._loss = self._events = None

    def open(self, resume_step: int | None) -> None:
        """Fresh run: start both logs empty. Resume at step N: keep what happened up to step N."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.loss_path, ",".join(LOSS_COLUMNS) + "\n")
            atomic_write_text(self.events_path, "")
        else:
            self._truncate_after(resume_step)
        self._loss = self.loss_path.open("a", newline="", encoding="utf-8")
        self._events = self.events_path.open("a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        rows = [",".join(LOSS_COLUMNS)]
        if self.loss_path.exists():
            for row in csv.DictReader(io.StringIO(self.loss_path.read_text(encoding="utf-8"))):
                try:
                    if int(row["step"]) <= step:
                        rows.append(",".join(row.get(c) or "" for c in LOSS_COLUMNS))
                except (TypeError, ValueError, KeyError):
                    continue  # a line cut by a crash
        atomic_write_text(self.loss_path, "\n".join(rows) + "\n")
        kept = []
        if self.events_path.exists():
            for line in self.events_path.read_text(encoding="utf-8").splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("step") is not None and ev.get("type") in STEP_EVENTS and ev["step"] > step:
                    continue
                kept.append(line)
        atomic_write_text(self.events_path, "".join(x + "\n" for x in kept))

    def step(self, row: dict) -> None:
        self._loss.write(",".join(_fmt(row.get(c)) for c in LOSS_COLUMNS) + "\n")
        self._loss.flush()

    def emit(self, ev: dict) -> None:
        if self._events is not None:
            self._events.write(json.dumps(dict(ev), default=str) + "\n")  # a typed event reads as a mapping
            self._events.flush()

    def close(self) -> None:
        for f in (self._loss, self._events):
            if f is not None:
                f.close()
        self._loss = self._events = None


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def read_loss_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def git_info(folder: Path) -> dict | None:
    """The commit of the repository that holds the config, if any (and whether it had local changes)."""
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("agentd", "torch", "diffusers", "transformers", "peft", "safetensors", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def jenkins_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: env[k] for k in JENKINS_VARS if env.get(k)}
