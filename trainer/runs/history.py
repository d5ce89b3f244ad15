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
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.runs.outputs import atomic_write_json

if TYPE_CHECKING:
    from trainer.runs.checkpoint import Candidate

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
    from trainer.runs.checkpoint import choose_resume

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
        data = json.loads(_read_no_link(output_dir / "run.json"))
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
        data = json.loads(_read_no_link(Path(folder) / MANIFEST))
        return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None
    except (OSError, ValueError):
        return None


def _read_no_link(path: Path) -> str:
    """The text of a file that must not be a symbolic link (ELOOP otherwise): run.json and the manifest
    sit in a folder the submitter writes, and a link there must not make the daemon read its own files."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, encoding="utf-8") as f:
        return f.read()


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


# Safety: output_dir (and its runs/) is writable by the submitter, who could plant symbolic links there
# (`logs -> /var/lib/agentd/state`, a `.moving-<id>` link, a `runs` link) to make the daemon move, write or
# delete its own files. Every step below therefore walks folders by file descriptor with O_NOFOLLOW: a
# symbolic link on the way is refused (ELOOP), never followed, and a check cannot be raced by swapping a
# folder for a link between the check and the use.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeHistory(Exception):
    """A planted symbolic link (or a folder not made by this run) where the run history moves files."""


def _open_dir(path: Path, create: bool = False) -> int:
    """An fd on the folder `path` itself, refusing it when it is a symbolic link (its parents may be links:
    they are where the user chose to keep their outputs). `create`: make it first (parents too)."""
    if create:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except FileNotFoundError:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path)
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeHistory(f"{path} is a symbolic link or not a folder: refused (the run history never "
                                "follows links); remove it") from None
        raise


def _walk_dir(top_fd: int, parts, create: bool = False) -> int:
    """An fd on top/parts... reached one component at a time without following a link (ELOOP otherwise)."""
    fd = os.dup(top_fd)
    try:
        for name in parts:
            if create:
                try:
                    os.mkdir(name, dir_fd=fd)
                except FileExistsError:
                    pass
            nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def _inside(root: Path, history: Path) -> bool:
    root, history = Path(os.path.abspath(root)), Path(os.path.abspath(history))
    return history == root or root in history.parents


def _history_fd(output_dir: Path, history: Path) -> int:
    """An fd on history_dir. Under output_dir (the default runs/) it is reached from output_dir without
    following any link; elsewhere (a configured history_dir) the folder itself must not be a link."""
    if _inside(output_dir, history):
        out_fd = _open_dir(output_dir)
        try:
            rel = Path(os.path.abspath(history)).relative_to(Path(os.path.abspath(output_dir))).parts
            try:
                return _walk_dir(out_fd, rel, create=True)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeHistory(f"{history}: a symbolic link (or a file) on the way from {output_dir}: "
                                        "refused (the run history never follows links); remove it") from None
                raise
        finally:
            os.close(out_fd)
    return _open_dir(history, create=True)


def _staging_fd(history_fd: int, name: str) -> int:
    """The `.moving-<id>` folder: made now, or one this daemon made for a move a crash cut short. A link or
    a folder someone else made under that name is refused (it could lead anywhere)."""
    try:
        os.mkdir(name, 0o770, dir_fd=history_fd)
    except FileExistsError:
        st = os.lstat(name, dir_fd=history_fd)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise UnsafeHistory(f"{name} in the run history is a symbolic link or was not made by agentd: "
                                "refused; remove it") from None
    return os.open(name, _DIR_FLAGS, dir_fd=history_fd)


def _move_entry(src_fd: int, dst_fd: int, name: str) -> None:
    try:
        os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # history_dir on another file system: copy, then delete. /proc/self/fd/N names the folders opened
        # above (never a path that could have been swapped); shutil.move copies links as links.
        shutil.move(f"/proc/self/fd/{src_fd}/{name}", f"/proc/self/fd/{dst_fd}/{name}")


def _is_link_out(folder_fd: int, name: str, root: Path) -> bool:
    """`name` in the folder is a symbolic link whose target lies outside output_dir."""
    st = os.lstat(name, dir_fd=folder_fd)
    if not stat.S_ISLNK(st.st_mode):
        return False
    target = Path(os.path.realpath(f"/proc/self/fd/{folder_fd}/{name}"))
    return not (target == root or root in target.parents)


def move_aside(output_dir: Path, history: Path, run_id: str) -> Path | None:
    """Move the files listed in output_dir's run manifest to `history/<run_id>/`. Returns that folder
    (None when output_dir has no manifest: nothing is moved, since nothing is known to be the run's).

    Raises UnsafeHistory when a symbolic link was planted where the move goes (see above). A manifest
    entry reached through a link, or that is itself a link out of output_dir, stays where it is."""
    output_dir, history = Path(output_dir), Path(history)
    manifest = read_manifest(output_dir)
    if manifest is None:
        return None
    run_id = manifest.get("run_id") or run_id
    root = Path(os.path.realpath(output_dir))
    out_fd = _open_dir(output_dir)
    history_fd = _history_fd(output_dir, history)
    try:
        final = _free_name(history_fd, run_id)
        staging_name = f"{MOVING_PREFIX}{final}"
        staging_fd = _staging_fd(history_fd, staging_name)
        try:
            parents = set()
            for rel in manifest["files"]:
                rel_path = Path(rel)
                if rel_path.is_absolute() or ".." in rel_path.parts or rel == MANIFEST or not rel_path.parts:
                    continue  # a manifest only ever names paths inside output_dir
                folders = rel_path.parts[:-1]
                try:
                    src_fd = _walk_dir(out_fd, folders)
                except OSError:
                    continue  # gone, or a folder on the way is a link: not the run's file to move
                try:
                    if not os.path.lexists(f"/proc/self/fd/{src_fd}/{rel_path.name}") \
                            or _is_link_out(src_fd, rel_path.name, root):
                        continue
                    dst_fd = _walk_dir(staging_fd, folders, create=True)
                    try:
                        _move_entry(src_fd, dst_fd, rel_path.name)
                    finally:
                        os.close(dst_fd)
                finally:
                    os.close(src_fd)
                parents.update(p for p in rel_path.parents if str(p) != ".")
            _move_entry(out_fd, staging_fd, MANIFEST)  # last: its absence marks the move as done
        finally:
            os.close(staging_fd)
        for folder in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            try:
                parent_fd = _walk_dir(out_fd, folder.parts[:-1])
            except OSError:
                continue
            try:
                os.rmdir(folder.name, dir_fd=parent_fd)  # only when the run's files were all it held
            except OSError:
                pass
            finally:
                os.close(parent_fd)
        os.rename(staging_name, final, src_dir_fd=history_fd, dst_dir_fd=history_fd)
        os.fsync(history_fd)
        return Path(history, final)
    finally:
        os.close(out_fd)
        os.close(history_fd)


def _free_name(history_fd: int, run_id: str) -> str:
    final, n = run_id, 2
    while _lexists_at(history_fd, final):
        final, n = f"{run_id}-{n}", n + 1
    return final


def _lexists_at(folder_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=folder_fd)
        return True
    except FileNotFoundError:
        return False


def recover_moves(output_dir: Path, history: Path) -> None:
    """Finish a move a crash cut short: complete ones (manifest moved) are renamed into place; a move
    whose manifest is still in output_dir is simply done again by the next `move_aside`. A `.moving-*`
    symbolic link is never followed (refused by `move_aside`, skipped here)."""
    if not os.path.lexists(history):
        return
    history_fd = _history_fd(output_dir, history)
    try:
        for name in sorted(os.listdir(history_fd)):
            if not name.startswith(MOVING_PREFIX):
                continue
            st = os.lstat(name, dir_fd=history_fd)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue  # a link or someone else's folder: not a move of ours
            if _lexists_at(history_fd, f"{name}/{MANIFEST}"):
                os.rename(name, _free_name(history_fd, name[len(MOVING_PREFIX):]),
                          src_dir_fd=history_fd, dst_dir_fd=history_fd)
            elif read_manifest(output_dir) is None:
                continue  # nothing to finish it from; leave it for a person to look at
            else:
                move_aside(output_dir, history, name[len(MOVING_PREFIX):])
    finally:
        os.close(history_fd)


def history_runs(history: Path) -> list[Path]:
    """Run folders in history (real folders with a run manifest, never a symbolic link), oldest first."""
    if not Path(history).is_dir() or Path(history).is_symlink():
        return []
    return sorted((p for p in Path(history).iterdir()
                   if not p.name.startswith(".") and not p.is_symlink() and p.is_dir()
                   and (p / MANIFEST).is_file() and not (p / MANIFEST).is_symlink()), key=lambda p: p.name)


def prune_history(history: Path, keep: int, output_dir: Path | None = None) -> list[Path]:
    """Delete the oldest run folders beyond `keep` (never a folder that is not a run, never through a
    link: the history folder is opened as `move_aside` opens it, and rmtree works from that descriptor,
    refusing a run folder swapped for a link in the meantime)."""
    runs = history_runs(history)
    removed = runs[: max(0, len(runs) - keep)]
    if not removed:
        return []
    history_fd = _history_fd(output_dir, history) if output_dir is not None else _open_dir(history)
    try:
        for p in removed:
            shutil.rmtree(p.name, dir_fd=history_fd)
    finally:
        os.close(history_fd)
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


def decide_for(cfg, data_fingerprint: str) -> tuple[RunDecision, PreviousRun | None]:
    """`decide_run` for `cfg` as its output_dir stands now, reading only (run.json, the checkpoints): what
    `begin_run` acts on, and what the daemon asks at submit time (a finished, unchanged config is answered
    "nothing to do" there, without waiting for a GPU)."""
    from trainer.runs.checkpoint import scan_candidates
    from trainer.config import NON_TRAINING_FIELDS

    out, history = Path(cfg.output_dir), history_dir(cfg)
    previous = read_previous(out, NON_TRAINING_FIELDS)
    candidates = [] if cfg.resume == "never" else scan_candidates(cfg.resume, out / "checkpoints")
    try:
        label = str(history.relative_to(out))
    except ValueError:
        label = str(history)
    decision = decide_run(cfg.resume, cfg.training_fields(), data_fingerprint, previous, candidates,
                          training_defaults(), label, out / "checkpoints")
    return decision, previous


def refusal(cfg, decision: RunDecision, source: str | None):
    """A "refuse" decision (`resume: strict` and a changed config or data) as the config problem it is,
    at the line of `resume:`: what the daemon answers at submit and a job raises as it starts."""
    from trainer.errors import ConfigError, Problem

    return ConfigError(cfg.located([Problem("resume", decision.reason, "", cfg.resume)]), source)


def begin_run(cfg, data_fingerprint: str, started: float) -> RunStart:
    """Decide the run (see `decide_run`) and, for a new one, move the previous run aside first."""
    out, history = Path(cfg.output_dir), history_dir(cfg)
    try:
        recover_moves(out, history)
    except UnsafeHistory:
        pass  # nothing of ours to finish there; a move into it is refused below with the reason
    decision, previous = decide_for(cfg, data_fingerprint)
    if decision.action in ("refuse", "nothing"):
        return RunStart(decision, previous.run_id if previous else "", previous)
    moved = None
    if decision.move_previous and previous is not None:
        try:
            moved = move_aside(out, history, previous.run_id)
        except UnsafeHistory as e:
            from trainer.errors import ConfigError, Problem

            field_name = "history_dir" if cfg.history_dir else "output_dir"
            raise ConfigError([Problem(field_name, f"cannot keep the previous run: {e}",
                                       "remove the symbolic link (the run history never follows links)",
                                       str(history))]) from None
        if moved is None:
            decision.warnings.append(f"the previous run in {out} has no {MANIFEST} (written by an older agentd): "
                                     "its files stay in place and may be overwritten")
        prune_history(history, cfg.keep_runs, out)
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
