"""Resumable checkpoints: what is in one, how it is written, and which one a run resumes from.

A checkpoint folder `checkpoints/step-00000042/` holds:

    lora.safetensors     the LoRA weights (kohya keys, same as the final file)
    optimizer.pt         AdamW state, LR scheduler state and GradScaler state (tensors/numbers only)
    rng.pt               global RNG states: torch CPU (+ CUDA), numpy, python; with W data-parallel ranks
                         every rank's under "ranks" (per-sample draws need none: trainer.data.randomness)
    state.json           TrainState (step, epoch, data cursor), config hash and training fields,
                         dataset fingerprint, library versions, time
    manifest.json        sha256 and size of each file above

It is written to `checkpoints/.tmp-step-…`, every file fsynced, then renamed into place, so a
`step-…` folder is always complete. Loading never unpickles arbitrary objects: safetensors, JSON and
`torch.load(weights_only=True)`.

Which checkpoint wins (`choose_resume`, a pure function): with `resume: auto` the newest valid
checkpoint whose training fields and dataset match the config; a corrupt newest one is skipped
with a warning; a mismatch is returned with the list of what changed (`changes`, and a refusal text
for `resume: strict` or a named checkpoint; `trainer.runs.history.decide_run` starts a new run for `auto`).
`resume: <path>` uses exactly that checkpoint, with the same checks.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.data.files import file_sha256
from trainer.errors import content_free
from trainer.runs.outputs import atomic_write_json, fsync_dir, save_safetensors_atomic

FILES = ("lora.safetensors", "optimizer.pt", "rng.pt", "state.json")


@dataclass
class TrainState:
    """Resumable progress. The data cursor is (epoch, micro-batch index in that epoch's permutation)."""

    global_step: int = 0
    epoch: int = 0
    cursor: int = 0
    loss_sum: float = 0.0  # running sum of step losses, for the running mean on the console

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(**{k: d[k] for k in ("global_step", "epoch", "cursor", "loss_sum") if k in d})


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def capture_rng() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": json.dumps(random.getstate()),
    }


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    version, internal, gauss = json.loads(rng["python"])
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: Path, step: int, *, lora: dict, optim: dict, rng: dict, state: dict,
                    keep: int) -> Path:
    """Write one checkpoint atomically and keep the newest `keep`. Returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_safetensors_atomic(lora, tmp / "lora.safetensors")
    for name, obj in (("optimizer.pt", optim), ("rng.pt", rng)):
        with (tmp / name).open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_json(tmp / "state.json", state)
    manifest = {name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in FILES}
    atomic_write_json(tmp / "manifest.json", manifest)
    fsync_dir(tmp)
    if final.exists():  # a redo of the same step after a crash: replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    prune(root, keep)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest first (temporary folders of interrupted writes are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: p.name, reverse=True)


def prune(root: Path, keep: int) -> list[Path]:
    removed = []
    for old in list_checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old)
    for tmp in root.glob(".tmp-step-*"):
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)
    return removed


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and every file matches its manifest; else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable ({type(e).__name__})"
    for name in FILES:
        entry = manifest.get(name)
        f = path / name
        if entry is None or not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != entry["bytes"]:
            return f"{name} is {f.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)"
        if file_sha256(f) != entry["sha256"]:
            return f"{name} checksum mismatch"
    return None


def read_state(path: Path) -> dict:
    return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path) -> dict:
    from safetensors.torch import load_file

    return {
        "lora": load_file(str(path / "lora.safetensors")),
        "optim": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "rng": torch.load(path / "rng.pt", weights_only=True, map_location="cpu"),
        "state": read_state(path),
    }


# ------------------------------------------------------------------------------------------------
# Which checkpoint to resume from: pure decisions over what is on disk.


@dataclass
class Candidate:
    path: Path
    step: int
    error: str | None  # None when valid
    training_fields: dict = field(default_factory=dict)
    data_fingerprint: str | None = None


@dataclass
class ResumeChoice:
    checkpoint: Path | None  # None: start fresh
    reason: str
    warnings: list[str] = field(default_factory=list)
    refusal: str | None = None  # set when the run must not start
    changes: list[str] = field(default_factory=list)  # what differs from the newest valid checkpoint


def changed_fields(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def choose_resume(policy: str, candidates: list[Candidate], training_fields: dict,
                  data_fingerprint: str) -> ResumeChoice:
    """Pick the checkpoint to resume from. `candidates` newest first (auto) or the one named (path)."""
    if policy == "never":
        return ResumeChoice(None, "resume: never")
    warnings = []
    for c in candidates:
        if c.error:
            warnings.append(f"checkpoint {c.path} is unusable ({c.error}); trying the one before")
            continue
        diffs = changed_fields(c.training_fields, training_fields)
        if c.data_fingerprint != data_fingerprint:
            diffs.append("dataset: files or captions changed")
        if diffs:
            return ResumeChoice(None, "config changed", warnings, refusal=(
                f"cannot resume from {c.path}: the training config or data changed since it was written:\n  "
                + "\n  ".join(diffs)
                + "\nto start a new run set `resume: auto` (the previous run is kept in runs/) or `resume: never`; "
                "to resume, undo the changes"), changes=[d.replace(": ", " ", 1) for d in diffs])
        return ResumeChoice(c.path, f"resuming from step {c.step}", warnings)
    if policy not in ("auto",) and candidates:
        return ResumeChoice(None, "named checkpoint unusable", warnings,
                            refusal=f"checkpoint {candidates[0].path} is unusable: {candidates[0].error}")
    return ResumeChoice(None, "no checkpoint" if not warnings else "no valid checkpoint", warnings)


def scan_candidates(policy: str, checkpoints_dir: Path) -> list[Candidate]:
    paths = list_checkpoints(checkpoints_dir) if policy in ("auto", "strict") else (
        [] if policy == "never" else [Path(policy)])
    out = []
    for p in paths:
        err = verify(p)
        st = {}
        if err is None:
            try:
                st = read_state(p)
            except (OSError, ValueError) as e:
                err = f"state.json unreadable ({content_free(e)})"
        step = st.get("train_state", {}).get("global_step", -1) if st else _step_from_name(p)
        out.append(Candidate(p, step, err, st.get("training_fields", {}), st.get("data_fingerprint")))
    return out


def _step_from_name(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def now() -> float:
    return round(time.time(), 3)


@contextlib.contextmanager
def isolated_rng():
    """Run side work (samples, validation) without moving the global RNGs the training run uses, so a
    run with sampling or validation draws the same numbers as one without (and resumes bit-identically)."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)
