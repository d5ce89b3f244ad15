"""Runs in one output_dir: which run a submitted config continues, and keeping earlier runs aside.

One `output_dir` holds the *current* run; earlier runs live in `<history_dir>/<run-id>/` (default
`<output_dir>/runs/`), whole, for comparison. A run lists every file it writes in its own manifest
(`run-manifest.json`, written as it creates them); moving a run aside moves exactly those files and
nothing else that happens to be in `output_dir`.

The decision (`decide_run`, a pure function over the config's training fields, the previous run's
run.json and the checkpoints on disk):

    resume     an interrupted run (cancelled, failed, killed) of the same training config and data
    new        no run yet; or the last one finished / its training fields or data changed (auto);
               or `resume: never`. The previous run moves to history first.
    nothing    the last run finished with the same training config and data (exit 0, nothing written)
    refuse     `resume: strict` and the config or data changed (today's refusal, exit 2)

The move is atomic for a reader of history_dir: files are renamed into `<history>/.moving-<id>/`, the
manifest last, then that folder is renamed to `<history>/<id>/`. A crash in between is finished by the
next run (`recover_moves`).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.outputs import atomic_write_json, fsync_dir

if TYPE_CHECKING:
    from trainer.checkpoint import Candidate

MANIFEST = "run-manifest.json"
MOVING_PREFIX = ".moving-"


def new_run_id(started: float, training_hash: str) -> str:
    """Sortable by time: `20261201-023615-3fa2c1` (UTC start, then the training hash)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(started))}-{training_hash[:6]}"


@dataclass
class PreviousRun:
    """What the decision needs of the run currently in output_dir (from its run.json and manifest)."""

    run_id: str
    status: str  # running | succeeded | failed | cancelled
    training_fields: dict
    data_fingerprint: str | None
    finished_at: float | None = None
    steps: int | None = None
    final_loss: float | None = None
    has_manifest: bool = True


@dataclass
class RunDecision:
    action: str  # resume | new | nothing | refuse
    reason: str  # the console line
    checkpoint: Path | None = None  # resume from
    move_previous: bool = False
    warnings: list[str] = field(default_factory=list)


def config_changes(old: dict, new: dict, defaults: dict) -> list[str]:
    """`field old -> new` for each training field that differs. A field an older run did not record
    counts as its default (a new agentd key must not look like a change)."""
    out = []
    for k in sorted(set(old) | set(new)):
        before = old[k] if k in old else defaults.get(k)
        after = new[k] if k in new else defaults.get(k)
        if before != after:
            out.append(f"{k} {_short(before)} -> {_short(after)}")
    return out


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 60 else text[:57] + "..."


def decide_run(policy: str, training_fields: dict, data_fingerprint: str, previous: PreviousRun | None,
               candidates: list["Candidate"], defaults: dict, history_label: str = "runs",
               own_checkpoints: Path | None = None) -> RunDecision:
    """What to do with a submitted config, given the run in output_dir (pure; see the module doc)."""
    from trainer.checkpoint import choose_resume

    kept = (lambda p: f"the previous one is kept in {history_label}/{p.run_id}") if previous else None
    if policy == "never":
        if previous is None:
            return RunDecision("new", "resume: never: starting a new run")
        return RunDecision("new", f"resume: never: starting a new run; {kept(previous)}", move_previous=True)

    if previous is not None and previous.status == "succeeded":
        changes = config_changes(previous.training_fields, training_fields, defaults)
        if previous.data_fingerprint != data_fingerprint:
            changes.append("dataset: files or captions changed")
        if not changes and policy in ("auto", "strict"):
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(previous.finished_at or 0))
            return RunDecision("nothing", f"already trained at {when} (run {previous.run_id}): nothing to do "
                                          "(set resume: never to train it again)")
        if changes and policy == "strict":
            return RunDecision("refuse", (
                f"the last run ({previous.run_id}) finished with another training config or data:\n  "
                + "\n  ".join(changes) + "\nresume: strict refuses to start a new run; set resume: auto to start "
                "one (the previous run is kept in runs/), or undo the changes"))
        if changes and policy == "auto":
            return RunDecision("new", f"config changed since the last run ({'; '.join(changes)}): starting a new "
                                      f"run; {kept(previous)}", move_previous=True)

    named = policy not in ("auto", "strict")
    choice = choose_resume("auto" if not named else policy, candidates, training_fields, data_fingerprint)
    if choice.checkpoint is not None:
        step = next((c.step for c in candidates if c.path == choice.checkpoint), -1)
        if named:  # a checkpoint named by path: a new run starting from it, unless it is this run's own
            own = previous is not None and own_checkpoints is not None and own_checkpoints in choice.checkpoint.parents
            return RunDecision("resume", f"resuming from step {step} of {choice.checkpoint}" +
                               (f"; {kept(previous)}" if previous is not None and not own else ""),
                               choice.checkpoint, move_previous=previous is not None and not own,
                               warnings=choice.warnings)
        what = f"the interrupted run {previous.run_id}" if previous else "the run in output_dir"
        return RunDecision("resume", f"resuming {what} from step {step} (same training config and data)",
                           choice.checkpoint, warnings=choice.warnings)
    if choice.refusal and (named or policy == "strict" or not choice.changes):
        return RunDecision("refuse", choice.refusal, warnings=choice.warnings)
    if choice.changes:
        label = f"the interrupted run {previous.run_id} ({previous.status})" if previous else "the checkpoints in output_dir"
        keep_note = kept(previous) if previous else "they stay in place (no run manifest)"
        return RunDecision("new", f"config changed since {label} ({'; '.join(choice.changes)}): starting a new "
                                  f"run; {keep_note}", move_previous=previous is not None, warnings=choice.warnings)
    if previous is None:
        return RunDecision("new", "starting the first run in output_dir", warnings=choice.warnings)
    return RunDecision("new", f"the previous run {previous.run_id} ({previous.status}) left no usable checkpoint: "
                              f"starting a new run; {kept(previous)}", move_previous=True, warnings=choice.warnings)


# ------------------------------------------------------------------------------------------------
# The I/O shell: reading the previous run, the manifest, moving a run aside.


def read_previous(output_dir: Path, non_training: frozenset) -> PreviousRun | None:
    """The run in output_dir, from its run.json (None when there is none or it is unreadable)."""
    try:
        data = json.loads((output_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or "config" not in data:
        return None
    fields = data.get("training_fields") or {k: v for k, v in data["config"].items() if k not in non_training}
    started = data.get("times", {}).get("first_started") or data.get("times", {}).get("started") or 0
    manifest = read_manifest(output_dir)
    run_id = data.get("run_id") or (manifest or {}).get("run_id") or new_run_id(started, data.get("training_hash", ""))
    return PreviousRun(run_id, data.get("status", "running"), fields, data.get("dataset", {}).get("fingerprint"),
                       data.get("times", {}).get("finished"), data.get("steps", {}).get("done"),
                       data.get("final_loss"), has_manifest=manifest is not None)


def read_manifest(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None
    except (OSError, ValueError):
        return None


class RunManifest:
    """The files one run wrote, relative to output_dir; rewritten (atomically) when one is added."""

    def __init__(self, output_dir: Path, run_id: str, files: list[str] | None = None):
        self.output_dir, self.run_id = Path(output_dir), run_id
        self.files: list[str] = list(files or [])

    @classmethod
    def continue_or_start(cls, output_dir: Path, run_id: str) -> "RunManifest":
        existing = read_manifest(output_dir)
        if existing and existing.get("run_id") == run_id:
            return cls(output_dir, run_id, existing["files"])
        return cls(output_dir, run_id)

    def add(self, *paths) -> None:
        rels = [str(Path(p).resolve().relative_to(self.output_dir.resolve())) if Path(p).is_absolute() else str(p)
                for p in paths]
        new = [r for r in rels if r not in self.files]
        if new or not (self.output_dir / MANIFEST).exists():
            self.files += new
            atomic_write_json(self.output_dir / MANIFEST, {"run_id": self.run_id, "files": self.files})


def _rename(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.move(str(src), str(dst))  # history_dir on another filesystem: copy, then delete


def move_aside(output_dir: Path, history: Path, run_id: str) -> Path | None:
    """Move the files listed in output_dir's run manifest to `history/<run_id>/`. Returns that folder
    (None when output_dir has no manifest: nothing is moved, since nothing is known to be the run's)."""
    output_dir, history = Path(output_dir), Path(history)
    manifest = read_manifest(output_dir)
    if manifest is None:
        return None
    run_id = manifest.get("run_id") or run_id
    final = _free_name(history, run_id)
    staging = history / f"{MOVING_PREFIX}{final.name}"
    staging.mkdir(parents=True, exist_ok=True)
    parents = set()
    for rel in manifest["files"]:
        rel_path = Path(rel)
        if rel_path.is_absolute() or ".." in rel_path.parts or rel == MANIFEST:
            continue  # a manifest only ever names paths inside output_dir
        src = output_dir / rel_path
        if src.exists() or src.is_symlink():
            _rename(src, staging / rel_path)
            parents.update(p for p in rel_path.parents if str(p) != ".")
    _rename(output_dir / MANIFEST, staging / MANIFEST)  # last: its absence marks the move as done
    for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
        try:
            (output_dir / folder).rmdir()  # only when the run's files were all it held
        except OSError:
            pass
    os.rename(staging, final)
    fsync_dir(history)
    return final


def _free_name(history: Path, run_id: str) -> Path:
    final, n = history / run_id, 2
    while final.exists():
        final, n = history / f"{run_id}-{n}", n + 1
    return final


def recover_moves(output_dir: Path, history: Path) -> None:
    """Finish a move a crash cut short: complete ones (manifest moved) are renamed into place; a move
    whose manifest is still in output_dir is simply done again by the next `move_aside`."""
    if not Path(history).is_dir():
        return
    for staging in Path(history).glob(f"{MOVING_PREFIX}*"):
        if (staging / MANIFEST).exists():
            os.rename(staging, _free_name(history, staging.name[len(MOVING_PREFIX):]))
        elif read_manifest(output_dir) is None:
            continue  # nothing to finish it from; leave it for a person to look at
        else:
            move_aside(output_dir, history, staging.name[len(MOVING_PREFIX):])


def history_runs(history: Path) -> list[Path]:
    """Run folders in history (those with a run manifest), oldest first."""
    if not Path(history).is_dir():
        return []
    return sorted((p for p in Path(history).iterdir()
                   if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file()), key=lambda p: p.name)


def prune_history(history: Path, keep: int) -> list[Path]:
    """Delete the oldest run folders beyond `keep` (never a folder that is not a run)."""
    runs = history_runs(history)
    removed = runs[: max(0, len(runs) - keep)]
    for p in removed:
        shutil.rmtree(p)
    return removed


def is_run_folder(path: Path) -> bool:
    return (Path(path) / "run.json").is_file() and (Path(path) / "logs" / "loss.csv").is_file()


def newest_previous(history: Path) -> Path | None:
    runs = history_runs(history)
    return runs[-1] if runs else None


# ------------------------------------------------------------------------------------------------
# What a job calls at setup.


def history_dir(cfg) -> Path:
    return Path(cfg.history_dir) if cfg.history_dir else Path(cfg.output_dir) / "runs"


def training_defaults() -> dict:
    """The JSON form of each config field's default (what an older run.json that lacks a key meant)."""
    from trainer.config import TrainConfig

    out = {}
    for name, f in TrainConfig.model_fields.items():
        if not f.is_required():
            value = f.get_default(call_default_factory=True)
            out[name] = json.loads(json.dumps(value.model_dump() if hasattr(value, "model_dump") else value,
                                              default=str))
    return out


@dataclass
class RunStart:
    decision: RunDecision
    run_id: str
    previous: PreviousRun | None
    moved_to: Path | None = None  # where the previous run went
    manifest: RunManifest | None = None

    def record(self, *paths) -> None:
        if self.manifest is not None:
            self.manifest.add(*paths)


def begin_run(cfg, data_fingerprint: str, started: float) -> RunStart:
    """Decide the run (see `decide_run`) and, for a new one, move the previous run aside first."""
    from trainer.checkpoint import scan_candidates
    from trainer.config import NON_TRAINING_FIELDS

    out, history = Path(cfg.output_dir), history_dir(cfg)
    recover_moves(out, history)
    previous = read_previous(out, NON_TRAINING_FIELDS)
    candidates = [] if cfg.resume == "never" else scan_candidates(cfg.resume, out / "checkpoints")
    try:
        label = str(history.relative_to(out))
    except ValueError:
        label = str(history)
    decision = decide_run(cfg.resume, cfg.training_fields(), data_fingerprint, previous, candidates,
                          training_defaults(), label, out / "checkpoints")
    if decision.action in ("refuse", "nothing"):
        return RunStart(decision, previous.run_id if previous else "", previous)
    moved = None
    if decision.move_previous and previous is not None:
        moved = move_aside(out, history, previous.run_id)
        if moved is None:
            decision.warnings.append(f"the previous run in {out} has no {MANIFEST} (written by an older agentd): "
                                     "its files stay in place and may be overwritten")
        prune_history(history, cfg.keep_runs)
    run_id = previous.run_id if decision.action == "resume" and previous and not decision.move_previous \
        else new_run_id(started, cfg.config_hash())
    return RunStart(decision, run_id, previous, moved)


def problems(cfg) -> list:
    """Preflight: `compare_with` must name a run folder."""
    from trainer.errors import Problem

    if cfg.compare_with is not None and not is_run_folder(cfg.compare_with):
        return [Problem("compare_with", "is not a run folder (no run.json and logs/loss.csv)",
                        "point it at an output_dir or a runs/<run-id> folder that holds a finished run",
                        str(cfg.compare_with))]
    return []
